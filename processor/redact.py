"""What ctwatch writes about the outside world: URLs without secrets, source errors as categories.

A URL source's server chooses its reason phrases, bodies, headers and redirect targets; a
pre-signed URL carries its signature in the query. None of that is ever written (SQLite, log,
result JSON, receipts, Excel, the status port). Two functions stand at every such write:

* :func:`redact_url`: ``scheme://host[:port]/path`` — no ``user:password@``, no query, no fragment.
* :func:`quiet_loggers`: client libraries that log URLs or UIDs at INFO are kept to WARNING.
* :class:`SourceFailure`: a failed poll as *what* failed, a closed category, an HTTP status code and
  the fix, all in ctwatch's own words; the only other text it may hold is a number, a size or a
  Content-Type from a closed list.
  :func:`reduce_source_error` turns any stored text (a database written by an older ctwatch
  included) into that form: ours is kept, anything else is reduced to its category.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import urlsplit, urlunsplit


def quiet_loggers(*names: str) -> None:
    """Libraries that log each request's URL, the objects' UIDs or other chatter at INFO are kept to
    WARNING, unless a level was set on purpose (a test looking at them)."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)


def redact_url(url: str) -> str:
    """The URL as ``scheme://host[:port]/path``: credentials, query and fragment removed. Never raises."""
    text = str(url)
    try:
        parts = urlsplit(text)
        host, port = parts.hostname or "", parts.port
    except ValueError:  # a malformed port or bracket: cut by hand
        cut = re.split(r"[?#]", text, maxsplit=1)[0]
        return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/]*@", r"\1", cut)
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{port}" if port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def redact_optional_url(url: str | None) -> str | None:
    return None if url is None else redact_url(url)


class What(StrEnum):
    """What a source was doing when it failed."""

    DOWNLOAD = "download"  # the GET of an http source
    SEARCH = "study search"  # QIDO-RS
    RETRIEVE = "retrieve"  # WADO-RS of one study
    POLL = "poll"  # before or around any request


class Failure(StrEnum):
    """The closed set of reasons a poll failed (``HTTP`` is followed by the status code)."""

    HTTP = "HTTP"
    REFUSED = "connection refused"
    UNRESOLVED = "host not found"
    CONNECT = "cannot connect"
    TIMEOUT = "timed out"
    TLS = "TLS error"
    LOST = "connection lost"
    PROTOCOL = "protocol error"
    NOT_DICOM = "not DICOM"
    NO_INSTANCES = "no DICOM instances"
    BAD_ANSWER = "not a DICOMweb answer"
    TOO_LARGE = "too large"
    REDIRECT = "redirect refused"
    REDIRECTS = "too many redirects"
    NO_TOKEN = "token not set"
    LOW_DISK = "low disk space"
    STATE = "state database error"
    WRITE = "cannot write the download"
    INTERNAL = "internal error"
    OTHER = "error"


_HINTS = {
    Failure.TIMEOUT: "see fetch.timeout_seconds",
    Failure.REFUSED: "check that the server runs and listens on the url's port",
    Failure.UNRESOLVED: "check the host name in the source's url",
    Failure.CONNECT: "check the source's url and the network",
    Failure.TLS: "check the server's certificate and the url's scheme",
    Failure.NOT_DICOM: "the body is neither a ZIP nor a DICOM file; point the source at a .zip or .dcm",
    Failure.NO_INSTANCES: "the answer held no application/dicom part; the study is tried again next poll",
    Failure.BAD_ANSWER: "check that the source's url is the DICOMweb root (e.g. …/dicom-web)",
    Failure.TOO_LARGE: "raise fetch.max_bytes if it is genuine",
    Failure.REDIRECT: (
        "the server redirects to a host not in fetch.allow_hosts or to a scheme other than "
        "http(s); add that host to fetch.allow_hosts if it is trusted"
    ),
    Failure.REDIRECTS: "the server redirects in a loop or too often",
    Failure.NO_TOKEN: (
        "export the environment variable named in auth.bearer_env to the daemon and restart ctwatch"
    ),
    Failure.LOW_DISK: "free disk space is below disk.min_free_gb; polling resumes by itself once freed",
    Failure.STATE: "the state database is locked or not writable; see the log",
    Failure.WRITE: "check the free space and permissions of the inbox's .ctwatch/fetch folder",
    Failure.INTERNAL: "see the log and please report it",
    Failure.OTHER: "see the log",
}
_HTTP_HINTS = {
    401: "check the token named in auth.bearer_env and its permissions",
    403: "check the token named in auth.bearer_env and its permissions",
    404: "check the source's url",
    410: "check the source's url",
}

#: Content-Types a "not DICOM" error may name (anything else is "other").
CONTENT_TYPES = (
    "text/html",
    "text/plain",
    "text/xml",
    "application/json",
    "application/xml",
    "application/pdf",
    "application/octet-stream",
    "application/gzip",
    "application/x-tar",
    "multipart/related",
)
_SIZE = r"\d{1,15}(?:\.\d)? (?:B|KiB|MiB|GiB|TiB)"
_DETAILS = {
    Failure.NOT_DICOM: re.compile(
        r"Content-Type (?:" + "|".join(map(re.escape, CONTENT_TYPES)) + r"|other)|no Content-Type"
    ),
    Failure.TOO_LARGE: re.compile(rf"(?:{_SIZE} announced, )?fetch\.max_bytes = {_SIZE}"),
}
_FORM = re.compile(
    r"(?:(?P<studies>\d{1,9}) stud(?:y|ies) not fetched, first: )?"
    r"(?P<what>" + "|".join(map(re.escape, What)) + r") failed: "
    r"(?P<failure>" + "|".join(re.escape(f) for f in sorted(Failure, key=len, reverse=True)) + r")"
    r"(?: (?P<status>[1-5]\d\d))?"
    r"(?: \((?P<detail>[A-Za-z0-9_ .,=/+-]{1,120})\))?"
    r"(?P<redirect> after a redirect)?"
    r"(?:, gave up after (?P<attempts>\d{1,4}) attempts?)?"
    r"(?: — .*)?",
    re.DOTALL,
)


