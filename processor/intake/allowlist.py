"""The URL allow-list and the two failure kinds of fetching, without the HTTP client.

:mod:`processor.intake.fetch` (which imports httpx) re-exports all of these; the delivery side
checks destinations against the same list at send time. Kept apart so that what only checks a URL
— every daemon start and ``process`` call builds the delivery senders — does not import httpx
(0.27 CPU-s on a 2-core AMD EPYC, median of 7; issue 18: import only what runs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from processor.errors import IngestError, TransientError
from processor.redact import Failure, SourceFailure, What

if TYPE_CHECKING:
    import httpx


class FetchRefused(IngestError):
    """The source answered, or would be reached, in a way that retrying cannot fix."""

    def __init__(self, failure: SourceFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


class FetchTransient(TransientError):
    """A failure that may pass (timeout, connection, 5xx); retried with backoff."""

    def __init__(self, failure: SourceFailure) -> None:
        super().__init__(str(failure))
        self.failure = failure


def check_url(url: str | httpx.URL, allow_hosts: frozenset[str]) -> None:
    """Refuse anything but http(s) to an allowed host (names neither: a redirect's target is the server's text)."""
    parts = urlsplit(str(url))
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() not in ("http", "https") or host not in allow_hosts:
        raise FetchRefused(SourceFailure(What.POLL, Failure.REDIRECT))
