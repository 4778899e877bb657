"""Stage 1: download the selected NGA painting images and write ``manifest.csv``.

One row of the manifest per selected image, each with a ``status`` (ok / failed) and an ``error``.
An image lands in ``images/<uuid>.jpg`` only after its bytes decode (bounded) as a JPEG, through a
temp file + rename, so a file under its final name is always whole. A rerun checks the files that
are there (whole-file check) and skips the valid ones, fetches partial/corrupt/missing ones again and
retries earlier failures. The manifest is rewritten atomically every ``checkpoint_every`` seconds
and at the end, so a killed run loses little; a full disk stops the run cleanly.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd

from .artifacts import DataPaths, atomic_path
from .errors import DISK_FULL_ERRNOS, BadValue, UserError
from .fetch import FetchConfig, Politeness, RobotsRules, fetch, make_session
from .iiif import BadRowError, check_objectid, check_uuid, image_url
from .images import IMAGE_SUFFIXES, ImageDecodeError, decode_rgb, read_file, verify_image
from .manifest import MANIFEST_COLUMNS, read_manifest, write_manifest
from .nga import NGA_TABLES_URL, fetch_tables, load_tables, select_paintings

log = logging.getLogger(__name__)

#: Extra manifest column (after the contract's): where the file came from, ``http`` or ``images-from``.
SOURCE_COLUMN = "source"


class DiskFullError(UserError):
    """The disk (or a file-size limit) refused a write: the run stops, finished work is kept."""


@dataclass
class DownloadOptions:
    data_dir: Path = Path("data")
    csv_dir: Path | None = None            # default: <data_dir>/nga, fetched when absent
    tables_url: str = NGA_TABLES_URL
    size: int = 512
    workers: int = 4
    limit: int | None = None
    sample: int | None = None
    seed: int = 0
    all_views: bool = False
    images_from: Path | None = None
    fetch: FetchConfig = field(default_factory=FetchConfig)
    progress: bool = True
    checkpoint_every: float = 30.0          # seconds between manifest checkpoints
    ignore_robots_txt: bool = False


@dataclass
class DownloadSummary:
    rows: int = 0
    counts: Counter = field(default_factory=Counter)       # ok / failed
    actions: Counter = field(default_factory=Counter)      # fetched / present / copied / failed / rejected
    reasons: Counter = field(default_factory=Counter)
    bytes_fetched: int = 0
    elapsed: float = 0.0
    manifest: Path | None = None

    @property
    def images_per_second(self) -> float:
        done = self.actions["fetched"] + self.actions["copied"]
        return done / self.elapsed if self.elapsed > 0 else 0.0

    def text(self) -> str:
        a = self.actions
        lines = [
            f"manifest: {self.manifest} ({self.rows} rows)",
            f"  ok {self.counts['ok']} (fetched {a['fetched']}, copied {a['copied']}, already present "
            f"{a['present']}), failed {self.counts['failed']} (of which rejected rows {a['rejected']})",
            f"  {self.bytes_fetched / 1e6:.1f} MB written in {self.elapsed:.1f} s "
            f"({self.images_per_second:.1f} images/s)",
        ]
        for reason, n in self.reasons.most_common(5):
            lines.append(f"  failed x{n}: {reason}")
        return "\n".join(lines)


@dataclass
class _Item:
    index: int
    row: dict
    uuid: str
    objectid: str | None
    url: str
    refresh: bool   # the previous run got this image another way (other size / source): fetch anew


# ----------------------------------------------------------------------------------- file helpers
def _write_image(dest: Path, data: bytes) -> None:
    """Write through a temp file + rename; a full disk raises :class:`DiskFullError`, leaving nothing."""
    try:
        with atomic_path(dest, suffix=".jpg") as tmp:
            with open(tmp, "wb") as fh:
                fh.write(data)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise DiskFullError(_disk_full_message(dest, exc)) from exc
        raise


def _disk_full_message(path: Path, exc: OSError) -> str:
    return (f"could not write {path} ({exc.strerror}): the disk is full (or a file-size limit was hit), "
            "so the run stopped; free some space and rerun: finished images are kept")


def check_image_file(path: Path) -> tuple[int, int, int]:
    """(width, height, bytes) of a whole, decodable JPEG; :class:`ImageDecodeError` otherwise."""
    data = read_file(path)
    info = verify_image(data, source=str(path))
    if info.format != "JPEG":
        raise ImageDecodeError(f"{path}: is {info.format}, not a JPEG")
    return info.width, info.height, len(data)


def _index_dir(directory: Path) -> dict[str, Path]:
    """Image files of ``directory`` by lower-case stem (CSV fields are looked up, never joined as paths)."""
    if not directory.is_dir():
        raise UserError(f"--images-from {directory}: not a directory")
    found: dict[str, Path] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            found.setdefault(path.stem.lower(), path)
    return found


# ------------------------------------------------------------------------------------ the stage
class Downloader:
    def __init__(self, opts: DownloadOptions):
        self.opts = opts
        self.paths = DataPaths.of(opts.data_dir)
        self.stop = threading.Event()
        self.politeness = Politeness(opts.fetch.max_rate, self.stop)
        self.session = None if opts.images_from else make_session(opts.workers, opts.fetch.user_agent)
        self.robots = RobotsRules(self.session, opts.fetch, self.politeness, not opts.ignore_robots_txt)
        self.local = _index_dir(opts.images_from) if opts.images_from else None
        self.bytes_lock = threading.Lock()
        self.bytes_written = 0
        self.previous: dict[str, dict] = {}

    # -- planning
    def plan(self, selection: pd.DataFrame, previous: dict[str, dict]) -> tuple[list[dict], list[_Item]]:
        self.previous = previous
        rows: list[dict] = []
        items: list[_Item] = []
        source = "images-from" if self.local is not None else "http"
        seen: set[str] = set()
        for i, sel in enumerate(selection.to_dict("records")):
            row = {c: "" for c in MANIFEST_COLUMNS}
            for c in ("uuid", "objectid", "title", "attribution", "displaydate", "medium", "classification"):
                row[c] = str(sel.get(c, "") or "")
            row[SOURCE_COLUMN] = source
            rows.append(row)
            try:
                uuid = check_uuid(sel["uuid"])
                url = image_url(sel["iiifurl"], self.opts.size, sel.get("maxpixels"), sel.get("width"),
                                sel.get("height"))
            except (BadRowError, ValueError) as exc:
                row.update(status="failed", error=f"rejected row: {exc}")
                continue
            row["uuid"], row["url"] = uuid, url
            if uuid in seen:
                row.update(status="failed", error=f"rejected row: uuid {uuid} repeats an earlier row")
                continue
            seen.add(uuid)
            try:
                objectid = check_objectid(sel["objectid"])
            except BadRowError:
                objectid = None
            prev = previous.get(uuid)
            refresh = bool(prev) and prev.get("status") == "ok" and (
                prev.get("url") != url or prev.get(SOURCE_COLUMN, source) != source)
            items.append(_Item(i, row, uuid, objectid, url, refresh))
        return rows, items

    # -- one image (runs in a worker thread)
    def _obtain(self, item: _Item) -> tuple[bytes | None, str]:
        if self.local is not None:
            src = self.local.get(item.uuid) or (self.local.get(item.objectid) if item.objectid else None)
            if src is None:
                return None, (f"not found in {self.opts.images_from} (looked for {item.uuid}.* and "
                              f"{item.objectid or '?'}.*)")
            try:
                return read_file(src, self.opts.fetch.max_bytes), ""
            except ImageDecodeError as exc:
                return None, str(exc)
        if not self.robots.allowed(item.url):
            parts = urlsplit(item.url)
            return None, f"disallowed by {parts.scheme}://{parts.netloc}/robots.txt"
        res = fetch(self.session, item.url, self.opts.fetch, self.politeness)
        return (res.data, "") if res.ok else (None, res.error)

    def process(self, item: _Item) -> tuple[str, dict]:
        """Return (action, manifest updates); raises only :class:`DiskFullError`."""
        dest = self.paths.images_dir / f"{item.uuid}.jpg"
        rel = f"images/{item.uuid}.jpg"
        existing = None
        if dest.exists():
            try:
                existing = check_image_file(dest)
            except (ImageDecodeError, OSError) as exc:
                log.info("re-fetching %s: %s", rel, exc)
        if existing and not item.refresh:
            w, h, n = existing
            return "present", dict(status="ok", error="", file=rel, width=w, height=h, bytes=n)
        if self.stop.is_set():
            return "stopped", {}
        data, error = self._obtain(item)
        if data is not None:
            try:
                info = verify_image(data, source=item.url)
                if info.format != "JPEG":
                    if self.local is None:
                        raise ImageDecodeError(f"expected a JPEG, got {info.format}")
                    buf = io.BytesIO()
                    decode_rgb(data, source=item.url).save(buf, "JPEG", quality=95)
                    data = buf.getvalue()
                _write_image(dest, data)
                with self.bytes_lock:
                    self.bytes_written += len(data)
                action = "copied" if self.local is not None else "fetched"
                return action, dict(status="ok", error="", file=rel, width=info.width, height=info.height,
                                    bytes=len(data))
            except ImageDecodeError as exc:
                error = str(exc).replace(f"{item.url}: ", "")
        if error.startswith("stopped"):
            return "stopped", {}
        if existing:  # a refresh failed, but the file from before is whole: keep it
            w, h, n = existing
            return "present", dict(status="ok", error=f"refresh failed, kept the existing file: {error}",
                                   file=rel, width=w, height=h, bytes=n)
        return "failed", dict(status="failed", error=error, file="", width="", height="", bytes="")

    # -- the run
    def _kept_from_before(self, row: dict) -> dict | None:
        """The previous manifest's row for a row this run has not reached, while it still holds:
        a failure as it was, an ok row only while its file is a regular file of the listed size."""
        prev = self.previous.get(str(row.get("uuid", "")).lower())
        if prev is None or prev.get("status") != "ok":
            return prev
        rel = Path(str(prev.get("file", "")))
        if rel.is_absolute() or ".." in rel.parts or len(rel.parts) != 2 or rel.parts[0] != "images":
            return None
        try:
            st = os.lstat(self.paths.root / rel)
        except OSError:
            return None
        return prev if stat.S_ISREG(st.st_mode) and str(st.st_size) == str(prev.get("bytes", "")) else None

    def _write_manifest(self, rows: list[dict], done: list[bool]) -> None:
        # a checkpoint (or a stopped run) never drops what an earlier run finished and is still on disk
        keep = [r if d else self._kept_from_before(r) for r, d in zip(rows, done)]
        keep = [r for r in keep if r is not None]
        df = pd.DataFrame(keep, columns=MANIFEST_COLUMNS + [SOURCE_COLUMN])
        try:
            write_manifest(self.paths.manifest, df)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise DiskFullError(_disk_full_message(self.paths.manifest, exc)) from exc
            raise

    def run(self, rows: list[dict], items: list[_Item]) -> DownloadSummary:
        from tqdm.auto import tqdm

        opts = self.opts
        summary = DownloadSummary(rows=len(rows), manifest=self.paths.manifest)
        done = [False] * len(rows)
        for r_i, row in enumerate(rows):
            if row["status"] == "failed":  # rejected at planning
                done[r_i] = True
                summary.actions["rejected"] += 1
        self.paths.images_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.paths.images_dir.glob(".*.tmp"):  # left by a run that was killed mid-write
            stale.unlink(missing_ok=True)
        start = time.perf_counter()
        last_checkpoint = start
        fatal: BaseException | None = None
        bar = tqdm(total=len(items), unit="img", desc="download", disable=not opts.progress)
        pool = ThreadPoolExecutor(max_workers=max(1, opts.workers), thread_name_prefix="download")
        inflight: dict[Future, _Item] = {}

        def record(fut: Future, item: _Item) -> BaseException | None:
            try:
                action, updates = fut.result()
            except DiskFullError as exc:
                self.stop.set()
                return exc
            except Exception as exc:  # a bug or an odd file: that row fails, the run goes on
                log.exception("unexpected error on %s", item.url)
                action, updates = "failed", dict(status="failed", file="", width="", height="",
                                                 bytes="", error=f"unexpected error: {exc!r}")
            if action != "stopped":
                item.row.update(updates)
                done[item.index] = True
                summary.actions[action] += 1
                bar.update(1)
            return None

        queue = iter(items)
        window = max(1, opts.workers) * 4
        try:
            exhausted = False
            while True:
                while not exhausted and not self.stop.is_set() and len(inflight) < window:
                    nxt = next(queue, None)
                    if nxt is None:
                        exhausted = True
                        break
                    inflight[pool.submit(self.process, nxt)] = nxt
                if not inflight:
                    break
                finished, _ = wait(inflight, timeout=1.0, return_when=FIRST_COMPLETED)
                for fut in finished:
                    problem = record(fut, inflight.pop(fut))
                    fatal = fatal or problem
                if time.perf_counter() - last_checkpoint >= opts.checkpoint_every:
                    self._write_manifest(rows, done)
                    last_checkpoint = time.perf_counter()
        except BaseException:
            self.stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            for fut, item in inflight.items():  # what finished while stopping is kept and listed
                if fut.done() and not fut.cancelled():
                    record(fut, item)
            bar.close()
            self._safe_final_manifest(rows, done)
            raise
        pool.shutdown(wait=True)
        bar.close()
        summary.elapsed = time.perf_counter() - start
        if fatal is not None:
            self._safe_final_manifest(rows, done)
            raise fatal
        self._write_manifest(rows, done)
        for row in rows:
            summary.counts[row["status"]] += 1
            if row["status"] == "failed":
                summary.reasons[_reason_key(row["error"])] += 1
        summary.actions["failed"] = summary.counts["failed"] - summary.actions["rejected"]
        summary.bytes_fetched = self.bytes_written
        return summary

    def _safe_final_manifest(self, rows: list[dict], done: list[bool]) -> None:
        try:
            self._write_manifest(rows, done)
            log.info("manifest of the %d images finished so far written to %s", sum(done),
                     self.paths.manifest)
        except Exception as exc:  # the disk may be full: the images are safe anyway
            log.error("could not write %s (%s); a rerun rebuilds it from the images on disk",
                      self.paths.manifest, exc)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()


def _reason_key(error: str) -> str:
    """Group failure messages: drop the per-URL/attempt detail, keep the kind."""
    key = error.split(" (after ")[0]
    return key[:120]


def _previous_manifest(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    try:
        df = read_manifest(path)
    except UserError as exc:
        log.warning("ignoring the unreadable previous manifest (%s)", exc)
        return {}
    return {r["uuid"].lower(): r for r in df.to_dict("records")}


def run_download(opts: DownloadOptions) -> DownloadSummary:
    """The whole stage: tables -> selection -> images + manifest. Returns the summary."""
    paths = DataPaths.of(opts.data_dir)
    if opts.size <= 0:
        raise BadValue("size", opts.size, "must be positive")
    if opts.workers < 1:
        raise BadValue("workers", opts.workers, "must be at least 1")
    csv_dir = Path(opts.csv_dir) if opts.csv_dir else paths.csv_dir
    fetch_tables(csv_dir, opts.tables_url, opts.fetch, progress=opts.progress)
    published, objects = load_tables(csv_dir)
    sel = select_paintings(published, objects, all_views=opts.all_views, limit=opts.limit,
                           sample=opts.sample, seed=opts.seed)
    log.info("%d paintings in %s; %d of their images selected (%s)%s", sel.paintings, csv_dir,
             len(sel.rows), "all views" if opts.all_views else "primary views",
             f"; {sel.dropped_not_open_access} dropped as not open access" if sel.dropped_not_open_access else "")
    downloader = Downloader(opts)
    try:
        rows, items = downloader.plan(sel.rows, _previous_manifest(paths.manifest))
        for row in rows:
            if row["status"] == "failed":
                log.warning("row uuid=%r objectid=%r %s", row["uuid"], row["objectid"], row["error"])
        summary = downloader.run(rows, items)
    finally:
        downloader.close()
    return summary
