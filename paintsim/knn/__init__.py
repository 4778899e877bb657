"""The one blockwise all-pairs kernel: unit-row arrays in, exact top-k cosine neighbours out.

Every similarity route of paintsim goes through this package:

* :func:`top_k_neighbors` streams blocks of rows against all rows and keeps a running top list per
  row (faiss ``exhaustive_search`` style), so the N x N matrix never exists in memory;
* :func:`score_blocks` yields the same score blocks for ``compute_similarity.py`` to store;
* :func:`select_top_k` is the one tie-aware selection (descending score, ties to the lower
  index) shared by the streaming route and by ``extract_top_10.py`` reading the stored matrix.

Speed. The default method ("symmetric") uses cos(i, j) = cos(j, i): it multiplies only the tiles
on and above the diagonal (half of the 2*N*N*D flops) and offers each tile to both its rows' and
its columns' candidate sets; a score is merged only when it reaches the set's minimum (one
vectorised comparison per tile and direction, on two threads). On the CPU every row starts from a
seeded threshold, its k-th score against a sample of columns (:func:`_seed_thresholds`), so no
row needs a dense first tile, and the sets are kept unordered (np.argpartition) until the end.
"dense" (every row block against all rows) is the plain reference. The candidate pass runs in
float32 or, where a measured probe (:mod:`paintsim.precision`) shows it at least 1.5x faster, in
bf16 on centred rows (``precision``, :class:`_Bf16Scorer`).

Exactness (both precisions give bit-identical output). Let s_ij be the exact dot product of the
float32 rows, s~_ij the candidate pass's score, with a proven bound |s~ - s| <= a + b|s~| (a, b
from the data's row norms, :class:`_Scorer` / :class:`_Bf16Scorer`). Let t~ be the row's k-th
largest s~ and f(t) = t - a - b|t| (non-decreasing). The k pairs with s~ >= t~ have s >= f(t~),
so the true k-th score t >= f(t~); a true top-k member j has s_j >= t >= f(t~), hence
g(s~_j) = s~_j + a + b|s~_j| >= f(t~). Every pair with g(s~) >= f(t~) is therefore kept (the
running list of C >= k candidates must reach below that window, and hold no placeholder of the
seeded start, else the row is redone exactly in float32 with its own window). The kept pairs are
narrowed by float32 scores (|s32 - s| <= gamma_D |x|^2 =: e, so true top-k members have
s32 >= t32 - 2e, :func:`_float64_dots`) and rescored canonically: the float64 dot
product rounded to float32, with pairs whose float64 value lies within its error bound of a
float32 rounding boundary or of another candidate recomputed exactly (``math.fsum``), then
ordered by (score descending, index ascending). The result is the exact top-k of the float32
rows, independent of tile positions, of the precision and of the method.

The modules: ``selection`` (tie-aware top-k, input checks), ``scorers`` (the float32 and bf16
candidate scores and their bounds), ``tiles`` (the torch passes: dense, and symmetric on CUDA),
``cpu_pass`` (the seeded symmetric CPU pass), ``exact`` (window, redo, canonical rescoring).
"""
from __future__ import annotations

import logging
import math
import sys
from typing import Iterator

import numpy as np

from ..devices import DEFAULT_MEMORY_BUDGET, auto_block_size, resolve_device
from ..errors import BadValue
from .cpu_pass import _top_k_symmetric_cpu
from .exact import NEAR_TIE, _exact_top_k, _torch_view, settle_near_ties
from .scorers import _Bf16Scorer, _Scorer, _predicted_window
from .selection import _as_rows, check_block_size, merge_top_k, select_top_k, validate_k
from .tiles import _top_k_dense, _top_k_symmetric

log = logging.getLogger(__name__)

METHODS = ("auto", "symmetric", "dense")
PRECISIONS = ("auto", "fp32", "bf16")
#: candidates kept beyond k so that exact ties at the k-th place are settled in float64
RERANK_SPARE = 3


