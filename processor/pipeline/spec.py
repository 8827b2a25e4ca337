"""Pipeline YAML → checked, compiled list of step instances.

Every problem is collected before anything runs — unknown step (with the closest names), bad
parameter, an input no earlier step provides, a duplicate id — and reported at once as a
ConfigError naming the file, the dotted location, the value and the fix.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processor.errors import ConfigError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Step, StepEnv


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
        fix = ("remove it or check the spelling against the step's documented parameters"
               if err["type"] == "extra_forbidden" else "see `python run.py steps` for the parameters")
        lines.append(f"{where}{value}: {err['msg']}. Fix: {fix}.")
    return lines


def load_pipeline(path: Path, registry: StepRegistry, env: StepEnv) -> Pipeline:
    """Read and compile a pipeline file; raises ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the pipeline file ({exc.strerror}). "
                          "Fix: point `pipeline:` in the config at an existing YAML file.") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        spec = PipelineSpec.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join([f"{path}: the pipeline has problems:",
                                     *("  - " + line for line in _validation_lines("", exc))])) from exc
    steps, problems = compile_steps(spec, registry, env)
    if problems:
        raise ConfigError("\n".join([f"{path}: the pipeline has {len(problems)} problem(s):",
                                     *("  - " + p for p in problems)]))
    digest = hashlib.sha256(text.encode()).hexdigest()
    return Pipeline(spec.name, spec.version, spec.on_missing_weights, tuple(steps), path, digest)


def compile_steps(spec: PipelineSpec, registry: StepRegistry,
                  env: StepEnv) -> tuple[list[CompiledStep], list[str]]:
    problems: list[str] = []
    compiled: list[CompiledStep] = []
    provided: dict[str, str] = {}
    seen_ids: set[str] = set()
    for index, step_spec in enumerate(spec.steps):
        where = f"steps[{index}]"
        if step_spec.id in seen_ids:
            problems.append(f"{where}.id (value: {step_spec.id!r}): used twice. Fix: give each step its own id.")
        seen_ids.add(step_spec.id)
        cls = registry.get(step_spec.uses)
        if cls is None:
            near = registry.closest(step_spec.uses)
            hint = f"did you mean {' or '.join(repr(n) for n in near)}?" if near else \
                f"known steps: {', '.join(registry.names())}"
            problems.append(f"{where}.uses (value: {step_spec.uses!r}): unknown step. Fix: {hint}")
            continue
        try:
            params = cls.Params.model_validate(step_spec.with_)
        except ValidationError as exc:
            problems.extend(_validation_lines(f"{where}.with", exc))
            continue
        for need in cls.needs:
            if need not in provided:
                problems.append(f"{where} ({step_spec.id}, uses {cls.uses}): needs {need!r}, which no "
                                f"earlier step provides. Fix: add a step that provides it before this one "
                                f"({_providers(registry, need)}).")
        step = cls(params, env)
        step.step_id = step_spec.id
        problems.extend(f"{where} ({step_spec.id}): {p}" for p in step.check())
        for name in cls.provides:
            provided[name] = step_spec.id
        compiled.append(CompiledStep(step_spec.id, step_spec, step))
    for index, done in enumerate(compiled):
        done.step.link([c.step for c in compiled[index + 1:]])
    return compiled, problems


def _providers(registry: StepRegistry, need: str) -> str:
    names = [name for name, cls in registry.items() if need in cls.provides]
    return "provided by " + ", ".join(names) if names else "no registered step provides it"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:120] or "unnamed"
