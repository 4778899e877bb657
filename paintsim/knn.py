"""The one blockwise all-pairs kernel: unit-row arrays in, exact top-k cosine neighbours out.

Every similarity route of paintsim goes through this module:

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
"""
from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from .devices import DEFAULT_MEMORY_BUDGET, auto_block_size, available_memory, resolve_device
from .errors import BadValue

log = logging.getLogger(__name__)

METHODS = ("auto", "symmetric", "dense")
PRECISIONS = ("auto", "fp32", "bf16")
_U32 = 2.0 ** -24   # unit roundoff of float32
_U64 = 2.0 ** -53   # unit roundoff of float64
#: absolute slack for denormals flushed to zero and float64 rounding of the bounds themselves
_TINY = 1e-12
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

    if vals.device.type == "cpu" and vals.dtype == torch.float32 and vals.numel():
        # numpy's lexsort: torch's CPU argsort is ~20x slower on these shapes
        v, i = vals.numpy(), idx.numpy()
        order = np.lexsort((i, -v), axis=1)
        return (torch.from_numpy(np.take_along_axis(v, order, 1)),
                torch.from_numpy(np.take_along_axis(i, order, 1)))
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
def _gamma(n: int, u: float) -> float:
    """Higham's gamma_n: bound on the relative error of a sum of n terms in unit roundoff u."""
    return n * u / (1 - n * u)


def _row_norm_max(features: np.ndarray, chunk: int = 8192) -> float:
    """The largest row norm (float64 sums of squares, chunked: no float64 copy of the features)."""
    best = 0.0
    for r0 in range(0, len(features), chunk):
        sq = np.einsum("ij,ij->i", features[r0:r0 + chunk], features[r0:r0 + chunk], dtype=np.float64)
        best = max(best, float(np.sqrt(sq.max())) if len(sq) else 0.0)
    return best * (1 + 1e-9)


class _Scorer:
    """Float32 scores of row blocks against column blocks, on the CPU (BLAS) or on CUDA (torch).

    Error bound: a float32 dot product of length D differs from the exact one by at most
    gamma_D * sum |x_d y_d| <= gamma_D * |x| |y| (any summation order, FMA or not), so
    |s~ - s| <= a with a = gamma_D * max|x|^2, b = 0 (TF32 is off on CUDA).
    """

    precision = "fp32"
    offset = 0.0

    def __init__(self, features: np.ndarray, device: str, norm_max: float | None = None):
        self.device = device
        self.n, self.d = features.shape
        self.features_np = features
        if device == "cpu":
            # numpy only: a CPU float32 run never imports torch (2-3 s of start-up)
            self.features = None
        else:
            import torch

            torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products
            self.features = torch.from_numpy(features).to(device)
        m = _row_norm_max(features) if norm_max is None else norm_max
        self.norm_max = m
        self.a = _gamma(self.d, _U32) * m * m + _TINY
        self.b = 0.0

    def new_buffer(self, rows: int, cols: int):
        return np.empty((rows, cols), dtype=np.float32) if self.device == "cpu" else None

    def scores(self, r0: int, r1: int, c0: int, c1: int, out=None):
        """Float32 ``features[r0:r1] @ features[c0:c1].T``: a numpy array on the CPU, a torch
        tensor on CUDA."""
        if self.device == "cpu":
            # numpy's BLAS sgemm is faster than torch's on the CPU (docs/performance.md)
            # a contiguous view of the flat scratch buffer: BLAS writes it in place
            buf = None if out is None else out.reshape(-1)[: (r1 - r0) * (c1 - c0)].reshape(r1 - r0, c1 - c0)
            return np.matmul(self.features_np[r0:r1], self.features_np[c0:c1].T, out=buf)
        return self.features[r0:r1] @ self.features[c0:c1].T

    def sample_scores(self, r0: int, r1: int, cols: np.ndarray):
        """Scores of rows ``r0:r1`` against the columns ``cols`` (any order)."""
        if self.device == "cpu":
            return self.features_np[r0:r1] @ self.features_np[cols].T
        import torch

        return self.features[r0:r1] @ self.features[torch.from_numpy(cols).to(self.device)].T


def _cuda_fp32_out_mm(a, b):
    """bf16 x bf16 -> float32 product on CUDA (``torch.mm(..., out_dtype=)``), or None if absent."""
    import torch

    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):
        return None


