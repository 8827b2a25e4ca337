"""Late series: images of a study that was already analysed from an earlier arrival.

Each study of an arrival is planned against the study's current result
(:meth:`processor.state.versions.Versions.current_versions`):

- no current result: it is analysed as it is — a first version;
- nothing new: the current result by this pipeline (name and version) succeeded and every image of
  the study in this arrival, by SOPInstanceUID, was used by it — by the digests of the images it
  recorded (``studies.sop_digests``; on older rows, those of whole series), or found in the earlier
  inputs: set aside as ``unchanged`` (an arrival with nothing else ends ``duplicate``);
- ``late_series: ignore`` (the setting, unless ``requeue`` overrode it for this arrival) and the
  current result by this pipeline succeeded: set aside as ``ignored``;
- otherwise — ``new_version``, a current result that failed, or one of another pipeline version —
  it is analysed with the images of every arrival known to hold a part of it: the earlier inputs,
  read again where they lie (``done/``, or where a ``process`` input was), and this one, each SOP
  instance once (this arrival's copy first). Its result supersedes the current one(s) — unless it
  lacks images the current one used and its ``processing_status`` is worse
  (:meth:`processor.outputs.versions.Lineage.stays_out`): then that one stays current.

What an earlier input gives is the reader's answer (:data:`ReadEarlier`): its studies; or why it
gives none — no longer on disk, or changed since it was analysed (its sha256 differs) — and it is
left out, named in the result's warnings. An input that is there, unchanged, but cannot be read now
raises, and the reader's caller decides (:class:`processor.executor.LocalExecutor`: an OS error
sends the arrival back to the queue; anything else fails it), so that a version is never computed
without images merely because a disk was slow or busy.

Two arrivals of one study in flight together each plan without the other; the recorder's
transaction notices (:class:`processor.errors.VersionConflict`) and the later one runs again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from processor.dicom.scan import Series, Study
from processor.outputs.versions import IGNORED, NO_STUDY, UNCHANGED, Lineage, SetAside, missing_warning
from processor.state import Arrival, CurrentVersion, State
from processor.state.versions import pack_digests, sop_digest
from processor.vocab import LateSeries, StudyStatus

log = logging.getLogger(__name__)

ReadEarlier = Callable[[Arrival], list[Study] | str]
"""The studies in an earlier arrival's input, read again; else why it gives none
(:data:`~processor.outputs.versions.GONE` or :data:`~processor.outputs.versions.CHANGED`). Raises
when it is there, unchanged, and cannot be read now (see the module docstring)."""


@dataclass
class Plan:
    """What to do with the studies of one arrival."""

    studies: list[Study] = field(default_factory=list)  # to analyse (a new version: the union)
    lineage: dict[str, Lineage] = field(default_factory=dict)  # study UID → its place among versions
    warnings: dict[str, list[str]] = field(default_factory=dict)  # study UID → for its result
    set_aside: list[SetAside] = field(default_factory=list)


def series_instances(study: Study) -> dict[str, list[int | str]]:
    """Per series of ``study``: ``[instances, sha256 of its sorted SOPInstanceUIDs joined by "\\n"]``
    (what ``studies.series_instances`` records)."""
    return {uid: _digest(i.sop_uid for i in series.instances) for uid, series in study.series.items()}


def sop_digests(study: Study) -> bytes:
    """What ``studies.sop_digests`` records for ``study``: every image, by SOPInstanceUID
    (:func:`processor.state.versions.pack_digests`)."""
    return pack_digests(_digests(study))


def _digests(study: Study) -> set[bytes]:
    return {sop_digest(i.sop_uid) for series in study.series.values() for i in series.instances}


def _digest(sop_uids: Iterable[str]) -> list[int | str]:
    ordered = sorted(sop_uids)
    return [len(ordered), hashlib.sha256("\n".join(ordered).encode()).hexdigest()]


class LatePlanner:
    """Plans an arrival's studies (see the module docstring) for one pipeline name and version."""

    def __init__(self, state: State, policy: LateSeries, pipeline_name: str, pipeline_version: int) -> None:
        self.state = state
        self.policy = LateSeries(policy)
        self.pipeline = (pipeline_name, pipeline_version)

    def plan(self, arrival: Arrival, studies: list[Study], read: ReadEarlier) -> Plan:
        plan = Plan()
        cache: dict[int, list[Study] | str] = {}

        def read_once(earlier: Arrival) -> list[Study] | str:
            if earlier.id not in cache:
                cache[earlier.id] = read(earlier)
            return cache[earlier.id]

        for study in studies:
            self._plan_study(arrival, study, read_once, plan)
        return plan

    def _plan_study(
        self,
        arrival: Arrival,
        study: Study,
        read: ReadEarlier,
        plan: Plan,
    ) -> None:
        currents = self.state.current_versions(study.uid, excluding=arrival.id)
        if not currents:
            plan.studies.append(study)
            plan.lineage[study.uid] = Lineage(input_ids=(arrival.id,))
            return
        answered = [
            c
            for c in currents
            if (c.pipeline_name, c.pipeline_version) == self.pipeline and c.status != StudyStatus.FAILURE
        ]
        if answered and _covered(study, answered):
            plan.set_aside.append(SetAside(study.uid, UNCHANGED, answered[-1]))
            return
        forced = arrival.late_series == LateSeries.NEW_VERSION  # requeued after being ignored
        if answered and not forced and self.policy == LateSeries.IGNORE:
            plan.set_aside.append(SetAside(study.uid, IGNORED, answered[-1]))
            return
        # the inputs of every result of the study: the current ones', and those of a version kept out
        earlier_ids = sorted(self.state.known_inputs(study.uid, excluding=arrival.id) - {arrival.id})
        parts, inputs, warnings = self._gather(arrival, study, earlier_ids, read)
        used = {i for c in answered for i in c.inputs} - {arrival.id}  # not a kept-out version's inputs
        if answered and _within(study, [part for aid, part in parts if aid in used]):
            plan.set_aside.append(SetAside(study.uid, UNCHANGED, answered[-1]))
            return
        merged = _merge(study.uid, parts)
        missing = {i["arrival_id"] for i in inputs if i["missing"] is not None}
        plan.studies.append(merged)
        plan.warnings[study.uid] = warnings
        plan.lineage[study.uid] = Lineage(
            supersedes=tuple(c.arrival_id for c in currents),
            input_ids=tuple(sorted({arrival.id, *earlier_ids})),
            predecessor=currents[-1],
            inputs=tuple(inputs),
            short=_short(currents, merged, missing),
        )
        log.info(
            "late_series.new_version arrival=%s study=%s supersedes=%s inputs=%s",
            arrival.id,
            study.uid[-12:],
            [c.arrival_id for c in currents],
            [arrival.id, *earlier_ids],
        )

    def _gather(
        self,
        arrival: Arrival,
        study: Study,
        earlier_ids: list[int],
        read: ReadEarlier,
    ) -> tuple[list[tuple[int, Study]], list[dict[str, Any]], list[str]]:
        """The parts of the study (arrival id, its images there; this arrival first), the JSON's
        ``inputs`` (with the instances each gave once merged) and a warning per part not found."""
        parts, warnings = [(arrival.id, study)], []
        rows, missing = {arrival.id: arrival}, {}
        for aid in earlier_ids:
            rows[aid] = earlier = self.state.arrival(aid)
            found = read(earlier)
            part = _find(found, study.uid) if isinstance(found, list) else None
            if part is not None:
                parts.append((aid, part))
                continue
            missing[aid] = why = found if isinstance(found, str) else NO_STUDY
            warnings.append(missing_warning(aid, earlier.name, earlier.created_at, why))
            log.warning("late_series.part_missing arrival=%s earlier=%s why=%r", arrival.id, aid, why)
        counts = _contributions(parts)
        inputs = [
            {
                "arrival_id": aid,
                "name": row.name,
                "received_at": row.created_at,
                "instances": counts.get(aid, 0),
                "missing": missing.get(aid),
            }
            for aid, row in rows.items()
        ]
        return parts, inputs, warnings