def content_type_detail(content_type: str) -> str:
    """A response's Content-Type as a :attr:`Failure.NOT_DICOM` detail (from the closed list)."""
    kind = content_type.split(";")[0].strip().lower()
    if not kind:
        return "no Content-Type"
    return f"Content-Type {kind if kind in CONTENT_TYPES else 'other'}"


@dataclass(frozen=True)
class SourceFailure:
    """Why a poll failed, in ctwatch's words only; ``str()`` is what is stored, logged and served."""

    what: What
    failure: Failure
    status: int | None = None
    detail: str | None = None
    after_redirect: bool = False
    attempts: int | None = None
    studies: int | None = None

    def __post_init__(self) -> None:
        pattern = _DETAILS.get(self.failure)
        if self.detail is not None and (pattern is None or not pattern.fullmatch(self.detail)):
            object.__setattr__(self, "detail", None)  # never outside text, whoever built it
        if self.failure is not Failure.HTTP or not (self.status and 100 <= self.status <= 599):
            object.__setattr__(self, "status", None)

    @property
    def hint(self) -> str | None:
        if self.failure is Failure.HTTP:
            return _HTTP_HINTS.get(self.status or 0)
        return _HINTS.get(self.failure)

    def __str__(self) -> str:
        text = f"{self.what} failed: {self.failure}"
        if self.status is not None:
            text += f" {self.status}"
        if self.detail:
            text += f" ({self.detail})"
        if self.after_redirect:
            text += " after a redirect"
        if self.attempts is not None:
            text += f", gave up after {self.attempts} attempt{'' if self.attempts == 1 else 's'}"
        if self.hint:
            text += f" — {self.hint}"
        if self.studies is not None:
            text = f"{self.studies} stud{'y' if self.studies == 1 else 'ies'} not fetched, first: {text}"
        return text

    @classmethod
    def parse(cls, text: str) -> SourceFailure:
        """The failure a stored text describes: its own form read back, anything else classified."""
        form = _FORM.fullmatch(text)
        if form is not None:
            return cls(
                What(form["what"]),
                Failure(form["failure"]),
                status=int(form["status"]) if form["status"] else None,
                detail=form["detail"],
                after_redirect=bool(form["redirect"]),
                attempts=int(form["attempts"]) if form["attempts"] else None,
                studies=int(form["studies"]) if form["studies"] else None,
            )
        return _classify(text)


def reduce_source_error(text: str | None) -> str | None:
    """Any stored source error as :class:`SourceFailure` text (``None`` and ``""`` stay as they are)."""
    if not text:
        return text
    return str(SourceFailure.parse(text))


# Older ctwatch texts (and anything else) by keyword: the first that matches wins.
_KEYWORDS: tuple[tuple[Failure, tuple[str, ...]], ...] = (
    (Failure.NO_TOKEN, ("bearer_env",)),
    (Failure.LOW_DISK, ("min_free_gb",)),
    (Failure.TOO_LARGE, ("max_bytes", "too large")),
    (Failure.NOT_DICOM, ("neither a zip nor a dicom", "not dicom")),
    (Failure.NO_INSTANCES, ("no dicom instances",)),
    (Failure.REDIRECT, ("allow_hosts", "only http and https", "unsupportedprotocol", "redirect refused")),
    (Failure.REDIRECTS, ("redirects",)),
    (Failure.TIMEOUT, ("timed out", "timeout")),
    (Failure.TLS, ("ssl", "certificate", "tls")),
    (Failure.REFUSED, ("connection refused", "errno 111")),
    (Failure.UNRESOLVED, ("name or service not known", "name resolution", "nodename nor servname")),
    (Failure.CONNECT, ("connecterror", "cannot connect", "unreachable")),
    (Failure.PROTOCOL, ("protocolerror", "protocol error")),
    (Failure.LOST, ("readerror", "writeerror", "connection lost", "reset by peer", "ended before")),
    (Failure.BAD_ANSWER, ("multipart", "not json", "json list", "dicomweb answer")),
    (Failure.STATE, ("state database", "state:", "sqlite", "database is locked")),
    (Failure.WRITE, ("cannot write",)),
    (Failure.INTERNAL, ("internal error",)),
)


def _classify(text: str) -> SourceFailure:
    lower = text.lower()
    if "wado" in lower or "retrieve" in lower:
        what = What.RETRIEVE
    elif "qido" in lower or "study search" in lower:
        what = What.SEARCH
    elif lower.startswith("get ") or "download" in lower:
        what = What.DOWNLOAD
    else:
        what = What.POLL
    status = re.search(r"\bHTTP (\d{3})\b", text)
    attempts = re.search(r"gave up after (\d{1,4}) attempts?", text)
    studies = re.match(r"(\d{1,9}) stud(?:y|ies|\(ies\)) not fetched", text)
    failure = Failure.HTTP if status else Failure.OTHER
    if status is None:
        failure = next((f for f, words in _KEYWORDS if any(w in lower for w in words)), Failure.OTHER)
    return SourceFailure(
        what,
        failure,
        status=int(status[1]) if status else None,
        after_redirect="after a redirect" in lower,
        attempts=int(attempts[1]) if attempts else None,
        studies=int(studies[1]) if studies else None,
    )
