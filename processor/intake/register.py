"""Turn a stable file or folder into an arrival: hash it, record it, move it out of the user's way.

Names are bytes: the entry's name is recorded as its display name plus its raw bytes
(:mod:`processor.names`) before it reaches SQLite, a log line or a receipt.

Whatever goes wrong before an entry is safely registered and in the work folder (it cannot be
read or hashed, the database refuses it, the move fails) ends here, once: the entry becomes a
*rejected* arrival with a receipt, and an inbox entry moves to quarantine with a note saying why.
Nothing is retried at the next scan. An input with any part the service user may not read (the
file, the folder, a file or sub-folder in it) is refused whole, its receipt naming that part:
"cannot read <part>: permission denied — give the service user read access, then drop it again".
An entry that cannot even be moved to quarantine stays where it is, its receipt written; the
watcher leaves it alone until it changes. A rejected arrival's end is recorded with the send-queue
rows the daemon's ``notices`` make of it (its failure notifications), in one transaction.
"""

from __future__ import annotations

import logging
import os
import pwd
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from processor.errors import Deferred, IngestError
from processor.faults import fault_point
from processor.intake.inbox import InboxLayout, free_path, move, sha256_of, work_name, write_error_note
from processor.names import display_name, display_text, name_bytes_hex
from processor.outputs.receipt import (
    duplicate_receipt,
    receipt_document,
    receipt_path,
    write_receipt,
    write_receipt_document,
)
from processor.state import Arrival, Outbound, Registered, State
from processor.vocab import ArrivalState, Priority, utcnow

log = logging.getLogger(__name__)

EXPECTED = (OSError, sqlite3.Error, IngestError)  # what the world does to an input, not a bug

#: The send-queue rows a refused input makes (``(arrival, state, reason)``): the daemon's failure
#: notifications (:func:`processor.outputs.notify.arrival_outbound`), recorded with its end.
Notices = Callable[[Arrival, str, str], Sequence[Outbound]]


@dataclass
class _Entry:
    """One inbox entry (or command-line input) on its way in, and how far it got."""

    path: Path
    kind: str
    night: bool = False
    source_name: str | None = None
    source_url: str | None = None
    in_place: bool = False
    priority: Priority = Priority.ROUTINE
    sha256: str = ""
    size: int = 0
    arrival_id: int | None = None
    moved_to: Path | None = None

    @property
    def name(self) -> str:
        return display_name(self.path.name)

    @property
    def name_bytes(self) -> str:
        return name_bytes_hex(self.path.name)


