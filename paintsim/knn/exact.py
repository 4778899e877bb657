"""The exact final selection: from each row's candidate list, the window the bound allows, rows
redone where the list was too short, and the canonical float64 rescoring (the package docstring)."""
from __future__ import annotations

import logging
import math
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .scorers import _TINY, _U32, _U64, _gamma
from .selection import _POOL_THREADS

log = logging.getLogger("paintsim.knn")

#: float32 scores closer than this are re-ranked in float64 (float32 rounding of a 2048-d unit
#: dot product is ~1e-7; exact duplicates differ only by that rounding)
NEAR_TIE = 1e-5


def _exact_top_k(features: np.ndarray, idx: np.ndarray, vals: np.ndarray, k: int, a: float,
                 b: float, exclude_self: bool, norm_max: float,
                 stats: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """From each row's candidate list (pass scores ``vals`` with |v~ - v| <= a + b|v~|), the exact
    top-k: keep the window g(v~) >= f(t~) (module docstring), redo rows whose list was too short
    for it, rescore canonically."""
    n, cap = idx.shape
    n_avail = n - 1 if exclude_self else n
    v = vals.astype(np.float64)
    theta = v[:, k - 1]
    low = theta - a - b * np.abs(theta) - _TINY             # f(t~)
    keep = v + a + b * np.abs(v) >= low[:, None]             # g(v~) >= f(t~)
    keep &= np.isfinite(v)
    over = keep[:, -1] if cap < n_avail else np.zeros(n, dtype=bool)
    # a placeholder (index n: the pass's starting threshold, see _seed_thresholds) inside the
    # window means pairs below that threshold were never offered: the row is redone
    over |= (keep & (idx >= n)).any(1)
    ok = np.flatnonzero(~over)
    counts = keep[ok].sum(1)
    rows = [ok]
    cols = [idx[ok][keep[ok]].astype(np.int64)]
    cnts = [counts]
    bad = np.flatnonzero(over)
    if len(bad):
        log.debug("%d rows redone in float32 (candidate list shorter than the error window)", len(bad))
        br, bc, bn = _window_float32(features, bad, k, exclude_self, norm_max)
        rows.append(br)
        cols.append(bc)
        cnts.append(bn)
    rows, cols, cnts = np.concatenate(rows), np.concatenate(cols), np.concatenate(cnts)
    s64, kept = _float64_dots(features, rows, cnts, cols, k, norm_max)
    seg = np.repeat(np.arange(len(rows)), cnts)
    log.debug("exact selection: %d candidates for %d rows (%d redone), %d scored in float64",
              len(cols), n, len(bad), int(kept.sum()))
    if stats is not None:
        stats.update(rows_redone=int(len(bad)), window_per_row=round(len(cols) / max(1, n), 2),
                     rescored_per_row=round(int(kept.sum()) / max(1, n), 2))
    cols, s64 = cols[kept], s64[kept]
    cnts = np.bincount(seg[kept], minlength=len(rows))
    out_i = np.empty((n, k), dtype=np.int32)
    out_s = np.empty((n, k), dtype=np.float32)
    ci, cs = _canonical_top_k(features, rows, cnts, cols, k, norm_max, s64)
    out_i[rows], out_s[rows] = ci, cs
    return out_i, out_s


def _window_float32(features: np.ndarray, rows: np.ndarray, k: int, exclude_self: bool,
                    norm_max: float):
    """Rows redone against all rows in float32: every candidate within 2 a of the k-th score."""
    n, d = features.shape
    a = _gamma(d, _U32) * norm_max ** 2 + _TINY
    chunk = max(1, min(len(rows), (64 * 2**20) // (4 * n)))
    out_r, out_c, out_n = [], [], []
    for r0 in range(0, len(rows), chunk):
        rr = rows[r0:r0 + chunk]
        s = features[rr] @ features.T
        if exclude_self:
            s[np.arange(len(rr)), rr] = -np.inf
        kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]
        m = s >= (kth.astype(np.float64) - 2 * a)[:, None]
        out_r.append(rr)
        out_n.append(m.sum(1))
        out_c.append(np.nonzero(m)[1].astype(np.int64))
    return np.concatenate(out_r), np.concatenate(out_c), np.concatenate(out_n)


def _float64_dots(features: np.ndarray, rows: np.ndarray, counts: np.ndarray, cols: np.ndarray,
                  narrow_k: int = 0, norm_max: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """float64 dot products of each row with its candidates (CSR: ``counts`` per row), computed
    from the gathered float32 rows (products of float32 numbers are exact in float64), in rows
    of similar length padded to a rectangle, on two threads. Returns ``(s, kept)``.

    With ``narrow_k``, each row's candidates are first scored in float32 from the same gathered
    rows: |s32 - s| <= e = gamma_D max|x|^2, so with t32 the row's ``narrow_k``-th s32 every true
    top-k member has s32 >= t32 - 2e (the pass's window argument); only those get a float64
    score (``kept``), the others are dropped without a second gather.
    """
    d = features.shape[1]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    out = np.full(len(cols), -np.inf, dtype=np.float64)
    kept = np.zeros(len(cols), dtype=bool)
    e = _gamma(d, _U32) * norm_max * norm_max + _TINY
    order = np.argsort(counts, kind="stable")
    pairs_per_chunk = max(1, (8 * 2**20) // (4 * d))   # 8 MiB gathered: fastest of 1-16 measured
    jobs, i = [], 0
    while i < len(order):
        w = max(1, int(counts[order[i]]))
        j = min(len(order), i + max(1, pairs_per_chunk // w))
        jobs.append(order[i:j])
        i = j

    def run(chunk_rows):
        w = int(counts[chunk_rows].max()) if len(chunk_rows) else 0
        if w == 0:
            return
        st, cn = starts[chunk_rows], counts[chunk_rows]
        pos = st[:, None] + np.minimum(np.arange(w)[None, :], np.maximum(cn, 1)[:, None] - 1)
        g = np.take(features, cols[pos].reshape(-1), axis=0).reshape(len(chunk_rows), w, d)
        q = np.take(features, rows[chunk_rows], axis=0)
        valid = np.arange(w)[None, :] < cn[:, None]
        if narrow_k and w > narrow_k:
            s32 = np.where(valid, np.einsum("bwd,bd->bw", g, q), -np.inf)
            kth = -np.partition(-s32, narrow_k - 1, axis=1)[:, narrow_k - 1:narrow_k]
            keep = valid & (s32.astype(np.float64) >= kth.astype(np.float64) - 2 * e)
        else:
            keep = valid
        kr, kc = np.nonzero(keep)
        # products of float32 numbers are exact in float64; the sum is float64
        s64 = np.einsum("nd,nd->n", g[kr, kc], q[kr], dtype=np.float64)
        at = pos[kr, kc]
        out[at] = s64
        kept[at] = True

    with ThreadPoolExecutor(_POOL_THREADS) as pool:
        list(pool.map(run, jobs))
    return out, kept


def _torch_view(features: np.ndarray):
    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(features)


def _canonical_top_k(features: np.ndarray, rows: np.ndarray, counts: np.ndarray, cols: np.ndarray,
                     k: int, nmax: float, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row's candidates by the canonical score: the float64 dot product of the
    float32 rows (exactly rounded where it matters), descending, ties to the lower index.

    The float64 value s (``s``, :func:`_float64_dots`) of a dot product is within E = gamma_D(u64)|x||y| (+ its own
    rounding) of fl64(exact). Where no float32 rounding boundary lies within E of s, float32(s) is
    float32(fl64(exact)); where no other candidate of the row lies within 2E, s orders as the exact
    value does. The few pairs failing either test are recomputed exactly (``math.fsum``), so the
    result depends on neither the BLAS nor the position of the pair.
    """
    d = features.shape[1]
    s = s.copy()
    seg = np.repeat(np.arange(len(rows)), counts)
    err = (_gamma(d, _U64) + 4 * _U64) * nmax * nmax + 1e-300
    # near a float32 rounding boundary?
    f = s.astype(np.float32)
    down = np.nextafter(f, np.float32(-np.inf)).astype(np.float64)
    up = np.nextafter(f, np.float32(np.inf)).astype(np.float64)
    f64 = f.astype(np.float64)
    exact = (s - err <= (f64 + down) / 2) | (s + err >= (f64 + up) / 2)
    # near another candidate of the same row?
    order = np.lexsort((-s, seg))
    ss, sg = s[order], seg[order]
    close = (sg[1:] == sg[:-1]) & (ss[:-1] - ss[1:] <= 2 * err)
    near = np.zeros(len(s), dtype=bool)
    near[:-1] |= close
    near[1:] |= close
    exact[order[near]] = True
    for p in np.flatnonzero(exact):
        x = features[rows[seg[p]]].astype(np.float64)
        y = features[cols[p]].astype(np.float64)
        s[p] = math.fsum((x * y).tolist())
    order = np.lexsort((cols, -s, seg))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    take = order[(starts[:, None] + np.arange(k)[None, :]).reshape(-1)]
    return (cols[take].reshape(len(rows), k).astype(np.int32),
            s[take].reshape(len(rows), k).astype(np.float32))


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
