"""Nothing lost, nothing hung: concurrent runs, kills, full disks and hostile files (docs/reliability.md).

Concurrency and kill tests run the stage scripts as real processes and stop them with real signals.
"""
from __future__ import annotations

import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import REPO, run_script
from iiif_server import IIIFServer, Misbehave, sample_images, sample_rows, write_tables
from paintsim.embeddings import Embeddings
from paintsim.errors import UserError
from paintsim.images import ImageDecodeError, decode_rgb, load_rgb, read_file, verify_image
from paintsim.manifest import read_manifest, write_manifest
from test_extract_features import SAMPLE_IMAGES, copy_images
from test_similarity_scripts import make_data_dir

NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def _script(name: str, *args) -> list[str]:
    return [sys.executable, str(REPO / name), *map(str, args)]


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the first run ended before {what}: make it slower"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _rows_done(state: Path) -> int:
    try:
        return int(json.loads(state.read_text())["rows_done"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# ----------------------------------------------------------------- one writer per stage and data dir


def test_a_second_matrix_run_stops_naming_the_first_and_a_waiting_one_finishes_after_kill_9(tmp_path):
    n = 4000  # one fsynced row per block: several seconds of work
    x = make_data_dir(tmp_path, n, 16, seed=3, meta={"backbone": "x"})
    state = tmp_path / "similarity_scores.h5.progress.json"
    first = subprocess.Popen(_script("compute_similarity.py", "--data-dir", tmp_path, "--block-size", "1",
                                     "--no-progress"), cwd=REPO, stderr=subprocess.DEVNULL)
    waiting = None
    try:
        _wait_for(lambda: _rows_done(state) >= 20, first, "20 rows")
        second = run_script("compute_similarity.py", "--data-dir", tmp_path, "--block-size", "1", check=False)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"another compute_similarity run is working on {tmp_path}: pid {first.pid}" in second.stderr
        assert "--wait-for-lock" in second.stderr
        assert first.poll() is None and _rows_done(state) >= 20, "the refused run disturbed the first"

        waiting = subprocess.Popen(_script("compute_similarity.py", "--data-dir", tmp_path, "--block-size", "1",
                                           "--no-progress", "--wait-for-lock"), cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert waiting.poll() is None, "the waiting run did not wait"
        os.kill(first.pid, signal.SIGKILL)  # the kernel releases the dead run's lock
        first.wait()
        out, err = waiting.communicate(timeout=300)
    finally:
        for p in (first, waiting):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert waiting.returncode == 0, err
    assert "waiting for pid" in err and "resumed" in out
    with h5py.File(tmp_path / "similarity_scores.h5", "r") as f:
        assert bool(f.attrs["complete"])
        scores = f["similarity"][...].astype(np.float64)
    assert not np.any(np.all(scores == 0, axis=1)), "a row of zeros was taken for a finished row"
    for rows in (slice(0, 50), slice(n - 50, n)):
        np.testing.assert_allclose(scores[rows], x[rows].astype(np.float64) @ x.T.astype(np.float64),
                                   atol=2.0**-10)


def test_a_progress_record_of_another_run_never_vouches_for_a_partial_matrix(tmp_path):
    # the old race: run B recreated the .partial, then run A (killed later) recorded its own rows
    x = make_data_dir(tmp_path, 300, 8, seed=5, meta={"backbone": "x"})
    state = tmp_path / "similarity_scores.h5.progress.json"
    proc = subprocess.Popen(_script("compute_similarity.py", "--data-dir", tmp_path, "--block-size", "1",
                                    "--no-progress"), cwd=REPO, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _rows_done(state) >= 10, proc, "10 rows")
    finally:
        proc.kill()
        proc.wait()
    record = json.loads(state.read_text())
    record.update(run_id="0" * 32, rows_done=299)  # another run's record, claiming nearly every row
    state.write_text(json.dumps(record))
    rerun = run_script("compute_similarity.py", "--data-dir", tmp_path)
    assert "computed 300 rows" in rerun.stdout and "starting the matrix again" in rerun.stderr
    with h5py.File(tmp_path / "similarity_scores.h5", "r") as f:
        np.testing.assert_allclose(f["similarity"][...].astype(np.float64),
                                   x.astype(np.float64) @ x.T.astype(np.float64), atol=2.0**-10)


def test_a_second_extraction_stops_and_the_first_keeps_its_own_features(tmp_path, mobilenet_weights):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_images(imgs, 40)
    common = ["--data-dir", data, "--images-dir", imgs, "--backbone", "mobilenet_v2", "--no-progress"]
    first = subprocess.Popen(_script("extract_features.py", *common, "--batch-size", "1", "--chunk-size", "1",
                                     "--threads", "1"), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: len(list((data / "features_progress").glob("chunk-*.npz"))) >= 2, first,
                  "two progress chunks")
        second = run_script("extract_features.py", *common, "--weights", "none", check=False)
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 2 and "another extract_features run" in second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert first.returncode == 0, err
    emb = Embeddings.load(data, require_meta=True)
    assert len(emb) == 40 and emb.meta["weights"]["kind"] == "torchvision"
    # and once the first is done, the second runs and replaces the features with its own
    run_script("extract_features.py", *common, "--weights", "none")
    assert Embeddings.load(data, require_meta=True).meta["weights"]["kind"] == "none"


# ------------------------------------------------------------------------ reruns keep finished work


def test_an_interrupted_download_rerun_keeps_every_row_finished_before(tmp_path):
    rows = sorted(sample_rows(), key=lambda r: int(r["objectid"]))
    slow = [rows[1]["uuid"], rows[3]["uuid"]]
    with IIIFServer(sample_images()) as server:
        write_tables(tmp_path / "csv", server.base_url)
        for u in slow:
            server.misbehave[u.lower()] = Misbehave("404")
        base = ["--data-dir", tmp_path / "data", "--csv-dir", tmp_path / "csv", "--no-progress",
                "--max-retries", "0", "--limit", "14", "--workers", "1"]
        run_script("download_images.py", *base)
        before = read_manifest(tmp_path / "data" / "manifest.csv")
        assert (before["status"] == "ok").sum() == 12
        for u in slow:  # the two failures come back, slowly, at the head of the rerun's queue
            server.misbehave[u.lower()] = Misbehave("slow", delay=3.0)
        proc = subprocess.Popen(_script("download_images.py", *base, "--read-timeout", "30",
                                        "--checkpoint-every", "0.2"), cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(lambda: server.requests[slow[0].lower()] >= 2, proc, "the slow request")
        time.sleep(0.5)  # a checkpoint or two while the only worker waits for the slow image
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    after = read_manifest(tmp_path / "data" / "manifest.csv").set_index("uuid")
    ok_before = before[before["status"] == "ok"]
    assert set(ok_before["uuid"]) <= set(after.index[after["status"] == "ok"]), "finished rows were dropped"
    for _, row in ok_before.iterrows():
        assert after.loc[row["uuid"], "file"] == row["file"]


def _extract(data: Path, imgs: Path, **kw) -> subprocess.CompletedProcess:
    return run_script("extract_features.py", "--data-dir", data, "--images-dir", imgs, "--backbone",
                      "mobilenet_v2", "--weights", "none", "--workers", "0", "--no-progress", **kw)


def test_extraction_rerun_repairs_a_damaged_features_file(tmp_path):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_images(imgs, 6)
    _extract(data, imgs)
    good = Embeddings.load(data, require_meta=True).features.copy()
    for damage in ("nan row", "other values"):
        feats = good.copy()
        if damage == "nan row":
            feats[2] = np.nan
        else:
            feats = np.roll(feats, 1, axis=0)
        np.save(data / "features.npy", feats)
        with pytest.raises(UserError, match="features.npy"):
            Embeddings.load(data, require_meta=True)  # every later stage refuses it
        proc = _extract(data, imgs)
        assert "up to date" not in proc.stderr, damage
        np.testing.assert_array_equal(Embeddings.load(data, require_meta=True).features, good)


def test_a_full_disk_during_extraction_keeps_the_previous_outputs(tmp_path):
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_images(imgs, 30)
    _extract(data, imgs)
    old = {p: (data / p).read_bytes() for p in ("features.npy", "image_names.npy", "features_meta.json")}
    copy_images(imgs, 6, start=30)
    # 36 x 1280 float32 rows are 184 KB: the kernel refuses the file past 100 KB, as a full disk would
    proc = subprocess.run(_script("extract_features.py", "--data-dir", data, "--images-dir", imgs,
                                  "--backbone", "mobilenet_v2", "--weights", "none", "--workers", "0",
                                  "--no-progress"), cwd=REPO, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size(100_000), env={**os.environ, **NO_PYC})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "the disk is full" in proc.stderr and "rerun" in proc.stderr
    assert {p: (data / p).read_bytes() for p in old} == old
    assert len(Embeddings.load(data, require_meta=True)) == 30
    assert not [p for p in data.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    _extract(data, imgs)  # with room again, the rerun finishes the job
    assert len(Embeddings.load(data, require_meta=True)) == 36


def test_a_full_disk_in_compute_similarity_is_one_line_and_the_rerun_completes(tmp_path):
    x = make_data_dir(tmp_path, 600, 16, meta={"backbone": "x"})
    proc = subprocess.run(_script("compute_similarity.py", "--data-dir", tmp_path, "--no-progress"), cwd=REPO,
                          capture_output=True, text=True, timeout=120, preexec_fn=_limit_file_size(300_000),
                          env={**os.environ, **NO_PYC})
    assert proc.returncode == 2, proc.stderr  # no traceback, no segmentation fault
    assert "Traceback" not in proc.stderr and "the disk is full" in proc.stderr
    assert not (tmp_path / "similarity_scores.h5").exists()
    run_script("compute_similarity.py", "--data-dir", tmp_path)
    with h5py.File(tmp_path / "similarity_scores.h5", "r") as f:
        np.testing.assert_allclose(f["similarity"][5].astype(np.float64), x[5] @ x.T.astype(np.float64),
                                   atol=2.0**-10)


def test_a_stale_matrix_is_refused_by_extract_top_10(tmp_path):
    x = make_data_dir(tmp_path, 80, 8, meta={"backbone": "x"})
    run_script("compute_similarity.py", "--data-dir", tmp_path)
    np.save(tmp_path / "features.npy", x[::-1].copy())  # same shape and names, other features
    proc = run_script("extract_top_10.py", "--data-dir", tmp_path, check=False)
    assert proc.returncode == 2 and "stale" in proc.stderr and "rerun compute_similarity.py" in proc.stderr
    assert not list(tmp_path.glob("top_*"))


# ------------------------------------------------------------------------------------ hostile files


def _hostile_images(images: Path, outside: Path) -> dict[str, str]:
    """A link to /dev/zero, a FIFO and a link out of the data dir; name -> words of the refusal."""
    images.mkdir(parents=True, exist_ok=True)
    os.symlink("/dev/zero", images / "zero.jpg")
    os.mkfifo(images / "fifo.jpg")
    outside.mkdir(parents=True, exist_ok=True)
    (outside / "secret.jpg").write_bytes(SAMPLE_IMAGES[0].read_bytes())
    os.symlink(outside / "secret.jpg", images / "away.jpg")
    return {"zero.jpg": "symbolic link", "fifo.jpg": "not a regular file", "away.jpg": "symbolic link"}


def test_special_files_and_links_out_of_the_data_dir_are_refused_not_read(tmp_path):
    data = tmp_path / "data"
    good = copy_images(data / "images", 3)
    hostile = _hostile_images(data / "images", tmp_path / "elsewhere")
    rows = [{"uuid": Path(n).stem, "file": f"images/{n}", "status": "ok"} for n in good + list(hostile)]
    write_manifest(data / "manifest.csv", pd.DataFrame(rows))

    for name, words in hostile.items():
        with pytest.raises(ImageDecodeError, match=words):
            read_file(data / "images" / name)
    proc = run_script("inspect_images.py", "--data-dir", data, "--no-progress", timeout=60)
    report = json.loads((data / "inspection.json").read_text())
    assert report["readable_images"] == 3, proc.stdout
    assert {u["file"]: u["error"] for u in report["unreadable"]}.keys() == {f"images/{n}" for n in hostile}
    proc = run_script("extract_features.py", "--data-dir", data, "--backbone", "mobilenet_v2", "--weights",
                      "none", "--workers", "0", "--no-progress", timeout=120)
    errors = pd.read_csv(data / "features_errors.csv", dtype=str).set_index("file")["error"]
    for name, words in hostile.items():
        assert words in errors[f"images/{name}"]
    assert len(Embeddings.load(data)) == 3


def test_a_download_rerun_replaces_special_files_instead_of_reading_them(tmp_path):
    rows = sorted(sample_rows(), key=lambda r: int(r["objectid"]))
    with IIIFServer(sample_images()) as server:
        write_tables(tmp_path / "csv", server.base_url)
        args = ["--data-dir", tmp_path / "data", "--csv-dir", tmp_path / "csv", "--no-progress", "--limit", "4"]
        run_script("download_images.py", *args)
        images = tmp_path / "data" / "images"
        (images / f"{rows[0]['uuid']}.jpg").unlink()
        os.symlink("/dev/zero", images / f"{rows[0]['uuid']}.jpg")
        (images / f"{rows[1]['uuid']}.jpg").unlink()
        os.mkfifo(images / f"{rows[1]['uuid']}.jpg")
        t0 = time.monotonic()
        run_script("download_images.py", *args, timeout=60)
        assert time.monotonic() - t0 < 30
        assert server.requests[rows[0]["uuid"].lower()] == 2 and server.requests[rows[1]["uuid"].lower()] == 2
    for r in rows[:4]:
        path = images / f"{r['uuid']}.jpg"
        assert path.is_file() and not path.is_symlink()
        verify_image(path.read_bytes())


def _png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, "PNG")
    return buf.getvalue()


def test_elongated_images_are_refused_before_any_resize(tmp_path, mobilenet_weights):
    strip = _png(np.zeros((1, 60000), np.uint8))
    assert len(strip) < 2000  # a tiny file that a short-side resize to 256 would blow up to gigabytes
    with pytest.raises(ImageDecodeError, match="more elongated than 50:1"):
        decode_rgb(strip)
    from paintsim.embedder import Preprocessing

    with pytest.raises(ImageDecodeError, match="more elongated"):
        Preprocessing("center-crop", 256, 224, (0.5,) * 3, (0.25,) * 3, "bilinear")(Image.new("RGB", (20000, 2)))
    imgs, data = tmp_path / "imgs", tmp_path / "data"
    copy_images(imgs, 4)
    (imgs / "strip.png").write_bytes(strip)
    Image.new("RGB", (20000, 2)).save(imgs / "band.png")
    _extract(data, imgs)
    errors = pd.read_csv(data / "features_errors.csv", dtype=str).set_index("file")["error"]
    assert "more elongated" in errors["strip.png"] and "more elongated" in errors["band.png"]
    run_script("extract_features.py", "--data-dir", tmp_path / "real", "--images-dir", imgs,
               "--backbone", "mobilenet_v2", "--no-progress")
    proc = run_script("display_similar.py", "--data-dir", tmp_path / "real", "--image", imgs / "strip.png",
                      check=False)
    assert proc.returncode == 2 and "more elongated" in proc.stderr and "Traceback" not in proc.stderr


class _Drip(BaseHTTPRequestHandler):
    """An image server that sends one byte every 0.2 s, in the body or already in the headers:
    each read is quick, the whole never ends."""

    where = "body"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802
        try:
            if self.where == "headers":  # the status line arrives, then a header that never ends
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100000:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.2)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100000):
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass


def _drip_server(where: str) -> ThreadingHTTPServer:
    handler = type(f"Drip_{where}", (_Drip,), {"where": where})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.mark.parametrize("where", ["body", "headers"])
def test_an_image_url_that_drips_gives_up_at_its_deadline(where):
    from paintsim import query

    server = _drip_server(where)
    try:
        t0 = time.monotonic()
        with pytest.raises(UserError, match=r"deadline (of 2s )?passed"):
            query.fetch_url(f"http://127.0.0.1:{server.server_port}/painting.jpg", deadline=2.0)
        assert time.monotonic() - t0 < 6
    finally:
        server.shutdown()
    assert 0 < query.URL_DEADLINE <= 300  # --image always runs under a finite deadline


def test_spreadsheet_formulas_are_neutralised_for_people_and_the_manifest_stays_exact(tmp_path):
    data = tmp_path / "data"
    names = copy_images(data / "images", 5)
    titles = ["=HYPERLINK(\"http://evil\",\"x\")", "+1+1", "-2+3", "@SUM(A1)", "Plain title"]
    rows = [{"uuid": Path(n).stem, "file": f"images/{n}", "status": "ok", "title": t,
             "attribution": "=cmd|' /C calc'!A0"} for n, t in zip(names, titles)]
    write_manifest(data / "manifest.csv", pd.DataFrame(rows))
    exact = (data / "manifest.csv").read_bytes()
    run_script("extract_features.py", "--data-dir", data, "--backbone", "mobilenet_v2", "--weights", "none",
               "--workers", "0", "--no-progress")
    run_script("display_similar.py", "--data-dir", data, "--query", "row:4", "--k", "4", "--output",
               tmp_path / "fig.png")
    listed = pd.read_csv(tmp_path / "fig.csv", dtype=str, keep_default_na=False)
    for cell in list(listed["title"]) + list(listed["attribution"]):
        assert not cell.startswith(("=", "+", "-", "@")), cell
    assert set(listed["title"]) == {"'" + t for t in titles[:4]}
    assert listed["score"].map(float).between(-1, 1).all()  # numbers stay numbers
    run_script("optimized_similarity.py", "--data-dir", data, "--k", "4", "--no-progress")
    run_script("display_similar.py", "--data-dir", data, "--all", "--k", "4")
    every = pd.read_csv(data / "neighbours.csv", dtype=str, keep_default_na=False)
    text = [c for col in ("query_title", "query_attribution", "neighbour_title", "neighbour_attribution")
            for c in every[col]]
    assert len(every) == 20 and not any(c.startswith(("=", "+", "-", "@")) for c in text)
    assert set(every["query_title"]) == {"'" + t for t in titles[:4]} | {titles[4]}
    imgs = tmp_path / "imgs"
    copy_images(imgs, 2)
    (imgs / "=evil.jpg").write_bytes(b"not an image")
    _extract(tmp_path / "d2", imgs)
    errors = pd.read_csv(tmp_path / "d2" / "features_errors.csv", dtype=str)
    assert errors["file"].tolist() == ["'=evil.jpg"] and errors["error"][0].startswith("'=evil.jpg: ")
    assert read_manifest(data / "manifest.csv")["title"].tolist()[:5] == titles  # the data stays exact
    write_manifest(tmp_path / "again.csv", pd.DataFrame(rows))
    assert (tmp_path / "again.csv").read_bytes() == exact


def test_sixteen_bit_and_float_images_keep_their_tones(tmp_path):
    ramp8 = np.tile(np.linspace(0, 255, 256).round().astype(np.uint8), (64, 1))
    ramp16 = ramp8.astype(np.uint16) * 257
    as16 = decode_rgb(_png(ramp16))
    np.testing.assert_array_equal(np.asarray(as16)[..., 0], ramp8)
    buf = io.BytesIO()
    Image.fromarray(ramp8.astype(np.float32) / 255.0, "F").save(buf, "TIFF")
    as_float = decode_rgb(buf.getvalue())
    assert np.abs(np.asarray(as_float)[..., 0].astype(int) - ramp8).max() <= 1
    hot = ramp8.astype(np.float32) / 255.0
    hot[:, -8:] = 1.03  # a highlight just over white: clipped, the rest keeps its tones
    buf = io.BytesIO()
    Image.fromarray(hot, "F").save(buf, "TIFF")
    as_hot = np.asarray(decode_rgb(buf.getvalue()))[..., 0].astype(int)
    assert (as_hot[:, -8:] == 255).all() and np.abs(as_hot[:, :-8] - ramp8[:, :-8]).max() <= 1
    # and through a file, the way the stages read it
    (tmp_path / "g16.png").write_bytes(_png(ramp16))
    assert np.asarray(load_rgb(tmp_path / "g16.png")).mean() == pytest.approx(ramp8.mean(), abs=0.5)


def test_exif_orientation_is_applied_when_reading_and_when_measuring(tmp_path):
    upright = np.zeros((40, 80, 3), np.uint8)
    upright[:, :20] = 255  # a white band on the left of a landscape picture
    stored = np.rot90(upright, k=1)  # stored on its side (40 wide, 80 high) ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with the tag that says: turn 90 degrees clockwise to view
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(stored)).save(buf, "JPEG", quality=95, exif=exif)
    data = buf.getvalue()
    assert verify_image(data).width == 80 and verify_image(data).height == 40
    img = np.asarray(decode_rgb(data)).astype(int)
    assert img.shape == (40, 80, 3)
    assert img[:, :15].mean() > 200 and img[:, 30:].mean() < 50
    (tmp_path / "turned.jpg").write_bytes(data)
    assert load_rgb(tmp_path / "turned.jpg").size == (80, 40)


# ------------------------------------------------------------- one line instead of a traceback


@pytest.fixture(scope="module")
def real_collection(tmp_path_factory, mobilenet_weights):
    root = tmp_path_factory.mktemp("real")
    copy_images(root / "imgs", 12)
    run_script("extract_features.py", "--data-dir", root, "--images-dir", root / "imgs", "--backbone",
               "mobilenet_v2", "--no-progress")
    run_script("optimized_similarity.py", "--data-dir", root, "--k", "5")
    run_script("compute_similarity.py", "--data-dir", root)
    return root


def _damage(root: Path, case: str) -> None:
    if case == "pickled features":
        np.save(root / "features.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif case == "truncated features":
        raw = (root / "features.npy").read_bytes()
        (root / "features.npy").write_bytes(raw[: len(raw) // 2])
    elif case == "0-byte features":
        (root / "features.npy").write_bytes(b"")
    elif case == "malformed meta":
        (root / "features_meta.json").write_text("{not json")
    elif case == "meta without preprocessing":
        meta = json.loads((root / "features_meta.json").read_text())
        del meta["preprocessing"]
        (root / "features_meta.json").write_text(json.dumps(meta))
    elif case == "int names":
        np.save(root / "image_names.npy", np.arange(12))
    elif case == "neighbour index out of range":
        table = np.load(root / "top_5_similar.npy")
        table["index"][:, 0] = 10**6
        np.save(root / "top_5_similar.npy", table)
    elif case == "manifest not UTF-8":
        (root / "manifest.csv").write_bytes(b"\xff\xfe\x00title\n")
    elif case == "empty manifest":
        (root / "manifest.csv").write_bytes(b"")
    elif case == "manifest without columns":
        (root / "manifest.csv").write_text("a,b\n1,2\n")
    else:
        raise AssertionError(case)


CASES = {  # what is damaged -> words of the one line
    "pickled features": "not a plain NumPy array file",
    "truncated features": "not a plain NumPy array file",
    "0-byte features": "not a plain NumPy array file",
    "malformed meta": "is not valid UTF-8 JSON",
    "meta without preprocessing": "lacks 'preprocessing'",
    "int names": "expected an array of file names",
    "manifest not UTF-8": "manifest.csv is not UTF-8 text",
    "empty manifest": "manifest.csv is not a readable CSV",
    "manifest without columns": "manifest.csv: missing column(s)",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_artifacts_stop_display_and_evaluate_with_one_line(case, real_collection, tmp_path):
    root = _with_manifest(real_collection, tmp_path / "d")
    _damage(root, case)
    image = root / "imgs" / sorted(os.listdir(root / "imgs"))[0]
    for script, extra in (("display_similar.py", ["--image", image]), ("evaluate_unsupervised.py", [])):
        proc = run_script(script, "--data-dir", root, "--no-progress", *extra, check=False, timeout=300)
        assert proc.returncode == 2, (script, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr and CASES[case] in proc.stderr, (script, proc.stderr[-2000:])


def test_a_neighbour_table_with_indices_out_of_range_is_set_aside_with_a_warning(real_collection, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(real_collection, root, symlinks=True)
    _damage(root, "neighbour index out of range")
    proc = run_script("display_similar.py", "--data-dir", root, "--query", "row:0", "--k", "3")
    assert "neighbour indices outside 0..11" in proc.stderr and "an exact search of features.npy" in proc.stdout


@pytest.mark.parametrize("damage", ["group", "wrong shape", "rows_done abc", "rows_done null"])
def test_damaged_matrix_files_are_refused_or_restarted_with_one_line(damage, real_collection, tmp_path):
    import shutil

    root = tmp_path / "d"
    shutil.copytree(real_collection, root, symlinks=True)
    matrix = root / "similarity_scores.h5"
    if damage.startswith("rows_done"):
        os.rename(matrix, root / "similarity_scores.h5.partial")
        with h5py.File(root / "similarity_scores.h5.partial", "r") as f:
            run_id = f.attrs["run_id"]
        state = {"format_version": 1, "n": 12, "rows_done": "abc" if damage.endswith("abc") else None,
                 "run_id": run_id}
        (root / "similarity_scores.h5.progress.json").write_text(json.dumps(state))
        proc = run_script("compute_similarity.py", "--data-dir", root)
        assert "computed 12 rows" in proc.stdout
        return
    with h5py.File(matrix, "r+") as f:
        del f["similarity"]
        if damage == "group":
            f.create_group("similarity")
        else:
            f.create_dataset("similarity", data=np.zeros((3, 5), np.float16))
    proc = run_script("extract_top_10.py", "--data-dir", root, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("no 'similarity'" if damage == "group" else "has shape (3, 5)") in proc.stderr
    proc = run_script("evaluate_unsupervised.py", "--data-dir", root, "--no-progress")
    report = json.loads((root / "evaluation.json").read_text())
    assert report["similarity"]["matrix_check"]["status"] == "skipped"


def _with_manifest(real_collection: Path, root: Path) -> Path:
    import shutil

    shutil.copytree(real_collection, root, symlinks=True)
    write_manifest(root / "manifest.csv", pd.DataFrame(
        [{"uuid": Path(n).stem, "objectid": Path(n).stem, "file": f"images/{n}", "status": "ok"}
         for n in os.listdir(root / "imgs")]))
    return root


def test_bad_flags_and_files_named_by_flags_are_one_line(real_collection, tmp_path):
    root = _with_manifest(real_collection, tmp_path / "d")
    bad_labels = tmp_path / "labels.csv"
    bad_labels.write_bytes(b"objectid,label\n\"1,unterminated\n")
    nonutf8 = tmp_path / "labels2.csv"
    nonutf8.write_bytes(b"objectid,label\n1,\xff\xfe\n")
    for args, words in [
        (["extract_features.py", "--weights", "/etc/passwd", "--backbone", "mobilenet_v2", "--images-dir",
          real_collection / "imgs"], "--weights /etc/passwd"),
        (["display_similar.py", "--random", "--output", tmp_path], "is a folder"),
        (["evaluate_unsupervised.py", "--output", tmp_path], "is a folder"),
        (["evaluate_unsupervised.py", "--h5-max-rows", "0"], "must be at least 1"),
        (["evaluate_unsupervised.py", "--labels-csv", bad_labels], f"--labels-csv {bad_labels}"),
        (["evaluate_unsupervised.py", "--labels-csv", nonutf8], f"--labels-csv {nonutf8}"),
        (["download_images.py", "--connect-timeout", "-1"], "must be greater than 0"),
    ]:
        proc = run_script(args[0], "--data-dir", root, "--no-progress", *args[1:], check=False, timeout=300)
        assert proc.returncode == 2 and words in proc.stderr, (args, proc.stderr[-1500:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-1500:])
