"""evaluate_unsupervised.py / paintsim.evaluation on a collection with planted structure."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import run_script
from paintsim import evaluation as evaluate
from paintsim.errors import UserError
from synthetic_collection import make_collection


@pytest.fixture()
def planted(tmp_path):
    return make_collection(tmp_path / "data")


def _cfg(**kw):
    base = dict(skip_copies=True, pixel_sample=30, progress=False, pairs=2000)
    base.update(kw)
    return evaluate.EvalConfig(**base)


def test_planted_copies_are_found_by_every_metric(planted):
    rep = evaluate.evaluate(str(planted["root"]), _cfg()).report
    assert rep["neighbours_from"] == "top_10_similar.npy (streamed route)"
    ret = rep["retrieval"]
    # 5 groups of 4 share an artist; the 60 random paintings have artists of their own
    assert ret["n_queries"] == 20
    assert ret["precision@1"] == 1.0
    assert ret["recall@5"] == 1.0 and ret["recall@10"] == 1.0
    assert ret["precision@5"] == pytest.approx(3 / 5)
    assert ret["mAP@1"] == ret["mAP@5"] == ret["mAP@10"] == 1.0
    assert ret["random_precision"] == pytest.approx(3 / 79)
    sim = rep["similarity"]
    assert sim["inter"] == pytest.approx(0.0, abs=0.03)  # random 64-d directions
    assert sim["intra"] > sim["inter"] + 0.2
    assert sim["separation"]["auc"] > 0.9
    assert sim["table_vs_features_max_abs_diff"] < 1e-5
    pix = rep["pixels"]
    assert pix["ssim_neighbours"] > pix["ssim_random"]
    assert pix["rmse_neighbours"] < pix["rmse_random"]


def test_inter_is_not_the_mean_of_the_neighbour_table(planted):
    # An earlier project reported the mean of the top-k table as "inter". Here that number is far above
    # the true random-pair mean, and the report's inter is the true one.
    rep = evaluate.evaluate(str(planted["root"]), _cfg(skip_pixels=True)).report
    table_mean = float(planted["score"].mean())
    assert table_mean > 0.25
    assert rep["similarity"]["inter"] < table_mean - 0.2
    f = planted["features"].astype(np.float64)
    all_pairs = (f @ f.T)[np.triu_indices(len(f), 1)].mean()
    assert rep["similarity"]["inter"] == pytest.approx(all_pairs, abs=0.01)


def _write_matrix(root, feats, names, chunk_rows=16, scale=1.0, complete=True):
    with h5py.File(root / "similarity_scores.h5", "w") as f:
        f.create_dataset("similarity", data=(scale * (feats @ feats.T)).astype(np.float16),
                              chunks=(chunk_rows, len(feats)))
        f.create_dataset("image_names", data=names.astype("S"))
        f.attrs["complete"] = complete


def test_inter_from_the_full_matrix_agrees_with_the_features(planted):
    _write_matrix(planted["root"], planted["features"], planted["names"])
    mc = evaluate.evaluate(str(planted["root"]), _cfg(skip_pixels=True, h5_max_rows=32)).report[
        "similarity"]["matrix_check"]
    assert mc["status"] == "agree"
    assert 0 < mc["pairs_compared"] < 2000 and mc["rows_read"] == 32  # bounded: two 16-row chunks
    assert mc["inter_from_matrix"] == pytest.approx(mc["inter_from_features_same_pairs"], abs=1e-3)
    assert mc["max_abs_diff"] < 2e-3


def test_a_wrong_stale_or_incomplete_matrix_is_not_trusted(planted):
    root = planted["root"]
    _write_matrix(root, planted["features"], planted["names"], scale=0.9)
    assert evaluate.evaluate(str(root), _cfg(skip_pixels=True)).report["similarity"]["matrix_check"][
        "status"] == "DISAGREE"
    _write_matrix(root, planted["features"], planted["names"][::-1])
    mc = evaluate.evaluate(str(root), _cfg(skip_pixels=True)).report["similarity"]["matrix_check"]
    assert mc["status"] == "skipped" and "stale" in mc["reason"]
    _write_matrix(root, planted["features"], planted["names"], complete=False)
    mc = evaluate.evaluate(str(root), _cfg(skip_pixels=True)).report["similarity"]["matrix_check"]
    assert mc["status"] == "skipped" and "not complete" in mc["reason"]


def test_labels_from_another_csv_joined_on_objectid(planted, tmp_path):
    # school: planted groups 0-2 share one school, the rest are unknown
    groups = planted["group_of"]
    school = np.where(np.isin(groups, [0, 1, 2]), "Sienese", "")
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"objectid": planted["objectids"], "school": school}).to_csv(csv, index=False)
    rep = evaluate.evaluate(str(planted["root"]), _cfg(skip_pixels=True, label_column="school",
                                                       labels_csv=str(csv))).report
    ret = rep["retrieval"]
    assert ret["n_queries"] == 12 and ret["unlabelled"] == 68
    assert ret["precision@1"] == 1.0 and ret["precision@5"] == pytest.approx(3 / 5)
    with pytest.raises(UserError, match="'style'"):
        evaluate.evaluate(str(planted["root"]), _cfg(label_column="style", labels_csv=str(csv)))
    with pytest.raises(UserError, match="not a column of"):
        evaluate.evaluate(str(planted["root"]), _cfg(label_column="school"))


def test_evaluate_script_writes_report_table_and_plots(planted):
    root = planted["root"]
    proc = run_script("evaluate_unsupervised.py", "--data-dir", root, "--skip-copies", "--pairs", "5000",
                      "--pixel-sample", "10", "--no-progress")
    rep = json.loads((root / "evaluation.json").read_text())
    assert set(rep) >= {"similarity", "retrieval", "copies", "pixels", "figures"}
    assert "precision @1 / @5 / @10" in proc.stdout and "1.000 / 0.600 / 0.300" in proc.stdout
    for name in ("eval_similarity_hist.png", "eval_retrieval.png"):
        img = np.asarray(Image.open(root / "figures" / name).convert("L"), dtype=float)
        assert img.shape == (450, 800)
        assert img.std() > 10 and (img < 128).mean() > 0.005  # drawn on, not blank


def test_bad_flags_and_missing_inputs_fail_clearly(tmp_path, planted):
    proc = run_script("evaluate_unsupervised.py", "--data-dir", planted["root"], "--k", "0", check=False)
    assert proc.returncode == 2 and "argument --k: must be at least 1, got 0" in proc.stderr
    proc = run_script("evaluate_unsupervised.py", "--data-dir", planted["root"], "--k", "80",
                      "--skip-copies", check=False)
    assert proc.returncode == 2 and "--k 80: must be between 1 and 79" in proc.stderr
    proc = run_script("evaluate_unsupervised.py", "--data-dir", tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "features.npy does not exist" in proc.stderr


def test_plots_follow_output_and_two_runs_keep_their_own(planted, tmp_path):
    root = planted["root"]
    runs = tmp_path / "runs"
    a, b = runs / "a.json", runs / "b.json"
    common = ["--data-dir", root, "--skip-copies", "--pixel-sample", "5", "--pairs", "2000", "--no-progress"]
    run_script("evaluate_unsupervised.py", *common, "--output", a)
    a_bars = (runs / "a_retrieval.png").read_bytes()
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"objectid": planted["objectids"],
                  "school": np.where(np.isin(planted["group_of"], [0, 1, 2]), "Sienese", "")}).to_csv(csv, index=False)
    proc = run_script("evaluate_unsupervised.py", *common, "--output", b, "--labels-csv", csv, "--label-column", "school")
    assert f"plots: {runs / 'b_similarity_hist.png'}, {runs / 'b_retrieval.png'}" in proc.stdout
    for report, stem in ((a, "a"), (b, "b")):
        figs = [runs / f"{stem}_similarity_hist.png", runs / f"{stem}_retrieval.png"]
        assert json.loads(report.read_text())["figures"] == [str(f) for f in figs]
        for f in figs:
            assert np.asarray(Image.open(f).convert("L")).shape == (450, 800)
    assert (runs / "a_retrieval.png").read_bytes() == a_bars != (runs / "b_retrieval.png").read_bytes()
    assert not (root / "figures").exists()  # the default place is used only without --output
    run_script("evaluate_unsupervised.py", *common, "--output", runs / "c.json", "--figures-prefix",
               tmp_path / "figs" / "c-")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["c-retrieval.png", "c-similarity_hist.png"]


def test_metric_bars_draw_intervals_and_chance(tmp_path):
    from paintsim import figures

    groups = {"artist @5": {"precision": 0.3, "recall": 0.5}, "copies @5": {"precision": 0.9, "recall": 0.9}}
    plain = figures.metric_bars(groups, tmp_path / "plain.png")
    ci = {g: {m: (v - 0.1, v + 0.05) for m, v in ms.items()} for g, ms in groups.items()}
    chance = {g: {m: 0.2 for m in ms} for g, ms in groups.items()}
    full = figures.metric_bars(groups, tmp_path / "full.png", intervals=ci, chance=chance)
    a = np.asarray(Image.open(plain).convert("L"), dtype=float)
    b = np.asarray(Image.open(full).convert("L"), dtype=float)
    assert a.shape == b.shape == (450, 800)
    # error bars and chance ticks are black marks the plain chart does not have
    assert (b < 40).sum() > (a < 40).sum() + 200


def test_retrieval_report_keeps_flat_keys_and_adds_intervals_and_chance(planted):
    ret = evaluate.evaluate(str(planted["root"]), _cfg(skip_pixels=True)).report["retrieval"]
    names = [f"{m}@{k}" for k in (1, 5, 10) for m in ("precision", "recall", "mAP")]
    assert set(ret["ci95"]) == set(ret["chance"]) == set(names)
    for m in names:
        lo, hi = ret["ci95"][m]
        assert lo <= ret[m] <= hi
    assert ret["ci95"]["precision@5"] == [pytest.approx(0.6), pytest.approx(0.6)]  # every query 3 of 5
    # R = 3 of N - 1 = 79 for every query: chance = 3/79; recall@k k/79; mAP@k the exact expectation
    assert ret["chance"]["precision@10"] == pytest.approx(3 / 79)
    assert ret["chance"]["recall@5"] == pytest.approx(5 / 79)
    h5 = sum(1 / i for i in range(1, 6))
    assert ret["chance"]["mAP@5"] == pytest.approx(3 / (79 * 3) * (h5 + 2 / 78 * (5 - h5)))
    assert ret["indistinguishable_from_chance"] == []


@pytest.fixture(scope="module")
def real_small(tmp_path_factory, mobilenet_weights):
    """Ten sample paintings embedded with the real MobileNetV2 from a folder of one's own."""
    import shutil

    from helpers import SAMPLE_DIR

    root = tmp_path_factory.mktemp("real_small")
    scans = root / "scans"
    scans.mkdir()
    for p in sorted((SAMPLE_DIR / "images").glob("*.jpg"))[:10]:
        shutil.copyfile(p, scans / p.name)
    run_script("extract_features.py", "--data-dir", root / "data", "--images-dir", scans, "--backbone",
               "mobilenet_v2", "--no-progress", "--device", "cpu")
    return root


