"""A polite, robust HTTP fetcher: one pooled session, timeouts, retries with backoff, Retry-After.

Every URL ends as a :class:`FetchResult` with ``ok`` or a reason, never an exception, so one bad
URL never stops a run. Transient trouble (HTTP 429, 5xx, 408, connection errors, timeouts, a body
cut short) is retried with exponential backoff and full jitter; ``Retry-After`` (seconds or an HTTP
date) is honoured, capped, and pauses *every* worker, since the server is one host.
"""
from __future__ import annotations

import email.utils
import functools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter

from . import __version__

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
    backoff: float = 1.0            # first retry waits up to this many seconds, doubling each time
    backoff_max: float = 60.0
    retry_after_max: float = 300.0  # longest Retry-After we obey (longer ones are capped)
    max_bytes: int = 64 * 1024 * 1024
    max_rate: float = 0.0           # requests per second across all workers; 0 = no limit
    user_agent: str = field(default_factory=default_user_agent)


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


def make_session(workers: int, user_agent: str | None = None) -> requests.Session:
    """A session whose connection pool fits ``workers`` threads (keep-alive reuse, no urllib3 retries).

    With ``trust_env`` requests re-reads every proxy variable of the environment on *each* request
    (about 1 ms of CPU): the environment is read once per host instead (:func:`fetch`), and the CA
    bundle variables once here.
    """
    session = requests.Session()
    session.trust_env = False
    session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, workers), max_retries=0)
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


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, config: FetchConfig, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff: uniform in [0.5, 1] x backoff x 2**attempt, capped."""
    rng = rng or random
    ceiling = min(config.backoff_max, config.backoff * (2 ** attempt))
    return ceiling * (0.5 + 0.5 * rng.random())


class _Retryable(Exception):
    def __init__(self, reason: str, http_status: int | None = None, retry_after: float | None = None):
        super().__init__(reason)
        self.http_status = http_status
        self.retry_after = retry_after


def _read_body(resp: requests.Response, max_bytes: int) -> bytes:
    declared = resp.headers.get("Content-Length")
    expected = int(declared) if declared and declared.isdigit() else None
    if expected is not None and expected > max_bytes:
        raise ValueError(f"body of {expected} bytes exceeds the {max_bytes}-byte limit")
    chunks, got = [], 0
    try:
        for chunk in resp.raw.stream(1 << 16, decode_content=True):
            got += len(chunk)
            if got > max_bytes:
                raise ValueError(f"body exceeds the {max_bytes}-byte limit")
            chunks.append(chunk)
    except ValueError:
        raise
    except Exception as exc:  # urllib3 ProtocolError/IncompleteRead/ReadTimeout: the body was cut
        if "timeout" in type(exc).__name__.lower() or "timed out" in str(exc).lower():
            raise _Retryable(f"read timeout in the body after {got} bytes") from exc
        detail = str(exc.args[-1] if exc.args else exc)[:120]
        raise _Retryable(f"truncated body (expected {expected if expected is not None else '?'} bytes; "
                         f"{detail})") from exc
    if expected is not None and got < expected and not resp.headers.get("Content-Encoding"):
        raise _Retryable(f"truncated body (got {got} of {expected} bytes)")
    return b"".join(chunks)


def fetch(session: requests.Session, url: str, config: FetchConfig,
          politeness: Politeness | None = None, rng: random.Random | None = None) -> FetchResult:
    """GET ``url`` with retries; return the body or the reason it could not be had."""
    politeness = politeness or Politeness(config.max_rate)
    last = FetchResult(url=url, ok=False, error="not attempted")
    for attempt in range(config.max_retries + 1):
        try:
            politeness.wait_turn()
        except _Stop:
            return FetchResult(url=url, ok=False, error="stopped before completion", attempts=attempt)
        last.attempts = attempt + 1
        try:
            with session.get(url, stream=True, timeout=(config.connect_timeout, config.read_timeout),
                             allow_redirects=True, proxies=_env_proxies(url)) as resp:
                status = resp.status_code
                ctype = resp.headers.get("Content-Type", "")
                if status in RETRY_STATUSES:
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                    raise _Retryable(f"HTTP {status} {resp.reason or ''}".strip(), status, retry_after)
                if status != 200:
                    return FetchResult(url=url, ok=False, error=f"HTTP {status} {resp.reason or ''}".strip(),
                                       http_status=status, attempts=attempt + 1, content_type=ctype)
                try:
                    data = _read_body(resp, config.max_bytes)
                except ValueError as exc:
                    return FetchResult(url=url, ok=False, error=str(exc), http_status=status,
                                       attempts=attempt + 1, content_type=ctype)
                return FetchResult(url=url, ok=True, data=data, http_status=status,
                                   attempts=attempt + 1, content_type=ctype)
        except _Retryable as exc:
            last = FetchResult(url=url, ok=False, error=str(exc), http_status=exc.http_status,
                               attempts=attempt + 1)
            retry_after = exc.retry_after
        except requests.exceptions.InvalidURL as exc:
            return FetchResult(url=url, ok=False, error=f"invalid URL ({exc})", attempts=attempt + 1)
        except requests.exceptions.Timeout as exc:
            kind = "connect timeout" if isinstance(exc, requests.exceptions.ConnectTimeout) else "read timeout"
            last = FetchResult(url=url, ok=False, error=f"{kind} after "
                               f"{config.connect_timeout if kind == 'connect timeout' else config.read_timeout:g}s",
                               attempts=attempt + 1)
            retry_after = None
        except requests.exceptions.RequestException as exc:
            last = FetchResult(url=url, ok=False, error=f"connection error ({type(exc).__name__}: "
                               f"{str(exc)[:200]})", attempts=attempt + 1)
            retry_after = None
        if attempt >= config.max_retries:
            break
        if retry_after is not None:
            delay = min(retry_after, config.retry_after_max)
            politeness.pause_all(delay)  # the server asked everyone to slow down
            log.debug("%s: %s, Retry-After %.1fs", url, last.error, delay)
        else:
            delay = backoff_delay(attempt, config, rng)
            log.debug("%s: %s, retrying in %.2fs", url, last.error, delay)
        try:
            politeness.sleep(delay)
        except _Stop:
            last.error += " (stopped before retrying)"
            return last
    if last.attempts > 1:
        last.error += f" (after {last.attempts} attempts)"
    return last


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
