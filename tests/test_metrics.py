"""Hand-computed cases for every number of the evaluation report (paintsim.metrics, paintsim.evaluate)."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from paintsim import metrics
from paintsim.evaluation import retrieval, similarity


def test_precision_recall_ap_match_hand_computed_ranking():
    # ranks:       1  2  3  4     R = 3 relevant items in the collection
    rel = np.array([[1, 0, 1, 0]], dtype=bool)
    r = np.array([3])
    assert metrics.precision_at_k(rel, 1)[0] == 1.0
    assert metrics.precision_at_k(rel, 2)[0] == 0.5
    assert metrics.precision_at_k(rel, 4)[0] == 0.5
    assert metrics.recall_at_k(rel, r, 1)[0] == pytest.approx(1 / 3)
    assert metrics.recall_at_k(rel, r, 4)[0] == pytest.approx(2 / 3)
    # AP@4 = (P@1 + P@3) / min(R, 4) = (1 + 2/3) / 3
    assert metrics.average_precision_at_k(rel, r, 4)[0] == pytest.approx((1 + 2 / 3) / 3)
    # AP@2 = P@1 / min(3, 2) = 1/2
    assert metrics.average_precision_at_k(rel, r, 2)[0] == pytest.approx(0.5)


def test_ap_is_one_when_the_first_min_r_k_results_are_relevant():
    rel = np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    r = np.array([2, 9])
    np.testing.assert_allclose(metrics.average_precision_at_k(rel, r, 5), [1.0, 1.0])
    # one relevant item found at rank 2 of 3: AP@3 = (1/2) / 1
    assert metrics.average_precision_at_k(np.array([[0, 1, 0]], bool), np.array([1]), 3)[0] == 0.5


def test_mean_over_queries_and_unknown_labels_never_match():
    labels = np.array([[0, 1, -1], [-1, -1, 2]])
    query = np.array([0, -1])
    rel = metrics.relevance_matrix(labels, query)
    assert rel.tolist() == [[True, False, False], [False, False, False]]


def test_recall_and_ap_refuse_queries_without_relevant_items():
    with pytest.raises(ValueError, match="no relevant"):
        metrics.recall_at_k(np.ones((1, 2), bool), np.array([0]), 1)
    with pytest.raises(ValueError, match="k=3"):
        metrics.precision_at_k(np.ones((1, 2), bool), 3)


def test_f1_hand_computed_and_zero_when_nothing_found():
    np.testing.assert_allclose(metrics.f1_score([1.0, 0.5, 0.0], [0.2, 0.5, 0.0]),
                               [2 * 0.2 / 1.2, 0.5, 0.0])


def test_retrieval_section_counts_only_queries_with_another_member():
    # rows 0,1 artist A; 2,3,4 artist B; 5 alone; 6 unknown
    codes = np.array([0, 0, 1, 1, 1, 2, -1])
    index = np.array([[1, 2], [2, 0], [3, 4], [0, 1], [2, 3], [0, 1], [0, 1]])
    out = retrieval.retrieval_section(index, codes, ["A", "B", "C"], ks=(1, 2))
    assert out["n_queries"] == 5
    # precision@1: rows 0,1,2,3,4 -> 1,0,1,0,1
    assert out["precision@1"] == pytest.approx(3 / 5)
    # recall@2 (R = 1,1,2,2,2): hits 1,1,2,0,2 -> 1,1,1,0,1
    assert out["recall@2"] == pytest.approx(4 / 5)
    # AP@2: row0 1; row1 (0+1/2)/1 = .5; row2 1; row3 0; row4 1
    assert out["mAP@2"] == pytest.approx(3.5 / 5)
    # random ranking: R/(N-1) averaged = (1+1+2+2+2)/6/5
    assert out["random_precision"] == pytest.approx(8 / 6 / 5)


def test_intra_and_inter_hand_computed():
    # two tight pairs of paintings on orthogonal axes
    f = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=np.float32)
    index = np.array([[1], [0], [3], [2]])
    np.testing.assert_allclose(similarity.neighbor_similarities(f, index), np.ones((4, 1)))
    sims = similarity.pair_similarities(f, np.array([0, 0, 2, 1]), np.array([1, 2, 3, 3]))
    np.testing.assert_allclose(sims, [1, 0, 1, 0])
    # 6 distinct pairs <= 10 asked: every pair once, 2 of them similar -> exactly 1/3
    i, j, inter = similarity.inter_similarity(f, 10, seed=1)
    assert len(inter) == 6 and np.all(i < j)
    assert inter.mean() == pytest.approx(1 / 3, abs=1e-7)
    # sampled: each row has 1 same-axis partner among 3 others -> expected mean 1/3
    i, j, inter = similarity.inter_similarity(f, 5, seed=1)
    assert len(inter) == 5 and np.all(i != j)
    i, j, inter = similarity.inter_similarity(np.repeat(f, 50, axis=0), 40_000, seed=1)
    assert np.all(i != j)
    # 200 rows, 100 per axis: each row has 99 same-axis partners among 199 others
    assert inter.mean() == pytest.approx(99 / 199, abs=0.01)


def test_inter_cannot_be_computed_from_the_neighbour_table():
    # an earlier project's mistake: "inter" taken as the mean of the top-k table. The function that
    # computes inter takes the features and a seed, nothing else.
    params = list(inspect.signature(similarity.inter_similarity).parameters)
    assert params == ["features", "n_pairs", "seed", "progress"]


def test_random_pairs_are_uniform_over_ordered_pairs_without_self():
    i, j = similarity.random_pairs(3, 60_000, seed=0)
    assert np.all(i != j)
    counts = np.bincount(i * 3 + j, minlength=9).reshape(3, 3)
    assert np.all(np.diag(counts) == 0)
    off = counts[~np.eye(3, dtype=bool)]
    assert off.min() > 0.9 * 10_000 and off.max() < 1.1 * 10_000
    # seeded: the same pairs again
    i2, j2 = similarity.random_pairs(3, 60_000, seed=0)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)


def test_separation_auc_and_gap():
    s = metrics.separation([1.0, 1.0], [0.0, 0.0, 0.0])
    assert s["auc"] == 1.0 and s["gap"] == 1.0
    assert metrics.separation([0.5, 0.5], [0.5])["auc"] == 0.5
    # within = [0.2, 0.8], between = [0.5]: one above, one below
    assert metrics.separation([0.2, 0.8], [0.5])["auc"] == 0.5


def test_ssim_of_identical_images_is_one():
    rng = np.random.default_rng(0)
    x = rng.random((40, 50))
    assert metrics.ssim(x, x) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_images_matches_the_formula():
    x = np.full((20, 20), 0.5)
    y = np.full((20, 20), 0.25)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5 ** 2 + 0.25 ** 2 + c1)  # variance terms give c2 / c2
    assert metrics.ssim(x, y) == pytest.approx(expected, rel=1e-9)


def test_ssim_drops_with_noise_and_goes_negative_for_an_inverted_image():
    rng = np.random.default_rng(1)
    x = rng.random((64, 64))
    slight = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    heavy = np.clip(x + rng.normal(0, 0.4, x.shape), 0, 1)
    assert 1 > metrics.ssim(x, slight) > metrics.ssim(x, heavy)
    assert metrics.ssim(x, 1 - x) < 0
    assert metrics.ssim(x, slight) == pytest.approx(metrics.ssim(slight, x))


@pytest.mark.parametrize("shape,seed", [((128, 128), 0), ((40, 73), 1), ((11, 11), 2)])
def test_ssim_equals_scikit_image_reference(shape, seed):
    # Wang et al.'s settings in scikit-image: Gaussian window (sigma 1.5, 11 x 11 at truncate 3.5),
    # population covariance, data range 1; its mean over the region cropped by 5 px is our valid region
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    for y in (np.clip(x + rng.normal(0, 0.1, shape), 0, 1), rng.random(shape), 1 - x):
        ref = structural_similarity(x, y, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False)
        assert metrics.ssim(x, y) == pytest.approx(ref, abs=1e-6)


def test_ssim_rejects_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="one shape"):
        metrics.ssim(np.zeros((20, 20)), np.zeros((20, 21)))
    with pytest.raises(ValueError, match="at least 11"):
        metrics.ssim(np.zeros((5, 5)), np.zeros((5, 5)))


def test_rmse_hand_computed():
    assert metrics.rmse(np.zeros((4, 4)), np.ones((4, 4))) == 1.0
    assert metrics.rmse(np.array([0.0, 0.0]), np.array([0.3, 0.4])) == pytest.approx(np.sqrt(0.125))


# --------------------------------------------------------------------------- chance and bootstrap

def _all_rankings(m: int, r: int, k: int) -> np.ndarray:
    """Every ordered choice of k of m candidates (the first r relevant) as a relevance matrix."""
    from itertools import permutations

    return np.array([[c < r for c in p] for p in permutations(range(m), k)], dtype=bool)


@pytest.mark.parametrize("m", [2, 6])
def test_chance_levels_equal_the_mean_over_every_possible_ranking(m):
    # exact: a random ranking is each ordered k-subset with equal probability
    for r in range(1, m + 1):
        for k in range(1, m + 1):
            rel = _all_rankings(m, r, k)
            rr = np.full(len(rel), r)
            hits = rel.sum(axis=1)
            assert metrics.chance_precision_at_k([r], m, k)[0] == pytest.approx(
                metrics.precision_at_k(rel, k).mean(), abs=1e-12)
            assert metrics.chance_recall_at_k([r], m, k)[0] == pytest.approx(
                metrics.recall_at_k(rel, rr, k).mean(), abs=1e-12)
            assert metrics.chance_average_precision_at_k([r], m, k)[0] == pytest.approx(
                metrics.average_precision_at_k(rel, rr, k).mean(), abs=1e-12), (m, r, k)
            assert metrics.chance_f1_at_k([r], m, k)[0] == pytest.approx(
                metrics.f1_score(hits / k, hits / r).mean(), abs=1e-12)


def test_chance_levels_match_a_simulated_random_ranking_of_a_large_collection():
    # 200 candidates, k up to 10 (too many rankings to enumerate): 40,000 shuffles per case
    rng = np.random.default_rng(0)
    m, trials = 200, 40_000
    for r in (1, 4, 30):
        top = np.argpartition(rng.random((trials, m)), 10, axis=1)[:, :10]
        top = np.take_along_axis(top, np.argsort(rng.random(top.shape), axis=1), axis=1)  # random order
        rel = top < r
        rr = np.full(trials, r)
        for k in (1, 5, 10):
            for chance, sim in ((metrics.chance_precision_at_k, metrics.precision_at_k(rel, k)),
                                (metrics.chance_recall_at_k, metrics.recall_at_k(rel, rr, k)),
                                (metrics.chance_average_precision_at_k, metrics.average_precision_at_k(rel, rr, k))):
                se = sim.std() / np.sqrt(trials)
                assert abs(chance([r], m, k)[0] - sim.mean()) < 4 * se + 1e-9, (chance.__name__, r, k)


def test_chance_levels_refuse_impossible_counts():
    with pytest.raises(ValueError, match="chance"):
        metrics.chance_precision_at_k([0], 10, 1)
    with pytest.raises(ValueError, match="chance"):
        metrics.chance_average_precision_at_k([11], 10, 1)


def test_bootstrap_interval_covers_the_true_mean_95_percent_of_the_time():
    # per-query hits drawn with a known rate; the 95% interval must contain it about 95% of the time
    rng = np.random.default_rng(123)
    for p, q in ((0.3, 60), (0.1, 200)):
        covered = [metrics.contains(metrics.bootstrap_ci(rng.random(q) < p, seed=t), p) for t in range(400)]
        assert 0.91 <= np.mean(covered) <= 0.98, (p, q, np.mean(covered))
    # per-query precision@5 (binomial / 5) of 80 queries, population mean 0.2
    covered = [metrics.contains(metrics.bootstrap_ci(rng.binomial(5, 0.2, 80) / 5, seed=t), 0.2)
               for t in range(400)]
    assert 0.91 <= np.mean(covered) <= 0.98


def test_bootstrap_is_the_percentile_interval_of_resampled_means_and_is_seeded():
    rng = np.random.default_rng(5)
    v = rng.random((70, 3))
    lo, hi = metrics.bootstrap_ci(v, n_boot=800, seed=9)
    # reference: resample the queries with replacement, recompute the mean, take the percentiles
    idx = np.random.default_rng(9).integers(0, 70, size=(800, 70))
    ref = np.quantile(v[idx].mean(axis=1), [0.025, 0.975], axis=0)
    np.testing.assert_allclose([lo, hi], ref, atol=1e-12)
    assert metrics.bootstrap_ci(v[:, 0], n_boot=800, seed=9) == pytest.approx((lo[0], hi[0]))
    assert metrics.bootstrap_ci(v[:, 0], seed=1) != metrics.bootstrap_ci(v[:, 0], seed=2)
    assert metrics.bootstrap_ci(np.full(30, 0.4)) == pytest.approx((0.4, 0.4))
    # wider with fewer queries
    few, many = metrics.bootstrap_ci(v[:10, 0]), metrics.bootstrap_ci(rng.random(1000))
    assert few[1] - few[0] > many[1] - many[0]
    with pytest.raises(ValueError, match="bootstrap"):
        metrics.bootstrap_ci(np.zeros(0))


def test_bootstrap_of_many_queries_works_in_blocks_with_the_normal_width():
    # 20,000 queries: the resamples are drawn in blocks; the width is the textbook 2 * 1.96 * sd / sqrt(Q)
    v = (np.random.default_rng(3).random(20_000) < 0.5).astype(float)
    lo, hi = metrics.bootstrap_ci(v, seed=0)
    assert lo < v.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * v.std() / np.sqrt(v.size), rel=0.15)
