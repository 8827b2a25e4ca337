"""Where an input lives from arrival to final state: the placement policies.

``InboxPlacement``: an input dropped into an inbox (or fetched from a URL source) lives in the
inbox's ``.ctwatch/work`` while processed, then ``done/<date>/`` or ``quarantine/`` (with its
``.error.txt``). ``InPlace``: a file named on the command line stays where the user keeps it.
Both answer the same questions, so the recorder never asks what kind of arrival it has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import date
from pathlib import Path

from processor.intake.inbox import InboxLayout, free_path, move, work_name, write_error_note
from processor.state import Arrival
from processor.vocab import Placement

log = logging.getLogger(__name__)


class InboxPlacement:
    """Inputs that live in an inbox's control folders (see the module docstring)."""

    def __init__(self, layout_for: Callable[[Path], InboxLayout]) -> None:
        self.layout_for = layout_for

    def locate(self, arrival: Arrival) -> Path | None:
        """Where the input is now: its recorded path, its work-folder name (a crash between the move
        into work/ and the row update), or its recorded final place (a crash after the final move)."""
        candidates = [arrival.current_path]
        if arrival.original_path is not None:
            candidates.append(str(self._layout(arrival).work / work_name(arrival.id, arrival.name)))
        candidates.append(arrival.final_path)
        for candidate in candidates:
            if candidate is not None and Path(candidate).exists():
                return Path(candidate)
        return None

    def final_path(self, arrival: Arrival, *, quarantine: bool, today: date) -> Path:
        """A free name in ``done/<today>`` or ``quarantine`` for this input."""
        layout = self._layout(arrival)
        folder = layout.quarantine if quarantine else layout.done(today)
        here = self.locate(arrival)
        if here is not None and here.parent == folder:  # e.g. a requeued input rejected again: it stays
            return here
        return free_path(folder, arrival.name, arrival.id)

    def place(self, path: Path, dest: Path) -> Path:
        """Move the input to ``dest`` (a rename on the same filesystem); already there: nothing."""
        if path == dest:
            return dest
        if dest.exists():  # taken since the intent was recorded (a user's file): the next free name
            dest = free_path(dest.parent, dest.name, 0)
        moved = move(path, dest)
        note = path.with_name(path.name + ".error.txt")
        if path.parent.name == "quarantine" and dest.parent != path.parent and note.is_file():
            note.unlink()  # ours, and no longer true: the input left quarantine (a requeue that worked)
        return moved

    def note(self, dest: Path, reason: str) -> None:
        """The ``.error.txt`` beside a quarantined input (rewritten the same way on a replay)."""
        write_error_note(dest, reason)

    def _layout(self, arrival: Arrival) -> InboxLayout:
        return self.layout_for(Path(arrival.original_path or arrival.current_path or "."))


class InPlace:
    """Inputs named on the command line: never moved, no note beside them."""

    def locate(self, arrival: Arrival) -> Path | None:
        path = arrival.current_path
        return Path(path) if path is not None and Path(path).exists() else None

    def final_path(self, arrival: Arrival, *, quarantine: bool, today: date) -> Path | None:
        return None

    def place(self, path: Path, dest: Path) -> Path:
        return path

    def note(self, dest: Path, reason: str) -> None:
        return None


class Placements:
    """The policy for each kind of placement (:class:`processor.vocab.Placement`)."""

    def __init__(self, layout_for: Callable[[Path], InboxLayout]) -> None:
        self._by_kind: dict[Placement, InboxPlacement | InPlace] = {
            Placement.INBOX: InboxPlacement(layout_for),
            Placement.IN_PLACE: InPlace(),
        }

    def for_arrival(self, arrival: Arrival) -> InboxPlacement | InPlace:
        return self._by_kind[arrival.placement]
