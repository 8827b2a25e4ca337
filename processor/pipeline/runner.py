"""Run a compiled pipeline over studies: weights check, timing, status per step, study status.

Studies can go through one at a time (*study-major*, :meth:`PipelineRunner.run`) or together
(*model-major*, :meth:`PipelineRunner.run_many`): each step then runs over every live study before
the next step starts, through the step's ``run_batch`` (one model load, shared micro-batches).
Both orders give the same results; the steps of a pipeline can also be advanced in stages
(:meth:`PipelineRunner.advance`), so the CPU steps of the next studies may run while the GPU steps
of the current ones do. A step whose weight files are absent is skipped (or fails the study, with
``on_missing_weights: fail``); one whose files cannot even be listed (an unreadable weight index)
fails with ``model_unusable``, as a model that does not load would. A step whose ``needs`` are
missing (an earlier step was skipped) is skipped too; a value a step provides is checked against
its port's type (``isinstance``), and a wrong one fails that step.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial

from processor.errors import ResourceExhaustedError, StepError, WeightsError, WithheldError
from processor.pipeline.spec import CompiledStep, Pipeline
from processor.pipeline.step import Step, StudyContext
from processor.pipeline.weightfiles import weight_files_now
from processor.vocab import StepProblem, StepStatus, StudyStatus

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step_id: str
    uses: str
    status: StepStatus
    seconds: float = 0.0
    error: str | None = None  # why the step failed (status failed); None for any other status
    missing: list[str] = field(default_factory=list)  # absent weight files behind a skip or failure
    problem: StepProblem | None = None  # the category of ``error`` or ``reason`` (None when done)
    reason: str | None = None  # why it did not run (status skipped or not_run); None otherwise

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudyOutcome:
    status: StudyStatus
    error: str | None
    steps: list[StepRecord]
    interrupted: bool = False


@dataclass
class StudyRun:
    """One study's progress through the pipeline."""

    ctx: StudyContext
    records: list[StepRecord] = field(default_factory=list)
    error: str | None = None
    partial: bool = False
    interrupted: bool = False

    def outcome(self) -> StudyOutcome:
        if self.interrupted:
            return StudyOutcome(
                StudyStatus.FAILURE, "interrupted by shutdown", self.records, interrupted=True
            )
        status = (
            StudyStatus.FAILURE
            if self.error
            else (StudyStatus.PARTIAL if self.partial else StudyStatus.SUCCESS)
        )
        return StudyOutcome(status, self.error, self.records)


