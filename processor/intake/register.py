"""Turn a stable file or folder into an arrival: hash it, record it, move it out of the user's way.

Names are bytes: the entry's name is recorded as its display name plus its raw bytes
(:mod:`processor.names`) before it reaches SQLite, a log line or a receipt.

Whatever goes wrong before an entry is safely registered and in the work folder (it cannot be
read or hashed, the database refuses it, the move fails) ends here, once: the entry becomes a
*rejected* arrival with a receipt, and an inbox entry moves to quarantine with a note saying why.
Nothing is retried at the next scan.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from processor.errors import IngestError
from processor.intake.inbox import InboxLayout, free_path, move, sha256_of, work_name, write_error_note
from processor.names import display_name, display_text, name_bytes_hex
from processor.outputs.receipt import write_receipt
from processor.state import State, utcnow

log = logging.getLogger(__name__)

EXPECTED = (OSError, sqlite3.Error, IngestError)  # what the world does to an input, not a bug


@dataclass
class _Entry:
    """One inbox entry (or command-line input) on its way in, and how far it got."""

    path: Path
    kind: str
    night: bool = False
    source_name: str | None = None
    source_url: str | None = None
    in_place: bool = False
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

    def __init__(self, state: State, *, pipeline_name: str, pipeline_version: int,
                 inbox_dirs: Iterable[Path], outbox: Path) -> None:
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

    def accept(self, path: Path, *, night: bool = False, kind: str | None = None,
               source_name: str | None = None, source_url: str | None = None) -> int | None:
        """Register a stable inbox entry and move it into the work folder. Returns the arrival id.

        None when the entry is already being processed, or vanished before it was taken in. Any
        other failure ends the entry as a rejected arrival (see the module docstring) whose id is
        returned (None when even the database refused it; its receipt is then named by time).
        """
        entry = _Entry(path, kind or ("night" if night else "inbox"), night, source_name, source_url)
        try:
            if str(path) in self.state.active_paths():
                return None
            return self._register(entry)
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
        if not (path.is_file() or path.is_dir()):  # reading a FIFO would block for ever
            raise IngestError("it is neither a file nor a folder (a pipe, socket or device)")
        entry.sha256, entry.size = sha256_of(path)
        layout = None if entry.in_place else self.layout_for(path)
        if layout is not None:
            layout.ensure()
        registered = self.state.register_arrival(
            kind=entry.kind, name=entry.name, name_bytes=entry.name_bytes, original_path=str(path),
            current_path=str(path), sha256=entry.sha256, size=entry.size, pipeline_name=self.pipeline_name,
            pipeline_version=self.pipeline_version, night=entry.night, source_name=entry.source_name,
            source_url=entry.source_url)
        aid = entry.arrival_id = registered.arrival_id
        if layout is None:
            if registered.duplicate_of is not None:
                self._duplicate_receipt(aid, registered.duplicate_of, path)
            return aid
        if registered.duplicate_of is not None:
            entry.moved_to = move(path, free_path(layout.done(date.today()), entry.name, aid))
            self._duplicate_receipt(aid, registered.duplicate_of, entry.moved_to)
            return aid
        entry.moved_to = move(path, layout.work / work_name(aid, entry.name))
        self.state.update_arrival(aid, current_path=str(entry.moved_to))
        log.info("arrival.registered arrival=%s name=%s sha256=%s size=%d night=%s",
                 aid, entry.name, entry.sha256[:12], entry.size, entry.night)
        return aid

    # ------------------------------------------------------------------ failures
    def _not_taken_in(self, entry: _Entry, exc: Exception) -> int | None:
        """End an entry that failed on its way in: a rejected arrival, never a retry."""
        if entry.moved_to is not None:  # registered and moved: the worker finds it in work/ or done/
            log.exception("arrival.registration_incomplete arrival=%s name=%s", entry.arrival_id, entry.name)
            return entry.arrival_id
        if not os.path.lexists(entry.path):
            log.warning("arrival.vanished name=%s path=%s: gone before it could be taken in",
                        entry.name, entry.path)
            return entry.arrival_id
        reason = _reason(exc)
        where = self._quarantine(entry, reason)
        aid = self._record_rejected(entry, reason, where)
        arrival = self.state.arrival(aid) if aid is not None else _unregistered(entry, where)
        receipt = write_receipt(self.outbox, arrival, "rejected", reason)
        if aid is not None:
            self.state.update_arrival(aid, receipt_path=str(receipt))
        log.warning("arrival.quarantined arrival=%s name=%s reason=%r receipt=%s", aid, entry.name, reason,
                    receipt.name, exc_info=not isinstance(exc, EXPECTED))  # a traceback only for a bug
        return aid

    def _quarantine(self, entry: _Entry, reason: str) -> Path:
        """Move an inbox entry to quarantine with its note; where the input is now (it stays put
        when it was named on the command line, or when even this move fails)."""
        if entry.in_place:
            return entry.path
        try:
            quarantine = self.layout_for(entry.path).quarantine
            dest = move(entry.path, free_path(quarantine, entry.name, entry.arrival_id or 0))
            write_error_note(dest, reason)
            return dest
        except OSError as exc:
            log.error("arrival.quarantine_failed name=%s path=%s error=%s", entry.name, entry.path,
                      display_text(str(exc)))
            return entry.path

    def _record_rejected(self, entry: _Entry, reason: str, where: Path) -> int | None:
        """The rejected arrival's id: the row registered already, else a new quarantined row (None
        when the database refuses that too)."""
        try:
            if entry.arrival_id is not None:
                self.state.finish_arrival(entry.arrival_id, "quarantined", error=reason, current_path=str(where))
                return entry.arrival_id
            return self.state.register_arrival(
                kind=entry.kind, name=entry.name, name_bytes=entry.name_bytes, original_path=str(entry.path),
                current_path=str(where), sha256=entry.sha256, size=entry.size,
                pipeline_name=self.pipeline_name, pipeline_version=self.pipeline_version, night=entry.night,
                source_name=entry.source_name, source_url=entry.source_url, refused=reason).arrival_id
        except Exception:  # noqa: BLE001 — the receipt below still tells the user; logged once here
            log.exception("arrival.unrecorded name=%s: the database refused the rejected arrival", entry.name)
            return None

    def _duplicate_receipt(self, aid: int, original: int, where: Path) -> None:
        results = [s["json_path"] for s in self.state.studies_for(original)]
        message = (f"The same bytes arrived before as arrival {original} and were not processed again "
                   f"for pipeline {self.pipeline_name} v{self.pipeline_version}.")
        arrival = self.state.arrival(aid)
        receipt = write_receipt(self.outbox, arrival, "duplicate", message,
                                studies=[{"json": p} for p in results if p])
        self.state.finish_arrival(aid, "duplicate", current_path=str(where), receipt_path=str(receipt),
                                  error=None)
        log.info("arrival.duplicate arrival=%s of=%s name=%s", aid, original, arrival["name"])


def _reason(exc: Exception) -> str:
    """Why an entry could not be taken in, in plain words with the fix."""
    if isinstance(exc, PermissionError):
        what = "ctwatch may not read or move it (permission denied); let the daemon's user read and move it"
    elif isinstance(exc, OSError):
        where = f": {display_name(exc.filename)}" if exc.filename else ""
        what = f"it could not be read or moved ({exc.strerror or type(exc).__name__}{where})"
    elif isinstance(exc, IngestError):
        what = str(exc)
    elif isinstance(exc, sqlite3.Error):
        what = f"the state database refused it ({exc}); check the free space and the `state` setting"
    else:
        what = f"of an internal error ({type(exc).__name__}: {exc}); please report it"
    return display_text(f"The input could not be taken in: {what}. Copy it into the inbox again "
                        "once the cause is fixed.")


def _unregistered(entry: _Entry, where: Path) -> dict[str, Any]:
    """What a receipt needs of an arrival the database refused to record."""
    return {"id": None, "name": entry.name, "name_bytes": entry.name_bytes, "kind": entry.kind,
            "source_name": entry.source_name, "sha256": entry.sha256 or None, "size": entry.size,
            "created_at": utcnow(), "current_path": str(where)}