def score_blocks(features: np.ndarray, *, device: str = "cpu", block_size: int | None = None,
                 start_row: int = 0, memory_budget: int | None = None,
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(r0, r1, scores)``: float32 ``features[r0:r1] @ features.T`` on the host, in order.

    Used by ``compute_similarity.py`` to write the full matrix; ``start_row`` resumes mid-way.
    """
    dev = resolve_device(device)
    features = _as_rows(features)
    check_block_size(block_size)
    n = features.shape[0]
    block = block_size or auto_block_size(n, 8 * n, memory_budget)
    scorer = _Scorer(features, dev)
    for r0 in range(start_row, n, block):
        r1 = min(n, r0 + block)
        s = scorer.scores(r0, r1, 0, n)
        yield r0, r1, s if isinstance(s, np.ndarray) else s.cpu().numpy()


#: below this many multiply-adds (N * N * D; 20,000 x 20,000 x 768 is 3e11) the CPU's "auto" stays
#: float32 unless torch is loaded already: the float32 route is numpy alone, and importing torch
#: for the bf16 product costs 2-3 s, more than the bf16 pass saves at such sizes
#: (docs/performance.md#bf16-where-the-cpu-has-it)
SMALL_CPU_WORK = 1e12


def resolve_precision(precision: str, device: str, n: int | None = None, d: int | None = None) -> str:
    """``auto`` -> ``bf16`` where the cached probe shows the bf16 product >= 1.5x float32 here
    (and, on the CPU, the work is large enough to pay for importing torch)."""
    if precision not in PRECISIONS:
        raise BadValue("precision", precision, f"choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device == "cpu" and n is not None and d is not None and float(n) * n * d < SMALL_CPU_WORK \
            and "torch" not in sys.modules:
        return "fp32"
    from ..precision import choose

    return choose("matmul", device)


#: "auto" falls back to the float32 pass when the bf16 list would need more candidates per row: a
#: guard against data whose error window holds most of a row (e.g. thousands of near-duplicates);
#: on a 2-vCPU Sapphire Rapids lists of 45-103 still ran 2-2.5x faster than the float32 pass
#: (docs/performance.md#bf16-where-the-cpu-has-it)
MAX_BF16_CAPACITY = 256



def _capacity(k: int, n_avail: int, precision: str) -> int:
    """Candidates kept per row in the pass: k plus room for the error window (wider in bf16)."""
    extra = 32 if precision == "bf16" else 8
    return min(n_avail, k + RERANK_SPARE + extra)


def top_k_neighbors(features: np.ndarray, k: int, *, device: str = "cpu",
                    block_size: int | None = None, exclude_self: bool = True,
                    progress: bool = False, method: str = "auto",
                    memory_budget: int | None = None,
                    precision: str = "auto", stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours of every row among all rows, streamed block by block.

    Returns ``(index int32 [N, k], score float32 [N, k])``, each row sorted by descending score,
    ties broken by the lower index, the row itself excluded when ``exclude_self``; the scores are
    the float64 dot products of the float32 rows rounded once to float32 (module docstring).
    ``device``: ``cpu``, ``cuda`` or ``auto``. ``method``: ``auto``/``symmetric`` (upper-triangle
    tiles, half the flops) or ``dense`` (row blocks against all rows). ``precision``: the candidate
    pass in ``fp32`` or ``bf16`` (``auto``: bf16 where a cached probe shows it >= 1.5x faster);
    every combination returns the same arrays, bit for bit.
    ``block_size``: rows per tile (default: from ``memory_budget`` and free memory).
    ``stats``: a dict to fill with what ran (precision, candidates per row, rows redone).
    """
    features = _as_rows(features)
    n = features.shape[0]
    k = validate_k(k, n, exclude_self)
    if method not in METHODS:
        raise BadValue("method", method, f"choose one of {', '.join(METHODS)}")
    check_block_size(block_size)
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev, n, features.shape[1])
    n_avail = n - 1 if exclude_self else n
    cap = _capacity(k, n_avail, prec)
    scorer = (_Bf16Scorer(features, dev, k, exclude_self) if prec == "bf16"
              else _Scorer(features, dev))
    if prec == "bf16" and cap < n_avail:
        # the list must hold the whole error window: size it from a sample of the data
        wide = _predicted_window(features, k, exclude_self, scorer.a, scorer.b, scorer.offset)
        cap = min(n_avail, max(cap, k + RERANK_SPARE + int(math.ceil(1.0 * wide))))
        if precision == "auto" and cap > MAX_BF16_CAPACITY:
            log.info("bf16 error window holds ~%d candidates per row here: float32 pass", wide)
            prec, cap = "fp32", _capacity(k, n_avail, "fp32")
            scorer = _Scorer(features, dev)
    if method == "dense":
        idx, vals = _top_k_dense(scorer, cap, block_size, exclude_self, progress, memory_budget)
    elif dev == "cpu":
        idx, vals = _top_k_symmetric_cpu(scorer, cap, block_size, exclude_self, progress, memory_budget)
    else:
        idx, vals = _top_k_symmetric(scorer, cap, block_size, exclude_self, progress, memory_budget)
    if stats is not None:
        stats.update(precision=scorer.precision, requested_precision=precision, candidates_per_row=cap,
                     error_bound=scorer.a, error_bound_relative=scorer.b)
    return _exact_top_k(features, idx, vals, k, scorer.a, scorer.b, exclude_self, scorer.norm_max,
                        stats)



