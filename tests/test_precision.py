"""paintsim.precision: the bf16-or-float32 probe, cached once per machine, forced by an env var."""
from __future__ import annotations

import json

import pytest

from paintsim import precision


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    precision.clear_memo()
    yield tmp_path
    precision.clear_memo()


def test_probe_is_measured_once_then_read_from_the_cache(cache, monkeypatch):
    rec = precision.probe("matmul")
    assert rec["speedup"] > 0 and rec["fp32_gflops"] > 0 and rec["bf16_gflops"] > 0 and rec["measured_at"]
    files = list(cache.glob("precision-probe-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["key"]["torch"] and data["key"]["threads"] >= 1 and data["key"]["cpu_model"]
    assert data["probes"]["matmul"]["speedup"] == rec["speedup"]
    precision.clear_memo()   # a new process: the file answers, the probe does not run again
    monkeypatch.setitem(precision._PROBES, "matmul", lambda device: pytest.fail("probe rerun"))
    assert precision.matmul_speedup() == rec["speedup"]
    assert precision.measurements()["probes"]["matmul"]["speedup"] == rec["speedup"]
    assert precision.choose("matmul") == ("bf16" if rec["speedup"] >= 1.5 else "fp32")


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"version": 1, "key": 3}'])
def test_a_corrupt_cache_is_ignored_and_rewritten(cache, monkeypatch, garbage):
    key = precision.machine_key("cpu")
    path = precision._cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(garbage)
    monkeypatch.setitem(precision._PROBES, "matmul", lambda device: {"speedup": 2.0, "fp32_gflops": 1.0,
                                                                     "bf16_gflops": 2.0})
    assert precision.matmul_speedup() == 2.0
    assert json.loads(path.read_text())["probes"]["matmul"]["speedup"] == 2.0
    assert not list(path.parent.glob(".probe-*"))   # the temporary file was renamed away


def test_each_kind_is_cached_beside_the_other(cache, monkeypatch):
    monkeypatch.setitem(precision._PROBES, "matmul", lambda device: {"speedup": 4.0})
    monkeypatch.setitem(precision._PROBES, "conv", lambda device: {"speedup": 0.9})
    assert precision.choose("matmul") == "bf16" and precision.choose("conv") == "fp32"
    assert precision.choose("matmul", threshold=5.0) == "fp32"
    probes = precision.measurements()["probes"]
    assert probes["matmul"]["speedup"] == 4.0 and probes["conv"]["speedup"] == 0.9


@pytest.mark.parametrize("forced,answer", [("fast", "bf16"), ("slow", "fp32")])
def test_the_override_forces_either_branch_without_probing(cache, monkeypatch, forced, answer):
    monkeypatch.setenv(precision.ENV_OVERRIDE, forced)
    monkeypatch.setitem(precision._PROBES, "matmul", lambda device: pytest.fail("probe ran"))
    monkeypatch.setitem(precision._PROBES, "conv", lambda device: pytest.fail("probe ran"))
    assert precision.choose("matmul") == answer and precision.choose("conv") == answer
    assert precision.measurements()["forced_by"].endswith(forced)
    assert not list(cache.iterdir())


def test_the_conv_probe_runs_quickly(cache):
    rec = precision.probe("conv")
    assert rec["speedup"] > 0 and rec["fp32_gflops"] > 0


def test_unknown_kind_is_refused(cache):
    with pytest.raises(ValueError, match="unknown probe kind"):
        precision.probe("fft")
