"""Utility steps: ``util.delay`` holds a study for a while (shutdown and crash-recovery drills)."""

from __future__ import annotations

import time

from pydantic import Field

from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext


class DelayParams(Params):
    seconds: float = Field(1.0, ge=0, le=3600, description="how long to hold each study")


class Delay(Step):
    uses = "util.delay"
    summary = "Wait a fixed time per study; for drills of shutdown and crash recovery, not for production."
    Params = DelayParams

    def run(self, ctx: StudyContext) -> None:
        params: DelayParams = self.params  # type: ignore[assignment]
        time.sleep(params.seconds)
        ctx.result.setdefault("drills", []).append({"step": "util.delay", "seconds": params.seconds})


def register(registry: StepRegistry) -> None:
    registry.register(Delay)
