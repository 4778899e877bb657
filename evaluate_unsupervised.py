#!/usr/bin/env python3
"""Stage 8: judge the embeddings - one report (<data-dir>/evaluation.json), a summary table, plots.

Sections (definitions in docs/evaluation.md):
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
Neighbours come from the table the one lookup finds (see docs/stages.md), else are computed; the
report and the plots name which. Memory stays bounded for the full NGA set: features are
memory-mapped and streamed in blocks.
"""
from __future__ import annotations

import sys

from paintsim.cli import (add_device_arg, add_k_arg, config_from_args, int_range, make_parser, output_file,
                          run_main)


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], prog="evaluate_unsupervised.py", locked=True)
    p.description = __doc__
    add_k_arg(p, default=10)
    p.add_argument("--pairs", type=int_range(1, 100_000_000), default=100_000, help="random pairs for the inter-class similarity")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of every random sample in the report")
    p.add_argument("--label-column", default="attribution",
                   help="relevance for retrieval: same value of this manifest column (or --labels-csv column)")
    p.add_argument("--labels-csv", default=None,
                   help="CSV with objectid and --label-column, joined on objectid (e.g. data/sample/metadata.csv "
                        "with --label-column school)")
    p.add_argument("--copy-sample", type=int_range(1), default=50, help="paintings whose perturbed copies are searched")
    p.add_argument("--pixel-sample", type=int_range(1), default=100, help="queries for the SSIM/RMSE baselines")
    p.add_argument("--pixel-size", type=int_range(11, 1024), default=128, help="side of the greyscale square images compared")
    p.add_argument("--h5-max-rows", type=int_range(1), default=8192,
                   help="rows of similarity_scores.h5 read at most to check the random pairs against it")
    p.add_argument("--skip-copies", action="store_true", help="skip the perturbed-copy section (needs the model)")
    p.add_argument("--skip-pixels", action="store_true", help="skip the SSIM/RMSE baselines")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int_range(1, 1024), default=32, help="images per forward pass when embedding copies")
    p.add_argument("--weights", default=None,
                   help="local state dict for embedding copies instead of the weights in features_meta.json")
    p.add_argument("--output", type=output_file, default=None, help="report path (default: <data-dir>/evaluation.json)")
    p.add_argument("--show", action="store_true", help="also open the plots in windows")
    p.add_argument("--print-report", action="store_true",
                   help="only print the summary table of the existing report (--output); compute nothing")
    return p


def main(args) -> int:
    from pathlib import Path

    from paintsim.artifacts import DataPaths
    from paintsim.evaluation import (EvalConfig, evaluate, read_report, save_figures, summary_table,
                                     write_report)

    paths = DataPaths.of(args.data_dir)
    out = Path(args.output) if args.output else paths.evaluation
    if args.print_report:
        print(summary_table(read_report(out)))
        return 0
    ev = evaluate(args.data_dir, config_from_args(EvalConfig, args))
    figs = save_figures(ev, paths.figures_dir, show=args.show)
    ev.report["figures"] = [str(f) for f in figs]
    write_report(out, ev.report)
    print(summary_table(ev.report))
    print(f"\nreport: {out}\nplots: {', '.join(str(f) for f in figs)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
