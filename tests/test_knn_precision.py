"""The bf16 candidate pass of paintsim.knn: the output is the float32 path's, bit for bit, and the
exact top-k (canonical float64 scores), on adversarial data: near-ties at the k-th place, exact
duplicates (more than the candidate list holds), tight clusters and anisotropic features."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from paintsim import knn, precision
from paintsim.knn import cpu_pass, exact, scorers
from paintsim.errors import BadValue
from reference import brute_force_float64

COMBOS = [(p, m) for p in ("fp32", "bf16") for m in ("symmetric", "dense")]


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(precision.ENV_CACHE, str(tmp_path / "probe-cache"))
    precision.clear_memo()
    yield
    precision.clear_memo()


def normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def realistic(n: int, d: int, seed: int = 0, clusters: int | None = None) -> np.ndarray:
    """A shared mean direction plus clusters (every cosine about 0.5-0.9), as CNN features are."""
    rng = np.random.default_rng(seed)
    u = normalise(rng.standard_normal((1, d)))[0]
    cen = rng.standard_normal((clusters or max(2, n // 60), d)) / np.sqrt(d)
    x = u + 0.6 * cen[rng.integers(0, len(cen), n)] + 0.6 * rng.standard_normal((n, d)) / np.sqrt(d)
    return normalise(x)


def exact_reference(x: np.ndarray, k: int, exclude_self: bool = True):
    """The definition: fl64 of the exact dot product (math.fsum), descending, ties to the lower
    index, rounded once to float32. Small N only."""
    x64 = x.astype(np.float64)
    n = len(x)
    s = np.array([[math.fsum((x64[i] * x64[j]).tolist()) for j in range(n)] for i in range(n)])
    if exclude_self:
        np.fill_diagonal(s, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(n), s.shape), -s), axis=1)[:, :k]
    return order.astype(np.int32), np.take_along_axis(s, order, 1).astype(np.float32)


def all_combos(x, k, block=None, **kw):
    return {c: knn.top_k_neighbors(x, k, precision=c[0], method=c[1], block_size=block, **kw) for c in COMBOS}


def assert_identical(results, ref=None):
    (i0, s0), *_ = results.values()
    for combo, (i, s) in results.items():
        assert i.dtype == np.int32 and s.dtype == np.float32
        np.testing.assert_array_equal(i, i0, err_msg=str(combo))
        np.testing.assert_array_equal(s.view(np.int32), s0.view(np.int32), err_msg=str(combo))
    if ref is not None:
        np.testing.assert_array_equal(i0, ref[0])
        np.testing.assert_array_equal(s0.view(np.int32), ref[1].view(np.int32))


def near_ties(n=240, d=48, seed=1):
    """Rows at almost the same cosine to many others: one direction plus 1e-4 perturbations,
    so dozens of scores sit within the bf16 error window of each row's k-th."""
    rng = np.random.default_rng(seed)
    base = normalise(rng.standard_normal((6, d)))
    x = base[rng.integers(0, 6, n)] + 1e-4 * rng.standard_normal((n, d))
    return normalise(x)


def duplicates(seed=2):
    """Exact copies: 60 copies of one row (more than the bf16 candidate list holds), pairs, triples."""
    base = realistic(40, 32, seed)
    return np.concatenate([base, np.repeat(base[:1], 60, 0), base[::-1], base[:9], base[:3]])


def tight_clusters(n=300, d=40, seed=3):
    rng = np.random.default_rng(seed)
    cen = normalise(rng.standard_normal((5, d)))
    return normalise(cen[rng.integers(0, 5, n)] + 1e-3 * rng.standard_normal((n, d)))


def not_quite_unit(n=250, d=64, seed=4):
    """Anisotropic rows whose norms are 1 within 1e-3 (as stored features are)."""
    x = realistic(n, d, seed)
    return (x * (1 + 1e-3 * np.random.default_rng(seed).uniform(-1, 1, (n, 1)))).astype(np.float32)


def isotropic(n=260, d=24, seed=8):
    """Gaussian rows: half the scores negative, so with a large k the running thresholds are
    negative too (the bf16 tiles are then compared through order-preserving keys)."""
    return normalise(np.random.default_rng(seed).standard_normal((n, d)))


def far_from_centre(n=300, d=64, seed=10):
    """A mean direction carrying 95% of every row (cosines 0.9-1.0): centring does the most here."""
    rng = np.random.default_rng(seed)
    u = normalise(rng.standard_normal((1, d)))[0]
    return normalise(u + 0.23 * rng.standard_normal((n, d)) / np.sqrt(d))


