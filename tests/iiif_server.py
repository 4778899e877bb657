"""A real local IIIF image server on 127.0.0.1 for tests and benchmarks, able to misbehave on purpose.

It serves ``/iiif/<uuid>/full/!S,S/0/default.jpg`` from an in-memory ``{uuid: jpeg bytes}`` map over
HTTP/1.1 keep-alive, plus any static file put in ``server.files`` (e.g. the NGA tables). Per uuid
(or for every uuid, key ``"*"``) a :class:`Misbehave` makes the next ``times`` requests answer
429 + Retry-After, 503, stall past the client's timeout, cut the body short, or send HTML.
It counts requests and complete good answers per uuid, so tests can prove nothing good was
fetched twice.

Run it alone (``python tests/iiif_server.py --images data/sample/images``) to point a real
download_images.py at it.
"""
from __future__ import annotations

import argparse
import csv
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_PATH_RE = re.compile(r"^/iiif/([0-9a-fA-F-]{36})/full/!(\d+),(\d+)/0/default\.jpg$")
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"

HTML_ERROR = (b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
              b"<body><h1>Oops</h1><p>Try again later.</p></body></html>")


@dataclass
class Misbehave:
    """What to do instead of answering well: kind in {429, 503, slow, drip, truncate, html, 404}
    (drip: the status line and headers sent one byte every ``delay`` seconds, never finished)."""

    kind: str
    times: int = 10 ** 9          # how many requests misbehave before good answers resume
    retry_after: str | None = "1"  # for 429/503
    delay: float = 5.0            # for slow: seconds to stall before the headers


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out as separate writes: no 40 ms delayed-ACK stall
    server: "IIIFServer"

    def log_message(self, fmt, *args):  # keep test output quiet
        pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None,
              send_bytes: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if send_bytes is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body if send_bytes is None else body[:send_bytes])
        self.wfile.flush()
        if send_bytes is not None:
            self.close_connection = True

    def do_GET(self):  # noqa: N802 (http.server API)
        srv = self.server
        if srv.delay:
            time.sleep(srv.delay)
        if self.path in srv.files:
            self._send(200, srv.files[self.path], "text/csv")
            return
        m = _PATH_RE.match(self.path)
        if not m:
            self._send(404, b"not found", "text/plain")
            return
        uuid = m.group(1).lower()
        with srv.lock:
            srv.requests[uuid] += 1
            srv.user_agents.add(self.headers.get("User-Agent", ""))
            mis = srv.misbehave.get(uuid) or srv.misbehave.get("*")
            if mis is not None and mis.times > 0:
                mis.times -= 1
                srv.misbehaved[uuid] += 1
            else:
                mis = None
        body = srv.images.get(uuid)
        if mis is not None:
            if mis.kind in ("429", "503"):
                headers = {"Retry-After": mis.retry_after} if mis.retry_after is not None else {}
                self._send(int(mis.kind), b"slow down", "text/plain", headers)
                return
            if mis.kind == "slow":
                time.sleep(mis.delay)
            elif mis.kind == "drip":
                try:
                    for byte in b"HTTP/1.1 200 OK\r\n" + b"X" * 100000:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(mis.delay)
                except OSError:  # the client gave up: its deadline
                    pass
                self.close_connection = True
                return
            elif mis.kind == "truncate" and body is not None:
                self._send(200, body, "image/jpeg", send_bytes=len(body) // 2)
                return
            elif mis.kind == "html":
                self._send(200, HTML_ERROR, "text/html; charset=utf-8")
                return
            elif mis.kind == "404":
                self._send(404, b"no such image", "text/plain")
                return
        if body is None:
            self._send(404, b"no such image", "text/plain")
            return
        try:
            self._send(200, body, "image/jpeg")
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            return
        with srv.lock:
            srv.served_ok[uuid] += 1


class IIIFServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, images: dict[str, bytes], port: int = 0, delay: float = 0.0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.images = {k.lower(): v for k, v in images.items()}
        self.files: dict[str, bytes] = {}
        self.misbehave: dict[str, Misbehave] = {}
        self.requests: Counter = Counter()
        self.served_ok: Counter = Counter()
        self.misbehaved: Counter = Counter()
        self.user_agents: set[str] = set()
        self.delay = delay
        self.lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def handle_error(self, request, client_address):  # a client that hung up is not news
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def iiif_base(self, uuid: str) -> str:
        return f"{self.base_url}/iiif/{uuid}"

    def start(self) -> "IIIFServer":
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="iiif-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def __enter__(self) -> "IIIFServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ------------------------------------------------------------------------------- sample helpers
def sample_rows() -> list[dict]:
    """The embedded sample's metadata rows (objectid, uuid, file, ...)."""
    with open(SAMPLE / "metadata.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def sample_images() -> dict[str, bytes]:
    """{uuid: JPEG bytes} of the 79 real NGA thumbnails of data/sample."""
    return {r["uuid"]: (SAMPLE / "images" / f"{r['objectid']}.jpg").read_bytes() for r in sample_rows()}


def write_tables(csv_dir: Path, base_url: str, edit=None) -> Path:
    """Copy data/sample's NGA tables into ``csv_dir`` with every ``iiifurl`` pointing at ``base_url``.

    ``edit(pub_rows, obj_rows)`` may change the rows (lists of dicts) before they are written.
    """
    csv_dir = Path(csv_dir)
    csv_dir.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name in ("published_images.csv", "objects.csv"):
        with open(SAMPLE / name, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            tables[name] = (reader.fieldnames, list(reader))
    for row in tables["published_images.csv"][1]:
        row["iiifurl"] = f"{base_url}/iiif/{row['uuid']}"
    if edit is not None:
        edit(tables["published_images.csv"][1], tables["objects.csv"][1])
    for name, (header, rows) in tables.items():
        with open(csv_dir / name, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
    return csv_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--delay", type=float, default=0.0, help="seconds of delay on every request")
    args = ap.parse_args()
    with IIIFServer(sample_images(), port=args.port, delay=args.delay) as srv:
        print(f"serving {len(srv.images)} sample images at {srv.base_url}/iiif/<uuid>/full/!S,S/0/default.jpg",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
