"""extract_features.py --precision auto on the CPU: bf16 autocast where the model's own forward is
measured faster (paintsim.precision.probe_model, cached per machine) and the backbone passed the
bf16 quality gate (paintsim.bf16_gate); both branches forced, the cache, the gate, resume, the meta."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import REPO, SAMPLE_IMAGES, copy_sample_images, run_script
from paintsim import artifacts, bf16_gate, precision
from paintsim.embedder import BF16_RECIPE, CPU_BF16_MIN_SPEEDUP, PLAIN_AUTOCAST, Embedder
from paintsim.extract import ExtractConfig, extract_features
from paintsim.images import load_rgb

#: The committed gate table as this version ships it (tests that change it use a copy).
PASSED = {"measured": {"mobilenet_v2": {"passed": True, "bf16_recipe": BF16_RECIPE,
                                        "neighbour_overlap_mean": 0.97}},
          "follows": {"resnet50": "mobilenet_v2"}}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A probe cache of the test's own, no override, nothing remembered in-process."""
    monkeypatch.setenv(precision.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    precision.clear_memo()
    yield tmp_path / "cache"
    precision.clear_memo()


@pytest.fixture
def gate_table(tmp_path, monkeypatch):
    """Point the gate at a table the test writes (``write(table)``)."""
    path = tmp_path / "gate.json"

    def write(table: dict) -> Path:
        path.write_text(json.dumps(table))
        return path

    monkeypatch.setattr(bf16_gate, "TABLE", path)
    write(PASSED)
    return write


@pytest.fixture
def imgs(tmp_path) -> Path:
    copy_sample_images(tmp_path / "imgs", range(4))
    return tmp_path / "imgs"


def _extract(data: Path, imgs: Path, **kw) -> dict:
    cfg = dict(data_dir=str(data), images_dir=str(imgs), backbone="mobilenet_v2", weights="none",
               device="cpu", workers=0, batch_size=4, threads=1, progress=False)
    cfg.update(kw)
    return extract_features(ExtractConfig(**cfg))


def _meta(data: Path) -> dict:
    return json.loads((data / "features_meta.json").read_text())


@pytest.mark.parametrize("forced,expected", [("fast", "bf16"), ("slow", "fp32")])
def test_auto_takes_each_branch_end_to_end_and_the_meta_says_why(tmp_path, imgs, forced, expected):
    data = tmp_path / "data"
    proc = run_script("extract_features.py", "--data-dir", data, "--images-dir", imgs, "--backbone",
                      "mobilenet_v2", "--weights", "none", "--workers", "0", "--batch-size", "4", "--threads",
                      "1", "--no-progress", env={precision.ENV_OVERRIDE: forced}, timeout=300)
    assert "4 x 1280" in proc.stdout
    meta = _meta(data)
    choice = meta["precision_choice"]
    assert meta["precision"] == expected == choice["resolved"] and choice["requested"] == "auto"
    assert choice["probe"]["forced_by"] == f"{precision.ENV_OVERRIDE}={forced}"
    assert f"{precision.ENV_OVERRIDE}={forced}" in choice["reason"] and choice["threshold"] == CPU_BF16_MIN_SPEEDUP
    assert choice["gate"]["passed"] and choice["gate"]["measured_on"] == "mobilenet_v2"
    assert ("is at least" if expected == "bf16" else "is not at least") in choice["reason"]
    assert meta.get("bf16_recipe") == (BF16_RECIPE if expected == "bf16" else None)
    feats = artifacts.load_npy(data / "features.npy")
    assert np.allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)


