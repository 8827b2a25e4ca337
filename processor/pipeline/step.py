"""What a pipeline step is: a small class with typed params, named inputs/outputs and a device.

Steps read what earlier steps provided from ``ctx.values`` (named ports, like MONAI's) and add
their part of the study result to ``ctx.result``. Steps never touch SQLite or the outbox layout
beyond ``ctx.out_dir``; models come from ``env.models`` (the shared cache).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from processor.dicom.scan import Study

log = logging.getLogger(__name__)


class Params(BaseModel):
    """Base of every step's ``with:`` block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class StepEnv:
    """What a step may use beyond its params: paths, the device, the model cache, a content cache."""

    root: Path
    device: str = "cpu"
    models: Any = None
    content_cache: Any = None

    def path(self, value: str | Path) -> Path:
        path = Path(value)
        return path if path.is_absolute() else (self.root / path).resolve()


@dataclass
class StudyContext:
    """Everything one study carries through the pipeline."""

    arrival_id: int
    study: Study
    out_dir: Path
    values: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.arrival_id}:{self.study.uid[-12:]}"


class Step:
    """Base class. Subclasses set ``uses``, ``Params``, ``needs``, ``provides`` and implement run()."""

    uses: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    needs: ClassVar[tuple[str, ...]] = ()
    optional_needs: ClassVar[tuple[str, ...]] = ()
    provides: ClassVar[tuple[str, ...]] = ()
    device: ClassVar[str] = "cpu"
    batched: ClassVar[bool] = False  # True when run_batch shares work (model load, micro-batches) across studies
    step_id: str = ""  # the pipeline's id for this step instance; set by compile_steps

    def __init__(self, params: Params, env: StepEnv) -> None:
        self.params = params
        self.env = env

    def weight_files(self) -> list[Path]:
        """Files that must exist for this step to run; absent ones make it ``skipped``."""
        return []

    def check(self) -> list[str]:
        """Problems found at compile time (e.g. an unsupported model folder); empty when fine."""
        return []

    def link(self, later: Sequence[Step]) -> None:
        """Told at compile time which steps run after this one in the pipeline (default: ignored)."""

    def run(self, ctx: StudyContext) -> None:
        raise NotImplementedError

    def run_batch(self, ctxs: list[StudyContext]) -> None:
        """Several studies at once (model-major order); batched steps override this."""
        for ctx in ctxs:
            self.run(ctx)
