"""Pipeline YAML → checked, compiled list of step instances.

Every problem is collected before anything runs — unknown step (with the closest names), bad
parameter, an input no earlier step provides (or provides with another type), a duplicate id, a
model trained on another checkpoint's outputs than the earlier steps give it (``Step.bind``) — and
reported at once as a ConfigError naming the file, the dotted location, the value and the fix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processor.errors import ConfigError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Port, Step, StepEnv


class StepSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    uses: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    optional: bool = False


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    version: int = Field(ge=1)
    description: str = ""
    on_missing_weights: Literal["skip", "fail"] = "skip"
    steps: list[StepSpec] = Field(min_length=1)


@dataclass(frozen=True)
class CompiledStep:
    id: str
    spec: StepSpec
    step: Step

    @property
    def uses(self) -> str:
        return self.spec.uses


@dataclass(frozen=True)
class Pipeline:
    name: str
    version: int
    on_missing_weights: str
    steps: tuple[CompiledStep, ...]
    source: Path
    digest: str
    text: str = field(default="", repr=False, compare=False)  # the file's text as compiled


def _loc(parts: tuple[Any, ...]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _validation_lines(prefix: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        where = _loc((*([prefix] if prefix else []), *err["loc"]))
        value = "" if err["type"] == "missing" else f" (value: {err.get('input')!r})"
        fix = (
            "remove it or check the spelling against the step's documented parameters"
            if err["type"] == "extra_forbidden"
            else "see `python run.py steps` for the parameters"
        )
        lines.append(f"{where}{value}: {err['msg']}. Fix: {fix}.")
    return lines


def load_pipeline(path: Path, registry: StepRegistry, env: StepEnv, text: str | None = None) -> Pipeline:
    """Read and compile a pipeline file; raises ConfigError listing every problem.

    ``text``: the file's text as another process already read it (a CPU pool process compiles the
    daemon's pipeline, not the file as it may have been edited since); None: read ``path``.
    """
    try:
        if text is None:
            text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the pipeline file ({exc.strerror}). "
            "Fix: point `pipeline:` in the config at an existing YAML file."
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            "\n".join(
                [
                    f"{path}: the pipeline has problems:",
                    *("  - " + line for line in _validation_lines("", exc)),
                ]
            )
        ) from exc
    steps, problems = compile_steps(spec, registry, env)
    if problems:
        raise ConfigError(
            "\n".join(
                [f"{path}: the pipeline has {len(problems)} problem(s):", *("  - " + p for p in problems)]
            )
        )
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Pipeline(spec.name, spec.version, spec.on_missing_weights, tuple(steps), path, digest, text)


def compile_steps(
    spec: PipelineSpec, registry: StepRegistry, env: StepEnv
) -> tuple[list[CompiledStep], list[str]]:
    problems: list[str] = []
    compiled: list[CompiledStep] = []
    provided: dict[str, tuple[Port, str]] = {}  # port name -> (the port as first provided, its step id)
    resolved = [(s, registry.get(s.uses)) for s in spec.steps]
    seen_ids: set[str] = set()
    for index, (step_spec, cls) in enumerate(resolved):
        where = f"steps[{index}]"
        if step_spec.id in seen_ids:
            problems.append(
                f"{where}.id (value: {step_spec.id!r}): used twice. Fix: give each step its own id."
            )
        seen_ids.add(step_spec.id)
        if cls is None:
            near = registry.closest(step_spec.uses)
            hint = (
                f"did you mean {' or '.join(repr(n) for n in near)}?"
                if near
                else f"known steps: {', '.join(registry.names())}"
            )
            problems.append(f"{where}.uses (value: {step_spec.uses!r}): unknown step. Fix: {hint}")
            continue
        try:
            params = cls.Params.model_validate(step_spec.with_)
        except ValidationError as exc:
            problems.extend(_validation_lines(f"{where}.with", exc))
            continue
        head = f"{where} ({step_spec.id}, uses {cls.uses})"
        later = [(s.id, c) for s, c in resolved[index + 1 :] if c is not None]
        problems.extend(_port_problems(head, cls, provided, later, registry))
        step = cls(params, env)
        step.step_id = step_spec.id
        problems.extend(f"{where} ({step_spec.id}): {p}" for p in step.check())
        for port in cls.provides:
            first = provided.setdefault(port.name, (port, step_spec.id))
            if first[0].type is not port.type:
                problems.append(
                    f"{head}: provides {port.name!r} as {port.type.__name__}, but step {first[1]!r} "
                    f"already provides it as {first[0].type.__name__}. Fix: give one of the two "
                    "ports another name; a port has one type in a pipeline."
                )
        compiled.append(CompiledStep(step_spec.id, step_spec, step))
    for index, done in enumerate(compiled):
        done.step.link([c.step for c in compiled[index + 1 :]])
    where_of = {s.id: i for i, s in reversed(list(enumerate(spec.steps)))}
    for index, done in enumerate(compiled):
        problems.extend(
            f"steps[{where_of[done.id]}] ({done.id}): {p}"
            for p in done.step.bind([c.step for c in compiled[:index]])
        )
    return compiled, problems


def _port_problems(
    head: str,
    cls: type[Step],
    provided: dict[str, tuple[Port, str]],
    later: list[tuple[str, type[Step]]],
    registry: StepRegistry,
) -> list[str]:
    """A need no earlier step provides, or one provided with another type (optional needs: only that)."""
    problems = []
    for need, optional in [*((n, False) for n in cls.needs), *((n, True) for n in cls.optional_needs)]:
        found = provided.get(need.name)
        if found is None:
            if optional:
                continue
            after = next((sid for sid, c in later if any(need.accepts(p) for p in c.provides)), None)
            fix = (
                f"move this step after step {after!r}, which provides it later in the pipeline"
                if after
                else f"add a step that provides it before this one ({_providers(registry, need)})"
            )
            problems.append(
                f"{head}: needs {need.name!r}, which no earlier step provides (type "
                f"{need.type.__name__}). Fix: {fix}."
            )
        elif not need.accepts(found[0]):
            problems.append(
                f"{head}: needs {need.name!r} as {need.type.__name__}, but step {found[1]!r} provides "
                f"it as {found[0].type.__name__}. Fix: provide it with a step that gives a "
                f"{need.type.__name__} ({_providers(registry, need)})."
            )
    return problems


def _providers(registry: StepRegistry, need: Port) -> str:
    names = [name for name, cls in registry.items() if any(need.accepts(p) for p in cls.provides)]
    return "provided by " + ", ".join(names) if names else "no registered step provides it"