def test_the_model_probe_is_measured_once_then_read_from_the_cache(cache, gate_table, monkeypatch):
    emb = Embedder.create("mobilenet_v2", weights="none", device="cpu", precision="auto", batch_size=4,
                          progress=False)
    probe = emb.precision_choice["probe"]
    assert probe["source"].startswith("measured now") and probe["kind"].startswith("forward:mobilenet_v2@224px")
    assert probe["fp32_images_per_s"] > 0 and probe["bf16_images_per_s"] > 0 and probe["measured_at"]
    assert emb.precision == ("bf16" if probe["speedup"] >= CPU_BF16_MIN_SPEEDUP else "fp32")
    files = list(cache.glob("precision-probe-*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())["probes"][probe["kind"]]
    assert stored["speedup"] == probe["speedup"] and "source" not in stored

    precision.clear_memo()    # a new process: the file answers, nothing is timed again
    monkeypatch.setattr(precision, "_time_model", lambda *a, **k: pytest.fail("the probe ran again"))
    again = Embedder.create("mobilenet_v2", weights="none", device="cpu", precision="auto", progress=False)
    assert again.precision_choice["probe"]["source"] == f"cache {files[0]}"
    assert again.precision_choice["probe"]["speedup"] == probe["speedup"] and again.precision == emb.precision
    # the fixed kinds still live beside it
    monkeypatch.setitem(precision._PROBES, "matmul", lambda device: {"speedup": 3.0})
    assert precision.choose("matmul") == "bf16"
    probes = precision.measurements()["probes"]
    assert set(probes) == {"matmul", probe["kind"]}


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe", b'{"version": 1, "key": 3}',
                                     b'{"version": 1, "key": {}, "probes": {"forward:": {"speedup": 9}}}'])
