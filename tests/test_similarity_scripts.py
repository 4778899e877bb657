"""compute_similarity.py, extract_top_10.py and optimized_similarity.py run as a user runs them."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from helpers import REPO, run_script
from paintsim.neighbours import load_table
from reference import brute_force_float64


def make_data_dir(path: Path, n: int, d: int, seed: int = 0, meta: dict | None = None,
                  duplicates: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if duplicates:
        x[n // 2] = x[1]          # an exact duplicate pair
        x[n - 1] = x[2]
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "features.npy", x)
    np.save(path / "image_names.npy", np.array([f"{i:05d}.jpg" for i in range(n)]))
    if meta is not None:
        (path / "features_meta.json").write_text(json.dumps(meta))
    return x


def near_tie_only(x: np.ndarray, index: np.ndarray, ref_index: np.ndarray, ref_score: np.ndarray,
                  tol: float) -> None:
    """Every neighbour differing from the reference scores within ``tol`` of the reference's."""
    x = x.astype(np.float64)
    for r, c in np.argwhere(index != ref_index):
        assert abs(x[r] @ x[index[r, c]] - ref_score[r, c]) <= tol, (r, c)


def test_both_routes_agree_with_brute_force_and_each_other(tmp_path):
    x = make_data_dir(tmp_path, 301, 32, meta={"backbone": "resnet50", "dimension": 32})
    k = 7
    ref_i, ref_s = brute_force_float64(x, k)
    run_script("optimized_similarity.py", "--data-dir", tmp_path, "--k", k, "--block-size", 64,
               "--no-progress")
    raw = np.load(tmp_path / f"top_{k}_similar.npy", allow_pickle=False)
    assert raw.dtype.names == ("index", "score") and raw.shape == (301,)
    streamed = load_table(tmp_path / f"top_{k}_similar.npy", 301)
    assert streamed.route == "streamed" and streamed.record["k"] == k
    np.testing.assert_allclose(streamed.score, ref_s, atol=1e-5)
    near_tie_only(x, streamed.index, ref_i, ref_s, 1e-5)
    assert streamed.index[1, 0] == 150 and streamed.index[150, 0] == 1  # the duplicate pair

    # float32 matrix: the very same table
    run_script("compute_similarity.py", "--data-dir", tmp_path, "--dtype", "float32",
               "--output", tmp_path / "m32.h5", "--block-size", 50, "--no-progress")
    run_script("extract_top_10.py", "--data-dir", tmp_path, "--k", k, "--matrix", tmp_path / "m32.h5",
               "--output", tmp_path / "from32.npy", "--block-size", 33, "--no-progress")
    from32 = load_table(tmp_path / "from32.npy", 301)
    assert from32.route == "matrix" and from32.record["matrix_dtype"] == "float32"
    near_tie_only(x, from32.index, ref_i, ref_s, 1e-6)  # float32 rounding may order exact ties
    np.testing.assert_allclose(from32.score, streamed.score, atol=1e-6)

    # float16 matrix (the default): scores within float16 rounding, neighbours except near-ties
    run_script("compute_similarity.py", "--data-dir", tmp_path, "--block-size", 64, "--no-progress")
    proc = run_script("extract_top_10.py", "--data-dir", tmp_path, "--k", k, "--output",
                      tmp_path / "from16.npy", "--no-progress")
    assert "from16.npy" in proc.stdout
    from16 = np.load(tmp_path / "from16.npy", allow_pickle=False)
    assert np.abs(from16["score"] - ref_s).max() <= 2.0**-11  # half an ulp of float16 below 1
    near_tie_only(x, from16["index"], ref_i, ref_s, 2.0**-10)
    assert (from16["index"] != np.arange(301)[:, None]).all()

    with h5py.File(tmp_path / "similarity_scores.h5", "r") as f:
        dset = f["similarity"]
        assert dset.shape == (301, 301) and dset.dtype == np.float16
        assert dset.chunks[1] == 301  # bands of whole rows
        assert [n.decode() for n in f["image_names"][:2]] == ["00000.jpg", "00001.jpg"]
        assert bool(f.attrs["complete"]) and f.attrs["n"] == 301
        assert json.loads(f.attrs["features_meta"])["backbone"] == "resnet50"
        np.testing.assert_allclose(dset[5, :].astype(np.float64), x[5] @ x.T.astype(np.float64),
                                   atol=2.0**-11)


def test_rerun_skips_a_complete_matrix_and_redoes_it_for_new_features(tmp_path):
    make_data_dir(tmp_path, 40, 8)
    run_script("compute_similarity.py", "--data-dir", tmp_path, "--no-progress")
    matrix = tmp_path / "similarity_scores.h5"
    before = matrix.stat().st_mtime_ns
    assert "already complete" in run_script("compute_similarity.py", "--data-dir", tmp_path).stdout
    assert matrix.stat().st_mtime_ns == before
    x = make_data_dir(tmp_path, 40, 8, seed=1)
    run_script("compute_similarity.py", "--data-dir", tmp_path, "--no-progress")
    with h5py.File(matrix, "r") as f:
        np.testing.assert_allclose(f["similarity"][3].astype(np.float64), x[3] @ x.T.astype(np.float64),
                                   atol=2.0**-11)


