"""The neighbour table, its side record, and the one lookup every later stage uses."""
from __future__ import annotations

import json

import numpy as np
import pytest

from paintsim.artifacts import DataPaths
from paintsim.errors import UserError
from paintsim.neighbours import compare_tables, find_table, load_table, record_path, save_table
from reference import brute_force_float64

N = 12


def _unit(n=N, d=5, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _write(path, k, route, sha="abc", seed=0):
    idx, score = brute_force_float64(_unit(seed=seed), k)
    save_table(path, idx, score.astype(np.float32), route=route, features_sha256=sha)


def test_the_side_record_says_which_route_wrote_the_table(tmp_path):
    _write(tmp_path / "top_3_similar.npy", 3, "streamed")
    rec = json.loads(record_path(tmp_path / "top_3_similar.npy").read_text())
    assert rec["route"] == "streamed" and rec["k"] == 3 and rec["n"] == N and rec["features_sha256"] == "abc"
    table = load_table(tmp_path / "top_3_similar.npy", N)
    assert table.describe() == "top_3_similar.npy (streamed route)" and table.index.dtype == np.int32


def test_lookup_prefers_the_streamed_route_then_the_smallest_k_whatever_ran_last(tmp_path):
    paths = DataPaths.of(tmp_path)
    _write(paths.neighbors(11), 11, "streamed")
    _write(paths.neighbors_from_matrix(5), 5, "matrix")
    _write(paths.neighbors(5), 5, "streamed")
    _write(paths.neighbors(10), 10, "streamed")
    assert find_table(paths, 5, N, "abc").path.name == "top_5_similar.npy"
    assert find_table(paths, 6, N, "abc").path.name == "top_10_similar.npy"
    paths.neighbors(5).unlink()
    assert find_table(paths, 5, N, "abc").path.name == "top_10_similar.npy"  # streamed beats smaller k
    for p in tmp_path.glob("top_1*_similar.*"):
        p.unlink()
    assert find_table(paths, 5, N, "abc").path.name == "top_5_from_matrix.npy"
    assert find_table(paths, 6, N, "abc") is None


def test_a_table_of_other_features_is_never_used(tmp_path):
    paths = DataPaths.of(tmp_path)
    _write(paths.neighbors(10), 10, "streamed", sha="old")
    assert find_table(paths, 10, N, "new") is None
    _write(paths.neighbors_from_matrix(10), 10, "matrix", sha="new")
    assert find_table(paths, 10, N, "new").route == "matrix"


def test_a_table_without_a_record_is_used_only_after_recorded_ones(tmp_path):
    paths = DataPaths.of(tmp_path)
    _write(paths.neighbors(10), 10, "streamed", sha="x")
    record_path(paths.neighbors(10)).unlink()
    assert find_table(paths, 10, N, "x").route == "streamed"  # from its name
    _write(paths.neighbors_from_matrix(10), 10, "matrix", sha="x")
    assert find_table(paths, 10, N, "x").route == "matrix"


def test_indices_outside_the_collection_or_a_wrong_row_count_are_refused(tmp_path):
    idx, score = brute_force_float64(_unit(), 3)
    idx[4, 1] = N + 5
    save_table(tmp_path / "t.npy", idx, score.astype(np.float32), route="streamed", features_sha256="a")
    with pytest.raises(UserError, match="outside 0..11"):
        load_table(tmp_path / "t.npy", N)
    with pytest.raises(UserError, match="has 12 rows but the collection has 13"):
        load_table(tmp_path / "t.npy", N + 1)
    np.save(tmp_path / "bad.npy", np.zeros((N, 3), np.int32))
    with pytest.raises(UserError, match="not a neighbour table"):
        load_table(tmp_path / "bad.npy", N)


def test_compare_counts_only_disagreements_beyond_near_ties(tmp_path):
    x = _unit(n=40, d=6, seed=3)
    idx, score = brute_force_float64(x, 4)
    save_table(tmp_path / "a.npy", idx, score.astype(np.float32), route="streamed", features_sha256="s")
    swapped = idx.copy()
    swapped[7, 3] = [j for j in np.argsort(-(x[7] @ x.T))[1:] if j not in idx[7]][0]  # the 5th neighbour
    save_table(tmp_path / "b.npy", swapped, score.astype(np.float32), route="matrix", features_sha256="s")
    a, b = load_table(tmp_path / "a.npy", 40), load_table(tmp_path / "b.npy", 40)
    gap = abs(float(x[7] @ x[swapped[7, 3]]) - float(score[7, 3]))
    loose = compare_tables(b, a, x, tol=gap + 1e-6)
    assert loose["identical_rows"] == 39 and loose["rows_beyond_tolerance"] == 0
    strict = compare_tables(b, a, x, tol=gap / 2)
    assert strict["rows_beyond_tolerance"] == 1