class Intake:
    """Registers arrivals in SQLite. Inbox files move into ``.ctwatch/work``; CLI inputs stay put."""

    def __init__(
        self,
        state: State,
        *,
        pipeline_name: str,
        pipeline_version: int,
        inbox_dirs: Iterable[Path],
        outbox: Path,
        should_stop: Callable[[], bool] | None = None,
        notices: Notices | None = None,
        outbound_wake: threading.Event | None = None,
    ) -> None:
        """``notices``: the send-queue rows of a refused input, inserted with its recorded end;
        ``outbound_wake``: set once such rows are queued (the delivery thread waits on it)."""
        self.should_stop = should_stop  # asked while hashing: Deferred once the daemon is stopping
        self.notices = notices
        self.outbound_wake = outbound_wake
        self.state = state
        self.pipeline_name = pipeline_name
        self.pipeline_version = pipeline_version
        self.inbox_dirs = [Path(p).resolve() for p in inbox_dirs]
        self.outbox = outbox

    def layout_for(self, path: Path) -> InboxLayout:
        """The inbox whose control folders hold this path (night folders inside an inbox share it)."""
        resolved = path.resolve()
        for inbox in self.inbox_dirs:
            if resolved.is_relative_to(inbox):
                return InboxLayout(inbox)
        return InboxLayout(resolved.parent)

    def accept(
        self,
        path: Path,
        *,
        night: bool = False,
        kind: str | None = None,
        source_name: str | None = None,
        source_url: str | None = None,
        urgent: bool = False,
    ) -> int | None:
        """Register a stable inbox entry and move it into the work folder. Returns the arrival id.

        ``urgent``: an entry of an urgent folder (``inbox.urgent_dirs``), claimed before any other.

        None when the entry is already being processed, or vanished before it was taken in. Any
        other failure ends the entry as a rejected arrival (see the module docstring) whose id is
        returned (None when even the database refused it; its receipt is then named by time).
        """
        entry = _Entry(path, kind or ("night" if night else "inbox"), night, source_name, source_url)
        entry.priority = Priority.URGENT if urgent else Priority.ROUTINE
        try:
            if str(path) in self.state.active_paths():
                return None
            return self._register(entry)
        except Deferred:
            raise
        except sqlite3.OperationalError as exc:
            if entry.arrival_id is None and entry.moved_to is None:  # nothing recorded, nothing moved
                raise Deferred(
                    f"the state database refused a write ({exc.sqlite_errorname or exc}); the input "
                    "stays in the inbox and is taken in once it answers"
                ) from exc
            return self._not_taken_in(entry, exc)
        except Exception as exc:  # noqa: BLE001 — every failure ends as a rejected arrival, never a retry
            return self._not_taken_in(entry, exc)

    def accept_in_place(self, path: Path) -> int | None:
        """Register a file or folder named on the command line, leaving it where it is.

        Returns the arrival id; a failure ends as a rejected arrival as in :meth:`accept`.
        """
        entry = _Entry(path.resolve(), "cli", in_place=True)
        try:
            return self._register(entry)
        except Exception as exc:  # noqa: BLE001 — one bad input never stops a `process` batch
            return self._not_taken_in(entry, exc)

    def _register(self, entry: _Entry) -> int:
        path = entry.path
        try:
            if not (path.is_file() or path.is_dir()):  # reading a FIFO would block for ever
                raise IngestError("it is neither a file nor a folder (a pipe, socket or device)")
            entry.sha256, entry.size = sha256_of(path, self.should_stop)
        except PermissionError as exc:  # the whole input, or any file or sub-folder in it
            raise Unreadable(_cannot_read(entry, exc)) from exc
        layout = None if entry.in_place else self.layout_for(path)
        if layout is not None:
            layout.ensure()
        registered = self._register_row(entry, path)
        aid = entry.arrival_id = registered.arrival_id
        if registered.duplicate_of is not None:
            entry.moved_to = self._finish_duplicate(aid, registered.duplicate_of, path, layout)
            return aid
        if layout is None:
            return aid
        fault_point(
            "url.registered" if entry.kind in ("http", "dicomweb") else "intake.registered", entry.name
        )
        entry.moved_to = move(path, layout.work / work_name(aid, entry.name))
        self.state.update_arrival(aid, current_path=str(entry.moved_to))
        log.info(
            "arrival.registered arrival=%s name=%s sha256=%s size=%d night=%s priority=%s retry_of=%s",
            aid,
            entry.name,
            entry.sha256[:12],
            entry.size,
            entry.night,
            entry.priority,
            registered.retry_of,
        )
        return aid

    def _register_row(self, entry: _Entry, path: Path, *, refused: str | None = None) -> Registered:
        return self.state.register_arrival(
            kind=entry.kind,
            name=entry.name,
            name_bytes=entry.name_bytes,
            original_path=str(path),
            current_path=str(path),
            sha256=entry.sha256,
            size=entry.size,
            pipeline_name=self.pipeline_name,
            pipeline_version=self.pipeline_version,
            night=entry.night,
            source_name=entry.source_name,
            source_url=entry.source_url,
            refused=refused,
            priority=entry.priority,
        )

    # ------------------------------------------------------------------ failures
    def _not_taken_in(self, entry: _Entry, exc: Exception) -> int | None:
        """End an entry that failed on its way in: a rejected arrival, never a retry."""
        if entry.moved_to is not None:  # registered and moved: the worker finds it in work/ or done/
            log.exception("arrival.registration_incomplete arrival=%s name=%s", entry.arrival_id, entry.name)
            return entry.arrival_id
        if not os.path.lexists(entry.path):
            log.warning(
                "arrival.vanished name=%s path=%s: gone before it could be taken in",
                entry.name,
                display_name(entry.path),
            )
            return entry.arrival_id
        reason = _reason(exc)
        dest = self._quarantine_dest(entry)
        aid = self._record_rejected(entry, reason, dest)
        where = self._quarantine(entry, dest, reason)
        arrival = self.state.arrival(aid) if aid is not None else _unregistered(entry, where)
        receipt = write_receipt(self.outbox, arrival, "rejected", reason, registered=aid is not None)
        if aid is not None:
            self.state.update_arrival(aid, receipt_path=str(receipt))
            self.state.mark_placed(aid, str(where))
        log.warning(
            "arrival.quarantined arrival=%s name=%s reason=%r receipt=%s",
            aid,
            entry.name,
            reason,
            receipt.name,
            exc_info=not isinstance(exc, EXPECTED),
        )  # a traceback only for a bug
        return aid

    def _quarantine_dest(self, entry: _Entry) -> Path | None:
        """Where a rejected inbox entry goes (None: it stays put — named on the command line, or even
        the quarantine folder is out of reach)."""
        if entry.in_place:
            return None
        try:
            return free_path(self.layout_for(entry.path).quarantine, entry.name, entry.arrival_id or 0)
        except OSError as exc:
            log.error(
                "arrival.quarantine_failed name=%s path=%s error=%s",
                entry.name,
                display_name(entry.path),
                display_text(str(exc)),
            )
            return None

    def _quarantine(self, entry: _Entry, dest: Path | None, reason: str) -> Path:
        """Move an inbox entry to ``dest`` with its note; where the input is now (it stays put when
        ``dest`` is None or even this move fails)."""
        if dest is None:
            return entry.path
        try:
            dest = move(entry.path, dest)
            fault_point("quarantine.note_before", entry.name)
            write_error_note(dest, reason)
            fault_point("quarantine.note_written", entry.name)
            return dest
        except OSError as exc:
            log.error(
                "arrival.quarantine_failed name=%s path=%s error=%s",
                entry.name,
                display_name(entry.path),
                display_text(str(exc)),
            )
            return entry.path if os.path.lexists(entry.path) else dest

    def _record_rejected(self, entry: _Entry, reason: str, dest: Path | None) -> int | None:
        """The rejected arrival's id, its end recorded before anything moves: the row registered
        already, else a new quarantined row (None when the database refuses that too)."""
        try:
            if entry.arrival_id is not None:
                aid = entry.arrival_id
            else:
                aid = self._register_row(entry, entry.path, refused=reason).arrival_id
            arrival = self.state.arrival(aid)
            outbound = self.notices(arrival, ArrivalState.QUARANTINED, reason) if self.notices else ()
            self.state.finish(
                aid,
                ArrivalState.QUARANTINED,
                error=reason,
                final_path=str(dest) if dest is not None else None,
                receipt_path=str(receipt_path(self.outbox, aid, arrival.name)),
                receipt=receipt_document(arrival, "rejected", reason),
                outbound=outbound,
            )
            if outbound and self.outbound_wake is not None:
                self.outbound_wake.set()
            return aid
        except Exception:  # noqa: BLE001 — the receipt below still tells the user; logged once here
            log.exception("arrival.unrecorded name=%s: the database refused the rejected arrival", entry.name)
            return None

    def _finish_duplicate(self, aid: int, original: int, path: Path, layout: InboxLayout | None) -> Path:
        """End a duplicate: its receipt and place recorded first, then the move (replayed after a crash)."""
        arrival = self.state.arrival(aid)
        document = duplicate_receipt(arrival, self.state.arrival(original), self.state.studies_for(original))
        dest = free_path(layout.done(date.today()), arrival.name, aid) if layout is not None else None
        self.state.finish(
            aid,
            ArrivalState.DUPLICATE,
            error=None,
            final_path=str(dest) if dest else None,
            receipt_path=str(receipt_path(self.outbox, aid, arrival.name)),
            receipt=document,
        )
        where = move(path, dest) if dest is not None else path
        write_receipt_document(self.outbox, document)
        self.state.mark_placed(aid, str(where))
        log.info(
            "arrival.duplicate arrival=%s of=%s name=%s priority=%s",
            aid,
            original,
            arrival.name,
            arrival.priority,
        )  # an urgent one made ``original`` urgent if it still waits (see Queue.register_arrival)
        return where


