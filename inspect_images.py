#!/usr/bin/env python3
"""Stage 2: inspect what download_images.py produced: counts per status, failure reasons, image sizes,
unreadable files, exact duplicates, and a contact sheet of random paintings (<data-dir>/figures/).
The report is printed and written to <data-dir>/inspection.json.
"""
from __future__ import annotations

import argparse
import sys

from paintsim.cli import make_parser, run_main


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="inspect_images.py")
    p.add_argument("--n", type=int, default=24, help="images on the contact sheet (0: no sheet)")
    p.add_argument("--seed", type=int, default=0, help="random seed choosing the contact sheet's images")
    p.add_argument("--workers", type=int, default=4, help="threads decoding and hashing images")
    p.add_argument("--output", default=None,
                   help="contact sheet PNG path (default: <data-dir>/figures/contact_sheet.png)")
    p.add_argument("--show", action="store_true", help="open the contact sheet in a window")
    return p


def main(args: argparse.Namespace) -> int:
    from paintsim.cli import UserError
    from paintsim.inspection import format_report, inspect_data

    if args.n < 0:
        raise UserError(f"--n must be >= 0, got {args.n}")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    try:
        report = inspect_data(args.data_dir, sheet_size=args.n, seed=args.seed, workers=args.workers,
                              output=args.output, show=args.show, progress=not args.no_progress)
    except ValueError as exc:  # a manifest without the contract's columns
        raise UserError(str(exc)) from exc
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
