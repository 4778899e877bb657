#!/usr/bin/env python3
"""Poses: find the people in every painting with Keypoint R-CNN and describe each one's pose.

Reads <data-dir>/manifest.csv (rows with status ok) or every file of --images-dir, and writes
<data-dir>/poses.csv (one row per person scoring above --min-score: box, score and 17 COCO keypoints
with their confidence, in the image's own pixels), pose_features.npy (one L2-normalised 34-number
pose descriptor per person, float32), pose_names.npy (<image file name>#<person index>),
pose_meta.json and poses_errors.csv (images that could not be read). Progress is kept in
<data-dir>/poses_progress/: a killed run resumes, and a rerun after new images detects only in
the new ones. The descriptor and its mirroring rule: docs/poses.md.

Weights: torchvision's KeypointRCNN_ResNet50_FPN_Weights.DEFAULT (COCO, about 226 MB), downloaded
once into torchvision's cache ($TORCH_HOME/hub/checkpoints); --weights for a local state dict;
--random-weights for plumbing and tests only.
"""
from __future__ import annotations

import argparse
import sys

from paintsim.cli import add_device_arg, config_from_args, float_range, int_range, make_parser, run_main
from paintsim.pose_model import DEFAULT_MAX_PERSONS, DEFAULT_MAX_SIZE, DEFAULT_MIN_SCORE
from paintsim.poses import DEFAULT_CHUNK_SIZE, PosesConfig, extract_poses


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="extract_poses.py", locked=True)
    p.add_argument("--images-dir", default=None,
                   help="detect in every file of this folder instead of the manifest's images")
    p.add_argument("--min-score", type=float_range(0.0, 0.999), default=DEFAULT_MIN_SCORE,
                   help="keep persons whose detection score is above this (0.8 suits the COCO weights; "
                        "random weights need 0 to find anyone)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", default=None, metavar="PATH",
                         help="a local state dict of keypointrcnn_resnet50_fpn (loaded with weights_only=True, "
                              "keys matched strictly); by default torchvision's COCO weights, downloaded "
                              "once into $TORCH_HOME/hub/checkpoints")
    weights.add_argument("--random-weights", action="store_true",
                         help="seeded random weights: for plumbing and tests only, the poses mean nothing")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of --random-weights")
    add_device_arg(p)
    p.add_argument("--batch-size", type=int_range(0, 256), default=0,
                   help="images per forward pass; 0 = auto: 1 on the CPU, 8 on CUDA")
    p.add_argument("--max-size", type=int_range(32, 4096), default=DEFAULT_MAX_SIZE,
                   help="longest edge, in pixels, an image is resized to (up or down) before detection; "
                        "boxes and keypoints are mapped back to the image's own pixels")
    p.add_argument("--max-persons", type=int_range(1, 100), default=DEFAULT_MAX_PERSONS,
                   help="most persons kept per image, the highest scores first")
    p.add_argument("--threads", type=int_range(0, 1024), default=0,
                   help="torch compute threads on the CPU (0: one per CPU core)")
    p.add_argument("--chunk-size", type=int_range(1), default=DEFAULT_CHUNK_SIZE,
                   help="images per progress chunk written to <data-dir>/poses_progress/")
    return p


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(PosesConfig, args)
    s = extract_poses(cfg)
    rate = f", {s['images_per_s']} images/s" if s["images_per_s"] else ""
    print(f"poses: {s['poses']} descriptor(s) of {s['persons']} person(s) with score above {s['min_score']:g} "
          f"in {s['images']} image(s) ({s['weights']}) -> {s['poses_csv']}; detected in {s['detected']} new, "
          f"reused {s['reused']}, skipped {s['errors']} unreadable (see poses_errors.csv) in {s['seconds']} s "
          f"on {s['device']}{rate}" + (" [already up to date]" if s["up_to_date"] else ""))
    if s["random_weights"]:
        print("WARNING: random weights: these poses mean nothing (plumbing and tests only)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
