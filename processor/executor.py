"""The executor seam: what runs claimed arrivals, behind a protocol the worker speaks.

The worker hands an executor :class:`~processor.state.Arrival` records and gets back an opaque
prepared handle (:meth:`Executor.prepare`, the CPU stage: read, scan, the steps before the first
GPU step) and then each arrival's final state (:meth:`Executor.complete`: the GPU steps and the
recorded end). :class:`LocalExecutor` runs both in this process; another backend (Dask GPU
workers) implements the same three methods while the coordinator's recorder stays the only
writer of SQLite and the outbox.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from processor.dicom.encoding import plain_cause
from processor.dicom.scan import VALUE_ERRORS, CorruptDicom, Study
from processor.dicom.sendback import SourceStudy
from processor.errors import IngestError
from processor.executor_read import (
    SLOW_INPUT,
    EarlierPartFault,
    EarlierPartUnreadable,
    StopCheck,
    Stopped,
    no_dicom_message,
    read_earlier,
    scan_input,
)
from processor.faults import fault_point
from processor.intake.archive import Limits
from processor.intake.late_series import LatePlanner, series_instances, sop_digests
from processor.outputs.recorder import FinishedStudy, StudyRecorder
from processor.outputs.versions import Lineage, SetAside
from processor.pipeline.runner import PipelineRunner, StudyRun
from processor.pipeline.spec import Pipeline
from processor.pipeline.step import StudyContext
from processor.provenance import software_versions
from processor.state import Arrival, State
from processor.vocab import ArrivalState, LateSeries, StudyStatus

log = logging.getLogger(__name__)


def _never() -> bool:
    return False


class Handle(Protocol):
    """What :meth:`Executor.prepare` returns: opaque to the worker but for the arrivals it holds."""

    arrivals: Sequence[Arrival]


class Executor(Protocol):
    """Runs claimed arrivals: a CPU stage, then a GPU stage with the recorded end."""

    def prepare(self, arrivals: Sequence[Arrival], should_stop: StopCheck = _never) -> Handle: ...

    def complete(self, handle: Handle, should_stop: StopCheck = _never) -> list[ArrivalState]: ...

    def fail(self, arrivals: Sequence[Arrival], reason: str) -> list[ArrivalState]:
        """Record arrivals whose stage could not run at all (an error outside any study)."""
        ...

    def close(self) -> None: ...


@dataclass
class _Opened:
    """An arrival whose archive was opened and scanned, with the studies to analyse (a late series:
    merged with the earlier parts) and those set aside (:mod:`processor.intake.late_series`)."""

    arrival: Arrival
    studies: list[Study]
    skipped: Counter[str]
    n_dicom: int
    runs: list[tuple[StudyRun, Path]] = field(default_factory=list)
    lineage: dict[str, Lineage] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)
    set_aside: list[SetAside] = field(default_factory=list)


@dataclass(frozen=True)
class RanOn:
    """Where a batch's steps ran, when another process ran them: ``device`` (``cpu``, ``cuda:0``)
    and ``software`` (:func:`~processor.provenance.software_versions` there)."""

    device: str
    software: dict[str, str]


@dataclass
class Prepared:
    """:class:`LocalExecutor`'s handle: arrivals after the CPU stage."""

    arrivals: Sequence[Arrival]
    opened: list[_Opened] = field(default_factory=list)
    rejected: dict[int, tuple[str, ArrivalState]] = field(default_factory=dict)  # id → (reason, final state)
    crash: str | None = None
    stopped: bool = False
    gpu_done: bool = False  # every step already ran (on a Dask worker): complete() only records
    # where the steps ran when not here (a Dask worker): its device and software versions, recorded
    # in place of this process's (``device`` in the result JSON; each feature's provenance)
    ran_on: RanOn | None = None

    @property
    def runs(self) -> list[StudyRun]:
        return [run for item in self.opened for run, _ in item.runs]

    def interrupted(self) -> bool:
        return self.stopped or any(run.interrupted for run in self.runs)