class Unreadable(IngestError):
    """The input, or a file or sub-folder in it, may not be read by the service user."""


def _cannot_read(entry: _Entry, exc: PermissionError) -> str:
    """``cannot read <part>: permission denied — …``: the part named from the input's own folder."""
    part = entry.name
    if exc.filename:
        failed = Path(os.fsdecode(exc.filename))
        if failed.is_relative_to(entry.path.parent):
            part = display_name(failed.relative_to(entry.path.parent).as_posix())
    again = "process it again" if entry.in_place else "drop it again"
    return (
        f"cannot read {part}: permission denied — give the service user ({_service_user()}) read "
        f"access, then {again}"
    )


def _service_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _reason(exc: Exception) -> str:
    """Why an entry could not be taken in, in plain words with the fix."""
    if isinstance(exc, Unreadable):
        return display_text(f"The input could not be taken in: {exc}.")
    if isinstance(exc, PermissionError):
        what = (
            "ctwatch may not move it (permission denied); give the service user "
            f"({_service_user()}) write access to the inbox folder and to the input"
        )
    elif isinstance(exc, OSError):
        where = f": {display_name(exc.filename)}" if exc.filename else ""
        what = f"it could not be read or moved ({exc.strerror or type(exc).__name__}{where})"
    elif isinstance(exc, IngestError):
        what = str(exc)
    elif isinstance(exc, sqlite3.Error):
        what = f"the state database refused it ({exc}); check the free space and the `state` setting"
    else:
        what = f"of an internal error ({type(exc).__name__}: {exc}); please report it"
    return display_text(
        f"The input could not be taken in: {what}. Copy it into the inbox again once the cause is fixed."
    )


def _unregistered(entry: _Entry, where: Path) -> Arrival:
    """What a receipt needs of an arrival the database refused to record (its id is not used)."""
    return Arrival(
        id=0,
        kind=entry.kind,
        name=entry.name,
        name_bytes=entry.name_bytes,
        source_name=entry.source_name,
        sha256=entry.sha256 or "",
        size=entry.size,
        state=ArrivalState.QUARANTINED,
        created_at=utcnow(),
        current_path=str(where),
    )
