"""The arrival as State hands it out: a frozen record of one row of ``arrivals``.

Paths come back as the ``str`` that ``os`` functions take (surrogate escapes for bytes that are
not UTF-8; see :mod:`processor.names`); ``name`` is the display name and ``name_bytes`` the raw
bytes in hex.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from processor.vocab import ArrivalState, Placement, Priority


@dataclass(frozen=True)
class Arrival:
    """One arrival (a dropped file or folder, a downloaded body, a file named on the command line)."""

    id: int
    kind: str  # inbox | night | cli | http | dicomweb
    name: str
    sha256: str
    size: int
    state: ArrivalState
    created_at: str
    name_bytes: str | None = None
    original_path: str | None = None
    current_path: str | None = None
    pipeline_name: str | None = None
    pipeline_version: int | None = None
    night: bool = False
    attempts: int = 0  # times claimed for processing
    crashes: int = 0  # times the process died while this arrival was the only one in flight
    isolate: bool = False  # in flight during a crash with others: processed on its own next time
    error: str | None = None
    duplicate_of: int | None = None
    receipt_path: str | None = None
    source_name: str | None = None
    source_url: str | None = None
    claimed_at: str | None = None
    finished_at: str | None = None
    final_path: str | None = None  # where the input goes (or went) at its final state
    placed: bool = True  # False between the recorded final state and the completed move
    priority: Priority = Priority.ROUTINE  # urgent arrivals are claimed first
    retry_of: int | None = None  # a fresh attempt of these bytes: the earlier arrival that gave no result
    late_series: str | None = None  # "ignore": a study of it was ignored; "new_version": requeued since

    @property
    def placement(self) -> Placement:
        return placement_of(self.kind)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Arrival:
        known = {name for name in cls.__dataclass_fields__}
        values = {key: value for key, value in row.items() if key in known}
        for column in ("original_path", "current_path", "final_path"):
            value = values.get(column)
            values[column] = os.fsdecode(value) if isinstance(value, bytes) else value
        values["state"] = ArrivalState(values["state"])
        values["priority"] = Priority(values.get("priority") or Priority.ROUTINE)
        values["night"] = bool(values.get("night") or 0)
        values["isolate"] = bool(values.get("isolate") or 0)
        values["placed"] = values.get("placed") is None or bool(values.get("placed"))
        values["attempts"] = int(values.get("attempts") or 0)
        values["crashes"] = int(values.get("crashes") or 0)
        return cls(**values)


def placement_of(kind: str | None) -> Placement:
    """Where an arrival of ``kind`` lives: files named on the command line (``cli``) stay put;
    everything else lives in an inbox's folders."""
    return Placement.IN_PLACE if kind == "cli" else Placement.INBOX


@dataclass(frozen=True)
class Registered:
    """Outcome of registering an arrival: its id, the id of the original when a duplicate, and the
    earlier arrival that gave no result when it is a fresh attempt."""

    arrival_id: int
    duplicate_of: int | None
    retry_of: int | None = None