class LocalExecutor:
    """Runs the pipeline in this process (see the module docstring).

    ``finish_study_on_stop`` (``worker.shutdown: study``) lets a running study finish its steps after
    a stop request; the stop then takes effect before the next study. Reading an arrival (opening it
    and scanning its headers) always stops at a stop request, and is refused once it has taken
    ``limits.max_seconds_per_arrival`` by ``clock`` (seconds): both are checked at every chunk read.
    ``late_series``: what becomes of images of a study analysed before (:class:`LatePlanner`). Each
    earlier part of a study read again gets a time limit of its own, the same
    ``limits.max_seconds_per_arrival`` (it was read within it when it was analysed), after its
    sha256 is checked against the one recorded then (not timed, like the hash at registration).
    """

    def __init__(
        self,
        pipeline: Pipeline,
        recorder: StudyRecorder,
        *,
        limits: Limits,
        finish_study_on_stop: bool = False,
        clock: Callable[[], float] = time.monotonic,
        late_series: LateSeries = LateSeries.NEW_VERSION,
    ) -> None:
        self.pipeline = pipeline
        self.planner = LatePlanner(recorder.state, late_series, pipeline.name, pipeline.version)
        self.runner = PipelineRunner(pipeline)
        self.recorder = recorder
        self.limits = limits
        self.finish_study_on_stop = finish_study_on_stop
        self.clock = clock

    @property
    def state(self) -> State:
        return self.recorder.state

    def close(self) -> None:
        """Nothing held between calls (models live in the shared cache)."""

    # ------------------------------------------------------------------ both stages
    def process(self, arrival: Arrival, should_stop: StopCheck = _never) -> ArrivalState:
        return self.process_many([arrival], should_stop)[0]

    def process_many(
        self, arrivals: Sequence[Arrival], should_stop: StopCheck = _never
    ) -> list[ArrivalState]:
        """Claimed arrivals together; their studies go through the pipeline model-major.

        Returns each arrival's final state (``pending`` when a shutdown interrupted it).
        """
        return self.complete(self.prepare(arrivals, should_stop), should_stop)

    # ------------------------------------------------------------------ CPU stage
    def prepare(self, arrivals: Sequence[Arrival], should_stop: StopCheck = _never) -> Prepared:
        """Open and scan the arrivals, run the steps before the first GPU step.

        Safe in a prefetch thread: it reads state and writes only the studies' preview files; every
        outcome is recorded by :meth:`complete` on the worker thread. Archives are closed on return.
        The same three phases run split across processes in the CPU worker pool
        (:mod:`processor.cpupool`): :meth:`open_batch` and :meth:`run_cpu_steps` in a pool process,
        the result paths reserved (:meth:`reserve_paths`) here, by the one recorder.
        """
        with ExitStack() as stack:
            prepared = self.open_batch(arrivals, stack, should_stop, self.recorder.locate)
            if not prepared.stopped:
                self.attach_paths(prepared, self.reserve_paths(study_keys(prepared)))
                self.run_cpu_steps(prepared, should_stop)
        return prepared

    def open_batch(
        self,
        arrivals: Sequence[Arrival],
        stack: ExitStack,
        should_stop: StopCheck,
        locate: Callable[[Arrival], Path | None],
    ) -> Prepared:
        """Open and scan each arrival (open while ``stack`` is), and plan its studies; an input that
        cannot be read is recorded in ``rejected``. ``locate``: where an arrival's input is now."""
        prepared = Prepared(arrivals)
        for arrival in arrivals:
            log.info(
                "arrival.start arrival=%s name=%s attempt=%s", arrival.id, arrival.name, arrival.attempts
            )
            try:
                prepared.opened.append(self._open(arrival, locate(arrival), stack, should_stop))
            except Stopped:
                log.info("arrival.read_stopped arrival=%s", arrival.id)
                prepared.stopped = True
                break
            except EarlierPartFault:  # the world, not the input: the caller sends the batch back
                raise
            except EarlierPartUnreadable as exc:
                prepared.rejected[arrival.id] = (str(exc), ArrivalState.FAILED)
            except IngestError as exc:
                prepared.rejected[arrival.id] = (str(exc), ArrivalState.QUARANTINED)
            except sqlite3.Error:  # the database, not the input: the worker sends the batch back
                raise
            except Exception as exc:  # a bug must not kill the worker; the arrival is kept, marked failed
                log.exception("arrival.crashed arrival=%s", arrival.id)
                prepared.rejected[arrival.id] = (
                    f"internal error: {type(exc).__name__}: {exc}",
                    ArrivalState.FAILED,
                )
        return prepared

    def _open(self, arrival: Arrival, path: Path | None, stack: ExitStack, should_stop: StopCheck) -> _Opened:
        if path is None:
            raise IngestError(
                f"the input {arrival.name} is no longer at {arrival.current_path} "
                "(moved or deleted outside ctwatch)"
            )
        contents, scan = scan_input(
            path, arrival.name, stack, should_stop, SLOW_INPUT, self.limits, self.clock
        )
        skipped = contents.skipped + scan.skipped
        if not scan.studies:
            raise IngestError(no_dicom_message(contents, skipped))
        plan = self.planner.plan(
            arrival,
            scan.studies,
            lambda earlier: read_earlier(
                self.recorder, arrival, earlier, stack, should_stop, self.limits, self.clock
            ),
        )
        return _Opened(
            arrival,
            plan.studies,
            skipped,
            scan.dicom_files,
            lineage=plan.lineage,
            warnings=plan.warnings,
            set_aside=plan.set_aside,
        )

    def _step_stop(self, should_stop: StopCheck) -> StopCheck:
        return _never if self.finish_study_on_stop else should_stop

    def reserve_paths(self, keys: Sequence[tuple[Arrival, str]]) -> list[Path]:
        """The result JSON path of each (arrival, StudyInstanceUID), in order, reserved by the
        recorder (two arrivals in flight never share one; see :meth:`StudyRecorder.json_path`)."""
        taken: set[Path] = set()
        paths = []
        for arrival, study_uid in keys:
            path = self.recorder.json_path(arrival, study_uid, taken)
            taken.add(path)
            paths.append(path)
        return paths

    @staticmethod
    def attach_paths(prepared: Prepared, paths: Sequence[Path]) -> None:
        """Give each study of ``prepared`` (in :func:`study_keys` order) its run and result path."""
        given = iter(paths)
        for item in prepared.opened:
            for study in item.studies:
                json_path = next(given)
                ctx = StudyContext(item.arrival.id, study, json_path.with_suffix(""))
                ctx.warnings.extend(item.warnings.get(study.uid, []))
                item.runs.append((StudyRun(ctx), json_path))

    def run_cpu_steps(self, prepared: Prepared, should_stop: StopCheck) -> None:
        """The steps before the first GPU step, over every study of ``prepared``; a bug outside any
        step is kept in ``prepared.crash`` and applied to the batch by :meth:`complete`."""
        try:
            if should_stop():
                prepared.stopped = True
                return
            for item in prepared.opened:
                fault_point("study.started", item.arrival.name)
            self.runner.advance(prepared.runs, 0, self.runner.gpu_stage_start(), self._step_stop(should_stop))
            if not prepared.interrupted():
                self.runner.prepare_gpu_steps(prepared.runs)
        except sqlite3.Error:  # the database, not the input: the worker sends the batch back
            raise
        except Exception as exc:  # noqa: BLE001 — recorded and applied to the batch in complete()
            log.exception("batch.crashed arrivals=%s", [item.arrival.id for item in prepared.opened])
            prepared.crash = f"internal error: {type(exc).__name__}: {exc}"

    # ------------------------------------------------------------------ GPU stage and the end
    def complete(self, handle: Handle, should_stop: StopCheck = _never) -> list[ArrivalState]:
        """The GPU steps, then the recorded end of every arrival in the handle."""
        assert isinstance(handle, Prepared), type(handle)
        prepared = handle
        crash = prepared.crash
        sent_back = self._superseded_meanwhile(prepared) if crash is None else set()
        if crash is None and not prepared.interrupted() and not prepared.gpu_done:
            try:
                self.runner.advance(
                    prepared.runs,
                    self.runner.gpu_stage_start(),
                    len(self.pipeline.steps),
                    self._step_stop(should_stop),
                )
            except Exception as exc:  # noqa: BLE001 — the batch fails, the worker lives
                log.exception("batch.crashed arrivals=%s", [item.arrival.id for item in prepared.opened])
                crash = f"internal error: {type(exc).__name__}: {exc}"
        opened = {item.arrival.id: item for item in prepared.opened}
        finals: list[ArrivalState] = []
        for arrival in prepared.arrivals:
            item = opened.get(arrival.id)
            if arrival.id in prepared.rejected:
                reason, state = prepared.rejected[arrival.id]
                finals.append(self.recorder.reject(arrival, reason, state))
            elif arrival.id in sent_back:
                finals.append(self._release(arrival, "superseded_meanwhile"))
            elif crash is not None:
                finals.append(self.recorder.reject(arrival, crash, ArrivalState.FAILED))
            elif prepared.interrupted() or item is None:
                finals.append(self._release(arrival))
            else:
                finished = [
                    _finished(run, path, item, self._patient_key(run.ctx.study), prepared.ran_on)
                    for run, path in item.runs
                ]
                finals.append(self.recorder.accept(arrival, finished, item.skipped, item.set_aside))
        return finals

    def _superseded_meanwhile(self, prepared: Prepared) -> set[int]:
        """Arrivals whose plan is out of date before their GPU stage (another arrival of one of their
        studies was recorded since, e.g. while this one was prefetched): dropped from the handle, to
        be sent back and run again with that result. The recorder checks again in its transaction."""
        stale = {
            item.arrival.id
            for item in prepared.opened
            for study_uid, lineage in item.lineage.items()
            if sorted(lineage.supersedes)
            != [c.arrival_id for c in self.state.current_versions(study_uid, excluding=item.arrival.id)]
        }
        prepared.opened = [item for item in prepared.opened if item.arrival.id not in stale]
        return stale

    def _patient_key(self, study: Study) -> str:
        """The study's patient pseudonym (the PatientID itself goes no further than this call);
        "" when its DICOM has no PatientID, so that NULL keeps meaning "not recorded" (studies
        processed before migration 0009), which the fit commands refuse to group silently."""
        return self.state.patient_key(study.patient_id, study.issuer_of_patient_id) or ""

    def fail(self, arrivals: Sequence[Arrival], reason: str) -> list[ArrivalState]:
        return [self.recorder.reject(arrival, reason, ArrivalState.FAILED) for arrival in arrivals]

    def _release(self, arrival: Arrival, reason: str = "shutdown") -> ArrivalState:
        self.recorder.release(arrival)
        self.state.release(arrival.id)
        log.info("arrival.released arrival=%s reason=%s", arrival.id, reason)
        return ArrivalState.PENDING


