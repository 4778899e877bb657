"""The numbers of the evaluation, as small pure functions with exact definitions.

Everything here works on arrays already in memory and small enough to hold (rankings ``[Q, k]``,
one pair of images); ``paintsim.evaluate`` streams the collection through them in blocks. The
definitions are the ones written down in docs/evaluation.md:

* ``precision@k`` = (relevant items among the first k retrieved) / k
* ``recall@k`` = (relevant items among the first k retrieved) / R, R = number of relevant items
* ``AP@k`` = (1 / min(R, k)) * sum over ranks i <= k that hold a relevant item of precision@i,
  and ``mAP@k`` its mean over queries (1.0 exactly when the first min(R, k) results are relevant)
* ``F1@k`` = 2 P R / (P + R) per query (0 when both are 0), then averaged over queries
* chance levels: the exact expectation of each of these for a uniformly random ranking of the
  M candidates (hits in the first k are hypergeometric), so a score can be read against it
* ``bootstrap_ci``: percentile interval of a mean over queries, queries resampled with replacement
* SSIM: Wang, Bovik, Sheikh & Simoncelli (2004), 11x11 Gaussian window with sigma 1.5,
  K1 = 0.01, K2 = 0.03, computed on the "valid" region and averaged (their reference code)
"""
from __future__ import annotations

import numpy as np

#: SSIM constants from Wang et al. (2004).
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


# --------------------------------------------------------------------------- retrieval

def relevance_matrix(retrieved_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """``rel[q, i]`` is True when the i-th item retrieved for query q shares the query's label.

    Labels are integer codes; a negative code means "unknown" and never matches anything.
    """
    retrieved_labels = np.asarray(retrieved_labels)
    query_labels = np.asarray(query_labels)
    rel = retrieved_labels == query_labels[:, None]
    rel &= query_labels[:, None] >= 0
    return rel


def precision_at_k(rel: np.ndarray, k: int) -> np.ndarray:
    """Per-query precision@k from a boolean relevance matrix ``[Q, >=k]`` (ranked, best first)."""
    rel = np.asarray(rel, dtype=bool)
    _check_k(rel, k)
    return rel[:, :k].sum(axis=1) / float(k)


def recall_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query recall@k: hits in the first k over the number of relevant items (must be > 0)."""
    rel = np.asarray(rel, dtype=bool)
    _check_k(rel, k)
    n_relevant = np.asarray(n_relevant, dtype=np.float64)
    if np.any(n_relevant <= 0):
        raise ValueError("recall is undefined for a query with no relevant item; filter those out")
    return rel[:, :k].sum(axis=1) / n_relevant


def average_precision_at_k(rel: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k = sum_{i<=k, rel_i} precision@i / min(R, k) (see the module docstring)."""
    rel = np.asarray(rel, dtype=bool)[:, :k]
    _check_k(rel, k)
    n_relevant = np.asarray(n_relevant, dtype=np.float64)
    if np.any(n_relevant <= 0):
        raise ValueError("AP is undefined for a query with no relevant item; filter those out")
    hits = np.cumsum(rel, axis=1)
    prec_at_i = hits / np.arange(1, k + 1)[None, :]
    return (prec_at_i * rel).sum(axis=1) / np.minimum(n_relevant, k)


def f1_score(precision: np.ndarray, recall: np.ndarray) -> np.ndarray:
    """Element-wise F1, 0 where precision and recall are both 0."""
    p = np.asarray(precision, dtype=np.float64)
    r = np.asarray(recall, dtype=np.float64)
    denom = p + r
    return np.divide(2 * p * r, denom, out=np.zeros_like(denom), where=denom > 0)


def _check_k(rel: np.ndarray, k: int) -> None:
    if rel.ndim != 2:
        raise ValueError(f"relevance must be [queries, ranks], got shape {rel.shape}")
    if not 1 <= k <= rel.shape[1]:
        raise ValueError(f"k={k} but only {rel.shape[1]} ranked results per query")


# --------------------------------------------------------------------------- chance and uncertainty
# A random ranking puts a uniformly random k-subset of the M candidates first, so the hits X in
# the first k are hypergeometric (M, R, k): E[X] = k R / M. Each function returns the per-query
# expectation; the chance level of a mean metric is their mean over the queries.

def _chance_args(n_relevant, n_candidates, k: int) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(n_relevant, dtype=np.float64)
    m = np.broadcast_to(np.asarray(n_candidates, dtype=np.float64), r.shape)
    if np.any(r <= 0) or np.any(r > m) or not 1 <= k:
        raise ValueError("chance levels need 1 <= relevant <= candidates and k >= 1")
    return r, m


def chance_precision_at_k(n_relevant, n_candidates, k: int) -> np.ndarray:
    """E[precision@k] of a random ranking = R / M (k <= M)."""
    r, m = _chance_args(n_relevant, n_candidates, k)
    return r / m


def chance_recall_at_k(n_relevant, n_candidates, k: int) -> np.ndarray:
    """E[recall@k] of a random ranking = min(k, M) / M."""
    r, m = _chance_args(n_relevant, n_candidates, k)
    return np.minimum(k, m) / m


def chance_f1_at_k(n_relevant, n_candidates, k: int) -> np.ndarray:
    """E[F1@k] of a random ranking. With X hits, P = X/k and R' = X/R, F1 = 2X / (k + R) (also
    for X = 0), linear in X, so its expectation is 2 E[X] / (k + R) = 2 k R / (M (k + R))."""
    r, m = _chance_args(n_relevant, n_candidates, k)
    kk = np.minimum(k, m)
    return 2.0 * kk * r / (m * (k + r))


def chance_average_precision_at_k(n_relevant, n_candidates, k: int) -> np.ndarray:
    """E[AP@k] of a random ranking, exactly.

    AP@k = sum_{i<=k} rel_i * hits_i / i / min(R, k). For a random ranking
    P(rel_i) = R/M and E[hits_i | rel_i] = 1 + (i-1)(R-1)/(M-1), so
    E[AP@k] = R / (M min(R, k)) * (H_k + (R-1)/(M-1) * (k - H_k)), H_k = sum_{i<=k} 1/i
    (k capped at M).
    """
    r, m = _chance_args(n_relevant, n_candidates, k)
    kk = np.minimum(k, m)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, k + 1))])
    hk = harmonic[kk.astype(np.int64)]
    inner = np.divide(r - 1, m - 1, out=np.zeros_like(r), where=m > 1)
    return r / (m * np.minimum(r, k)) * (hk + inner * (kk - hk))


