"""URL sources: poll http files and DICOMweb servers, and hand what is new to Intake like an inbox file.

The daemon (or its scheduler) calls :meth:`SourcePoller.poll` for each name of
:meth:`SourcePoller.schedule` at that source's interval, from any thread: a poll opens its own
SQLite connection, never raises (the error is recorded on the source's row) and holds no lock
shared with other sources, so one slow or failing source never stalls another or the inbox.

* ``http``: a conditional GET (ETag / Last-Modified). A changed body is streamed under the size
  cap into ``<inbox>/.ctwatch/fetch/``, then registered by content sha256 through
  :class:`~processor.intake.register.Intake`; a body identical to the last one taken is dropped.
* ``dicomweb``: QIDO-RS lists studies (config filters, StudyDate from ``lookback``, limit/offset
  paging); each study version not fetched yet — StudyInstanceUID + its instance count — is
  retrieved by WADO-RS into a folder of instances that becomes one arrival. A study that grows
  later has a new version and is fetched again.

Nothing the server chooses is written (:mod:`processor.redact`): an error is recorded and logged
as its category and HTTP status code, a URL without credentials, query or fragment, and an http
arrival is named after the configured URL's path (never the server's Content-Disposition).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

import httpx

from processor.config import Settings, SourceSettings
from processor.errors import ConfigError, CtwatchError
from processor.intake import dicomweb
from processor.intake.fetch import (
    FetchInterrupted,
    FetchPolicy,
    FetchRefused,
    FetchTransient,
    bearer_token,
    open_client,
    raise_for_status,
    stream_to_file,
    transport_failure,
    with_retries,
)
from processor.intake.inbox import InboxLayout
from processor.intake.register import Intake
from processor.redact import Failure, SourceFailure, What, content_type_detail, redact_url
from processor.safename import safe_name
from processor.state import State

log = logging.getLogger(__name__)

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
# An entity-tag as RFC 9110 writes it; anything else is not kept (the body's sha256 still dedupes).
_ENTITY_TAG = re.compile(r'(?:W/)?"[\x21\x23-\x7e]{0,126}"')


@dataclass
class PollOutcome:
    """What one poll of one source did. ``ok`` is False when an error was recorded.

    ``error`` is :class:`~processor.redact.SourceFailure` text: ctwatch's words only.
    """

    source: str
    ok: bool
    arrivals: list[int] = field(default_factory=list)
    unchanged: int = 0
    detail: str = ""
    error: str | None = None


@dataclass
class _Download:
    path: Path
    sha256: str
    size: int
    content_type: str
    etag: str | None
    last_modified: str | None


def check_sources(settings: Settings) -> None:
    """Cross-checks the config models cannot make alone: unique names, every host allowed."""
    problems = []
    names: set[str] = set()
    allowed = set(settings.fetch.allow_hosts)
    for i, source in enumerate(settings.sources):
        if source.name in names:
            problems.append(
                f"sources.{i}.name ({source.name!r}): two sources have this name. "
                "Fix: give each source its own name."
            )
        names.add(source.name)
        host = (urlsplit(source.url).hostname or "").lower()
        if host not in allowed:
            problems.append(
                f"sources.{i}.url ({redact_url(source.url)!r}): host {host} is not in "
                f"fetch.allow_hosts. Fix: add {host} to fetch.allow_hosts if it is trusted."
            )
    if problems:
        where = settings.config_file or "settings"
        raise ConfigError(
            f"{where}: {len(problems)} problem(s) in the URL sources:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


class SourcePoller:
    """Polls the configured URL sources; every poll feeds Intake and records itself in SQLite."""

    def __init__(
        self,
        settings: Settings,
        state_path: Path,
        make_intake: Callable[[State], Intake],
        *,
        on_arrival: Callable[[int], None] = lambda arrival_id: None,
        may_fetch: Callable[[], bool] = lambda: True,
        rng: random.Random | None = None,
    ) -> None:
        check_sources(settings)
        self.sources = {s.name: s for s in settings.sources}
        self.state_path = Path(state_path)
        self.make_intake = make_intake
        self.on_arrival = on_arrival
        self.may_fetch = may_fetch
        self.rng = rng or random.Random()
        self.policy = FetchPolicy(
            allow_hosts=frozenset(settings.fetch.allow_hosts),
            timeout=settings.fetch.timeout_seconds,
            max_bytes=settings.fetch.max_bytes,
            retries=settings.fetch.retries,
            backoff=settings.fetch.backoff_seconds,
        )
        self.staging = InboxLayout(settings.inbox.dirs[0]).control / "fetch"
        self._stop = threading.Event()
        self._locks = {name: threading.Lock() for name in self.sources}

    # ------------------------------------------------------------------ API for the daemon
    def schedule(self) -> list[tuple[str, float]]:
        """(source name, interval in seconds) for every configured source."""
        return [(s.name, s.every) for s in self.sources.values()]

    def stop(self) -> None:
        """Interrupt backoff waits and DICOMweb retrievals between studies (shutdown)."""
        self._stop.set()

    def clean_staging(self, registered: set[str] | frozenset[str] = frozenset()) -> None:
        """Remove downloads a crash left half-done (the source is polled again; nothing is lost).

        A staging folder holding the body of a registered arrival (``registered``: the paths of
        arrivals not yet finished) is kept: the arrival is processed from there.
        """
        if not self.staging.exists():
            return
        keep = {Path(p) for p in registered}
        for folder in self.staging.iterdir():
            if any(path == folder or path.is_relative_to(folder) for path in keep):
                log.info("source.staging_kept folder=%s: it holds a registered arrival", folder.name)
                continue
            if folder.is_dir() and not folder.is_symlink():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)

    def poll(self, name: str, now: datetime | None = None) -> PollOutcome:
        """Poll one source once. Never raises: errors are recorded on the source and returned."""
        now = now or datetime.now(UTC)
        source = self.sources.get(name)
        if source is None:
            return PollOutcome(name, False, error=f"no source named {name!r} is configured")
        lock = self._locks[name]
        if not lock.acquire(blocking=False):
            return PollOutcome(name, True, detail="skipped: the previous poll is still running")
        try:
            return self._poll_locked(source, now)
        finally:
            lock.release()

    # ------------------------------------------------------------------ one poll
    def _poll_locked(self, source: SourceSettings, now: datetime) -> PollOutcome:
        at = now.astimezone(UTC).isoformat(timespec="seconds")
        outcome = PollOutcome(source.name, True)
        try:
            state = State(self.state_path)
        except (sqlite3.Error, OSError) as exc:  # nothing can be recorded; the next poll tries again
            log.error("source.poll source=%s outcome=error error=%r", source.name, f"state: {exc}")
            return PollOutcome(source.name, False, error=str(SourceFailure(What.POLL, Failure.STATE)))
        try:
            state.source_poll_started(source.name, source.kind, redact_url(source.url), at)
            if self.may_fetch():
                self._fetch(source, state, now, at, outcome)
            else:
                outcome.ok, outcome.error = False, str(SourceFailure(What.POLL, Failure.LOW_DISK))
            if outcome.detail == "interrupted by shutdown":
                return outcome
            if outcome.ok:
                state.source_poll_succeeded(
                    source.name, at, arrivals=len(outcome.arrivals), detail=outcome.detail
                )
                log.info(
                    "source.poll source=%s outcome=ok arrivals=%d unchanged=%d detail=%r",
                    source.name,
                    len(outcome.arrivals),
                    outcome.unchanged,
                    outcome.detail,
                )
            else:
                state.source_poll_failed(
                    source.name, at, error=outcome.error or "", arrivals=len(outcome.arrivals)
                )
                log.warning(
                    "source.poll source=%s outcome=error arrivals=%d error=%r",
                    source.name,
                    len(outcome.arrivals),
                    outcome.error,
                )
        except sqlite3.Error as exc:  # e.g. locked past the busy timeout: reported, not raised
            log.error("source.poll source=%s outcome=error error=%r", source.name, f"state: {exc}")
            outcome.ok, outcome.error = False, str(SourceFailure(What.POLL, Failure.STATE))
        finally:
            state.close()
        for arrival_id in outcome.arrivals:
            self.on_arrival(arrival_id)
        return outcome

    def _fetch(
        self, source: SourceSettings, state: State, now: datetime, at: str, outcome: PollOutcome
    ) -> None:
        """Run the source's fetch; every failure ends up in ``outcome`` (never raised)."""
        try:
            intake = self.make_intake(state)
            token = bearer_token(source.auth.bearer_env if source.auth else None)
            with open_client(self.policy, token) as client:
                if source.kind == "http":
                    self._poll_http(source, client, state, intake, outcome)
                else:
                    self._poll_dicomweb(source, client, state, intake, now, outcome, at)
        except FetchInterrupted:
            outcome.ok, outcome.detail = False, "interrupted by shutdown"
            log.info("source.poll source=%s outcome=interrupted", source.name)
        except (CtwatchError, httpx.HTTPError, OSError, sqlite3.Error) as exc:
            outcome.ok, outcome.error = False, str(_failure(exc, source.name))
        except Exception:  # a bug must not kill the polling thread; it is recorded
            log.exception("source.crashed source=%s", source.name)
            outcome.ok, outcome.error = False, str(SourceFailure(What.POLL, Failure.INTERNAL))

    def _retrying(self, call: Callable[[], object], what: What) -> object:
        return with_retries(call, self.policy, what=what, wait=self._stop.wait, rng=self.rng)

    def _new_staging_dir(self) -> Path:
        folder = self.staging / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    # ------------------------------------------------------------------ http
    def _poll_http(
        self, source: SourceSettings, client: httpx.Client, state: State, intake: Intake, outcome: PollOutcome
    ) -> None:
        known = state.source_validators(source.name)
        conditional = {}
        if known["etag"]:
            conditional["If-None-Match"] = known["etag"]
        if known["last_modified"]:
            conditional["If-Modified-Since"] = known["last_modified"]
        folder = self._new_staging_dir()
        try:
            what = What.DOWNLOAD
            download = self._retrying(lambda: self._get(client, source.url, conditional, folder, what), what)
            if download is None:
                outcome.unchanged, outcome.detail = 1, "not modified (304)"
                return
            assert isinstance(download, _Download)
            if download.sha256 == known["last_sha256"] or state.source_has_body(source.name, download.sha256):
                state.set_source_validators(
                    source.name,
                    etag=download.etag,
                    last_modified=download.last_modified,
                    sha256=download.sha256,
                )
                outcome.unchanged, outcome.detail = 1, "unchanged body (same sha256 as the last one taken)"
                return
            path = folder / _arrival_name(source, download)
            download.path.rename(path)
            arrival_id = intake.accept(
                path, kind="http", source_name=source.name, source_url=redact_url(source.url)
            )
            state.set_source_validators(
                source.name, etag=download.etag, last_modified=download.last_modified, sha256=download.sha256
            )
            if arrival_id is not None:
                outcome.arrivals.append(arrival_id)
            outcome.detail = f"new body {download.sha256[:12]} ({download.size} bytes)"
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _get(
        self, client: httpx.Client, url: str, conditional: dict[str, str], folder: Path, what: What
    ) -> _Download | None:
        with client.stream("GET", url, headers=conditional) as response:
            if response.status_code == 304:
                return None
            raise_for_status(response, what)
            target = folder / "body.part"
            sha, size = stream_to_file(response, target, self.policy.max_bytes, what)
            return _Download(
                target,
                sha,
                size,
                response.headers.get("content-type", ""),
                _entity_tag(response.headers.get("etag")),
                _http_date(response.headers.get("last-modified")),
            )

    # ------------------------------------------------------------------ dicomweb
    def _poll_dicomweb(
        self,
        source: SourceSettings,
        client: httpx.Client,
        state: State,
        intake: Intake,
        now: datetime,
        outcome: PollOutcome,
        at: str,
    ) -> None:
        root = source.url.rstrip("/")
        since = _since(now, source.lookback)
        what = What.SEARCH
        studies = self._retrying(
            lambda: list(
                dicomweb.search_studies(client, root, source.query, since, page_size=source.page_size)
            ),
            what,
        )
        assert isinstance(studies, list)
        errors: list[SourceFailure] = []
        for ref in studies:
            if state.source_item_known(source.name, ref.uid, ref.version):
                outcome.unchanged += 1
                continue
            if self._stop.is_set():
                raise FetchInterrupted("between studies")
            try:
                arrival_id = self._fetch_study(source, client, intake, root, ref)
            except FetchRefused as exc:  # this study only; the others go on, it is tried again next poll
                errors.append(exc.failure)
                log.warning(
                    "source.study_refused source=%s study=%s reason=%r",
                    source.name,
                    _study_label(ref.uid),
                    str(exc.failure),
                )
                continue
            state.record_source_item(source.name, ref.uid, ref.version, arrival_id, at)
            if arrival_id is not None:
                outcome.arrivals.append(arrival_id)
        outcome.detail = (
            f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} listed, "
            f"{len(outcome.arrivals)} fetched, {outcome.unchanged} already fetched"
        )
        if errors:
            outcome.ok, outcome.error = False, str(replace(errors[0], studies=len(errors)))

    def _fetch_study(
        self, source: SourceSettings, client: httpx.Client, intake: Intake, root: str, ref: dicomweb.StudyRef
    ) -> int | None:
        outer = self._new_staging_dir()
        folder = outer / safe_name(f"{source.name}-{ref.uid}-n{ref.instances or 0}")
        try:

            def attempt() -> int:
                shutil.rmtree(folder, ignore_errors=True)  # a retried retrieval starts from scratch
                return dicomweb.retrieve_study(client, root, ref.uid, folder, self.policy.max_bytes)

            count = self._retrying(attempt, What.RETRIEVE)
            if count == 0:
                raise FetchRefused(SourceFailure(What.RETRIEVE, Failure.NO_INSTANCES))
            log.info(
                "source.study_retrieved source=%s study=%s instances=%s listed=%s",
                source.name,
                _study_label(ref.uid),
                count,
                ref.instances,
            )
            return intake.accept(
                folder,
                kind="dicomweb",
                source_name=source.name,
                source_url=f"{redact_url(root)}/studies/{ref.uid}",
            )
        finally:
            shutil.rmtree(outer, ignore_errors=True)


