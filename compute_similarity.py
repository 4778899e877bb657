#!/usr/bin/env python3
"""Stage 4: the full N x N cosine similarity matrix of features.npy, on disk in HDF5.

Writes <data-dir>/similarity_scores.h5 (or --output): dataset `similarity` [N, N] (--dtype,
float16 by default: half the disk, scores kept to about 3 decimals), chunked in bands of whole
rows for row-block reads; dataset `image_names` (UTF-8) beside it; attributes saying what it was
computed from (features SHA-256, shape, features_meta.json) and `complete`.

Resumable: blocks are written into <output>.partial and recorded in <output>.progress.json only
once flushed to disk; a rerun after a kill continues from the first unfinished block, and the
file gets its final name only when complete. A rerun over the same features does nothing.
Free disk space is checked before starting. You need this file only to read every score: the
neighbour table comes faster from optimized_similarity.py, which needs no matrix.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from paintsim.cli import add_device_arg, int_range, make_parser, memory_size, output_file, run_main
from paintsim.matrix import DTYPES


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="compute_similarity.py", locked=True)
    p.add_argument("--dtype", default="float16", choices=list(DTYPES),
                   help="stored score type: float16 (N*N*2 bytes) or float32 (N*N*4 bytes)")
    p.add_argument("--output", type=output_file, default=None,
                   help="matrix file (default: <data-dir>/similarity_scores.h5)")
    p.add_argument("--block-size", type=int_range(1), default=None,
                   help="rows computed and written per block, the unit of resumption "
                        "(default: from --memory-budget)")
    p.add_argument("--memory-budget", type=memory_size, default=None,
                   help="memory for one block of scores, e.g. 512M or 2G (default: 512 MiB, at most "
                        "a quarter of the memory available)")
    add_device_arg(p)
    return p


def main(args: argparse.Namespace) -> int:
    from paintsim.devices import resolve_device
    from paintsim.embeddings import Embeddings
    from paintsim.matrix import write_matrix

    emb = Embeddings.load(args.data_dir, mmap=False)
    device = resolve_device(args.device)
    out = Path(args.output) if args.output else emb.paths.similarity
    s = write_matrix(emb, out, dtype=args.dtype, block_size=args.block_size, device=device,
                     progress=not args.no_progress, memory_budget=args.memory_budget)
    n = len(emb)
    if s["status"] == "complete":
        print(f"similarity matrix: {out} already complete for these features ({n} x {n}, {args.dtype})")
    else:
        mb = s["rows"] * n * (2 if args.dtype == "float16" else 4) / 2**20
        rate = f", {s['rows'] / s['seconds']:.0f} rows/s, {mb / s['seconds']:.1f} MB/s" if s["seconds"] else ""
        print(f"similarity matrix: {n} x {n} {args.dtype} -> {out} ({s['bytes'] / 2**20:.1f} MiB); "
              f"{s['status']} {s['rows']} rows in {s['seconds']:.1f} s on {device}{rate}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
