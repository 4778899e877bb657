"""Stage 1: bring a collection's images into ``images/`` and write ``manifest.csv``.

The collection is NGA's (its open-data tables, images over IIIF or from a folder) or one's own
(a folder plus a metadata CSV, or a CSV of image URLs: ``paintsim.collection``); all routes share
the fetcher, the checks and the manifest. One row of the manifest per selected image, each with a
``status`` (ok / failed) and an ``error``. An image lands in ``images/<key>.jpg`` only after its bytes decode (bounded) as a JPEG, through a
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
from .collection import Entry, FolderIndex, folder_entries, limit_entries, nga_entries, read_metadata, url_entries
from .iiif import BadRowError, check_objectid
from .images import ImageDecodeError, decode_rgb, read_file, verify_image
from .manifest import FETCHED_FROM, MANIFEST_COLUMNS, previous_rows, write_manifest
from .nga import NGA_TABLES_URL, fetch_tables, load_tables, select_paintings

log = logging.getLogger(__name__)


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
    metadata: Path | None = None            # one's own collection: a CSV beside images_from
    urls: Path | None = None                # one's own collection: a CSV of image URLs / IIIF bases
    id_column: str | None = None
    url_column: str | None = None
    url_kind: str = "auto"
    title_column: str | None = None
    artist_column: str | None = None
    date_column: str | None = None
    medium_column: str | None = None
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
    key: str        # the file stem: images/<key>.jpg
    url: str
    local: Path | None  # the file to copy (own folder); NGA's --images-from looks it up by uuid/objectid
    refresh: bool   # the previous run got this image another way (other size / source): fetch anew
    convert: bool   # a PNG, TIFF, ... is re-encoded as JPEG (NGA's IIIF server must send JPEG)
    objectid: str | None = None


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


# ------------------------------------------------------------------------------------ the stage
class Downloader:
    def __init__(self, opts: DownloadOptions, index: FolderIndex | None = None, own: bool = False):
        self.opts = opts
        self.paths = DataPaths.of(opts.data_dir)
        self.stop = threading.Event()
        self.politeness = Politeness(opts.fetch.max_rate, self.stop)
        self.index = index          # NGA's --images-from: files named <uuid> or <objectid>
        self.own = own              # one's own collection: any image format is converted
        self.session = make_session(opts.workers, opts.fetch.user_agent)
        self.robots = RobotsRules(self.session, opts.fetch, self.politeness, not opts.ignore_robots_txt)
        self.bytes_lock = threading.Lock()
        self.bytes_written = 0
        self.previous: dict[str, dict] = {}

    # -- planning
    def plan(self, entries: list[Entry], previous: dict[str, dict]) -> tuple[list[dict], list[_Item]]:
        self.previous = previous
        rows: list[dict] = []
        items: list[_Item] = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            row = entry.row
            local = entry.local is not None or self.index is not None
            fetched_from = "images-from" if local else "http"
            row[FETCHED_FROM] = fetched_from
            rows.append(row)
            if entry.error or not entry.key:
                row.update(status="failed", error=f"rejected row: {entry.error or 'no key'}")
                continue
            key = entry.key
            row["key"] = key
            if key.lower() in seen:
                row.update(status="failed", error=f"rejected row: {key} repeats an earlier row")
                continue
            seen.add(key.lower())
            try:
                objectid = check_objectid(row.get("objectid", ""))
            except BadRowError:
                objectid = None
            prev = previous.get(key.lower())
            refresh = bool(prev) and prev.get("status") == "ok" and (
                prev.get("url", "") != entry.url or prev.get(FETCHED_FROM, fetched_from) != fetched_from)
            items.append(_Item(i, row, key, entry.url, entry.local, refresh, convert=self.own or local,
                               objectid=objectid))
        return rows, items

    # -- one image (runs in a worker thread)
    def _obtain(self, item: _Item) -> tuple[bytes | None, str]:
        src = item.local
        if src is None and self.index is not None:
            for name in (item.key, item.objectid):
                try:
                    src = self.index.find(name) if name else None
                except BadRowError:
                    src = None
                if src is not None:
                    break
            if src is None:
                return None, (f"not found in {self.index.root} (looked for {item.key}.* and "
                              f"{item.objectid or '?'}.*)")
        if src is not None:
            try:
                return read_file(src, self.opts.fetch.max_bytes, within=self.index.root if self.index
                                 else self.opts.images_from), ""
            except ImageDecodeError as exc:
                return None, str(exc)
        if not self.robots.allowed(item.url):
            parts = urlsplit(item.url)
            return None, f"disallowed by {parts.scheme}://{parts.netloc}/robots.txt"
        res = fetch(self.session, item.url, self.opts.fetch, self.politeness)
        return (res.data, "") if res.ok else (None, res.error)

    def process(self, item: _Item) -> tuple[str, dict]:
        """Return (action, manifest updates); raises only :class:`DiskFullError`."""
        dest = self.paths.images_dir / f"{item.key}.jpg"
        rel = f"images/{item.key}.jpg"
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
        source = item.url or str(item.local or item.key)
        if data is not None:
            try:
                info = verify_image(data, source=source)
                if info.format != "JPEG":
                    if not item.convert:
                        raise ImageDecodeError(f"expected a JPEG, got {info.format}")
                    buf = io.BytesIO()
                    img = decode_rgb(data, source=source)
                    img.save(buf, "JPEG", quality=95)
                    data = buf.getvalue()
                    info = verify_image(data, source=source)
                _write_image(dest, data)
                with self.bytes_lock:
                    self.bytes_written += len(data)
                action = "copied" if (item.local is not None or self.index is not None) else "fetched"
                return action, dict(status="ok", error="", file=rel, width=info.width, height=info.height,
                                    bytes=len(data))
            except ImageDecodeError as exc:
                error = str(exc).replace(f"{source}: ", "")
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
        prev = self.previous.get(str(row.get("key", "")).lower())
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
        columns = list(dict.fromkeys(MANIFEST_COLUMNS + [FETCHED_FROM] + [c for r in rows for c in r]))
        df = pd.DataFrame(keep, columns=columns)
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


def _own_entries(opts: DownloadOptions) -> tuple[list[Entry], FolderIndex | None, str]:
    """One's own collection: the metadata CSV's rows (folder route) or the URL CSV's."""
    chosen = {"title": opts.title_column, "attribution": opts.artist_column,
              "displaydate": opts.date_column, "medium": opts.medium_column}
    if opts.urls is not None:
        df = read_metadata(opts.urls)
        entries = url_entries(df, opts.url_column, opts.id_column, chosen, opts.size, opts.url_kind,
                              metadata_name=str(opts.urls))
        return entries, None, f"{len(entries)} rows of {opts.urls}"
    if opts.images_from is None:
        raise BadValue("metadata", str(opts.metadata), "needs the folder of images (--images-from DIR)")
    df = read_metadata(opts.metadata)
    index = FolderIndex(opts.images_from)
    entries = folder_entries(df, index, opts.id_column, chosen, metadata_name=str(opts.metadata))
    return entries, index, f"{len(entries)} rows of {opts.metadata} for the {len(index)} images of {opts.images_from}"


