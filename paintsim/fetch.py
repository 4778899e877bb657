"""The one HTTP client of paintsim: NGA's tables, the collection's images and outside-image URLs.

One pooled ``requests`` session per run, timeouts, an identifying User-Agent, and every URL ends
as a :class:`FetchResult` with ``ok`` or a reason, never an exception, so one bad URL never stops
a run. What to retry and how long to wait is urllib3's :class:`~urllib3.util.Retry` (HTTP 408,
429, 5xx, connection errors and timeouts; exponential backoff with jitter; ``Retry-After`` in
seconds or as an HTTP date, capped). What it lacks is kept here: a ``Retry-After`` pauses *every*
worker (the server is one host), a body cut short is retried like a dropped connection, a body
has a size cap, and each URL has a total deadline (a server dripping one byte per second never
trips a per-read timeout): past it, a watchdog thread shuts the attempt's socket, so even a status
line or headers sent a byte at a time end on time.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import MaxRetryError
from urllib3.util import Retry

from . import __version__
from .artifacts import atomic_path

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 509, 520, 521, 522, 523, 524})


def default_user_agent() -> str:
    return (f"paintsim/{__version__} (painting-similarity research on NGA open data; polite batch "
            f"downloader) python-requests/{requests.__version__}")


@dataclass
class FetchConfig:
    """How patient and how polite to be. Tests shrink the delays; users rarely need to."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0            # retry n >= 2 waits backoff x 2**(n-1) s + up to backoff of jitter
    backoff_max: float = 60.0
    retry_after_max: float = 300.0  # longest Retry-After we obey (longer ones are capped)
    max_bytes: int = 64 * 1024 * 1024
    max_rate: float = 0.0           # requests per second across all workers; 0 = no limit
    deadline: float = 600.0         # seconds one URL may take in all, retries included; 0 = none
    user_agent: str = field(default_factory=default_user_agent)

    def __post_init__(self) -> None:
        for name in ("connect_timeout", "read_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("max_retries", "backoff", "backoff_max", "retry_after_max", "max_rate", "deadline"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {self.max_bytes}")

    def retry(self) -> Retry:
        """The retry policy: counts attempts, says which answers to retry and how long to wait."""
        return Retry(total=self.max_retries, redirect=10, status_forcelist=RETRY_STATUSES,
                     allowed_methods=frozenset({"GET"}), backoff_factor=self.backoff,
                     backoff_jitter=self.backoff, backoff_max=self.backoff_max,
                     retry_after_max=int(self.retry_after_max), respect_retry_after_header=True,
                     raise_on_status=False)


@dataclass
class FetchResult:
    url: str
    ok: bool
    data: bytes | None = None
    error: str = ""
    http_status: int | None = None
    attempts: int = 0
    content_type: str = ""


class _Stop(Exception):
    pass


class Politeness:
    """Shared by every worker: a pause after 429/503 with Retry-After, and an optional rate limit."""

    def __init__(self, max_rate: float = 0.0, stop: threading.Event | None = None):
        self._lock = threading.Lock()
        self._resume_at = 0.0
        self._interval = 1.0 / max_rate if max_rate and max_rate > 0 else 0.0
        self._next_slot = 0.0
        self.stop = stop or threading.Event()

    def at_most_every(self, seconds: float) -> None:
        """Never start two requests closer than ``seconds`` apart (a robots.txt Crawl-delay)."""
        with self._lock:
            self._interval = max(self._interval, seconds)

    def pause_all(self, seconds: float) -> None:
        with self._lock:
            self._resume_at = max(self._resume_at, time.monotonic() + seconds)

    def sleep(self, seconds: float) -> None:
        if seconds > 0 and self.stop.wait(seconds):
            raise _Stop()

    def wait_turn(self) -> None:
        """Block until the server-wide pause is over and a rate-limit slot is free."""
        while True:
            with self._lock:
                now = time.monotonic()
                wait = self._resume_at - now
                if wait <= 0:
                    if self._interval:
                        slot = max(now, self._next_slot)
                        self._next_slot = slot + self._interval
                        wait = slot - now
                    else:
                        wait = 0
                    go = True
                else:
                    go = False
            self.sleep(wait)
            if self.stop.is_set():
                raise _Stop()
            if go:
                return


