"""Turn a stable file or folder into an arrival: hash it, record it, move it out of the user's way."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import date
from pathlib import Path

from processor.intake.inbox import InboxLayout, free_path, move, sha256_of, work_name
from processor.outputs.receipt import write_receipt
from processor.state import State

log = logging.getLogger(__name__)


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
        """Register a stable inbox entry and move it into the work folder. Returns the arrival id."""
        if str(path) in self.state.active_paths():
            return None
        sha, size = sha256_of(path)
        layout = self.layout_for(path)
        layout.ensure()
        registered = self.state.register_arrival(
            kind=kind or ("night" if night else "inbox"), name=path.name, original_path=str(path),
            current_path=str(path), sha256=sha, size=size, pipeline_name=self.pipeline_name,
            pipeline_version=self.pipeline_version, night=night, source_name=source_name,
            source_url=source_url)
        aid = registered.arrival_id
        if registered.duplicate_of is not None:
            dest = move(path, free_path(layout.done(date.today()), path.name, aid))
            self._duplicate_receipt(aid, registered.duplicate_of, dest)
            return aid
        dest = move(path, layout.work / work_name(aid, path.name))
        self.state.update_arrival(aid, current_path=str(dest))
        log.info("arrival.registered arrival=%s name=%s sha256=%s size=%d night=%s",
                 aid, path.name, sha[:12], size, night)
        return aid

    def accept_in_place(self, path: Path) -> int:
        """Register a file or folder named on the command line, leaving it where it is."""
        path = path.resolve()
        sha, size = sha256_of(path)
        registered = self.state.register_arrival(
            kind="cli", name=path.name, original_path=str(path), current_path=str(path), sha256=sha,
            size=size, pipeline_name=self.pipeline_name, pipeline_version=self.pipeline_version)
        if registered.duplicate_of is not None:
            self._duplicate_receipt(registered.arrival_id, registered.duplicate_of, path)
        return registered.arrival_id

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
