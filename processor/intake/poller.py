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
"""

from __future__ import annotations

import email.message
import logging
import random
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
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
    bearer_token,
    open_client,
    public_url,
    raise_for_status,
    stream_to_file,
    with_retries,
)
from processor.intake.inbox import InboxLayout
from processor.intake.register import Intake
from processor.safename import safe_name
from processor.state import State

log = logging.getLogger(__name__)

ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


@dataclass
class PollOutcome:
    """What one poll of one source did. ``ok`` is False when an error was recorded."""

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
    filename: str | None
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
                f"sources.{i}.url ({public_url(source.url)!r}): host {host} is not in "
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
            return PollOutcome(source.name, False, error=f"cannot open the state database: {exc}")
        try:
            state.source_poll_started(source.name, source.kind, public_url(source.url), at)
            if self.may_fetch():
                self._fetch(source, state, now, at, outcome)
            else:
                outcome.ok, outcome.error = (
                    False,
                    (
                        "not polled: free disk space is below disk.min_free_gb; "
                        "free some space (polling resumes by itself)"
                    ),
                )
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
            outcome.ok, outcome.error = False, f"state database: {exc}"
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
            token = bearer_token(source.auth.bearer_env if source.auth else None, source.name)
            with open_client(self.policy, token) as client:
                if source.kind == "http":
                    self._poll_http(source, client, state, intake, outcome)
                else:
                    self._poll_dicomweb(source, client, state, intake, now, outcome, at)
        except FetchInterrupted:
            outcome.ok, outcome.detail = False, "interrupted by shutdown"
            log.info("source.poll source=%s outcome=interrupted", source.name)
        except (CtwatchError, httpx.HTTPError, OSError, sqlite3.Error) as exc:
            outcome.ok, outcome.error = False, _message(exc)
        except Exception as exc:  # a bug must not kill the polling thread; it is recorded
            log.exception("source.crashed source=%s", source.name)
            outcome.ok, outcome.error = False, f"internal error: {type(exc).__name__}: {exc}"

    def _retrying(self, call: Callable[[], object], what: str) -> object:
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
            what = f"GET {public_url(source.url)}"
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
                path, kind="http", source_name=source.name, source_url=public_url(source.url)
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
        self, client: httpx.Client, url: str, conditional: dict[str, str], folder: Path, what: str
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
                _disposition_filename(response.headers.get("content-disposition", "")),
                response.headers.get("etag"),
                response.headers.get("last-modified"),
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
        what = f"QIDO-RS {public_url(root)}/studies"
        studies = self._retrying(
            lambda: list(
                dicomweb.search_studies(client, root, source.query, since, page_size=source.page_size)
            ),
            what,
        )
        assert isinstance(studies, list)
        errors = []
        for ref in studies:
            if state.source_item_known(source.name, ref.uid, ref.version):
                outcome.unchanged += 1
                continue
            if self._stop.is_set():
                raise FetchInterrupted("between studies")
            try:
                arrival_id = self._fetch_study(source, client, intake, root, ref)
            except FetchRefused as exc:  # this study only; the others go on, it is tried again next poll
                errors.append(str(exc))
                log.warning(
                    "source.study_refused source=%s study=%s reason=%r", source.name, ref.uid, str(exc)
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
            outcome.ok, outcome.error = (
                False,
                f"{len(errors)} stud(ies) not fetched: " + "; ".join(errors[:3]),
            )

    def _fetch_study(
        self, source: SourceSettings, client: httpx.Client, intake: Intake, root: str, ref: dicomweb.StudyRef
    ) -> int | None:
        outer = self._new_staging_dir()
        folder = outer / safe_name(f"{source.name}-{ref.uid}-n{ref.instances or 0}")
        try:

            def attempt() -> int:
                shutil.rmtree(folder, ignore_errors=True)  # a retried retrieval starts from scratch
                return dicomweb.retrieve_study(client, root, ref.uid, folder, self.policy.max_bytes)

            count = self._retrying(attempt, f"WADO-RS {public_url(root)}/studies/{ref.uid}")
            if count == 0:
                raise FetchRefused(f"WADO-RS retrieve of study {ref.uid} returned no DICOM instances")
            log.info(
                "source.study_retrieved source=%s study=%s instances=%s listed=%s",
                source.name,
                ref.uid,
                count,
                ref.instances,
            )
            return intake.accept(
                folder,
                kind="dicomweb",
                source_name=source.name,
                source_url=f"{public_url(root)}/studies/{ref.uid}",
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
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for name, every in self.poller.schedule():
            thread = threading.Thread(
                target=self._loop, args=(name, every), name=f"ctwatch-source-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def _loop(self, name: str, every: float) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poller.poll(name, self.clock())
            self._stop.wait(max(0.0, every - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        self.poller.stop()

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def is_alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)


def _since(now: datetime, lookback: float | None) -> date | None:
    if lookback is None:
        return None
    local = now.astimezone() if now.tzinfo else now
    return (local - timedelta(seconds=lookback)).date()


def _disposition_filename(header: str) -> str | None:
    if not header:
        return None
    message = email.message.Message()
    message["content-disposition"] = header
    name = message.get_filename()
    return name or None


def _arrival_name(source: SourceSettings, download: _Download) -> str:
    """A safe file name for the body; the suffix follows the content (.zip / .dcm)."""
    with download.path.open("rb") as fh:
        head = fh.read(132)
    candidate = download.filename or unquote(urlsplit(source.url).path.rsplit("/", 1)[-1]) or source.name
    name = safe_name(candidate.rsplit("/", 1)[-1].rsplit("\\", 1)[-1]).lstrip(".") or source.name
    content_type = download.content_type.split(";")[0].strip().lower()
    if head[:4] in ZIP_MAGICS:
        suffix = ".zip"
    elif head[128:132] == b"DICM" or content_type == "application/dicom":
        suffix = ".dcm"
    else:
        raise FetchRefused(
            f"{public_url(source.url)}: the body is neither a ZIP nor a DICOM file "
            f"(Content-Type {content_type or 'none'}); point the source at a .zip or .dcm"
        )
    return name if name.lower().endswith(suffix) else name + suffix


def _message(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.HTTPError) and not isinstance(exc, httpx.HTTPStatusError):
        return f"{type(exc).__name__}: {text}"
    return text
