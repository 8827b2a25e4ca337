"""The orientation check of ``evaluate``: does the documented DICOM → CT-RATE mapping score best?

ctwatch maps a DICOM volume to CT-RATE's (X, Y, Z) = (left, posterior, superior) array order on
the strength of one outside analysis (docs/ctrate-orientation.md). Labelled studies settle it: the
labelled studies whose input file is still there (the arrival's current, final or original path)
are read again (:func:`processor.intake.archive.open_arrival`, scan, then the configured pipeline's
own steps that provide the ``volume`` port), preprocessed by the configured ``ctclip.zero_shot``
step exactly as in a study run, and the zero-shot model scores the preprocessed (X, Y, Z) input
under each of the 8 in-plane symmetries of the square (:data:`DIHEDRAL`: identity, flip of X, flip
of Y, the three rotations, transpose, anti-transpose). For each, the zero-shot macro-AUROC over the
labelled findings with both classes present; a paired patient bootstrap gives the 95 % interval of
each difference to the identity.

Cost: 8 image encodings per study (the text prompts are encoded once) — 8 times the ``clip``
step's time per study in ``step_runs``; with the released model about 8 × 0.3 s on a GPU and
8 × tens of seconds on a CPU. The reading and preprocessing are once per study. The estimate is
logged before the run starts; ``evaluate --no-orientation`` skips the check.

The identity transform repeats the stored run, so its probabilities are compared with the stored
``zs.*`` values: a difference means another checkpoint, device or precision produced them.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from processor.config import Settings
    from processor.pipeline.runner import PipelineRunner
    from processor.pipeline.spec import Pipeline
    from processor.pipeline.step import StudyContext
    from processor.state import State
    from processor.steps.ctclip import ZeroShot

log = logging.getLogger(__name__)

IDENTITY = "identity"
# name → (what it does to the model's in-plane axes X (dim -2) and Y (dim -1), the transform)
DIHEDRAL: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    IDENTITY: ("the documented orientation", lambda t: t),
    "flip X": ("left ↔ right", lambda t: t.flip(-2)),
    "flip Y": ("anterior ↔ posterior", lambda t: t.flip(-1)),
    "rotate 180": ("both flips, as if RAS were written into the voxels", lambda t: t.flip(-2, -1)),
    "rotate 90": ("quarter turn, X toward Y (torch.rot90 k=1)", lambda t: t.rot90(1, (-2, -1))),
    "rotate 270": ("quarter turn, Y toward X (torch.rot90 k=3)", lambda t: t.rot90(3, (-2, -1))),
    "transpose": ("swap X and Y", lambda t: t.transpose(-2, -1)),
    "anti-transpose": ("swap X and Y, then rotate 180", lambda t: t.transpose(-2, -1).flip(-2, -1)),
}


def transformed(tensor: torch.Tensor, name: str) -> torch.Tensor:
    """``tensor`` (…, X, Y) under the in-plane transform ``name`` of :data:`DIHEDRAL` (contiguous)."""
    return DIHEDRAL[name][1](tensor).contiguous()


def orientation_check(
    settings: Settings,
    state: State,
    rows: Sequence[dict[str, Any]],
    labels: dict[str, np.ndarray],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """The check's figures (see the module docstring), or ``{"skipped": reason}``."""
    from processor.errors import ConfigError, WeightsError

    findings = [f for f in labels if any(f"zs.{f}" in r["features"] for r in rows)]
    if not findings:
        return {"skipped": "no label column names a zero-shot finding (no stored zs.<column>)"}
    try:
        pipeline, index = _zero_shot(settings)
    except (ConfigError, WeightsError) as exc:
        return {"skipped": f"the configured pipeline cannot be compiled: {str(exc).splitlines()[0]}"}
    if index is None:
        return {"skipped": f"the configured pipeline ({settings.pipeline}) has no ctclip.zero_shot step"}
    step: ZeroShot = pipeline.steps[index].step  # type: ignore[assignment]
    missing = [str(p) for p in step.weight_files() if not p.exists()]
    if missing:
        return {"skipped": f"no CT-CLIP zero-shot weights installed (missing {', '.join(missing)})"}
    y = np.column_stack([labels[f] for f in findings])
    wanted = [i for i in range(len(rows)) if not np.isnan(y[i]).all()]
    inputs, gone = _inputs(state, [rows[i] for i in wanted])
    if not inputs:
        return {
            "skipped": f"no input file of the {len(wanted)} labelled studies remains ({gone} moved or "
            "deleted; kept inputs are under the inbox's .ctwatch/done until retention removes them)"
        }
    count = sum(len(u) for u in inputs.values())
    estimate = 8 * _clip_seconds(state, pipeline.steps[index].id) * count
    log.info("evaluate.orientation studies=%d encodings=%d estimate_seconds=%.0f", count, 8 * count, estimate)
    started = time.perf_counter()
    probs, problems = _encode_all(settings, pipeline, index, inputs, findings)
    seconds = time.perf_counter() - started
    done = [i for i in wanted if rows[i]["study_uid"] in probs]
    if not done:
        return {"skipped": f"no labelled study could be read again ({'; '.join(problems[:3])})"}
    from processor.fit.data import patient_groups

    by_name = {name: np.array([probs[rows[i]["study_uid"]][name] for i in done]) for name in DIHEDRAL}
    out = compare(
        y[done], by_name, findings, patient_groups([rows[i] for i in done]), n_boot=n_boot, seed=seed
    )
    stored = np.array([[rows[i]["features"].get(f"zs.{f}", np.nan) for f in findings] for i in done])
    out.update(
        studies=len(done),
        encodings=8 * len(done),
        seconds=round(seconds, 3),
        checkpoint=str(step.weight_files()[0]),
        unreadable=problems,
        inputs_gone=gone,
        **_agreement(stored, by_name[IDENTITY]),
    )
    return out


