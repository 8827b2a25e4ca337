"""The executor seam and the worker thread that owns the pipeline (and the GPU).

:class:`LocalExecutor` takes one claimed arrival through reading, scanning, the pipeline for each
study in it, the JSON writes and the final move. Another backend (e.g. Dask GPU workers) can
implement the same ``process(arrival, should_stop)`` while the coordinator keeps SQLite.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

from processor.dicom.scan import Study, scan_members
from processor.errors import IngestError
from processor.intake.archive import Limits, open_arrival
from processor.intake.inbox import InboxLayout, free_path, move, work_name, write_error_note
from processor.outputs.receipt import write_receipt
from processor.outputs.result import build_result, write_json_atomic
from processor.pipeline.runner import PipelineRunner
from processor.pipeline.spec import Pipeline
from processor.pipeline.step import StudyContext
from processor.state import State, utcnow
from processor.steps.ensemble import collect_features

log = logging.getLogger(__name__)


class Interrupted(Exception):
    """Shutdown was requested between two studies or steps; the arrival goes back to pending."""


class Executor(Protocol):
    def process(self, arrival: dict[str, Any], should_stop: Callable[[], bool]) -> str: ...


@dataclass
class StudyDone:
    study_uid: str
    status: str
    json_path: Path
    error: str | None


class LocalExecutor:
    """Runs the pipeline in this process, one arrival at a time.

    ``finish_study_on_stop`` (set by the composition root from ``worker.shutdown: study``) lets a
    running study finish its steps after a stop request; the stop then takes effect before the
    next study.
    """

    finish_study_on_stop: bool = False

    def __init__(self, state: State, pipeline: Pipeline, *, outbox: Path, limits: Limits, device: str,
                 layout_for: Callable[[Path], InboxLayout]) -> None:
        self.state = state
        self.pipeline = pipeline
        self.runner = PipelineRunner(pipeline)
        self.outbox = outbox
        self.limits = limits
        self.device = device
        self.layout_for = layout_for

    # ------------------------------------------------------------------ arrival
    def process(self, arrival: dict[str, Any], should_stop: Callable[[], bool] = lambda: False) -> str:
        aid = arrival["id"]
        path = self.locate(arrival)
        log.info("arrival.start arrival=%s name=%s attempt=%s", aid, arrival["name"], arrival["attempts"])
        try:
            if path is None:
                raise IngestError(f"the input {arrival['name']} is no longer at {arrival['current_path']} "
                                  "(moved or deleted outside ctwatch)")
            done, skipped = self._process_contents(arrival, path, should_stop)
        except Interrupted:
            self.state.release(aid)
            log.info("arrival.released arrival=%s reason=shutdown", aid)
            return "pending"
        except IngestError as exc:
            return self._reject(arrival, path, str(exc))
        except Exception as exc:  # a bug must not kill the worker; the arrival is kept and marked failed
            log.exception("arrival.crashed arrival=%s", aid)
            return self._reject(arrival, path, f"internal error: {type(exc).__name__}: {exc}", state="failed")
        return self._accept(arrival, path, done, skipped)

    def _process_contents(self, arrival: dict[str, Any], path: Path,
                          should_stop: Callable[[], bool]) -> tuple[list[StudyDone], Counter[str]]:
        with open_arrival(path, self.limits) as contents:
            scan = scan_members(contents.members)
            skipped = contents.skipped + scan.skipped
            if not scan.studies:
                raise IngestError(_no_dicom_message(len(contents.members), skipped))
            done = []
            for study in scan.studies:
                if should_stop():
                    raise Interrupted
                done.append(self._process_study(arrival, study, skipped, scan.dicom_files, should_stop))
        return done, skipped

    # ------------------------------------------------------------------ study
    def json_path_for(self, arrival: dict[str, Any], study_uid: str) -> Path:
        day = datetime.fromisoformat(arrival["created_at"]).astimezone().date()
        safe_uid = study_uid if all(c.isdigit() or c == "." for c in study_uid) else "invalid-uid"
        path = self.outbox / day.isoformat() / f"{safe_uid}.json"
        owner = self.state.json_path_owner(str(path))
        if owner is not None and owner != (arrival["id"], study_uid):
            path = path.with_name(f"{safe_uid}.a{arrival['id']}.json")
        return path

    def _process_study(self, arrival: dict[str, Any], study: Study, skipped: Counter[str], n_dicom: int,
                       should_stop: Callable[[], bool]) -> StudyDone:
        started = time.monotonic()
        json_path = self.json_path_for(arrival, study.uid)
        ctx = StudyContext(arrival["id"], study, json_path.with_suffix(""))
        step_stop = (lambda: False) if self.finish_study_on_stop else should_stop
        outcome = self.runner.run(ctx, should_stop=step_stop)
        if outcome.interrupted:
            raise Interrupted
        seconds = time.monotonic() - started
        steps = [r.as_dict() for r in outcome.steps]
        result = build_result(
            study_uid=study.uid, accession=study.accession, outcome_status=outcome.status,
            error=outcome.error, seconds=seconds, sections=ctx.result, steps=steps,
            source=_source(arrival), device=self.device, warnings=ctx.warnings, finished_at=utcnow(),
            pipeline={"name": self.pipeline.name, "version": self.pipeline.version,
                      "digest": self.pipeline.digest},
            dicom={"instances_in_arrival": n_dicom, "instances_in_study": study.instance_count,
                   "series_in_study": len(study.series), "skipped": dict(skipped)})
        write_json_atomic(json_path, result)
        self.state.record_study(arrival["id"], study.uid, {
            "series_uid": result["series_uid"], "accession": study.accession, "status": outcome.status,
            "probability_of_pathology": result["probability_of_pathology"], "pathology": result["pathology"],
            "most_dangerous_pathology_type": result["most_dangerous_pathology_type"],
            "error": outcome.error, "json_path": str(json_path), "seconds": seconds, "result": result,
        }, [{"step_id": r.step_id, "uses": r.uses, "status": r.status, "seconds": r.seconds,
             "error": r.error} for r in outcome.steps])
        self.state.record_features(arrival["id"], study.uid, study.accession, collect_features(ctx.result),
                                   {"ctclip": ctx.values.get("ctclip_latent")})
        log.info("study.done arrival=%s study=%s status=%s seconds=%.2f json=%s",
                 arrival["id"], study.uid, outcome.status, seconds, json_path)
        return StudyDone(study.uid, outcome.status, json_path, outcome.error)

    # ------------------------------------------------------------------ endings
    def locate(self, arrival: dict[str, Any]) -> Path | None:
        """Where the input is now; after a crash it may already have been moved into work/."""
        current = Path(arrival["current_path"])
        if current.exists():
            return current
        if arrival["kind"] != "cli":
            candidate = self.layout_for(Path(arrival["original_path"])).work / work_name(
                arrival["id"], arrival["name"])
            if candidate.exists():
                self.state.update_arrival(arrival["id"], current_path=str(candidate))
                return candidate
        return None

    def _accept(self, arrival: dict[str, Any], path: Path, done: list[StudyDone],
                skipped: Counter[str]) -> str:
        dest = self._final_move(arrival, path, quarantine=False)
        failed = [d for d in done if d.status == "Failure"]
        message = (f"{len(done)} stud{'y' if len(done) == 1 else 'ies'} processed"
                   + (f"; {len(failed)} could not be analysed: " + "; ".join(str(d.error) for d in failed)
                      if failed else "."))
        receipt = write_receipt(self.outbox, arrival, "accepted", message, skipped=skipped, studies=[
            {"study_uid": d.study_uid, "status": d.status, "json": str(d.json_path), "error": d.error}
            for d in done])
        self.state.finish_arrival(arrival["id"], "done", current_path=str(dest), receipt_path=str(receipt))
        log.info("arrival.done arrival=%s studies=%d failures=%d", arrival["id"], len(done), len(failed))
        return "done"

    def _reject(self, arrival: dict[str, Any], path: Path | None, reason: str, state: str = "quarantined") -> str:
        dest = self._final_move(arrival, path, quarantine=True) if path is not None else None
        if dest is not None and arrival["kind"] != "cli":
            write_error_note(dest, reason)
        receipt = write_receipt(self.outbox, arrival, "rejected" if state == "quarantined" else "failed", reason)
        self.state.finish_arrival(arrival["id"], state, error=reason, receipt_path=str(receipt),
                                  current_path=str(dest) if dest else None)
        log.warning("arrival.%s arrival=%s name=%s reason=%r", state, arrival["id"], arrival["name"], reason)
        return state

    def _final_move(self, arrival: dict[str, Any], path: Path, *, quarantine: bool) -> Path:
        if arrival["kind"] == "cli":
            return path  # files named on the command line stay where the user keeps them
        layout = self.layout_for(Path(arrival["original_path"]))
        folder = layout.quarantine if quarantine else layout.done(date.today())
        if path.parent == folder:
            return path
        return move(path, free_path(folder, arrival["name"], arrival["id"]))


def _source(arrival: dict[str, Any]) -> dict[str, Any]:
    return {"kind": arrival["kind"], "name": arrival["name"], "sha256": arrival["sha256"],
            "size": arrival["size"], "arrival_id": arrival["id"], "source_name": arrival.get("source_name"),
            "url": arrival.get("source_url"), "received_at": arrival["created_at"]}


def _no_dicom_message(members: int, skipped: Counter[str]) -> str:
    detail = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "it is empty"
    return f"no DICOM images found among {members} file(s) ({detail}); export the study as DICOM files"


FAR_FUTURE = "9999-12-31T23:59:59+00:00"


class Worker:
    """The one thread that claims arrivals and runs them, day queue first; night only when allowed.

    Hooks, all optional: ``night_allowed(now)`` (may night arrivals be claimed?) or the finer
    ``night_before(now)`` (night arrivals registered before the returned instant may; None: none),
    ``can_claim()`` (the disk guard), ``on_processed(arrival_id, outcome)`` (the report thread) and
    ``clock()`` (local time, so tests can put the worker in the night window).
    """

    def __init__(self, state_path: Path, make_executor: Callable[[State], Executor], *,
                 night_allowed: Callable[[datetime], bool] = lambda now: True,
                 can_claim: Callable[[], bool] = lambda: True, poll_seconds: float = 1.0,
                 night_before: Callable[[datetime], datetime | None] | None = None,
                 on_processed: Callable[[int, str], None] | None = None,
                 clock: Callable[[], datetime] = datetime.now) -> None:
        self.state_path = state_path
        self.make_executor = make_executor
        self.night_allowed = night_allowed
        self.night_before = night_before
        self.can_claim = can_claim
        self.on_processed = on_processed
        self.clock = clock
        self.poll_seconds = poll_seconds
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.current: int | None = None
        self.current_since: float | None = None
        self.last_beat = time.time()
        self.idle_passes = 0
        self.processed = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ctwatch-worker", daemon=True)
        self._thread.start()

    def night_cutoff(self, now: datetime) -> str | None:
        """The stored-timestamp bound for night arrivals at ``now`` (None: day queue only)."""
        if self.night_before is None:
            return FAR_FUTURE if self.night_allowed(now) else None
        before = self.night_before(now)
        return None if before is None else before.astimezone(UTC).isoformat(timespec="seconds")

    def _loop(self) -> None:
        state = State(self.state_path)
        executor = self.make_executor(state)
        try:
            while not self.stop_event.is_set():
                self.last_beat = time.time()
                try:
                    arrival = self._claim(state)
                except sqlite3.Error:  # e.g. the disk filled up under SQLite; wait and try again
                    log.exception("worker.claim_failed db=%s", self.state_path)
                    arrival = None
                if arrival is None:
                    self.idle_passes += 1
                    self.wake_event.wait(self.poll_seconds)
                    self.wake_event.clear()
                    continue
                self.current, self.current_since = arrival["id"], time.time()
                outcome = executor.process(arrival, self.stop_event.is_set)
                self.current = self.current_since = None
                self.processed += 1
                if self.on_processed is not None:
                    self.on_processed(arrival["id"], outcome)
        finally:
            state.close()

    def _claim(self, state: State) -> dict[str, Any] | None:
        if not self.can_claim():
            return None
        return state.claim_next_until(self.night_cutoff(self.clock()))

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
