"""The one place an arrival is finished: results, rows, receipt and the input's final place.

Finishing is one recorded, idempotent transition (intent first):

1. one SQLite transaction records the study and step rows (each with its result document),
   features and latents, the arrival's final state and reason, its receipt document and where
   the input is to go (``placed = 0``) — and, for a new version of a study (late series), marks
   the results it supersedes, each result document given a ``superseded_by`` pointer (a version
   that lacks images the current one used and came out worse supersedes nothing: its own row and
   document point at the result that stays current, :meth:`~processor.outputs.versions.Lineage.stays_out`);
2. each study's result JSON is written from the recorded document (atomic), then each superseded
   one that is still there is rewritten from its updated document (atomic), then the receipt, the
   input is moved (quarantine: its ``.error.txt`` written), and ``placed = 1`` closes it.

A crash after step 1 is finished by :meth:`StudyRecorder.replay` (at the worker's start, and when
it is idle) from what step 1 recorded: the real reason is never lost, the input never orphaned,
and no JSON or receipt appears twice. A crash before step 1 leaves no result file at all (the
arrival is processed again), so a JSON in the outbox always has its row and its final state.
JSON paths are reserved from the CPU stage on, so arrivals of one study in flight together never
share a path. ``fault_point`` calls mark each gap for the fault-injection tests.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from processor.config import NotificationSettings
from processor.dicom.sendback import SourceStudy
from processor.errors import VersionConflict
from processor.faults import fault_point
from processor.names import display_name
from processor.outputs.layout import OutboxLayout
from processor.outputs.notify import arrival_outbound, study_outbound
from processor.outputs.receipt import (
    duplicate_receipt,
    receipt_document,
    receipt_path,
    write_receipt_document,
)
from processor.outputs.result import build_result, plain_json, write_json_atomic
from processor.outputs.sendback import ObjectMaker
from processor.outputs.versions import IGNORED, Lineage, SetAside, end_without_studies
from processor.redact import redact_optional_url
from processor.state import Arrival, Outbound, State
from processor.vocab import ArrivalState, LateSeries, ReceiptOutcome, StudyStatus, utcnow

log = logging.getLogger(__name__)

PLACE_WAIT_SECONDS = 10.0  # placing takes milliseconds; longer means an OS error holds it
PLACE_POLL_SECONDS = 0.2  # how often a process without the notifying recorder looks again


class PlacementPolicy(Protocol):
    """Where an input lives (see :mod:`processor.intake.placement`)."""

    def locate(self, arrival: Arrival) -> Path | None: ...

    def final_path(self, arrival: Arrival, *, quarantine: bool, today: date) -> Path | None: ...

    def place(self, path: Path, dest: Path) -> Path: ...

    def note(self, dest: Path, reason: str) -> None: ...


@dataclass
class FinishedStudy:
    """One study's outcome, as the pipeline left it, ready to be recorded.

    ``sections``: the study's result sections (``ctx.result``); ``features`` (name → number) and
    ``latents`` (name → vector) the model outputs the fit commands use; ``steps``: one dict per
    step run (``step_id, uses, status, seconds, error, problem``). Provenance: ``feature_models`` /
    ``latent_models`` (name → sha256 of the checkpoint that produced it, None when weight-free) and
    ``software`` (distribution → version), stored with each feature and latent row.
    ``patient_key``: the patient's pseudonym (``State.patient_key``; "" when the DICOM has no
    PatientID, None only when not known), stored in the studies row only — never the PatientID
    itself, and never in the result JSON. ``lineage``: its place among the results of the same study
    (a new version: what it supersedes and the arrivals whose images it used);
    ``series_instances``: per series ``[instances, sha256 of the sorted SOPInstanceUIDs]``;
    ``sop_digests``: every image it used (``studies.sop_digests``, see :mod:`processor.state.versions`).
    """

    study_uid: str
    accession: str | None
    status: StudyStatus
    error: str | None
    json_path: Path
    sections: dict[str, Any]
    steps: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)
    features: dict[str, float] = field(default_factory=dict)
    latents: dict[str, Any] = field(default_factory=dict)
    dicom: dict[str, Any] = field(default_factory=dict)
    feature_models: dict[str, str | None] = field(default_factory=dict)
    latent_models: dict[str, str | None] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    device: str | None = None  # where its steps ran, when not on the recorder's device (a Dask worker)
    patient_key: str | None = None
    lineage: Lineage = field(default_factory=Lineage)
    series_instances: dict[str, list[int | str]] = field(default_factory=dict)
    sop_digests: bytes = b""
    # what send-back objects copy from the input (patient and study modules, the analysed series);
    # None with ``source_problem`` saying why when its header could not be read
    source: SourceStudy | None = None
    source_problem: str | None = None


class StudyRecorder:
    """Owns the outbox layout and every write that finishes an arrival (see the module docstring)."""

    def __init__(
        self,
        state: State,
        layout: OutboxLayout,
        placement_for: Callable[[Arrival], PlacementPolicy],
        *,
        device: str,
        pipeline: Mapping[str, Any],
        today: Callable[[], date] = date.today,
        objects: ObjectMaker | None = None,
        notifications: Sequence[NotificationSettings] = (),
        outbound_wake: threading.Event | None = None,
    ) -> None:
        """``objects``: makes each study's report files and DICOM objects and its destinations' rows
        (None: none); ``notifications``: the webhooks told of failures and pathology;
        ``outbound_wake``: set after a finish that queued sends (the delivery thread waits on it)."""
        self.objects = objects
        self.notifications = list(notifications)
        self.outbound_wake = outbound_wake
        self.state = state
        self.layout = layout
        self.placement_for = placement_for
        self.device = device
        self.pipeline = dict(pipeline)
        self.today = today
        self._reserved: dict[Path, tuple[int, str]] = {}  # JSON path → (arrival id, study UID), in flight
        self._reserve_lock = threading.Lock()
        self.unplaced_failures = 0  # recorded ends the last replay could not place (an OS error)
        self._placed = threading.Condition()  # notified whenever an input reaches its final place

    # ------------------------------------------------------------------ paths
    def json_path(self, arrival: Arrival, study_uid: str, taken: set[Path] | None = None) -> Path:
        """The result JSON path of one study of ``arrival``, reserved for it until its end is recorded.

        Chosen in the CPU stage (the previews go beside it), possibly in a prefetch thread while
        other arrivals of the same study are still being processed: a path reserved by another
        arrival counts as taken, so two arrivals never share one JSON (the second gets ``.a<id>``).
        """
        with self._reserve_lock:
            others = {path for path, owner in self._reserved.items() if owner[0] != arrival.id}
            path = self.layout.json_path(self.state, arrival, study_uid, (taken or set()) | others)
            self._reserved[path] = (arrival.id, study_uid)
        return path

    def release(self, arrival: Arrival) -> None:
        """Drop the JSON paths reserved for an arrival (its end is recorded, or it goes back to the queue)."""
        with self._reserve_lock:
            for path in [p for p, owner in self._reserved.items() if owner[0] == arrival.id]:
                del self._reserved[path]

    def locate(self, arrival: Arrival) -> Path | None:
        """Where the input is now (None: moved or deleted outside ctwatch)."""
        path = self.placement_for(arrival).locate(arrival)
        if path is not None and str(path) != arrival.current_path and not self.state.readonly:
            self.state.update_arrival(arrival.id, current_path=str(path))
        return path

    # ------------------------------------------------------------------ finishing
    def accept(
        self,
        arrival: Arrival,
        studies: list[FinishedStudy],
        skipped: Counter[str],
        set_aside: Sequence[SetAside] = (),
    ) -> ArrivalState:
        """Record the studies of an arrival that was read and processed, then place its input in done/.

        ``set_aside``: its studies that were not analysed, since an earlier result answers for them
        (:mod:`processor.intake.late_series`); with no study analysed the arrival ends ``duplicate``
        or ``ignored``. ``pending`` when another arrival of one of its studies was recorded while it
        ran (:class:`~processor.errors.VersionConflict`): nothing is recorded, it runs again.
        """
        documents = [self._result(arrival, study) for study in studies]
        outbound = self._outbound(arrival, studies, documents)
        failed = [s for s in studies if s.status == StudyStatus.FAILURE]
        message = f"{len(studies)} stud{'y' if len(studies) == 1 else 'ies'} processed" + (
            f"; {len(failed)} could not be analysed: " + "; ".join(str(s.error) for s in failed)
            if failed
            else "."
        )
        state, outcome, reason, duplicate_of = ArrivalState.DONE, ReceiptOutcome.ACCEPTED, None, None
        if set_aside and not studies:
            state, reason, duplicate_of = end_without_studies(arrival.id, set_aside)
            outcome = ReceiptOutcome(state)
        notes = [note for s in studies if (note := s.lineage.receipt_note(s.study_uid, arrival.id, s.status))]
        notes += [s.message(arrival.id) for s in set_aside]
        receipt = receipt_document(
            replace(arrival, duplicate_of=duplicate_of) if duplicate_of is not None else arrival,
            outcome,
            " ".join(([message] if studies else []) + notes),
            skipped=skipped,
            studies=[
                {"study_uid": s.study_uid, "status": s.status, "json": str(s.json_path), "error": s.error}
                for s in studies
            ]
            + [s.receipt_entry() for s in set_aside],
        )
        rows = [self._rows(study, document) for study, document in zip(studies, documents, strict=True)]
        ignored = LateSeries.IGNORE if any(s.kind == IGNORED for s in set_aside) else None
        try:
            self._finish(arrival, state, reason, receipt, rows, duplicate_of, ignored, outbound)
        except VersionConflict as exc:
            self.release(arrival)
            self.state.release(arrival.id)
            log.warning("arrival.sent_back arrival=%s: %s; it runs again with that result", arrival.id, exc)
            return ArrivalState.PENDING
        log.info(
            "arrival.%s arrival=%s studies=%d failures=%d set_aside=%d",
            state,
            arrival.id,
            len(studies),
            len(failed),
            len(set_aside),
        )
        return state

    def reject(
        self, arrival: Arrival, reason: str, state: ArrivalState = ArrivalState.QUARANTINED
    ) -> ArrivalState:
        """Record an arrival that could not be processed (``quarantined``: its input is at fault;
        ``failed``: ctwatch is), then place its input in quarantine/ with the reason beside it."""
        outcome = ReceiptOutcome.REJECTED if state == ArrivalState.QUARANTINED else ReceiptOutcome.FAILED
        outbound = arrival_outbound(self.notifications, arrival, state, reason) if self.notifications else []
        self._finish(
            arrival, state, reason, receipt_document(arrival, outcome, reason), [], outbound=outbound
        )
        log.warning("arrival.%s arrival=%s name=%s reason=%r", state, arrival.id, arrival.name, reason)
        return state

    def _finish(
        self,
        arrival: Arrival,
        state: ArrivalState,
        reason: str | None,
        receipt: dict[str, Any],
        rows: list[dict[str, Any]],
        duplicate_of: int | None = None,
        late_series: LateSeries | None = None,
        outbound: Sequence[Outbound] = (),
    ) -> None:
        placement = self.placement_for(arrival)
        dest = placement.final_path(arrival, quarantine=_to_quarantine(state), today=self.today())
        self.state.finish(
            arrival.id,
            state,
            error=reason,
            final_path=str(dest) if dest is not None else None,
            receipt_path=str(receipt_path(self.layout.outbox, arrival.id, receipt["name"])),
            receipt=receipt,
            studies=rows,
            duplicate_of=duplicate_of,
            late_series=late_series,
            outbound=outbound,
        )
        if outbound and self.outbound_wake is not None:
            self.outbound_wake.set()
        self.release(arrival)
        fault_point("arrival.recorded", arrival.name)
        self._place(self.state.arrival(arrival.id), receipt)

    def _place(self, arrival: Arrival, receipt: dict[str, Any]) -> None:
        """Step 3 of the module docstring, from the recorded end; safe to repeat."""
        for row in self.state.studies_for(arrival.id):  # each JSON exactly as the transaction recorded it
            if row["json_path"] and row["result_json"]:
                write_json_atomic(Path(row["json_path"]), json.loads(row["result_json"]))
                fault_point("study.json_written", arrival.name)
        for row in self.state.superseded_rows(arrival.id):  # each now names this arrival's result
            earlier = Path(row["json_path"]) if row["json_path"] else None
            if earlier is not None and row["result_json"] and earlier.exists():
                write_json_atomic(earlier, json.loads(row["result_json"]))
                fault_point("study.json_written", arrival.name)
        write_receipt_document(self.layout.outbox, receipt)
        fault_point("arrival.receipt_written", arrival.name)
        placement = self.placement_for(arrival)
        path = placement.locate(arrival)
        where: Path | None = path
        quarantine = _to_quarantine(arrival.state)
        dest = Path(arrival.final_path) if arrival.final_path else None
        if path is not None and dest is not None:
            where = placement.place(path, dest)
            fault_point("quarantine.note_before" if quarantine else "arrival.moved", arrival.name)
        if where is not None and quarantine and arrival.error:
            placement.note(where, arrival.error)
            fault_point("quarantine.note_written", arrival.name)
        if path is None:
            log.warning(
                "arrival.input_missing arrival=%s name=%s: not at %s nor at %s",
                arrival.id,
                arrival.name,
                display_name(arrival.current_path or ""),
                display_name(arrival.final_path or ""),
            )
        self.state.mark_placed(arrival.id, str(where) if where is not None else None)
        with self._placed:
            self._placed.notify_all()

    def wait_placed(self, arrival_id: int, timeout: float = PLACE_WAIT_SECONDS) -> Arrival:
        """The arrival once its input is in its final place, waiting at most ``timeout`` seconds
        for the thread that recorded its end to move it (a prefetch thread about to read an
        earlier part of a study must not read a folder that moves under it); after that, as it is."""
        deadline = time.monotonic() + timeout
        with self._placed:
            while True:
                arrival = self.state.arrival(arrival_id)
                left = deadline - time.monotonic()
                if arrival.placed or left <= 0:
                    return arrival
                # notified by this process's recorder; polled for one in a CPU pool process
                self._placed.wait(min(left, PLACE_POLL_SECONDS))

    # ------------------------------------------------------------------ replay
    def replay(self, settle_seconds: float | None = None) -> list[int]:
        """Finish every recorded end whose receipt or move a crash (or an OS error) interrupted.

        Returns the arrival ids it finished. An arrival ended by crash recovery (no receipt and no
        place recorded yet) gets both now. ``settle_seconds``: only ends recorded at least that long
        ago (while the daemon runs, so an end being finished by another thread is left to it).
        """
        finished = []
        failures = 0
        before = None
        if settle_seconds is not None:
            before = (datetime.now(UTC) - timedelta(seconds=settle_seconds)).isoformat(timespec="seconds")
        for arrival, receipt in self.state.unplaced(before):
            try:
                if arrival.final_path is None:  # ended by crash recovery: its place is chosen now
                    dest = self.placement_for(arrival).final_path(
                        arrival,
                        quarantine=_to_quarantine(arrival.state),
                        today=self.today(),
                    )
                    self.state.update_arrival(arrival.id, final_path=str(dest) if dest else None)
                    arrival = self.state.arrival(arrival.id)
                document = receipt if receipt is not None else self._receipt_for(arrival)
                if receipt is None:
                    self.state.update_arrival(
                        arrival.id,
                        receipt_path=str(receipt_path(self.layout.outbox, arrival.id, document["name"])),
                    )
                self._place(arrival, document)
                finished.append(arrival.id)
                log.warning("arrival.replayed arrival=%s state=%s", arrival.id, arrival.state)
            except OSError:  # tried again on an idle pass and at the next start; the daemon goes on
                failures += 1
                log.exception("arrival.replay_failed arrival=%s", arrival.id)
        self.unplaced_failures = failures
        return finished

    def _receipt_for(self, arrival: Arrival) -> dict[str, Any]:
        if arrival.state == ArrivalState.DUPLICATE and arrival.duplicate_of is not None:
            original = self.state.arrival(arrival.duplicate_of)
            return duplicate_receipt(arrival, original, self.state.studies_for(original.id))
        outcome = (
            ReceiptOutcome.REJECTED if arrival.state == ArrivalState.QUARANTINED else ReceiptOutcome.FAILED
        )
        return receipt_document(arrival, outcome, arrival.error or "no reason was recorded")

    # ------------------------------------------------------------------ send-back
    def _outbound(
        self, arrival: Arrival, studies: Sequence[FinishedStudy], documents: Sequence[dict[str, Any]]
    ) -> list[Outbound]:
        """Make each study's report files and DICOM objects (adding its ``report`` section) and
        return the queue rows of its destinations and notifications, for the finishing transaction."""
        rows: list[Outbound] = []
        if self.objects is not None and self.objects.enabled:
            for study, document in zip(studies, documents, strict=True):
                # a new version of a study: it names the SRs it replaces, and goes wherever an
                # earlier version went (a PACS that holds a positive result gets its correction)
                replaces = () if study.lineage.stays_out(study.status) else study.lineage.supersedes
                predecessors = self._earlier_reports(replaces, study.study_uid)
                built = self.objects.make(
                    document, study.json_path, study.source, study.source_problem, predecessors=predecessors
                )
                also = self.state.study_destinations(replaces, study.study_uid)
                rows += self.objects.outbound(arrival, document, built, also=also)
        if self.notifications:
            rows += study_outbound(self.notifications, arrival, documents)
        return rows

    def _earlier_reports(self, arrival_ids: Sequence[int], study_uid: str) -> list[tuple[str, str]]:
        """(SeriesInstanceUID, SOPInstanceUID) of the SR each of ``arrival_ids`` made for the study
        (from its recorded ``report`` section and the SR file it names; one no longer readable is
        left out)."""
        import pydicom

        found: list[tuple[str, str]] = []
        for arrival_id in arrival_ids:
            for row in self.state.studies_for(arrival_id):
                if row["study_uid"] != study_uid or not row["result_json"] or not row["json_path"]:
                    continue
                files = (json.loads(row["result_json"]).get("report") or {}).get("files") or []
                for entry in files:
                    if (
                        entry.get("kind") != "sr"
                        or not entry.get("sop_instance_uid")
                        or not entry.get("file")
                    ):
                        continue
                    try:
                        header = pydicom.dcmread(
                            Path(row["json_path"]).parent / entry["file"],
                            stop_before_pixels=True,
                            specific_tags=["SeriesInstanceUID", "SOPInstanceUID"],
                        )
                    except (OSError, ValueError, pydicom.errors.InvalidDicomError) as exc:
                        log.warning(  # the path holds the StudyInstanceUID: the arrival names it
                            "report.predecessor_unreadable arrival=%s: %s", arrival_id, type(exc).__name__
                        )
                        continue
                    series, sop = header.get("SeriesInstanceUID"), header.get("SOPInstanceUID")
                    if series and sop and str(sop) == entry["sop_instance_uid"]:
                        found.append((str(series), str(sop)))
                    else:  # a truncated or replaced file: the new SR cannot name it
                        log.warning(
                            "report.predecessor_unreadable arrival=%s: not the SR recorded", arrival_id
                        )
        return found

    # ------------------------------------------------------------------ documents
    def _result(self, arrival: Arrival, study: FinishedStudy) -> dict[str, Any]:
        """The study's result JSON as plain JSON values: what the file and ``studies.result_json`` hold."""
        seconds = sum(float(step["seconds"]) for step in study.steps)
        kept_out = study.lineage.stays_out(study.status)  # a version that does not replace the current one
        warnings = (
            [*study.warnings, study.lineage.kept_out_words(study.status)] if kept_out else study.warnings
        )
        return plain_json(
            build_result(
                study_uid=study.study_uid,
                accession=study.accession,
                outcome_status=study.status,
                error=study.error,
                seconds=seconds,
                sections=study.sections,
                steps=study.steps,
                source=_source(arrival),
                device=study.device or self.device,
                warnings=warnings,
                finished_at=utcnow(),
                pipeline=self.pipeline,
                dicom=study.dicom,
            )
            | study.lineage.document(study.status)
        )

    def _rows(self, study: FinishedStudy, result: dict[str, Any]) -> dict[str, Any]:
        seconds = sum(float(step["seconds"]) for step in study.steps)
        lineage = study.lineage
        stays_out = lineage.stays_out(study.status)
        return {
            "study_uid": study.study_uid,
            "fields": {
                "series_uid": result["series_uid"],
                "accession": study.accession,
                "status": study.status,
                "probability_of_pathology": result["probability_of_pathology"],
                "pathology": result["pathology"],
                "most_dangerous_pathology_type": result["most_dangerous_pathology_type"],
                "error": study.error,
                "json_path": str(study.json_path),
                "seconds": seconds,
                "patient_key": study.patient_key,
                # current (a requeued arrival's own earlier row included), or, when it stays out,
                # the result that stays current
                "superseded_by": lineage.predecessor.arrival_id
                if stays_out and lineage.predecessor
                else None,
                "inputs": json.dumps(list(lineage.input_ids)),
                "series_instances": json.dumps(study.series_instances),
                "sop_digests": study.sop_digests or None,
                "result": result,
            },
            "supersedes": list(lineage.supersedes),
            "stays_out": stays_out,
            "steps": [
                {
                    **{key: step[key] for key in ("step_id", "uses", "status", "seconds", "error")},
                    "problem": step.get("problem"),
                }
                for step in study.steps
            ],
            "features": study.features,
            "latents": study.latents,
            "feature_models": study.feature_models,
            "latent_models": study.latent_models,
            "software": study.software,
        }


def _to_quarantine(state: ArrivalState) -> bool:
    """Whether an input that ended in ``state`` goes to quarantine/ (else done/)."""
    return state not in (ArrivalState.DONE, ArrivalState.DUPLICATE, ArrivalState.IGNORED)


def _source(arrival: Arrival) -> dict[str, Any]:
    return {
        "kind": arrival.kind,
        "name": arrival.name,
        "name_bytes": arrival.name_bytes,
        "sha256": arrival.sha256,
        "size": arrival.size,
        "arrival_id": arrival.id,
        "priority": arrival.priority,
        "source_name": arrival.source_name,
        "url": redact_optional_url(arrival.source_url),
        "received_at": arrival.created_at,
    }
