"""Fetching over HTTP for URL sources: the allow-list, timeouts, size cap, retries and credentials.

Every request goes through :func:`open_client`: http/https only, a host from ``fetch.allow_hosts``
(checked again for every redirect, so a redirect to another host is refused before it is sent),
explicit timeouts, no proxy/netrc from the environment, and the bearer token read from the
environment variable the config names — never from the config, never logged or stored.

Failures split along the error tree: :class:`FetchRefused` (an :class:`IngestError`: 4xx, a host
or scheme not allowed, a body above the cap — never retried) and :class:`FetchTransient` (a
:class:`TransientError`: timeouts, connection errors, 5xx — retried by :func:`with_retries` with
exponential backoff and jitter). Each carries a :class:`~processor.redact.SourceFailure`: what
failed, its category and HTTP status code in ctwatch's words — never the server's reason phrase,
body, headers or redirect target, never a URL (see :mod:`processor.redact`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import httpx

from processor.intake.allowlist import FetchRefused as FetchRefused  # re-exported: defined there
from processor.intake.allowlist import FetchTransient as FetchTransient
from processor.intake.allowlist import check_url as check_url
from processor.redact import Failure, SourceFailure, What, quiet_loggers

log = logging.getLogger(__name__)

T = TypeVar("T")
CHUNK = 1 << 20
BACKOFF_CAP_SECONDS = 60.0
MAX_REDIRECTS = 5


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


def bearer_token(env_name: str | None) -> str | None:
    """The token from the environment variable named in the config (None when no auth is configured)."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        log.error("source.token_missing env=%s: export it to the daemon and restart ctwatch", env_name)
        raise FetchRefused(SourceFailure(What.POLL, Failure.NO_TOKEN))
    return token


def open_client(policy: FetchPolicy, token: str | None) -> httpx.Client:
    """An httpx client that enforces the allow-list on every request, redirects included.

    httpx logs every request at INFO with its full URL (a pre-signed query included) and the
    server's reason phrase; those lines are kept out of ctwatch's log (WARNING and above only),
    unless a level was set on purpose (a test looking at the requests).
    """
    quiet_loggers("httpx", "httpcore")

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


def raise_for_status(response: httpx.Response, what: What) -> None:
    """5xx → transient; any other non-2xx → refused. Only the status code is kept, never the reason."""
    code = response.status_code
    if 200 <= code < 300:
        return
    failure = SourceFailure(what, Failure.HTTP, status=code, after_redirect=bool(response.history))
    if code >= 500:
        raise FetchTransient(failure)
    raise FetchRefused(failure)


def with_retries(
    call: Callable[[], T],
    policy: FetchPolicy,
    *,
    what: What,
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
        except FetchRefused as exc:  # the allow-list hook does not know what the request was for
            if exc.failure.what is What.POLL:
                raise FetchRefused(replace(exc.failure, what=what)) from exc
            raise
        except httpx.TooManyRedirects as exc:
            raise FetchRefused(SourceFailure(what, Failure.REDIRECTS)) from exc
        except httpx.UnsupportedProtocol as exc:
            raise FetchRefused(SourceFailure(what, Failure.REDIRECT)) from exc
        except (httpx.TransportError, FetchTransient) as exc:
            failure = exc.failure if isinstance(exc, FetchTransient) else transport_failure(exc, what)
            if attempt > policy.retries:
                raise FetchTransient(replace(failure, attempts=attempt)) from exc
            delay = min(policy.backoff_cap, policy.backoff * 2 ** (attempt - 1)) * rng.uniform(0.5, 1.0)
            log.warning(
                "source.retry what=%r attempt=%d reason=%r wait=%.2f", str(what), attempt, str(failure), delay
            )
            if wait(delay):
                raise FetchInterrupted(str(what)) from exc


def transport_failure(exc: httpx.TransportError, what: What) -> SourceFailure:
    """A transport error as its category; the OS or TLS library's words are looked at, never kept."""
    if isinstance(exc, httpx.TimeoutException):
        return SourceFailure(what, Failure.TIMEOUT)
    if isinstance(exc, httpx.ProtocolError):
        return SourceFailure(what, Failure.PROTOCOL)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return SourceFailure(what, Failure.REDIRECT)
    causes: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(isinstance(c, ssl.SSLError) for c in causes) or "ssl" in str(exc).lower():
        return SourceFailure(what, Failure.TLS)
    if isinstance(exc, httpx.ConnectError):
        if any(isinstance(c, ConnectionRefusedError) for c in causes) or "refused" in str(exc).lower():
            return SourceFailure(what, Failure.REFUSED)
        if any(isinstance(c, socket.gaierror) for c in causes):
            return SourceFailure(what, Failure.UNRESOLVED)
        return SourceFailure(what, Failure.CONNECT)
    return SourceFailure(what, Failure.LOST)


def check_length(response: httpx.Response, max_bytes: int, what: What) -> None:
    """Refuse before reading a body whose announced Content-Length is above the cap."""
    announced = response.headers.get("content-length")
    if announced is not None and announced.strip().isdigit() and int(announced) > max_bytes:
        raise FetchRefused(
            SourceFailure(
                what,
                Failure.TOO_LARGE,
                detail=f"{human_bytes(int(announced))} announced, fetch.max_bytes = {human_bytes(max_bytes)}",
            )
        )


def too_large(what: What, max_bytes: int) -> FetchRefused:
    """A body (or study) that grew past the cap while it was read."""
    return FetchRefused(
        SourceFailure(what, Failure.TOO_LARGE, detail=f"fetch.max_bytes = {human_bytes(max_bytes)}")
    )


def stream_to_file(response: httpx.Response, dest: Path, max_bytes: int, what: What) -> tuple[str, int]:
    """Write the body to ``dest`` (removed on any failure); returns (sha256, size)."""
    check_length(response, max_bytes, what)
    digest = hashlib.sha256()
    size = 0
    try:
        with dest.open("wb") as fh:
            for chunk in response.iter_bytes(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(what, max_bytes)
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
