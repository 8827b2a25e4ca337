"""Run a compiled pipeline over one study: weights check, timing, status per step, study status."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from processor.errors import StepError, WeightsError
from processor.pipeline.spec import Pipeline
from processor.pipeline.step import StudyContext

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    step_id: str
    uses: str
    status: str  # done | skipped | failed | not_run
    seconds: float = 0.0
    error: str | None = None
    missing: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class StudyOutcome:
    status: str  # Success | Partial | Failure
    error: str | None
    steps: list[StepRecord]
    interrupted: bool = False


class PipelineRunner:
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    def run(self, ctx: StudyContext, should_stop: Callable[[], bool] = lambda: False) -> StudyOutcome:
        """Run every step in order; ``should_stop`` is checked between steps (clean shutdown)."""
        records: list[StepRecord] = []
        error: str | None = None
        partial = False
        for compiled in self.pipeline.steps:
            step, sid = compiled.step, compiled.id
            if should_stop():
                return StudyOutcome("Failure", "interrupted by shutdown", records, interrupted=True)
            if error is not None:
                records.append(StepRecord(sid, compiled.uses, "not_run", error="an earlier step failed"))
                continue
            missing = [str(p) for p in step.weight_files() if not p.exists()]
            if missing:
                reason = "weights not installed: " + ", ".join(missing)
                if self.pipeline.on_missing_weights == "fail":
                    error = f"step {sid}: {reason} (pipeline sets on_missing_weights: fail)"
                    records.append(StepRecord(sid, compiled.uses, "failed", error=reason, missing=missing))
                else:
                    records.append(StepRecord(sid, compiled.uses, "skipped", error=reason, missing=missing))
                    partial = True
                log.info("step.skipped study=%s step=%s reason=%r", ctx.label, sid, reason)
                continue
            missing_inputs = [n for n in step.needs if n not in ctx.values]
            if missing_inputs:
                reason = f"needs {', '.join(missing_inputs)}, which an earlier skipped step did not provide"
                records.append(StepRecord(sid, compiled.uses, "skipped", error=reason))
                log.info("step.skipped study=%s step=%s reason=%r", ctx.label, sid, reason)
                partial = True
                continue
            record, failure = self._run_step(compiled, ctx)
            records.append(record)
            if failure is not None:
                if compiled.spec.optional:
                    partial = True
                else:
                    error = failure
        status = "Failure" if error else ("Partial" if partial else "Success")
        return StudyOutcome(status, error, records)

    def _run_step(self, compiled, ctx: StudyContext) -> tuple[StepRecord, str | None]:
        sid = compiled.id
        started = time.perf_counter()
        try:
            compiled.step.run(ctx)
        except (StepError, WeightsError) as exc:
            seconds = time.perf_counter() - started
            log.warning("step.failed study=%s step=%s seconds=%.2f error=%r", ctx.label, sid, seconds, str(exc))
            return StepRecord(sid, compiled.uses, "failed", seconds, str(exc)), f"step {sid}: {exc}"
        except Exception as exc:  # a bug or library error must fail the study, not the daemon
            seconds = time.perf_counter() - started
            log.exception("step.crashed study=%s step=%s seconds=%.2f", ctx.label, sid, seconds)
            message = f"{type(exc).__name__}: {exc}"
            return StepRecord(sid, compiled.uses, "failed", seconds, message), f"step {sid}: {message}"
        seconds = time.perf_counter() - started
        log.info("step.done study=%s step=%s seconds=%.2f", ctx.label, sid, seconds)
        return StepRecord(sid, compiled.uses, "done", seconds), None
