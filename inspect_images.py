#!/usr/bin/env python3
"""Stage 2: inspect what download_images.py produced: counts per status, failure reasons, image sizes,
unreadable files, exact duplicates, and a contact sheet of random paintings (<data-dir>/figures/).
The report is printed and written to <data-dir>/inspection.json. A collection without a manifest
(extract_features.py --images-dir) is inspected from its folder: --images-dir, or the folder
recorded in features_meta.json.
"""
from __future__ import annotations

import argparse
import sys

from paintsim.cli import int_range, make_parser, output_file, run_main


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="inspect_images.py", locked=True)
    p.add_argument("--n", type=int_range(0, 1000), default=24, help="images on the contact sheet (0: no sheet)")
    p.add_argument("--seed", type=int_range(0), default=0, help="random seed choosing the contact sheet's images")
    p.add_argument("--workers", type=int_range(1, 64), default=4, help="threads decoding and hashing images")
    p.add_argument("--output", type=output_file, default=None,
                   help="contact sheet PNG path (default: <data-dir>/figures/contact_sheet.png)")
    p.add_argument("--show", action="store_true", help="open the contact sheet in a window")
    p.add_argument("--images-dir", default=None,
                   help="inspect every file of this folder instead of the manifest (default: the manifest, "
                        "else the folder features_meta.json names)")
    return p


def main(args: argparse.Namespace) -> int:
    from paintsim.inspection import format_report, inspect_data

    report = inspect_data(args.data_dir, sheet_size=args.n, seed=args.seed, workers=args.workers,
                          output=args.output, show=args.show, progress=not args.no_progress,
                          images_dir=args.images_dir)
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