class PipelineRunner:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def run(self, ctx: StudyContext, should_stop: Callable[[], bool] = lambda: False) -> StudyOutcome:
        """Run every step in order on one study; ``should_stop`` is checked between steps."""
        return self.run_many([ctx], should_stop)[0]

    def run_many(
        self, ctxs: Sequence[StudyContext], should_stop: Callable[[], bool] = lambda: False
    ) -> list[StudyOutcome]:
        """Model-major: each step over every live study, then the next step."""
        runs = [StudyRun(ctx) for ctx in ctxs]
        self.advance(runs, 0, len(self.pipeline.steps), should_stop)
        return [run.outcome() for run in runs]

    def gpu_stage_start(self) -> int:
        """Index of the first GPU step (everything before it is CPU work that may be prefetched)."""
        for index, compiled in enumerate(self.pipeline.steps):
            if compiled.step.device == "gpu":
                return index
        return len(self.pipeline.steps)

    def advance(
        self, runs: Sequence[StudyRun], start: int, stop: int, should_stop: Callable[[], bool] = lambda: False
    ) -> None:
        """Run steps ``[start, stop)`` over ``runs``; records land on each run."""
        for compiled in self.pipeline.steps[start:stop]:
            if should_stop():
                for run in runs:
                    run.interrupted = True
                return
            live = [run for run in runs if run.error is None and not run.interrupted]
            for run in runs:
                if run.error is not None:
                    run.records.append(
                        StepRecord(
                            compiled.id,
                            compiled.uses,
                            StepStatus.NOT_RUN,
                            reason="an earlier step failed",
                            problem=StepProblem.EARLIER_FAILED,
                        )
                    )
            if live and self._weights_ready(compiled, live):
                self._run_step(compiled, [run for run in live if self._inputs_ready(compiled, run)])

    def prepare_gpu_steps(self, runs: Sequence[StudyRun]) -> None:
        """The CPU part of each GPU step (:meth:`Step.prepare`) over the studies it will run on,
        at the end of the CPU stage. Only steps whose weight files are all there, on studies with
        no error and whose needs are met; an error is logged and left to the step's own run."""
        for compiled in self.pipeline.steps[self.gpu_stage_start() :]:
            if type(compiled.step).prepare is Step.prepare:
                continue
            weights = weight_files_now(compiled.step)
            if weights.why is not None or weights.missing:
                continue
            for run in runs:
                if run.error is not None or run.interrupted:
                    continue
                if any(port.name not in run.ctx.values for port in compiled.step.needs):
                    continue
                try:
                    compiled.step.prepare(run.ctx)
                except Exception:  # noqa: BLE001 — the step's run meets it again and reports it
                    log.warning(
                        "step.prepare_failed study=%s step=%s: left to the step",
                        run.ctx.label,
                        compiled.id,
                        exc_info=True,
                    )

    def _weights_ready(self, compiled: CompiledStep, live: list[StudyRun]) -> bool:
        weights = weight_files_now(compiled.step)
        if weights.why is not None:
            self._unusable(compiled, live, weights.why)
            return False
        missing = [str(p) for p in weights.missing]
        if not missing:
            return True
        reason = "weights not installed: " + ", ".join(missing)
        fail = self.pipeline.on_missing_weights == "fail"
        for run in live:
            run.records.append(
                StepRecord(
                    compiled.id,
                    compiled.uses,
                    StepStatus.FAILED if fail else StepStatus.SKIPPED,
                    error=reason if fail else None,
                    reason=None if fail else reason,
                    missing=missing,
                    problem=StepProblem.MODEL_MISSING,
                )
            )
            if fail:
                run.error = f"{reason} (in step {compiled.id}; the pipeline sets on_missing_weights: fail)"
            else:
                run.partial = True
            log.info("step.skipped study=%s step=%s reason=%r", run.ctx.label, compiled.id, reason)
        return False

    @staticmethod
    def _unusable(compiled: CompiledStep, live: list[StudyRun], why: str) -> None:
        """The step's model files cannot even be listed (an unreadable weight index): it fails on
        every study, as a model that does not load would; the study is Partial when the step is
        optional, a Failure otherwise."""
        for run in live:
            run.records.append(
                StepRecord(
                    compiled.id,
                    compiled.uses,
                    StepStatus.FAILED,
                    error=why,
                    problem=StepProblem.MODEL_UNUSABLE,
                )
            )
            log.warning("step.failed study=%s step=%s seconds=0.00 error=%r", run.ctx.label, compiled.id, why)
            if compiled.spec.optional:
                run.partial = True
            else:
                run.error = f"{why} (in step {compiled.id})"

    def _inputs_ready(self, compiled: CompiledStep, run: StudyRun) -> bool:
        missing = [port.name for port in compiled.step.needs if port.name not in run.ctx.values]
        if not missing:
            return True
        reason = f"needs {', '.join(missing)}, which an earlier skipped step did not provide"
        run.records.append(
            StepRecord(
                compiled.id,
                compiled.uses,
                StepStatus.SKIPPED,
                reason=reason,
                problem=StepProblem.NEEDS_SKIPPED,
            )
        )
        run.partial = True
        log.info("step.skipped study=%s step=%s reason=%r", run.ctx.label, compiled.id, reason)
        return False

    def _run_step(self, compiled: CompiledStep, runs: list[StudyRun]) -> None:
        """A batched step takes every study in one call; any other step runs (and fails) per study."""
        if compiled.step.batched and len(runs) > 1:
            self._invoke(compiled, runs, lambda: compiled.step.run_batch([run.ctx for run in runs]))
            return
        for run in runs:
            self._invoke(compiled, [run], partial(compiled.step.run, run.ctx))

    def _invoke(self, compiled: CompiledStep, runs: list[StudyRun], call: Callable[[], None]) -> None:
        started = time.perf_counter()
        failure: str | None = None
        kind = StepProblem.INTERNAL
        exhausted = False
        try:
            call()
        except WithheldError as exc:
            self._withheld(compiled, runs, str(exc), (time.perf_counter() - started) / len(runs))
            return
        except (StepError, WeightsError) as exc:
            failure, exhausted = str(exc), isinstance(exc, ResourceExhaustedError)
            kind = StepProblem.MODEL_UNUSABLE if isinstance(exc, WeightsError) else StepProblem.STUDY
        except Exception as exc:  # a bug or library error must fail the studies, not the daemon
            exhausted = _is_out_of_memory(exc)
            if not exhausted:
                log.exception("step.crashed step=%s studies=%d", compiled.id, len(runs))
            failure = (
                f"out of memory on the GPU, even one study at a time ({type(exc).__name__}: {exc})"
                if exhausted
                else f"internal error ({type(exc).__name__}: {exc}); see the log and please report it"
            )
        if exhausted:
            kind = StepProblem.OUT_OF_MEMORY
            _trim_models(compiled)
        seconds = (time.perf_counter() - started) / len(runs)
        for run in runs:
            error = failure if failure is not None else _wrong_type(compiled, run.ctx)
            if error is None:
                run.records.append(StepRecord(compiled.id, compiled.uses, StepStatus.DONE, seconds))
                log.info("step.done study=%s step=%s seconds=%.2f", run.ctx.label, compiled.id, seconds)
                continue
            run.records.append(
                StepRecord(
                    compiled.id,
                    compiled.uses,
                    StepStatus.FAILED,
                    seconds,
                    error,
                    problem=kind if failure is not None else StepProblem.INTERNAL,
                )
            )
            log.warning(
                "step.failed study=%s step=%s seconds=%.2f error=%r",
                run.ctx.label,
                compiled.id,
                seconds,
                error,
            )
            if compiled.spec.optional or exhausted:
                run.partial = True  # out of memory even at batch 1: this step's result is missing only
            else:
                run.error = f"{error} (in step {compiled.id})"

    @staticmethod
    def _withheld(compiled: CompiledStep, runs: list[StudyRun], reason: str, seconds: float) -> None:
        for run in runs:
            run.records.append(
                StepRecord(
                    compiled.id,
                    compiled.uses,
                    StepStatus.SKIPPED,
                    seconds,
                    reason=reason,
                    problem=StepProblem.WITHHELD,
                )
            )
            run.partial = True
            log.info("step.skipped study=%s step=%s reason=%r", run.ctx.label, compiled.id, reason)


def _wrong_type(compiled: CompiledStep, ctx: StudyContext) -> str | None:
    """A provided value whose type is not its port's (a bug in the step: the study fails, not later steps)."""
    for port in compiled.step.provides:
        if port.name in ctx.values and not isinstance(ctx.values[port.name], port.type):
            found = type(ctx.values[port.name]).__name__
            return (
                f"internal error (a bug in step {compiled.uses!r}): provided {port.name!r} as {found}, "
                f"but the step declares it as {port.type.__name__}. Fix: report it."
            )
    return None


def _is_out_of_memory(exc: BaseException) -> bool:
    """CUDA out of memory (torch is only consulted when something already imported it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError)


def _trim_models(compiled: CompiledStep) -> None:
    """After an out-of-memory failure, give memory back before the next step or study."""
    trim = getattr(compiled.step.env.models, "trim", None)
    if callable(trim):
        trim()
