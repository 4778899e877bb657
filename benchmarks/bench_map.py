#!/usr/bin/env python3
"""Time and peak memory of the 2-D map (paintsim.mapping) at the full NGA size.

Two steps, so the building of the synthetic features does not count in the measured peak:

    python benchmarks/bench_map.py build --n 122477 --dim 2048 --out /tmp/paintsim-bench-map/f122k.npy
    env -u OPENBLAS_CORETYPE /usr/bin/time -v \\
        python benchmarks/bench_map.py run --features /tmp/paintsim-bench-map/f122k.npy

``build`` writes anisotropic, realistic unit rows into a ``.npy`` block by block: a shared mean
direction (every cosine is positive, as with CNN features after ReLU), clusters of Zipf-distributed
sizes grouped under super-clusters, and noise with a decaying spectrum, so pairwise cosines lie
around 0.5-0.8. ``run`` memory-maps them read-only (as ``Embeddings.load`` does), computes the map
(``compute_map_detailed``), then the sampled trustworthiness estimate, and prints one JSON line
with the phases' seconds and the process's peak RSS (``/usr/bin/time -v`` reports the same peak),
stamped with the machine, and saves it as ``benchmarks/results/map_n<N>_d<D>.json``.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def build(out: Path, n: int, dim: int, n_clusters: int = 300, seed: int = 0) -> None:
    """Unit rows = normalise(mean direction + 0.6 cluster centre + 0.6 decaying noise / sqrt(D))."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal(dim)
    u /= np.linalg.norm(u)
    sup = rng.standard_normal((max(2, n_clusters // 10), dim))
    sup /= np.linalg.norm(sup, axis=1, keepdims=True)
    cen = 0.7 * sup[rng.integers(0, len(sup), n_clusters)] + 0.7 * rng.standard_normal((n_clusters, dim)) / np.sqrt(dim)
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    sizes = rng.zipf(1.6, n_clusters).astype(np.float64)
    p = sizes / sizes.sum()
    spectrum = np.linspace(1.6, 0.4, dim, dtype=np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.npy")
    feats = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 8192):
        m = min(n, s + 8192) - s
        c = rng.choice(n_clusters, m, p=p)
        x = u + 0.6 * cen[c] + 0.6 * rng.standard_normal((m, dim), dtype=np.float32) * spectrum / np.sqrt(dim)
        feats[s:s + m] = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    feats.flush()
    del feats
    tmp.rename(out)
    sample = np.load(out, mmap_mode="r")[:2000]
    cos = (sample @ sample.T)[np.triu_indices(len(sample), 1)]
    print(json.dumps({"built": str(out), "n": n, "dim": dim, "cosine_percentiles_1_50_99":
                      [round(float(v), 3) for v in np.percentile(cos, [1, 50, 99])]}))


def run(features_path: Path, knn: str, n_jobs: int, n_queries: int, k: int, skip_trust: bool) -> None:
    from paintsim import mapping

    feats = np.load(features_path, mmap_mode="r")
    t0 = time.perf_counter()
    coords, info = mapping.compute_map_detailed(feats, seed=0, n_jobs=n_jobs, knn=knn)
    map_s = time.perf_counter() - t0
    rss_after_map = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"n": int(feats.shape[0]), "dim": int(feats.shape[1]), "knn": info.get("neighbours"),
           "n_jobs": n_jobs, "map_seconds": round(map_s, 1),
           "phases": {key: info.get(key) for key in ("pca_seconds", "knn_seconds", "optimise_seconds")},
           "peak_rss_gib_after_map": round(rss_after_map / 2**30, 2)}
    if not skip_trust:
        t1 = time.perf_counter()
        trust = mapping.trustworthiness(feats, coords, k=k, n_queries=n_queries, seed=0)
        out.update(trust_seconds=round(time.perf_counter() - t1, 1),
                   trustworthiness={key: trust[key] for key in ("k", "value", "ci95", "chance", "n_queries")})
    out.update(peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 2**10 / 2**30, 2),
               features_gib=round(features_path.stat().st_size / 2**30, 2))
    from machine_info import stamp

    out.update(stamp())
    print(json.dumps(out))
    dest = REPO / "benchmarks" / "results" / f"map_n{out['n']}_d{out['dim']}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write synthetic unit-row features to a .npy")
    b.add_argument("--n", type=int, default=122_477)
    b.add_argument("--dim", type=int, default=2048)
    b.add_argument("--out", type=Path, default=Path("/tmp/paintsim-bench-map/features.npy"))
    r = sub.add_parser("run", help="map + trustworthiness of a features .npy (memory-mapped)")
    r.add_argument("--features", type=Path, default=Path("/tmp/paintsim-bench-map/features.npy"))
    r.add_argument("--knn", default="auto", choices=("auto", "exact", "annoy"))
    r.add_argument("--n-jobs", type=int, default=2)
    r.add_argument("--n-queries", type=int, default=2000)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--skip-trust", action="store_true")
    args = ap.parse_args()
    if args.cmd == "build":
        build(args.out, args.n, args.dim)
    else:
        run(args.features, args.knn, args.n_jobs, args.n_queries, args.k, args.skip_trust)


if __name__ == "__main__":
    main()