def test_kill_9_mid_run_then_rerun_gives_the_identical_file(tmp_path):
    n = 450
    make_data_dir(tmp_path / "a", n, 16, seed=7, meta={"backbone": "x"})
    make_data_dir(tmp_path / "b", n, 16, seed=7, meta={"backbone": "x"})
    args = ["--block-size", "1", "--no-progress"]
    matrix = tmp_path / "a" / "similarity_scores.h5"
    partial = tmp_path / "a" / "similarity_scores.h5.partial"
    state = tmp_path / "a" / "similarity_scores.h5.progress.json"
    proc = subprocess.Popen([sys.executable, str(REPO / "compute_similarity.py"),
                             "--data-dir", str(tmp_path / "a"), *args], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                done = json.loads(state.read_text())["rows_done"]
            except (FileNotFoundError, ValueError, KeyError):
                done = 0
            if done >= 80:
                break
            assert proc.poll() is None, "finished before it could be killed: use more rows"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not matrix.exists() and partial.exists(), "an unfinished matrix must not get the final name"
    killed_at = json.loads(state.read_text())["rows_done"]
    assert 80 <= killed_at < n

    bad = run_script("extract_top_10.py", "--data-dir", tmp_path / "a", check=False)
    assert bad.returncode == 2 and "unfinished run" in bad.stderr

    resumed = run_script("compute_similarity.py", "--data-dir", tmp_path / "a", "--block-size", "1")
    assert "resumed" in resumed.stdout and f"{n - killed_at} rows" in resumed.stdout
    assert matrix.exists() and not partial.exists() and not state.exists()
    run_script("compute_similarity.py", "--data-dir", tmp_path / "b", *args)
    other = tmp_path / "b" / "similarity_scores.h5"
    with h5py.File(matrix, "r") as fa, h5py.File(other, "r") as fb:
        np.testing.assert_array_equal(fa["similarity"][...], fb["similarity"][...])
        np.testing.assert_array_equal(fa["image_names"][...], fb["image_names"][...])
        attrs_a = {k: v for k, v in fa.attrs.items() if k not in ("source", "run_id")}
        attrs_b = {k: v for k, v in fb.attrs.items() if k not in ("source", "run_id")}
        assert attrs_a.keys() == attrs_b.keys()
        assert all(np.array_equal(attrs_a[k], attrs_b[k]) for k in attrs_a)


def test_not_enough_disk_space_stops_before_writing(tmp_path):
    # 2**20 one-dimensional unit vectors: a float16 matrix of 2 TiB, more than this disk holds
    n = 2**20
    np.save(tmp_path / "features.npy", np.where(np.arange(n) % 2, 1.0, -1.0).astype(np.float32)[:, None])
    np.save(tmp_path / "image_names.npy", np.array([f"{i}.jpg" for i in range(n)]))
    proc = run_script("compute_similarity.py", "--data-dir", tmp_path, check=False)
    assert proc.returncode == 2
    assert "not enough disk space" in proc.stderr
    assert re.search(r"needs 2048\.\d\d GiB .* has only [\d.]+ GiB free", proc.stderr), proc.stderr
    assert not list(tmp_path.glob("similarity_scores*"))


def test_bad_inputs_exit_2_with_a_clear_message(tmp_path):
    x = make_data_dir(tmp_path, 30, 4)
    x[[4, 9]] = np.nan
    np.save(tmp_path / "features.npy", x)
    for script in ("optimized_similarity.py", "compute_similarity.py"):
        proc = run_script(script, "--data-dir", tmp_path, check=False)
        assert proc.returncode == 2 and "rows 4, 9" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
    make_data_dir(tmp_path, 30, 4)
    np.save(tmp_path / "image_names.npy", np.array(["a.jpg"] * 29))
    proc = run_script("optimized_similarity.py", "--data-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "29 name(s)" in proc.stderr and "30 feature rows" in proc.stderr
    make_data_dir(tmp_path, 30, 4)
    proc = run_script("optimized_similarity.py", "--data-dir", tmp_path, "--k", "30", check=False)
    assert proc.returncode == 2 and "--k 30: must be between 1 and 29" in proc.stderr
    proc = run_script("extract_top_10.py", "--data-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "run compute_similarity.py first" in proc.stderr
    proc = run_script("optimized_similarity.py", "--data-dir", tmp_path / "nothing", check=False)
    assert proc.returncode == 2 and "features.npy does not exist" in proc.stderr


def test_help_shows_every_flag_with_its_default():
    for script in ("compute_similarity.py", "extract_top_10.py", "optimized_similarity.py"):
        out = run_script(script, "--help").stdout
        for flag in ("--data-dir", "--no-progress", "--block-size", "--memory-budget"):
            assert flag in out, (script, flag)
        assert "(default:" in out
