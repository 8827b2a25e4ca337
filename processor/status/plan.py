"""Every step of the running pipeline: what it did today, what it will do with the next study, why.

:func:`pipeline_plan` (called by the daemon's probe on each request) reads the compiled pipeline and
the model files now, with the runner's own test (:func:`processor.pipeline.weightfiles.
weight_files_now`): a step whose weight files are absent will be skipped (or fail the study, with
``on_missing_weights: fail``); one whose weight index cannot be read fails (the study too, unless
the step is optional); a step needing a value only such steps provide is skipped after it. The
model-file table is :func:`processor.weights.weight_rows`, what ``python run.py weights`` prints.

:func:`step_facts` joins that plan with today's ``step_runs`` counts, each step's last failure and
its last run: a step whose last run failed because its model could not be loaded, with its files
unchanged since, is forecast to fail again — "runs" is said only when nothing known says otherwise.
Only ids, counts, times, closed categories (:class:`processor.vocab.StepProblem`) and model-file
paths relative to the root or the weights folder (:func:`shown_path`) leave here — never an error
text, never an absolute path.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any

from processor.config import Settings
from processor.errors import ConfigError
from processor.outputs.explain import STEP_WORDS
from processor.pipeline.spec import Pipeline
from processor.pipeline.weightfiles import WeightFiles, weight_files_now
from processor.status.words import local_time, problem_words
from processor.vocab import StepProblem, StepStatus
from processor.weights import weight_rows

log = logging.getLogger(__name__)

STATUSES = (StepStatus.DONE, StepStatus.SKIPPED, StepStatus.FAILED, StepStatus.NOT_RUN)
INSTALLED = ("present-unverified", "verified")


@dataclass(frozen=True)
class PlannedStep:
    """One compiled step: its id, ``uses``, device, port names, the weight files absent now and the
    one that cannot be read (as :func:`shown_path` shows them), whether the step is ``optional``,
    and when its model files last changed (``files_changed_at``, Unix seconds; None: none there)."""

    step: str
    uses: str
    device: str
    needs: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    unreadable: str | None = None
    optional: bool = False
    files_changed_at: float | None = None


@dataclass(frozen=True)
class ModelFile:
    """A row of ``python run.py weights``: the file (or folder, ending in ``/``) relative to the root,
    the ids of the steps reading it, and its status (``missing``, ``present-unverified`` …)."""

    file: str
    steps: tuple[str, ...]
    status: str

    @property
    def installed(self) -> bool:
        return self.status in INSTALLED


@dataclass(frozen=True)
class PipelinePlan:
    """What the running pipeline will do with the next study, and its model files now.

    ``weights_problem``: why the model-file table is empty (the manifest or the pipeline file
    cannot be read), in our words; ``changed_on_disk``: the pipeline file no longer holds what
    the daemon compiled at start (a restart is needed to use it); ``weights_folder``: the
    configured weights folder as the page names it (``weights/`` under the root, else
    :data:`WEIGHTS_LABEL`)."""

    on_missing_weights: str
    steps: tuple[PlannedStep, ...] = ()
    model_files: tuple[ModelFile, ...] = ()
    weights_problem: str | None = None
    changed_on_disk: bool = False
    weights_folder: str = "weights/"


#: How a path in a weights folder outside the root is shown: ``<weights>/ct_clip/model.pt``.
WEIGHTS_LABEL = "<weights>"


def shown_path(path: Path, settings: Settings) -> str:
    """A model file as the status port shows it, never absolute: relative to the root when under it
    (as ``python run.py weights`` shows it), else relative to the configured weights folder as
    ``<weights>/…``, else ``…/<name>``."""
    resolved = path.resolve()
    for base, prefix in ((settings.root, None), (settings.weights, WEIGHTS_LABEL)):
        try:
            relative = resolved.relative_to(base.resolve())
        except ValueError:
            continue
        return str(PurePosixPath(prefix, relative) if prefix else PurePosixPath(relative))
    return f"…/{path.name}"


def _unreadable(weights: WeightFiles, settings: Settings) -> str | None:
    """The file that makes the step's model files unknowable, as shown; None when they are known."""
    if weights.why is None:
        return None
    return shown_path(weights.unreadable, settings) if weights.unreadable else "the list of its model files"