def search(queries: np.ndarray, features: np.ndarray, k: int, *,
           device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` rows of ``features`` for each query vector (queries are not in the collection).

    ``queries`` ``[q, D]`` unit vectors; returns ``(index int32 [q, k], score float32 [q, k])``,
    descending, ties to the lower index, no self exclusion.
    """
    import torch

    features = _as_rows(features)
    q = _as_rows(np.atleast_2d(np.asarray(queries)), "queries")
    if q.shape[1] != features.shape[1]:
        raise ValueError(f"queries have dimension {q.shape[1]} but features have {features.shape[1]}")
    k_out = validate_k(k, features.shape[0], exclude_self=False)
    k = min(k_out + RERANK_SPARE, features.shape[0])
    dev = resolve_device(device)
    n = features.shape[0]
    ft = _torch_view(features) if dev == "cpu" else _Scorer(features, dev).features
    qt = torch.from_numpy(q).to(dev)
    out_idx = np.empty((len(q), k), dtype=np.int32)
    out_val = np.empty((len(q), k), dtype=np.float32)
    block = auto_block_size(n)
    col_chunk = min(n, max(k, (DEFAULT_MEMORY_BUDGET // 12) // max(1, min(block, len(q)))))
    with torch.inference_mode():
        for r0 in range(0, len(q), block):
            r1 = min(len(q), r0 + block)
            vals = idx = None
            for c0 in range(0, n, col_chunk):
                c1 = min(n, c0 + col_chunk)
                s = qt[r0:r1] @ ft[c0:c1].T
                v, i = select_top_k(s, k, c0)
                vals, idx = (v, i) if vals is None else merge_top_k(vals, idx, v, i, k)
            out_idx[r0:r1] = idx.cpu().numpy()
            out_val[r0:r1] = vals.cpu().numpy()
    return settle_near_ties(q, features, out_idx, out_val, k_out)



def top_k_other_groups(features: np.ndarray, groups: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` neighbours of every row among the rows of *other* groups (a face's nearest
    faces in other paintings): the kernel's top ``k + g - 1`` (g: the largest group), then the
    rows of the same group dropped. Raises ``BadValue`` when some row has fewer than ``k`` rows
    outside its group."""
    groups = np.asarray(groups)
    n = len(groups)
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    fewest_outside = int(n - counts.max()) if n else 0
    if k < 1 or k > fewest_outside:
        raise BadValue("k", k, f"must be between 1 and {fewest_outside} (rows outside the largest group)")
    wide = min(n - 1, k + int(counts.max()) - 1)
    index, score = top_k_neighbors(features, wide, exclude_self=True, **kwargs)
    other = inverse[index] != inverse[:, None]
    # the first k rows of another group, in their order (a stable sort puts them first)
    order = np.argsort(~other, axis=1, kind="stable")[:, :k]
    return (np.take_along_axis(index, order, axis=1).astype(np.int32),
            np.take_along_axis(score, order, axis=1).astype(np.float32))



__all__ = ["METHODS", "NEAR_TIE", "PRECISIONS", "check_block_size", "merge_top_k", "resolve_precision",
           "score_blocks", "search", "select_top_k", "settle_near_ties", "top_k_neighbors",
           "top_k_other_groups", "validate_k"]
