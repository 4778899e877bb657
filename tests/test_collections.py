"""One's own collection: a folder with a metadata CSV, or a CSV of URLs, becomes the same manifest
as NGA's, and every later stage reads it the same way."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import REPO, SAMPLE_DIR, run_script
from iiif_server import IIIFServer, sample_images
from own_collection import MUSEUMS, make_own_folder, sample_records
from paintsim.collection import FolderIndex, make_key, map_columns
from paintsim.download import DownloadOptions, check_image_file, run_download
from paintsim.fetch import FetchConfig
from paintsim.iiif import BadRowError
from paintsim.manifest import MANIFEST_COLUMNS, read_manifest

FAST = FetchConfig(connect_timeout=2, read_timeout=2, max_retries=1, backoff=0.01, backoff_max=0.05)


def _write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_a_folder_of_png_tiff_and_webp_with_a_csv_without_objectid_becomes_the_manifest(tmp_path):
    folder, meta = make_own_folder(tmp_path / "mine", n=16)
    summary = run_download(DownloadOptions(data_dir=tmp_path / "data", images_from=folder, metadata=meta,
                                           progress=False))
    assert summary.counts == {"ok": 16} and summary.actions["copied"] == 16
    m = read_manifest(tmp_path / "data" / "manifest.csv")
    assert list(m.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    records = sample_records()[:16]
    assert list(m["key"]) == [f"artic_{r['objectid']}" for r in records]
    assert list(m["title"]) == [r["title"] for r in records]
    assert list(m["attribution"]) == [r["artist"] for r in records]  # "artist" is mapped
    # the user's own columns are kept: "source" (a museum) under its own name, "file" beside ours
    assert list(m["source"]) == [MUSEUMS[i % len(MUSEUMS)] for i in range(16)]
    assert m["item_id"].iloc[3] == "IT-1003" and m["user_file"].iloc[3] == "more/artic_24.jpg"
    assert set(m["fetched_from"]) == {"images-from"} and (m["objectid"] == "").all()
    for f in m["file"]:  # PNG (palette too), TIFF and WebP arrive as whole JPEGs
        w, h, n = check_image_file(tmp_path / "data" / f)
        assert w > 0 and h > 0 and n > 0
    again = run_download(DownloadOptions(data_dir=tmp_path / "data", images_from=folder, metadata=meta,
                                         progress=False))
    assert again.actions["present"] == 16 and again.actions["copied"] == 0


def test_rows_whose_file_is_missing_repeated_or_ambiguous_fail_with_their_line(tmp_path):
    folder, meta = make_own_folder(tmp_path / "mine", n=8)
    Image.new("RGB", (30, 40), "red").save(folder / "more" / "artic_1.jpg")  # a second artic_1
    rows = list(csv.DictReader(open(meta, encoding="utf-8")))
    rows += [dict(rows[1], title="again"), dict(rows[2], file="nowhere.png"), dict(rows[0], file="artic_1"),
             dict(rows[4], file="../../etc/passwd")]
    _write_csv(meta, rows)
    summary = run_download(DownloadOptions(data_dir=tmp_path / "data", images_from=folder, metadata=meta,
                                           progress=False))
    m = read_manifest(tmp_path / "data" / "manifest.csv")
    errors = dict(zip(m["title"].where(m["status"] == "ok", m["error"]), m["status"]))
    assert summary.counts == {"ok": 8, "failed": 4}, errors
    failed = list(m.loc[m["status"] == "failed", "error"])
    assert "line 10" in failed[0] and "already the image of line 3" in failed[0]
    assert "line 11" in failed[1] and "no image 'nowhere.png'" in failed[1]
    assert "line 12" in failed[2] and "matches several images by stem" in failed[2]
    assert "line 13" in failed[3] and "no image" in failed[3]
    assert sorted(p.name for p in (tmp_path / "data" / "images").iterdir()) == sorted(
        f"{k}.jpg" for k in m.loc[m["status"] == "ok", "key"])


def test_column_flags_choose_the_mapping_and_a_wrong_one_is_one_line(tmp_path):
    folder, meta = make_own_folder(tmp_path / "mine", n=4)
    data = tmp_path / "data"
    run_script("download_images.py", "--data-dir", data, "--images-from", folder, "--metadata", meta,
               "--artist-column", "source", "--id-column", "file", "--no-progress")
    m = read_manifest(data / "manifest.csv")
    assert list(m["attribution"]) == list(MUSEUMS[:4]) and "artist" in m.columns
    bad = run_script("download_images.py", "--data-dir", data, "--images-from", folder, "--metadata", meta,
                     "--title-column", "name", "--no-progress", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "--title-column name: not a column of the CSV (file, title, artist" in bad.stderr
    nometa = run_script("download_images.py", "--data-dir", data, "--metadata", meta, check=False)
    assert nometa.returncode == 2 and "--images-from" in nometa.stderr


def test_common_column_names_are_mapped_and_others_kept():
    cols = ["Object Title", "Creator", "Year", "Technique", "Museum", "uuid", "status"]
    assert map_columns(cols, {}) == {"title": "Object Title", "attribution": "Creator",
                                     "displaydate": "Year", "medium": "Technique", "uuid": "uuid"}
    assert map_columns(cols, {"attribution": "Museum"})["attribution"] == "Museum"


def test_keys_are_safe_file_names_and_unique_without_case():
    taken: set[str] = set()
    assert make_key("artic_1", taken) == "artic_1"
    assert make_key("ARTIC_1", taken).startswith("ARTIC_1-")      # differs only by case: made unique
    odd = make_key("../x y/..", taken)
    assert "/" not in odd and not odd.startswith(".") and odd.startswith("x-y-")
    assert make_key("", taken).startswith("id-")
    assert len({make_key(f"Painting: {i}", taken) for i in range(50)}) == 50


def test_a_folder_index_never_leaves_its_folder(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "secret.jpg").write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "sub" / "a.png")
    index = FolderIndex(tmp_path / "in")
    assert index.find("sub/a.png") == index.find("A.PNG") == index.find("a") == tmp_path / "in" / "sub" / "a.png"
    for value in ("../secret.jpg", "/etc/passwd", "secret", ""):
        with pytest.raises(BadRowError):
            index.find(value)


@pytest.fixture
def server():
    with IIIFServer(sample_images()) as srv:
        yield srv


def test_a_csv_of_image_urls_and_iiif_bases_is_fetched_like_nga_with_failures_listed(tmp_path, server):
    rows = sample_records()[:10]
    png = io.BytesIO()
    Image.open(SAMPLE_DIR / "images" / f"{rows[0]['objectid']}.jpg").save(png, "PNG")
    server.files["/direct/painting.png"] = png.getvalue()
    listed = []
    for i, r in enumerate(rows):
        base = server.iiif_base(r["uuid"])
        url = f"{base}/info.json" if i % 2 else f"{base}/full/!120,120/0/default.jpg"
        listed.append({"Accession Number": f"A-{i}", "Image URL": url, "Title": r["title"],
                       "Artist": r["artist"], "museum": "NGA"})
    listed.append({"Accession Number": "A-png", "Image URL": f"{server.base_url}/direct/painting.png",
                   "Title": "a PNG", "Artist": "x", "museum": "elsewhere"})
    listed.append({"Accession Number": "A-404", "Image URL": f"{server.base_url}/iiif/"
                   "00000000-0000-4000-8000-000000000000/info.json", "Title": "gone", "Artist": "", "museum": ""})
    listed.append({"Accession Number": "A-ftp", "Image URL": "ftp://example.org/a.jpg", "Title": "ftp",
                   "Artist": "", "museum": ""})
    urls = _write_csv(tmp_path / "urls.csv", listed)
    opts = DownloadOptions(data_dir=tmp_path / "data", urls=urls, size=150, fetch=FAST, progress=False,
                           ignore_robots_txt=True)
    summary = run_download(opts)
    assert summary.counts == {"ok": 11, "failed": 2}
    m = read_manifest(tmp_path / "data" / "manifest.csv").set_index("Accession Number", drop=False)
    assert m.loc["A-0", "key"] == "A-0" and m.loc["A-0", "title"] == rows[0]["title"]
    assert m.loc["A-0", "attribution"] == rows[0]["artist"] and m.loc["A-0", "museum"] == "NGA"
    assert m.loc["A-1", "url"] == f"{server.iiif_base(rows[1]['uuid'])}/full/!150,150/0/default.jpg"
    assert m.loc["A-png", "status"] == "ok"                       # a PNG link arrives as a JPEG
    check_image_file(tmp_path / "data" / m.loc["A-png", "file"])
    assert "404" in m.loc["A-404", "error"]
    assert m.loc["A-ftp", "error"].startswith("rejected row: line 14") and "not an http(s) URL" in m.loc["A-ftp", "error"]
    before = sum(server.requests.values())
    again = run_download(opts)
    assert again.actions["present"] == 11 and sum(server.requests.values()) - before == 1  # the 404, retried


def test_every_stage_runs_on_an_own_collection_with_run_pipeline(tmp_path, mobilenet_weights):
    folder, meta = make_own_folder(tmp_path / "mine", n=24, unknown_every=5)
    data = tmp_path / "data"
    env = {"PYTHON": os.sys.executable, "DATA_DIR": str(data), "BACKBONE": "mobilenet_v2", "NO_PROGRESS": "1",
           "QUERY": "IT-1004"}
    import subprocess

    proc = subprocess.run(["bash", str(REPO / "run_pipeline.sh"), "--images", str(folder), "--metadata",
                           str(meta), "--no-matrix"], cwd=tmp_path, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = read_manifest(data / "manifest.csv")
    assert (m["status"] == "ok").sum() == 24
    assert '"readable_images": 24' in (data / "inspection.json").read_text()
    names = np.load(data / "image_names.npy")
    assert len(names) == 24
    # stage 7 named the query by an id column of the user's own, and headed it with the title
    rec = sample_records()[4]
    assert f"query: {rec['title']!r} by {rec['artist']}" in proc.stdout
    assert "random pairs of this collection score" in proc.stdout
    shown = next((data / "figures").glob("similar_row4_*.csv")).read_text()
    assert shown.splitlines()[0].startswith('"rank","score","row","key","title","attribution"')
    ev = run_script("evaluate_unsupervised.py", "--data-dir", data, "--label-column", "source",
                    "--skip-copies", "--skip-pixels", "--output", tmp_path / "by_museum.json")
    assert "same source" in ev.stdout


def test_a_manifest_written_before_keys_reads_with_keys_from_its_files(tmp_path):
    old = tmp_path / "manifest.csv"
    cols = [c for c in MANIFEST_COLUMNS if c != "key"] + ["source"]
    u = "e64daf38-38e8-4d0c-acb2-8ff370cc188c"
    with open(old, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        w.writerow([{"uuid": u, "file": f"images/{u}.jpg", "status": "ok", "source": "http"}.get(c, "") for c in cols])
        w.writerow([{"uuid": "x", "status": "failed", "source": "http"}.get(c, "") for c in cols])
    m = read_manifest(old)
    assert list(m["key"]) == [u, "x"] and list(m["fetched_from"]) == ["http", "http"]


def test_make_collection_fetches_a_csv_of_urls_through_every_stage(tmp_path, server, mobilenet_weights):
    """`make collection URLS=...` (run_pipeline.sh --urls) on a local server, two rows failing."""
    import subprocess
    import sys

    rows = sample_records()[:13]
    listed = [{"Accession Number": f"A-{i}", "Image URL": f"{server.iiif_base(r['uuid'])}/info.json",
               "Title": r["title"], "Artist": r["artist"], "museum": "NGA"} for i, r in enumerate(rows)]
    listed.append({"Accession Number": "A-404", "Image URL": f"{server.base_url}/iiif/"
                   "00000000-0000-4000-8000-000000000000/info.json", "Title": "gone", "Artist": "", "museum": ""})
    urls = _write_csv(tmp_path / "urls.csv", listed)
    data = tmp_path / "collection"
    venv = Path(sys.prefix)
    env = {**os.environ, "BACKBONE": "mobilenet_v2", "NO_PROGRESS": "1", "QUERY": "A-3"}
    proc = subprocess.run(["make", "-C", str(REPO), "-o", f"{venv}/.installed", "collection", f"VENV={venv}",
                           f"URLS={urls}", f"COLLECTION_DIR={data}", "ID_COLUMN=Accession Number"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = read_manifest(data / "manifest.csv").set_index("key", drop=False)
    assert (m["status"] == "ok").sum() == 13 and m.loc["A-404", "status"] == "failed"
    assert len(np.load(data / "image_names.npy")) == 13
    assert np.load(data / "top_10_similar.npy")["index"].shape == (13, 10)
    assert f"query: {rows[3]['title']!r} by {rows[3]['artist']}" in proc.stdout
    assert (data / "evaluation.json").is_file() and (data / "site" / "index.html").is_file()
