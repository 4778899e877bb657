"""Stage 2: inspect_images.py reports failures, unreadable files and duplicates, and draws a contact sheet."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import SAMPLE_DIR, run_script
from paintsim.manifest import read_manifest, write_manifest
from paintsim.download import DownloadOptions, run_download


@pytest.fixture
def messy_data(tmp_path):
    """The sample downloaded, then two failures, an exact duplicate and a truncated file added."""
    data = tmp_path / "data"
    run_download(DownloadOptions(data_dir=data, csv_dir=SAMPLE_DIR, images_from=SAMPLE_DIR / "images",
                                 progress=False))
    m = read_manifest(data / "manifest.csv")
    ok = m.index[m["status"] == "ok"]
    a, b, c = (data / m.loc[i, "file"] for i in ok[:3])
    shutil.copyfile(a, b)  # b now holds a's bytes: an exact duplicate
    raw = c.read_bytes()
    c.write_bytes(raw[: len(raw) // 3])  # a partial file
    failed = [dict(m.iloc[3], status="failed", error="HTTP 503 Service Unavailable (after 6 attempts)",
                   file="", width="", height="", bytes=""),
              dict(m.iloc[4], status="failed", error="got HTML/XML/JSON instead of an image",
                   file="", width="", height="", bytes="")]
    for row in failed:
        (data / "images" / f"{row['uuid']}.jpg").unlink()
    m = pd.concat([m.drop(index=[3, 4]), pd.DataFrame(failed)], ignore_index=True)
    write_manifest(data / "manifest.csv", m)
    return data, a.relative_to(data).as_posix(), b.relative_to(data).as_posix(), c.relative_to(data).as_posix()


def test_inspect_reports_failures_unreadable_files_and_duplicates(messy_data):
    data, a, b, c = messy_data
    out = run_script("inspect_images.py", "--data-dir", data, "--n", "12", "--no-progress").stdout
    assert "79 rows, failed 2, ok 77" in out
    assert "failed x1: HTTP 503 Service Unavailable" in out and "failed x1: got HTML" in out
    assert f"unreadable {c}: " in out
    assert f"same bytes: {', '.join(sorted([a, b]))}" in out

    report = json.loads((data / "inspection.json").read_text())
    assert report["status"] == {"failed": 2, "ok": 77}
    assert report["failure_reasons"] == {"HTTP 503 Service Unavailable": 1,
                                         "got HTML/XML/JSON instead of an image": 1}
    assert [u["file"] for u in report["unreadable"]] == [c]
    assert report["readable_images"] == 76
    assert [d["files"] for d in report["duplicates"]] == [sorted([a, b])] and report["duplicate_files"] == 1
    assert report["size_mismatch_vs_manifest"] == [b]
    assert report["width"]["max"] <= 200 and report["pixels"]["count"] == 76
    assert report["bytes"]["min"] > 1000


def test_contact_sheet_is_a_non_blank_png(messy_data):
    data = messy_data[0]
    run_script("inspect_images.py", "--data-dir", data, "--n", "8", "--seed", "3", "--no-progress")
    sheet = data / "figures" / "contact_sheet.png"
    img = np.asarray(Image.open(sheet).convert("RGB"), dtype=np.float32)
    assert img.shape[0] > 200 and img.shape[1] > 600
    assert img.std() > 30, "the contact sheet is blank"
    # paintings are colourful, a page of text is not
    assert (np.abs(img[..., 0] - img[..., 2]) > 40).mean() > 0.05


def test_inspect_without_a_manifest_says_which_stage_to_run(tmp_path):
    proc = run_script("inspect_images.py", "--data-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "run download_images.py first" in proc.stderr