class _Attempt:
    """One GET under a deadline: the connections it used, and whether the watchdog cut them."""

    __slots__ = ("deadline", "conns", "cut")

    def __init__(self, deadline: float):
        self.deadline, self.conns, self.cut = deadline, [], False


class _Watchdog:
    """One thread for all workers: shuts the sockets of every attempt past its deadline.

    A per-read timeout never fires on a server that answers a byte at a time, in the body or in
    the status line and headers (where no code of ours runs); shutting the socket makes the
    blocked receive return at once, and the attempt is marked so its error says why.
    """

    TICK = 0.1  # seconds: how late past its deadline an attempt may end

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._attempts: set[_Attempt] = set()
        self._thread: threading.Thread | None = None

    def start(self, attempt: _Attempt) -> None:
        with self._cond:
            self._attempts.add(attempt)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="paintsim-fetch-deadline", daemon=True)
                self._thread.start()
            self._cond.notify()

    def end(self, attempt: _Attempt) -> None:
        with self._cond:
            self._attempts.discard(attempt)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._attempts:
                    self._cond.wait()
                now = time.monotonic()
                late = [a for a in self._attempts if now >= a.deadline]
                for attempt in late:
                    self._attempts.discard(attempt)
                    attempt.cut = True
                    for conn in attempt.conns:
                        sock = getattr(conn, "sock", None)
                        if sock is not None:
                            try:
                                sock.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
            time.sleep(self.TICK)


_WATCHDOG = _Watchdog()
_current = threading.local()  # the calling thread's _Attempt, read by its connections


def _watched(base: type) -> type:
    """``base`` (urllib3's connection class) enrolling itself in the calling thread's attempt."""

    class Watched(base):  # type: ignore[misc, valid-type]
        def request(self, *args, **kwargs):
            attempt = getattr(_current, "attempt", None)
            if attempt is not None:
                attempt.conns.append(self)
                if attempt.cut:  # the deadline passed while this connection was being opened
                    raise requests.exceptions.ConnectionError("deadline passed")
            return super().request(*args, **kwargs)

    Watched.__name__ = f"Watched{base.__name__}"
    return Watched


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _watched(HTTPConnection)


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _watched(HTTPSConnection)


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _Adapter(HTTPAdapter):
    """requests' adapter whose pools (direct and through an HTTP proxy) the watchdog can cut."""

    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_WATCHED_POOLS)

    def proxy_manager_for(self, proxy, **proxy_kwargs):
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):
            manager.pool_classes_by_scheme = dict(_WATCHED_POOLS)
        return manager


def make_session(workers: int = 1, user_agent: str | None = None) -> requests.Session:
    """A session whose connection pool fits ``workers`` threads (keep-alive reuse; retries are ours).

    With ``trust_env`` requests re-reads every proxy variable of the environment on *each* request
    (about 1 ms of CPU): the environment is read once per host instead (:func:`fetch`), and the CA
    bundle variables once here.
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    adapter = _Adapter(pool_connections=4, pool_maxsize=max(1, workers), max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = user_agent or default_user_agent()
    session.headers["Accept"] = "image/jpeg,image/*;q=0.9,*/*;q=0.1"
    return session


@functools.lru_cache(maxsize=64)
def _env_proxies_for(scheme_host: str) -> tuple:
    return tuple(sorted(requests.utils.get_environ_proxies(scheme_host).items()))


def _env_proxies(url: str) -> dict:
    """The environment's proxies (HTTP(S)_PROXY, NO_PROXY) for ``url``'s host, read once per host."""
    parts = urlsplit(url)
    return dict(_env_proxies_for(f"{parts.scheme}://{parts.netloc}/"))


def parse_retry_after(value: str | None, max_seconds: float = 300.0) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date, capped at
    ``max_seconds``); None if absent or malformed."""
    if not value:
        return None
    try:
        return float(Retry(retry_after_max=int(max_seconds)).parse_retry_after(value.strip()))
    except Exception:  # noqa: BLE001 - urllib3's InvalidHeader, or a date it cannot convert
        return None


class _Retryable(Exception):
    """A body cut short or too slow: retried like a dropped connection."""


class _Fatal(Exception):
    """An answer that retrying will not fix (over the size limit, past the deadline)."""


