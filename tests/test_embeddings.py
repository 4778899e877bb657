"""The one loader of features.npy + image_names.npy + features_meta.json (paintsim.embeddings)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from paintsim.artifacts import DataPaths
from paintsim.embeddings import UNIT_NORM_TOL, Embeddings, array_sha256, validate_features, write_embeddings
from paintsim.errors import UserError


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_nan_and_zero_rows_are_named():
    x = unit_rows(20, 4)
    x[3, 1] = np.nan
    x[11] = np.inf
    with pytest.raises(UserError, match=r"2 row\(s\) contain NaN or infinity: rows 3, 11"):
        validate_features(x)
    x = unit_rows(20, 4)
    x[[0, 7]] = 0
    with pytest.raises(UserError, match=r"all zeros.*rows 0, 7"):
        validate_features(x)


def test_rows_that_are_not_unit_norm_are_named():
    x = unit_rows(20, 4)
    x[9] *= 2
    with pytest.raises(UserError, match=r"not unit-norm.*rows 9\b"):
        validate_features(x, source="my.npy")
    x[9] /= 2
    x[9] *= 1 + 0.5 * UNIT_NORM_TOL  # within tolerance
    assert validate_features(x).dtype == np.float32


@pytest.mark.parametrize("bad,match", [
    (np.ones(5, np.float32), "2-D"),
    (np.ones((4, 2), np.int64), "floating-point"),
    (np.ones((1, 2), np.float32) / np.sqrt(2), "at least 2 rows"),
])
def test_malformed_arrays_are_rejected(bad, match):
    with pytest.raises(UserError, match=match):
        validate_features(bad)


def test_names_must_align_with_rows():
    with pytest.raises(UserError, match="3 name.*for 5 feature rows"):
        validate_features(unit_rows(5, 3), np.array(["a", "b", "c"]))


def test_load_reads_meta_when_present_and_names_the_missing_file(tmp_path):
    x = unit_rows(6, 3)
    np.save(tmp_path / "features.npy", x)
    np.save(tmp_path / "image_names.npy", np.array([f"{i}.jpg" for i in range(6)]))
    emb = Embeddings.load(tmp_path)
    assert emb.meta == {} and emb.names[2] == "2.jpg" and np.array_equal(emb.features, x)
    assert emb.images_dir == tmp_path / "images" and emb.image_path(2) == tmp_path / "images" / "2.jpg"
    (tmp_path / "features_meta.json").write_text(json.dumps({"backbone": "resnet50",
                                                             "source": f"images-dir:{tmp_path}/scans"}))
    emb = Embeddings.load(tmp_path)
    assert emb.meta["backbone"] == "resnet50" and emb.image_path(0) == tmp_path / "scans" / "0.jpg"
    (tmp_path / "image_names.npy").unlink()
    with pytest.raises(FileNotFoundError, match="image_names.npy does not exist"):
        Embeddings.load(tmp_path)


def test_a_changed_features_file_is_caught_by_the_recorded_checksum(tmp_path):
    paths = DataPaths.of(tmp_path)
    x = unit_rows(6, 3)
    meta = write_embeddings(paths, x, [f"{i}.jpg" for i in range(6)], {"backbone": "resnet50"})
    assert meta["features_sha256"] == array_sha256(x) and meta["count"] == 6 and meta["dimension"] == 3
    assert Embeddings.load(tmp_path).sha256 == array_sha256(x)
    np.save(tmp_path / "features.npy", unit_rows(6, 3, seed=1))  # valid rows, but not the recorded ones
    with pytest.raises(UserError, match="does not match the checksum"):
        Embeddings.load(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x93NUMPY garbage", b"not numpy at all"])
def test_a_damaged_array_file_is_one_clear_error(tmp_path, content):
    np.save(tmp_path / "image_names.npy", np.array(["a.jpg", "b.jpg"]))
    (tmp_path / "features.npy").write_bytes(content)
    with pytest.raises(UserError, match="features.npy is not a plain NumPy array file"):
        Embeddings.load(tmp_path)


def test_a_pickled_array_is_refused(tmp_path):
    np.save(tmp_path / "features.npy", unit_rows(2, 2))
    np.save(tmp_path / "image_names.npy", np.array(["a.jpg", {"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="image_names.npy is not a plain NumPy array file"):
        Embeddings.load(tmp_path)


def test_a_malformed_meta_is_one_clear_error(tmp_path):
    np.save(tmp_path / "features.npy", unit_rows(2, 2))
    np.save(tmp_path / "image_names.npy", np.array(["a.jpg", "b.jpg"]))
    (tmp_path / "features_meta.json").write_text("{not json")
    with pytest.raises(UserError, match="features_meta.json is not valid UTF-8 JSON"):
        Embeddings.load(tmp_path)
    (tmp_path / "features_meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must hold a JSON object"):
        Embeddings.load(tmp_path)