def pipeline_plan(pipeline: Pipeline, settings: Settings) -> PipelinePlan:
    """The plan of ``pipeline`` (the compiled, running one) with the files under ``settings`` now."""
    planned = []
    for c in pipeline.steps:
        weights = weight_files_now(c.step)
        planned.append(
            PlannedStep(
                c.id,
                c.uses,
                c.step.device,
                tuple(p.name for p in c.step.needs),
                tuple(p.name for p in c.step.provides),
                tuple(shown_path(p, settings) for p in weights.missing),
                _unreadable(weights, settings),
                c.spec.optional,
                weights.changed_at(),
            )
        )
    labels = {f"{c.id} ({c.uses})": c.id for c in pipeline.steps}  # weights.py's "used by" words
    files: tuple[ModelFile, ...] = ()
    problem = None
    try:
        files = tuple(
            ModelFile(
                shown_path(row.path, settings) + ("/" if row.shown.endswith("/") else ""),
                tuple(labels.get(u, u) for u in row.used_by),
                row.status,
            )
            for row in weight_rows(settings)
            if row.used_by
        )
    except (ConfigError, OSError):
        log.warning("status.weights_unreadable", exc_info=True)
        problem = "the weights manifest or the pipeline file cannot be read; run `python run.py weights`"
    try:
        changed = (
            hashlib.sha256(pipeline.source.read_text(encoding="utf-8").encode()).hexdigest()
            != pipeline.digest
        )
    except (OSError, UnicodeDecodeError):
        changed = True
    folder = shown_path(settings.weights, settings)
    return PipelinePlan(
        pipeline.on_missing_weights,
        tuple(planned),
        files,
        problem,
        changed,
        f"{folder}/" if not folder.startswith((WEIGHTS_LABEL, "…")) else WEIGHTS_LABEL + "/",
    )


# ---------------------------------------------------------------------------------------- forecast
@dataclass(frozen=True)
class Forecast:
    """What the next study gets from one step: ``runs``, ``skipped``, ``fails`` (the step fails; the
    study too unless the step is optional) or ``not_run`` (an earlier step fails the study), with
    the category and the words why; ``missing`` / ``unreadable``: the model files behind it."""

    outcome: str
    problem: StepProblem | None = None
    words: str = "ready"
    missing: tuple[str, ...] = ()
    unreadable: tuple[str, ...] = ()


def forecast(plan: PipelinePlan, unusable: Mapping[str, str] | None = None) -> dict[str, Forecast]:
    """Step id → :class:`Forecast`, walking the plan as the runner walks a study.

    ``unusable``: step id → when it failed (``failed today: 3``), for each step whose last run
    failed because its model could not be loaded and whose files have not changed since
    (:func:`known_unusable`)."""
    known = unusable or {}
    out: dict[str, Forecast] = {}
    available: set[str] = set()
    givers_of: dict[str, list[str]] = {}  # port → steps that will not give it
    failing: str | None = None
    for s in plan.steps:
        unmet = [n for n in s.needs if n not in available]
        ahead: Forecast
        if failing is not None:
            ahead = Forecast(
                "not_run", StepProblem.EARLIER_FAILED, f"not reached: step {failing} fails first"
            )
        elif s.unreadable is not None:
            ahead = Forecast(
                "fails",
                StepProblem.MODEL_UNUSABLE,
                f"model file unreadable: {s.unreadable}",
                unreadable=(s.unreadable,),
            )
        elif s.missing:
            fail = plan.on_missing_weights == "fail"
            ahead = Forecast(
                "fails" if fail else "skipped",
                StepProblem.MODEL_MISSING,
                ("fails every study: " if fail else "") + "model file missing: " + ", ".join(s.missing),
                s.missing,
            )
        elif s.step in known:
            ahead = Forecast(
                "fails",
                StepProblem.MODEL_UNUSABLE,
                f"will fail: model file unusable ({known[s.step]})",
            )
        elif unmet:
            givers = sorted({g for n in unmet for g in givers_of.get(n, [])})
            verb = "fails" if len(givers) == 1 else "fail"
            if all(out[g].outcome == "skipped" for g in givers):
                verb = "is skipped" if len(givers) == 1 else "are skipped"
            ahead = Forecast(
                "skipped",
                StepProblem.NEEDS_SKIPPED,
                f"needs {', '.join(unmet)}"
                + (f" from {' or '.join(givers)}, which {verb}" if givers else ""),
            )
        else:
            ahead = Forecast("runs")
            available.update(s.provides)
        out[s.step] = ahead
        if ahead.outcome == "fails" and (not s.optional or ahead.problem is StepProblem.MODEL_MISSING):
            failing = s.step  # a required step that fails, or any step with on_missing_weights: fail
        if ahead.outcome != "runs":
            for port in s.provides:
                givers_of.setdefault(port, []).append(s.step)
    return out


