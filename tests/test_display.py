"""display_similar.py: resolving a query, the neighbour figure, and outside images (real model)."""
from __future__ import annotations

import functools
import json
import http.server
import threading

import numpy as np
import pytest
from PIL import Image

from helpers import SAMPLE_DIR, run_script
from paintsim import figures, query
from paintsim.errors import UserError
from paintsim.perturb import perturb
from synthetic_collection import make_collection


@pytest.fixture()
def synthetic(tmp_path):
    return make_collection(tmp_path / "data", n_random=20, n_groups=2, k=10)


def test_query_resolves_row_file_uuid_and_objectid(synthetic):
    coll = query.Collection.open(synthetic["root"])
    names, uuids = synthetic["names"], synthetic["uuids"]
    assert query.resolve_query("3", coll) == 3
    assert query.resolve_query("-1", coll) == len(names) - 1
    assert query.resolve_query(names[7], coll) == 7
    assert query.resolve_query(f"images/{names[7]}", coll) == 7
    assert query.resolve_query(uuids[9].upper(), coll) == 9
    assert query.resolve_query("1012", coll) == 12  # objectid 1000 + row (no such row)
    assert query.resolve_query("objectid:1005", coll) == 5
    assert query.resolve_query("row:5", coll) == 5
    assert query.resolve_query(f"uuid:{uuids[2]}", coll) == 2


def test_query_not_in_the_collection_gets_a_clear_message(synthetic):
    coll = query.Collection.open(synthetic["root"])
    for q in ("missing.jpg", "00000000-0000-4000-8000-000000000000", "999999", "row:28", "objectid:5"):
        with pytest.raises(UserError, match="not in the collection|rows 0..27") as err:
            query.resolve_query(q, coll)
        if "row:" not in q:
            assert "--image" in str(err.value)


def test_a_number_that_is_both_a_row_and_an_objectid_is_refused_as_ambiguous(tmp_path):
    data = make_collection(tmp_path / "d", n_random=1005, n_groups=0)  # rows up to 1004, objectids from 1000
    coll = query.Collection.open(data["root"])
    with pytest.raises(UserError, match="ambiguous.*row:1003 or objectid:1003"):
        query.resolve_query("1003", coll)
    assert query.resolve_query("2004", coll) == 1004  # an objectid beyond the last row
    assert query.resolve_query("objectid:1003", coll) == 3 and query.resolve_query("row:1003", coll) == 1003


def test_query_matches_an_id_column_of_ones_own_and_a_title(synthetic):
    from paintsim.manifest import read_manifest, write_manifest

    root = synthetic["root"]
    m = read_manifest(root / "manifest.csv")
    m["item_id"] = [f"INV-{i:03d}" for i in range(len(m))]
    m["museum"] = ["Met" if i % 2 else "Louvre" for i in range(len(m))]  # not unique: not an id
    write_manifest(root / "manifest.csv", m)
    coll = query.Collection.open(root)
    assert query.resolve_query("INV-007", coll) == 7
    assert query.resolve_query("item_id:INV-011", coll) == 11
    assert query.resolve_query(f"key:{synthetic['uuids'][5]}", coll) == 5
    assert query.resolve_query("Painting 13", coll) == 13          # one exact title
    assert query.resolve_query("title:painting 4", coll) == 4     # without case
    with pytest.raises(UserError, match="Met.* matches 14 paintings"):
        query.resolve_query("museum:Met", coll)
    with pytest.raises(UserError) as err:
        query.resolve_query("Painting", coll)
    msg = str(err.value)
    assert "matches 28 paintings" in msg and "row:0 ('Painting 0' by" in msg and "and 18 more" in msg
    assert "row:N or key:KEY" in msg


def test_random_query_is_seeded(synthetic):
    coll = query.Collection.open(synthetic["root"])
    picks = {query.random_query(coll, s) for s in range(20)}
    assert query.random_query(coll, 4) == query.random_query(coll, 4)
    assert len(picks) > 5