def _find(studies: list[Study], uid: str) -> Study | None:
    return next((s for s in studies if s.uid == uid), None)


def _covered(study: Study, answered: list[CurrentVersion]) -> bool:
    """Whether every image of ``study`` is one a current result used: by the digests of its images
    (``sop_digests``), or, for results recorded before those were, of its whole series."""
    recorded: set[bytes] = set()
    for current in answered:
        recorded |= current.sop_digests or set()
    return _digests(study) <= recorded or _recorded(study, answered)


def _short(currents: list[CurrentVersion], merged: Study, missing: set[int]) -> bool:
    """Whether ``merged`` lacks an image that a current result used: by its recorded digests, or,
    for results recorded before those were, when an input it was computed from is ``missing``."""
    mine = _digests(merged)
    return any(
        not current.sop_digests <= mine
        if current.sop_digests is not None
        else bool(set(current.inputs) & missing)
        for current in currents
    )


def _recorded(study: Study, answered: list[CurrentVersion]) -> bool:
    """Whether every series of ``study`` is one a current result recorded, image for image."""
    recorded = {(uid, n, digest) for c in answered for uid, (n, digest) in c.series_instances.items()}
    mine = series_instances(study)
    return all((uid, int(n), str(digest)) in recorded for uid, (n, digest) in mine.items())


def _within(study: Study, earlier: list[Study]) -> bool:
    """Whether every SOP instance of ``study`` is in one of the ``earlier`` parts."""
    seen = {i.sop_uid for part in earlier for series in part.series.values() for i in series.instances}
    return all(i.sop_uid in seen for series in study.series.values() for i in series.instances)


def _merge(uid: str, parts: list[tuple[int, Study]]) -> Study:
    """One study of the parts' series, each SOP instance once (the first part's copy kept)."""
    merged = Study(uid)
    seen: set[str] = set()
    for _, part in parts:
        for series_uid, series in part.series.items():
            for instance in series.instances:
                if instance.sop_uid not in seen:
                    seen.add(instance.sop_uid)
                    merged.series.setdefault(series_uid, Series(series_uid)).instances.append(instance)
    return merged


def _contributions(parts: list[tuple[int, Study]]) -> dict[int, int]:
    """How many SOP instances each part (by arrival id) gives to :func:`_merge`'s study."""
    seen: set[str] = set()
    counts: dict[int, int] = {}
    for aid, part in parts:
        uids = {i.sop_uid for series in part.series.values() for i in series.instances} - seen
        counts[aid] = len(uids)
        seen |= uids
    return counts
