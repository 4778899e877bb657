"""The 2-D map (paintsim.mapping): t-SNE of planted structure, trustworthiness against
scikit-learn's, and the map_2d.npy + map_2d.json artifact. Real openTSNE, real files, no mocks.

t-SNE runs with n_jobs=1 here: its threads spin, and a 2-core CI machine shared with other jobs
makes two of them many times slower (the library default stays 2)."""
from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
from sklearn.manifold import trustworthiness as sklearn_trustworthiness

from paintsim import mapping
from paintsim.artifacts import DataPaths
from paintsim.embeddings import Embeddings, write_embeddings
from paintsim.errors import BadValue, UserError


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def planted(n_clusters: int = 8, per: int = 40, dim: int = 64, spread: float = 3.0, seed: int = 0):
    """Clusters around random centres, plus unit noise, as unit rows: (features, cluster of each row)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim)) * spread
    labels = np.repeat(np.arange(n_clusters), per)
    return unit(centres[labels] + rng.standard_normal((len(labels), dim))), labels


@pytest.fixture(scope="module")
def planted_map():
    x, labels = planted()
    coords, info = mapping.compute_map_detailed(x, seed=0, n_jobs=1)
    return x, labels, coords, info


def make_embeddings(root, n: int = 40, seed: int = 0) -> Embeddings:
    """A valid data directory (features.npy, image_names.npy, features_meta.json), loaded."""
    x, _ = planted(n_clusters=4, per=n // 4 + 1, dim=16, seed=seed)
    write_embeddings(DataPaths.of(root), x[:n], [f"{i:04d}.jpg" for i in range(n)], {"backbone": "test"})
    return Embeddings.load(root)


# ----------------------------------------------------------------------------------- the map
def test_planted_clusters_give_a_trustworthy_map_with_each_cluster_together(planted_map):
    x, labels, coords, info = planted_map
    assert info["method"] == "tsne" and coords.shape == (320, 2) and coords.dtype == np.float32
    trust = mapping.trustworthiness(x, coords, k=10)
    assert trust["value"] > 0.9 and trust["exact"] and trust["n_queries"] == 320
    d = np.linalg.norm(coords[:, None, :] - coords[None, :, :], axis=2)
    own = np.array([d[i, (labels == labels[i]) & (np.arange(320) != i)].mean() for i in range(320)])
    nearest_other = np.array([min(d[i, labels == c].mean() for c in range(8) if c != labels[i])
                              for i in range(320)])
    assert (own < nearest_other).mean() >= 0.98


def test_exact_neighbours_from_paintsim_knn_give_as_trustworthy_a_map(planted_map):
    x, _, coords, info = planted_map
    exact, exact_info = mapping.compute_map_detailed(x, seed=0, n_jobs=1, knn="exact")
    assert exact_info["neighbours"] == "exact (paintsim.knn)" and info["neighbours"] == "exact (scikit-learn)"
    assert mapping.trustworthiness(x, exact, k=10)["value"] > 0.9


def test_the_map_is_centred_with_its_larger_axis_spanning_minus_one_to_one(planted_map):
    coords = planted_map[2]
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    big = int(np.argmax(hi - lo))
    assert lo[big] == -1.0 and hi[big] == 1.0
    assert abs(lo[1 - big] + hi[1 - big]) < 1e-6 and hi[1 - big] <= 1.0


def test_the_same_seed_gives_the_same_map_and_another_seed_another():
    x, _ = planted(n_clusters=10, per=100, dim=16, seed=3)      # 1,000 rows: Annoy's seeded trees
    a, info = mapping.compute_map_detailed(x, seed=7, n_jobs=1)
    assert info["neighbours"].startswith("annoy")
    assert np.array_equal(a, mapping.compute_map(x, seed=7, n_jobs=1))
    assert not np.allclose(a, mapping.compute_map(x, seed=8, n_jobs=1), atol=1e-3)


@pytest.mark.parametrize("n,method", [(1, "pca"), (2, "pca"), (3, "pca"), (4, "pca"), (5, "tsne"), (6, "tsne")])
def test_tiny_collections_get_a_map_and_say_which_method_ran(n, method):
    x, _ = planted(n_clusters=2, per=3, dim=8, seed=1)
    coords, info = mapping.compute_map_detailed(x[:n], seed=0, n_jobs=1)
    assert coords.shape == (n, 2) and coords.dtype == np.float32 and np.isfinite(coords).all()
    assert info["method"] == method and np.abs(coords).max() == (1.0 if n > 1 else 0.0)
    if method == "tsne":
        assert info["perplexity"] == pytest.approx((n - 1) / 3)
    else:
        assert "at least 5 rows" in info["fallback"]


def test_pca_map_is_the_first_two_principal_components():
    x, _ = planted(n_clusters=4, per=30, dim=32, seed=2)
    coords = mapping.compute_map(x, method="pca")
    centred = x.astype(np.float64) - x.mean(axis=0)
    ref = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    for axis in range(2):  # equal up to sign and one common scale
        assert abs(np.corrcoef(coords[:, axis], ref[:, axis])[0, 1]) > 0.9999


def test_bad_parameters_are_refused_by_name():
    x, _ = planted(n_clusters=2, per=10, dim=8)
    with pytest.raises(BadValue, match="perplexity"):
        mapping.compute_map(x, perplexity=0)
    with pytest.raises(BadValue, match="method"):
        mapping.compute_map(x, method="umap")
    with pytest.raises(BadValue, match=r"k = 10: .*N / 2 = 10"):
        mapping.trustworthiness(x, mapping.compute_map(x, method="pca"), k=10)
    with pytest.raises(ValueError, match="L2-normalised"):
        mapping.compute_map(x * 2)


# ------------------------------------------------------------------------------ trustworthiness
def test_exact_trustworthiness_equals_sklearn_on_200_points():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((200, 24)) + 0.5          # rows not unit: cosine is still the measure
    coords = x[:, :2] + 0.3 * rng.standard_normal((200, 2))
    for k in (1, 5, 10, 40):
        ours = mapping.trustworthiness(x, coords, k=k, n_queries=None)
        ref = sklearn_trustworthiness(x, coords, n_neighbors=k, metric="cosine")
        assert ours["exact"] and ours["ci95"] == [ours["value"], ours["value"]]
        assert ours["value"] == pytest.approx(ref, abs=1e-12), k


def test_sampled_trustworthiness_agrees_with_sklearn_within_its_interval():
    x, _ = planted(n_clusters=10, per=50, dim=32, spread=1.0, seed=4)
    coords = mapping.compute_map(x, method="pca")
    ref = sklearn_trustworthiness(x, coords, n_neighbors=10, metric="cosine")
    est = mapping.trustworthiness(x, coords, k=10, n_queries=150, seed=0)
    lo, hi = est["ci95"]
    assert not est["exact"] and est["n_queries"] == 150 and est["n"] == 500
    assert lo <= ref <= hi and hi - lo < 0.1
    assert abs(est["value"] - ref) < 0.03


def test_a_shuffled_map_scores_near_the_reported_chance_level(planted_map):
    x, _, coords, _ = planted_map
    shuffled = coords[np.random.default_rng(0).permutation(len(coords))]
    trust = mapping.trustworthiness(x, shuffled, k=10)
    n, k = 320, 10
    assert trust["chance"] == pytest.approx(1 - (n - 1 - k) * (n - k) / ((n - 1) * (2 * n - 3 * k - 1)))
    assert abs(trust["value"] - trust["chance"]) < 0.03
    # the derived level is the mean over random maps: 20 shuffles average close to it
    values = [mapping.trustworthiness(x, coords[np.random.default_rng(s).permutation(n)], k=k)["value"]
              for s in range(1, 21)]
    assert abs(np.mean(values) - trust["chance"]) < 0.006


def brute_trustworthiness(x: np.ndarray, coords: np.ndarray, k: int) -> float:
    """The documented rule by loops: ranks by cosine, ties to the lower index, both spaces."""
    n = len(x)
    sim = (x @ x.T) / np.outer(np.linalg.norm(x, axis=1), np.linalg.norm(x, axis=1))
    total = 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        rank = {j: r + 1 for r, j in enumerate(sorted(others, key=lambda j: (-sim[i, j], j)))}
        on_map = sorted(others, key=lambda j: (float(((coords[i] - coords[j]) ** 2).sum()), j))[:k]
        total += sum(max(0, rank[j] - k) for j in on_map)
    return 1 - 2 * total / (n * k * (2 * n - 3 * k - 1))


def test_tied_similarities_and_distances_rank_the_lower_index_first():
    rows = [r for r in itertools.combinations(range(8), 3)][:40]     # three ones among eight: ties
    x = np.zeros((40, 8), np.float32)
    for i, r in enumerate(rows):
        x[i, list(r)] = 1.0
    coords = np.random.default_rng(0).integers(0, 4, size=(40, 2)).astype(np.float32)  # map ties too
    for k in (1, 3, 7):
        assert mapping.trustworthiness(x, coords, k=k)["value"] == pytest.approx(
            brute_trustworthiness(x.astype(np.float64), coords, k), abs=1e-12)


def test_trustworthiness_reads_a_read_only_memory_map_in_blocks(tmp_path, monkeypatch):
    x, _ = planted(n_clusters=5, per=20, dim=16, seed=6)
    np.save(tmp_path / "f.npy", x)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    coords = mapping.compute_map(mm, method="pca")
    whole = mapping.trustworthiness(x, coords, k=5)["value"]
    monkeypatch.setattr(mapping, "_TRUST_BYTES", 25 * 100 * 7)   # blocks of 7 queries
    assert mapping.trustworthiness(mm, coords, k=5)["value"] == pytest.approx(whole, abs=1e-12)


# ---------------------------------------------------------------------------------- the artifact
def test_the_map_round_trips_through_its_files_and_is_reused(tmp_path):
    emb = make_embeddings(tmp_path)
    made = mapping.map_for(emb, seed=0, perplexity=30.0, k=5, n_jobs=1)
    paths = DataPaths.of(tmp_path)
    assert paths.map_2d.exists() and paths.map_meta.exists()
    record = json.loads(paths.map_meta.read_text())
    assert {"method", "asked", "parameters", "seed", "n", "features_sha256", "trustworthiness", "seconds",
            "created", "versions", "map"} <= set(record)
    assert record["features_sha256"] == emb.sha256 and record["n"] == 40 and record["method"] == "tsne"
    assert record["parameters"]["perplexity"] == pytest.approx(13.0)      # clamped to (N - 1) / 3
    assert record["trustworthiness"]["k"] == 5 and set(record["versions"]) >= {"openTSNE", "numpy"}
    loaded = mapping.load_map(Embeddings.load(tmp_path))
    assert np.array_equal(loaded.coords, made.coords) and loaded.record == record
    before = paths.map_2d.stat().st_mtime_ns
    again = mapping.map_for(emb, seed=0, perplexity=30.0, k=5, n_jobs=1)          # current: reused
    assert paths.map_2d.stat().st_mtime_ns == before and again.record["created"] == record["created"]
    other_k = mapping.map_for(emb, seed=0, perplexity=30.0, k=3, n_jobs=1)        # same map, new measure
    assert np.array_equal(other_k.coords, made.coords) and other_k.record["trustworthiness"]["k"] == 3
    other_seed = mapping.map_for(emb, seed=1, perplexity=30.0, k=3, n_jobs=1)     # another map
    assert other_seed.record["seed"] == 1 and not np.array_equal(other_seed.coords, made.coords)


def test_tiny_collections_make_a_map_artifact(tmp_path):
    for n in (2, 3, 6):
        emb = make_embeddings(tmp_path / str(n), n=n)
        result = mapping.map_for(emb, k=10, n_jobs=1)
        assert result.coords.shape == (n, 2)
        assert result.record["method"] == ("pca" if n < 5 else "tsne")
        trust = result.record["trustworthiness"]
        assert (trust is None) if n == 2 else (trust["k"] == (n - 1) // 2)
        assert mapping.load_map(emb) is not None


def test_a_map_of_other_features_is_not_used(tmp_path, caplog):
    emb = make_embeddings(tmp_path, seed=0)
    mapping.map_for(emb, k=5, n_jobs=1)
    newer = make_embeddings(tmp_path, seed=1)                           # same N, other features
    with caplog.at_level(logging.WARNING, logger="paintsim.mapping"):
        assert mapping.load_map(newer) is None
    assert "other features (stale)" in caplog.text
    remade = mapping.map_for(newer, k=5, n_jobs=1)
    assert remade.record["features_sha256"] == newer.sha256 != emb.sha256


def _damage_shape(paths):
    np.save(paths.map_2d, np.zeros((40, 3), np.float32))


def _damage_nan(paths):
    coords = np.load(paths.map_2d)
    coords[7, 1] = np.nan
    np.save(paths.map_2d, coords)


def _damage_dtype(paths):
    np.save(paths.map_2d, np.zeros((40, 2), np.float64))


def _damage_bytes(paths):
    paths.map_2d.write_bytes(b"this is not a numpy file")


def _damage_record(paths):
    paths.map_meta.write_text("{not json")


@pytest.mark.parametrize("damage,name", [(_damage_shape, "map_2d.npy"), (_damage_nan, "map_2d.npy"),
                                         (_damage_dtype, "map_2d.npy"), (_damage_bytes, "map_2d.npy"),
                                         (_damage_record, "map_2d.json")])
def test_a_damaged_map_file_is_one_user_error_line(tmp_path, damage, name):
    emb = make_embeddings(tmp_path)
    mapping.map_for(emb, method="pca", k=5)
    damage(DataPaths.of(tmp_path))
    with pytest.raises(UserError) as info:
        mapping.load_map(emb)
    message = str(info.value)
    assert name in message and "rerun explore_collection.py" in message and "\n" not in message
