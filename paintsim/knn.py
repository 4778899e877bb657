"""The one blockwise all-pairs kernel: unit-row arrays in, exact top-k cosine neighbours out.

Every similarity route of paintsim goes through this module:

* :func:`top_k_neighbors` streams blocks of rows against all rows and keeps a running top-k per
  row (faiss ``exhaustive_search`` style), so the N x N matrix never exists in memory;
* :func:`score_blocks` yields the same score blocks for ``compute_similarity.py`` to store;
* :func:`select_top_k` is the one tie-aware selection (descending score, ties to the lower
  index) shared by the streaming route and by ``extract_top_10.py`` reading the stored matrix.

Exactness and speed. Every pair's cosine is one float32 dot product from a BLAS (CPU) or cuBLAS
(GPU, TF32 off) matrix multiply, so the neighbours are exact up to float32 rounding. The default
method ("symmetric") uses cos(i, j) = cos(j, i): it multiplies only the tiles on and above the
diagonal (half of the 2*N*N*D flops) and feeds each tile to both its rows' and its columns'
running top-k. Selection is cheap once a row has k candidates: only scores at or above the row's
current k-th score (a per-row threshold, one vectorised comparison per tile) are merged.
"dense" (every row block against all rows, then top-k) is kept as the plain reference.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Iterator

import numpy as np

from .devices import DEFAULT_MEMORY_BUDGET, auto_block_size, available_memory, resolve_device
from .errors import BadValue

log = logging.getLogger(__name__)

METHODS = ("auto", "symmetric", "dense")
#: candidates kept beyond k so that exact ties at the k-th place are settled in float64
RERANK_SPARE = 3
#: float32 scores closer than this are re-ranked in float64 (float32 rounding of a 2048-d unit
#: dot product is ~1e-7; exact duplicates differ only by that rounding)
NEAR_TIE = 1e-5


# --------------------------------------------------------------------------------------- inputs
def _as_rows(features: np.ndarray, what: str = "features") -> np.ndarray:
    """The kernel's only check: a 2-D float array, as C-contiguous float32 (validated upstream,
    by ``paintsim.embeddings``)."""
    arr = np.asarray(features)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be a 2-D float array [N, D], got {arr.dtype} {arr.shape}")
    if arr.dtype == np.float32 and arr.flags.c_contiguous:
        return arr
    return np.ascontiguousarray(arr, dtype=np.float32)


def validate_k(k: int, n: int, exclude_self: bool = True) -> int:
    """``1 <= k < N`` when a row's own index is excluded (``k <= N`` otherwise)."""
    limit = n - 1 if exclude_self else n
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= int(k) <= limit:
        what = "other paintings" if exclude_self else "paintings"
        raise BadValue("k", k, f"must be between 1 and {limit} (there are {limit} {what})")
    return int(k)


def check_block_size(block_size: int | None) -> None:
    if block_size is not None and (isinstance(block_size, bool) or block_size < 1):
        raise BadValue("block_size", block_size, "must be at least 1")


