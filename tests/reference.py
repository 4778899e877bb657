"""Reference answers the tests compare the product with: the whole float64 matrix, then a sort."""
from __future__ import annotations

import numpy as np


def brute_force_float64(features: np.ndarray, k: int, exclude_self: bool = True):
    """Top-k by float64 dot product (the row itself excluded), ties to the lower index (stable sort).

    Returns ``(index int32 [N, k], score float64 [N, k])``; tests and small N only.
    """
    x = np.asarray(features, dtype=np.float64)
    s = x @ x.T
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return order.astype(np.int32), np.take_along_axis(s, order, 1)


def boosted_brute_force(features: np.ndarray, codes: np.ndarray, boost, k: int):
    """Every pair's final score, (1 - mix) x float64 cosine + mix x the weights of the fields on
    which the two agree (code -1, unknown, never agrees), sorted; ties to the lower index.

    Returns ``(index int32 [N, k], score float32 [N, k])``; small N only.
    """
    x = np.asarray(features, dtype=np.float32).astype(np.float64)
    n = len(x)
    cand = np.stack([np.delete(np.arange(n), r) for r in range(n)])
    visual = np.einsum("bd,bkd->bk", x, x[cand], optimize=False)
    meta = np.zeros(cand.shape)
    for c, (_, w) in zip(np.asarray(codes), boost.fields):
        meta += w * ((c[:, None] == c[cand]) & (c[:, None] >= 0))
    final = (1 - boost.mix) * visual + boost.mix * meta
    order = np.lexsort((cand, -final), axis=1)[:, :k]
    return (np.take_along_axis(cand, order, 1).astype(np.int32),
            np.take_along_axis(final, order, 1).astype(np.float32))
