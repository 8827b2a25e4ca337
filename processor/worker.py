"""The executor seam and the worker thread that owns the pipeline (and the GPU).

:class:`LocalExecutor` takes claimed arrivals through reading, scanning, the pipeline for each
study in them (model-major when several are taken together), the JSON writes and the final move.
Another backend (e.g. Dask GPU workers) can implement the same ``process_many(arrivals,
should_stop)`` while the coordinator keeps SQLite.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Protocol

from processor.dicom.scan import Study, scan_members
from processor.errors import IngestError
from processor.intake.archive import Limits, open_arrival
from processor.intake.inbox import InboxLayout, free_path, move, work_name, write_error_note
from processor.outputs.receipt import write_receipt
from processor.outputs.result import build_result, write_json_atomic
from processor.pipeline.runner import PipelineRunner, StudyOutcome, StudyRun
from processor.pipeline.spec import Pipeline
from processor.pipeline.step import StudyContext
from processor.prefetch import Prefetcher
from processor.state import State, utcnow
from processor.steps.ensemble import collect_features

log = logging.getLogger(__name__)


class Executor(Protocol):
    """What the worker hands claimed arrivals to: all at once, or in a CPU and a GPU stage."""

    def process_many(self, arrivals: list[dict[str, Any]], should_stop: Callable[[], bool]) -> list[str]: ...

    def prepare(self, arrivals: list[dict[str, Any]], should_stop: Callable[[], bool]) -> Prepared: ...

    def complete(self, prepared: Prepared, should_stop: Callable[[], bool]) -> list[str]: ...


@dataclass
class _Opened:
    """An arrival whose archive is open and scanned, with the studies it yielded."""

    arrival: dict[str, Any]
    path: Path
    studies: list[Study]
    skipped: Counter[str]
    n_dicom: int
    done: list[StudyDone] = field(default_factory=list)


@dataclass
class _Job:
    item: _Opened
    run: StudyRun
    json_path: Path


@dataclass
class Prepared:
    """Arrivals after the CPU stage, waiting for :meth:`LocalExecutor.complete`."""

    arrivals: list[dict[str, Any]]
    opened: list[_Opened] = field(default_factory=list)
    rejected: dict[int, tuple[str, str]] = field(default_factory=dict)  # id → (reason, final state)
    jobs: list[_Job] = field(default_factory=list)
    crash: str | None = None
    stopped: bool = False

    def interrupted(self) -> bool:
        return self.stopped or any(job.run.interrupted for job in self.jobs)


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
        self._owner_thread = threading.get_ident()
        self._local = threading.local()
        self._extra_states: list[State] = []
        self.pipeline = pipeline
        self.runner = PipelineRunner(pipeline)
        self.outbox = outbox
        self.limits = limits
        self.device = device
        self.layout_for = layout_for

    # ------------------------------------------------------------------ arrivals
    def process(self, arrival: dict[str, Any], should_stop: Callable[[], bool] = lambda: False) -> str:
        return self.process_many([arrival], should_stop)[0]

    def process_many(self, arrivals: list[dict[str, Any]],
                     should_stop: Callable[[], bool] = lambda: False) -> list[str]:
        """Claimed arrivals together: their studies go through the pipeline model-major.

        Returns each arrival's final state (``pending`` when a shutdown interrupted it).
        """
        return self.complete(self.prepare(arrivals, should_stop), should_stop)

    def prepare(self, arrivals: list[dict[str, Any]], should_stop: Callable[[], bool] = lambda: False) -> Prepared:
        """The CPU stage: open and scan the arrivals, run the steps before the first GPU step.

        Safe to call from a prefetch thread: it only reads state (through that thread's own
        connection) and writes nothing but the study's preview files; every outcome is applied by
        :meth:`complete` on the worker thread. Archives are closed when this returns.
        """
        prepared = Prepared(arrivals)
        with ExitStack() as stack:
            for arrival in arrivals:
                log.info("arrival.start arrival=%s name=%s attempt=%s", arrival["id"], arrival["name"],
                         arrival["attempts"])
                try:
                    prepared.opened.append(self._open(arrival, stack))
                except IngestError as exc:
                    prepared.rejected[arrival["id"]] = (str(exc), "quarantined")
                except Exception as exc:  # a bug must not kill the worker; the arrival is kept, marked failed
                    log.exception("arrival.crashed arrival=%s", arrival["id"])
                    prepared.rejected[arrival["id"]] = (f"internal error: {type(exc).__name__}: {exc}", "failed")
            try:
                self._start_studies(prepared, should_stop)
            except Exception as exc:  # noqa: BLE001 — recorded and applied to the batch in complete()
                log.exception("batch.crashed arrivals=%s", [item.arrival["id"] for item in prepared.opened])
                prepared.crash = f"internal error: {type(exc).__name__}: {exc}"
        return prepared

    def complete(self, prepared: Prepared, should_stop: Callable[[], bool] = lambda: False) -> list[str]:
        """The GPU stage and every write: results, receipts, state, and the inputs' final moves."""
        step_stop = (lambda: False) if self.finish_study_on_stop else should_stop
        crash = prepared.crash
        if crash is None and not prepared.interrupted():
            try:
                self.runner.advance([job.run for job in prepared.jobs], self.runner.gpu_stage_start(),
                                    len(self.pipeline.steps), step_stop)
            except Exception as exc:  # noqa: BLE001 — the batch fails, the worker lives
                log.exception("batch.crashed arrivals=%s", [item.arrival["id"] for item in prepared.opened])
                crash = f"internal error: {type(exc).__name__}: {exc}"
        if crash is None and not prepared.interrupted():
            for job in prepared.jobs:
                job.item.done.append(self._write_study(job.item, job.run.ctx.study, job.run.ctx,
                                                       job.json_path, job.run.outcome()))
        opened = {item.arrival["id"]: item for item in prepared.opened}
        finals: dict[int, str] = {}
        for arrival in prepared.arrivals:
            item = opened.get(arrival["id"])
            if arrival["id"] in prepared.rejected:
                reason, state = prepared.rejected[arrival["id"]]
                finals[arrival["id"]] = self._reject(arrival, self.locate(arrival), reason, state)
            elif crash is not None:
                finals[arrival["id"]] = self._reject(arrival, item.path if item else self.locate(arrival),
                                                     crash, "failed")
            elif prepared.interrupted() or item is None:
                finals[arrival["id"]] = self._release(arrival)
            else:
                finals[arrival["id"]] = self._accept(arrival, item.path, item.done, item.skipped)
        return [finals[arrival["id"]] for arrival in prepared.arrivals]

    def _open(self, arrival: dict[str, Any], stack: ExitStack) -> _Opened:
        path = self.locate(arrival)
        if path is None:
            raise IngestError(f"the input {arrival['name']} is no longer at {arrival['current_path']} "
                              "(moved or deleted outside ctwatch)")
        contents = stack.enter_context(open_arrival(path, self.limits))
        scan = scan_members(contents.members)
        skipped = contents.skipped + scan.skipped
        if not scan.studies:
            raise IngestError(_no_dicom_message(len(contents.members), skipped))
        return _Opened(arrival, path, scan.studies, skipped, scan.dicom_files)

    def _release(self, arrival: dict[str, Any]) -> str:
        self.state.release(arrival["id"])
        log.info("arrival.released arrival=%s reason=shutdown", arrival["id"])
        return "pending"

    # ------------------------------------------------------------------ studies
    def _reader(self) -> State:
        """This thread's connection: the worker's own, or one opened for a prefetch thread."""
        if threading.get_ident() == self._owner_thread:
            return self.state
        reader = getattr(self._local, "state", None)
        if reader is None:
            reader = self._local.state = State(self.state.path)
            self._extra_states.append(reader)
        return reader

    def close(self) -> None:
        """Close the connections opened for prefetch threads (after those threads are joined)."""
        for extra in self._extra_states:
            extra.close()
        self._extra_states.clear()

    def json_path_for(self, arrival: dict[str, Any], study_uid: str, taken: set[Path] | None = None) -> Path:
        day = datetime.fromisoformat(arrival["created_at"]).astimezone().date()
        safe_uid = study_uid if all(c.isdigit() or c == "." for c in study_uid) else "invalid-uid"
        path = self.outbox / day.isoformat() / f"{safe_uid}.json"
        owner = self._reader().json_path_owner(str(path))
        if (owner is not None and owner != (arrival["id"], study_uid)) or path in (taken or set()):
            path = path.with_name(f"{safe_uid}.a{arrival['id']}.json")
        return path

    def _start_studies(self, prepared: Prepared, should_stop: Callable[[], bool]) -> None:
        taken: set[Path] = set()
        for item in prepared.opened:
            for study in item.studies:
                json_path = self.json_path_for(item.arrival, study.uid, taken)
                taken.add(json_path)
                ctx = StudyContext(item.arrival["id"], study, json_path.with_suffix(""))
                prepared.jobs.append(_Job(item, StudyRun(ctx), json_path))
        if should_stop():
            prepared.stopped = True
            return
        step_stop = (lambda: False) if self.finish_study_on_stop else should_stop
        self.runner.advance([job.run for job in prepared.jobs], 0, self.runner.gpu_stage_start(), step_stop)

    def _write_study(self, item: _Opened, study: Study, ctx: StudyContext, json_path: Path,
                     outcome: StudyOutcome) -> StudyDone:
        arrival = item.arrival
        seconds = sum(r.seconds for r in outcome.steps)
        steps = [r.as_dict() for r in outcome.steps]
        result = build_result(
            study_uid=study.uid, accession=study.accession, outcome_status=outcome.status,
            error=outcome.error, seconds=seconds, sections=ctx.result, steps=steps,
            source=_source(arrival), device=self.device, warnings=ctx.warnings, finished_at=utcnow(),
            pipeline={"name": self.pipeline.name, "version": self.pipeline.version,
                      "digest": self.pipeline.digest},
            dicom={"instances_in_arrival": item.n_dicom, "instances_in_study": study.instance_count,
                   "series_in_study": len(study.series), "skipped": dict(item.skipped)})
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
                self._reader().update_arrival(arrival["id"], current_path=str(candidate))
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
    return {"kind": arrival["kind"], "name": arrival["name"], "name_bytes": arrival.get("name_bytes"),
            "sha256": arrival["sha256"],
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
                 clock: Callable[[], datetime] = datetime.now, night_batch: int = 1,
                 max_inflight: int = 0) -> None:
        self.state_path = state_path
        self.night_batch = night_batch
        self.max_inflight = max_inflight
        self.prefetcher: Prefetcher | None = None
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
        claimed: set[int] = set()
        pool = (Prefetcher(lambda batch: executor.prepare(batch, self.stop_event.is_set), self.max_inflight)
                if self.max_inflight > 0 else None)
        self.prefetcher = pool
        try:
            while not self.stop_event.is_set():
                self.last_beat = time.time()
                if pool is None:
                    handled = self._run_sequential(state, executor, claimed)
                else:
                    handled = self._run_prefetched(pool, state, executor, claimed)
                if not handled:
                    self.idle_passes += 1
                    self.wake_event.wait(self.poll_seconds)
                    self.wake_event.clear()
        finally:
            if pool is not None:
                pool.close()
            for arrival_id in sorted(claimed):  # prefetched but never completed: back to the queue
                state.release(arrival_id)
                log.info("arrival.released arrival=%s reason=shutdown prefetched=true", arrival_id)
            getattr(executor, "close", lambda: None)()
            state.close()

    def _run_sequential(self, state: State, executor: Executor, claimed: set[int]) -> int:
        batch = self._next_batch(state)
        if batch is None:
            return 0
        claimed.update(a["id"] for a in batch)
        self._finish(batch, lambda: executor.process_many(batch, self.stop_event.is_set), claimed)
        return 1

    def _run_prefetched(self, pool: Prefetcher, state: State, executor: Executor, claimed: set[int]) -> int:
        """CPU stage of the next batches in the prefetch thread while this thread runs the GPU stage."""
        handled = 0
        for item in pool.map(self._batches(state, claimed)):
            batch = item.job
            prepared = item.value if item.error is None else Prepared(
                batch, crash=f"internal error: {type(item.error).__name__}: {item.error}")
            self._finish(batch, lambda prepared=prepared: executor.complete(prepared, self.stop_event.is_set),
                         claimed)
            handled += 1
            if self.stop_event.is_set():
                break
        return handled

    def _batches(self, state: State, claimed: set[int]) -> Iterator[list[dict[str, Any]]]:
        """Claimed batches while there is work; ends (for now) when the queue is empty."""
        while not self.stop_event.is_set():
            batch = self._next_batch(state)
            if batch is None:
                return
            claimed.update(a["id"] for a in batch)
            yield batch

    def _next_batch(self, state: State) -> list[dict[str, Any]] | None:
        try:
            arrival = self._claim(state)
        except sqlite3.Error:  # e.g. the disk filled up under SQLite; wait and try again
            log.exception("worker.claim_failed db=%s", self.state_path)
            return None
        if arrival is None:
            return None
        return [arrival] + (self._claim_night_batch(state) if arrival["night"] else [])

    def _finish(self, batch: list[dict[str, Any]], run: Callable[[], list[str]], claimed: set[int]) -> None:
        self.current, self.current_since = batch[0]["id"], time.time()
        outcomes = run()
        self.current = self.current_since = None
        claimed.difference_update(a["id"] for a in batch)
        self.processed += len(batch)
        if self.on_processed is not None:
            for arrival, outcome in zip(batch, outcomes, strict=True):
                self.on_processed(arrival["id"], outcome)

    def _claim_night_batch(self, state: State) -> list[dict[str, Any]]:
        """More night arrivals to run model-major with the first, while the day queue is empty."""
        more: list[dict[str, Any]] = []
        while len(more) + 1 < self.night_batch and self.can_claim():
            arrival = state.claim_next_until(self.night_cutoff(self.clock()))
            if arrival is None:
                break
            if not arrival["night"]:  # a day arrival came in: it must not wait for the batch
                state.release(arrival["id"])
                break
            more.append(arrival)
        return more

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
