#!/usr/bin/env python3
"""Stage 6: each painting's top-k most similar paintings, streamed from features.npy.

Never builds the N x N matrix: tiles of rows are scored against each other (float32 matrix
multiplies, on the GPU when --device allows) and folded into a running top-k per row. Exact: the
neighbours equal a float64 brute force except where scores tie within float32 rounding; ties are
broken by the lower index. The default method uses the symmetry of cosine similarity to compute
each pair once (half the floating-point work of a row-by-row search).

Writes <data-dir>/top_{k}_similar.npy (or --output) and its side record top_{k}_similar.json
(route "streamed"), the same table as extract_top_10.py: N records with fields `index` int32 [k]
(rows of image_names.npy) and `score` float32 [k]. --compare-with TABLE says how far another
route's table (the matrix route's top_{k}_from_matrix.npy) agrees with this one.
Memory: the features plus one tile (--memory-budget or --block-size).
--boost FIELD=W,... re-ranks by metadata as well (final = (1 - mix) x cosine + mix x the summed
weights of the manifest fields two paintings share; exact: enough candidates are scored that no
neighbour can be missed, docs/boost.md) and writes top_{k}_boosted.npy, which later stages read only
when named (evaluate_unsupervised.py --neighbours).
--faces (or --poses) does the same for the faces of extract_faces.py (the poses of
extract_poses.py): every face's nearest faces in other paintings, top_{k}_faces.npy.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from paintsim.cli import add_device_arg, add_k_arg, float_range, int_range, make_parser, memory_size, output_file, run_main
from paintsim.knn import METHODS, PRECISIONS


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="optimized_similarity.py", locked=True)
    add_k_arg(p)
    add_device_arg(p)
    p.add_argument("--output", type=output_file, default=None,
                   help="neighbour table to write (default: <data-dir>/top_{k}_similar.npy)")
    p.add_argument("--block-size", type=int_range(1), default=None,
                   help="rows per tile (a tile is block x 2*block scores); default: from "
                        "--memory-budget, at most 4096 on the CPU and 8192 on CUDA")
    p.add_argument("--memory-budget", type=memory_size, default=None,
                   help="memory for one tile of scores and its scratch, e.g. 256M or 2G (default: "
                        "512 MiB on the CPU, 2 GiB on CUDA, at most a quarter of the memory available)")
    p.add_argument("--method", default="auto", choices=list(METHODS),
                   help="auto = symmetric: each pair computed once (upper-triangle tiles); dense: "
                        "every row block against all rows (twice the flops; the plain reference). "
                        "Both are exact in float32")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="the candidate pass: fp32, or bf16 (then every candidate within the proven "
                        "bf16 error bound is rescored exactly: the same table, bit for bit); auto = "
                        "bf16 where a cached probe measures the bf16 product at least 1.5x faster "
                        "(AMX CPUs, tensor-core GPUs) and the data's error window is narrow, else fp32")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--faces", action="store_true",
                      help="neighbours of every face among the faces of other paintings (top_{k}_faces.npy)")
    kind.add_argument("--poses", action="store_true",
                      help="neighbours of every pose among the poses of other paintings (top_{k}_poses.npy)")
    p.add_argument("--boost", default=None, metavar="FIELD=W[,FIELD=W...]",
                   help="metadata boost, off by default: manifest columns (or decade / century, from "
                        "displaydate) and their weights, e.g. attribution=0.3,medium=0.1; writes "
                        "top_{k}_boosted.npy (paintings only)")
    p.add_argument("--boost-mix", type=float_range(0, 1, lo_open=True), default=0.3,
                   help="weight of the metadata score in the final score (the cosine gets 1 - mix)")
    p.add_argument("--compare-with", default=None, metavar="TABLE",
                   help="another route's neighbour table (e.g. <data-dir>/top_10_from_matrix.npy): "
                        "print how far it agrees with this one")
    return p


def main(args: argparse.Namespace) -> int:
    from paintsim.devices import resolve_device
    from paintsim.embeddings import Embeddings
    from paintsim.knn import top_k_neighbors, top_k_other_groups
    from paintsim.matrix import SCORE_TOLERANCE
    from paintsim.errors import UserError
    from paintsim.neighbours import boosted_path, compare_tables, load_table, save_table

    kind = "faces" if args.faces else "poses" if args.poses else "paintings"
    if args.boost and kind != "paintings":
        raise UserError("--boost re-ranks paintings by their metadata; drop it with --faces / --poses")
    emb = Embeddings.load(args.data_dir, mmap=False, kind=kind)
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    run_stats: dict = {}
    opts = dict(device=device, block_size=args.block_size, progress=not args.no_progress, method=args.method,
                memory_budget=args.memory_budget, precision=args.precision)
    boost_record = None
    if args.boost:
        from paintsim.boost import Boost, boosted_top_k, field_codes

        boost = Boost.parse(args.boost, args.boost_mix)
        codes = field_codes(emb.paths, emb.names, boost)
        index, score, stats = boosted_top_k(emb.features, codes, boost, args.k, device=device,
                                            progress=not args.no_progress)
        boost_record = dict(boost.to_record(), candidates=stats)
    elif kind == "paintings":
        index, score = top_k_neighbors(emb.features, args.k, stats=run_stats, **opts)
    else:  # a face's neighbours are faces of other paintings
        groups = [emb.image_name(i) for i in range(len(emb))]
        index, score = top_k_other_groups(emb.features, groups, args.k, **opts)
    seconds = time.perf_counter() - t0
    if boost_record:
        out = Path(args.output) if args.output else boosted_path(emb.paths, args.k)
        save_table(out, index, score, route="boosted", features_sha256=emb.sha256, boost=boost_record)
        c = boost_record["candidates"]
        print(f"boost {args.boost} (mix {args.boost_mix}): scored {c['mean_candidates']:.1f} candidates per "
              f"painting on average ({c['candidates_beyond_k']:.1f} beyond k, at most {c['max_candidates']}; "
              f"{c['rows_widened']} paintings needed a wider search) - exact")
    else:
        out = Path(args.output) if args.output else emb.paths.neighbors(args.k)
        save_table(out, index, score, route="streamed", features_sha256=emb.sha256, method=args.method,
                   precision=run_stats.get("precision", args.precision), requested_precision=args.precision)
    n = len(index)
    print(f"top-{args.k} neighbours of {n} {kind} ({emb.dim}-d) -> {out} in "
          f"{seconds:.1f} s on {device} ({n / max(seconds, 1e-9):.0f} rows/s"
          + (f", {run_stats['precision']} candidate pass" if run_stats else "") + ")")
    if args.compare_with:
        other = load_table(args.compare_with, n)
        dtype = str(other.record.get("matrix_dtype", "float16"))
        tol = SCORE_TOLERANCE.get(dtype, SCORE_TOLERANCE["float16"])
        c = compare_tables(other, load_table(out, n), emb.features, tol)
        print(f"{other.describe()} vs {out.name}: identical neighbour sets for "
              f"{c['identical_fraction']:.1%} of {c['rows']} paintings; rows differing beyond "
              f"{dtype} near-ties ({tol:g}) at the k-th neighbour: {c['rows_beyond_tolerance']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
