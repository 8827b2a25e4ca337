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
    not yet charged an attempt. ``ignored``: every study in it was analysed before from an earlier
    arrival and ``late_series: ignore`` is set (:class:`LateSeries`); nothing was processed.
    """

    PENDING = "pending"
    PREPARED = "prepared"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    QUARANTINED = "quarantined"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {
        ArrivalState.DONE,
        ArrivalState.FAILED,
        ArrivalState.QUARANTINED,
        ArrivalState.DUPLICATE,
        ArrivalState.IGNORED,
    }
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


class StepProblem(StrEnum):
    """Why a step gave no result for one study (``step_runs.problem``, ``steps[].problem`` of the
    result JSON; None for a ``done`` step): a closed category set by the runner from the exception
    class, so a reader (the status page) can say why without the error text, which may carry a file
    name or a value from the study."""

    MODEL_MISSING = (
        "model_missing"  # a weight file is not installed (skipped; failed with on_missing_weights: fail)
    )
    MODEL_UNUSABLE = "model_unusable"  # WeightsError while loading: corrupt, incomplete, wrong kind, checksum
    NEEDS_SKIPPED = "needs_skipped"  # an input that an earlier, skipped step did not provide
    EARLIER_FAILED = "earlier_failed"  # not_run: an earlier step failed on the study
    WITHHELD = "withheld"  # WithheldError: the study lacks what the output depends on (e.g. pixel spacing)
    STUDY = "study"  # StepError: the step could not process this study
    OUT_OF_MEMORY = "out_of_memory"  # out of (GPU) memory even at batch 1
    INTERNAL = "internal"  # any other exception, or a value of the wrong type: a bug
    UNRECORDED = "unrecorded"  # a failure an older ctwatch stored without a category


class ReceiptOutcome(StrEnum):
    """A receipt's ``outcome``: what ctwatch did with an input, for the person who dropped it."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    FAILED = "failed"
    IGNORED = "ignored"


class LateSeries(StrEnum):
    """What becomes of images of a study that was already analysed from an earlier arrival
    (``late_series`` in the settings; ``arrivals.late_series`` when ``requeue`` overrides it).

    ``new_version``: the study is analysed again with the images of every arrival that brought a
    part of it, and the new result supersedes the earlier one (both kept, linked both ways).
    ``ignore``: nothing is processed; the receipt names the earlier arrival and how to override.
    """

    NEW_VERSION = "new_version"
    IGNORE = "ignore"


class Priority(StrEnum):
    """An arrival's lane (``arrivals.priority``): ``urgent`` arrivals (from ``inbox.urgent_dirs``)
    are claimed before every ``routine`` one, day or night, inside or outside the night window.
    The words follow DICOM's Requested Procedure Priority (STAT / HIGH / ROUTINE …), kept to two."""

    ROUTINE = "routine"
    URGENT = "urgent"


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