def test_neighbour_figure_has_the_expected_size_and_is_not_blank(tmp_path):
    imgs = [Image.new("RGB", (60, 90), (40 * i, 90, 200 - 30 * i)) for i in range(4)]
    out = figures.neighbor_grid(imgs[0], "QUERY: a title\nan artist", imgs[1:] + [None],
                                ["t1\na1\nscore 0.9", "t2", "t3", "t4"], tmp_path / "f.png", title="test")
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (275 + 40, 5 * 200, 3)
    assert img.std() > 20
    # the query tile carries its colour: the image is drawn, not only the captions
    assert (np.abs(img.astype(int) - [0, 90, 200]).sum(axis=2) < 30).sum() > 1000


def test_display_script_uses_the_neighbour_table_and_names_the_figure_after_the_query(synthetic):
    root = synthetic["root"]
    proc = run_script("display_similar.py", "--data-dir", root, "--query", synthetic["names"][4], "--k", "5")
    stem = synthetic["names"][4].removesuffix(".jpg")
    out = root / "figures" / f"similar_row4_{stem}.png"
    assert out.exists() and str(out) in proc.stdout
    assert "top_10_similar.npy" in proc.stdout
    expected = synthetic["index"][4][:5]
    listed = [int(line.split("[row ")[1].split(",")[0]) for line in proc.stdout.splitlines() if "[row " in line]
    assert listed == expected.tolist()
    img = np.asarray(Image.open(out).convert("L"))
    assert img.shape == (275 + 70, 6 * 200) and img.std() > 10  # a three-line heading
    bad = run_script("display_similar.py", "--data-dir", root, "--query", "nope.jpg", check=False)
    assert bad.returncode == 2 and "not in the collection" in bad.stderr and "Traceback" not in bad.stderr
    # the heading names the painting, not its row, and says what a score means here
    assert "query: 'Painting 4' by" in proc.stdout
    assert "random pairs of this collection score" in proc.stdout


def test_all_lists_every_paintings_neighbours_with_titles_in_one_csv(synthetic):
    import pandas as pd

    root = synthetic["root"]
    proc = run_script("display_similar.py", "--data-dir", root, "--all", "--k", "3", "--no-progress")
    assert "84 neighbours of 28 paintings (k = 3)" in proc.stdout
    df = pd.read_csv(root / "neighbours.csv", dtype=str, keep_default_na=False)
    assert list(df.columns) == query.NEIGHBOURS_CSV_COLUMNS and len(df) == 28 * 3
    index = synthetic["index"][:, :3]
    assert df["neighbour_row"].astype(int).tolist() == index.ravel().tolist()
    assert df["query_title"].iloc[5] == "Painting 1" and df["rank"].iloc[5] == "3"
    assert df["neighbour_title"].iloc[5] == f"Painting {index[1, 2]}"
    assert np.allclose(df["score"].astype(float), synthetic["score"][:, :3].ravel(), atol=1e-4)
    assert not (root / "figures").exists()  # figures only when asked for
    run_script("display_similar.py", "--data-dir", root, "--all", "--k", "2", "--figures", "--no-progress",
               "--output", root / "two.csv")
    assert len(list((root / "figures").glob("similar_row*.png"))) == 28


# ----------------------------------------------------------------------------- real model

@pytest.fixture(scope="module")
def sample_data(tmp_path_factory, mobilenet_weights):
    """The 79 real sample paintings, embedded with the real ImageNet MobileNetV2 (no table)."""
    root = tmp_path_factory.mktemp("sample") / "data"
    run_script("download_images.py", "--data-dir", root, "--csv-dir", SAMPLE_DIR, "--images-from",
               SAMPLE_DIR / "images", "--no-progress")
    run_script("extract_features.py", "--data-dir", root, "--backbone", "mobilenet_v2", "--no-progress",
               "--device", "cpu")
    return root


def _outside_copy(root, row: int, dest):
    names = np.load(root / "image_names.npy")
    img = Image.open(root / "images" / names[row]).convert("RGB")
    copy = perturb(img, "combo", np.random.default_rng(row)).resize((300, int(300 * img.height / img.width)))
    copy.save(dest, quality=80)
    return names[row]