def bootstrap_ci(per_query_values, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of the mean over queries: the queries are resampled with
    replacement ``n_boot`` times (seeded) and the mean recomputed each time.

    ``per_query_values`` is ``[Q]`` (returns two floats) or ``[Q, M]``, M metrics sharing the
    same resamples (returns two ``[M]`` arrays). Vectorised as counts @ values in blocks of
    resamples, so memory stays at about 8 M numbers whatever Q.
    """
    v = np.asarray(per_query_values, dtype=np.float64)
    one = v.ndim == 1
    v = v[:, None] if one else v
    if v.ndim != 2 or v.shape[0] == 0:
        raise ValueError(f"bootstrap needs values of shape [queries] or [queries, metrics], got {v.shape}")
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap needs n_boot >= 1 and 0 < level < 1, got {n_boot} and {level}")
    q = v.shape[0]
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, v.shape[1]))
    step = max(1, (1 << 23) // q)
    for s in range(0, n_boot, step):
        b = min(n_boot, s + step) - s
        draws = rng.integers(0, q, size=(b, q)) + (np.arange(b) * q)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * q).reshape(b, q)
        means[s:s + b] = counts.astype(np.float64) @ v / q
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2], axis=0)
    return (float(lo[0]), float(hi[0])) if one else (lo, hi)


def contains(interval, value: float, tol: float = 1e-12) -> bool:
    """Whether ``value`` lies in the closed interval ``(lo, hi)``: the metric cannot be told apart
    from it at that level."""
    lo, hi = interval
    return bool(lo - tol <= value <= hi + tol)


# --------------------------------------------------------------------------- distributions

def separation(within: np.ndarray, between: np.ndarray) -> dict[str, float]:
    """How far two similarity distributions are apart.

    ``gap`` is the difference of means; ``d_prime`` divides it by the pooled standard deviation;
    ``auc`` is the probability that a value drawn from ``within`` exceeds one drawn from
    ``between`` (ties count one half): 0.5 means indistinguishable, 1.0 fully separated.
    Computed by sorting, O((n + m) log m), so millions of values are fine.
    """
    a = np.asarray(within, dtype=np.float64).ravel()
    b = np.sort(np.asarray(between, dtype=np.float64).ravel())
    if a.size == 0 or b.size == 0:
        raise ValueError("separation needs two non-empty samples")
    lower = np.searchsorted(b, a, side="left")
    upper = np.searchsorted(b, a, side="right")
    auc = float((lower + 0.5 * (upper - lower)).sum() / (a.size * b.size))
    pooled = np.sqrt(0.5 * (a.var() + b.var()))
    gap = float(a.mean() - b.mean())
    return {"gap": gap, "d_prime": float(gap / pooled) if pooled > 0 else float("inf"), "auc": auc}


# --------------------------------------------------------------------------- pixel baselines

def gaussian_kernel1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter_valid(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable 2-D correlation with ``kernel`` on the 'valid' region (no padding)."""
    k = kernel.size
    # rows: sliding windows along axis 1, then axis 0 (numpy's stride tricks, no copies of windows)
    from numpy.lib.stride_tricks import sliding_window_view

    tmp = sliding_window_view(img, k, axis=1) @ kernel
    return sliding_window_view(tmp, k, axis=0) @ kernel


def ssim(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> float:
    """Mean structural similarity of two greyscale images of the same shape (Wang et al. 2004).

    ``data_range`` is the span of possible pixel values (1.0 for images scaled to [0, 1]).
    Identical images give exactly 1.0; the value lies in [-1, 1].
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(f"SSIM needs two greyscale images of one shape, got {x.shape} and {y.shape}")
    if min(x.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {x.shape}")
    g = gaussian_kernel1d()
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    sxx = _filter_valid(x * x, g) - mu_x * mu_x
    syy = _filter_valid(y * y, g) - mu_y * mu_y
    sxy = _filter_valid(x * y, g) - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return float(np.mean(num / den))


def rmse(x: np.ndarray, y: np.ndarray) -> float:
    """Root mean squared difference of two images of the same shape."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"RMSE needs two images of one shape, got {x.shape} and {y.shape}")
    return float(np.sqrt(np.mean((x - y) ** 2)))