# ------------------------------------------------------------------------------------ selection
def select_top_k(scores, k: int, col_offset: int = 0, self_rows=None):
    """Top ``k`` of each row of a score block, descending, ties to the lower column index.

    ``scores`` is a float torch tensor ``[B, C]`` (any device, modified in place when
    ``self_rows`` is given); ``self_rows`` (int tensor ``[B]``) are global column indices to
    exclude (set to -inf). Returns ``(values [B, k'], indices int64 [B, k'])`` with
    ``k' = min(k, C)``, indices global (``col_offset`` added).
    """
    import torch

    b, c = scores.shape
    if self_rows is not None:
        local = self_rows - col_offset
        inside = (local >= 0) & (local < c)
        if bool(inside.any()):
            rows = torch.nonzero(inside).flatten()
            scores[rows, local[rows]] = -math.inf
    kk = min(k, c)
    if kk == 0:
        return (scores.new_empty((b, 0)), torch.empty((b, 0), dtype=torch.int64, device=scores.device))
    if c > kk:
        # one extra value tells whether the k-th place is tied with something left out
        vals, pos = torch.topk(scores, kk + 1, dim=1, largest=True, sorted=True)
        tied = vals[:, kk - 1] == vals[:, kk]
        vals, pos = vals[:, :kk].contiguous(), pos[:, :kk].contiguous()
        if bool(tied.any()):
            rows = torch.nonzero(tied).flatten()
            sub = scores[rows]
            kth = vals[rows, kk - 1 : kk]
            above = sub > kth
            eq = sub == kth
            need = kk - above.sum(1, keepdim=True)
            # the lowest-index members of the tie fill the remaining places
            keep = above | (eq & (torch.cumsum(eq, 1, dtype=torch.int32) <= need))
            cols = torch.nonzero(keep)[:, 1].reshape(len(rows), kk)
            pos[rows] = cols
            vals[rows] = torch.gather(sub, 1, cols)
    else:
        vals, pos = scores, torch.arange(c, device=scores.device).expand(b, c)
    vals, pos = _sort_desc_lower_index(vals, pos)
    return vals, pos + col_offset


def _sort_desc_lower_index(vals, idx):
    """Sort each row by descending value, equal values by ascending index."""
    import torch

    order = torch.argsort(idx, dim=1, stable=True)
    vals, idx = torch.gather(vals, 1, order), torch.gather(idx, 1, order)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)
    return torch.gather(vals, 1, order), torch.gather(idx, 1, order)


def merge_top_k(vals_a, idx_a, vals_b, idx_b, k: int):
    """Merge two per-row top lists into one of ``k`` (descending, ties to the lower index)."""
    import torch

    vals, idx = _sort_desc_lower_index(torch.cat([vals_a, vals_b], 1), torch.cat([idx_a, idx_b], 1))
    return vals[:, :k].contiguous(), idx[:, :k].contiguous()


# ------------------------------------------------------------------------------------ the kernel
class _Scorer:
    """Float32 scores of row blocks against column blocks, on the CPU (BLAS) or on CUDA (torch)."""

    def __init__(self, features: np.ndarray, device: str):
        import torch

        self.device = device
        self.n, self.d = features.shape
        self.features_np = features
        if device == "cpu":
            # features may be a read-only memory map; the kernel only ever reads this tensor
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                self.features = torch.from_numpy(features)
        else:
            torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products
            self.features = torch.from_numpy(features).to(device)

    def scores(self, r0: int, r1: int, c0: int, c1: int, out=None):
        """Float32 ``features[r0:r1] @ features[c0:c1].T`` as a torch tensor on the device."""
        import torch

        if self.device == "cpu":
            # numpy's BLAS sgemm is faster than torch's on the CPU (docs/performance.md)
            # a contiguous view of the flat scratch buffer: BLAS writes it in place
            buf = None if out is None else out.reshape(-1)[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            res = np.matmul(self.features_np[r0:r1], self.features_np[c0:c1].T, out=buf)
            return torch.from_numpy(res)
        return self.features[r0:r1] @ self.features[c0:c1].T


def _progress(total: int, enabled: bool, desc: str, unit: str = "row"):
    from tqdm import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit=unit, unit_scale=True,
                dynamic_ncols=True, mininterval=0.5)


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
        yield r0, r1, s.cpu().numpy() if dev != "cpu" else s.numpy()


