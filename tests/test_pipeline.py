"""The whole pipeline in one command (run_pipeline.sh --sample), end to end, on a slice of the sample."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import REPO

LIMIT = 12  # paintings of the embedded sample the test pipeline runs on


def run_pipeline(data_dir, *args, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, DATA_DIR=str(data_dir), LIMIT=str(LIMIT), NO_PROGRESS="1",
               DEVICE="cpu")
    env.update(env_extra)
    return subprocess.run(["bash", str(REPO / "run_pipeline.sh"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory, mobilenet_weights):
    data = tmp_path_factory.mktemp("pipeline") / "demo"
    proc = run_pipeline(data, "--sample", "--faces")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return data, proc


def test_demo_pipeline_runs_every_stage_end_to_end(demo):
    data, proc = demo
    for n in range(1, 10):
        assert f"=== {n}/9 " in proc.stdout
    names = np.load(data / "image_names.npy")
    feats = np.load(data / "features.npy")
    assert len(names) == LIMIT and feats.shape == (LIMIT, 1280)
    top = np.load(data / "top_10_similar.npy")
    assert top["index"].shape == (LIMIT, 10)
    # matrix route == streamed route, up to float16 near-ties at the k-th neighbour
    assert "rows differing beyond float16 near-ties (0.002) at the k-th neighbour: 0" in proc.stdout
    figs = sorted(p.name for p in (data / "figures").glob("*.png"))
    assert any(f.startswith("similar_row0_") for f in figs)
    assert {"eval_similarity_hist.png", "eval_retrieval.png"} <= set(figs)
    img = np.asarray(Image.open(next((data / "figures").glob("similar_row0_*.png"))).convert("L"))
    assert img.shape == (275 * 2 + 70, 1200) and img.std() > 10  # a three-line heading
    assert f"report:  {data}/evaluation.json" in proc.stdout
    assert proc.stdout.rstrip().endswith(f"explorer: open {data}/site/index.html in a browser (no server needed)")
    assert (data / "site" / "evaluation.html").is_file() and (data / "map_2d.npy").is_file()
    assert (data / "faces.csv").is_file() and (data / "face_features.npy").is_file()
    assert "Faces like face 1 of this painting" in "".join(p.read_text() for p in (data / "site" / "paintings").glob("*.html"))
    assert f"figures: {data}/figures/" in proc.stdout


def test_demo_evaluation_finds_the_perturbed_copies(demo):
    data, proc = demo
    rep = json.loads((data / "evaluation.json").read_text())
    cop = rep["copies"]
    assert cop["n_originals"] == LIMIT and cop["copies_per_original"] == 5
    assert cop["recall@5"] >= 0.8 and cop["precision@1"] >= 0.9
    assert cop["reembedded_original_cosine_min"] > 0.99  # the copies are embedded like the collection
    sim = rep["similarity"]
    assert sim["intra"] > sim["inter"]
    assert sim["matrix_check"]["status"] == "agree"
    assert "perturbed copies" in proc.stdout and "precision @1 / @5 / @10" in proc.stdout


def test_rerun_skips_finished_stages(demo):
    data, _ = demo
    watched = ["features.npy", "similarity_scores.h5", "top_10_similar.npy", "evaluation.json"]
    before = {f: (data / f).stat().st_mtime_ns for f in watched}
    proc = run_pipeline(data, "--sample")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for stage in ("4/9", "5/9", "6/9", "8/9"):
        assert f"=== {stage} " in proc.stdout and proc.stdout.count("up to date, skipped") >= 4
    assert {f: (data / f).stat().st_mtime_ns for f in watched} == before
    assert "intra: mean sim." in proc.stdout  # the summary table is printed again from the report


def test_bad_limit_stops_before_any_stage(tmp_path):
    proc = run_pipeline(tmp_path / "x", "--sample", LIMIT="twelve")
    assert proc.returncode == 2 and "LIMIT must be a whole number" in proc.stderr
    assert not (tmp_path / "x").exists()
    proc = run_pipeline(tmp_path / "x", "--sample", LIMIT="5")
    assert proc.returncode == 2 and "at least 11" in proc.stderr
