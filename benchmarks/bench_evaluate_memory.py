#!/usr/bin/env python3
"""Peak memory and time of evaluate_unsupervised.py's streaming sections at the full NGA size.

Writes a synthetic collection (N unit vectors of dimension D, a random top-10 table, a manifest
with artists) into a scratch directory and runs the intra/inter and retrieval sections as
evaluate_unsupervised.py does (--skip-copies --skip-pixels: those touch only their samples),
in a child process whose peak RSS is reported against the size of features.npy.

    python benchmarks/bench_evaluate_memory.py --n 122477 --dim 2048 --dir /tmp/paintsim-bench-eval
"""
from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(root: Path, n: int, dim: int, k: int = 10) -> None:
    import pandas as pd

    from paintsim.embeddings import array_sha256
    from paintsim.manifest import MANIFEST_COLUMNS, write_manifest
    from paintsim.neighbours import save_table

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    feats = np.lib.format.open_memmap(root / "features.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, 8192):
        x = rng.standard_normal((min(n, s + 8192) - s, dim), dtype=np.float32)
        feats[s:s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    feats.flush()
    del feats
    names = np.array([f"{i:08d}-0000-4000-8000-000000000000.jpg" for i in range(n)])
    np.save(root / "image_names.npy", names)
    idx = rng.integers(0, n, size=(n, k), dtype=np.int32)
    sha = array_sha256(np.load(root / "features.npy", mmap_mode="r"))
    save_table(root / f"top_{k}_similar.npy", idx, rng.random((n, k), dtype=np.float32), route="streamed",
               features_sha256=sha)
    rows = {c: [""] * n for c in MANIFEST_COLUMNS}
    rows.update(file=[f"images/{nm}" for nm in names], objectid=[str(i) for i in range(n)],
                attribution=[f"artist {i}" for i in rng.integers(0, n // 30, size=n)], status=["ok"] * n)
    write_manifest(root / "manifest.csv", pd.DataFrame(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=122_477)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--dir", default="/tmp/paintsim-bench-eval")
    args = ap.parse_args()
    root = Path(args.dir)
    if not (root / "manifest.csv").exists():
        t = time.perf_counter()
        build(root, args.n, args.dim)
        print(f"built N={args.n} D={args.dim} in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, str(REPO / "evaluate_unsupervised.py"), "--data-dir", str(root),
                           "--skip-copies", "--skip-pixels", "--no-progress", "--log-level", "WARNING"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(proc.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    fbytes = (root / "features.npy").stat().st_size
    print(proc.stdout.split("\n\n")[0])
    print(f"\nN={args.n:,} D={args.dim}: evaluate (similarity + retrieval) {wall:.1f} s, "
          f"peak RSS {peak / 2**30:.2f} GiB; features.npy {fbytes / 2**30:.2f} GiB "
          f"(memory-mapped pages count in RSS); an N x N float32 matrix would be "
          f"{4 * args.n * args.n / 2**30:.0f} GiB")


if __name__ == "__main__":
    main()
