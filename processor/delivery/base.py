"""What every sender shares: the :class:`Sender` protocol, a row's files read back from the outbox
(sha256 checked), the token from the environment, the allow-list at send time, and failures in words.

A sender raises :class:`~processor.errors.SendFailed` with ctwatch's own words — a category from
:class:`processor.redact.Failure`, an HTTP status code or a DIMSE status, and the fix — never the
server's reason phrase or body, a URL, a token, a file name or a UID.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

from processor.errors import SendFailed, os_error_words
from processor.intake.allowlist import FetchRefused, check_url
from processor.redact import Failure, quiet_loggers

__all__ = ["quiet_loggers"]  # the senders' one import of it (processor.redact holds it)

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Item kinds that are DICOM files (SR, Secondary Capture key images, Encapsulated PDF).
DICOM_KINDS = ("sr", "sc", "pdf")


class Sender(Protocol):
    """Sends one row's items; returns when the destination has them, else raises ``SendFailed``."""

    kind: str  # dicomweb | dimse | folder | webhook

    def send(self, items: Sequence[Mapping[str, Any]], outbox: Path) -> None: ...


def read_item(item: Mapping[str, Any], outbox: Path) -> bytes:
    """The bytes of a file item (``path`` relative to ``outbox``), checked against its ``sha256``.

    ``SendFailed`` without retry when the file is gone, outside the outbox or changed (sending other
    bytes than the ones recorded would be wrong); with retry when it cannot be read now."""
    kind = item.get("kind", "file")
    relative = PurePosixPath(str(item.get("path") or ""))
    if not relative.parts or relative.is_absolute() or ".." in relative.parts:
        raise SendFailed(
            f"a queued {kind} file does not name a place in the outbox; nothing was sent "
            "(a ctwatch bug: please report it)",
            retry=False,
        )
    try:
        data = (outbox / relative).read_bytes()
    except FileNotFoundError:
        raise SendFailed(
            f"the {kind} file is no longer in the outbox (moved or deleted after the study was "
            "recorded); nothing was sent. Put it back, then `python run.py resend <id>`",
            retry=False,
        ) from None
    except OSError as exc:
        raise SendFailed(
            f"the {kind} file cannot be read from the outbox ({os_error_words(exc)})", retry=True
        ) from exc
    if hashlib.sha256(data).hexdigest() != item.get("sha256"):
        raise SendFailed(
            f"the {kind} file in the outbox changed after the study was recorded (its sha256 differs); "
            "nothing was sent",
            retry=False,
        )
    return data


def read_dicom(item: Mapping[str, Any], outbox: Path) -> Dataset:
    """A DICOM item (``sr``, ``sc``, ``pdf``) read back from the outbox (:func:`read_item`), parsed."""
    kind = item.get("kind")
    if kind not in DICOM_KINDS:
        raise SendFailed(
            f"{kind} cannot be sent to a DICOM destination (it takes {', '.join(DICOM_KINDS)}); "
            "a ctwatch bug: please report it",
            retry=False,
        )
    import pydicom
    from pydicom.errors import InvalidDicomError

    data = read_item(item, outbox)
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise SendFailed(
            f"the {kind} file in the outbox is not readable DICOM; nothing was sent", retry=False
        ) from exc


def env_token(env_name: str | None) -> str | None:
    """The bearer token from the environment variable the config names, read now (None: no auth).
    ``SendFailed`` without retry when it is unset: a running daemon's environment cannot change."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "").strip()
    if not token:
        raise SendFailed(
            f"{Failure.NO_TOKEN}: the environment variable {env_name} (bearer_env) is empty or missing. "
            "Export it to the daemon, restart ctwatch, then `python run.py resend --failed`",
            retry=False,
        )
    return token


def check_host(url: str, allow_hosts: frozenset[str]) -> None:
    """The allow-list again at send time (:func:`processor.intake.allowlist.check_url`)."""
    try:
        check_url(url, allow_hosts)
    except FetchRefused:
        raise SendFailed(
            "the destination's host is not in fetch.allow_hosts (or its url is not http/https): "
            "add it there if it is trusted, restart ctwatch, then `python run.py resend --failed`",
            retry=False,
        ) from None


def http_failed(action: str, status: int) -> SendFailed:
    """An HTTP answer that is not 2xx: 5xx, 408 and 429 are retried, any other status is not."""
    hint = {
        301: "redirects are refused: put the final address in the url",
        302: "redirects are refused: put the final address in the url",
        307: "redirects are refused: put the final address in the url",
        308: "redirects are refused: put the final address in the url",
        400: "the destination did not accept what was sent; see its log",
        401: "check the token named in bearer_env and its permissions",
        403: "check the token named in bearer_env and its permissions",
        404: "check the url",
        409: "the destination refused the objects; see its log",
        413: "the destination refuses objects this large",
        415: "the destination does not take this media type",
    }.get(status)
    retry = status >= 500 or status in (408, 429)
    if retry:
        hint = "the destination is busy or failing; tried again with back-off"
    return SendFailed(f"{action} failed: HTTP {status}" + (f" — {hint}" if hint else ""), retry=retry)


_TRANSPORT_HINTS = {
    Failure.TIMEOUT: "no answer in time (timeout_seconds); tried again with back-off",
    Failure.REFUSED: "the destination is down or not listening on its port; tried again with back-off",
    Failure.UNRESOLVED: "check the host name; tried again with back-off",
    Failure.CONNECT: "check the address and the network; tried again with back-off",
    Failure.TLS: "check the destination's certificate and the url's scheme; tried again with back-off",
    Failure.LOST: "the connection broke off; tried again with back-off",
    Failure.PROTOCOL: "the answer was not valid HTTP; tried again with back-off",
}


def transport_failed(action: str, failure: Failure) -> SendFailed:
    """A network failure (no answer at all) as its category: always retried."""
    hint = _TRANSPORT_HINTS.get(failure, "tried again with back-off")
    return SendFailed(f"{action} failed: {failure} — {hint}", retry=True)


def classify_network_error(exc: BaseException) -> Failure:
    """A network exception of any client library as its category; its text is looked at, never kept."""
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    words = " ".join(f"{type(c).__name__} {c}" for c in chain).lower()
    if any(isinstance(c, TimeoutError) for c in chain) or "timeout" in words or "timed out" in words:
        return Failure.TIMEOUT
    if "ssl" in words or "certificate" in words:
        return Failure.TLS
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "refused" in words:
        return Failure.REFUSED
    if "name or service not known" in words or "nameresolution" in words or "getaddrinfo" in words:
        return Failure.UNRESOLVED
    if (
        "reset by peer" in words
        or "aborted" in words
        or "remotedisconnected" in words
        or "broken pipe" in words
    ):
        return Failure.LOST
    return Failure.CONNECT
