#!/usr/bin/env python3
"""Stage 8: judge the embeddings - one report (<data-dir>/evaluation.json), a summary table, plots.

Sections (definitions in the README's evaluation section):
  similarity  intra (mean similarity of each painting to its top-k neighbours) vs inter (mean
              similarity of --pairs random pairs), both from features.npy; checked against
              similarity_scores.h5 when that exists; histogram and separation (AUC, d').
  retrieval   precision@k, recall@k, mAP@k (k = 1, 5, 10) with relevance = same --label-column
              (manifest column, or a column of --labels-csv joined on objectid).
  copies      perturbed copies (crop, rotate, jitter, blur, jpeg) of --copy-sample paintings,
              embedded with the model of features_meta.json, found among collection + copies:
              precision, recall, F1 at k = 1, 3, 5.
  pixels      SSIM and RMSE (greyscale, --pixel-size square) of --pixel-sample queries to their
              neighbours and to random paintings.
Memory stays bounded for the full NGA set: features are memory-mapped and streamed in blocks.
"""
from __future__ import annotations

import sys

from paintsim.cli import UserError, add_device_arg, add_k_arg, make_parser, run_main


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], prog="evaluate_unsupervised.py")
    p.description = __doc__
    add_k_arg(p, default=10)
    p.add_argument("--pairs", type=int, default=100_000, help="random pairs for the inter-class similarity")
    p.add_argument("--seed", type=int, default=0, help="seed of every random sample in the report")
    p.add_argument("--label-column", default="attribution",
                   help="relevance for retrieval: same value of this manifest column (or --labels-csv column)")
    p.add_argument("--labels-csv", default=None,
                   help="CSV with objectid and --label-column, joined on objectid (e.g. data/sample/metadata.csv "
                        "with --label-column school)")
    p.add_argument("--copy-sample", type=int, default=50, help="paintings whose perturbed copies are searched")
    p.add_argument("--pixel-sample", type=int, default=100, help="queries for the SSIM/RMSE baselines")
    p.add_argument("--pixel-size", type=int, default=128, help="side of the greyscale square images compared")
    p.add_argument("--h5-max-rows", type=int, default=8192,
                   help="rows of similarity_scores.h5 read at most to check the random pairs against it")
    p.add_argument("--skip-copies", action="store_true", help="skip the perturbed-copy section (needs the model)")
    p.add_argument("--skip-pixels", action="store_true", help="skip the SSIM/RMSE baselines")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass when embedding copies")
    p.add_argument("--weights", default=None,
                   help="local state dict for embedding copies instead of the weights in features_meta.json")
    p.add_argument("--output", default=None, help="report path (default: <data-dir>/evaluation.json)")
    p.add_argument("--show", action="store_true", help="also open the plots in windows")
    return p


def main(args) -> int:
    from pathlib import Path

    from paintsim.artifacts import DataPaths, write_json_atomic
    from paintsim.evaluate import EvalConfig, evaluate, save_figures, summary_table

    for flag in ("k", "pairs", "copy_sample", "pixel_sample"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.pixel_size < 11:
        raise UserError(f"--pixel-size {args.pixel_size}: SSIM needs at least 11 pixels")
    cfg = EvalConfig(k=args.k, n_pairs=args.pairs, seed=args.seed, label_column=args.label_column,
                     labels_csv=args.labels_csv, copy_sample=args.copy_sample, pixel_sample=args.pixel_sample,
                     pixel_size=args.pixel_size, h5_max_rows=args.h5_max_rows, device=args.device,
                     batch_size=args.batch_size, weights=args.weights, skip_copies=args.skip_copies,
                     skip_pixels=args.skip_pixels, progress=not args.no_progress)
    paths = DataPaths.of(args.data_dir)
    ev = evaluate(args.data_dir, cfg)
    figs = save_figures(ev, paths.figures_dir, show=args.show)
    ev.report["figures"] = [str(f) for f in figs]
    out = Path(args.output) if args.output else paths.evaluation
    write_json_atomic(out, ev.report)
    print(summary_table(ev.report))
    print(f"\nreport: {out}\nplots: {', '.join(str(f) for f in figs)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
