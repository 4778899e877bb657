"""NGA tables: real rows parse, the selection and join are right, bad input is refused clearly."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pandas as pd
import pytest

from helpers import REAL_NGA_ROWS
from iiif_server import IIIFServer
from paintsim.errors import UserError
from paintsim.iiif import BadRowError, check_http_url, check_objectid, check_uuid, image_url
from paintsim.fetch import FetchConfig
from paintsim.nga import fetch_tables, load_tables, read_table, select_paintings

PAINTINGS = {"37003": "440fe0d2-b4ca-4afc-a33e-2d4683ece38f",
             "46569": "da9ff160-755f-4f9a-a78c-75727ce61a3b",
             "91389": "d345149c-3d2d-4ffa-84ce-1c9f788244fc"}


def _rows(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames), list(reader)


def _write(path: Path, header: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def tables(tmp_path) -> Path:
    for name in ("published_images.csv", "objects.csv"):
        shutil.copyfile(REAL_NGA_ROWS / name, tmp_path / name)
    return tmp_path


def test_real_nga_rows_parse_with_multiline_fields():
    pubs, objs = load_tables(REAL_NGA_ROWS)
    assert len(pubs) == 5 and len(objs) == 5
    # the quoted multi-line 'dimensions' and 'provenancetext' fields must not shift later columns
    assert list(objs["objectid"]) == ["37003", "46569", "91389", "66755", "119052"]
    assert list(objs["classification"]) == ["Painting", "Painting", "Painting", "Print", "Drawing"]
    assert objs.loc[objs["objectid"] == "91389", "title"].item() == "Dishes with Oysters, Fruit, and Wine"
    assert objs.loc[objs["objectid"] == "46569", "attribution"].item() == "Mary Cassatt"
    assert pubs.loc[pubs["depictstmsobjectid"] == "119052", "maxpixels"].item() == "640"
    assert (pubs["maxpixels"].iloc[:4] == "").all()  # strings, no NaN guessing


def test_selection_joins_paintings_to_their_images():
    sel = select_paintings(*load_tables(REAL_NGA_ROWS))
    assert dict(zip(sel.rows["objectid"], sel.rows["uuid"])) == PAINTINGS
    assert sel.paintings == 3
    row = sel.rows.set_index("objectid").loc["37003"]
    assert (row["title"], row["attribution"], row["displaydate"], row["medium"]) == \
        ("Self-Portrait", "Judith Leyster", "c. 1630", "oil on canvas")


def test_classification_is_matched_case_insensitively(tables):
    header, rows = _rows(tables / "objects.csv")
    rows[3]["classification"] = " PAINTING "  # the print becomes a painting
    rows[0]["classification"] = "painting"
    _write(tables / "objects.csv", header, rows)
    sel = select_paintings(*load_tables(tables))
    assert set(sel.rows["objectid"]) == set(PAINTINGS) | {"66755"}


def test_primary_view_by_default_all_views_on_request(tables):
    header, rows = _rows(tables / "published_images.csv")
    alt = dict(rows[0], uuid="00000000-0000-4000-8000-000000000001", viewtype="alternate", sequence="1")
    second_primary = dict(rows[0], uuid="00000000-0000-4000-8000-000000000002", sequence="2")
    _write(tables / "published_images.csv", header, rows + [alt, second_primary])
    pubs, objs = load_tables(tables)
    primary = select_paintings(pubs, objs)
    assert len(primary.rows) == 3 and PAINTINGS["37003"] in set(primary.rows["uuid"])
    every = select_paintings(pubs, objs, all_views=True)
    assert len(every.rows) == 5
    assert list(every.rows.loc[every.rows["objectid"] == "37003", "uuid"]) == [
        PAINTINGS["37003"], alt["uuid"], second_primary["uuid"]]  # ordered by sequence


def test_openaccess_is_respected_when_the_column_exists(tables):
    header, rows = _rows(tables / "published_images.csv")
    for r in rows:
        r["openaccess"] = "0" if r["depictstmsobjectid"] == "46569" else "1"
    _write(tables / "published_images.csv", header + ["openaccess"], rows)
    sel = select_paintings(*load_tables(tables))
    assert set(sel.rows["objectid"]) == {"37003", "91389"}
    assert sel.dropped_not_open_access == 1


def test_limit_and_reproducible_sample():
    pubs, objs = load_tables(Path(__file__).resolve().parents[1] / "data" / "sample")
    assert len(select_paintings(pubs, objs).rows) == 79
    assert list(select_paintings(pubs, objs, limit=5).rows["uuid"]) == \
        list(select_paintings(pubs, objs).rows["uuid"][:5])
    a = select_paintings(pubs, objs, sample=10, seed=1).rows
    b = select_paintings(pubs, objs, sample=10, seed=1).rows
    c = select_paintings(pubs, objs, sample=10, seed=2).rows
    assert len(a) == 10 and list(a["uuid"]) == list(b["uuid"]) and set(a["uuid"]) != set(c["uuid"])
    assert len(select_paintings(pubs, objs, sample=10, seed=1, limit=3).rows) == 3


def test_missing_table_error_names_the_file(tables):
    (tables / "objects.csv").unlink()
    with pytest.raises(UserError, match=r"objects\.csv"):
        load_tables(tables)


def test_missing_column_error_names_file_and_column(tables):
    df = pd.read_csv(tables / "objects.csv", dtype=str, keep_default_na=False)
    df.drop(columns=["classification"]).to_csv(tables / "objects.csv", index=False)
    with pytest.raises(UserError) as err:
        load_tables(tables)
    assert "objects.csv" in str(err.value) and "'classification'" in str(err.value)
    df = pd.read_csv(tables / "published_images.csv", dtype=str, keep_default_na=False)
    df.drop(columns=["depictstmsobjectid"]).to_csv(tables / "published_images.csv", index=False)
    with pytest.raises(UserError, match=r"published_images\.csv.*'depictstmsobjectid'"):
        read_table(tables / "published_images.csv")


@pytest.mark.parametrize("bad", ["not-a-uuid", "../../etc/passwd", "{440fe0d2-b4ca-4afc-a33e-2d4683ece38f}",
                                 "440fe0d2-b4ca-4afc-a33e-2d4683ece38f/../x", "", "440fe0d2b4ca4afca33e2d4683ece38f"])
def test_non_uuid_is_rejected(bad):
    with pytest.raises(BadRowError, match="not a UUID"):
        check_uuid(bad)


@pytest.mark.parametrize("bad", ["ftp://api.nga.gov/iiif/x", "file:///etc/passwd", "javascript:alert(1)",
                                 "api.nga.gov/iiif/x", "https://", "http://host/iiif/x?y=1", ""])
def test_non_http_url_is_rejected(bad):
    with pytest.raises(BadRowError):
        check_http_url(bad)


def test_iiif_url_never_asks_beyond_maxpixels_or_the_image():
    base = "https://api.nga.gov/iiif/ff96f3bc-7f92-42f1-8836-a8c91b80fea9"
    assert image_url(base) == f"{base}/full/!512,512/0/default.jpg"
    assert image_url(base + "/", 1024, maxpixels="640") == f"{base}/full/!640,640/0/default.jpg"
    assert image_url(base, 512, maxpixels="640") == f"{base}/full/!512,512/0/default.jpg"
    assert image_url(base, 512, maxpixels="", width="300", height="200") == f"{base}/full/!300,300/0/default.jpg"
    assert check_uuid("440FE0D2-B4CA-4AFC-A33E-2D4683ECE38F") == "440fe0d2-b4ca-4afc-a33e-2d4683ece38f"
    assert check_objectid("0042") == "42"
    with pytest.raises(BadRowError):
        check_objectid("../42")


def test_missing_tables_are_fetched_atomically_from_the_open_data_repo(tmp_path):
    with IIIFServer({}) as srv:
        for name in ("published_images.csv", "objects.csv"):
            srv.files[f"/opendata/data/{name}"] = (REAL_NGA_ROWS / name).read_bytes()
        dest = tmp_path / "nga"
        fetched = fetch_tables(dest, f"{srv.base_url}/opendata/data", progress=False)
        assert sorted(p.name for p in fetched) == ["objects.csv", "published_images.csv"]
        assert (dest / "objects.csv").read_bytes() == (REAL_NGA_ROWS / "objects.csv").read_bytes()
        assert fetch_tables(dest, f"{srv.base_url}/opendata/data", progress=False) == []  # kept
        with pytest.raises(UserError, match=r"HTTP 404.*--csv-dir"):
            fetch_tables(tmp_path / "other", f"{srv.base_url}/nowhere", progress=False)
        assert not list((tmp_path / "other").glob("*"))  # no partial table left behind
        port = srv.server_address[1]
    with pytest.raises(UserError, match=r"offline.*published_images\.csv"):
        fetch_tables(tmp_path / "offline", f"http://127.0.0.1:{port}/opendata/data", progress=False,
                     config=FetchConfig(connect_timeout=1, read_timeout=1, max_retries=1, backoff=0.01))
