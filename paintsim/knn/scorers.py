"""The candidate pass's scorers: float32 (numpy BLAS on the CPU, torch on CUDA) and bf16 on
centred rows, each with its proven error bound |s~ - s| <= a + b|s~| (the package docstring)."""
from __future__ import annotations

import warnings

import numpy as np

_U32 = 2.0 ** -24   # unit roundoff of float32
_U64 = 2.0 ** -53   # unit roundoff of float64
#: absolute slack for denormals flushed to zero and float64 rounding of the bounds themselves
_TINY = 1e-12


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
