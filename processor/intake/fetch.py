"""Fetching over HTTP for URL sources: the allow-list, timeouts, size cap, retries and credentials.

Every request goes through :func:`open_client`: http/https only, a host from ``fetch.allow_hosts``
(checked again for every redirect, so a redirect to another host is refused before it is sent),
explicit timeouts, no proxy/netrc from the environment, and the bearer token read from the
environment variable the config names — never from the config, never logged or stored.

Failures split along the error tree: :class:`FetchRefused` (an :class:`IngestError`: 4xx, a host
or scheme not allowed, a body above the cap — never retried) and :class:`FetchTransient` (a
:class:`TransientError`: timeouts, connection errors, 5xx — retried by :func:`with_retries` with
exponential backoff and jitter).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import httpx

from processor.errors import IngestError, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1 << 20
BACKOFF_CAP_SECONDS = 60.0
MAX_REDIRECTS = 5


class FetchRefused(IngestError):
    """The source answered, or would be reached, in a way that retrying cannot fix."""


class FetchTransient(TransientError):
    """A failure that may pass (timeout, connection, 5xx); retried with backoff."""


class FetchInterrupted(Exception):
    """Shutdown was requested while waiting to retry."""


@dataclass(frozen=True)
class FetchPolicy:
    allow_hosts: frozenset[str]
    timeout: float
    max_bytes: int
    retries: int
    backoff: float
    backoff_cap: float = BACKOFF_CAP_SECONDS


def public_url(url: str | httpx.URL) -> str:
    """The URL without any user:password part (safe for logs, SQLite, results and /status)."""
    parts = urlsplit(str(url))
    if parts.username is None and parts.password is None:
        return str(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_url(url: str | httpx.URL, allow_hosts: frozenset[str]) -> None:
    """Refuse anything but http(s) to an allowed host."""
    parts = urlsplit(str(url))
    if parts.scheme.lower() not in ("http", "https"):
        raise FetchRefused(
            f"refused {parts.scheme or 'scheme-less'} URL {public_url(url)}: only http and https are fetched"
        )
    host = (parts.hostname or "").lower()
    if host not in allow_hosts:
        raise FetchRefused(
            f"refused {public_url(url)}: host {host or '(none)'} is not in fetch.allow_hosts "
            f"({', '.join(sorted(allow_hosts)) or 'empty'}); add it there if it is trusted"
        )


def bearer_token(env_name: str | None, source: str) -> str | None:
    """The token from the environment variable named in the config (None when no auth is configured)."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise FetchRefused(
            f"the environment variable {env_name} named in auth.bearer_env of source "
            f"{source} is not set or empty in the daemon's environment; export it and "
            "restart ctwatch"
        )
    return token


def open_client(policy: FetchPolicy, token: str | None) -> httpx.Client:
    """An httpx client that enforces the allow-list on every request, redirects included."""

    def guard(request: httpx.Request) -> None:
        check_url(request.url, policy.allow_hosts)

    headers = {"User-Agent": "ctwatch"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(
        timeout=httpx.Timeout(policy.timeout, connect=min(policy.timeout, 30.0)),
        follow_redirects=True,
        max_redirects=MAX_REDIRECTS,
        trust_env=False,
        headers=headers,
        event_hooks={"request": [guard]},
    )


def raise_for_status(response: httpx.Response, what: str) -> None:
    """5xx → transient; any other non-2xx → refused, with the server's reason."""
    code = response.status_code
    if 200 <= code < 300:
        return
    reason = f"{what}: HTTP {code} {response.reason_phrase}"
    if response.history:
        reason += f" from {public_url(response.url)} (after a redirect)"
    if code >= 500:
        raise FetchTransient(reason)
    if code in (401, 403):
        raise FetchRefused(reason + "; check the token named in auth.bearer_env and its permissions")
    raise FetchRefused(reason)


def with_retries(
    call: Callable[[], T],
    policy: FetchPolicy,
    *,
    what: str,
    wait: Callable[[float], bool],
    rng: random.Random,
) -> T:
    """Run ``call``; retry timeouts, connection errors and 5xx ``policy.retries`` times with backoff.

    ``wait(seconds)`` sleeps and returns True when shutdown was requested (then FetchInterrupted).
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except httpx.TooManyRedirects as exc:
            raise FetchRefused(f"{what}: more than {MAX_REDIRECTS} redirects") from exc
        except httpx.UnsupportedProtocol as exc:
            raise FetchRefused(f"{what}: {exc}") from exc
        except (httpx.TransportError, FetchTransient) as exc:
            reason = str(exc) if isinstance(exc, FetchTransient) else f"{what}: {_describe(exc)}"
            if attempt > policy.retries:
                raise FetchTransient(f"{reason} (gave up after {attempt} attempts)") from exc
            delay = min(policy.backoff_cap, policy.backoff * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)
            log.warning("source.retry what=%r attempt=%d reason=%r wait=%.2f", what, attempt, reason, delay)
            if wait(delay):
                raise FetchInterrupted(what) from exc


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__}; see fetch.timeout_seconds)"
    return f"{type(exc).__name__}: {exc}"


def check_length(response: httpx.Response, max_bytes: int, what: str) -> None:
    """Refuse before reading a body whose announced Content-Length is above the cap."""
    announced = response.headers.get("content-length")
    if announced is not None and announced.strip().isdigit() and int(announced) > max_bytes:
        raise FetchRefused(
            f"{what}: the server announces {human_bytes(int(announced))} (Content-Length), "
            f"above fetch.max_bytes = {human_bytes(max_bytes)}; nothing was downloaded — "
            "raise fetch.max_bytes if the file is genuine"
        )


def stream_to_file(response: httpx.Response, dest: Path, max_bytes: int, what: str) -> tuple[str, int]:
    """Write the body to ``dest`` (removed on any failure); returns (sha256, size)."""
    check_length(response, max_bytes, what)
    digest = hashlib.sha256()
    size = 0
    try:
        with dest.open("wb") as fh:
            for chunk in response.iter_bytes(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchRefused(
                        f"{what}: the body grew past fetch.max_bytes = "
                        f"{human_bytes(max_bytes)}; the download was stopped and removed — "
                        "raise fetch.max_bytes if the file is genuine"
                    )
                digest.update(chunk)
                fh.write(chunk)
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
