#!/usr/bin/env python3
"""Face stage speed on the CPU: extract_faces.py end to end against the detector alone.

    env -u OPENBLAS_CORETYPE python benchmarks/bench_faces.py --data-dir data/demo
    env -u OPENBLAS_CORETYPE python benchmarks/bench_faces.py --data-dir data/demo --repeat 10

Measures, on the data dir's images (the demo: the 79 sample paintings, at most 200 px):
  * naive: facenet-pytorch's MTCNN called once per image, as earlier projects did;
  * detector: paintsim.faces.Detector on images already decoded in memory, batches of 16
    (equal sizes batched together, the pyramid capped at --max-size);
  * stage: extract_faces.py as a child process on a copy of the data dir (decode, detect, crop,
    embed with the collection's backbone, write), from nothing.
``--repeat R`` looks at every image R times (hard links under new names for the stage), so the
stage's fixed start-up cost (imports, model loading) is spread over R times the images, as it is
over a real collection of thousands.
Prints images/s and faces/s of each and the stage / detector ratio as one JSON line, stamped with
the machine, and saves it as ``benchmarks/results/faces_n<images>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", type=Path, default=REPO / "data" / "demo")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="look at every image this many times")
    a = ap.parse_args()
    from facenet_pytorch import MTCNN

    from paintsim.embeddings import Embeddings
    from paintsim.faces import Detector
    from paintsim.images import load_rgb

    emb = Embeddings.load(a.data_dir)
    paths = [emb.image_path(i) for i in range(len(emb))]
    images = [load_rgb(p) for p in paths] * a.repeat
    out: dict = {"images": len(images), "repeat": a.repeat}

    naive = MTCNN(keep_all=True, device="cpu")
    t0 = time.perf_counter()
    n_naive = sum(0 if b is None else int((p >= 0.9).sum()) for b, p in (naive.detect(im) for im in images))
    out["naive"] = {"seconds": round(time.perf_counter() - t0, 2), "faces": n_naive}

    det = Detector(device="cpu")
    t0 = time.perf_counter()
    n_det = sum(len(f) for s in range(0, len(images), a.batch_size) for f in det.detect(images[s:s + a.batch_size]))
    out["detector"] = {"seconds": round(time.perf_counter() - t0, 2), "faces": n_det}

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "data"
        d.mkdir()
        for f in ("features.npy", "image_names.npy", "features_meta.json", "manifest.csv"):
            shutil.copyfile(a.data_dir / f, d / f)
        (d / "images").mkdir()
        for r in range(a.repeat):
            for p in paths:
                try:
                    os.link(p, d / "images" / f"r{r}_{p.name}")
                except OSError:  # another file system
                    shutil.copyfile(p, d / "images" / f"r{r}_{p.name}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, str(REPO / "extract_faces.py"), "--data-dir", str(d), "--no-progress",
                        "--images-dir", str(d / "images"), "--device", "cpu", "--batch-size", str(a.batch_size)],
                       check=True, capture_output=True)
        out["stage"] = {"seconds": round(time.perf_counter() - t0, 2), "faces": n_det}
    for key in ("naive", "detector", "stage"):
        s = out[key]["seconds"]
        out[key].update(images_per_s=round(len(images) / s, 2), faces_per_s=round(out[key]["faces"] / s, 2))
    out["stage_over_detector"] = round(out["detector"]["seconds"] / out["stage"]["seconds"], 2)
    from machine_info import stamp

    out.update(stamp())
    print(json.dumps(out))
    dest = REPO / "benchmarks" / "results" / f"faces_n{len(images)}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
