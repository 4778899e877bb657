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
