"""A study's result among the results of the same study (late series): the records and the words.

:mod:`processor.intake.late_series` plans each study of an arrival against the study's current
result; the recorder writes what the plan says. A study analysed as a *new version* carries a
:class:`Lineage` (the results it supersedes, the arrivals whose images it used); a study that was
not analysed is a :class:`SetAside` — ``ignored`` (``late_series: ignore``) or ``unchanged``
(nothing in it that the current result did not use). Texts here are plain words for the person
who dropped the files (receipts, result warnings), and :func:`ignored_reason` is the one kept in
``arrivals.error``: arrival ids only, nothing that identifies a patient or a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from processor.state import CurrentVersion
from processor.vocab import ArrivalState, StudyStatus, utcnow

IGNORED = "ignored"
UNCHANGED = "unchanged"

# Why an earlier input gave no images to a new version (the JSON's ``inputs[].missing``).
GONE = "no longer on disk"
CHANGED = "changed since it was analysed"
NO_STUDY = "it no longer holds images of this study"

FEWER_IMAGES = "fewer_images"  # ``superseded_by.reason`` of a version that never became current
_RANK = {StudyStatus.FAILURE: 0, StudyStatus.PARTIAL: 1, StudyStatus.SUCCESS: 2}


@dataclass(frozen=True)
class Lineage:
    """Where one study's result stands among the results of the same study.

    ``supersedes``: the arrivals whose results of the study were current when it was planned
    (empty: the study is seen for the first time); the recorder's transaction checks that they
    still are. ``predecessor``: the newest of them, named by the result JSON's ``supersedes``.
    ``inputs``: per arrival whose images were used or sought, ``{arrival_id, name, received_at,
    instances, missing}`` (the JSON's ``inputs``); ``input_ids``: the arrivals stored in
    ``studies.inputs``, so the next version looks for their images too. ``short``: it lacks images
    that a current result used (their input no longer on disk, or changed since).
    """

    supersedes: tuple[int, ...] = ()
    input_ids: tuple[int, ...] = ()
    predecessor: CurrentVersion | None = None
    inputs: tuple[dict[str, Any], ...] = ()
    short: bool = False

    def stays_out(self, status: str) -> bool:
        """Whether a result of ``processing_status`` ``status`` must not replace the current one: the
        study's current result is never replaced by one computed without some of the images it used,
        unless that one came out at least as well (Success > Partial > Failure). Such a result is
        recorded and kept, its ``superseded_by`` naming the one that stays current."""
        current = self.predecessor
        return (
            current is not None
            and self.short
            and _RANK[StudyStatus(status)] < _RANK[StudyStatus(current.status)]
        )

    def document(self, status: str) -> dict[str, Any]:
        """The keys a new version adds to its result JSON (none for a first version): ``supersedes``
        and ``inputs``; or, when it :meth:`stays_out`, ``superseded_by`` (the result that stays
        current, ``reason: "fewer_images"``) and ``inputs``."""
        if self.predecessor is None:
            return {}
        earlier = self.predecessor
        pointer = {"arrival_id": earlier.arrival_id, "json": earlier.json_path}
        if self.stays_out(status):
            kept = {**pointer, "superseded_at": utcnow(), "reason": FEWER_IMAGES}
            return {"superseded_by": kept, "inputs": list(self.inputs)}
        return {"supersedes": {**pointer, "received_at": earlier.received_at}, "inputs": list(self.inputs)}

    def kept_out_words(self, status: str) -> str:
        """The warning of a result that :meth:`stays_out`, in plain words."""
        current = self.predecessor
        assert current is not None
        return (
            f"This analysis had fewer images than the result of arrival {current.arrival_id} "
            f"({self._lost_words()}), so that result stays the study's current one: "
            f"{current.json_path}. Without those images this one came out {status}, where that one is "
            f"{current.status}; it is kept beside it, not in its place."
        )

    def _lost_words(self) -> str:
        said = []
        for why, words in ((GONE, "are no longer on disk"), (CHANGED, "changed since they were analysed")):
            ids = [str(i["arrival_id"]) for i in self.inputs if i["missing"] == why]
            if ids:
                said.append(f"the images of arrival{'s' if len(ids) > 1 else ''} {', '.join(ids)} {words}")
        return "; ".join(said) or "some images it used could not be found again"

    def receipt_note(self, study_uid: str, arrival_id: int, status: str) -> str | None:
        """One sentence for the receipt of a new version (None for a first version)."""
        if self.predecessor is None:
            return None
        if self.stays_out(status):
            return f"Study {study_uid}: {self.kept_out_words(status)}"
        earlier = [i for i in self.inputs if i["arrival_id"] != arrival_id]
        used = ", ".join(str(i["arrival_id"]) for i in earlier if i["missing"] is None) or "none"
        lost = ", ".join(str(i["arrival_id"]) for i in earlier if i["missing"] is not None)
        return (
            f"Study {study_uid} was analysed again with the images of arrival(s) {used} that brought "
            f"earlier parts of it"
            + (f" (those of arrival(s) {lost} could not be used: see the result's warnings)" if lost else "")
            + f"; this result supersedes that of arrival {self.predecessor.arrival_id} "
            f"({self.predecessor.json_path})."
        )


@dataclass(frozen=True)
class SetAside:
    """A study of an arrival that was not analysed because ``current`` already answers for it."""

    study_uid: str
    kind: str  # IGNORED | UNCHANGED
    current: CurrentVersion

    def receipt_entry(self) -> dict[str, Any]:
        return {
            "study_uid": self.study_uid,
            "status": self.kind,
            "json": self.current.json_path,
            "error": None,
            "analysed_in": self.current.arrival_id,
        }

    def message(self, arrival_id: int) -> str:
        c = self.current
        earlier = f"arrival {c.arrival_id} ({c.arrival_name}, received {c.received_at})"
        if self.kind == UNCHANGED:
            return (
                f"Study {self.study_uid} holds nothing new: every image in it (by SOPInstanceUID) was "
                f"analysed before, from {earlier}; the result is {c.json_path}."
            )
        return (
            f"Study {self.study_uid} was not analysed: it was analysed before from {earlier}, and "
            f"late_series is set to ignore; the result is {c.json_path}. To analyse it again with the "
            f"images of both arrivals, as a new version that supersedes that result, run "
            f"`python run.py requeue {arrival_id}` (or set late_series: new_version for later arrivals)."
        )


def ignored_reason(arrival_id: int, earlier: int) -> str:
    """Why an arrival was ignored, as ``arrivals.error`` keeps it (shown by ``python run.py status``)."""
    return (
        f"already analysed from arrival {earlier} (late_series: ignore); "
        f"`python run.py requeue {arrival_id}` analyses it again with the earlier images as a new version"
    )


def missing_warning(arrival_id: int, name: str, received_at: str, why: str) -> str:
    """A new version's warning for an earlier part it could not use; ``why``: :data:`GONE`,
    :data:`CHANGED` or :data:`NO_STUDY`."""
    where = f"the images of arrival {arrival_id} ({name}, received {received_at})"
    if why == GONE:
        return (
            f"{where} are no longer on disk (removed by retention.keep_days, or moved), so this "
            "version was computed without them; the earlier result used them"
        )
    if why == CHANGED:
        return (
            f"{where} were left out: its input {CHANGED} (the file there now holds other bytes), so "
            "this version was computed without them; the earlier result used them"
        )
    return f"{where} were left out ({why}), so this version was computed without them"


def end_without_studies(
    arrival_id: int, set_aside: Sequence[SetAside]
) -> tuple[ArrivalState, str | None, int | None]:
    """The end of an arrival none of whose studies was analysed: ``(state, reason, duplicate_of)`` —
    ``duplicate`` of the newest result when nothing in it was new, else ``ignored`` with the reason
    that ``arrivals.error`` keeps."""
    if all(s.kind == UNCHANGED for s in set_aside):
        return ArrivalState.DUPLICATE, None, max(s.current.arrival_id for s in set_aside)
    first = next(s for s in set_aside if s.kind == IGNORED)
    return ArrivalState.IGNORED, ignored_reason(arrival_id, first.current.arrival_id), None