def known_unusable(
    plan: PipelinePlan,
    last_runs: Iterable[Mapping[str, Any]],
    failed_today: Mapping[str, int],
    now: datetime,
) -> dict[str, str]:
    """Step id → ``failed today: N`` (or ``last failed <local time>``), for each step of ``plan``
    whose last run (``last_runs``: :meth:`State.last_step_runs`) failed with ``model_unusable`` and
    whose model files have not changed since (:attr:`PlannedStep.files_changed_at` not after it)."""
    last = {row["step_id"]: row for row in last_runs}
    out: dict[str, str] = {}
    for s in plan.steps:
        row = last.get(s.step)
        if row is None or row["status"] != "failed" or row["problem"] != StepProblem.MODEL_UNUSABLE:
            continue
        if row.get("uses") not in (None, s.uses):
            continue
        try:
            failed_at = datetime.fromisoformat(str(row["finished_at"])).timestamp()
        except ValueError:
            continue
        if s.files_changed_at is None or s.files_changed_at <= failed_at:
            today = failed_today.get(s.step, 0)
            out[s.step] = (
                f"failed today: {today}" if today else f"last failed {local_time(row['finished_at'], now)}"
            )
    return out


# ---------------------------------------------------------------------------------------- facts
def step_facts(
    plan: PipelinePlan | None,
    counts: Iterable[Mapping[str, Any]],
    failures: Iterable[Mapping[str, Any]],
    means: Iterable[Mapping[str, Any]],
    now: datetime,
    last_runs: Iterable[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """One document per step: every step of the plan in pipeline order (none hidden, 0/0/0 when it
    did not run today), then any step id with runs today that the running pipeline does not have.

    ``counts``: :meth:`State.step_counts_since` rows; ``failures``: :meth:`State.last_step_failures`;
    ``means``: :meth:`State.step_means`; ``now``: aware local time (for the last failure's time);
    ``last_runs``: :meth:`State.last_step_runs` of the running pipeline (for :func:`known_unusable`).
    """
    counted: dict[str, dict[str, Any]] = {}
    uses: dict[str, str] = {}
    for row in counts:
        entry = counted.setdefault(row["step_id"], {"today": dict.fromkeys(STATUSES, 0), "problems": {}})
        if row["status"] in entry["today"]:
            entry["today"][row["status"]] += row["n"]
        if row["status"] != StepStatus.DONE:
            key = str(row["problem"] or "")
            entry["problems"][key] = entry["problems"].get(key, 0) + row["n"]
        uses[row["step_id"]] = row["uses"]
    last = {row["step_id"]: row for row in failures}
    mean = {row["step_id"]: row for row in means}
    planned = list(plan.steps) if plan is not None else []
    failed_today = {k: v["problems"].get(StepProblem.MODEL_UNUSABLE, 0) for k, v in counted.items()}
    expected = forecast(plan, known_unusable(plan, last_runs, failed_today, now)) if plan is not None else {}
    ids = [s.step for s in planned] + sorted(set(counted) - {s.step for s in planned})
    by_id = {s.step: s for s in planned}
    out: list[dict[str, Any]] = []
    for step_id in ids:
        planned_step = by_id.get(step_id)
        step_uses = planned_step.uses if planned_step else uses.get(step_id, "")
        entry = counted.get(step_id, {"today": dict.fromkeys(STATUSES, 0), "problems": {}})
        fail = last.get(step_id)
        runs = mean.get(step_id)
        ahead = expected.get(step_id)
        out.append(
            {
                "step": step_id,
                "uses": step_uses,
                "name": STEP_WORDS.get(step_uses, step_id),
                "device": planned_step.device if planned_step else None,
                "in_pipeline": planned_step is not None,
                "today": {str(k): v for k, v in entry["today"].items()},
                "today_problems": [
                    {"problem": k or None, "count": n, "words": problem_words(k)}
                    for k, n in sorted(entry["problems"].items(), key=lambda kv: (-kv[1], kv[0]))
                ],
                "next_study": (
                    {
                        "outcome": ahead.outcome,
                        "problem": ahead.problem,
                        "words": ahead.words,
                        "missing_files": list(ahead.missing),
                        "unreadable_files": list(ahead.unreadable),
                    }
                    if ahead
                    else {
                        "outcome": "not_in_pipeline",
                        "problem": None,
                        "words": "not in the running pipeline",
                        "missing_files": [],
                        "unreadable_files": [],
                    }
                ),
                "last_failure": (
                    {
                        "at": fail["finished_at"],
                        "at_local": local_time(fail["finished_at"], now),
                        "problem": fail["problem"],
                        "words": problem_words(fail["problem"]),
                    }
                    if fail
                    else None
                ),
                "runs": runs["runs"] if runs else 0,
                "mean_seconds": round(runs["mean_seconds"], 3)
                if runs and runs["mean_seconds"] is not None
                else None,
            }
        )
    return out


def model_file_facts(plan: PipelinePlan | None) -> list[dict[str, Any]]:
    """The model files of the running pipeline: ``file``, ``steps`` (ids), ``status``, ``installed``."""
    if plan is None:
        return []
    return [
        {"file": f.file, "steps": list(f.steps), "status": f.status, "installed": f.installed}
        for f in plan.model_files
    ]