def test_outside_image_finds_the_sample_painting_it_was_made_from(sample_data, tmp_path):
    # a "photograph" of a painting (cropped, tilted, other colours, recompressed, resized), saved
    # as a file outside the collection and read back as the CLI reads it
    with pytest.raises(UserError, match="no such file"):
        query.load_outside_image(str(tmp_path / "missing.jpg"))
    from paintsim.embedder import Embedder

    coll = query.Collection.open(sample_data)
    embedder = Embedder.from_meta(json.loads((sample_data / "features_meta.json").read_text()), device="cpu")
    rows = list(range(0, len(coll), 6))
    photos = []
    for row in rows:
        _outside_copy(sample_data, row, tmp_path / f"photo_{row}.jpg")
        photos.append(query.load_outside_image(str(tmp_path / f"photo_{row}.jpg")))
    vecs = embedder.embed(photos)
    for row, vec in zip(rows, vecs):
        found, scores = query.search_outside(coll, vec[None, :], 3, device="cpu")
        assert found[0] == row, (row, found, scores)


@pytest.fixture()
def http_dir(tmp_path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield tmp_path, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_outside_image_by_url_is_fetched_bounded_and_found(sample_data, http_dir):
    folder, base = http_dir
    name = _outside_copy(sample_data, 12, folder / "painting.jpg")
    proc = run_script("display_similar.py", "--data-dir", sample_data, "--image", f"{base}/painting.jpg",
                      "--k", "3", "--device", "cpu")
    first = [line for line in proc.stdout.splitlines() if line.strip().startswith("1.")][0]
    assert str(name).rsplit(".", 1)[0] in first  # listed by its key
    with pytest.raises(UserError, match="exceeds the 1000-byte limit"):
        query.fetch_url(f"{base}/painting.jpg", max_bytes=1000)
    with pytest.raises(UserError, match="HTTP 404"):
        query.fetch_url(f"{base}/missing.jpg")
    (folder / "page.jpg").write_text("<html><body>not an image</body></html>")
    bad = run_script("display_similar.py", "--data-dir", sample_data, "--image", f"{base}/page.jpg", check=False)
    assert bad.returncode == 2 and "HTML" in bad.stderr


def test_without_a_neighbour_table_the_features_are_searched(sample_data):
    assert not list(sample_data.glob("top_*_similar.npy"))
    proc = run_script("display_similar.py", "--data-dir", sample_data, "--random", "--seed", "3", "--k", "4")
    assert "neighbours from" in proc.stdout and "features.npy" in proc.stdout
    feats = np.load(sample_data / "features.npy")
    row = query.random_query(query.Collection.open(sample_data), 3)
    s = feats @ feats[row]
    s[row] = -np.inf
    listed = [int(line.split("[row ")[1].split(",")[0]) for line in proc.stdout.splitlines() if "[row " in line]
    assert listed == np.argsort(-s, kind="stable")[:4].tolist()


def test_all_on_the_sample_names_every_painting_by_its_title(sample_data):
    import pandas as pd

    proc = run_script("display_similar.py", "--data-dir", sample_data, "--all", "--no-progress")
    assert "790 neighbours of 79 paintings (k = 10) from an exact search of features.npy" in proc.stdout
    df = pd.read_csv(sample_data / "neighbours.csv", dtype=str, keep_default_na=False)
    coll = query.Collection.open(sample_data)
    assert len(df) == 790 and (df["query_title"] != "").all() and (df["neighbour_attribution"] != "").all()
    assert df.groupby("query_row")["rank"].count().eq(10).all()
    first = df[df["query_row"] == "0"]
    found, _, _ = query.neighbors_of_row(coll, 0, 10, device="cpu")
    assert first["neighbour_row"].astype(int).tolist() == found.tolist()
    assert first["neighbour_title"].tolist() == [coll.info(int(r))["title"] for r in found]
