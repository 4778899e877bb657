"""Stage 1 against a real local IIIF server: fetching, misbehaving servers, reruns, kills, full disks."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import REPO, SAMPLE_DIR, run_script
from iiif_server import IIIFServer, Misbehave, sample_images, sample_rows, write_tables
from paintsim.manifest import MANIFEST_COLUMNS, read_manifest
from paintsim.download import DownloadOptions, check_image_file, run_download
from paintsim.fetch import FetchConfig, parse_retry_after
from paintsim.images import ImageDecodeError

ROWS = sorted(sample_rows(), key=lambda r: int(r["objectid"]))  # the selection's order
UUIDS = [r["uuid"] for r in ROWS]
FAST = FetchConfig(connect_timeout=2, read_timeout=2, max_retries=2, backoff=0.01, backoff_max=0.05)


@pytest.fixture
def server():
    with IIIFServer(sample_images()) as srv:
        yield srv


def _opts(tmp_path: Path, srv: IIIFServer, **kw) -> DownloadOptions:
    csv_dir = tmp_path / "csv"
    if not (csv_dir / "objects.csv").exists():
        write_tables(csv_dir, srv.base_url)
    kw.setdefault("fetch", FAST)
    return DownloadOptions(data_dir=tmp_path / "data", csv_dir=csv_dir, workers=kw.pop("workers", 4),
                           progress=False, **kw)


def _manifest(tmp_path: Path) -> pd.DataFrame:
    return read_manifest(tmp_path / "data" / "manifest.csv").set_index("uuid", drop=False)


def _assert_all_valid(data_dir: Path, uuids) -> None:
    for u in uuids:
        check_image_file(data_dir / "images" / f"{u}.jpg")  # raises if partial or corrupt
    assert not list((data_dir / "images").glob(".*")), "temporary files left behind"


def test_download_fetches_every_image_and_writes_the_manifest(tmp_path, server):
    summary = run_download(_opts(tmp_path, server))
    assert summary.counts == {"ok": 79} and summary.actions["fetched"] == 79
    m = _manifest(tmp_path)
    assert list(m.columns[:len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS and len(m) == 79
    assert set(m["uuid"]) == set(UUIDS) and (m["status"] == "ok").all() and (m["error"] == "").all()
    for r in ROWS[:5]:
        row = m.loc[r["uuid"]]
        assert row["file"] == f"images/{r['uuid']}.jpg"
        assert row["url"] == f"{server.base_url}/iiif/{r['uuid']}/full/!200,200/0/default.jpg"
        w, h, n = check_image_file(tmp_path / "data" / row["file"])
        assert (str(w), str(h), str(n)) == (row["width"], row["height"], row["bytes"])
        assert (tmp_path / "data" / row["file"]).read_bytes() == server.images[r["uuid"]]
    assert m.loc[UUIDS[0], "objectid"] == ROWS[0]["objectid"] and m.loc[UUIDS[0], "attribution"] == ROWS[0]["artist"]
    assert all(ua.startswith("paintsim/") for ua in server.user_agents)
    assert set(server.requests.values()) == {1}


def test_rerun_skips_valid_files_and_refetches_partial_or_corrupt_ones(tmp_path, server):
    run_download(_opts(tmp_path, server))
    images = tmp_path / "data" / "images"
    partial, garbage, gone = UUIDS[3], UUIDS[10], UUIDS[20]
    data = (images / f"{partial}.jpg").read_bytes()
    (images / f"{partial}.jpg").write_bytes(data[: len(data) // 2])
    (images / f"{garbage}.jpg").write_bytes(b"<html>not a painting</html>")
    (images / f"{gone}.jpg").unlink()
    before = server.requests.copy()
    summary = run_download(_opts(tmp_path, server))
    assert summary.actions["present"] == 76 and summary.actions["fetched"] == 3
    assert server.requests - before == {partial: 1, garbage: 1, gone: 1}
    _assert_all_valid(tmp_path / "data", UUIDS)
    assert (_manifest(tmp_path)["status"] == "ok").all()


def test_rerun_retries_earlier_failures(tmp_path, server):
    server.misbehave[UUIDS[7]] = Misbehave("404", times=1)
    run_download(_opts(tmp_path, server))
    assert _manifest(tmp_path).loc[UUIDS[7], "status"] == "failed"
    assert _manifest(tmp_path).loc[UUIDS[7], "file"] == ""
    run_download(_opts(tmp_path, server))
    assert _manifest(tmp_path).loc[UUIDS[7], "status"] == "ok"
    assert server.requests[UUIDS[7]] == 2 and server.requests[UUIDS[8]] == 1


def test_429_is_retried_after_the_servers_retry_after(tmp_path, server):
    server.misbehave[UUIDS[0]] = Misbehave("429", times=1, retry_after="1")
    start = time.perf_counter()
    run_download(_opts(tmp_path, server, limit=4))
    elapsed = time.perf_counter() - start
    assert _manifest(tmp_path).loc[UUIDS[0], "status"] == "ok"
    assert server.requests[UUIDS[0]] == 2
    assert elapsed >= 0.95, "the backoff is 10 ms: only Retry-After explains a 1 s wait"


def test_retry_after_accepts_seconds_and_http_dates():
    import email.utils

    assert parse_retry_after("7") == 7.0
    in_ten = email.utils.formatdate(time.time() + 10, usegmt=True)
    assert parse_retry_after(in_ten) == pytest.approx(10.0, abs=1.5)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("900", max_seconds=300) == 300.0          # capped
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_503_is_retried_until_the_server_recovers(tmp_path, server):
    server.misbehave[UUIDS[1]] = Misbehave("503", times=2, retry_after=None)
    server.misbehave[UUIDS[2]] = Misbehave("503", retry_after=None)  # never recovers
    run_download(_opts(tmp_path, server, limit=5))
    m = _manifest(tmp_path)
    assert m.loc[UUIDS[1], "status"] == "ok" and server.requests[UUIDS[1]] == 3
    assert m.loc[UUIDS[2], "status"] == "failed" and server.requests[UUIDS[2]] == 3  # 1 + max_retries
    assert m.loc[UUIDS[2], "error"] == "HTTP 503 Service Unavailable (after 3 attempts)"


def test_slow_response_past_the_timeout_is_retried_then_failed(tmp_path, server):
    server.misbehave[UUIDS[1]] = Misbehave("slow", times=1, delay=1.5)
    server.misbehave[UUIDS[2]] = Misbehave("slow", delay=1.5)
    fetch = FetchConfig(connect_timeout=2, read_timeout=0.3, max_retries=1, backoff=0.01)
    run_download(_opts(tmp_path, server, limit=4, fetch=fetch))
    m = _manifest(tmp_path)
    assert m.loc[UUIDS[1], "status"] == "ok" and server.requests[UUIDS[1]] == 2
    assert m.loc[UUIDS[2], "status"] == "failed"
    assert m.loc[UUIDS[2], "error"].startswith("read timeout")
    assert not (tmp_path / "data" / "images" / f"{UUIDS[2]}.jpg").exists()


def test_a_download_whose_server_drips_headers_fails_that_row_at_its_deadline(tmp_path, server):
    server.misbehave[UUIDS[1]] = Misbehave("drip", delay=0.1)  # each read quick, headers never end
    fetch = FetchConfig(connect_timeout=2, read_timeout=2, max_retries=2, backoff=0.01, deadline=1.5)
    t0 = time.monotonic()
    run_download(_opts(tmp_path, server, limit=4, fetch=fetch))
    assert time.monotonic() - t0 < 10
    m = _manifest(tmp_path)
    assert m.loc[UUIDS[1], "status"] == "failed"
    assert m.loc[UUIDS[1], "error"] == "deadline of 1.5s passed while waiting for the answer"
    assert (m.drop(UUIDS[1])["status"] == "ok").all()  # the other workers were not held up
    assert not (tmp_path / "data" / "images" / f"{UUIDS[1]}.jpg").exists()


def test_truncated_body_fails_with_the_reason_and_no_file(tmp_path, server):
    server.misbehave[UUIDS[4]] = Misbehave("truncate")
    run_download(_opts(tmp_path, server, limit=6))
    row = _manifest(tmp_path).loc[UUIDS[4]]
    assert row["status"] == "failed" and "truncated body" in row["error"]
    assert not (tmp_path / "data" / "images" / f"{UUIDS[4]}.jpg").exists()
    _assert_all_valid(tmp_path / "data", [u for u in UUIDS[:6] if u != UUIDS[4]])


def test_html_instead_of_jpeg_fails_with_the_reason(tmp_path, server):
    server.misbehave[UUIDS[5]] = Misbehave("html")
    run_download(_opts(tmp_path, server, limit=6))
    row = _manifest(tmp_path).loc[UUIDS[5]]
    assert row["status"] == "failed" and "HTML" in row["error"]
    assert server.requests[UUIDS[5]] == 1  # a 200 with the wrong content is not retried
    assert not (tmp_path / "data" / "images" / f"{UUIDS[5]}.jpg").exists()


def test_one_bad_row_never_stops_the_run(tmp_path, server):
    def corrupt(pubs, objs):
        by_oid = {p["depictstmsobjectid"]: p for p in pubs}
        by_oid[ROWS[0]["objectid"]]["uuid"] = "../../../../tmp/evil"
        by_oid[ROWS[1]["objectid"]]["iiifurl"] = "file:///etc/passwd"
        by_oid[ROWS[2]["objectid"]]["iiifurl"] = "ftp://example.org/iiif/x"
        by_oid[ROWS[3]["objectid"]]["iiifurl"] = f"{server.base_url}/iiif/00000000-0000-4000-8000-000000000000"

    write_tables(tmp_path / "csv", server.base_url, edit=corrupt)
    summary = run_download(_opts(tmp_path, server))
    m = read_manifest(tmp_path / "data" / "manifest.csv")
    assert len(m) == 79 and summary.counts == {"ok": 75, "failed": 4} and summary.actions["rejected"] == 3
    errors = dict(zip(m["objectid"], m["error"]))
    assert errors[ROWS[0]["objectid"]] == "rejected row: uuid '../../../../tmp/evil' is not a UUID"
    assert "not an http(s) URL" in errors[ROWS[1]["objectid"]]
    assert "not an http(s) URL" in errors[ROWS[2]["objectid"]]
    assert errors[ROWS[3]["objectid"]] == "HTTP 404 Not Found"
    assert not Path("/tmp/evil.jpg").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["images", "manifest.csv"]


def test_images_from_the_embedded_sample(tmp_path):
    data = tmp_path / "data"
    args = ["--data-dir", data, "--csv-dir", "data/sample", "--images-from", "data/sample/images", "--no-progress"]
    out = run_script("download_images.py", *args).stdout
    assert "ok 79 (fetched 0, copied 79" in out
    m = read_manifest(data / "manifest.csv")
    assert len(m) == 79 and (m["status"] == "ok").all()
    by_uuid = {r["uuid"]: r for r in ROWS}
    for row in m.to_dict("records"):
        src = SAMPLE_DIR / "images" / f"{by_uuid[row['uuid']]['objectid']}.jpg"
        assert (data / row["file"]).read_bytes() == src.read_bytes()
    assert "already present 79" in run_script("download_images.py", *args).stdout


def test_images_from_reports_missing_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for r in ROWS[:3]:  # one named by uuid, the others by objectid, one missing
        (src / f"{r['objectid']}.jpg").write_bytes((SAMPLE_DIR / "images" / f"{r['objectid']}.jpg").read_bytes())
    os.rename(src / f"{ROWS[0]['objectid']}.jpg", src / f"{ROWS[0]['uuid']}.jpg")
    (src / f"{ROWS[2]['objectid']}.jpg").unlink()
    summary = run_download(DownloadOptions(data_dir=tmp_path / "data", csv_dir=SAMPLE_DIR, images_from=src,
                                           limit=3, progress=False))
    assert summary.counts == {"ok": 2, "failed": 1}
    m = _manifest(tmp_path)
    assert m.loc[ROWS[2]["uuid"], "error"].startswith("not found in")


def _download_cmd(data: Path, csv_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "download_images.py"), "--data-dir", str(data), "--csv-dir", str(csv_dir),
            "--no-progress", "--max-retries", "1", "--backoff", "0.01", *extra]


def test_killed_run_resumes_without_refetching_good_files(tmp_path, server):
    server.delay = 0.06  # slow-ish: 79 images take ~2.4 s with 2 workers
    write_tables(tmp_path / "csv", server.base_url)
    data = tmp_path / "data"
    proc = subprocess.Popen(_download_cmd(data, tmp_path / "csv", "--workers", "2", "--checkpoint-every", "0.2"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((data / "images").glob("*.jpg"))) < 25:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(0.2)  # let the server finish answering what was in flight
    good = set()
    for path in (data / "images").glob("*.jpg"):
        try:
            check_image_file(path)
            good.add(path.stem)
        except ImageDecodeError:
            pass
    assert 25 <= len(good) < 79, f"the kill came too late to test anything ({len(good)} files)"
    before = server.requests.copy()

    server.delay = 0.0
    run_script("download_images.py", *_download_cmd(data, tmp_path / "csv", "--workers", "4")[2:])
    after = server.requests
    assert all(after[u] == before[u] for u in good), "a file that was already good was fetched again"
    assert all(after[u] - before[u] == 1 for u in set(UUIDS) - good)
    _assert_all_valid(data, UUIDS)
    m = read_manifest(data / "manifest.csv")
    assert len(m) == 79 and (m["status"] == "ok").all()


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_stops_the_run_with_a_clear_message_and_no_partial_file(tmp_path, server):
    write_tables(tmp_path / "csv", server.base_url)
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    # the kernel refuses writes past RLIMIT_FSIZE (EFBIG), as a full disk refuses them (ENOSPC)
    limit = 15_000
    proc = subprocess.run(_download_cmd(data, tmp_path / "csv", "--workers", "1", "--limit", "12"),
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          preexec_fn=_limit_file_size(limit), env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "the disk is full" in proc.stderr and "run stopped" in proc.stderr and "rerun" in proc.stderr
    written = list((data / "images").iterdir())
    assert all(not p.name.startswith(".") for p in written), "a partial temp file was left behind"
    for path in written:
        check_image_file(path)
    big = [u for u in UUIDS[:12] if len(server.images[u]) > limit]
    assert big and not any((data / "images" / f"{u}.jpg").exists() for u in big)


def test_sigterm_stops_cleanly_with_a_manifest_of_the_finished_images(tmp_path, server):
    server.delay = 0.05
    write_tables(tmp_path / "csv", server.base_url)
    data = tmp_path / "data"
    proc = subprocess.Popen(_download_cmd(data, tmp_path / "csv", "--workers", "2"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(list((data / "images").glob("*.jpg"))) < 10:
        time.sleep(0.02)
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    m = read_manifest(data / "manifest.csv")
    files = sorted(p.name for p in (data / "images").iterdir())
    assert 10 <= len(m) < 79 and (m["status"] == "ok").all()
    assert sorted(m["file"].str.removeprefix("images/")) == files  # nothing half-written, nothing unlisted
    _assert_all_valid(data, m["uuid"])


def test_robots_txt_is_obeyed_unless_told_otherwise(tmp_path, server):
    server.files["/robots.txt"] = f"User-agent: *\nDisallow: /iiif/{UUIDS[1]}/\n".encode()
    run_download(_opts(tmp_path, server, limit=4))
    row = _manifest(tmp_path).loc[UUIDS[1]]
    assert row["status"] == "failed" and row["error"] == f"disallowed by {server.base_url}/robots.txt"
    assert server.requests[UUIDS[1]] == 0 and server.requests[UUIDS[2]] == 1
    run_download(_opts(tmp_path, server, limit=4, ignore_robots_txt=True))
    assert _manifest(tmp_path).loc[UUIDS[1], "status"] == "ok" and server.requests[UUIDS[1]] == 1
