#!/usr/bin/env python3
"""Stage 3: embed every downloaded painting with a pretrained torchvision backbone.

Reads <data-dir>/manifest.csv (rows with status ok) or every file of --images-dir, and writes
<data-dir>/features.npy (float32 [N, D], rows L2-normalised), image_names.npy (the file name of each
row), features_meta.json (backbone, weights, preprocessing, versions) and features_errors.csv
(images that could not be read, with the reason). Progress is kept in <data-dir>/features_progress/:
a killed run resumes, and a rerun after new downloads embeds only the new images.

Weights: the backbone's torchvision ImageNet weights, downloaded once into torchvision's cache
($TORCH_HOME/hub/checkpoints). The offline demo uses --backbone mobilenet_v2 (weights shipped by
`make setup-weights`); the documented full run uses the default resnet50.
"""
from __future__ import annotations

import argparse
import sys

from paintsim.backbones import BACKBONES, DEFAULT_BACKBONE
from paintsim.cli import add_device_arg, config_from_args, int_range, make_parser, run_main
from paintsim.embedder import PRECISIONS
from paintsim.extract import DEFAULT_CHUNK_SIZE, ExtractConfig, extract_features


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="extract_features.py", locked=True)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, choices=list(BACKBONES),
                   help="torchvision model whose pooled penultimate feature is the embedding")
    p.add_argument("--weights", default="default",
                   help="'default' (the backbone's torchvision ImageNet weights, downloaded once into "
                        "$TORCH_HOME/hub/checkpoints), another weights name of that backbone (e.g. "
                        "IMAGENET1K_V1), a local state-dict file (loaded with weights_only=True, keys "
                        "matched strictly), or 'none' (random weights: tests only)")
    p.add_argument("--crop", choices=("none", "faces"), default="none",
                   help="faces: embed each painting cropped to the box around its faces (faces.csv of "
                        "extract_faces.py), the whole painting when it has none")
    p.add_argument("--no-crop", action="store_true",
                   help="embed the whole painting letterboxed to the model's square input instead of "
                        "the weights' resize + centre crop")
    p.add_argument("--images-dir", default=None,
                   help="embed every file of this folder instead of the manifest's images")
    p.add_argument("--batch-size", type=int_range(0, 4096), default=0,
                   help="images per forward pass; 0 = auto: 8 on the CPU (smaller batches stay in "
                        "cache and measured fastest, see docs/performance.md), 64 on CUDA")
    p.add_argument("--workers", type=int_range(-1, 64), default=-1,
                   help="DataLoader processes decoding and resizing images (0: in the main process); "
                        "-1 = auto: 1 on the CPU, min(8, CPU cores) on CUDA")
    add_device_arg(p)
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="autocast precision: auto = bf16 (fp16 where bf16 is unsupported) on CUDA, "
                        "fp32 on the CPU")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default None = on, for CUDA and the CPU alike: up to "
                        "1.8x faster on the CPU, see docs/performance.md)")
    p.add_argument("--threads", type=int_range(0, 1024), default=0,
                   help="torch compute threads on the CPU (0: one per CPU core)")
    p.add_argument("--chunk-size", type=int_range(1), default=DEFAULT_CHUNK_SIZE,
                   help="images per progress chunk written to <data-dir>/features_progress/ (a chunk "
                        "closes at the first batch boundary past this count)")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the random weights of --weights none")
    return p


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(ExtractConfig, args)
    s = extract_features(cfg)
    rate = f", {s['images_per_s']} images/s" if s["images_per_s"] else ""
    print(f"features: {s['rows']} x {s['dimension']} ({s['backbone']}, {s['weights']}, {s['preprocessing']}) "
          f"-> {s['features']}; embedded {s['embedded']} new, reused {s['reused']}, skipped {s['errors']} "
          f"unreadable (see features_errors.csv) in {s['seconds']} s on {s['device']}{rate}"
          + (" [already up to date]" if s["up_to_date"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
