"""The words ctwatch records: arrival states, study and step statuses, receipt outcomes, placements.

Each is a :class:`enum.StrEnum`, so a member *is* its text: it compares equal to the string
stored in SQLite and written to JSON, and ``json.dumps`` writes the plain value. The values are
part of the published formats (result JSON, receipts, Excel, status endpoint) and never change.
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum


class ArrivalState(StrEnum):
    """Where an arrival is in its life (``arrivals.state``).

    ``pending → (prepared →) running → done | failed | quarantined``; a second copy of bytes
    already taken is ``duplicate`` at once. ``prepared``: taken by the prefetcher for its CPU stage,
    not yet charged an attempt.
    """

    PENDING = "pending"
    PREPARED = "prepared"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {ArrivalState.DONE, ArrivalState.FAILED, ArrivalState.QUARANTINED, ArrivalState.DUPLICATE}
)
IN_FLIGHT_STATES = (ArrivalState.PREPARED, ArrivalState.RUNNING)


class StudyStatus(StrEnum):
    """A study's ``processing_status`` (the CT-CLIP Inference API's words)."""

    SUCCESS = "Success"
    PARTIAL = "Partial"
    FAILURE = "Failure"


class StepStatus(StrEnum):
    """What became of one step for one study."""

    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"
    NOT_RUN = "not_run"


class ReceiptOutcome(StrEnum):
    """A receipt's ``outcome``: what ctwatch did with an input, for the person who dropped it."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    FAILED = "failed"


class Placement(StrEnum):
    """Where an input lives while and after it is processed.

    ``inbox``: moved into the inbox's ``.ctwatch/work``, then ``done/<date>`` or ``quarantine``.
    ``in_place``: left where the user keeps it (files named on the command line).
    """

    INBOX = "inbox"
    IN_PLACE = "in_place"


def utcnow() -> str:
    """Now in UTC as ISO 8601 to the second (``2026-11-29T13:30:00+00:00``): every stored timestamp."""
    return datetime.now(UTC).isoformat(timespec="seconds")
