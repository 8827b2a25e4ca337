"""The outbox's layout: every path ctwatch writes under it is named here.

``<outbox>/<YYYY-MM-DD>/<StudyInstanceUID>.json`` (the day the arrival was received, local time),
its previews in ``<outbox>/<day>/<StudyInstanceUID>/``, receipts in ``<outbox>/receipts/``
(:func:`processor.outputs.receipt.receipt_path`), workbooks in ``<outbox>/reports/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from processor.state import Arrival, State

__all__ = ["OutboxLayout"]


@dataclass(frozen=True)
class OutboxLayout:
    outbox: Path

    @property
    def receipts(self) -> Path:
        return self.outbox / "receipts"

    def day_folder(self, arrival: Arrival) -> Path:
        day = datetime.fromisoformat(arrival.created_at).astimezone().date()
        return self.outbox / day.isoformat()

    def json_path(
        self, state: State, arrival: Arrival, study_uid: str, taken: set[Path] | None = None
    ) -> Path:
        """Where a study's result JSON goes. A UID that is not digits and dots, or longer than the
        64 characters DICOM allows (a file name must stay within 255 bytes), is written as
        ``invalid-uid``; a path another arrival's study already owns (or ``taken`` by a study of
        this batch) gets ``.a<arrival id>`` before ``.json``. A re-run of the same arrival and
        study gets the same path, so a crash and a retry never leave two files for one study."""
        safe_uid = study_uid if is_file_uid(study_uid) else "invalid-uid"
        path = self.day_folder(arrival) / f"{safe_uid}.json"
        owner = state.json_path_owner(str(path))
        if (owner is not None and owner != (arrival.id, study_uid)) or path in (taken or set()):
            path = path.with_name(f"{safe_uid}.a{arrival.id}.json")
        return path


UID_MAX = 64  # DICOM PS3.5 §9.1: a UID is at most 64 characters


def is_file_uid(uid: str) -> bool:
    """Whether a UID can name a file as it is: digits and dots, at most :data:`UID_MAX` characters."""
    return 0 < len(uid) <= UID_MAX and all(c.isdigit() or c == "." for c in uid)
