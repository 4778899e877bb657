#!/usr/bin/env python3
"""Stage 5: each painting's top-k most similar paintings, read from the full similarity matrix.

Reads <data-dir>/similarity_scores.h5 (compute_similarity.py) in row blocks, so memory stays
bounded by one block whatever N is, takes each row's --k best scores excluding the row itself
(descending, ties to the lower index) and writes the neighbour table <data-dir>/top_{k}_similar.npy
(or --output): a structured array of N records, fields `index` int32 [k] (rows of
image_names.npy) and `score` float32 [k]. optimized_similarity.py writes the same table straight
from features.npy without the matrix.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from paintsim.artifacts import DataPaths, load_npy, save_neighbors
from paintsim.cli import UserError, add_k_arg, make_parser, run_main
from paintsim.knn import parse_memory
from paintsim.matrix import top_k_from_matrix

log = logging.getLogger("paintsim")


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="extract_top_10.py")
    add_k_arg(p)
    p.add_argument("--matrix", default=None,
                   help="similarity matrix to read (default: <data-dir>/similarity_scores.h5)")
    p.add_argument("--output", default=None,
                   help="neighbour table to write (default: <data-dir>/top_{k}_similar.npy)")
    p.add_argument("--block-size", type=int, default=None,
                   help="matrix rows read per block (default: from --memory-budget)")
    p.add_argument("--memory-budget", type=parse_memory, default=None,
                   help="memory for one block of rows, e.g. 256M (default: 512 MiB, at most a quarter "
                        "of the memory available)")
    return p


def main(args: argparse.Namespace) -> int:
    import time

    paths = DataPaths.of(args.data_dir)
    matrix = Path(args.matrix) if args.matrix else paths.similarity
    if args.block_size is not None and args.block_size < 1:
        raise UserError(f"--block-size must be at least 1, got {args.block_size}")
    t0 = time.perf_counter()
    index, score, names, attrs = top_k_from_matrix(matrix, args.k, block_size=args.block_size,
                                                   progress=not args.no_progress,
                                                   memory_budget=args.memory_budget)
    if paths.image_names.exists():
        current = load_npy(paths.image_names)
        if len(current) != len(names) or not np.array_equal(current.astype(str), names):
            raise UserError(f"{matrix} was computed for other images than {paths.image_names} "
                            "(names differ); rerun compute_similarity.py")
    out = Path(args.output) if args.output else paths.neighbors(args.k)
    save_neighbors(out, index, score)
    print(f"top-{args.k} neighbours of {len(index)} paintings from {matrix} "
          f"({attrs.get('dtype', '?')}) -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
