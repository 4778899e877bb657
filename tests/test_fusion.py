"""Fusion of several backbones (paintsim.fusion, extract_features.py --backbone a,b --pca N): real models
on a dozen sample paintings (MobileNetV2 with its real ImageNet weights, and with seeded random ones)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import SAMPLE_IMAGES, copy_sample_images, run_script
from paintsim import artifacts, fusion
from paintsim.embedder import Embedder
from paintsim.embeddings import Embeddings
from paintsim.errors import BadValue
from paintsim.extract import ExtractConfig, extract_features
from paintsim.images import load_rgb
from paintsim.manifest import write_manifest

#: Two different models of one architecture: the real ImageNet MobileNetV2 and a seeded random one.
PAIR = dict(backbone="mobilenet_v2,mobilenet_v2", weights="default,none")


@pytest.fixture()
def imgs(tmp_path, mobilenet_weights) -> Path:
    copy_sample_images(tmp_path / "imgs", range(12))
    return tmp_path / "imgs"


def extract(out: Path, imgs: Path, **kw) -> dict:
    cfg = dict(data_dir=str(out), images_dir=str(imgs), workers=0, batch_size=8, device="cpu", progress=False)
    cfg.update(kw)
    return extract_features(ExtractConfig(**cfg))


def load(d: Path) -> tuple[np.ndarray, list[str], dict]:
    emb = Embeddings.load(d)
    return np.asarray(emb.features), emb.names.tolist(), emb.meta


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_an_outside_image_through_the_saved_pca_equals_its_collection_row(tmp_path, imgs):
    out = tmp_path / "fused"
    s = extract(out, imgs, **PAIR, fusion_weights="1,0.5", pca=6, whiten=True)
    assert s["rows"] == 12 and s["dimension"] == 6 and s["embedded"] == 24
    feats, names, meta = load(out)
    assert meta["backbone"] == "mobilenet_v2+mobilenet_v2" and meta["dimension"] == 6
    pca = meta["fusion"]["pca"]
    assert pca["file"] == "features_pca.npz" and pca["whiten"] is True and pca["dimension"] == 6
    assert pca["sha256"] == fusion.file_sha256(out / "features_pca.npz")
    with np.load(out / "features_pca.npz", allow_pickle=False) as z:   # a plain file, no pickle
        assert z["components"].shape == (6, 2560) and z["mean"].shape == (2560,) and bool(z["whiten"])
        assert z["whiten"].shape == () and z["explained_variance"].shape == (6,)

    embedder = Embedder.for_collection(Embeddings.load(out), device="cpu")
    assert isinstance(embedder, fusion.FusedEmbedder) and embedder.dim == 6
    assert embedder.meta["fusion"]["models"][1]["blend_weight"] == 0.5
    rows = [3, 10]
    vecs = embedder.embed([load_rgb(imgs / names[r]) for r in rows])
    assert vecs.dtype == np.float32 and vecs.shape == (2, 6)
    np.testing.assert_allclose(vecs, feats[rows], atol=1e-5)
    # the outside image's nearest collection row is itself
    assert ((vecs @ feats.T).argmax(axis=1) == rows).all()


def test_fusing_a_model_with_itself_gives_the_single_models_cosines_and_neighbours(tmp_path, imgs):
    single, fused = tmp_path / "single", tmp_path / "fused"
    extract(single, imgs, backbone="mobilenet_v2")
    s = extract(fused, imgs, backbone="mobilenet_v2,mobilenet_v2")
    assert s["embedded"] == 12  # one model named twice is embedded once
    x, names_x, _ = load(single)
    f, names_f, meta = load(fused)
    assert names_f == names_x and f.shape == (12, 2560)
    np.testing.assert_allclose(f, np.hstack([x, x]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(f @ f.T, x @ x.T, atol=1e-5)
    sx, sf = x @ x.T, f @ f.T
    np.fill_diagonal(sx, -np.inf)
    np.fill_diagonal(sf, -np.inf)
    assert (np.argsort(-sx, axis=1)[:, :5] == np.argsort(-sf, axis=1)[:, :5]).all()
    assert meta["fusion"]["pca"] is None and not (fused / "features_pca.npz").exists()
    assert [m["backbone"] for m in meta["fusion"]["models"]] == ["mobilenet_v2", "mobilenet_v2"]
    for key in ("weights", "preprocessing", "precision", "dimension", "blend_weight"):
        assert key in meta["fusion"]["models"][0]


def test_blend_weights_make_the_cosine_the_weighted_mean_of_the_models_cosines(tmp_path, imgs):
    a, b, fused = tmp_path / "a", tmp_path / "b", tmp_path / "fused"
    extract(a, imgs, backbone="mobilenet_v2")
    extract(b, imgs, backbone="mobilenet_v2", weights="none")
    extract(fused, imgs, **PAIR, fusion_weights="2,0.5")
    xa, xb, f = load(a)[0], load(b)[0], load(fused)[0]
    ca, cb = xa @ xa.T, xb @ xb.T
    np.testing.assert_allclose(f @ f.T, (4 * ca + 0.25 * cb) / 4.25, atol=1e-5)
    assert not np.allclose(ca, cb, atol=1e-2)  # the two models do disagree
    # the fingerprint covers the blend
    fp = load(fused)[2]["fingerprint"]
    extract(fused, imgs, **PAIR, fusion_weights="1,1")
    assert load(fused)[2]["fingerprint"] != fp


def test_pca_explained_variance_and_whitening_are_recorded_and_correct(tmp_path, imgs):
    a, b, fused = tmp_path / "a", tmp_path / "b", tmp_path / "fused"
    extract(a, imgs, backbone="mobilenet_v2")
    extract(b, imgs, backbone="mobilenet_v2", weights="none")
    s = extract(fused, imgs, **PAIR, fusion_weights="1,0.5", pca=5, whiten=True)
    x = np.hstack([load(a)[0].astype(np.float64), 0.5 * load(b)[0].astype(np.float64)])  # the fused input
    f, _, meta = load(fused)
    pca = fusion.load_pca(fused / "features_pca.npz", sha256=meta["fusion"]["pca"]["sha256"])
    xc = x - x.mean(axis=0)
    sv = np.linalg.svd(xc, compute_uv=False)
    var = sv ** 2 / (len(x) - 1)
    np.testing.assert_allclose(pca.mean, x.mean(axis=0), atol=1e-6)
    np.testing.assert_allclose(pca.explained_variance, var[:5], rtol=1e-4)
    np.testing.assert_allclose(pca.explained_variance_ratio, var[:5] / var.sum(), rtol=1e-4)
    recorded = meta["fusion"]["pca"]
    assert recorded["explained_variance_ratio_total"] == pytest.approx(var[:5].sum() / var.sum(), rel=1e-4)
    assert s["fusion"]["pca"]["explained_variance_ratio_total"] == recorded["explained_variance_ratio_total"]
    assert recorded["method"] == "svd" and recorded["fitted_on"] == 12  # N <= D
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(5), atol=1e-8)
    # deterministic signs: each component's largest coefficient is positive
    assert (pca.components[np.arange(5), np.abs(pca.components).argmax(axis=1)] > 0).all()
    # whitened training rows, before normalisation: zero mean and unit variance per component
    z = xc @ pca.components.T / np.sqrt(pca.explained_variance)
    np.testing.assert_allclose(z.mean(axis=0), 0, atol=1e-6)
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1, rtol=1e-4)
    np.testing.assert_allclose(f, unit(z), atol=1e-5)


def test_fit_pca_gives_the_same_components_by_svd_and_by_the_chunked_covariance():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((60, 8)) @ rng.standard_normal((8, 8))

    def blocks_of(a, step=7):
        return lambda: (a[s:s + step] for s in range(0, len(a), step))

    by_eigh, method = fusion.fit_pca(blocks_of(x), 60, 8, 4, whiten=True)          # N > D
    assert method == "eigh"
    by_svd, method = fusion.fit_pca(blocks_of(x[:8]), 8, 8, 4)                      # N <= D
    assert method == "svd"
    xc = x - x.mean(axis=0)
    var = np.linalg.svd(xc, compute_uv=False) ** 2 / 59
    np.testing.assert_allclose(by_eigh.explained_variance, var[:4], rtol=1e-9)
    z = by_eigh.transform(x)
    np.testing.assert_allclose(z.var(axis=0, ddof=1), 1, rtol=1e-9)
    # the svd route on these 8 rows equals the covariance route on the same rows
    via_cov, _ = fusion.fit_pca(blocks_of(np.vstack([x[:8]] * 1)), 8, 8, 4)
    np.testing.assert_allclose(by_svd.components, via_cov.components, atol=1e-9)
    xs = x[:8] - x[:8].mean(axis=0)
    w, v = np.linalg.eigh(xs.T @ xs / 7)
    comps = v[:, ::-1][:, :4].T
    comps *= np.sign(comps[np.arange(4), np.abs(comps).argmax(axis=1)])[:, None]
    np.testing.assert_allclose(by_svd.components, comps, atol=1e-8)
    with pytest.raises(BadValue, match="at most min"):
        fusion.fit_pca(blocks_of(x[:8]), 8, 8, 8)


def test_changing_only_the_pca_reuses_every_models_progress(tmp_path, imgs):
    out = tmp_path / "fused"
    first = extract(out, imgs, **PAIR)
    assert first["embedded"] == 24 and first["reused"] == 0
    models = out / "features_progress" / "models"
    assert sorted(p.name for p in models.iterdir())[0] == "mobilenet_v2" and len(list(models.iterdir())) == 2
    again = extract(out, imgs, **PAIR)
    assert again["embedded"] == 0 and again["up_to_date"]
    with_pca = extract(out, imgs, **PAIR, pca=4)
    assert with_pca["embedded"] == 0 and with_pca["reused"] == 24 and not with_pca["up_to_date"]
    assert (out / "features_pca.npz").exists() and load(out)[0].shape == (12, 4)
    whitened = extract(out, imgs, **PAIR, pca=4, whiten=True, fusion_weights="1,3")
    assert whitened["embedded"] == 0 and load(out)[2]["fusion"]["pca"]["whiten"] is True
    # each model keeps its own progress: losing one model's re-embeds only that model
    shutil.rmtree(models / "mobilenet_v2")
    redo = extract(out, imgs, **PAIR, pca=4)
    assert redo["embedded"] == 12 and redo["reused"] == 12
    # a later unfused run removes the stale PCA file; the single run keeps its own progress folder
    plain = extract(out, imgs, backbone="mobilenet_v2")
    assert plain["embedded"] == 12 and not (out / "features_pca.npz").exists()
    assert "fusion" not in load(out)[2] and len(list((out / "features_progress").glob("chunk-*.npz"))) == 1
    assert (models / "mobilenet_v2").is_dir()


def test_an_image_that_fails_in_a_model_is_an_error_row_naming_the_model(tmp_path, imgs):
    (imgs / "broken.jpg").write_bytes(SAMPLE_IMAGES[0].read_bytes()[:300])
    out = tmp_path / "fused"
    s = extract(out, imgs, **PAIR)
    assert s["errors"] == 1 and s["rows"] == 12 and "broken.jpg" not in load(out)[1]
    with open(out / "features_errors.csv", newline="") as fh:
        errors = {r["file"]: r["error"] for r in csv.DictReader(fh)}
    assert set(errors) == {"broken.jpg"} and "[mobilenet_v2]" in errors["broken.jpg"]


def test_bad_fusion_flags_are_one_clear_line(tmp_path, imgs):
    cases = [
        (["--backbone", "mobilenet_v2,resnet18"], "--backbone mobilenet_v2,resnet18: unknown backbone resnet18; choose from"),
        (["--backbone", "mobilenet_v2,mobilenet_v2", "--weights", "none,none,none"],
         "--weights none,none,none: 3 values for 2 backbones"),
        (["--backbone", "mobilenet_v2,mobilenet_v2", "--fusion-weights", "1,0"],
         "--fusion-weights 1,0: blend weights must be positive"),
        (["--backbone", "mobilenet_v2,mobilenet_v2", "--fusion-weights", "1,2,3"],
         "--fusion-weights 1,2,3: 3 values for 2 backbones"),
        (["--backbone", "mobilenet_v2,mobilenet_v2", "--pca", "40"], "--pca 40: must be at most min(N - 1, D)"),
        (["--backbone", "mobilenet_v2,mobilenet_v2", "--whiten"], "--whiten needs --pca N"),
    ]
    for args, words in cases:
        proc = run_script("extract_features.py", "--data-dir", tmp_path / "out", "--images-dir", imgs,
                          "--weights", "none", *args, "--no-progress", "--device", "cpu", check=False, timeout=120)
        errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert words in errors[0], (words, errors[0])
    assert not (tmp_path / "out" / "features.npy").exists()


def test_output_dir_holds_the_features_and_loads_with_the_data_dirs_images(tmp_path, imgs):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    names = []
    for p in sorted(imgs.iterdir())[:8]:
        shutil.copy2(p, data / "images" / p.name)
        names.append(p.name)
    write_manifest(data / "manifest.csv", pd.DataFrame(
        [{"uuid": n[:-4], "file": f"images/{n}", "status": "ok"} for n in names]))
    out = data / "sets" / "fused"
    proc = run_script("extract_features.py", "--data-dir", data, "--output-dir", out, "--backbone",
                      "mobilenet_v2,mobilenet_v2", "--weights", "default,none", "--pca", "3", "--workers", "0",
                      "--device", "cpu", "--no-progress", timeout=300)
    assert "fusion of 2 models" in proc.stdout and "PCA 3" in proc.stdout
    for name in ("features.npy", "image_names.npy", "features_meta.json", "features_errors.csv",
                 "features_pca.npz", "features_progress"):
        assert (out / name).exists(), name
        assert not (data / name).exists(), name
    emb = Embeddings.load(out)
    assert emb.meta["source"] == f"manifest:{data.resolve()}"
    assert emb.images_dir == (data / "images").resolve() and emb.data_dir == data.resolve()
    assert emb.image_path(0).is_file()
    vec = Embedder.for_collection(emb, device="cpu").embed([load_rgb(emb.image_path(5))])
    np.testing.assert_allclose(vec[0], emb.features[5], atol=1e-5)
    # written into the data dir itself, the source stays "manifest"
    extract(data, None, backbone="mobilenet_v2", images_dir=None, output_dir=str(data))
    assert json.loads((data / "features_meta.json").read_text())["source"] == "manifest"
    assert Embeddings.load(data).images_dir == data / "images"
    assert artifacts.load_npy(out / "features.npy").shape == (8, 3)  # the other set is untouched


def test_an_interrupted_fused_run_resumes_model_by_model_to_identical_rows(tmp_path, imgs, monkeypatch):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    extract(whole, imgs, **PAIR, pca=4, batch_size=2, chunk_size=2)
    original = Embedder.embed_uint8
    calls = {"n": 0}

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 6 + 3:  # all 6 batches of the first model, then 2 of the second
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Embedder, "embed_uint8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract(cut, imgs, **PAIR, pca=4, batch_size=2, chunk_size=2)
    monkeypatch.setattr(Embedder, "embed_uint8", original)
    assert not (cut / "features.npy").exists()
    resumed = extract(cut, imgs, **PAIR, pca=4, batch_size=2, chunk_size=2)
    assert resumed["reused"] == 12 + 4 and resumed["embedded"] == 8
    np.testing.assert_array_equal(load(cut)[0], load(whole)[0])


def test_a_preprocessing_suffix_fuses_the_centre_crop_and_the_letterbox_of_one_backbone(tmp_path, imgs):
    crop, box, fused = tmp_path / "crop", tmp_path / "box", tmp_path / "fused"
    extract(crop, imgs, backbone="mobilenet_v2")
    extract(box, imgs, backbone="mobilenet_v2:letterbox")
    s = extract(fused, imgs, backbone="mobilenet_v2,mobilenet_v2:letterbox")
    assert s["embedded"] == 24   # two embeddings of each image, not one
    a, _, _ = load(crop)
    b, _, meta_b = load(box)
    f, names, meta = load(fused)
    assert meta_b["preprocessing"]["mode"] == "letterbox"
    assert [m["preprocessing"]["mode"] for m in meta["fusion"]["models"]] == ["center-crop", "letterbox"]
    np.testing.assert_allclose(f, unit(np.concatenate([a, b], axis=1)), atol=1e-6)
    # an outside image goes through both preprocessings
    vec = Embedder.for_collection(Embeddings.load(fused), device="cpu").embed([load_rgb(imgs / names[2])])
    np.testing.assert_allclose(vec[0], f[2], atol=1e-5)
    with pytest.raises(BadValue, match="preprocessing suffix"):
        fusion.parse_models("mobilenet_v2:stretch")