def run_download(opts: DownloadOptions) -> DownloadSummary:
    """The whole stage: a collection's rows -> images + manifest. Returns the summary."""
    paths = DataPaths.of(opts.data_dir)
    if opts.size <= 0:
        raise BadValue("size", opts.size, "must be positive")
    if opts.workers < 1:
        raise BadValue("workers", opts.workers, "must be at least 1")
    if opts.urls is not None and opts.metadata is not None:
        raise BadValue("urls", str(opts.urls), "a URL CSV is its own metadata: leave out --metadata")
    own = opts.urls is not None or opts.metadata is not None
    if own and opts.csv_dir is not None:
        raise BadValue("csv_dir", str(opts.csv_dir), "NGA's tables do not go with --metadata or --urls")
    if own and opts.all_views:
        raise BadValue("all_views", True, "is for NGA's tables, not --metadata or --urls")
    if own:
        entries, index, what = _own_entries(opts)
        entries = limit_entries(entries, opts.limit, opts.sample, opts.seed)
        log.info("%s; %d selected", what, len(entries))
        downloader = Downloader(opts, own=True)
    else:
        csv_dir = Path(opts.csv_dir) if opts.csv_dir else paths.csv_dir
        fetch_tables(csv_dir, opts.tables_url, opts.fetch, progress=opts.progress)
        published, objects = load_tables(csv_dir)
        sel = select_paintings(published, objects, all_views=opts.all_views, limit=opts.limit,
                               sample=opts.sample, seed=opts.seed)
        log.info("%d paintings in %s; %d of their images selected (%s)%s", sel.paintings, csv_dir,
                 len(sel.rows), "all views" if opts.all_views else "primary views",
                 f"; {sel.dropped_not_open_access} dropped as not open access" if sel.dropped_not_open_access else "")
        entries = nga_entries(sel.rows, opts.size)
        downloader = Downloader(opts, index=FolderIndex(opts.images_from) if opts.images_from else None)
    try:
        rows, items = downloader.plan(entries, previous_rows(paths.manifest))
        for row in rows:
            if row["status"] == "failed":
                log.warning("row key=%r title=%r %s", row.get("key") or row.get("uuid"), row["title"][:60],
                            row["error"])
        summary = downloader.run(rows, items)
    finally:
        downloader.close()
    return summary
