#!/usr/bin/env python3
"""Stage 9: the collection explorer, a static web site under <data-dir>/site/.

index.html: every painting in a grid that can be searched by title and artist and filtered by
date range, and a 2-D map of the collection (t-SNE of the features, also kept as map_2d.npy) on
which similar paintings lie near each other. paintings/<key>.html: one page per painting, its image
and metadata, a link to its record at the source, and its --k nearest paintings, each linking to
its own page. evaluation.html: the evaluation report when evaluation.json exists. The site opens
from disk (file://) or from any static web server; nothing loads from the network. A rebuild
rewrites only the pages whose content changed.
"""
from __future__ import annotations

import sys

from paintsim.cli import add_device_arg, add_k_arg, config_from_args, float_range, int_range, make_parser, run_main


def build_parser():
    p = make_parser(__doc__.split("\n\n")[0], prog="explore_collection.py", locked=True)
    p.description = __doc__
    add_k_arg(p, default=10)
    p.add_argument("--map-method", choices=("tsne", "pca"), default="tsne",
                   help="how the features are laid out in 2-D (t-SNE keeps neighbours near; PCA is instant)")
    p.add_argument("--perplexity", type=float_range(1, 1000), default=30.0,
                   help="t-SNE perplexity (lowered automatically for small collections)")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the map and of the random-pair level")
    p.add_argument("--thumb-size", type=int_range(32, 1024), default=256, help="longest edge of a thumbnail (px)")
    p.add_argument("--view-size", type=int_range(0, 4096), default=640,
                   help="longest edge of the image on a painting's page (px; 0: the thumbnail)")
    p.add_argument("--workers", type=int_range(1, 64), default=2, help="threads making thumbnails")
    p.add_argument("--record-column", default=None,
                   help="manifest column holding a link to each painting's record (default: record_url, "
                        "object_url, link, ...; NGA paintings link to nga.gov)")
    add_device_arg(p)
    return p


def main(args) -> int:
    from paintsim.site import SiteConfig, build_site

    summary = build_site(args.data_dir, config_from_args(SiteConfig, args, progress=not args.no_progress))
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