def _stream(resp: requests.Response, max_bytes: int, deadline: float | None, sink) -> int:
    """Feed the body to ``sink`` in chunks, enforcing the size cap and the deadline; return bytes."""
    declared = resp.headers.get("Content-Length")
    expected = int(declared) if declared and declared.isdigit() else None
    if expected is not None and expected > max_bytes:
        raise _Fatal(f"body of {expected} bytes exceeds the {max_bytes}-byte limit")
    got = 0
    try:
        # read1: whatever one receive brings, so a server dripping bytes meets the deadline too
        # (read(n) would wait for all n bytes, however long they take)
        for chunk in iter(lambda: resp.raw.read1(1 << 16, decode_content=True), b""):
            got += len(chunk)
            if got > max_bytes:
                raise _Fatal(f"body exceeds the {max_bytes}-byte limit")
            if deadline is not None and time.monotonic() > deadline:
                raise _Fatal(f"deadline passed while reading the body ({got} bytes so far)")
            sink(chunk)
    except (_Fatal, OSError):
        raise
    except Exception as exc:  # urllib3 ProtocolError/IncompleteRead/ReadTimeout: the body was cut
        if "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower():
            raise _Retryable(f"read timeout in the body after {got} bytes") from exc
        detail = str(exc.args[-1] if exc.args else exc)[:120]
        raise _Retryable(f"truncated body (expected {expected if expected is not None else '?'} bytes; "
                         f"{detail})") from exc
    attempt = getattr(_current, "attempt", None)
    if attempt is not None and attempt.cut:  # the watchdog ended it: a body without a length looks whole
        raise _Retryable("cut at the deadline")
    if expected is not None and got < expected and not resp.headers.get("Content-Encoding"):
        raise _Retryable(f"truncated body (got {got} of {expected} bytes)")
    return got


def _with_retries(session: requests.Session, url: str, config: FetchConfig,
                  politeness: Politeness | None, read: Callable[[requests.Response, float | None], bytes | None]
                  ) -> FetchResult:
    """GET ``url`` until ``read`` accepts a 200 answer, retrying what the policy says to retry."""
    politeness = politeness or Politeness(config.max_rate)
    retry = config.retry()
    deadline = time.monotonic() + config.deadline if config.deadline else None
    result = FetchResult(url=url, ok=False, error="not attempted")
    while True:
        try:
            politeness.wait_turn()
        except _Stop:
            result.error = "stopped before completion"
            return result
        result.attempts += 1
        retry_after = None
        attempt = _Attempt(deadline) if deadline is not None else None
        if attempt is not None:
            _current.attempt = attempt
            _WATCHDOG.start(attempt)
        try:
            with session.get(url, stream=True, timeout=(config.connect_timeout, config.read_timeout),
                             allow_redirects=True, proxies=_env_proxies(url)) as resp:
                status = resp.status_code
                result.http_status, result.content_type = status, resp.headers.get("Content-Type", "")
                error = f"HTTP {status} {resp.reason or ''}".strip()
                if retry.is_retry("GET", status, "Retry-After" in resp.headers):
                    retry = retry.increment("GET", url, response=resp.raw)
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"), config.retry_after_max)
                    result.error = error
                elif status != 200:
                    result.error = error
                    return result
                else:
                    try:
                        result.data = read(resp, deadline)
                    except _Fatal as exc:
                        result.error = str(exc)
                        return result
                    result.ok, result.error = True, ""
                    return result
        except _Retryable as exc:
            result.error = str(exc)
            retry = _increment(retry, url, exc)
        except requests.exceptions.InvalidURL as exc:
            result.error = f"invalid URL ({exc})"
            return result
        except requests.exceptions.Timeout as exc:
            connect = isinstance(exc, requests.exceptions.ConnectTimeout)
            result.error = (f"{'connect' if connect else 'read'} timeout after "
                            f"{config.connect_timeout if connect else config.read_timeout:g}s")
            retry = _increment(retry, url, exc)
        except requests.exceptions.RequestException as exc:
            result.error = f"connection error ({type(exc).__name__}: {str(exc)[:200]})"
            retry = _increment(retry, url, exc)
        except MaxRetryError:
            retry = None
        finally:
            if attempt is not None:
                _current.attempt = None
                _WATCHDOG.end(attempt)
        if attempt is not None and attempt.cut:
            result.ok, result.data = False, None
            result.error = f"deadline of {config.deadline:g}s passed while waiting for the answer"
            return result
        if retry is None:
            break
        delay = retry_after if retry_after is not None else retry.get_backoff_time()
        if deadline is not None and time.monotonic() + delay > deadline:
            result.error += f" (deadline of {config.deadline:g}s reached)"
            return result
        if retry_after is not None:
            politeness.pause_all(delay)  # the server asked everyone to slow down
        log.debug("%s: %s, retrying in %.2fs", url, result.error, delay)
        try:
            politeness.sleep(delay)
        except _Stop:
            result.error += " (stopped before retrying)"
            return result
    if result.attempts > 1:
        result.error += f" (after {result.attempts} attempts)"
    return result