@pytest.mark.parametrize("make,k,block", [
    (near_ties, 10, 64), (near_ties, 1, None), (duplicates, 10, 32), (duplicates, 5, None),
    (tight_clusters, 10, 96), (not_quite_unit, 7, 50), (lambda: realistic(300, 96, 5), 10, 64),
    (isotropic, 150, 64), (isotropic, 3, 40), (far_from_centre, 10, 64),
])
def test_every_precision_and_method_give_the_exact_answer(make, k, block):
    x = make()
    assert_identical(all_combos(x, k, block), exact_reference(x, k))


def test_axes_with_ties_everywhere():
    x = np.eye(4, dtype=np.float32)[np.random.default_rng(3).integers(0, 4, size=61)]
    for k in (1, 5, 20, 60):
        res = all_combos(x, k, 8)
        ref_i, ref_s = brute_force_float64(x, k)
        assert_identical(res, (ref_i, ref_s.astype(np.float32)))


def test_without_self_exclusion():
    x = duplicates()
    assert_identical(all_combos(x, 4, 32, exclude_self=False), exact_reference(x, 4, exclude_self=False))


@pytest.mark.parametrize("n,d,k", [(2500, 256, 10), (1800, 768, 25)])
def test_larger_realistic_features_match_float64_brute_force(n, d, k):
    x = realistic(n, d, seed=n)
    res = all_combos(x, k)
    assert_identical(res)
    index, score = next(iter(res.values()))
    ref_i, ref_s = brute_force_float64(x, k)
    np.testing.assert_allclose(score, ref_s, rtol=0, atol=1e-7)
    x64 = x.astype(np.float64)
    for r, c in np.argwhere(index != ref_i):   # only float64 rounding-level ties may differ
        assert abs(x64[r] @ x64[index[r, c]] - ref_s[r, c]) <= 1e-12


def test_duplicates_beyond_the_candidate_list_take_the_exact_float32_route(monkeypatch):
    calls = []
    real = exact._window_float32
    monkeypatch.setattr(exact, "_window_float32", lambda *a: calls.append(len(a[1])) or real(*a))
    x = duplicates()
    i, s = knn.top_k_neighbors(x, 10, precision="bf16", block_size=32)
    assert calls and calls[0] >= 60
    assert i[40].tolist() == [0, *range(41, 50)]   # copies of row 40 (and row 0): ties to the lower index
    ref = exact_reference(x, 10)
    np.testing.assert_array_equal(i, ref[0])


@pytest.mark.parametrize("forced,expected", [("fast", "bf16"), ("slow", "fp32")])
def test_auto_precision_follows_the_probe(monkeypatch, forced, expected):
    monkeypatch.setenv(precision.ENV_OVERRIDE, forced)
    seen = []
    real = knn._capacity
    monkeypatch.setattr(knn, "_capacity", lambda k, n, p: seen.append(p) or real(k, n, p))
    x = realistic(200, 32, 6)
    got = knn.top_k_neighbors(x, 5)
    assert seen == [expected]
    assert_identical({"auto": got, "fp32": knn.top_k_neighbors(x, 5, precision="fp32")})


def test_bad_precision_is_rejected():
    with pytest.raises(BadValue, match="precision"):
        knn.top_k_neighbors(realistic(20, 4), 2, precision="int4")


@pytest.mark.parametrize("make", [lambda: not_quite_unit(400, 512, seed=9), lambda: isotropic(400, 512),
                                  lambda: far_from_centre(400, 512)])
def test_bf16_error_bound_holds_on_the_pass_scores(make):
    """The scorer's bound |v~ - (x.y - c)| <= a + b|v~| against float64, on tiles and on the
    seeding sample's columns."""
    x = make()
    sc = scorers._Bf16Scorer(x, "cpu", 40, True)
    exact = x.astype(np.float64) @ x.T.astype(np.float64) - sc.offset
    v = sc.scores(0, 400, 0, 400).float().numpy().astype(np.float64)
    assert (np.abs(v - exact) <= sc.a + sc.b * np.abs(v)).all()
    cols = np.array([399, 3, 250, 17])
    w = sc.sample_scores(100, 300, cols).float().numpy().astype(np.float64)
    assert (np.abs(w - exact[100:300][:, cols]) <= sc.a + sc.b * np.abs(w)).all()
    assert sc.a < 0.006   # the actual residuals: tighter than the generic (2u + u^2) = 0.0078


