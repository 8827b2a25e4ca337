"""What a pipeline step is: a small class with typed params, typed inputs/outputs and a device.

Steps exchange values through ``ctx.values`` under declared :class:`Port` s (a name and a Python
type, like MONAI's named ports): a step reads only the ports in its ``needs`` /
``optional_needs`` and adds the ones in its ``provides``; the compiler checks that an earlier step
provides every need with a compatible type, the runner that a provided value has its type. Each
step adds its own part of the study result to ``ctx.result`` and never reads another step's part.
Steps never touch SQLite or the outbox layout beyond ``ctx.out_dir``; models come from
``env.models`` (the shared cache).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from processor.dicom.scan import Study

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Port:
    """A value in ``ctx.values``: its name and the Python type a provider must give it."""

    name: str
    type: type

    def accepts(self, provided: Port) -> bool:
        """True when ``provided`` (an earlier step's port) satisfies this need."""
        return provided.name == self.name and issubclass(provided.type, self.type)

    def __str__(self) -> str:
        return f"{self.name} ({self.type.__name__})"


class Params(BaseModel):
    """Base of every step's ``with:`` block: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


AnyParams: TypeAlias = (
    Params  # the base, for annotations inside Step (where ``Params`` is the class attribute)
)


@dataclass
class StepEnv:
    """What a step may use beyond its params: paths, the device, the model cache, a content cache."""

    root: Path
    device: str = "cpu"
    models: Any = None
    content_cache: Any = None
    # resolved path → sha256 the weights manifest pins for it (files only; built by the caller)
    pinned_sha256: Mapping[Path, str] = field(default_factory=dict)

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
    """Base class. Subclasses set ``uses``, ``Params``, ``needs``, ``provides`` (ports) and implement run()."""

    uses: ClassVar[str]
    summary: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    needs: ClassVar[tuple[Port, ...]] = ()
    optional_needs: ClassVar[tuple[Port, ...]] = ()
    provides: ClassVar[tuple[Port, ...]] = ()
    device: ClassVar[str] = "cpu"
    batched: ClassVar[bool] = (
        False  # True when run_batch shares work (model load, micro-batches) across studies
    )
    step_id: str = ""  # the pipeline's id for this step instance; set by compile_steps

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A port declared as a bare name (or anything but a Port) is a programming error, found at import."""
        super().__init_subclass__(**kwargs)
        for attr in ("needs", "optional_needs", "provides"):
            wrong = [p for p in getattr(cls, attr) if not isinstance(p, Port)]
            if wrong:
                raise TypeError(
                    f"{cls.__qualname__}.{attr}: {wrong[0]!r} is not a Port. Fix: declare "
                    f"Port({wrong[0]!r}, <type>), or use one of processor.steps.ports."
                )

    def __init__(self, params: AnyParams, env: StepEnv) -> None:
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

    def prepare(self, ctx: StudyContext) -> None:
        """The CPU part of a GPU step, run in the CPU stage (a pool process or the prefetch thread,
        overlapping the GPU work of other studies) when the step will run: its weight files are
        there and its needs are met. It may only put values in ``ctx.values`` that :meth:`run`
        would otherwise compute the same way (e.g. CT-CLIP's preprocessed input); an error here
        is left for :meth:`run` to meet and report. Default: nothing."""

    def output_sha256(self, output: str) -> str | None:
        """The sha256 of the checkpoint file this step's ``output`` comes from, for a later step's
        :meth:`bind`: ``output`` is a port name (``ctclip_latent``) or a feature prefix (``zs``).

        None when this step does not give that output, or its file is absent now (then the step is
        skipped at run time and a later one gives it). Default: None (weight-free steps).
        """
        return None

    def bind(self, earlier: Sequence[Step]) -> list[str]:
        """Problems binding this step to what ``earlier`` steps (pipeline order) will give it, found at
        compile time — e.g. a model trained on another checkpoint's outputs; each with its fix.
        Default: none. See :func:`bound_output`."""
        return []

    def run(self, ctx: StudyContext) -> None:
        raise NotImplementedError

    def run_batch(self, ctxs: list[StudyContext]) -> None:
        """Several studies at once (model-major order); batched steps override this."""
        for ctx in ctxs:
            self.run(ctx)


def bound_output(earlier: Sequence[Step], output: str) -> tuple[Step, str] | None:
    """The earlier step whose ``output`` a later step will receive, with its checkpoint's sha256: the
    first one (in pipeline order) that gives it with its file present; None when none does."""
    for step in earlier:
        sha256 = step.output_sha256(output)
        if sha256 is not None:
            return step, sha256
    return None
