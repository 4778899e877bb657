"""The metadata boost: exact re-ranking (equal to a brute force over all pairs), its flags, its table."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import run_script
from paintsim.boost import Boost, boosted_top_k
from paintsim.errors import BadValue
from paintsim.neighbours import load_table
from reference import boosted_brute_force as brute_force
from synthetic_collection import make_collection


def _realistic(n: int, d: int, seed: int, clusters: int = 6) -> np.ndarray:
    """Anisotropic rows like real embeddings: a shared direction plus clusters (cosines ~0.5-0.9),
    with exact duplicates."""
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=d)
    centres = rng.normal(size=(clusters, d))
    x = 2.0 * mean / np.linalg.norm(mean) * np.sqrt(d) + centres[rng.integers(0, clusters, n)] \
        + 0.7 * rng.normal(size=(n, d))
    x[5] = x[3]
    x[n - 1] = x[3]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.mark.parametrize("mix,seed", [(0.3, 0), (0.8, 1), (1.0, 2), (0.05, 3)])
def test_boosted_table_equals_brute_force_reranking_of_all_pairs(mix, seed):
    feats = _realistic(150, 24, seed)
    rng = np.random.default_rng(seed + 10)
    codes = np.stack([rng.integers(-1, 4, len(feats)), rng.integers(-1, 12, len(feats))])
    boost = Boost.parse("attribution=0.3,medium=0.1", mix)
    want_i, want_s = brute_force(feats, codes, boost, 7)
    got_i, got_s, stats = boosted_top_k(feats, codes, boost, 7, initial=8)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_s, want_s)
    assert stats["initial_candidates"] == 8 and stats["max_candidates"] >= 8


def test_a_strong_boost_widens_the_search_until_no_neighbour_can_be_missed():
    # the boost outweighs any visual difference: the top-k are the same-label paintings wherever
    # they rank visually, which a search of only 2k visual candidates cannot see
    feats = _realistic(120, 16, 5)
    codes = (np.arange(120) % 10)[None, :]
    boost = Boost.parse("attribution=1", 0.9)
    got_i, _, stats = boosted_top_k(feats, codes, boost, 5, initial=6)
    want_i, _ = brute_force(feats, codes, boost, 5)
    np.testing.assert_array_equal(got_i, want_i)
    assert stats["rounds"] > 1 and stats["rows_widened"] > 0
    assert (codes[0][got_i] == codes[0][:, None]).all()


def test_unknown_values_never_agree():
    feats = _realistic(30, 8, 7)
    codes = np.full((1, 30), -1)
    boost = Boost.parse("attribution=0.5", 0.5)
    _, s, _ = boosted_top_k(feats, codes, boost, 3)
    _, plain = brute_force(feats, np.full((1, 30), -1), boost, 3)
    np.testing.assert_array_equal(s, plain)
    # no agreement: the final score is (1 - mix) x cosine
    i, s, _ = boosted_top_k(feats, codes, boost, 3)
    np.testing.assert_allclose(s, 0.5 * np.einsum("nd,nkd->nk", feats.astype(np.float64),
                                                  feats[i].astype(np.float64)), atol=1e-6)


@pytest.mark.parametrize("text,why", [("attribution", "FIELD=WEIGHT"), ("attribution=-1", "positive"),
                                      ("attribution=x", "not a number"), ("a=1,a=2", "twice")])
def test_bad_boost_specs_are_refused_naming_the_flag(text, why):
    with pytest.raises(BadValue) as exc:
        Boost.parse(text)
    assert exc.value.name == "boost" and why in str(exc.value)


def test_optimized_similarity_boost_writes_an_exact_boosted_table_with_its_record(tmp_path):
    c = make_collection(tmp_path, n_random=40, n_groups=4, copies=2, dim=32, seed=3, with_table=False)
    out = run_script("optimized_similarity.py", "--data-dir", tmp_path, "--k", "5", "--boost",
                     "attribution=0.3,century=0.1", "--boost-mix", "0.4", "--no-progress", "--device", "cpu")
    assert "exact" in out.stdout and "candidates per painting" in out.stdout
    table = load_table(tmp_path / "top_5_boosted.npy", len(c["names"]))
    assert table.route == "boosted"
    assert table.record["boost"]["fields"] == {"attribution": 0.3, "century": 0.1}
    assert table.record["boost"]["mix"] == 0.4
    assert table.record["boost"]["candidates"]["mean_candidates"] >= 5
    # the same as the brute force with the manifest's codes
    from paintsim.artifacts import DataPaths
    from paintsim.boost import field_codes

    boost = Boost.parse("attribution=0.3,century=0.1", 0.4)
    codes = field_codes(DataPaths.of(tmp_path), c["names"], boost)
    want_i, want_s = brute_force(c["features"], codes, boost, 5)
    np.testing.assert_array_equal(table.index, want_i)
    np.testing.assert_array_equal(table.score, want_s)
    # a boosted table is never what the lookup finds
    assert not (tmp_path / "top_5_similar.npy").exists()
    bad = run_script("optimized_similarity.py", "--data-dir", tmp_path, "--boost", "nosuchcolumn=1",
                     "--no-progress", check=False)
    assert bad.returncode == 2 and "--boost" in bad.stderr and "nosuchcolumn" in bad.stderr
