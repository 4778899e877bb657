"""The torch passes over score tiles: dense row blocks (the reference) and the symmetric
upper-triangle pass used on CUDA, with the tile shape and order they share with the CPU pass."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..devices import DEFAULT_MEMORY_BUDGET, auto_block_size, available_memory
from .selection import _progress, merge_top_k, select_top_k


def _top_k_dense(scorer, k: int, block_size: int | None, exclude_self: bool, progress: bool,
                 memory_budget: int | None):
    import torch

    n, dev = scorer.n, scorer.device
    block = block_size or auto_block_size(n, None, memory_budget)
    # columns are processed in chunks so one score block stays within the budget when block is small
    col_chunk = n if block_size is None else max(block, min(n, 8192))
    out_idx = np.empty((n, k), dtype=np.int32)
    out_val = np.empty((n, k), dtype=np.float32)
    buf = scorer.new_buffer(block, col_chunk)
    with torch.inference_mode(), _progress(n, progress, "neighbours") as bar:
        for r0 in range(0, n, block):
            r1 = min(n, r0 + block)
            self_rows = torch.arange(r0, r1, device=dev) if exclude_self else None
            vals = idx = None
            for c0 in range(0, n, col_chunk):
                c1 = min(n, c0 + col_chunk)
                s = _as_tensor(scorer.scores(r0, r1, c0, c1, out=buf))
                v, i = select_top_k(s, k, c0, self_rows)
                v = v.float()
                vals, idx = (v, i) if vals is None else merge_top_k(vals, idx, v, i, k)
            out_idx[r0:r1] = idx.cpu().numpy()
            out_val[r0:r1] = vals.cpu().numpy()
            bar.update(r1 - r0)
    return out_idx, out_val


def _as_tensor(s):
    import torch

    return torch.from_numpy(s) if isinstance(s, np.ndarray) else s


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
        vals[rows_sl], idx[rows_sl] = merge_top_k(vals[rows_sl], idx[rows_sl], v.float(), i, k)
    col_sparse = nc > 0 and not bool(torch.isneginf(vals[cols_sl, k - 1]).any())
    if nc > 0 and not col_sparse:
        v, i = select_top_k(s[:, off:].T.contiguous(), k, r0)
        vals[cols_sl], idx[cols_sl] = merge_top_k(vals[cols_sl], idx[cols_sl], v.float(), i, k)
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
    _offer(vals, idx, s, r, cc, theta_r, theta_c, row_sparse, col_sparse, off, r0, c0, k)


def _offer(vals, idx, s, r, cc, theta_r, theta_c, row_sparse: bool, col_sparse: bool, off: int,
           r0: int, c0: int, k: int) -> None:
    """Offer the tile's surviving scores at (r, cc) to their rows and (transposed) columns."""
    import torch

    if r.numel() == 0:
        return
    v = s[r, cc].float()
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


def _upper_tiles(n: int, rows_t: int, cols_t: int) -> Iterator[tuple[int, int, int, int, int]]:
    """The symmetric passes' tiles on and above the diagonal, in order: ``(r0, r1, c0, c1, pairs)``,
    ``pairs`` the distinct pairs the tile covers (for the progress bar)."""
    for r0 in range(0, n, rows_t):
        r1 = min(n, r0 + rows_t)
        for c0 in range(r0, n, cols_t):
            c1 = min(n, c0 + cols_t)
            inner = min(r1, c1) - c0
            yield r0, r1, c0, c1, (r1 - r0) * (c1 - c0) - (inner * (inner - 1) // 2 if c0 < r1 else 0)


def _top_k_symmetric(scorer, k: int, block_size: int | None, exclude_self: bool, progress: bool,
                     memory_budget: int | None):
    """Upper-triangle tiles, each used for its rows and (transposed) for its columns."""
    import torch

    n, dev = scorer.n, scorer.device
    rows_t, cols_t = _tile_shape(n, dev, block_size, memory_budget)
    vals = torch.full((n, k), -math.inf, dtype=torch.float32, device=dev)
    idx = torch.full((n, k), n, dtype=torch.int64, device=dev)   # sentinel sorts after real rows
    buf = scorer.new_buffer(rows_t, cols_t)
    total_pairs = n * (n + 1) // 2
    with torch.inference_mode(), _progress(total_pairs, progress, "neighbours", unit="pair") as bar:
        for r0, r1, c0, c1, pairs in _upper_tiles(n, rows_t, cols_t):
            s = scorer.scores(r0, r1, c0, c1, out=buf)
            if exclude_self and c0 < r1:
                diag = torch.arange(c0, min(r1, c1), device=s.device)
                s[diag - r0, diag - c0] = -math.inf
            _fold_tile(vals, idx, s, r0, c0, max(r1, c0), k)
            bar.update(pairs)
    return idx.cpu().numpy().astype(np.int32), vals.cpu().numpy()
