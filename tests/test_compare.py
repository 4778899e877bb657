"""Evaluating a named neighbour table, the circularity guard, and comparing feature sets."""
from __future__ import annotations

import json

import pytest

from helpers import SAMPLE_DIR, run_script
from paintsim.evaluation import EvalConfig, evaluate
from synthetic_collection import make_collection

FAST = ["--skip-copies", "--pixel-sample", "5", "--pairs", "2000", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def boosted(tmp_path_factory):
    root = tmp_path_factory.mktemp("boosted")
    make_collection(root, n_random=40, n_groups=5, copies=3, dim=32, seed=4)
    from paintsim.manifest import read_manifest, write_manifest

    df = read_manifest(root / "manifest.csv")   # six artists of ten paintings each, whatever they look like
    df["attribution"] = [f"Artist {i % 6}" for i in range(len(df))]
    write_manifest(root / "manifest.csv", df)
    run_script("optimized_similarity.py", "--data-dir", root, "--k", "10", "--boost", "attribution=0.5",
               "--boost-mix", "0.5", "--no-progress", "--device", "cpu")
    return root


def test_circularity_guard_refuses_retrieval_on_the_boosted_label(boosted):
    table = boosted / "top_10_boosted.npy"
    asked = run_script("evaluate_unsupervised.py", "--data-dir", boosted, "--neighbours", table,
                       "--label-column", "attribution", *FAST, check=False)
    assert asked.returncode == 2
    assert "--label-column attribution" in asked.stderr and "measures the boost, not the pictures" in asked.stderr
    out = boosted / "default.json"
    run_script("evaluate_unsupervised.py", "--data-dir", boosted, "--neighbours", table, "--output", out, *FAST)
    rep = json.loads(out.read_text())
    assert rep["retrieval"]["status"].startswith("refused: circular")
    assert rep["neighbours_from"] == "top_10_boosted.npy (boosted route)"
    assert rep["neighbours_boost"]["fields"] == {"attribution": 0.5}


def test_allow_circular_computes_retrieval_marked_circular(boosted):
    out = boosted / "circular.json"
    proc = run_script("evaluate_unsupervised.py", "--data-dir", boosted, "--neighbours",
                      boosted / "top_10_boosted.npy", "--allow-circular", "--output", out, *FAST)
    rep = json.loads(out.read_text())
    assert "attribution" in rep["retrieval"]["circular"]
    assert "CIRCULAR" in proc.stdout
    # the boost pulls same-artist paintings up: the circular number beats the plain table's
    plain = evaluate(str(boosted), EvalConfig(skip_copies=True, skip_pixels=True, pairs=2000, progress=False,
                                              device="cpu"))
    assert rep["retrieval"]["precision@10"] > plain.report["retrieval"]["precision@10"]
    # intra is the cosine of the boosted neighbours, not their final score
    assert rep["similarity"]["intra"] <= plain.report["similarity"]["intra"] + 1e-6


def test_neighbours_of_other_features_are_refused(boosted, tmp_path):
    other = tmp_path / "other"
    make_collection(other, n_random=40, n_groups=5, copies=3, dim=32, seed=9)
    proc = run_script("evaluate_unsupervised.py", "--data-dir", other, "--neighbours",
                      boosted / "top_10_boosted.npy", *FAST, check=False)
    assert proc.returncode == 2 and "computed from other features" in proc.stderr


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory, mobilenet_weights):
    """The first 16 paintings of the sample, embedded with MobileNetV2 centre crop (the data dir)
    and letterbox (a feature set beside it)."""
    data = tmp_path_factory.mktemp("compare") / "data"
    run_script("download_images.py", "--data-dir", data, "--csv-dir", SAMPLE_DIR, "--images-from",
               SAMPLE_DIR / "images", "--limit", "16", "--no-progress")
    common = ["--backbone", "mobilenet_v2", "--no-progress", "--device", "cpu"]
    run_script("extract_features.py", "--data-dir", data, *common)
    run_script("extract_features.py", "--data-dir", data, "--output-dir", data / "sets" / "letterbox",
               "--no-crop", *common)
    return data


def test_compare_gives_the_numbers_of_separate_evaluations(two_sets, tmp_path):
    data = two_sets
    args = ["--k", "5", "--copy-sample", "4", "--copy-seeds", "1", "--pixel-sample", "4", "--pairs", "3000",
            "--label-column", "attribution", "--placeholder-labels", ""]
    proc = run_script("evaluate_unsupervised.py", "--data-dir", data, "--compare", data, data / "sets" / "letterbox",
                      *args, "--no-progress", "--device", "cpu")
    comp = json.loads((data / "comparison.json").read_text())
    assert (data / "figures" / "comparison.png").is_file()
    assert [e["name"] for e in comp["entries"]] == ["data", "letterbox"]
    assert [e["preprocessing"] for e in comp["entries"]] == ["center-crop", "letterbox"]
    assert "letterbox" in proc.stdout and "precision@5" in proc.stdout
    cfg = EvalConfig(k=5, copy_sample=4, copy_seeds=1, pixel_sample=4, pairs=3000, label_column="attribution",
                     placeholder_labels="", progress=False, device="cpu", skip_faces=True)
    for entry, features_dir in zip(comp["entries"], (data, data / "sets" / "letterbox")):
        alone = evaluate(str(data), cfg, features_dir=str(features_dir)).report
        for metric in ("precision@1", "precision@5", "mAP@5"):
            if metric in entry["metrics"]:
                assert entry["metrics"][metric]["value"] == alone["retrieval"][metric]
                assert entry["metrics"][metric]["ci95"] == alone["retrieval"]["ci95"][metric]
        for metric in ("precision@1", "recall@5"):
            assert entry["metrics"][f"copies {metric}"]["value"] == alone["copies"][metric]
        assert entry["metrics"]["separation AUC"]["value"] == alone["similarity"]["separation"]["auc"]
        assert entry["metrics"]["intra"]["value"] == alone["similarity"]["intra"]
    paired = comp["paired"]["precision@5"]
    assert paired["n"] > 0 and len(paired["versus"]) == 1
    (other, diff), = paired["versus"].items()
    lo, hi = diff["ci95"]
    assert lo <= diff["difference"] <= hi and diff["exceeds_interval"] == (lo > 0)


def test_compare_refuses_sets_of_other_images(two_sets, tmp_path):
    other = tmp_path / "other"
    make_collection(other, n_random=10, n_groups=1, copies=1, dim=8, with_table=False)
    proc = run_script("evaluate_unsupervised.py", "--data-dir", two_sets, "--compare", two_sets, other, *FAST,
                      check=False)
    assert proc.returncode == 2 and "hold different images" in proc.stderr
    one = run_script("evaluate_unsupervised.py", "--data-dir", two_sets, "--compare", two_sets, *FAST, check=False)
    assert one.returncode == 2 and "two or more" in one.stderr