def test_copies_report_intervals_chance_and_spread_over_seeds(real_small):
    data, out = real_small / "data", real_small / "out" / "two_seeds.json"
    proc = run_script("evaluate_unsupervised.py", "--data-dir", data, "--k", "3", "--copy-sample", "3",
                      "--copy-seeds", "2", "--skip-pixels", "--device", "cpu", "--no-progress", "--output", out)
    cop = json.loads(out.read_text())["copies"]
    assert cop["n_originals"] == 3 and cop["seeds"] == [0, 1]
    names = [f"{m}@{k}" for k in (1, 3, 5) for m in ("precision", "recall", "f1")]
    assert set(cop["per_seed"]) == set(cop["spread"]) == set(cop["ci95"]) == set(cop["chance"]) == set(names)
    m = cop["searched_among"]
    assert m == 9 + 15  # the collection but the original, and every copy
    for k in (1, 3, 5):
        assert cop["chance"][f"precision@{k}"] == pytest.approx(5 / m)
        assert cop["chance"][f"recall@{k}"] == pytest.approx(k / m)
        assert cop["chance"][f"f1@{k}"] == pytest.approx(2 * k * 5 / (m * (k + 5)))
    for name in names:
        s, per_seed = cop["spread"][name], cop["per_seed"][name]
        assert per_seed[0] == cop[name] and len(per_seed) == 2  # the first seed's numbers are the report's
        assert s["min"] <= s["mean"] <= s["max"] and s["std"] == pytest.approx(np.std(per_seed, ddof=1))
        assert cop["ci95"][name][0] <= cop[name] <= cop["ci95"][name][1]
    assert cop["bootstrap"]["resampled"] == "originals"
    assert "2 seeds (0-1): mean ± sd [min, max]" in proc.stdout


def test_asked_for_copies_that_cannot_run_exit_2_defaults_are_skipped(real_small, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(real_small / "data", data)
    shutil.move(real_small / "scans", tmp_path / "moved")  # the images the features came from are gone
    try:
        proc = run_script("evaluate_unsupervised.py", "--data-dir", data, "--k", "3", "--copy-sample", "3",
                          "--copy-seeds", "1", "--skip-pixels", "--device", "cpu", "--no-progress", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--copy-sample 3: the perturbed-copy section cannot run: no sampled image could be read" in proc.stderr
        proc = run_script("evaluate_unsupervised.py", "--data-dir", data, "--k", "3", "--pixel-sample", "3",
                          "--skip-copies", "--no-progress", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--pixel-sample 3: the pixel baselines cannot run: no sampled pair of images" in proc.stderr
        proc = run_script("evaluate_unsupervised.py", "--data-dir", data, "--k", "3", "--skip-pixels",
                          "--device", "cpu", "--no-progress")
        assert json.loads((data / "evaluation.json").read_text())["copies"]["status"] == (
            "skipped: no sampled image could be read")
    finally:
        shutil.move(tmp_path / "moved", real_small / "scans")
