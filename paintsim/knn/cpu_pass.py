"""The CPU candidate pass: upper-triangle tiles from numpy (float32) or torch (bf16), seeded
per-row thresholds and unordered candidate sets (the package docstring)."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .selection import _POOL_THREADS, _progress
from .tiles import _tile_shape, _upper_tiles


#: columns sampled per row to seed its threshold (at most; see _seed_thresholds): measured best at
#: N = 20,000 (float32) and N = 50,000 (bf16, where the sample's product is cheap)
SEED_COLUMNS = {"fp32": 1024, "bf16": 2048}


def _seed_thresholds(scorer, k: int, exclude_self: bool, block: int) -> np.ndarray:
    """A starting threshold per row: its q-th pass score against a sample of S columns.

    From the first tile on, a row then only takes scores that can still be among its k best, and
    no row needs a dense first tile. Each row's list starts with k placeholders (index N) at this
    value; should the seed be above the row's real k-th (sampling, rounding), a placeholder stays
    inside the error window and :func:`_exact_top_k` redoes the row, so the seed decides only the
    speed, never the result.
    """
    n = scorer.n
    s_cols = int(min(n, max(4 * k, min(SEED_COLUMNS.get(scorer.precision, 2048), n // 8))))
    rng = np.random.default_rng(2024)
    cols = np.sort(rng.choice(n, size=s_cols, replace=False))
    # the q-th of the sample: above it lie about q N / S scores of the row; q = k is the safe bound
    # (the k-th of a subset), a smaller q with q N / S >= 4k (and q >= 10) a far tighter start
    # that is still below the row's k-th but for a handful of rows (those are redone, see above)
    avail = s_cols - (1 if exclude_self else 0)
    q = min(k, avail, max(10, int(math.ceil(4 * k * s_cols / max(1, n)))))
    out = np.full(n, -np.inf, dtype=np.float32)
    if q < 1:
        return out
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        sc = scorer.sample_scores(r0, r1, cols)
        hit_r = hit_c = None
        if exclude_self:
            rows = np.arange(r0, r1)
            pos = np.searchsorted(cols, rows)
            hit = (pos < s_cols) & (cols[np.minimum(pos, s_cols - 1)] == rows)
            hit_r, hit_c = np.flatnonzero(hit), pos[hit]
        if isinstance(sc, np.ndarray):
            if hit_r is not None:
                sc[hit_r, hit_c] = -np.inf
            out[r0:r1] = -np.partition(-sc, q - 1, axis=1)[:, q - 1]
        else:   # a torch tensor (bf16 pass)
            import torch

            with torch.inference_mode():
                if hit_r is not None and len(hit_r):
                    sc[torch.from_numpy(hit_r), torch.from_numpy(hit_c)] = -math.inf
                out[r0:r1] = torch.topk(sc, q, dim=1, sorted=True).values[:, q - 1].float().cpu().numpy()
    return out


def _bf16_keys(bits: np.ndarray, scratch: np.ndarray | None = None) -> np.ndarray:
    """bf16 bit patterns (int16) mapped to int16 keys that order as the values do (and back:
    the map is its own inverse). With ``scratch`` (int16, same size) it works in place."""
    if scratch is None:
        return bits ^ ((bits >> 15) & np.int16(0x7FFF))
    tmp = scratch.reshape(-1)[: bits.size].reshape(bits.shape)
    np.right_shift(bits, 15, out=tmp)
    np.bitwise_and(tmp, np.int16(0x7FFF), out=tmp)
    np.bitwise_xor(bits, tmp, out=bits)
    return bits


def _bf16_threshold_keys(theta: np.ndarray) -> np.ndarray:
    """Key (see :func:`_bf16_keys`) of the smallest bf16 number >= each float32 threshold."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))
    tb = t.to(torch.bfloat16)
    keys = _bf16_keys(tb.view(torch.int16).numpy()).astype(np.int32)
    keys += (tb.float() < t).numpy()
    keys[theta == 0] = -1            # -0.0 reaches a zero threshold too (its key is -1)
    return np.minimum(keys, 32767).astype(np.int16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    """float32 values of bf16 bit patterns (int16)."""
    return (bits.astype(np.int32) << 16).view(np.float32)


def _fold_tile_cpu(vals: np.ndarray, idx: np.ndarray, theta: np.ndarray, s, r0: int, c0: int,
                   first_col: int, k: int, scratch: np.ndarray | None = None,
                   pool: ThreadPoolExecutor | None = None) -> None:
    """Offer a CPU score tile to its rows and, for columns ``>= first_col``, to those columns'
    rows (the transposed pair): the scores reaching the row's threshold (the minimum of its k
    kept scores) are merged. One vectorised comparison per direction, in row bands on the
    ``pool``'s threads (numpy releases the GIL); bf16 tiles are compared as order-preserving
    int16 keys."""
    b, c = s.shape
    off = first_col - c0
    nc = max(0, c - off)
    bf16 = not isinstance(s, np.ndarray)    # the bf16 pass's torch tile; float32 tiles are numpy
    if bf16:
        import torch

        raw = s.view(torch.int16).numpy()
        th_all = theta[r0:r0 + b] if nc == 0 else np.concatenate([theta[r0:r0 + b],
                                                                   theta[first_col:first_col + nc]])
        tk = _bf16_threshold_keys(th_all)
        # positive thresholds: the raw patterns order correctly for the values that can pass
        keyed = not bool((th_all > 0).all())
        tr, tc = tk[:b], tk[b:]
        flat_scratch = None if scratch is None else scratch.reshape(-1)
    else:
        raw, keyed = s, False
        tr, tc = theta[r0:r0 + b], theta[first_col:first_col + nc]

    def scan(a0: int, a1: int):
        key = raw[a0:a1]
        if keyed:   # in place: the tile is scratch
            tmp = None if flat_scratch is None else flat_scratch[a0 * c: a1 * c]
            key = _bf16_keys(key, tmp)

        def values(rr, cc):
            got = key[rr, cc]
            if not bf16:
                return got
            return _bf16_values(_bf16_keys(got) if keyed else got)
        flat = np.flatnonzero(key >= tr[a0:a1, None])
        rr, cc = np.divmod(flat, c)
        out = [rr + a0, cc, values(rr, cc)]
        if nc:
            flat = np.flatnonzero(key[:, off:] >= tc[None, :])
            ri, cj = np.divmod(flat, nc)
            out += [ri + a0, cj, values(ri, cj + off)]
        return out

    bands = 1 if pool is None or b < 256 else _POOL_THREADS
    edges = [b * i // bands for i in range(bands + 1)]
    parts = (list(pool.map(lambda i: scan(edges[i], edges[i + 1]), range(bands))) if bands > 1
             else [scan(0, b)])
    rr, cc, vr = (np.concatenate([p[j] for p in parts]) for j in range(3))
    if len(rr):
        _merge_sorted(vals, idx, theta, rr + r0, cc + c0, vr, k)
    if nc:
        ri, cj, vc = (np.concatenate([p[j] for p in parts]) for j in range(3, 6))
        if len(ri):
            # group by column: a radix sort of the (small) column numbers
            order = np.argsort(cj.astype(np.int16 if nc < 2**15 else np.int32), kind="stable")
            _merge_sorted(vals, idx, theta, cj[order] + first_col, ri[order] + r0, vc[order], k)


def _merge_sorted(vals: np.ndarray, idx: np.ndarray, theta: np.ndarray, rows: np.ndarray,
                  cols: np.ndarray, v: np.ndarray, k: int) -> None:
    """Merge candidates (``rows`` ascending) into each row's set of its ``k`` best pass scores
    (unordered: the pass needs the set and its minimum, not an order or a tie rule)."""
    starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
    counts = np.diff(np.append(starts, len(rows)))
    urows = rows[starts]
    width = 1 << np.ceil(np.log2(counts)).astype(np.int64)    # rows grouped by padded width
    for w in np.unique(width):
        sel = np.flatnonzero(width == w)
        rr = urows[sel]
        lane = np.arange(w)[None, :]
        valid = lane < counts[sel][:, None]
        pos = np.where(valid, starts[sel][:, None] + lane, 0)
        mv = np.concatenate([vals[rr], np.where(valid, v[pos], -np.inf).astype(np.float32)], 1)
        mi = np.concatenate([idx[rr], cols[pos]], 1)
        top = np.argpartition(mv, int(w), axis=1)[:, int(w):]
        nv = np.take_along_axis(mv, top, 1)
        vals[rr] = nv
        idx[rr] = np.take_along_axis(mi, top, 1)
        theta[rr] = nv.min(1)


def _no_grad(scorer):
    """torch's inference mode for the bf16 pass; nothing (and no torch import) for float32."""
    if scorer.precision == "fp32":
        import contextlib

        return contextlib.nullcontext()
    import torch

    return torch.inference_mode()


def _top_k_symmetric_cpu(scorer, k: int, block_size: int | None, exclude_self: bool,
                         progress: bool, memory_budget: int | None):
    """Upper-triangle tiles on the CPU, each offered to its rows and (transposed) to its columns;
    every row starts from a seeded threshold (:func:`_seed_thresholds`)."""
    n = scorer.n
    rows_t, cols_t = _tile_shape(n, "cpu", block_size, memory_budget)
    theta = _seed_thresholds(scorer, k, exclude_self, rows_t)
    vals = np.repeat(theta[:, None], k, axis=1)
    idx = np.full((n, k), n, dtype=np.int64)        # placeholders: index n
    buf = scorer.new_buffer(rows_t, cols_t)
    scratch = np.empty(rows_t * cols_t, dtype=np.int16) if scorer.precision == "bf16" else None
    total_pairs = n * (n + 1) // 2
    with _no_grad(scorer), ThreadPoolExecutor(_POOL_THREADS) as pool, \
            _progress(total_pairs, progress, "neighbours", unit="pair") as bar:
        for r0, r1, c0, c1, pairs in _upper_tiles(n, rows_t, cols_t):
            s = scorer.scores(r0, r1, c0, c1, out=buf)
            if exclude_self and c0 < r1:
                diag = np.arange(c0, min(r1, c1))
                s[diag - r0, diag - c0] = -math.inf
            _fold_tile_cpu(vals, idx, theta, s, r0, c0, max(r1, c0), k, scratch, pool)
            bar.update(pairs)
    order = np.lexsort((idx, -vals), axis=1)
    return (np.take_along_axis(idx, order, 1).astype(np.int64),
            np.take_along_axis(vals, order, 1))
