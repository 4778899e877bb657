#!/usr/bin/env python3
"""Stage 1: bring a collection's images into <data-dir>/images and write <data-dir>/manifest.csv.

NGA (default): reads NGA's open-data tables (published_images.csv, objects.csv) from --csv-dir,
fetching them from github.com/NationalGalleryOfArt/opendata when absent, and downloads the
paintings over IIIF (or copies them from --images-from, files named <uuid> or <objectid>).
Your own collection: --images-from DIR --metadata CSV (the CSV names each image in --id-column),
or --urls CSV (image URLs or IIIF image-service bases in --url-column). Title, artist, date and
medium columns are found by common names or named by flags; every other column is kept.
Reruns skip valid files and retry failures. Offline demo: --csv-dir data/sample --images-from
data/sample/images.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from paintsim.cli import config_from_args, float_range, int_range, make_parser, run_main
from paintsim.fetch import FetchConfig, default_user_agent
from paintsim.nga import NGA_TABLES_URL

#: Largest image edge one may ask NGA's IIIF server for (its full-size images are a few thousand px).
MAX_SIZE = 8192


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="download_images.py", locked=True)
    p.add_argument("--csv-dir", type=Path, default=None,
                   help="directory with published_images.csv and objects.csv (default: <data-dir>/nga, "
                        "fetched from NGA's open-data repository when missing)")
    p.add_argument("--tables-url", default=NGA_TABLES_URL, help="where missing tables are fetched from")
    p.add_argument("--size", type=int_range(1, MAX_SIZE), default=512,
                   help="longest image edge to ask the IIIF server for (never beyond the row's maxpixels)")
    p.add_argument("--workers", type=int_range(1, 64), default=4,
                   help="parallel downloads (the server is one host: stay polite)")
    p.add_argument("--max-rate", type=float_range(0), default=0.0,
                   help="at most this many requests per second over all workers (0: no limit)")
    p.add_argument("--limit", type=int_range(0), default=None, help="download only the first N selected images")
    p.add_argument("--sample", type=int_range(0), default=None, help="a reproducible random subset of N images")
    p.add_argument("--seed", type=int_range(0), default=0, help="random seed for --sample")
    p.add_argument("--all-views", action="store_true",
                   help="keep alternate views too (default: the primary view of each painting)")
    p.add_argument("--images-from", type=Path, default=None,
                   help="take images from this directory instead of HTTP: with --metadata, the images "
                        "of your own collection (any format; subfolders too); without, NGA images named "
                        "<uuid>.jpg or <objectid>.jpg")
    own = p.add_argument_group("your own collection (docs/collections.md)")
    own.add_argument("--metadata", type=Path, default=None,
                     help="CSV (or .tsv) describing the images of --images-from, one row per image")
    own.add_argument("--urls", type=Path, default=None,
                     help="CSV of image URLs or IIIF image-service bases (one row per image), fetched "
                          "like NGA's images")
    own.add_argument("--id-column", default=None,
                     help="column naming each row's image: with --metadata its file name, stem or path in "
                          "the folder (default: file, filename, image, path...); with --urls an id used for "
                          "the file name (default: id, identifier, objectid... when unique, else a hash of the URL)")
    own.add_argument("--url-column", default=None,
                     help="--urls: the column holding the URL (default: url, image_url, iiif...)")
    own.add_argument("--url-kind", choices=("auto", "image", "iiif"), default="auto",
                     help="--urls: image links, IIIF image-service bases (asked for --size), or auto "
                          "(a URL ending in /info.json is a IIIF base)")
    own.add_argument("--title-column", default=None, help="column of titles (default: title)")
    own.add_argument("--artist-column", default=None,
                     help="column of artists (default: attribution, artist, creator, author, maker...)")
    own.add_argument("--date-column", default=None, help="column of dates (default: displaydate, date, year...)")
    own.add_argument("--medium-column", default=None, help="column of media (default: medium, technique...)")
    p.add_argument("--connect-timeout", type=float_range(0, lo_open=True), default=10.0, help="seconds to wait for a connection")
    p.add_argument("--read-timeout", type=float_range(0, lo_open=True), default=60.0, help="seconds to wait for data")
    p.add_argument("--max-retries", type=int_range(0, 100), default=5,
                   help="retries on HTTP 429/5xx, timeouts, dropped connections and cut bodies")
    p.add_argument("--backoff", type=float_range(0), default=1.0,
                   help="retry delay in seconds: the first retry is immediate, the n-th waits "
                        "backoff x 2**(n-1) plus up to backoff of jitter")
    p.add_argument("--deadline", type=float_range(0), default=600.0,
                   help="seconds one image may take in all, retries included (0: no limit)")
    p.add_argument("--max-retry-after", dest="retry_after_max", metavar="SECONDS", type=float_range(0),
                   default=300.0,
                   help="cap in seconds on a server's Retry-After")
    p.add_argument("--user-agent", default=default_user_agent(), help="User-Agent sent with every request")
    p.add_argument("--ignore-robots-txt", action="store_true",
                   help="do not read the image host's robots.txt (by default its rules and Crawl-delay "
                        "are obeyed)")
    p.add_argument("--checkpoint-every", type=float_range(0, lo_open=True), default=30.0,
                   help="seconds between manifest checkpoints during the run")
    return p


def _terminate(signum, frame):  # `kill` stops the run like Ctrl-C: manifest of the finished work written
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    from paintsim.download import DownloadOptions, run_download

    signal.signal(signal.SIGTERM, _terminate)

    opts = config_from_args(DownloadOptions, args, data_dir=Path(args.data_dir),
                            fetch=config_from_args(FetchConfig, args))
    summary = run_download(opts)
    print(summary.text())
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