class _Bf16Scorer:
    """bf16 scores (float32 accumulation) of row blocks against column blocks, minus an offset c.

    Real embeddings share a mean direction (cosines 0.5-0.9), so the rows are centred first:
    x = m + r with m the mean row, and x.y = r.r' + beta + beta' with beta = x.m - m.m / 2 (float64,
    per row). The residuals are rounded to bf16 once, h = bf16(r), l = r - h, so
    |r.r' - h.h'| <= |l||r'| + |h||l'| <= L (R + H) (L, R: the largest |l|, |r|, measured in
    float32 and widened by their rounding bound, and H <= R + L). Centring shrinks |r| and with it
    the window (|r|^2 ~ 0.4 on such data: a = 0.0018 where the generic (2u + u^2)|x||y| with
    u = 2^-8 would be 0.0078). beta - c and beta' enter the same product
    as three bf16 columns each (hi, mid, lo: 24 bits, their remainder E is measured), so the
    product is v = x.y - c, shifted by c near the typical k-th score. Products of bf16 numbers are
    exact in float32, so the float32 accumulation adds gamma_K (H^2 + |beta - c| + |beta'|). On the
    CPU torch returns the product rounded to bf16 (relative error < 2^-7 even if truncated), which
    the shift keeps small near the threshold. So |v~ - v| <= a + b|v~| with
    a = L (R + H) + E + gamma_K (H^2 + B) and b = 2^-7 / (1 - 2^-7) (CPU), 2^-23 (CUDA float32 out).
    """

    precision = "bf16"
    _EXTRA = 6   # three bf16 parts of beta_i - c (row side), three of beta_j (column side)

    def __init__(self, features: np.ndarray, device: str, k: int, exclude_self: bool):
        import torch

        self.device = device
        self.n, self.d = features.shape
        self.features_np = features
        if device != "cpu":   # float32 accumulation and reduction, as the bound assumes
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
        d, n, chunk = self.d, self.n, 8192
        kk = ((d + self._EXTRA + 31) // 32) * 32     # padded for the GEMM
        self.k_dim = kk
        mean = np.zeros(d, dtype=np.float64)
        for r0 in range(0, n, chunk):
            mean += features[r0:r0 + chunk].sum(0, dtype=np.float64)
        mean = (mean / max(1, n)).astype(np.float32)   # any m works: the identity below is exact
        m64 = mean.astype(np.float64)
        mm_half = float(m64 @ m64) / 2
        mt = torch.from_numpy(mean)
        fb = torch.zeros((n, kk), dtype=torch.bfloat16, device=device)
        beta = np.empty(n, dtype=np.float64)
        l_max = r_max = h_max = x_max = 0.0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            norm = torch.linalg.vector_norm
            m64t = torch.from_numpy(m64)
            for r0 in range(0, n, chunk):
                x = torch.from_numpy(features[r0:r0 + chunk])
                r = x - mt                        # float32: |r - (x - m)| <= 2^-24 |x - m|
                h = r.to(torch.bfloat16)
                fb[r0:r0 + len(x), :d] = h.to(device)
                r_max = max(r_max, float(norm(r, dim=1).max()))
                x_max = max(x_max, float(norm(x, dim=1).max()))
                l_max = max(l_max, float(norm(r.sub_(h.float()), dim=1).max()))   # r - h, in place
                beta[r0:r0 + len(x)] = (torch.mv(x.double(), m64t) - mm_half).numpy()
        # float32 norms are within gamma_D of the exact ones; the rounding of r adds 2^-24 |r|
        slack = 1 + 2 * _gamma(d, _U32)
        r_max *= slack * (1 + _U32)
        l_max = l_max * slack + _U32 * r_max
        h_max, x_max = r_max + l_max, x_max * slack                              # |h| <= |r| + |l|
        self.fp32_out = device != "cpu" and _cuda_fp32_out_mm(fb[:2], fb[:2].T) is not None
        self.offset = 0.0 if self.fp32_out else _estimate_offset(features, k, exclude_self)
        row_parts, row_rest = _bf16_split3(beta - self.offset)
        col_parts, col_rest = _bf16_split3(beta)
        self.row_extra = row_parts.to(device)   # bf16 [N, 3]
        fb[:, d:d + 3] = 1.0
        fb[:, d + 3:d + 6] = col_parts.to(device)
        self.fb = fb
        # the float64 x.m (D terms) errs by < gamma_D(u64) |x||m|, far below the slack
        slack = 1 + 1e-9
        b_max = float(np.abs(beta - self.offset).max() + np.abs(beta).max()) * slack if n else 0.0
        self.norm_max = x_max * slack
        self.a = (l_max * (r_max + h_max) + (row_rest + col_rest) * slack
                  + _gamma(kk, _U32) * (h_max * h_max + b_max) + _TINY)
        self.b = 2.0 ** -23 if self.fp32_out else 2.0 ** -7 / (1 - 2.0 ** -7)
        self._rows_key, self._rows = None, None

    def new_buffer(self, rows: int, cols: int):
        import torch

        if self.fp32_out:
            return None
        return torch.empty(rows * cols, dtype=torch.bfloat16, device=self.device)

    def scores(self, r0: int, r1: int, c0: int, c1: int, out=None):
        """``features[r0:r1] @ features[c0:c1].T - offset`` through the centred bf16 product
        (bf16 on the CPU, float32 on CUDA)."""
        import torch

        self._row_block(r0, r1)
        cols = self.fb[c0:c1].T
        if self.fp32_out:
            return _cuda_fp32_out_mm(self._rows, cols)
        if out is None:
            return self._rows @ cols
        return torch.mm(self._rows, cols, out=out[: (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0))

    def _row_block(self, r0: int, r1: int):
        if self._rows_key != (r0, r1):
            rows = self.fb[r0:r1].clone()
            rows[:, self.d:self.d + 3] = self.row_extra[r0:r1]
            rows[:, self.d + 3:self.d + 6] = 1.0
            self._rows_key, self._rows = (r0, r1), rows
        return self._rows

    def sample_scores(self, r0: int, r1: int, cols: np.ndarray):
        """Pass scores of rows ``r0:r1`` against the columns ``cols`` (any order)."""
        import torch

        rows = self._row_block(r0, r1)
        c = self.fb[torch.from_numpy(cols).to(self.device)].T
        return _cuda_fp32_out_mm(rows, c) if self.fp32_out else rows @ c


def _bf16_split3(z: np.ndarray) -> tuple[np.ndarray, float]:
    """``z`` (float64) as three bf16 parts whose exact sum is within the returned bound of ``z``."""
    import torch

    parts = np.empty((len(z), 3), dtype=np.float64)
    rest = z.copy()
    out = torch.empty((len(z), 3), dtype=torch.bfloat16)
    for j in range(3):
        p = torch.from_numpy(rest).to(torch.bfloat16)
        out[:, j] = p
        parts[:, j] = p.double().numpy()
        rest = rest - parts[:, j]      # exact: bf16 parts of a float64 leave float64 remainders
    return out, float(np.abs(rest).max()) if len(z) else 0.0


def _estimate_offset(features: np.ndarray, k: int, exclude_self: bool) -> float:
    """A bf16 number near most rows' k-th score (the median over a sample of rows against a
    sample of columns): the bf16 product is shifted by it, so its rounding (relative to the
    shifted value) is finest where the decisions are made; it never changes the result."""
    import torch

    n = len(features)
    rng = np.random.default_rng(12345)
    rows = np.sort(rng.choice(n, size=min(n, 256), replace=False))
    cols = np.sort(rng.choice(n, size=min(n, 8192), replace=False))
    s = features[rows] @ features[cols].T
    if exclude_self:
        s[rows[:, None] == cols[None, :]] = -np.inf
    avail = len(cols) - (1 if exclude_self else 0)
    q = min(avail, max(1, int(round(k * len(cols) / max(1, n)))))
    kth = -np.partition(-s, q - 1, axis=1)[:, q - 1]
    kth = kth[np.isfinite(kth)]
    if not len(kth):
        return 0.0
    return float(torch.tensor(float(np.median(kth))).to(torch.bfloat16).float())


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
    from .precision import choose

    return choose("matmul", device)


#: "auto" falls back to the float32 pass when the bf16 list would need more candidates per row: a
#: guard against data whose error window holds most of a row (e.g. thousands of near-duplicates);
#: on a 2-vCPU Sapphire Rapids lists of 45-103 still ran 2-2.5x faster than the float32 pass
#: (docs/performance.md#bf16-where-the-cpu-has-it)
MAX_BF16_CAPACITY = 256


def _predicted_window(features: np.ndarray, k: int, exclude_self: bool, a: float, b: float,
                      offset: float) -> float:
    """About how many candidates per row (90th percentile over 256 sampled rows) score within
    the bf16 error window below the k-th, extrapolated from a sample of 8192 columns."""
    n = len(features)
    rng = np.random.default_rng(54321)
    rows = np.sort(rng.choice(n, size=min(n, 256), replace=False))
    cols = np.sort(rng.choice(n, size=min(n, 8192), replace=False))
    s = (features[rows] @ features[cols].T).astype(np.float64)
    if exclude_self:
        s[rows[:, None] == cols[None, :]] = -np.inf
    scale = n / len(cols)
    q = min(len(cols) - 1, max(1, int(round(k / scale))))
    kth = -np.partition(-s, q - 1, axis=1)[:, q - 1:q]
    v = kth - offset
    low = kth - 2 * (a + b * np.abs(v)) - 2 * b * 0.05
    inside = ((s >= low) & (s < kth)).sum(1) * scale
    return float(np.percentile(inside, 90))


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


# ---------------------------------------------------------------------- exact final selection
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


# ------------------------------------------------------------------- the CPU candidate pass
#: columns sampled per row to seed its threshold (at most; see _seed_thresholds): measured best at
#: N = 20,000 (float32) and N = 50,000 (bf16, where the sample's product is cheap)
SEED_COLUMNS = {"fp32": 1024, "bf16": 2048}
#: threads scanning a tile (numpy releases the GIL in comparisons and nonzero)
_POOL_THREADS = max(1, min(8, os.cpu_count() or 1))


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