def _agreement(stored: np.ndarray, identity: np.ndarray) -> dict[str, Any]:
    """How far the identity re-run is from the stored ``zs.*`` values (and a note when too far)."""
    gap = np.abs(stored - identity)
    worst = float(np.nanmax(gap)) if np.isfinite(gap).any() else None
    out: dict[str, Any] = {"identity_vs_stored_max_abs": worst}
    if worst is not None and worst > 1e-4:
        out["note_stored"] = (
            f"the identity re-run differs from the stored zs.* values by up to {worst:.2g}: they were "
            "produced by another checkpoint, device or precision than the installed one"
        )
    return out


def compare(
    y: np.ndarray,
    probs: dict[str, np.ndarray],
    findings: Sequence[str],
    groups: Sequence[object],
    *,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Macro-AUROC of each transform over the findings with both classes (``y`` (n, F), NaN =
    unknown; ``probs[name]`` (n, F)), each one's difference to the identity with a paired patient
    bootstrap 95 % interval, and the verdict."""
    from sklearn.metrics import roc_auc_score

    from processor.fit.calibration import bootstrap_weights, weighted_aurocs

    used = [
        j
        for j in range(y.shape[1])
        if 0 < np.nansum(y[:, j]) < np.count_nonzero(~np.isnan(y[:, j]))
        and all(np.isfinite(p[~np.isnan(y[:, j]), j]).all() for p in probs.values())
    ]
    if not used:
        return {
            "findings": [],
            "transforms": [],
            "skipped": "no zero-shot finding has both classes among the studies read",
        }
    macro = {
        name: float(
            np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], p[~np.isnan(y[:, j]), j]) for j in used])
        )
        for name, p in probs.items()
    }
    replicates: dict[str, list[np.ndarray]] = {name: [] for name in probs}
    for weights in bootstrap_weights(y.shape[0], groups=groups, n_boot=n_boot, seed=seed):
        for name, p in probs.items():
            per = []
            for j in used:
                ok = ~np.isnan(y[:, j])
                per.append(weighted_aurocs(y[ok, j], p[ok, j], weights[:, ok]))
            stacked = np.vstack(per)
            with np.errstate(invalid="ignore"):
                counts = np.sum(~np.isnan(stacked), axis=0)
                replicates[name].append(
                    np.where(counts > 0, np.nansum(stacked, axis=0) / np.maximum(counts, 1), np.nan)
                )
    boot = {name: np.concatenate(parts) for name, parts in replicates.items()}
    rows = []
    for name in probs:
        delta = boot[name] - boot[IDENTITY]
        delta = delta[~np.isnan(delta)]
        low, high = np.quantile(delta, [0.025, 0.975]) if delta.size else (math.nan, math.nan)
        rows.append(
            {
                "name": name,
                "description": DIHEDRAL[name][0],
                "macro_auroc": macro[name],
                "delta_vs_identity": macro[name] - macro[IDENTITY],
                "delta_ci95": [_finite(low), _finite(high)],
            }
        )
    best = max(rows, key=lambda r: (r["macro_auroc"], r["name"] == IDENTITY))
    verdict, warning = _verdict(best, macro[IDENTITY], len(y))
    return {
        "findings": [findings[j] for j in used],
        "transforms": rows,
        "best": best["name"],
        "verdict": verdict,
        "warning": warning,
    }


def _verdict(best: dict[str, Any], identity: float, n: int) -> tuple[str, str | None]:
    if best["name"] == IDENTITY:
        return "the documented orientation (identity) scores best of the 8.", None
    low = best["delta_ci95"][0]
    text = (
        f"{best['name']} ({best['description']}) scores macro-AUROC {best['macro_auroc']:.3f} against "
        f"{identity:.3f} for the documented orientation (difference {best['delta_vs_identity']:+.3f}, "
        f"95 % CI {_fmt(best['delta_ci95'][0])} to {_fmt(best['delta_ci95'][1])}, {n} studies)"
    )
    if low is not None and low > 0:
        return (
            text + ": beyond the bootstrap noise.",
            f"orientation: the documented DICOM → CT-RATE orientation is not the best on these labels: {text}. "
            "Check the mapping (docs/ctrate-orientation.md) before trusting the zero-shot outputs.",
        )
    return (
        text + ": within the bootstrap noise (the interval includes 0), so no evidence against the "
        "documented orientation yet; more labelled studies would settle it.",
        f"orientation: the documented DICOM → CT-RATE orientation is not the best on these labels, "
        f"but within the bootstrap noise: {text}. No evidence of a wrong mapping yet; evaluate again "
        "with more labelled studies.",
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _zero_shot(settings: Settings) -> tuple[Pipeline, int | None]:
    """The configured pipeline, compiled by the project's compiler, and its first zero-shot step."""
    from processor.models.cache import ModelCache
    from processor.pipeline.spec import load_pipeline
    from processor.pipeline.step import StepEnv
    from processor.steps import default_registry
    from processor.steps.ctclip import ZeroShot

    device = "cpu" if settings.device.strip().lower() == "cpu" else _device(settings.device)
    m = settings.models
    models = ModelCache(m.capacity, device, m.gpu_memory_budget_gb, precision=m.precision)
    pipeline = load_pipeline(settings.pipeline, default_registry(), StepEnv(settings.root, device, models))
    index = next((i for i, c in enumerate(pipeline.steps) if isinstance(c.step, ZeroShot)), None)
    return pipeline, index


def _device(spec: str) -> str:
    from processor.models.device import resolve_device

    return str(resolve_device(spec))


def _inputs(state: State, rows: Sequence[dict[str, Any]]) -> tuple[dict[tuple[int, Path], set[str]], int]:
    """(arrival id, input path) → study UIDs to read there; and how many studies have no input left."""
    found: dict[tuple[int, Path], set[str]] = {}
    gone = 0
    for row in rows:
        arrival_id = int(row.get("study_arrival_id") or row["arrival_id"])
        arrival = state.arrival(arrival_id)
        candidates = [arrival.current_path, arrival.final_path, arrival.original_path]
        path = next((Path(p) for p in candidates if p and Path(p).exists()), None)
        if path is None:
            gone += 1
            continue
        found.setdefault((arrival_id, path), set()).add(row["study_uid"])
    return found, gone


def _clip_seconds(state: State, step_id: str) -> float:
    seconds = state.step_seconds(step_id)
    return float(np.median(seconds)) if seconds else 0.0


def _volume_steps(pipeline: Pipeline, index: int) -> Pipeline:
    """The steps before ``index`` that (transitively) provide what the zero-shot step reads."""
    from dataclasses import replace

    needed = {p.name for p in pipeline.steps[index].step.needs}
    chosen = []
    for compiled in reversed(pipeline.steps[:index]):
        if {p.name for p in compiled.step.provides} & needed:
            chosen.append(compiled)
            needed |= {p.name for p in (*compiled.step.needs, *compiled.step.optional_needs)}
    return replace(pipeline, steps=tuple(reversed(chosen)))


def _encode_all(
    settings: Settings,
    pipeline: Pipeline,
    index: int,
    inputs: dict[tuple[int, Path], set[str]],
    findings: Sequence[str],
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
    """study UID → transform → probabilities of ``findings``; and the problems met (one per input)."""
    from processor.dicom.scan import scan_members
    from processor.errors import CtwatchError
    from processor.intake.archive import Limits, open_arrival
    from processor.pipeline.runner import PipelineRunner
    from processor.pipeline.step import StudyContext

    s = settings.limits  # the daemon's own limits, so what it read is read here too
    limits = Limits(s.max_members, s.max_total_bytes, s.max_ratio, s.max_seconds_per_arrival)
    runner = PipelineRunner(_volume_steps(pipeline, index))
    out: dict[str, dict[str, np.ndarray]] = {}
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ctwatch-evaluate-") as scratch:
        for (arrival_id, path), uids in sorted(inputs.items(), key=lambda kv: kv[0][0]):
            try:
                with open_arrival(path, limits) as contents:
                    for study in scan_members(contents.members).studies:
                        if study.uid not in uids:
                            continue
                        ctx = StudyContext(arrival_id, study, Path(scratch) / f"a{arrival_id}")
                        try:
                            out[study.uid] = _encode_study(pipeline, index, runner, ctx, findings)
                        except (CtwatchError, OSError) as exc:
                            problems.append(f"{path.name} study {study.uid}: {exc}")
            except (CtwatchError, OSError) as exc:
                problems.append(f"{path.name}: {exc}")
                log.warning("evaluate.orientation.unreadable arrival=%d error=%r", arrival_id, str(exc))
    return out, problems


def _encode_study(
    pipeline: Pipeline, index: int, runner: PipelineRunner, ctx: StudyContext, findings: Sequence[str]
) -> dict[str, np.ndarray]:
    """One study: the volume steps, the zero-shot step's own preprocessing, 8 encodings."""
    from processor.errors import StepError
    from processor.steps.ctclip import _require_spacing
    from processor.steps.ports import VOLUME

    step: ZeroShot = pipeline.steps[index].step  # type: ignore[assignment]
    outcome = runner.run(ctx)
    if VOLUME.name not in ctx.values:
        raise StepError(f"no volume ({outcome.error or 'the volume steps were skipped'})")
    _require_spacing(ctx.values[VOLUME.name])  # WithheldError: the step would not run either
    # the step's own preprocessing, as in a study run, so the identity repeats the stored run
    tensor, _ = step._preprocess(ctx)
    model = step.model()
    by_name = {}
    for name in DIHEDRAL:
        got = step.probabilities(model, model.encode_image(transformed(tensor, name)))
        by_name[name] = np.array([got.get(f, np.nan) for f in findings], dtype=float)
    log.info("evaluate.orientation.study study=%s arrival=%d", ctx.study.uid, ctx.arrival_id)
    return by_name
