"""The 2-D map of a collection (``map_2d.npy`` + ``map_2d.json``) and how far it can be trusted.

A map places every painting on a plane so that paintings with similar features lie near each other;
a web page draws it without knowing how it was made. Three pieces, documented in docs/map.md:

* :func:`compute_map`: t-SNE (openTSNE) of the unit feature rows, euclidean distance on unit rows
  (it ranks exactly as cosine similarity does), approximate neighbours (openTSNE's default: exact
  below 1,000 rows, Annoy above) or exact ones from :mod:`paintsim.knn`, a PCA initialisation
  computed here from a streamed covariance (the features are never copied), all seeded. Collections
  too small for t-SNE (N < 5) get their first two principal components. The output is normalised the
  same way whatever ran: centred on its bounding box, the larger axis spanning exactly [-1, 1].
* :func:`trustworthiness`: Venna & Kaski's trustworthiness at k (the definition of
  ``sklearn.manifold.trustworthiness``), exact over every query at small N, a seeded sample of
  queries with a bootstrap interval at large N, block by block in bounded memory (never N x N).
* the artifact: one writer (:func:`write_map`), one reader (:func:`load_map`) that refuses a
  damaged file and ignores a map of other features, and :func:`map_for`, which returns the
  current map or makes, measures and writes it.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics
from .artifacts import DataPaths, atomic_paths, load_npy, read_json_object, save_npy, write_json
from .errors import BadValue, UserError

log = logging.getLogger(__name__)

METHODS = ("tsne", "pca")
KNN_METHODS = ("auto", "exact", "annoy")
#: the fewest rows openTSNE embeds (perplexity clamped to (N - 1) / 3); fewer get the PCA map
MIN_TSNE_ROWS = 5
#: rows must be this close to unit norm: euclidean on unit rows is what ranks as cosine
UNIT_NORM_TOL = 1e-3
#: bytes of float32 features per block when streaming over them (PCA, norms)
_STREAM_BYTES = 32 * 2**20
#: bytes of per-block scratch of :func:`trustworthiness` (about 25 bytes per query and row:
#: float32 similarities, float64 map distances and their temporaries, boolean masks)
_TRUST_BYTES = 256 * 2**20
STAGE = "explore_collection.py"
NORMALISATION = "centred on the bounding box; the larger axis spans exactly [-1, 1], aspect kept"


# ------------------------------------------------------------------------------------- the map
def _blocks(n: int, d: int):
    step = max(1, _STREAM_BYTES // (4 * max(1, d)))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _check_rows(features) -> tuple[int, int]:
    if getattr(features, "ndim", None) != 2:
        raise ValueError(f"features must be a 2-D array [N, D], got shape {getattr(features, 'shape', None)}")
    n, d = features.shape
    if n < 1 or d < 1:
        raise ValueError(f"features must have at least one row and one column, got shape {features.shape}")
    return int(n), int(d)


def principal_components(features, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The rows projected on their first principal components, ``(scores [N, c] float64,
    explained variance [c])``, without copying the features.

    Two streamed passes (mean, then the centred D x D covariance accumulated in float64 from
    float32 block products), so a 1 GB memory map stays a memory map; D x D float64 is 32 MB at
    D = 2048. Small inputs (N <= D) take the SVD of the centred rows instead. Each component's
    sign is fixed (its largest loading positive), so the result does not depend on the solver.
    Also checks every row is finite and unit-norm (ValueError otherwise).
    """
    n, d = _check_rows(features)
    total = np.zeros(d)
    for a, b in _blocks(n, d):
        block = np.asarray(features[a:b], dtype=np.float32)
        if not np.isfinite(block).all():
            raise ValueError(f"features rows {a}..{b - 1} contain NaN or infinity")
        norms = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
        bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOL)
        if len(bad):
            raise ValueError(f"features row {a + int(bad[0])} has norm {norms[bad[0]]:.4g}: the map needs "
                             "L2-normalised rows (as features.npy holds)")
        total += block.sum(axis=0, dtype=np.float64)
    mean = total / n
    if n <= d:
        centred = np.asarray(features, dtype=np.float64) - mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        comps, var = vt[:n_components], (s[:n_components] ** 2) / max(1, n - 1)
    else:
        cov = np.zeros((d, d))
        mean32 = mean.astype(np.float32)
        for a, b in _blocks(n, d):
            block = np.asarray(features[a:b], dtype=np.float32) - mean32
            cov += block.T @ block
        cov /= max(1, n - 1)
        evals, evecs = np.linalg.eigh(cov)
        order = np.argsort(evals)[::-1][:n_components]
        comps, var = evecs[:, order].T, np.clip(evals[order], 0, None)
    signs = np.sign(comps[np.arange(len(comps)), np.argmax(np.abs(comps), axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    c = len(comps)
    scores = np.zeros((n, n_components))
    comps32 = comps.T.astype(np.float32)
    mean32 = mean.astype(np.float32)
    for a, b in _blocks(n, d):
        scores[a:b, :c] = (np.asarray(features[a:b], dtype=np.float32) - mean32) @ comps32
    var = np.concatenate([var, np.zeros(n_components - c)])
    if n_components > n - 1:  # n points span at most n - 1 directions: the rest is rounding
        scores[:, max(0, n - 1):] = 0.0
        var[max(0, n - 1):] = 0.0
    return scores, var


def normalise_coords(coords: np.ndarray) -> np.ndarray:
    """Centre on the bounding box and scale so the larger axis spans exactly [-1, 1] (aspect
    kept), so a page can draw any map in one fixed square; a map of coincident points is all 0."""
    y = np.asarray(coords, dtype=np.float64)
    lo, hi = y.min(axis=0), y.max(axis=0)
    half = float((hi - lo).max()) / 2.0
    y = y - (lo + hi) / 2.0
    if half > 0:
        y = y / half
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def effective_perplexity(perplexity: float, n: int) -> float:
    """The perplexity t-SNE can use with n rows: at most (n - 1) / 3, since openTSNE looks at
    3 x perplexity neighbours and a row has n - 1."""
    return float(min(perplexity, (n - 1) / 3.0))


def _check_params(method: str, perplexity: float, n_jobs: int, knn: str) -> None:
    if method not in METHODS:
        raise BadValue("method", method, f"choose one of {', '.join(METHODS)}")
    if not (isinstance(perplexity, (int, float, np.integer, np.floating)) and not isinstance(perplexity, bool)
            and math.isfinite(perplexity) and perplexity > 0):
        raise BadValue("perplexity", perplexity, "must be a positive number")
    if not (isinstance(n_jobs, int) and n_jobs >= 1):
        raise BadValue("n_jobs", n_jobs, "must be a positive integer")
    if knn not in KNN_METHODS:
        raise BadValue("knn", knn, f"choose one of {', '.join(KNN_METHODS)}")


class _Progress:
    """openTSNE callback: one log line per 50 iterations (its own ``verbose`` prints to stdout)."""

    def __init__(self, phase: str):
        self.phase = phase

    def __call__(self, iteration, error, embedding):
        log.info("t-SNE %s: iteration %d, KL divergence %.4f", self.phase, iteration, error)
        return False


def compute_map_detailed(features, method: str = "tsne", seed: int = 0, perplexity: float = 30.0,
                         n_jobs: int = 2, progress: bool = False, *,
                         knn: str = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`compute_map`, plus what ran: ``method`` (``tsne``, or ``pca`` when asked or when
    N < 5), the effective parameters and, for a fallback, why (the record keeps them)."""
    _check_params(method, perplexity, n_jobs, knn)
    n, d = _check_rows(features)
    info: dict[str, Any] = {"method": method, "asked_method": method, "n": n, "dim": d, "seed": int(seed),
                            "normalisation": NORMALISATION}
    if method == "tsne" and n < MIN_TSNE_ROWS:
        info.update(method="pca", fallback=f"t-SNE needs at least {MIN_TSNE_ROWS} rows, the collection "
                                           f"has {n}: the first two principal components instead")
        log.info("map of %d rows: %s", n, info["fallback"])
    t0 = time.perf_counter()
    pcs, var = principal_components(features, 2)
    info["pca_seconds"] = round(time.perf_counter() - t0, 3)
    if info["method"] == "pca":
        info.update(explained_variance=[float(v) for v in var])
        return normalise_coords(pcs), info
    return _tsne(features, pcs, info, perplexity=perplexity, seed=int(seed), n_jobs=n_jobs,
                 progress=progress, knn=knn)


def _tsne(features, pcs: np.ndarray, info: dict, *, perplexity: float, seed: int, n_jobs: int,
          progress: bool, knn: str) -> tuple[np.ndarray, dict]:
    from openTSNE import TSNE, affinity, initialization, nearest_neighbors

    n = info["n"]
    perp = effective_perplexity(perplexity, n)
    k_nn = min(n - 1, int(3 * perp))
    # PCA initialisation as openTSNE's own (std 1e-4 on the first axis, 1 % jitter), seeded; a
    # degenerate first axis (every row equal) starts from seeded noise instead
    if np.std(pcs[:, 0]) > 0:
        init = initialization.jitter(initialization.rescale(pcs), random_state=seed)
    else:
        init = initialization.random(n, 2, random_state=seed)
    t0 = time.perf_counter()
    if knn == "exact":
        from . import knn as exact_knn

        index, score = exact_knn.top_k_neighbors(features, k_nn, progress=progress)
        dist = np.sqrt(np.clip(2.0 - 2.0 * score.astype(np.float64), 0.0, None))
        knn_index: Any = nearest_neighbors.PrecomputedNeighbors(index.astype(np.int64), dist)
        knn_used = "exact (paintsim.knn)"
    else:
        knn_index = None
        knn_used = "exact (scikit-learn)" if knn == "auto" and n < 1000 else "annoy (approximate, 50 trees)"
    log.info("t-SNE of %d rows: %d neighbours each (%s), perplexity %.3g", n, k_nn, knn_used, perp)
    aff = affinity.PerplexityBasedNN(
        None if knn_index is not None else features, perplexity=perp, k_neighbors=k_nn,
        method="annoy" if knn == "annoy" else "auto", metric="euclidean", n_jobs=n_jobs,
        random_state=seed, knn_index=knn_index)
    knn_seconds = time.perf_counter() - t0
    tsne = TSNE(n_jobs=n_jobs, random_state=seed, verbose=False,
                callbacks=[_Progress("optimisation")] if progress else None, callbacks_every_iters=50)
    t1 = time.perf_counter()
    emb = tsne.fit(affinities=aff, initialization=init)
    info.update(
        perplexity=perp, k_neighbours=k_nn, metric="euclidean on unit rows (ranks as cosine)",
        neighbours=knn_used, initialization="pca (streamed covariance, rescaled to std 1e-4, 1 % jitter)",
        early_exaggeration=tsne.early_exaggeration, early_exaggeration_iter=tsne.early_exaggeration_iter,
        n_iter=tsne.n_iter, learning_rate="auto: N / 12 while exaggerated, then N",
        negative_gradient="fft" if n >= 10_000 else "bh", n_jobs=n_jobs,
        knn_seconds=round(knn_seconds, 3), optimise_seconds=round(time.perf_counter() - t1, 3))
    return normalise_coords(np.asarray(emb)), info


def compute_map(features, method: str = "tsne", seed: int = 0, perplexity: float = 30.0,
                n_jobs: int = 2, progress: bool = False) -> np.ndarray:
    """A 2-D map of unit feature rows, float32 ``[N, 2]`` normalised (see
    :func:`normalise_coords`); the same seed and inputs give the same map.

    ``method``: ``tsne`` (N >= 5; perplexity clamped to (N - 1) / 3) or ``pca`` (the first two
    principal components, also the fallback for N < 5). Memory: the features are read in place
    (a memory map stays one); Annoy keeps its own float32 copy of them (1 GB at 122,477 x 2048),
    the neighbour graph is N x 3 perplexity; nothing is N x N.
    """
    return compute_map_detailed(features, method, seed, perplexity, n_jobs, progress)[0]


# ------------------------------------------------------------------------------- trustworthiness
def chance_trustworthiness(n: int, k: int) -> float:
    """Expected trustworthiness of a random map, derived: a random map's k neighbours of a query
    are a uniform k-subset of the other n - 1 points, so each has a feature rank r uniform on
    1..n-1 and E[max(0, r - k)] = (n-1-k)(n-k) / (2(n-1)); hence
    1 - (n-1-k)(n-k) / ((n-1)(2n-3k-1)), which tends to 1/2 as n grows."""
    _check_k(k, n)
    return float(1.0 - (n - 1 - k) * (n - k) / ((n - 1) * (2.0 * n - 3.0 * k - 1.0)))


def _check_k(k: int, n: int) -> None:
    if not (isinstance(k, (int, np.integer)) and 1 <= k < n / 2):
        raise BadValue("k", k, f"trustworthiness needs 1 <= k < N / 2 = {n / 2:g}")


def _map_neighbours(coords: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """The k nearest map points of each row (euclidean, self excluded, ties to the lower index)."""
    dist = np.square(coords[rows, 0:1] - coords[None, :, 0])
    dist += np.square(coords[rows, 1:2] - coords[None, :, 1])
    dist[np.arange(len(rows)), rows] = np.inf
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    kth = np.take_along_axis(dist, part, axis=1).max(axis=1)
    ties = np.flatnonzero((dist <= kth[:, None]).sum(axis=1) > k)
    for r in ties:  # more than k points at or within the k-th distance: take the lower indices
        cand = np.flatnonzero(dist[r] <= kth[r])
        part[r] = cand[np.lexsort((cand, dist[r, cand]))[:k]]
    return part


def _feature_norms(features, n: int, d: int) -> np.ndarray:
    norms = np.empty(n)
    for a, b in _blocks(n, d):
        block = np.asarray(features[a:b], dtype=np.float32)
        norms[a:b] = np.sqrt(np.einsum("ij,ij->i", block, block, dtype=np.float64))
    if not np.isfinite(norms).all() or (norms == 0).any():
        raise ValueError("features have non-finite or all-zero rows: cosine similarity is undefined")
    return norms


def per_query_trustworthiness(features, coords, rows: np.ndarray, k: int) -> np.ndarray:
    """Each query's trustworthiness term, 1 - 2 P_i / (k (2n - 3k - 1)), P_i the sum over its k
    map neighbours that are not among its k feature neighbours of (feature rank - k); their mean
    over all rows is ``sklearn.manifold.trustworthiness``.

    Feature rank: 1 + the rows (self excluded) with a higher cosine similarity, plus those with an
    equal one and a lower index (ties to the lower index, as the neighbour tables). Queries go in
    blocks whose similarity rows (float32, one matrix product against the features in place)
    stay within about 256 MB, so memory is O(block x N), never N x N.
    """
    n, d = _check_rows(features)
    coords = np.asarray(coords, dtype=np.float64)
    if coords.shape != (n, 2) or not np.isfinite(coords).all():
        raise ValueError(f"coords must be finite [N, 2] with N = {n} (the features' rows), got {coords.shape}")
    _check_k(k, n)
    rows = np.asarray(rows, dtype=np.int64)
    inv_norm = (1.0 / _feature_norms(features, n, d)).astype(np.float32)
    block = max(1, min(len(rows), _TRUST_BYTES // (25 * n)))
    x = features if (isinstance(features, np.ndarray) and features.dtype == np.float32) else \
        np.asarray(features, dtype=np.float32)
    scale = 2.0 / (k * (2.0 * n - 3.0 * k - 1.0))
    out = np.empty(len(rows))
    for s in range(0, len(rows), block):
        q_rows = rows[s:s + block]
        b = len(q_rows)
        sim = np.asarray(x[q_rows], dtype=np.float32) @ np.asarray(x).T   # [b, N] float32
        sim *= inv_norm[None, :]        # cosine up to the query's own (rank-irrelevant) norm
        sim[np.arange(b), q_rows] = -np.inf
        nbrs = _map_neighbours(coords, q_rows, k)
        thr = np.take_along_axis(sim, nbrs, axis=1)                        # [b, k]
        penalty = np.zeros(b)
        for m in range(k):
            t = thr[:, m:m + 1]
            higher = np.count_nonzero(sim > t, axis=1)
            equal = np.count_nonzero(sim == t, axis=1)
            rank = higher + 1
            for r in np.flatnonzero(equal > 1):   # exact ties: the lower indices rank first
                rank[r] += int(np.count_nonzero(sim[r, :nbrs[r, m]] == t[r, 0]))
            penalty += np.clip(rank - k, 0, None)
        out[s:s + b] = 1.0 - scale * penalty
    return out


def trustworthiness(features, coords, k: int = 10, n_queries: int | None = 2000, seed: int = 0,
                    n_boot: int = 1000) -> dict[str, Any]:
    """How well the map keeps each painting's feature-space neighbours near it (Venna & Kaski).

    Every row is a query when N <= ``n_queries`` (or ``n_queries`` is None): the value is then
    exact and ``ci95`` is [value, value]. Otherwise ``n_queries`` rows drawn without replacement
    (seeded) are the queries, and ``ci95`` is a seeded percentile bootstrap over them.
    ``chance`` is the derived expectation for a random map (:func:`chance_trustworthiness`).
    Returns {k, value, ci95, chance, n_queries, n, exact, seed, seconds}.
    """
    t0 = time.perf_counter()
    n, _ = _check_rows(features)
    _check_k(k, n)
    if n_queries is not None and (not isinstance(n_queries, (int, np.integer)) or n_queries < 1):
        raise BadValue("n_queries", n_queries, "must be a positive integer (or None for every row)")
    exact = n_queries is None or n_queries >= n
    rows = np.arange(n) if exact else np.sort(np.random.default_rng(seed).choice(n, int(n_queries), replace=False))
    per_query = per_query_trustworthiness(features, coords, rows, k)
    value = float(per_query.mean())
    ci = [value, value] if exact else [float(v) for v in metrics.bootstrap_ci(per_query, n_boot=n_boot, seed=seed)]
    return {"k": int(k), "value": value, "ci95": ci, "chance": chance_trustworthiness(n, k),
            "chance_from": "derived: 1 - (n-1-k)(n-k) / ((n-1)(2n-3k-1))", "n_queries": int(len(rows)),
            "n": int(n), "exact": bool(exact), "seed": int(seed), "seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------------------------- the artifact
@dataclass
class MapResult:
    coords: np.ndarray                          # float32 [N, 2], rows of image_names.npy
    record: dict[str, Any] = field(default_factory=dict)   # map_2d.json


def write_map(paths: DataPaths, coords: np.ndarray, record: dict[str, Any]) -> None:
    """Write ``map_2d.npy`` and then ``map_2d.json`` (both whole under temporary names first, the
    record renamed into place last), so a reader never pairs a new map with an old record."""
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype != np.float32 or not np.isfinite(coords).all():
        raise ValueError(f"a map is finite float32 [N, 2], got {coords.dtype} {coords.shape}")
    if record.get("n") != len(coords) or "features_sha256" not in record:
        raise ValueError("the map's record needs features_sha256 and n equal to the map's rows")
    with atomic_paths(paths.map_2d, paths.map_meta) as (npy_tmp, json_tmp):
        save_npy(npy_tmp, coords)
        write_json(json_tmp, dict(record, map=paths.map_2d.name))


def _damaged(path, why: str) -> UserError:
    return UserError(f"{path} is damaged ({why}); delete it or rerun {STAGE}")


def load_map(emb) -> MapResult | None:
    """The map of ``emb`` (an ``Embeddings``) when there is a current one, else None.

    None (with a log line) when the files are missing or the record names other features or
    another N (stale). A damaged file (not JSON, not a plain .npy, not finite float32 [N, 2]) is a
    :class:`UserError` naming it.
    """
    paths = emb.paths
    if not paths.map_2d.exists() or not paths.map_meta.exists():
        if paths.map_2d.exists() or paths.map_meta.exists():
            log.warning("not using the map in %s: map_2d.npy and map_2d.json come together and one is "
                        "missing; rerun %s", paths.root, STAGE)
        return None
    try:
        record = read_json_object(paths.map_meta)
    except UserError:
        raise _damaged(paths.map_meta, "not a JSON object") from None
    if not isinstance(record.get("features_sha256"), str) or not isinstance(record.get("n"), int):
        raise _damaged(paths.map_meta, "no features_sha256 or n")
    if record["features_sha256"] != emb.sha256 or record["n"] != len(emb):
        log.warning("not using %s: it was made from other features (stale); rerun %s", paths.map_2d, STAGE)
        return None
    try:
        coords = load_npy(paths.map_2d)
    except UserError:
        raise _damaged(paths.map_2d, "not a plain NumPy array file") from None
    if coords.shape != (len(emb), 2) or coords.dtype != np.float32:
        raise _damaged(paths.map_2d, f"expected float32 [{len(emb)}, 2], got {coords.dtype} {list(coords.shape)}")
    if not np.isfinite(coords).all():
        raise _damaged(paths.map_2d, f"{int((~np.isfinite(coords)).any(axis=1).sum())} row(s) not finite")
    return MapResult(coords, record)


def _versions() -> dict[str, str]:
    import openTSNE

    from . import __version__

    return {"openTSNE": openTSNE.__version__, "numpy": np.__version__, "paintsim": __version__}


def _trust_k(k: int, n: int) -> int:
    """The largest k <= the asked one that trustworthiness allows (k < N / 2); 0 when none."""
    return int(min(k, (n - 1) // 2))


def map_for(emb, *, method: str = "tsne", seed: int = 0, perplexity: float = 30.0, k: int = 10,
            progress: bool = False, force: bool = False, n_jobs: int = 2, n_queries: int = 2000,
            knn: str = "auto") -> MapResult:
    """The map the site draws: the current ``map_2d.npy`` when its record was asked with this
    method, seed and perplexity (and measured at this k), else computed, measured and written.

    A current map measured at another k keeps its coordinates and gets its trustworthiness
    measured again. k is lowered to what N allows (k < N / 2); for N = 2 there is no measure.
    """
    _check_params(method, perplexity, n_jobs, knn)
    if not isinstance(k, int) or k < 1:
        raise BadValue("k", k, "must be a positive integer")
    asked = {"method": method, "seed": int(seed), "perplexity": float(perplexity), "k": k}
    same_map = ("method", "seed", "perplexity")
    n = len(emb)
    k_used = _trust_k(k, n)
    current = None if force else load_map(emb)
    old = current.record.get("asked") if current is not None else None
    if isinstance(old, dict) and all(old.get(key) == asked[key] for key in same_map):
        if old.get("k") == k:
            return current
        log.info("the current map of %s was measured at another k: measuring it at k = %d", emb.paths.root, k)
        coords, record = current.coords, dict(current.record, asked=asked)
    else:
        t0 = time.perf_counter()
        coords, info = compute_map_detailed(emb.features, method, seed, perplexity, n_jobs, progress, knn=knn)
        parameters = {key: v for key, v in info.items() if key not in ("method", "asked_method", "n", "dim", "seed")}
        record = {"method": info["method"], "asked": asked, "parameters": parameters, "seed": int(seed),
                  "n": n, "dim": emb.dim, "features_sha256": emb.sha256,
                  "seconds": round(time.perf_counter() - t0, 3)}
    trust = None
    if k_used >= 1:
        trust = trustworthiness(emb.features, coords, k=k_used, n_queries=n_queries, seed=seed)
        log.info("map trustworthiness at k = %d: %.3f [%.3f, %.3f] (a random map: %.3f)", k_used, trust["value"],
                 *trust["ci95"], trust["chance"])
    record.update(trustworthiness=trust, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  versions=_versions())
    write_map(emb.paths, coords, record)
    return MapResult(coords, dict(record, map=emb.paths.map_2d.name))


__all__ = ["METHODS", "MapResult", "compute_map", "compute_map_detailed", "trustworthiness",
           "chance_trustworthiness", "per_query_trustworthiness", "principal_components", "normalise_coords",
           "effective_perplexity", "write_map", "load_map", "map_for"]
