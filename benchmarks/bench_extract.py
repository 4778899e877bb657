#!/usr/bin/env python3
"""Feature extraction throughput on this machine: end to end vs the model-alone floor vs naive.

For each backbone (resnet50 and mobilenet_v2 by default; random weights, since speed does not
depend on the values) it measures, side by side in one process:

* floor: the model alone (normalise + forward + L2) on uint8 batches already in memory, for each
  thread count / memory layout tried; the best is the floor;
* end to end: ``paintsim.extract.extract_features`` on a folder of ~512 px JPEGs (decode, resize,
  crop in DataLoader workers, model, progress chunks), for several workers x threads settings;
* naive: one image at a time, PIL decode + transform in the main loop, batch of one.

Ratios are reported against the floor. ``--compare-crop`` instead measures, with the real
MobileNetV2 weights on data/sample, centre crop vs --no-crop (perturbed-copy recovery and
same-artist precision@5).

``--compare-precision`` measures the stage end to end with ``--precision auto`` against
``--precision fp32`` (resnet50 and mobilenet_v2, random weights, the stage's CPU defaults: batch 8,
auto workers, one thread per core, channels_last), interleaved and paired, as a ratio; beside it
the model-alone floor of each precision (what end to end could reach), both precisions with other
worker/thread splits, the one-time cost of auto's probe, and the decode + preprocess cost per image
(with what PIL's JPEG draft mode, a smaller decode, would save; the stage does not use it, since it
changes the pixels). Results JSON with the machine (lscpu), date and command:
    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/bench_extract.py --compare-precision --output benchmarks/results/extract_precision.json

Run under the shared CPU lock and without the environment's OpenBLAS override:
    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/bench_extract.py
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from paintsim.embedder import Embedder  # noqa: E402
from paintsim.extract import ExtractConfig, extract_features  # noqa: E402
from paintsim.images import load_rgb  # noqa: E402

SAMPLE = REPO / "data" / "sample"


def make_inputs(directory: Path, n: int, size: int = 512) -> list[Path]:
    """``n`` realistic JPEGs: the sample paintings upscaled to ``size`` px on the long side, q=90."""
    srcs = sorted((SAMPLE / "images").glob("*.jpg"))
    out = []
    for i in range(n):
        img = load_rgb(srcs[i % len(srcs)])
        w, h = img.size
        s = size / max(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        p = directory / f"img{i:05d}.jpg"
        img.save(p, quality=90)
        out.append(p)
    return out


def floor(emb: Embedder, n: int, batch: int, threads: int, channels_last: bool, repeats: int = 2) -> float:
    torch.set_num_threads(threads)
    emb.channels_last = channels_last
    emb.model = emb.model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    emb._bf16_model = None   # the bf16 copy is rebuilt in this layout on first use
    s = emb.preprocessing.crop_size
    x = torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8)
    emb.embed_uint8(x)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        done = 0
        while done < n:
            emb.embed_uint8(x)
            done += batch
        best = max(best, done / (time.perf_counter() - t))
    return best


def end_to_end(backbone: str, images_dir: Path, batch: int, workers: int, threads: int,
               channels_last: bool | None, precision: str = "fp32", details: dict | None = None) -> float:
    with tempfile.TemporaryDirectory() as d:
        cfg = ExtractConfig(data_dir=d, images_dir=str(images_dir), backbone=backbone, weights="none",
                            batch_size=batch, workers=workers, device="cpu", precision=precision,
                            channels_last=channels_last, threads=threads, progress=False)
        t = time.perf_counter()
        summary = extract_features(cfg)
        if details is not None:
            meta = json.loads((Path(d) / "features_meta.json").read_text())
            details.update(precision=meta["precision"], choice=meta.get("precision_choice"),
                           workers=meta["workers"], wall_s=time.perf_counter() - t, loop_s=summary["seconds"])
    return float(summary["images_per_s"])


def naive(emb: Embedder, paths: list[Path], threads: int) -> float:
    torch.set_num_threads(threads)
    emb.embed([load_rgb(paths[0])])
    t = time.perf_counter()
    for p in paths:
        emb.embed([load_rgb(p)])
    return len(paths) / (time.perf_counter() - t)


def run_speed(args) -> dict:
    logging.basicConfig(level=logging.ERROR)
    cores = os.cpu_count() or 1
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {cores} cores, "
                                f"torch {torch.__version__}, CPU capability "
                                f"{torch.backends.cpu.get_cpu_capability()}",
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
                     "repeats": args.repeats, "statistic": "best of repeats (the machine is shared)",
                     "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for backbone in args.backbones:
            n = args.images if args.images else (64 if backbone == "resnet50" else 192)
            img_dir = Path(tmp) / backbone
            img_dir.mkdir()
            paths = make_inputs(img_dir, n, args.size)
            emb = Embedder.create(backbone, weights="none", device="cpu", precision="fp32", progress=False)
            r: dict = {"images": n, "floor": {}, "end_to_end": {}}
            for bs in args.batch_sizes:
                for threads in sorted({1, cores}):
                    for cl in (False, True):
                        v = max(floor(emb, n, bs, threads, cl, repeats=1) for _ in range(args.repeats))
                        key = f"batch={bs} threads={threads} channels_last={cl}"
                        r["floor"][key] = round(v, 2)
                        print(f"{backbone} floor {key}: {v:.1f} img/s", flush=True)
            best_key = max(r["floor"], key=r["floor"].get)
            fl = r["floor"][best_key]
            r["floor_best"] = {"config": best_key, "images_per_s": fl}
            bs = int(best_key.split()[0].split("=")[1])
            best_cl = "channels_last=True" in best_key
            configs = [(0, cores), (1, cores), (1, max(1, cores - 1)), (2, cores)]
            runs: dict = {c: [] for c in configs}
            ratios: dict = {c: [] for c in configs}
            best_threads = int(best_key.split()[1].split("=")[1])
            for _ in range(args.repeats):
                # interleaved: each end-to-end run is paired with a floor run just before it, so a
                # noisy minute on this shared machine hits both sides of the ratio alike
                for workers, threads in configs:
                    f = floor(emb, n, bs, best_threads, best_cl, repeats=1)
                    v = end_to_end(backbone, img_dir, bs, workers, threads, best_cl)
                    runs[(workers, threads)].append(v)
                    ratios[(workers, threads)].append(v / f)
            for (workers, threads), vals in runs.items():
                key = f"batch={bs} workers={workers} threads={threads} channels_last={best_cl}"
                med = float(np.median(ratios[(workers, threads)]))
                r["end_to_end"][key] = {"images_per_s_best": round(max(vals), 2),
                                        "images_per_s_runs": [round(x, 2) for x in vals],
                                        "ratio_to_paired_floor_median": round(med, 3),
                                        "ratios_to_paired_floor": [round(x, 3) for x in ratios[(workers, threads)]]}
                print(f"{backbone} end-to-end {key}: best {max(vals):.1f} img/s, median ratio to the paired "
                      f"floor {med:.2f}x (runs {[round(x, 1) for x in vals]}, ratios "
                      f"{[round(x, 2) for x in ratios[(workers, threads)]]})", flush=True)
            torch.set_num_threads(cores)
            emb.channels_last = best_cl
            v = max(naive(emb, paths[: max(8, n // 4)], cores) for _ in range(args.repeats))
            r["naive"] = round(v, 2)
            print(f"{backbone} naive (batch 1, PIL in the main loop, threads={cores}): {v:.1f} img/s "
                  f"({v / fl:.2f}x floor)", flush=True)
            best_e2e = max(r["end_to_end"], key=lambda k: r["end_to_end"][k]["ratio_to_paired_floor_median"])
            default = f"batch={bs} workers=1 threads={cores} channels_last={best_cl}"
            r["summary"] = {"floor_best_images_per_s": fl, "best_end_to_end": best_e2e,
                            "best_end_to_end_median_ratio": r["end_to_end"][best_e2e]["ratio_to_paired_floor_median"],
                            "default_config": default,
                            "default_median_ratio": r["end_to_end"].get(default, {}).get("ratio_to_paired_floor_median"),
                            "naive_images_per_s": v, "naive_ratio_to_best_floor": round(v / fl, 3)}
            results["backbones"][backbone] = r
    return results


def run_crop_compare(args) -> dict:
    """Centre crop vs letterbox on the real sample, real MobileNetV2 weights."""
    import csv

    from paintsim.perturb import perturb

    meta = {row["file"].split("/")[-1]: row["artist"] for row in csv.DictReader(open(SAMPLE / "metadata.csv"))}
    files = sorted((SAMPLE / "images").glob("*.jpg"))
    imgs = [load_rgb(f) for f in files]
    artists = np.array([meta.get(f.name, "") for f in files])
    n = len(files)
    out: dict = {"images": n, "backbone": "mobilenet_v2 (MobileNet_V2_Weights.IMAGENET1K_V1)", "modes": {}}
    for no_crop in (False, True):
        emb = Embedder.create("mobilenet_v2", no_crop=no_crop, device="cpu", precision="fp32")
        O = emb.embed(imgs)
        so = O @ O.T
        np.fill_diagonal(so, -2)
        # same-artist precision@5 over paintings whose artist has another painting in the sample
        top5 = np.argsort(-so, axis=1)[:, :5]
        has_peer = np.array([(artists == a).sum() > 1 for a in artists])
        p5 = float(np.mean([(artists[top5[i]] == artists[i]).mean() for i in range(n) if has_peer[i]]))
        copy_top1, mutual = [], []
        for seed in range(args.seeds):
            rng = np.random.default_rng(seed)
            E = emb.embed([perturb(im, "combo", rng) for im in imgs])
            s = E @ O.T
            copy_top1.append(float(np.mean(s.argmax(1) == np.arange(n))))
            mutual.append(float(np.mean((s.argmax(1) == np.arange(n)) & (np.diag(s) > so.max(1)))))
        mode = "letterbox (--no-crop)" if no_crop else "center-crop (default)"
        out["modes"][mode] = {"same_artist_precision_at_5": round(p5, 3),
                              "paintings_with_same_artist_peer": int(has_peer.sum()),
                              "copy_to_original_top1": round(float(np.mean(copy_top1)), 4),
                              "mutual_nearest_neighbour": round(float(np.mean(mutual)), 4),
                              "seeds": args.seeds}
        print(mode, json.dumps(out["modes"][mode]), flush=True)
    return out


def decode_cost(paths: list[Path], emb: Embedder, repeats: int) -> dict:
    """Core-ms per image of what the DataLoader workers do (read + decode + resize + crop), and the
    same with PIL's JPEG draft mode (DCT-domain downscaling to at least the resize size)."""
    from paintsim.images import decode_rgb

    pre = emb.preprocessing

    def full(p: Path):
        return pre(decode_rgb(p.read_bytes(), str(p)))

    def draft(p: Path):
        import io

        img = Image.open(io.BytesIO(p.read_bytes()))
        img.draft("RGB", (pre.resize_size, pre.resize_size))
        return pre(img.convert("RGB"))

    out = {}
    for name, fn in (("decode_preprocess_ms", full), ("with_jpeg_draft_ms", draft)):
        best = float("inf")
        for _ in range(repeats):
            t = time.process_time()
            for p in paths:
                fn(p)
            best = min(best, (time.process_time() - t) / len(paths) * 1e3)
        out[name] = round(best, 2)
    return out


