#!/usr/bin/env python3
"""The bf16 quality gate of ``extract_features.py --precision auto`` (paintsim/bf16_gate.py).

Embeds the sample (data/sample: 79 real NGA paintings) with the stage itself
(``paintsim.extract.extract_features`` on ``--images-dir data/sample/images``) twice, with the
backbone's real weights: ``--precision fp32`` and ``--precision bf16`` (autocast, on the CPU).
Then, for each, the exact top-10 neighbour table (``paintsim.knn.top_k_neighbors(features, 10,
precision="fp32")``) and the evaluation's same-artist retrieval (``paintsim.evaluation.retrieval``:
``load_labels`` on data/sample/metadata.csv's ``artist`` joined on the file name, and
``retrieval_section``: precision@5 with its 95 % bootstrap interval over the queries, 1,000
resamples, seed 0, as evaluate_unsupervised.py reports it). The gate passes when

* the mean overlap of the bf16 and fp32 top-10 neighbour sets is >= 0.95, and
* bf16's precision@5 lies inside fp32's 95 % interval.

It also reports the rows' cosine between the two precisions, the exact-order agreement of the
tables, the paired bootstrap interval of the precision@5 difference, and (for information, not
part of the verdict) the same figures for plain bf16 autocast, without the stage's bf16 recipe
(``paintsim.embedder.BF16_RECIPE``: batch norm folded, first convolution in float32).

Writes ``benchmarks/results/bf16_gate_<backbone>.json`` (machine from lscpu, date, command);
``--record`` also writes the verdict into the committed table ``paintsim/bf16_gate.json``, which
``--precision auto`` reads (only with real weights: ``--weights none`` is refused there).

    flock /tmp/paintsim-cpu.lock env -u OPENBLAS_CORETYPE .venv/bin/python benchmarks/check_bf16_extraction.py --record
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TORCH_HOME", str(REPO / ".cache" / "torch"))

from machine_info import stamp  # noqa: E402
from paintsim import artifacts, bf16_gate, metrics  # noqa: E402
from paintsim.artifacts import DataPaths  # noqa: E402
from paintsim.embedder import PLAIN_AUTOCAST, Embedder  # noqa: E402
from paintsim.images import load_rgb  # noqa: E402
from paintsim.evaluation.retrieval import load_labels, retrieval_section  # noqa: E402
from paintsim.extract import ExtractConfig, extract_features  # noqa: E402
from paintsim.knn import top_k_neighbors  # noqa: E402

SAMPLE = REPO / "data" / "sample"


def embed(backbone: str, weights: str, precision: str, images: Path, out: Path, threads: int) -> dict:
    cfg = ExtractConfig(data_dir=str(out), images_dir=str(images), backbone=backbone, weights=weights,
                        device="cpu", precision=precision, threads=threads, workers=0, progress=False)
    t = time.perf_counter()
    summary = extract_features(cfg)
    return {"summary": summary, "seconds": time.perf_counter() - t,
            "features": artifacts.load_npy(out / "features.npy"),
            "names": artifacts.load_npy(out / "image_names.npy"),
            "meta": json.loads((out / "features_meta.json").read_text())}


def gate(backbone: str = "mobilenet_v2", weights: str = "default", images: Path = SAMPLE / "images",
         labels_csv: Path = SAMPLE / "metadata.csv", label_column: str = "artist", k: int = bf16_gate.K,
         n_boot: int = 1000, seed: int = 0, threads: int = 0) -> dict:
    """Measure the gate; returns the result (``passed`` and every figure)."""
    with tempfile.TemporaryDirectory() as tmp:
        runs = {p: embed(backbone, weights, p, images, Path(tmp) / p, threads) for p in ("fp32", "bf16")}
        names = runs["fp32"]["names"]
        if runs["bf16"]["names"].tolist() != names.tolist():
            raise SystemExit("the two runs embedded different images")
        for p, r in runs.items():
            if r["meta"]["precision"] != p:
                raise SystemExit(f"asked for {p}, the stage ran {r['meta']['precision']}")
        codes, label_names, info = load_labels(DataPaths.of(tmp), names, label_column, str(labels_csv), "name")
    # for information: plain autocast (no recipe), the stage's rows reproduced by its Embedder
    plain = Embedder.from_meta(dict(runs["bf16"]["meta"], bf16_recipe=PLAIN_AUTOCAST), device="cpu")
    plain.batch_size = runs["bf16"]["meta"]["batch_size"]
    runs["bf16-plain-autocast"] = {"features": plain.embed([load_rgb(images / n) for n in names])}
    f32, f16 = runs["fp32"]["features"], runs["bf16"]["features"]
    tables = {p: top_k_neighbors(runs[p]["features"], k, precision="fp32") for p in runs}
    i32, i16 = tables["fp32"][0], tables["bf16"][0]

    def overlap_with_fp32(idx):
        return np.array([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(i32, idx)])

    overlap = overlap_with_fp32(i16)
    per_query: dict[str, dict] = {p: {} for p in runs}
    sections = {p: retrieval_section(tables[p][0], codes, label_names, n_boot=n_boot, seed=seed,
                                     per_query_out=per_query[p]) for p in runs}
    fp = runs["bf16-plain-autocast"]["features"]
    plain_info = {"neighbour_overlap_mean": round(float(overlap_with_fp32(tables["bf16-plain-autocast"][0]).mean()), 4),
                  "precision_at_5": round(sections["bf16-plain-autocast"]["precision@5"], 4),
                  "row_cosine_to_fp32_mean": round(float(np.sum(f32.astype(np.float64) * fp, axis=1).mean()), 6),
                  "row_cosine_to_fp32_min": round(float(np.sum(f32.astype(np.float64) * fp, axis=1).min()), 6),
                  "would_pass": bool(overlap_with_fp32(tables["bf16-plain-autocast"][0]).mean() >= bf16_gate.MIN_OVERLAP
                                     and metrics.contains(sections["fp32"]["ci95"]["precision@5"],
                                                          sections["bf16-plain-autocast"]["precision@5"]))}
    p5 = {p: sections[p]["precision@5"] for p in ("fp32", "bf16")}
    ci = sections["fp32"]["ci95"]["precision@5"]
    diff = per_query["bf16"]["precision@5"] - per_query["fp32"]["precision@5"]
    dlo, dhi = metrics.bootstrap_ci(diff[:, None], n_boot=n_boot, seed=seed)
    cos = np.sum(f32.astype(np.float64) * f16.astype(np.float64), axis=1)
    overlap_ok = float(overlap.mean()) >= bf16_gate.MIN_OVERLAP
    p5_ok = metrics.contains(ci, p5["bf16"])
    return {
        "backbone": backbone, "weights": runs["fp32"]["meta"]["weights"].get("id"),
        "random_weights": bool(runs["fp32"]["meta"].get("random_weights")),
        "images": int(len(names)), "k": k, "label": f"{labels_csv.name}:{label_column} joined on the file name",
        "passed": bool(overlap_ok and p5_ok),
        "neighbour_overlap_mean": round(float(overlap.mean()), 4),
        "neighbour_overlap_min": round(float(overlap.min()), 2),
        "rows_with_identical_neighbour_set": int((overlap == 1.0).sum()),
        "tables_identical_in_order": round(float((i32 == i16).all(axis=1).mean()), 4),
        "min_overlap_required": bf16_gate.MIN_OVERLAP,
        "precision_at_5": {"fp32": round(p5["fp32"], 4), "fp32_ci95": [round(v, 4) for v in ci],
                           "bf16": round(p5["bf16"], 4),
                           "bf16_ci95": [round(v, 4) for v in sections["bf16"]["ci95"]["precision@5"]],
                           "bf16_inside_fp32_ci95": bool(p5_ok),
                           "paired_difference_bf16_minus_fp32": round(float(diff.mean()), 4),
                           "paired_difference_ci95": [round(float(dlo[0]), 4), round(float(dhi[0]), 4)],
                           "queries": sections["fp32"]["n_queries"], "chance": round(sections["fp32"]["chance"]["precision@5"], 4),
                           "bootstrap": sections["fp32"]["bootstrap"]},
        "row_cosine_fp32_vs_bf16": {"mean": round(float(cos.mean()), 6), "min": round(float(cos.min()), 6)},
        "labels": {k2: v for k2, v in info.items() if k2 in ("label_source", "images_matched", "unlabelled")},
        "bf16_recipe": runs["bf16"]["meta"].get("bf16_recipe"),
        "plain_autocast_for_information": plain_info,
        "seconds": {p: round(runs[p]["seconds"], 2) for p in ("fp32", "bf16")},
        "precision_meta": {p: runs[p]["meta"].get("precision_choice") for p in ("fp32", "bf16")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="mobilenet_v2")
    p.add_argument("--weights", default="default", help="the backbone's weights (default: its torchvision ImageNet weights)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: one per core)")
    p.add_argument("--output", default=None, help="result JSON (default benchmarks/results/bf16_gate_<backbone>.json)")
    p.add_argument("--record", action="store_true", help="write the verdict into paintsim/bf16_gate.json")
    p.add_argument("--table", default=str(bf16_gate.TABLE), help="the gate table --record writes (default: %(default)s)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("OPENBLAS_CORETYPE"):
        print("warning: OPENBLAS_CORETYPE is set; run with `env -u OPENBLAS_CORETYPE`", file=sys.stderr)
    res = {**stamp(), **gate(args.backbone, args.weights, threads=args.threads)}
    out = Path(args.output or REPO / "benchmarks" / "results" / f"bf16_gate_{args.backbone}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    print(f"\n{args.backbone}: gate {'PASSED' if res['passed'] else 'FAILED'}: overlap "
          f"{res['neighbour_overlap_mean']} (>= {bf16_gate.MIN_OVERLAP}), precision@5 fp32 "
          f"{res['precision_at_5']['fp32']} {res['precision_at_5']['fp32_ci95']} vs bf16 "
          f"{res['precision_at_5']['bf16']} -> {out}")
    if args.record:
        if res["random_weights"]:
            raise SystemExit("--record needs the backbone's real weights: random weights say nothing of quality")
        flags = [f for f, on in res["machine"]["cpu_flags"].items() if on and "bf16" in f]
        entry = {"passed": res["passed"], "bf16_recipe": res["bf16_recipe"], "weights": res["weights"],
                 "images": res["images"],
                 "neighbour_overlap_mean": res["neighbour_overlap_mean"],
                 "precision_at_5": {k: res["precision_at_5"][k] for k in ("fp32", "fp32_ci95", "bf16")},
                 "date": res["date"][:10],
                 "machine": f"{res['machine']['cpu_model_name']} ({', '.join(flags) or 'no native bf16'})",
                 "result": os.path.relpath(out, REPO)}
        print(f"recorded in {bf16_gate.record(args.backbone, entry, args.table)}")


if __name__ == "__main__":
    main()