class SourceThreads:
    """One ``ctwatch-source-<name>`` thread per source: a poll at start, then one every ``every``.

    Each source has its own thread, so a source waiting out a timeout or a backoff delays nobody
    else (the scheduler's single job thread included). ``stop()`` also interrupts backoff waits.
    """

    def __init__(
        self, poller: SourcePoller, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.poller = poller
        self.clock = clock
        self._stop = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self.errors = 0

    def start(self) -> None:
        """Start a thread for each source that has none running (the supervisor calls this again
        when one died: only that one is started anew)."""
        self._stop.clear()
        for name, every in self.poller.schedule():
            running = self._threads.get(name)
            if running is not None and running.is_alive():
                continue
            thread = threading.Thread(
                target=self._loop, args=(name, every), name=f"ctwatch-source-{name}", daemon=True
            )
            thread.start()
            self._threads[name] = thread

    def _loop(self, name: str, every: float) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self.poller.poll(name, self.clock())
            except Exception:  # noqa: BLE001 — e.g. the database locked; one poll lost, the loop lives
                self.errors += 1
                log.exception("source.poll_crashed source=%s: polled again at the next interval", name)
            self._stop.wait(max(0.0, every - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self.poller.stop()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads.values():
            thread.join(timeout)

    def is_alive(self) -> bool:
        """True while every source's thread runs (one dead source is a dead part to restart)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads.values())


def _since(now: datetime, lookback: float | None) -> date | None:
    if lookback is None:
        return None
    local = now.astimezone() if now.tzinfo else now
    return (local - timedelta(seconds=lookback)).date()


def _entity_tag(header: str | None) -> str | None:
    """The ETag to send back in If-None-Match, when it is one (kept in ``sources.etag`` only)."""
    if header is None or not _ENTITY_TAG.fullmatch(header.strip()):
        return None
    return header.strip()


def _http_date(header: str | None) -> str | None:
    """Last-Modified re-written from its parsed date (so nothing but a date is kept), or None."""
    if not header:
        return None
    try:
        when = parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return format_datetime(when.astimezone(UTC), usegmt=True)


def _study_label(uid: str) -> str:
    """A study in a log line: the end of its UID, as the pipeline's ``study=`` labels show it."""
    return uid[-12:]


def _arrival_name(source: SourceSettings, download: _Download) -> str:
    """A safe file name for the body, from the configured URL's path (its last part) or the source's
    name — never the server's Content-Disposition, nor a query; the suffix follows the content."""
    with download.path.open("rb") as fh:
        head = fh.read(132)
    candidate = unquote(urlsplit(redact_url(source.url)).path.rsplit("/", 1)[-1]) or source.name
    name = safe_name(candidate.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).lstrip(".") or source.name
    content_type = download.content_type.split(";")[0].strip().lower()
    if head[:4] in ZIP_MAGICS:
        suffix = ".zip"
    elif head[128:132] == b"DICM" or content_type == "application/dicom":
        suffix = ".dcm"
    else:
        raise FetchRefused(
            SourceFailure(What.DOWNLOAD, Failure.NOT_DICOM, detail=content_type_detail(content_type))
        )
    return name if name.lower().endswith(suffix) else name + suffix


def _failure(exc: BaseException, source: str) -> SourceFailure:
    """Any failure of a poll as its category; the details that are ours go to the log only."""
    if isinstance(exc, FetchRefused | FetchTransient):
        return exc.failure
    if isinstance(exc, httpx.TransportError):
        return transport_failure(exc, What.POLL)
    if isinstance(exc, httpx.HTTPError):  # e.g. a body that does not decode as its Content-Encoding
        return SourceFailure(What.POLL, Failure.PROTOCOL)
    if isinstance(exc, sqlite3.Error):
        log.error("source.state_error source=%s error=%r", source, str(exc))
        return SourceFailure(What.POLL, Failure.STATE)
    if isinstance(exc, OSError):
        log.error("source.write_error source=%s error=%r", source, exc.strerror or type(exc).__name__)
        return SourceFailure(What.POLL, Failure.WRITE)
    log.error("source.error source=%s error=%r", source, type(exc).__name__)
    return SourceFailure(What.POLL, Failure.OTHER)