def run_precision_compare(args) -> dict:
    """End to end --precision auto vs fp32, paired, with the floors and the decode cost beside it."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine_info import stamp

    from paintsim import precision as probes

    logging.basicConfig(level=logging.ERROR)
    cores = os.cpu_count() or 1
    res: dict = {**stamp(), "repeats": args.repeats, "batch": 8, "threads": cores,
                 "statistic": "end to end: each auto run paired with the fp32 run just before it; ratio = "
                              "median of the pairs. floor: best of repeats",
                 "backbones": {}}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[probes.ENV_CACHE] = str(Path(tmp) / "probe-cache")   # auto probes once, here
        probes.clear_memo()
        for backbone in args.backbones:
            n = args.images or (96 if backbone == "resnet50" else 256)
            img_dir = Path(tmp) / backbone
            img_dir.mkdir()
            paths = make_inputs(img_dir, n, args.size)
            r: dict = {"images": n, "image_long_side_px": args.size}
            # auto's one-time cost: the probe, timed inside Embedder.create with an empty cache
            t = time.perf_counter()
            emb_auto = Embedder.create(backbone, weights="none", device="cpu", precision="auto", batch_size=8,
                                       progress=False)
            t_auto = time.perf_counter() - t
            t = time.perf_counter()
            emb = Embedder.create(backbone, weights="none", device="cpu", precision="fp32", batch_size=8,
                                  progress=False)
            t_fp32 = time.perf_counter() - t
            r["auto_resolves_to"] = emb_auto.precision
            r["probe"] = emb_auto.precision_choice.get("probe")
            r["probe_one_time_cost_s"] = round(t_auto - t_fp32, 2)
            del emb_auto
            torch.set_num_threads(cores)
            floors = {}
            for prec in ("fp32", "bf16"):
                emb.precision = prec
                floors[prec] = round(max(floor(emb, min(n, 64), 8, cores, True, repeats=1)
                                         for _ in range(args.repeats)), 2)
            emb.precision = "fp32"
            r["floor_images_per_s"] = floors
            r["floor_ratio_bf16_to_fp32"] = round(floors["bf16"] / floors["fp32"], 3)
            r["decode"] = decode_cost(paths[:32], emb, args.repeats)
            ms = 1e3 / floors["bf16"] * cores     # core-ms per image of the bf16 model on all cores
            r["decode_share_of_cpu_work_bf16"] = round(r["decode"]["decode_preprocess_ms"]
                                                       / (r["decode"]["decode_preprocess_ms"] + ms), 3)
            pairs, autos, fp32s, detail = [], [], [], {}
            for _ in range(args.repeats):
                f = end_to_end(backbone, img_dir, 8, -1, cores, None, "fp32")
                a = end_to_end(backbone, img_dir, 8, -1, cores, None, "auto", detail)
                fp32s.append(f)
                autos.append(a)
                pairs.append(a / f)
                print(f"{backbone}: end to end fp32 {f:.1f} img/s, auto ({detail['precision']}) {a:.1f} img/s, "
                      f"{a / f:.2f}x", flush=True)
            r["end_to_end"] = {"config": f"batch 8, workers auto (= {detail.get('workers')}), threads {cores}, "
                                         "channels_last (the defaults)",
                               "fp32_images_per_s_runs": [round(x, 2) for x in fp32s],
                               "auto_images_per_s_runs": [round(x, 2) for x in autos],
                               "auto_precision": detail.get("precision"),
                               "ratio_auto_to_fp32_pairs": [round(x, 3) for x in pairs],
                               "ratio_auto_to_fp32_median": round(float(np.median(pairs)), 3),
                               "auto_to_its_floor": round(float(np.median(autos)) / floors[detail.get("precision", "fp32")], 3),
                               "fp32_to_its_floor": round(float(np.median(fp32s)) / floors["fp32"], 3)}
            splits = {}
            for prec, workers, threads in [("auto", 1, cores), ("fp32", 1, cores), ("auto", 2, cores),
                                           ("auto", 1, max(1, cores - 1))]:
                vals = [end_to_end(backbone, img_dir, 8, workers, threads, None, prec) for _ in range(args.repeats)]
                key = f"{prec} workers={workers} threads={threads}"
                splits[key] = {"images_per_s_median": round(float(np.median(vals)), 2),
                               "runs": [round(x, 2) for x in vals]}
                print(f"{backbone}: end to end {key}: {np.median(vals):.1f} img/s", flush=True)
            r["other_splits"] = splits
            res["backbones"][backbone] = r
            print(json.dumps({k: v for k, v in r.items() if k != "probe"}), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["resnet50", "mobilenet_v2"])
    p.add_argument("--images", type=int, default=0, help="images per backbone (0: 64 resnet50, 192 others)")
    p.add_argument("--size", type=int, default=512, help="long side of the benchmark JPEGs")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 32], help="batch sizes tried for the floor")
    p.add_argument("--repeats", type=int, default=3, help="runs per configuration (floor: best; end to end: median ratio to a paired floor run)")
    p.add_argument("--compare-crop", action="store_true", help="measure centre crop vs --no-crop instead")
    p.add_argument("--compare-precision", action="store_true",
                   help="measure end to end --precision auto vs fp32 (with floors and decode cost) instead")
    p.add_argument("--seeds", type=int, default=5, help="perturbation seeds for --compare-crop")
    p.add_argument("--output", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if os.environ.get("OPENBLAS_CORETYPE"):
        print("warning: OPENBLAS_CORETYPE is set; run with `env -u OPENBLAS_CORETYPE`", file=sys.stderr)
    if args.compare_precision:
        res = run_precision_compare(args)
    else:
        res = run_crop_compare(args) if args.compare_crop else run_speed(args)
    print(json.dumps(res, indent=2))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
