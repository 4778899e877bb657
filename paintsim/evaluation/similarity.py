"""Intra vs inter similarity: are a painting's neighbours closer than random paintings?

*intra* = mean cosine similarity of each painting to its top-k neighbours; *inter* = mean cosine
similarity of random pairs (i != j, seeded). Both are dot products of rows of ``features.npy``,
streamed in blocks. :func:`inter_similarity` takes the features and a seed and nothing else, so
"inter" can never be computed from the neighbour table: that table holds only the *most* similar
pairs, and its mean (0.86 in one earlier painting-similarity study, against 0.58 for random
pairs of the same model) is the intra number, not a baseline. When ``similarity_scores.h5``
exists, the same random pairs are read back from it and compared.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .. import matrix, metrics
from ..errors import BadValue

#: Working-set budget of one streamed block, in float32 values (32 Mi values = 128 MiB).
BLOCK_VALUES = 1 << 25



def _block_rows(n_cols: int) -> int:
    return max(1, BLOCK_VALUES // max(1, n_cols))


def neighbor_similarities(features: np.ndarray, index: np.ndarray, progress: bool = False) -> np.ndarray:
    """``out[i, r] = features[i] . features[index[i, r]]``, streamed in blocks of rows."""
    n, k = index.shape
    d = features.shape[1]
    out = np.empty((n, k), dtype=np.float32)
    step = _block_rows(k * d)
    for s in tqdm(range(0, n, step), desc="neighbour similarities", unit="block",
                   disable=not progress or n <= step):
        e = min(n, s + step)
        q = np.asarray(features[s:e], dtype=np.float32)
        nb = np.asarray(features[index[s:e].ravel()], dtype=np.float32).reshape(e - s, k, d)
        out[s:e] = np.einsum("bd,bkd->bk", q, nb)
    return out


def random_pairs(n: int, n_pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n_pairs`` ordered pairs (i, j), i != j, each uniform over the n*(n-1) such pairs."""
    if n < 2:
        raise BadValue("n", n, "random pairs need at least 2 paintings")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, size=n_pairs)
    j = rng.integers(0, n - 1, size=n_pairs)
    j += j >= i  # skip i itself: uniform over the other n - 1 rows
    return i.astype(np.int64), j.astype(np.int64)


def pair_similarities(features: np.ndarray, i: np.ndarray, j: np.ndarray, progress: bool = False) -> np.ndarray:
    """``features[i[p]] . features[j[p]]`` for every pair p, streamed."""
    d = features.shape[1]
    out = np.empty(len(i), dtype=np.float32)
    step = _block_rows(2 * d)
    for s in tqdm(range(0, len(i), step), desc="random-pair similarities", unit="block",
                   disable=not progress or len(i) <= step):
        e = min(len(i), s + step)
        a = np.asarray(features[i[s:e]], dtype=np.float32)
        b = np.asarray(features[j[s:e]], dtype=np.float32)
        out[s:e] = np.einsum("pd,pd->p", a, b)
    return out


def inter_similarity(features: np.ndarray, n_pairs: int, seed: int,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The inter-class baseline: similarities of random pairs, computed from the features only.

    Deliberately takes no neighbour table: the mean over the top-k table is the *intra* number,
    and using it as "inter" is the error this tool exists to avoid. When the collection has no
    more than ``n_pairs`` distinct pairs, every pair i < j is used once (the exact mean).
    Returns (i, j, similarity).
    """
    n = features.shape[0]
    if n * (n - 1) // 2 <= n_pairs:  # small collection: every pair once, the exact mean
        i, j = np.triu_indices(n, k=1)
        i, j = i.astype(np.int64), j.astype(np.int64)
    else:
        i, j = random_pairs(n, n_pairs, seed)
    return i, j, pair_similarities(features, i, j, progress)


def similarity_section(emb, index: np.ndarray, table_scores: np.ndarray | None,
                       cfg) -> tuple[dict, dict]:
    """Intra vs inter; returns (report section, distributions for the histogram)."""
    features = emb.features
    nb_sim = neighbor_similarities(features, index, cfg.progress)
    intra_per_painting = nb_sim.mean(axis=1)
    i, j, inter = inter_similarity(features, cfg.pairs, cfg.seed, cfg.progress)
    sep = metrics.separation(nb_sim, inter)
    section: dict[str, Any] = {
        "k": int(index.shape[1]),
        "intra": float(intra_per_painting.mean()),
        "intra_definition": f"mean over paintings of the mean cosine similarity to its top-{index.shape[1]} "
                            "neighbours, dot products of features.npy rows",
        "intra_std_over_paintings": float(intra_per_painting.std()),
        "inter": float(inter.mean()),
        "inter_definition": (f"mean cosine similarity of {inter.size:,} random pairs (i != j, uniform, "
                             f"seed {cfg.seed})" if inter.size == cfg.pairs else
                             f"mean cosine similarity of all {inter.size:,} pairs i < j (fewer than "
                             f"{cfg.pairs:,})") + ", dot products of features.npy rows",
        "inter_std": float(inter.std()),
        "n_pairs": int(inter.size),
        "all_pairs": bool(inter.size != cfg.pairs),
        "ratio_intra_over_inter": float(intra_per_painting.mean() / inter.mean()) if inter.mean() else None,
        "separation": sep,
    }
    if table_scores is not None:
        section["table_vs_features_max_abs_diff"] = float(np.max(np.abs(table_scores - nb_sim)))
    section["matrix_check"] = matrix.check_pairs(emb.paths.similarity, emb, i, j, inter,
                                                 max_rows=cfg.h5_max_rows, seed=cfg.seed,
                                                 progress=cfg.progress)
    return section, {f"top-{index.shape[1]} neighbours": nb_sim, "random pairs": inter}
