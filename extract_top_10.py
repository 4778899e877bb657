#!/usr/bin/env python3
"""Stage 5: each painting's top-k most similar paintings, read from the full similarity matrix.

Reads <data-dir>/similarity_scores.h5 (compute_similarity.py) in row blocks, so memory stays
bounded by one block whatever N is, takes each row's --k best scores excluding the row itself
(descending, ties to the lower index) and writes the neighbour table
<data-dir>/top_{k}_from_matrix.npy (or --output) with its side record top_{k}_from_matrix.json
(route "matrix"): a structured array of N records, fields `index` int32 [k] (rows of
image_names.npy) and `score` float32 [k]. A matrix computed from other features than the current
features.npy is refused. optimized_similarity.py writes the same table, top_{k}_similar.npy,
straight from features.npy without the matrix.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from paintsim.cli import add_k_arg, int_range, make_parser, memory_size, output_file, run_main


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="extract_top_10.py", locked=True)
    add_k_arg(p)
    p.add_argument("--matrix", default=None,
                   help="similarity matrix to read (default: <data-dir>/similarity_scores.h5)")
    p.add_argument("--output", type=output_file, default=None,
                   help="neighbour table to write (default: <data-dir>/top_{k}_from_matrix.npy)")
    p.add_argument("--block-size", type=int_range(1), default=None,
                   help="matrix rows read per block (default: from --memory-budget)")
    p.add_argument("--memory-budget", type=memory_size, default=None,
                   help="memory for one block of rows, e.g. 256M (default: 512 MiB, at most a quarter "
                        "of the memory available)")
    return p


def main(args: argparse.Namespace) -> int:
    from paintsim.embeddings import Embeddings
    from paintsim.errors import UserError
    from paintsim.matrix import MatrixReader, top_k_from_matrix
    from paintsim.neighbours import save_table

    emb = Embeddings.load(args.data_dir)
    matrix = Path(args.matrix) if args.matrix else emb.paths.similarity
    t0 = time.perf_counter()
    with MatrixReader(matrix) as reader:
        stale = reader.stale_reason(emb)
        if stale:
            raise UserError(f"{matrix} is stale: {stale}; rerun compute_similarity.py")
        index, score = top_k_from_matrix(reader, args.k, block_size=args.block_size,
                                         progress=not args.no_progress, memory_budget=args.memory_budget)
        dtype = reader.dtype
    out = Path(args.output) if args.output else emb.paths.neighbors_from_matrix(args.k)
    save_table(out, index, score, route="matrix", features_sha256=emb.sha256,
               matrix=str(matrix), matrix_dtype=dtype)
    print(f"top-{args.k} neighbours of {len(index)} paintings from {matrix} ({dtype}) -> {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