def test_centring_narrows_the_bf16_window_on_anisotropic_features():
    """Rows sharing a mean direction: the residuals' bound is far below the uncentred one."""
    x = far_from_centre(400, 512)
    sc = scorers._Bf16Scorer(x, "cpu", 40, True)
    uncentred = 2 * 2.0 ** -8 * (1 + 2.0 ** -8)       # (2u + u^2) |x||y| with u = 2^-8
    assert sc.a < uncentred / 4


def test_bf16_keys_order_as_the_values_do():
    bits = np.arange(-2**15, 2**15, dtype=np.int32).astype(np.int16)
    vals = cpu_pass._bf16_values(bits)
    ok = ~np.isnan(vals)
    bits, vals = bits[ok], vals[ok]
    keys = cpu_pass._bf16_keys(bits.copy())
    order = np.argsort(keys, kind="stable")
    assert (np.diff(vals[order]) >= 0).all()
    np.testing.assert_array_equal(cpu_pass._bf16_keys(keys.copy()), bits)   # its own inverse
    scratch = np.empty(len(bits), dtype=np.int16)
    np.testing.assert_array_equal(cpu_pass._bf16_keys(bits.copy(), scratch), keys)
    th = np.array([-np.inf, -1.5, -1e-3, 0.0, 1e-3, 0.7734, 3.0], dtype=np.float32)
    tk = cpu_pass._bf16_threshold_keys(th)
    for t, key in zip(th, tk):   # the smallest bf16 value reaching t is the first key >= tk
        assert vals[keys >= key].min() >= t and (vals[keys < key] < t).all()


@pytest.mark.parametrize("prec", ["fp32", "bf16"])
def test_a_seed_above_the_kth_score_never_changes_the_result(monkeypatch, prec):
    """Placeholders at a too-high starting threshold stay inside the window: the rows are redone."""
    x = realistic(300, 64, 11)
    expected = exact_reference(x, 10)
    monkeypatch.setattr(cpu_pass, "_seed_thresholds", lambda sc, k, ex, b: np.full(sc.n, 5.0, np.float32))
    redone = []
    real = exact._window_float32
    monkeypatch.setattr(exact, "_window_float32", lambda *a: redone.append(len(a[1])) or real(*a))
    i, s = knn.top_k_neighbors(x, 10, precision=prec, block_size=64)
    assert redone == [300]
    np.testing.assert_array_equal(i, expected[0])
    np.testing.assert_array_equal(s.view(np.int32), expected[1].view(np.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_and_fp32_match_the_cpu():
    x = realistic(4000, 256, 7)
    cpu = knn.top_k_neighbors(x, 10, precision="fp32")
    gpu = {c: knn.top_k_neighbors(x, 10, device="cuda", precision=c[0], method=c[1]) for c in COMBOS}
    assert_identical({"cpu": cpu, **gpu})


NO_TORCH = r"""
import sys, numpy as np
from paintsim.knn import top_k_neighbors
x = np.random.default_rng(0).standard_normal((300, 24)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
top_k_neighbors(x, 5, device=sys.argv[1], precision=sys.argv[2])
print("torch" in sys.modules)
"""


@pytest.mark.parametrize("device,prec", [("cpu", "fp32"), ("cpu", "auto")])
def test_a_small_float32_cpu_run_never_imports_torch(device, prec, tmp_path):
    """Importing torch costs seconds; the float32 CPU route (and auto below SMALL_CPU_WORK) is numpy."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ, "PYTHONPATH": str(repo), precision.ENV_CACHE: str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", NO_TORCH, device, prec], capture_output=True, text=True,
                         env=env, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_auto_weighs_the_torch_import_against_the_work(monkeypatch):
    """Small work without torch loaded: float32; large work (or torch loaded): the probe decides."""
    import sys

    monkeypatch.setenv(precision.ENV_OVERRIDE, "fast")
    with monkeypatch.context() as m:
        m.delitem(sys.modules, "torch")
        assert knn.resolve_precision("auto", "cpu", 1000, 64) == "fp32"
        assert knn.resolve_precision("auto", "cpu", 50000, 2048) == "bf16"
    assert knn.resolve_precision("auto", "cpu", 1000, 64) == "bf16"
    assert knn.resolve_precision("fp32", "cpu", 50000, 2048) == "fp32"