def study_keys(prepared: Prepared) -> list[tuple[Arrival, str]]:
    """Each study of ``prepared`` as (its arrival, its StudyInstanceUID), in the order of the runs."""
    return [(item.arrival, study.uid) for item in prepared.opened for study in item.studies]


# What the recorder reads of a study's values (:func:`_finished`); a Dask worker sends back only these.
RECORDED_VALUES = ("ctclip_latent", "features", "feature_models", "latent_models")


def _finished(
    run: StudyRun, json_path: Path, item: _Opened, patient_key: str | None, ran_on: RanOn | None = None
) -> FinishedStudy:
    """A study's outcome as the recorder takes it: sections, declared ports with their provenance
    (the ports' companion values, see :mod:`processor.steps.ports`), step records."""
    ctx, outcome = run.ctx, run.outcome()
    study = ctx.study
    latent = ctx.values.get("ctclip_latent")
    features = dict(ctx.values.get("features") or {})
    feature_models = ctx.values.get("feature_models") or {}
    latent_models = ctx.values.get("latent_models") or {}
    source, source_problem = _source_study(study, (ctx.result.get("series_selection") or {}).get("chosen"))
    return FinishedStudy(
        study_uid=study.uid,
        accession=study.accession,
        status=StudyStatus(outcome.status),
        error=outcome.error,
        json_path=json_path,
        sections=ctx.result,
        steps=[r.as_dict() for r in outcome.steps],
        warnings=ctx.warnings,
        features=features,
        latents={"ctclip": latent} if latent is not None else {},
        feature_models={name: feature_models.get(name) for name in features},
        latent_models={"ctclip": latent_models.get("ctclip")} if latent is not None else {},
        software=ran_on.software if ran_on is not None else software_versions(),
        device=ran_on.device if ran_on is not None else None,
        patient_key=patient_key,
        lineage=item.lineage.get(study.uid, Lineage(input_ids=(item.arrival.id,))),
        series_instances=series_instances(study),
        sop_digests=sop_digests(study),
        source=source,
        source_problem=source_problem,
        dicom={
            "instances_in_arrival": item.n_dicom,
            "instances_in_study": study.instance_count,
            "series_in_study": len(study.series),
            "skipped": dict(item.skipped),
        },
    )


def _source_study(study: Study, series_uid: str | None) -> tuple[SourceStudy | None, str | None]:
    """What send-back objects copy from the study, or None and why (a header that no longer reads)."""
    try:
        return SourceStudy.from_study(study, series_uid), None
    except CorruptDicom as exc:
        return None, f"the input's header could not be read again: {exc}"
    except VALUE_ERRORS as exc:  # a value of the modules copied that pydicom cannot read
        return None, f"a value of the input's header the objects copy cannot be read: {plain_cause(exc)}"