def top_k_neighbors(features: np.ndarray, k: int, *, device: str = "cpu",
                    block_size: int | None = None, exclude_self: bool = True,
                    progress: bool = False, method: str = "auto",
                    memory_budget: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` cosine neighbours of every row among all rows, streamed block by block.

    Returns ``(index int32 [N, k], score float32 [N, k])``, each row sorted by descending score,
    ties broken by the lower index, the row itself excluded when ``exclude_self``.
    ``device``: ``cpu``, ``cuda`` or ``auto``. ``method``: ``auto``/``symmetric`` (upper-triangle
    tiles, half the flops) or ``dense`` (row blocks against all rows); both are exact in float32.
    ``block_size``: rows per tile (default: from ``memory_budget`` and free memory).
    """
    features = _as_rows(features)
    n = features.shape[0]
    k = validate_k(k, n, exclude_self)
    if method not in METHODS:
        raise BadValue("method", method, f"choose one of {', '.join(METHODS)}")
    check_block_size(block_size)
    dev = resolve_device(device)
    # a few spare candidates let the float64 re-ranking settle exact ties at the k-th place
    keep = min(k + RERANK_SPARE, n - 1 if exclude_self else n)
    if method == "dense":
        idx, vals = _top_k_dense(features, keep, dev, block_size, exclude_self, progress, memory_budget)
    else:
        idx, vals = _top_k_symmetric(features, keep, dev, block_size, exclude_self, progress,
                                     memory_budget)
    return settle_near_ties(features, features, idx, vals, k)


def settle_near_ties(queries: np.ndarray, features: np.ndarray, index: np.ndarray,
                     score: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the first ``k`` of each sorted candidate row, re-ranking in float64 the rows in which
    two candidates (the spare ones included) score within ``NEAR_TIE`` of each other."""
    near = np.zeros(len(index), dtype=bool)
    if index.shape[1] > 1:
        near = (score[:, :-1] - score[:, 1:] < NEAR_TIE).any(axis=1)
    out_i = np.ascontiguousarray(index[:, :k], dtype=np.int32)
    out_s = np.ascontiguousarray(score[:, :k], dtype=np.float32)
    rows = np.flatnonzero(near)
    if len(rows):
        ri, rs = rerank_float64(queries[rows], features, index[rows], k)
        out_i[rows], out_s[rows] = ri, rs
    return out_i, out_s


def rerank_float64(queries: np.ndarray, features: np.ndarray, index: np.ndarray,
                   k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rescore each row's candidates in float64, sort (descending, ties to the lower index), keep k.

    Identical vectors get bit-identical scores here (unlike in a blocked float32 matrix multiply,
    whose rounding depends on where a pair falls in a tile), so exact duplicates are ordered by
    index and the reported scores are the float64 cosines rounded once to float32.
    """
    n, kk = index.shape
    chunk_rows = max(1, (32 * 2**20) // (8 * (kk + 1) * features.shape[1]))
    out_i = np.empty((n, k), dtype=np.int32)
    out_s = np.empty((n, k), dtype=np.float32)
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        cand = index[r0:r1]
        rows = queries[r0:r1].astype(np.float64)
        s = np.einsum("bd,bkd->bk", rows, features[cand].astype(np.float64), optimize=False)
        order = np.lexsort((cand, -s), axis=1)[:, :k]
        out_i[r0:r1] = np.take_along_axis(cand, order, 1)
        out_s[r0:r1] = np.take_along_axis(s, order, 1)
    return out_i, out_s


def _top_k_dense(features: np.ndarray, k: int, dev: str, block_size: int | None,
                   exclude_self: bool, progress: bool, memory_budget: int | None):
    import torch

    n = features.shape[0]
    block = block_size or auto_block_size(n, None, memory_budget)
    # columns are processed in chunks so one score block stays within the budget when block is small
    col_chunk = n if block_size is None else max(block, min(n, 8192))
    scorer = _Scorer(features, dev)
    out_idx = np.empty((n, k), dtype=np.int32)
    out_val = np.empty((n, k), dtype=np.float32)
    buf = np.empty((block, col_chunk), dtype=np.float32) if dev == "cpu" else None
    with torch.inference_mode(), _progress(n, progress, "neighbours") as bar:
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            self_rows = torch.arange(r0, r1, device=dev) if exclude_self else None
            vals = idx = None
            for c0 in range(0, n, col_chunk):
                c1 = min(n, c0 + col_chunk)
                s = scorer.scores(r0, r1, c0, c1, out=buf)
                v, i = select_top_k(s, k, c0, self_rows)
                vals, idx = (v, i) if vals is None else merge_top_k(vals, idx, v, i, k)
            out_idx[r0:r1] = idx.cpu().numpy()
            out_val[r0:r1] = vals.cpu().numpy()
            bar.update(r1 - r0)
    return out_idx, out_val


def _tile_shape(n: int, dev: str, block_size: int | None, memory_budget: int | None) -> tuple[int, int]:
    """Rows and columns of one score tile: budgeted at 12 bytes per score (float32 + mask + scratch)."""
    if block_size is not None:
        rows = min(n, block_size)
        return rows, min(n, max(rows, 2 * rows))
    if memory_budget is None:
        memory_budget = min(DEFAULT_MEMORY_BUDGET if dev == "cpu" else 4 * DEFAULT_MEMORY_BUDGET,
                            available_memory() // 4)
    # CPU: 4096 x 8192 tiles measured 13% faster than 2048 x 4096 at N = 50,000 (fewer merges
    # per flop; docs/performance.md); GPU: large tiles to fill the device
    cap = 4096 if dev == "cpu" else 8192
    rows = int(max(1, min(n, cap, math.isqrt(max(1, memory_budget // 24)))))  # rows x 2 rows tile
    return rows, min(n, 2 * rows)


def _merge_candidates(vals, idx, rows, cols, v, k: int) -> None:
    """Fold candidate scores ``v`` of pairs (``rows``, ``cols``) (global ids) into the running top-k."""
    import torch

    dev = vals.device
    urows, inv, counts = torch.unique(rows, return_inverse=True, return_counts=True)
    u = urows.numel()
    seg = torch.cat([torch.arange(u, device=dev).repeat_interleave(k), inv])
    vv = torch.cat([vals[urows].reshape(-1), v])
    ii = torch.cat([idx[urows].reshape(-1), cols])
    # order by (segment, -score, index): sort by index, then stably by one int64 key holding the
    # segment (high bits) and the score mapped to an order-reversing integer (low 32 bits)
    order = torch.argsort(ii, stable=True)
    bits = (vv[order] + 0.0).view(torch.int32).to(torch.int64)   # + 0.0 turns -0.0 into 0.0
    mono = torch.where(bits >= 0, bits, (-2**31 - 1) - bits)   # float order -> int order
    key = (seg[order] << 32) + ((2**31 - 1) - mono)
    order = order[torch.argsort(key, stable=True)]
    starts = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64, device=dev),
                                     (counts + k)[:-1]]), 0)
    rank = torch.arange(order.numel(), device=dev) - starts[seg[order]]
    keep = order[rank < k]
    vals[urows] = vv[keep].reshape(u, k)
    idx[urows] = ii[keep].reshape(u, k)


def _fold_tile(vals, idx, s, r0: int, c0: int, first_col: int, k: int) -> None:
    """Fold a score tile ``s`` (rows ``r0..``, columns ``c0..``) into the running top-k.

    Every score is offered to its row; scores of columns ``>= first_col`` are also offered to
    that column's row (the transposed pair, same score). A score is merged only when it reaches
    the current k-th score of the row it is offered to: one vectorised comparison per direction,
    then a sort of the few survivors. Rows still holding fewer than k finite candidates (their
    first tile) take a dense top-k of the tile instead.
    """
    import torch

    b, c = s.shape
    off = first_col - c0
    nc = c - off if off < c else 0
    rows_sl, cols_sl = slice(r0, r0 + b), slice(first_col, first_col + nc)
    row_sparse = not bool(torch.isneginf(vals[rows_sl, k - 1]).any())
    if not row_sparse:
        v, i = select_top_k(s, k, c0)
        vals[rows_sl], idx[rows_sl] = merge_top_k(vals[rows_sl], idx[rows_sl], v, i, k)
    col_sparse = nc > 0 and not bool(torch.isneginf(vals[cols_sl, k - 1]).any())
    if nc > 0 and not col_sparse:
        v, i = select_top_k(s[:, off:].T.contiguous(), k, r0)
        vals[cols_sl], idx[cols_sl] = merge_top_k(vals[cols_sl], idx[cols_sl], v, i, k)
    if not (row_sparse or col_sparse):
        return
    theta_r = vals[rows_sl, k - 1]
    theta_c = vals[cols_sl, k - 1]
    if row_sparse:
        mask = s >= theta_r[:, None]
        if col_sparse:
            mask[:, off:] |= s[:, off:] >= theta_c[None, :]
        r, cc = torch.nonzero(mask, as_tuple=True)
    else:
        r, cc = torch.nonzero(s[:, off:] >= theta_c[None, :], as_tuple=True)
        cc = cc + off
    if r.numel() == 0:
        return
    v = s[r, cc]
    to_row = v >= theta_r[r] if row_sparse else torch.zeros_like(v, dtype=torch.bool)
    if col_sparse:
        rel = cc - off
        to_col = (rel >= 0) & (v >= theta_c[rel.clamp(min=0)])
    else:
        to_col = torch.zeros_like(v, dtype=torch.bool)
    gr, gc = r + r0, cc + c0
    rows = torch.cat([gr[to_row], gc[to_col]])
    if rows.numel():
        _merge_candidates(vals, idx, rows, torch.cat([gc[to_row], gr[to_col]]),
                          torch.cat([v[to_row], v[to_col]]), k)


def _top_k_symmetric(features: np.ndarray, k: int, dev: str, block_size: int | None,
                     exclude_self: bool, progress: bool, memory_budget: int | None):
    """Upper-triangle tiles, each used for its rows and (transposed) for its columns."""
    import torch

    n = features.shape[0]
    rows_t, cols_t = _tile_shape(n, dev, block_size, memory_budget)
    scorer = _Scorer(features, dev)
    vals = torch.full((n, k), -math.inf, dtype=torch.float32, device=dev)
    idx = torch.full((n, k), n, dtype=torch.int64, device=dev)   # sentinel sorts after real rows
    buf = np.empty((rows_t, cols_t), dtype=np.float32) if dev == "cpu" else None
    total_pairs = n * (n + 1) // 2
    with torch.inference_mode(), _progress(total_pairs, progress, "neighbours", unit="pair") as bar:
        for r0 in range(0, n, rows_t):
            r1 = min(n, r0 + rows_t)
            for c0 in range(r0, n, cols_t):
                c1 = min(n, c0 + cols_t)
                s = scorer.scores(r0, r1, c0, c1, out=buf)
                if exclude_self and c0 < r1:
                    diag = torch.arange(c0, min(r1, c1), device=s.device)
                    s[diag - r0, diag - c0] = -math.inf
                _fold_tile(vals, idx, s, r0, c0, max(r1, c0), k)
                bar.update((r1 - r0) * (c1 - c0) - (((min(r1, c1) - c0) * (min(r1, c1) - c0 - 1)) // 2
                                                    if c0 < r1 else 0))
    return idx.cpu().numpy().astype(np.int32), vals.cpu().numpy()


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
    scorer = _Scorer(features, dev)
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
                s = qt[r0:r1] @ scorer.features[c0:c1].T
                v, i = select_top_k(s, k, c0)
                vals, idx = (v, i) if vals is None else merge_top_k(vals, idx, v, i, k)
            out_idx[r0:r1] = idx.cpu().numpy()
            out_val[r0:r1] = vals.cpu().numpy()
    return settle_near_ties(q, features, out_idx, out_val, k_out)


__all__ = ["validate_k", "check_block_size", "top_k_neighbors", "search", "select_top_k", "merge_top_k",
           "score_blocks", "auto_block_size", "METHODS"]


def top_k_other_groups(features: np.ndarray, groups: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` neighbours of every row among the rows of *other* groups (a face's nearest
    faces in other paintings): the kernel's top ``k + g - 1`` (g: the largest group), then the
    rows of the same group dropped. Raises ``BadValue`` when some row has fewer than ``k`` rows
    outside its group."""
    from .errors import BadValue

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