def test_a_corrupt_cache_is_measured_again_and_rewritten(cache, gate_table, monkeypatch, garbage):
    path = precision._cache_path(precision.machine_key("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(garbage)
    calls = []

    def fake(run, sync, images, reps=2):
        calls.append(images)
        return {"speedup": 0.5, "fp32_images_per_s": 2.0, "bf16_images_per_s": 1.0, "batch": images}

    monkeypatch.setattr(precision, "_time_model", fake)
    emb = Embedder.create("mobilenet_v2", weights="none", device="cpu", precision="auto", progress=False)
    assert calls == [8] and emb.precision == "fp32" and emb.precision_choice["probe"]["speedup"] == 0.5
    data = json.loads(path.read_text())
    assert [v["speedup"] for k, v in data["probes"].items() if k.startswith("forward:mobilenet_v2")] == [0.5]


@pytest.mark.parametrize("table,status", [
    ({"measured": {"mobilenet_v2": {"passed": False, "bf16_recipe": BF16_RECIPE}}}, "failed"),
    ({"measured": {}, "follows": {"resnet50": "mobilenet_v2"}}, "not gated"),
    ({"measured": {"mobilenet_v2": {"passed": True, "bf16_recipe": PLAIN_AUTOCAST}}}, "stale"),
])
def test_a_backbone_that_did_not_pass_the_gate_stays_fp32_under_auto(tmp_path, imgs, cache, gate_table,
                                                                     monkeypatch, table, status):
    gate_table(table)
    monkeypatch.setenv(precision.ENV_OVERRIDE, "fast")    # bf16 would be much faster: the gate says no
    monkeypatch.setattr(precision, "_time_model", lambda *a, **k: pytest.fail("probed despite the gate"))
    data = tmp_path / "data"
    _extract(data, imgs)
    meta = _meta(data)
    assert meta["precision"] == "fp32" and "bf16_recipe" not in meta
    choice = meta["precision_choice"]
    assert choice["gate"]["status"] == status and not choice["gate"]["passed"] and "probe" not in choice
    assert "has not passed the bf16 quality gate" in choice["reason"]


def test_the_gate_table_follows_measured_backbones_and_refuses_the_rest(gate_table):
    assert bf16_gate.verdict("mobilenet_v2")["status"] == "passed"
    follows = bf16_gate.verdict("resnet50")
    assert follows["passed"] and follows["measured_on"] == "mobilenet_v2" and "follows" in follows["why"]
    for name in ("vit_b_16", "convnext_base", "efficientnet_b3"):
        assert bf16_gate.verdict(name)["status"] == "not gated"
    gate_table({"measured": {"resnet50": {"passed": False, "bf16_recipe": BF16_RECIPE},
                             "mobilenet_v2": {"passed": True, "bf16_recipe": BF16_RECIPE}},
                "follows": {"resnet50": "mobilenet_v2"}})
    assert bf16_gate.verdict("resnet50")["status"] == "failed"    # its own measurement wins
    Path(bf16_gate.TABLE).write_text("{broken")
    assert bf16_gate.verdict("mobilenet_v2")["status"] == "not gated"


def test_the_committed_table_passes_mobilenet_v2_and_leaves_transformers_out():
    table = bf16_gate.load_table()
    mob = table["measured"]["mobilenet_v2"]
    assert mob["passed"] and mob["bf16_recipe"] == BF16_RECIPE and mob["neighbour_overlap_mean"] >= bf16_gate.MIN_OVERLAP
    assert (REPO / mob["result"]).is_file()
    assert not {"vit_b_16", "convnext_base", "efficientnet_b3"} & (set(table["measured"]) | set(table["follows"]))


def test_explicit_bf16_runs_on_the_cpu_and_the_embedder_reproduces_its_rows(tmp_path, imgs, cache, monkeypatch,
                                                                          mobilenet_weights):
    monkeypatch.setenv(precision.ENV_OVERRIDE, "slow")   # auto would say fp32: the flag wins
    data = tmp_path / "data"
    _extract(data, imgs, weights="default", precision="bf16")
    meta = _meta(data)
    assert meta["precision"] == "bf16" and meta["bf16_recipe"] == BF16_RECIPE
    assert meta["precision_choice"] == {"requested": "bf16", "resolved": "bf16", "reason": "forced: --precision bf16"}
    feats = artifacts.load_npy(data / "features.npy")
    names = artifacts.load_npy(data / "image_names.npy").tolist()
    emb = Embedder.from_meta(meta, device="cpu")
    assert emb.precision == "bf16" and emb.bf16_recipe == BF16_RECIPE
    np.testing.assert_allclose(emb.embed([load_rgb(imgs / n) for n in names]), feats, atol=1e-5)
    # bf16 rows are close to, not equal to, float32's
    _extract(tmp_path / "fp32", imgs, weights="default", precision="fp32")
    f32 = artifacts.load_npy(tmp_path / "fp32" / "features.npy")
    cos = np.sum(f32 * feats, axis=1)
    assert (cos > 0.99).all() and not np.array_equal(f32, feats)


def test_the_bf16_recipe_is_closer_to_fp32_than_plain_autocast(mobilenet_weights):
    emb = Embedder.create("mobilenet_v2", device="cpu", precision="fp32", batch_size=8, progress=False)
    imgs = [load_rgb(p) for p in SAMPLE_IMAGES[:8]]
    f32 = emb.embed(imgs)
    emb.precision = "bf16"
    recipe = emb.embed(imgs)
    emb.bf16_recipe = PLAIN_AUTOCAST
    plain = emb.embed(imgs)
    err = [float(np.mean(1 - np.sum(f32 * x, axis=1))) for x in (recipe, plain)]
    assert err[0] < err[1] / 2, err
    assert emb.fingerprint() != emb.fingerprint("fp32")
    emb.bf16_recipe = BF16_RECIPE
    with_recipe = emb.fingerprint()
    emb.bf16_recipe = PLAIN_AUTOCAST
    assert emb.fingerprint() != with_recipe    # rows of plain autocast never resume rows of the recipe


def test_a_rerun_with_auto_keeps_the_precision_of_the_rows_already_made(tmp_path, imgs, cache, gate_table,
                                                                       monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv(precision.ENV_OVERRIDE, "slow")
    first = _extract(data, imgs)
    assert first["embedded"] == 4 and _meta(data)["precision"] == "fp32"
    # the same collection on a machine where bf16 is faster, with one new painting
    copy_sample_images(imgs, [10])
    monkeypatch.setenv(precision.ENV_OVERRIDE, "fast")
    precision.clear_memo()
    second = _extract(data, imgs)
    meta = _meta(data)
    assert second["embedded"] == 1 and second["reused"] == 4
    assert meta["precision"] == "fp32" and meta["precision_choice"]["would_pick"] == "bf16"
    assert "kept fp32" in meta["precision_choice"]["reason"]
    # asking for bf16 re-embeds everything in bf16: the fp32 rows are discarded, never mixed
    third = _extract(data, imgs, precision="bf16")
    assert third["embedded"] == 5 and third["reused"] == 0 and _meta(data)["precision"] == "bf16"
    # and auto now keeps bf16 even where the probe says slow
    monkeypatch.setenv(precision.ENV_OVERRIDE, "slow")
    fourth = _extract(data, imgs)
    assert fourth["embedded"] == 0 and fourth["up_to_date"] and _meta(data)["precision"] == "bf16"


def test_progress_left_in_fp32_and_resumed_under_auto_bf16_does_not_mix(tmp_path, imgs, cache, gate_table,
                                                                       monkeypatch):
    data = tmp_path / "data"
    for extra in sorted(imgs.iterdir())[2:]:
        extra.unlink()
    monkeypatch.setenv(precision.ENV_OVERRIDE, "slow")
    _extract(data, imgs, chunk_size=1, batch_size=1)
    (data / "features.npy").unlink()          # as if killed before the outputs: only the progress is left
    (data / "features_meta.json").unlink()
    copy_sample_images(imgs, range(4, 6))
    monkeypatch.setenv(precision.ENV_OVERRIDE, "fast")
    precision.clear_memo()
    s = _extract(data, imgs, chunk_size=1, batch_size=1)
    assert s["reused"] == 2 and s["embedded"] == 2 and _meta(data)["precision"] == "fp32"


def test_fused_models_each_record_their_choice(tmp_path, imgs, cache, gate_table, monkeypatch):
    gate_table({"measured": {"mobilenet_v2": {"passed": True, "bf16_recipe": BF16_RECIPE}}, "follows": {}})
    monkeypatch.setenv(precision.ENV_OVERRIDE, "fast")
    data = tmp_path / "fused"
    _extract(data, imgs, backbone="mobilenet_v2,mobilenet_v2:letterbox", weights="none,none")
    meta = _meta(data)
    models = meta["fusion"]["models"]
    assert [m["precision"] for m in models] == ["bf16", "bf16"]
    assert all(m["bf16_recipe"] == BF16_RECIPE and m["precision_choice"]["resolved"] == "bf16" for m in models)
    assert meta["precision_choice"]["requested"] == "auto"
    emb = Embedder.from_meta(meta, device="cpu", data_dir=data)
    feats = artifacts.load_npy(data / "features.npy")
    names = artifacts.load_npy(data / "image_names.npy").tolist()
    np.testing.assert_allclose(emb.embed([load_rgb(imgs / n) for n in names]), feats, atol=1e-5)


def test_help_says_what_auto_does_on_the_cpu_and_the_gpu():
    flat = " ".join(run_script("extract_features.py", "--help", timeout=60).stdout.split())
    section = flat[flat.index("--precision {auto,fp32,bf16,fp16}", flat.index("options")):]
    for words in ("on CUDA bf16 autocast", "fp16 where the GPU lacks bf16", "bf16 quality gate",
                  "at least 1.2x faster", "else fp32", "(default: auto)"):
        assert words in section[:1500], words


def test_the_quality_gate_on_the_sample_with_the_real_weights(mobilenet_weights, cache):
    """The gate itself (benchmarks/check_bf16_extraction.py) on the 79 sample paintings: ~10 s."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import check_bf16_extraction

    res = check_bf16_extraction.gate("mobilenet_v2")
    assert res["images"] == 79 and not res["random_weights"] and res["bf16_recipe"] == BF16_RECIPE
    assert res["neighbour_overlap_mean"] >= bf16_gate.MIN_OVERLAP, res
    p5 = res["precision_at_5"]
    assert p5["fp32_ci95"][0] <= p5["bf16"] <= p5["fp32_ci95"][1] and res["passed"]
    assert abs(p5["fp32"] - 0.244) < 1e-9     # the demo's figure (docs/evaluation.md)


def test_auto_workers_decode_in_the_main_process_on_a_two_core_machine():
    from paintsim.devices import auto_workers

    assert auto_workers("cpu", threads=2, cores=2) == 0     # a decoding process would stall both threads
    assert auto_workers("cpu", threads=1, cores=2) == 1     # a free core: decode there
    assert auto_workers("cpu", threads=1, cores=1) == 0
    assert auto_workers("cpu", threads=8, cores=8) == 1
    assert auto_workers("cuda", threads=2, cores=16) == 8