def _increment(retry: Retry, url: str, exc: Exception) -> Retry | None:
    try:
        return retry.increment("GET", url, error=exc)
    except MaxRetryError:
        return None
    except Exception:  # noqa: BLE001 - urllib3 re-raises errors it deems not retryable
        return None


def fetch(session: requests.Session, url: str, config: FetchConfig,
          politeness: Politeness | None = None) -> FetchResult:
    """GET ``url`` into memory (at most ``config.max_bytes``) with retries; the body or the reason."""
    def read(resp, deadline):
        chunks: list[bytes] = []
        _stream(resp, config.max_bytes, deadline, chunks.append)
        return b"".join(chunks)

    return _with_retries(session, url, config, politeness, read)


def fetch_to_file(session: requests.Session, url: str, dest: str | os.PathLike[str], config: FetchConfig,
                  progress: bool = False) -> FetchResult:
    """GET ``url`` into ``dest`` through a temp file renamed into place only when whole."""
    from tqdm.auto import tqdm

    dest = Path(dest)

    def read(resp, deadline):
        total = int(resp.headers.get("Content-Length") or 0) or None
        with atomic_path(dest, suffix=dest.suffix) as tmp, open(tmp, "wb") as fh, \
                tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar:
            def sink(chunk: bytes) -> None:
                fh.write(chunk)
                bar.update(len(chunk))
            _stream(resp, config.max_bytes, deadline, sink)
            fh.flush()
            os.fsync(fh.fileno())
        return None

    return _with_retries(session, url, config, None, read)


class RobotsRules:
    """Each host's robots.txt, fetched once (with the same retries); NGA asks crawlers to follow it.

    A missing robots.txt (HTTP 4xx) allows everything; one that cannot be had at all (5xx or no
    connection after the retries) is logged and treated as allowing everything, so a flaky
    robots.txt never stops a run. ``Crawl-delay`` slows every worker down accordingly.
    """

    AGENT = "paintsim"

    def __init__(self, session: requests.Session, config: FetchConfig, politeness: Politeness,
                 enabled: bool = True):
        self.session, self.config, self.politeness, self.enabled = session, config, politeness, enabled
        self._lock = threading.Lock()
        self._hosts: dict[str, object] = {}

    def _load(self, root: str):
        from urllib.robotparser import RobotFileParser

        res = fetch(self.session, f"{root}/robots.txt", self.config, self.politeness)
        if not res.ok:
            if res.http_status is None or res.http_status >= 500:
                log.warning("%s/robots.txt could not be read (%s); going on as if it allowed everything",
                            root, res.error)
            return None
        parser = RobotFileParser(f"{root}/robots.txt")
        parser.parse((res.data or b"").decode("utf-8", "replace").splitlines())
        delay = parser.crawl_delay(self.AGENT)
        if delay:
            log.info("%s/robots.txt asks for a Crawl-delay of %s s: obeyed", root, delay)
            self.politeness.at_most_every(float(delay))
        return parser

    def allowed(self, url: str) -> bool:
        if not self.enabled:
            return True
        parts = urlsplit(url)
        root = f"{parts.scheme}://{parts.netloc}"
        with self._lock:  # the first worker to reach a host reads its robots.txt; the others wait
            if root not in self._hosts:
                self._hosts[root] = self._load(root)
            parser = self._hosts[root]
        return parser is None or parser.can_fetch(self.AGENT, url)
