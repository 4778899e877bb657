"""extract_features.py: outputs, unreadable files, resume, incremental reruns, and real-weights quality."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, SAMPLE_DIR, SAMPLE_IMAGES, copy_sample_images, kill_when_chunks, run_script
from paintsim import artifacts
from paintsim.embedder import Embedder, Preprocessing
from paintsim.errors import BadValue, UserError
from paintsim.extract import ExtractConfig, extract_features
from paintsim.manifest import write_manifest
from paintsim.images import load_rgb
from paintsim.perturb import PERTURBATIONS, perturb

#: Four panels of one Simone Martini polyptych: gold-ground standing saints that MobileNetV2 at
#: 200 px already puts within cosine 0.85 of each other, closer than an 85 % crop of themselves.
SAME_POLYPTYCH = {"41633.jpg", "41634.jpg", "41635.jpg", "41636.jpg"}


def copy_images(dst: Path, n: int, start: int = 0) -> list[str]:
    return copy_sample_images(dst, range(start, start + n))


def add_bad_files(d: Path) -> dict[str, str]:
    """One of each kind of unreadable file; returns name -> expected words in its reason."""
    good = SAMPLE_IMAGES[0].read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(2000))
    (d / "page.jpg").write_bytes(b"<!DOCTYPE html><html><body>404</body></html>")
    (d / "notes.txt").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    return {"truncated.jpg": "truncated", "corrupt.jpg": "", "page.jpg": "HTML",
            "notes.txt": "not an image file", "empty.png": "empty"}


def read_errors(data: Path) -> dict[str, str]:
    with open(data / "features_errors.csv", newline="") as fh:
        return {row["file"]: row["error"] for row in csv.DictReader(fh)}


def test_outputs_are_aligned_unit_rows_and_unreadable_files_are_reported(tmp_path):
    imgs = tmp_path / "imgs"
    names = copy_images(imgs, 10)
    bad = add_bad_files(imgs)
    data = tmp_path / "data"
    proc = run_script("extract_features.py", "--data-dir", data, "--images-dir", imgs, "--backbone",
                      "mobilenet_v2", "--weights", "none", "--batch-size", "4", "--no-progress", timeout=300)
    assert "RANDOM weights" in proc.stderr
    assert "skipped 5 unreadable" in proc.stdout
    feats = artifacts.load_npy(data / "features.npy")
    got_names = artifacts.load_npy(data / "image_names.npy")
    assert feats.dtype == np.float32 and feats.shape == (10, 1280)
    assert got_names.dtype.kind == "U" and got_names.tolist() == sorted(names)
    assert np.all(np.isfinite(feats)) and np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    errors = read_errors(data)
    assert set(errors) == set(bad)
    for name, words in bad.items():
        assert words in errors[name], (name, errors[name])
    meta = json.loads((data / "features_meta.json").read_text())
    assert meta["backbone"] == "mobilenet_v2" and meta["dimension"] == 1280 and meta["count"] == 10
    assert meta["random_weights"] is True and meta["weights"]["kind"] == "none"
    assert meta["preprocessing"]["mode"] == "center-crop" and meta["errors"] == 5
    assert {"torch", "torchvision", "numpy", "pillow"} <= set(meta["versions"])
    # each row belongs to its name: re-embedding one image alone gives the same row
    emb = Embedder.from_meta(meta, device="cpu")
    i = 7
    one = emb.embed([load_rgb(imgs / got_names[i])])
    np.testing.assert_allclose(one[0], feats[i], atol=1e-5)


def test_manifest_rows_with_status_ok_are_embedded_by_file_name(tmp_path):
    data = tmp_path / "data"
    names = copy_images(data / "images", 5)
    import pandas as pd

    rows = [{"uuid": n[:-4], "file": f"images/{n}", "status": "ok"} for n in names]
    rows[1]["status"] = "failed"
    rows.append({"uuid": "gone", "file": "images/gone.jpg", "status": "ok"})
    write_manifest(data / "manifest.csv", pd.DataFrame(rows))
    s = extract_features(ExtractConfig(data_dir=str(data), backbone="mobilenet_v2", weights="none",
                                       workers=0, batch_size=8, progress=False))
    got = artifacts.load_npy(data / "image_names.npy").tolist()
    assert got == [n for i, n in enumerate(names) if i != 1]
    assert s["errors"] == 1 and "file not found" in read_errors(data)["images/gone.jpg"]

    rows.append({"uuid": "evil", "file": "../../etc/passwd", "status": "ok"})
    write_manifest(data / "manifest.csv", pd.DataFrame(rows))
    with pytest.raises(UserError, match="not a path inside"):
        extract_features(ExtractConfig(data_dir=str(data), backbone="mobilenet_v2", weights="none",
                                       progress=False))


def test_rerun_embeds_only_new_images_and_keeps_old_rows(tmp_path):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_images(imgs, 6)
    cfg = ExtractConfig(data_dir=str(data), images_dir=str(imgs), backbone="mobilenet_v2", weights="none",
                        workers=0, batch_size=4, progress=False)
    first = extract_features(cfg)
    f1 = artifacts.load_npy(data / "features.npy")
    n1 = artifacts.load_npy(data / "image_names.npy").tolist()
    assert first["embedded"] == 6
    again = extract_features(cfg)
    assert again["embedded"] == 0 and again["up_to_date"]
    copy_images(imgs, 3, start=6)
    third = extract_features(cfg)
    assert third["embedded"] == 3 and third["reused"] == 6
    f3 = artifacts.load_npy(data / "features.npy")
    n3 = artifacts.load_npy(data / "image_names.npy").tolist()
    assert len(n3) == 9
    for name, row in zip(n1, f1):
        np.testing.assert_array_equal(f3[n3.index(name)], row)
    assert len(list((data / "features_progress").glob("chunk-*.npz"))) == 1  # compacted
    # another configuration does not reuse these embeddings
    other = extract_features(ExtractConfig(**{**cfg.__dict__, "no_crop": True}))
    assert other["embedded"] == 9


def _extract_cmd(data: Path, imgs: Path) -> list[str]:
    return [sys.executable, str(REPO / "extract_features.py"), "--data-dir", str(data), "--images-dir",
            str(imgs), "--backbone", "mobilenet_v2", "--weights", "none", "--batch-size", "2",
            "--chunk-size", "2", "--workers", "0", "--threads", "1", "--no-progress"]


def test_killed_run_resumes_to_identical_arrays(tmp_path):
    imgs = tmp_path / "imgs"
    copy_images(imgs, 40)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_extract_cmd(whole, imgs), check=True, capture_output=True, timeout=300, cwd=REPO)

    n_chunks = kill_when_chunks(_extract_cmd(killed, imgs), killed / "features_progress", 3)
    assert 3 <= n_chunks < 20, "the run was not killed midway"
    assert not (killed / "features.npy").exists()

    resumed = run_script(*_extract_cmd(killed, imgs)[1:], timeout=300)
    reused = int(resumed.stdout.split("reused ")[1].split(",")[0])
    assert 6 <= reused < 40
    for name in ("features.npy", "image_names.npy"):
        a, b = artifacts.load_npy(whole / name), artifacts.load_npy(killed / name)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_letterbox_keeps_the_whole_painting():
    pre = Preprocessing("letterbox", 256, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear")
    img = Image.new("RGB", (400, 100), (255, 0, 0))
    x = pre(img)
    assert tuple(x.shape) == (3, 224, 224)
    assert x[:, 112, 0].tolist() == [255, 0, 0] and x[:, 112, 223].tolist() == [255, 0, 0]
    assert x[:, 0, 112].tolist() == list(pre.fill)  # padding is the mean colour (zero once normalised)
    crop = Preprocessing("center-crop", 256, 224, pre.mean, pre.std, "bilinear")(img)
    assert tuple(crop.shape) == (3, 224, 224)


def test_cpu_fp16_and_bad_sizes_are_clear_errors(tmp_path):
    for kwargs, error, words in [({"precision": "fp16", "device": "cpu"}, BadValue, "fp16 is for GPUs"),
                                 ({"batch_size": -1}, BadValue, "batch_size = -1"),
                                 ({"images_dir": str(tmp_path / "nope")}, UserError, "not a directory")]:
        cfg = ExtractConfig(data_dir=str(tmp_path), images_dir=str(SAMPLE_DIR / "images"),
                            backbone="mobilenet_v2", weights="none", progress=False)
        with pytest.raises(error, match=words):
            extract_features(ExtractConfig(**{**cfg.__dict__, **kwargs}))
    proc = run_script("extract_features.py", "--data-dir", tmp_path, "--batch-size", "-1", check=False,
                      timeout=60)
    assert proc.returncode == 2 and "argument --batch-size: must be at least 0, got -1" in proc.stderr


def test_help_shows_every_flag_with_its_default():
    out = run_script("extract_features.py", "--help", timeout=60).stdout
    for flag in ("--backbone", "--weights", "--no-crop", "--images-dir", "--batch-size", "--workers",
                 "--device", "--precision", "--channels-last", "--chunk-size", "--data-dir", "--no-progress",
                 "--fusion-weights", "--pca", "--whiten", "--output-dir"):
        assert flag in out
    flat = " ".join(out.split())
    assert "default: resnet50" in flat and "mobilenet_v2" in flat
    for default in ("(default: 1)", "(default: 0)", "(default: default)", "(default None: the --data-dir)"):
        assert default in flat, default


def test_perturbations_are_seeded_and_mild():
    img = load_rgb(SAMPLE_IMAGES[0])
    for kind in PERTURBATIONS:
        a = perturb(img, kind, np.random.default_rng(5))
        b = perturb(img, kind, np.random.default_rng(5))
        assert a.mode == "RGB" and np.array_equal(np.asarray(a), np.asarray(b))
    w, h = perturb(img, "crop", np.random.default_rng(0)).size
    assert (w, h) == (round(img.width * 0.85), round(img.height * 0.85))
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb(img, "swirl", np.random.default_rng(0))


@pytest.fixture(scope="module")
def real_sample_features(mobilenet_weights, tmp_path_factory):
    """The whole sample embedded by the stage with the real ImageNet MobileNetV2 weights."""
    data = tmp_path_factory.mktemp("real")
    extract_features(ExtractConfig(data_dir=str(data), images_dir=str(SAMPLE_DIR / "images"),
                                   backbone="mobilenet_v2", progress=False))
    meta = json.loads((data / "features_meta.json").read_text())
    return (artifacts.load_npy(data / "features.npy"), artifacts.load_npy(data / "image_names.npy").tolist(),
            meta)


def test_perturbed_copy_and_original_are_each_others_nearest_neighbour(real_sample_features):
    feats, names, meta = real_sample_features
    assert meta["weights"]["id"] == "MobileNet_V2_Weights.IMAGENET1K_V1" and not meta["random_weights"]
    emb = Embedder.from_meta(meta, device="cpu")
    imgs = [load_rgb(SAMPLE_DIR / "images" / n) for n in names]
    # Embedder reproduces the stage's rows
    np.testing.assert_allclose(emb.embed(imgs[:5]), feats[:5], atol=1e-5)

    rng = np.random.default_rng(0)
    copies = emb.embed([perturb(im, "combo", rng) for im in imgs])  # crop 85 %, rotate, jitter, JPEG
    s = copies @ feats.T                           # copy i vs original j
    orig = feats @ feats.T
    np.fill_diagonal(orig, -np.inf)
    n = len(names)
    # the copy's nearest neighbour among all the sample paintings is its original, for every painting
    assert (s.argmax(axis=1) == np.arange(n)).all(), [names[i] for i in np.where(s.argmax(1) != np.arange(n))[0]]
    # and the original's nearest neighbour is its copy rather than another painting, for every painting
    # except the four near-identical panels of one polyptych (see SAME_POLYPTYCH)
    tested = [i for i in range(n) if names[i] not in SAME_POLYPTYCH]
    assert len(tested) == n - 4
    failing = [names[i] for i in tested if not np.diag(s)[i] > orig[i].max()]
    assert not failing, failing
