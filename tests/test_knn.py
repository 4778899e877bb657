"""The blockwise kernel (paintsim.knn) against a float64 brute force, on random and adversarial data."""
from __future__ import annotations


import numpy as np
import pytest
import torch

from paintsim import knn
from paintsim.errors import BadValue, UserError
from reference import brute_force_float64

METHODS = ["symmetric", "dense"]


@pytest.fixture(autouse=True)
def _private_probe_cache(tmp_path, monkeypatch):
    """precision="auto" probes the machine once; keep its cache out of the home directory."""
    from paintsim import precision

    monkeypatch.setenv(precision.ENV_CACHE, str(tmp_path / "probe-cache"))
    precision.clear_memo()


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def assert_matches_brute_force(features, k, index, score, tol=1e-5):
    """Same scores as float64; the same neighbours except where float64 scores tie within ``tol``."""
    ref_i, ref_s = brute_force_float64(features, k)
    assert index.dtype == np.int32 and score.dtype == np.float32
    assert index.shape == score.shape == (len(features), k)
    np.testing.assert_allclose(score, ref_s, atol=tol, rtol=0)
    x = features.astype(np.float64)
    mism = np.argwhere(index != ref_i)
    for r, c in mism:  # a different neighbour only where it is a near-tie of the reference one
        assert abs(x[r] @ x[index[r, c]] - ref_s[r, c]) <= tol, (r, c)
    assert not (index == np.arange(len(features))[:, None]).any(), "self must be excluded"
    assert (np.diff(score, axis=1) <= 0).all(), "scores must be descending"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,d,k,block", [
    (257, 24, 10, 64),     # N not a multiple of the block
    (300, 8, 10, None),    # automatic block size
    (40, 5, 39, 7),        # k = N - 1
    (2, 3, 1, None),       # tiniest collection
    (3, 2, 2, 1),          # block of one row
    (1000, 64, 25, 300),   # several strips and tiles
])
def test_top_k_matches_float64_brute_force(method, n, d, k, block):
    x = unit_rows(n, d, seed=n + k)
    index, score = knn.top_k_neighbors(x, k, method=method, block_size=block)
    assert_matches_brute_force(x, k, index, score)


@pytest.mark.parametrize("method", METHODS)
def test_exact_ties_go_to_the_lower_index(method):
    # rows drawn from 4 orthogonal axes: every score is exactly 0 or 1 -> ties everywhere
    axes = np.eye(4, dtype=np.float32)
    x = axes[np.random.default_rng(3).integers(0, 4, size=61)]
    for k in (1, 5, 20, 60):
        index, score = knn.top_k_neighbors(x, k, method=method, block_size=8)
        ref_i, ref_s = brute_force_float64(x, k)  # stable sort: equal scores in index order
        np.testing.assert_array_equal(index, ref_i)
        np.testing.assert_array_equal(score, ref_s.astype(np.float32))


@pytest.mark.parametrize("method", METHODS)
def test_exact_duplicates_are_each_others_first_neighbours(method):
    base = unit_rows(30, 16, seed=5)
    x = np.concatenate([base, base[::-1], base[:7]])  # rows i, 59 - i (and i + 60) are copies
    index, score = knn.top_k_neighbors(x, 3, method=method, block_size=16)
    assert_matches_brute_force(x, 3, index, score)
    for i in range(30):
        copies = sorted({59 - i, *( [i + 60] if i < 7 else [])})
        assert index[i, : len(copies)].tolist() == copies
        np.testing.assert_allclose(score[i, : len(copies)], 1.0, atol=1e-6)


def test_symmetric_and_dense_methods_agree():
    x = unit_rows(700, 32, seed=11)
    a = knn.top_k_neighbors(x, 10, method="symmetric", block_size=128)
    b = knn.top_k_neighbors(x, 10, method="dense", block_size=100)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


def test_clustered_data_with_near_duplicates():
    rng = np.random.default_rng(8)
    centres = unit_rows(12, 48, seed=9)
    x = centres[rng.integers(0, 12, 500)] + 0.05 * rng.standard_normal((500, 48)).astype(np.float32)
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    index, score = knn.top_k_neighbors(x, 10, block_size=96)
    assert_matches_brute_force(x, 10, index, score)


def test_search_finds_query_neighbours_without_self_exclusion():
    x = unit_rows(200, 16, seed=2)
    queries = np.concatenate([x[[5, 17]], unit_rows(3, 16, seed=99)])
    index, score = knn.search(queries, x, 4)
    ref = np.argsort(-(queries.astype(np.float64) @ x.T.astype(np.float64)), axis=1, kind="stable")[:, :4]
    np.testing.assert_array_equal(index, ref)
    assert index[0, 0] == 5 and index[1, 0] == 17  # a query that is in the collection finds itself
    np.testing.assert_allclose(score[:2, 0], 1.0, atol=1e-6)
    one_i, _ = knn.search(queries[2], x, 4)
    np.testing.assert_array_equal(one_i[0], index[2])


def test_select_top_k_breaks_float16_ties_by_lower_index():
    s = torch.tensor([[0.5, 0.25, 0.5, 0.5, 0.125, 0.5],
                      [0.1, 0.2, 0.3, 0.3, 0.3, 0.0]], dtype=torch.float32)
    v, i = knn.select_top_k(s.clone(), 2, col_offset=10)
    assert i.tolist() == [[10, 12], [12, 13]]
    v, i = knn.select_top_k(s.clone(), 3, 0, self_rows=torch.tensor([0, 2]))
    assert i.tolist() == [[2, 3, 5], [3, 4, 1]]


# ------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize("k", [0, -1, 10, 11, 2.5, True])
def test_bad_k_is_rejected(k):
    with pytest.raises(BadValue, match="k = .*must be between 1 and 9") as err:
        knn.top_k_neighbors(unit_rows(10, 3), k)
    assert err.value.as_flag().startswith(f"--k {k}: must be between 1 and 9")


def test_a_non_float_or_flat_array_is_refused_by_the_kernel():
    with pytest.raises(ValueError, match="2-D float array"):
        knn.top_k_neighbors(np.ones(5, np.float32), 1)
    with pytest.raises(ValueError, match="2-D float array"):
        knn.search(np.ones((1, 2), np.int64), unit_rows(4, 2), 1)


def test_cuda_request_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="no CUDA GPU"):
        knn.top_k_neighbors(unit_rows(10, 3), 2, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_gpu_matches_cpu(method):
    x = unit_rows(3000, 64, seed=4)
    gi, gs = knn.top_k_neighbors(x, 10, device="cuda", method=method, block_size=512)
    assert_matches_brute_force(x, 10, gi, gs)
