#!/usr/bin/env python3
"""Stage 8: judge the embeddings - one report (<data-dir>/evaluation.json), a summary table, plots.

Sections (definitions in docs/evaluation.md):
  similarity  intra (mean similarity of each painting to its top-k neighbours) vs inter (mean
              similarity of --pairs random pairs), both from features.npy; checked against
              similarity_scores.h5 when that exists; histogram and separation (AUC, d').
  retrieval   precision@k, recall@k, mAP@k (k = 1, 5, 10) with relevance = same --label-column
              (manifest column, or a column of --labels-csv joined on --labels-on); placeholder
              labels ("Unknown", "Anonymous", ...) count as unknown.
  copies      perturbed copies (crop, rotate, jitter, blur, jpeg) of --copy-sample paintings,
              embedded with the model of features_meta.json, found among collection + copies:
              precision, recall, F1 at k = 1, 3, 5; repeated over --copy-seeds seeds.
  pixels      SSIM and RMSE (greyscale, --pixel-size square) of --pixel-sample queries to their
              neighbours and to random paintings.
Every retrieval and copy metric has a 95% bootstrap interval over the queries and its chance level
(a random ranking); one whose interval contains chance is marked "~ chance".
A section asked for by a flag (--label-column, --labels-csv, --copy-sample, --copy-seeds,
--pixel-sample) that cannot run stops the run (exit 2); left at its defaults it is reported as
skipped.
Neighbours come from the table the one lookup finds (see docs/stages.md), else are computed; the
report and the plots name which. Memory stays bounded for the full NGA set: features are
memory-mapped and streamed in blocks.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from paintsim.cli import (add_device_arg, add_k_arg, config_from_args, int_range, make_parser, output_file,
                          run_main)


def _default(value) -> str:
    """Help suffix of a flag parsed as None when absent (so a section the user asked for can be told
    from a default one) that shows its real default; "%(default).0s" prints nothing but keeps
    argparse from adding "(default: None)"."""
    return f" (default: {value})%(default).0s"


def build_parser():
    from paintsim.evaluation.retrieval import PLACEHOLDER_LABELS
    from paintsim.evaluation.run import DEFAULTS

    p = make_parser(__doc__.split("\n\n")[0], prog="evaluate_unsupervised.py", locked=True)
    p.description = __doc__
    add_k_arg(p, default=10)
    p.add_argument("--pairs", type=int_range(1, 100_000_000), default=100_000, help="random pairs for the inter-class similarity")
    p.add_argument("--seed", type=int_range(0), default=0,
                   help="seed of every random sample in the report (and of the bootstrap)")
    p.add_argument("--label-column", default=None,
                   help="relevance for retrieval: same value of this manifest column, extra columns included (or "
                        "--labels-csv column)" + _default(DEFAULTS["label_column"]))
    p.add_argument("--labels-csv", default=None,
                   help="CSV with --labels-on and --label-column, joined on --labels-on (e.g. data/sample/metadata.csv "
                        "with --label-column school)")
    p.add_argument("--labels-on", default=None,
                   help="column of --labels-csv and of the manifest to join on, or 'name': the image file name "
                        "(the CSV's 'name' or 'file' column; needs no manifest)" + _default(DEFAULTS["labels_on"]))
    p.add_argument("--placeholder-labels", default=None,
                   help="comma-separated labels that mean unknown (compared ignoring case and extra spaces); "
                        "replaces the built-in list; '' leaves none out"
                        + _default(", ".join(PLACEHOLDER_LABELS)))
    p.add_argument("--bootstrap", dest="n_boot", type=int_range(100, 100_000), default=1000,
                   help="bootstrap resamples of the queries for the 95%% intervals")
    p.add_argument("--copy-sample", type=int_range(1), default=None,
                   help="paintings whose perturbed copies are searched" + _default(DEFAULTS["copy_sample"]))
    p.add_argument("--copy-seeds", type=int_range(1, 100), default=None,
                   help="repeat the copy experiment with seeds --seed, --seed + 1, ... and report the spread"
                        + _default(DEFAULTS["copy_seeds"]))
    p.add_argument("--pixel-sample", type=int_range(1), default=None,
                   help="queries for the SSIM/RMSE baselines" + _default(DEFAULTS["pixel_sample"]))
    p.add_argument("--pixel-size", type=int_range(11, 1024), default=128, help="side of the greyscale square images compared")
    p.add_argument("--h5-max-rows", type=int_range(1), default=8192,
                   help="rows of similarity_scores.h5 read at most to check the random pairs against it")
    p.add_argument("--skip-copies", action="store_true", help="skip the perturbed-copy section (needs the model)")
    p.add_argument("--skip-pixels", action="store_true", help="skip the SSIM/RMSE baselines")
    p.add_argument("--skip-faces", action="store_true",
                   help="skip the faces section (it runs when extract_faces.py has written face_features.npy)")
    p.add_argument("--neighbours", default=None, metavar="TABLE",
                   help="evaluate this neighbour table (e.g. <data-dir>/top_10_boosted.npy) instead of the one "
                        "the lookup finds (docs/stages.md); it must come from the current features")
    p.add_argument("--compare", nargs="+", default=None, metavar="SET",
                   help="compare feature sets (folders of extract_features.py --output-dir, or the data dir) "
                        "and neighbour tables (.npy, e.g. a boosted one) of this collection on the same queries "
                        "and seeds: writes <data-dir>/comparison.json (or --output) and figures/comparison.png "
                        "(faces are left out)")
    p.add_argument("--allow-circular", action="store_true",
                   help="compute retrieval even on a label the --neighbours table was boosted by, marked "
                        "circular (by default it is refused: it would measure the boost, not the pictures)")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int_range(1, 1024), default=32, help="images per forward pass when embedding copies")
    p.add_argument("--weights", default=None,
                   help="local state dict for embedding copies instead of the weights in features_meta.json")
    p.add_argument("--output", type=output_file, default=None, help="report path (default: <data-dir>/evaluation.json)")
    p.add_argument("--figures-prefix", default=None,
                   help="the plots are PREFIXsimilarity_hist.png and PREFIXretrieval.png (a folder ending in / "
                        "gets eval_)" + _default("beside --output, named after it: runs/a.json -> runs/a_*.png; "
                                                 "without --output <data-dir>/figures/eval_"))
    p.add_argument("--show", action="store_true", help="also open the plots in windows")
    p.add_argument("--print-report", action="store_true",
                   help="only print the summary table of the existing report (--output); compute nothing")
    return p


def figures_prefix(args, report_path: Path) -> Path:
    """Where the plots go: --figures-prefix, else beside --output with its stem, else figures/eval_."""
    from paintsim.artifacts import DataPaths

    if args.figures_prefix:
        if args.figures_prefix.endswith(("/", os.sep)) or Path(args.figures_prefix).is_dir():
            return Path(args.figures_prefix) / "eval_"
        return Path(args.figures_prefix)
    if args.output:
        return Path(report_path).parent / f"{Path(report_path).stem}_"
    return DataPaths.of(args.data_dir).figures_dir / "eval_"


def main(args) -> int:
    from paintsim.artifacts import DataPaths
    from paintsim.evaluation import (EvalConfig, evaluate, read_report, save_figures, summary_table,
                                     write_report)

    paths = DataPaths.of(args.data_dir)
    out = Path(args.output) if args.output else paths.evaluation
    if args.print_report:
        print(summary_table(read_report(out)))
        return 0
    if args.compare:
        return compare_main(args, paths)
    ev = evaluate(args.data_dir, config_from_args(EvalConfig, args))
    figs = save_figures(ev, figures_prefix(args, out), show=args.show)
    ev.report["figures"] = [str(f) for f in figs]
    write_report(out, ev.report)
    print(summary_table(ev.report))
    print(f"\nreport: {out}\nplots: {', '.join(str(f) for f in figs)}")
    return 0


def compare_main(args, paths) -> int:
    from paintsim.errors import UserError
    from paintsim.evaluation import EvalConfig
    from paintsim.evaluation.compare import (compare, comparison_table, read_comparison,
                                             save_comparison_figure, write_comparison)

    out = Path(args.output) if args.output else paths.root / "comparison.json"
    if args.print_report:
        print(comparison_table(read_comparison(out)))
        return 0
    if args.neighbours:
        raise UserError("--neighbours and --compare: name the tables in --compare instead")
    comparison = compare(args.data_dir, args.compare, config_from_args(EvalConfig, args))
    fig_path = (Path(args.output).with_suffix(".png") if args.output else paths.figures_dir / "comparison.png")
    fig = save_comparison_figure(comparison, fig_path, show=args.show)
    comparison["figure"] = str(fig)
    write_comparison(out, comparison)
    print(comparison_table(comparison))
    print(f"\ncomparison: {out}\nplot: {fig}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
