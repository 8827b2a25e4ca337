"""The ensemble steps: ``ctclip.head``, ``fusion.lightgbm`` and ``decision.pathology``.

* ``ctclip.head`` — the site's supervised head (``fit-head``) on the ``ctclip_latent`` port →
  ``result["models"][<id>]`` (kind ``ctclip_head``), ``head.<finding>`` features and its scores.
* ``fusion.lightgbm`` — the site's booster (``fit-fusion``, loaded by :mod:`processor.models.fusion`)
  over the ``features`` port (a missing feature is NaN) → ``result["fusion"]`` and the ``fusion``
  port: probability, threshold, and per-model contributions (SHAP values in log-odds from
  ``pred_contrib``). A booster whose feature names differ from its ``card.json`` is refused.
* ``decision.pathology`` — always runs (no weights) and writes ``result["decision"]``, the one
  section the result JSON's ``probability_of_pathology`` / ``pathology`` /
  ``most_dangerous_pathology_type`` are read from. Put it last. It reads the ``fusion`` and
  ``scores`` ports when present. Without a fusion model the first two are null (never an invented
  number); ``most_dangerous_pathology_type`` is the first finding in ``severity_order`` whose
  probability reaches its threshold, "No significant pathology" when none does, and null with a
  reason when no model gave per-finding probabilities.

Feature names and the ports are listed in :mod:`processor.steps.ports`; :func:`collect_features`
derives the same features from a result JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from processor.errors import StepError, WeightsError
from processor.models.fusion import FusedModel
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StepEnv, StudyContext
from processor.steps.ports import (
    CTCLIP_LATENT,
    FEATURES,
    FUSION,
    KIND_PREFIX,
    LUNG_FEATURES,
    SCORES,
    FusionOutput,
    ModelScores,
    add_features,
    add_scores,
    is_number,
)

log = logging.getLogger(__name__)

NO_PATHOLOGY = "No significant pathology"
# Default order for most_dangerous_pathology_type: acute and life-threatening first, then findings
# that need work-up (possible malignancy, infection), then chronic, then incidental. A site sets
# its own with `severity_order:`; findings not listed rank after all listed ones.
SEVERITY_ORDER: tuple[str, ...] = (
    "Pericardial effusion",
    "Pleural effusion",
    "Consolidation",
    "Lung nodule",
    "Lymphadenopathy",
    "Lung opacity",
    "Interlobular septal thickening",
    "Pulmonary fibrotic sequela",
    "Atelectasis",
    "Cardiomegaly",
    "Bronchiectasis",
    "Emphysema",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Coronary artery wall calcification",
    "Arterial wall calcification",
    "Hiatal hernia",
    "Medical material",
)


def collect_features(result: Mapping[str, Any]) -> dict[str, float]:
    """Every numeric model output in a result JSON under its feature name (:mod:`processor.steps.ports`).

    The steps give the same dict through the ``features`` port; this derives it from the JSON.
    """
    features = {k: float(v) for k, v in (result.get("features") or {}).items() if is_number(v)}
    for sid, entry in (result.get("models") or {}).items():
        kind = str(entry.get("kind") or sid)
        prefix = KIND_PREFIX.get(kind, kind)
        for finding, p in (entry.get("probabilities") or {}).items():
            if is_number(p):
                features.setdefault(f"{prefix}.{finding}", float(p))
    lungs = result.get("lungs") or {}
    for key in LUNG_FEATURES:
        if is_number(lungs.get(key)):
            features.setdefault(f"lungs.{key}", float(lungs[key]))
    return features


class _WeightedStep(Step):
    """Shared plumbing: the step id, the model cache (shared, or this step's own) and checksums."""

    def __init__(self, params: Params, env: StepEnv) -> None:
        super().__init__(params, env)
        self._own: dict[Any, Any] = {}

    @property
    def sid(self) -> str:
        return getattr(self, "step_id", "") or self.uses

    def cached(self, key: Any, loader: Any) -> Any:
        if self.env.models is not None:
            return self.env.models.get(key, loader)
        if key not in self._own:
            self._own.clear()
            self._own[key] = loader()
        return self._own[key]

    def digest(self, path: Path) -> str:
        if self.env.models is not None and hasattr(self.env.models, "digest"):
            return str(self.env.models.digest(path))
        from processor.models.cache import sha256_file

        return sha256_file(path)


# ---------------------------------------------------------------------------------------- head
class HeadParams(Params):
    checkpoint: str = Field("weights/head/", description="folder written by `python run.py fit-head`")


class CtclipHead(_WeightedStep):
    uses = "ctclip.head"
    summary = (
        "The site's supervised head (linear or 1-hidden-layer MLP, trained by fit-head) on the CT-CLIP "
        "image latent: per-finding probabilities."
    )
    Params = HeadParams
    needs = (CTCLIP_LATENT,)
    provides = (FEATURES, SCORES)

    def folder(self) -> Path:
        return self.env.path(self.params.checkpoint)  # type: ignore[attr-defined]

    def weight_files(self) -> list[Path]:
        from processor.models.head import CARD_NAME, WEIGHTS_NAME

        return [self.folder() / WEIGHTS_NAME, self.folder() / CARD_NAME]

    def run(self, ctx: StudyContext) -> None:
        import torch

        from processor.models.head import load_head

        folder = self.folder()
        head = self.cached(("ctclip.head", str(folder)), lambda: load_head(folder, self.env.device))
        latent = np.asarray(ctx.values[CTCLIP_LATENT.name], dtype=np.float32).ravel()
        expected = head.card["architecture"]["in_dim"]
        if latent.size != expected:
            raise StepError(
                f"the CT-CLIP latent has {latent.size} values but the head in {folder} was trained "
                f"on {expected}. Fix: refit the head (fit-head) on latents of this CT-CLIP model."
            )
        device = next(head.model.parameters()).device
        probs = head.model.probabilities(torch.from_numpy(latent)[None].to(device))[0].cpu().numpy()
        probabilities = {f: round(float(p), 6) for f, p in zip(head.findings, probs, strict=True)}
        thresholds = head.card.get("thresholds", {})
        ctx.result.setdefault("models", {})[self.sid] = {
            "kind": "ctclip_head",
            "model": str(head.weights_path.relative_to(folder.parent)),
            "sha256": self.digest(head.weights_path),
            "trained": head.card.get("date"),
            "training_set_hash": head.card.get("training_set_hash"),
            "thresholds": thresholds,
            "probabilities": probabilities,
        }
        named = {f"head.{f}": p for f, p in probabilities.items()}
        ctx.result.setdefault("features", {}).update(named)
        add_features(ctx, named, replace=True)
        add_scores(ctx, ModelScores(self.sid, KIND_PREFIX["ctclip_head"], probabilities, thresholds))
        log.info("head.done study=%s step=%s findings=%d", ctx.label, self.sid, len(probabilities))


# ---------------------------------------------------------------------------------------- fusion
class FusionParams(Params):
    model: str = Field("weights/fusion/model.txt", description="LightGBM model file written by fit-fusion")
    card: str | None = Field(None, description="its card.json (default: card.json beside the model)")
    threshold: float | None = Field(None, ge=0, le=1, description="override the card's fitted threshold")


class FusionLightGBM(_WeightedStep):
    uses = "fusion.lightgbm"
    summary = (
        "LightGBM fusion (fit-fusion) of every model's outputs into probability_of_pathology, with "
        "per-model SHAP contributions; missing features are NaN, so a partial ensemble still fuses."
    )
    Params = FusionParams
    needs = (FEATURES,)
    provides = (FUSION,)

    def paths(self) -> tuple[Path, Path]:
        p: FusionParams = self.params  # type: ignore[assignment]
        model = self.env.path(p.model)
        return model, self.env.path(p.card) if p.card else model.with_name("card.json")

    def weight_files(self) -> list[Path]:
        return list(self.paths())

    def check(self) -> list[str]:
        model, card = self.paths()
        if not (model.exists() and card.exists()):
            return []  # skipped at run time, with the missing path
        try:
            self.load()
        except WeightsError as exc:
            return [str(exc)]
        return []

    def load(self) -> FusedModel:
        model, card = self.paths()
        return self.cached(("fusion.lightgbm", str(model)), lambda: FusedModel(model, card))  # type: ignore[no-any-return]

    def run(self, ctx: StudyContext) -> None:
        p: FusionParams = self.params  # type: ignore[assignment]
        fused = self.load()
        probability, by_feature, bias, missing = fused.predict(ctx.values[FEATURES.name])
        by_model: dict[str, float] = {}
        for name, value in by_feature.items():
            group = name.split(".", 1)[0]
            by_model[group] = by_model.get(group, 0.0) + value
        threshold = p.threshold if p.threshold is not None else fused.threshold
        out = FusionOutput(
            probability=round(probability, 6),
            threshold=threshold,
            finding_thresholds={
                f: t["threshold"] for f, t in fused.card.get("finding_thresholds", {}).items()
            },
            contributions={
                "units": "log-odds (SHAP, LightGBM pred_contrib)",
                "bias": round(bias, 6),
                "by_model": {k: round(v, 6) for k, v in sorted(by_model.items())},
                "by_feature": {k: round(v, 6) for k, v in by_feature.items()},
            },
        )
        ctx.values[FUSION.name] = out
        ctx.result["fusion"] = {
            "model": fused.model_path.name,
            "sha256": self.digest(fused.model_path),
            "trained": fused.card.get("date"),
            "data_hash": fused.card.get("data_hash"),
            "probability": out.probability,
            "threshold": threshold,
            "threshold_source": "pipeline"
            if p.threshold is not None
            else fused.card.get("threshold_rule", "card"),
            "features_used": len(fused.names) - len(missing),
            "features_missing": missing,
            "contributions": out.contributions,
            "finding_thresholds": out.finding_thresholds,
        }
        if missing:
            ctx.warnings.append(
                f"fusion: {len(missing)} of {len(fused.names)} features missing (fused as NaN): "
                + ", ".join(missing[:5])
                + (" …" if len(missing) > 5 else "")
            )
        log.info(
            "fusion.done study=%s p=%.4f threshold=%.4f missing=%d",
            ctx.label,
            probability,
            threshold,
            len(missing),
        )


# ---------------------------------------------------------------------------------------- decision
def finding_probabilities(
    scores: Sequence[ModelScores], sources: Sequence[str]
) -> dict[str, tuple[float, str, float | None]]:
    """finding → (probability, feature name, the model's own fitted threshold), first source wins.

    Within a source the first model (in run order) that gives a finding wins.
    """
    by_prefix: dict[str, dict[str, tuple[float, str, float | None]]] = {}
    for entry in scores:
        for finding, prob in entry.probabilities.items():
            if is_number(prob):
                by_prefix.setdefault(entry.source, {}).setdefault(
                    finding, (float(prob), f"{entry.source}.{finding}", entry.thresholds.get(finding))
                )
    out: dict[str, tuple[float, str, float | None]] = {}
    for prefix in sources:
        for finding, value in by_prefix.get(prefix, {}).items():
            out.setdefault(finding, value)
    return out


def most_dangerous(
    findings: Mapping[str, float], thresholds: Mapping[str, float], severity_order: Sequence[str]
) -> tuple[str | None, list[str]]:
    """(most dangerous finding or NO_PATHOLOGY, every finding at or above its threshold, most severe first).

    ``None`` when there are no findings at all. Order: position in ``severity_order`` (unlisted
    after all listed), then higher probability, then name.
    """
    if not findings:
        return None, []
    rank = {name: i for i, name in enumerate(severity_order)}
    positive = [f for f, p in findings.items() if p >= thresholds[f]]
    positive.sort(key=lambda f: (rank.get(f, len(rank)), -findings[f], f))
    return (positive[0] if positive else NO_PATHOLOGY), positive


def decide(
    probability: float | None,
    threshold: float | None,
    findings: Mapping[str, float],
    thresholds: Mapping[str, float],
    severity_order: Sequence[str],
) -> dict[str, Any]:
    """The decision fields from the fused probability and the per-finding probabilities (pure)."""
    reasons = []
    if probability is None:
        pathology = None
        reasons.append("no fusion model ran, so probability_of_pathology and pathology are null")
    else:
        if threshold is None:
            raise ValueError("a fused probability needs a threshold")
        pathology = int(probability >= threshold)
    worst, positive = most_dangerous(findings, thresholds, severity_order)
    if worst is None:
        reasons.append(
            "no model produced per-finding probabilities, so most_dangerous_pathology_type is null"
        )
    return {
        "probability_of_pathology": None if probability is None else round(float(probability), 6),
        "pathology": pathology,
        "most_dangerous_pathology_type": worst,
        "threshold": threshold,
        "reason": "; ".join(reasons) or None,
        "findings_above_threshold": positive,
    }


class DecisionParams(Params):
    severity_order: list[str] = Field(
        list(SEVERITY_ORDER), description="findings from most to least dangerous"
    )
    finding_threshold: float = Field(0.5, ge=0, le=1, description="default per-finding threshold")
    finding_thresholds: dict[str, float] = Field(
        {}, description="per-finding thresholds (override fitted ones)"
    )
    sources: list[str] = Field(
        ["head", "lipro", "zs"], min_length=1, description="per-finding probability sources, preferred first"
    )

    @field_validator("severity_order")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        dupes = sorted({v for v in value if value.count(v) > 1})
        if dupes:
            raise ValueError(f"{dupes[0]!r} is listed twice; list each finding once")
        return value

    @field_validator("finding_thresholds")
    @classmethod
    def _in_range(cls, value: dict[str, float]) -> dict[str, float]:
        for name, t in value.items():
            if not 0 <= t <= 1:
                raise ValueError(f"threshold for {name!r} is {t}; thresholds are between 0 and 1")
        return value


class DecisionPathology(Step):
    uses = "decision.pathology"
    summary = (
        "The API decision fields: probability_of_pathology and pathology from the fusion step (null "
        "without one), most_dangerous_pathology_type by severity order and per-finding thresholds."
    )
    Params = DecisionParams
    optional_needs = (FUSION, SCORES)

    def run(self, ctx: StudyContext) -> None:
        p: DecisionParams = self.params  # type: ignore[assignment]
        fusion: FusionOutput | None = ctx.values.get(FUSION.name)
        found = finding_probabilities(ctx.values.get(SCORES.name, []), p.sources)
        fitted = fusion.finding_thresholds if fusion else {}
        thresholds, threshold_from = {}, {}
        for finding, (_, _, own) in found.items():
            for source, value in (
                ("pipeline", p.finding_thresholds.get(finding)),
                ("fusion card", fitted.get(finding)),
                ("model card", own),
                ("default", p.finding_threshold),
            ):
                if value is not None:
                    thresholds[finding], threshold_from[finding] = float(value), source
                    break
        decision = decide(
            fusion.probability if fusion else None,
            fusion.threshold if fusion else None,
            {f: v[0] for f, v in found.items()},
            thresholds,
            p.severity_order,
        )
        decision["contributions"] = fusion.contributions if fusion else None
        decision["findings"] = {
            f: {
                "probability": v[0],
                "source": v[1],
                "threshold": thresholds[f],
                "threshold_from": threshold_from[f],
                "positive": v[0] >= thresholds[f],
            }
            for f, v in found.items()
        }
        ctx.result["decision"] = decision
        log.info(
            "decision.done study=%s p=%s pathology=%s most_dangerous=%r",
            ctx.label,
            decision["probability_of_pathology"],
            decision["pathology"],
            decision["most_dangerous_pathology_type"],
        )


def register(registry: StepRegistry) -> None:
    for cls in (CtclipHead, FusionLightGBM, DecisionPathology):
        registry.register(cls)
