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
  number). ``most_dangerous_pathology_type`` agrees with ``pathology`` by construction:

  ================ ========================================== ====================================
  pathology        per-finding probabilities                  most_dangerous_pathology_type
  ================ ========================================== ====================================
  null (no fusion) any                                        null — "no fusion model, so no
                                                              decision"
  0                any (even findings above their thresholds) "No significant pathology"
  1                one or more at or above a fitted threshold the most severe of those (rule below)
  1                none at or above a fitted threshold        null — "pathology is 1 but no finding
                                                              reached its fitted threshold"
  1                none has a fitted threshold (zero-shot     null — "… no finding has a fitted
                   only, no card thresholds)                  threshold"
  1                none at all                                null — "… no model gave per-finding
                                                              probabilities"
  ================ ========================================== ====================================

  A finding's threshold comes from the pipeline's ``finding_thresholds`` (a deliberate site
  choice, ``threshold_from: pipeline``), else the fusion card's fitted ``finding_thresholds``
  (``fusion card``), else the card of the model that gave the probability (``model card``, the
  head's ``thresholds``). There is no default: a finding without one has ``threshold`` and
  ``positive`` null and never counts — zero-shot probabilities are a two-way softmax and sigmoid
  outputs are uncalibrated, so 0.5 means nothing. The rule (``MOST_DANGEROUS_RULE``, written into
  every decision as ``most_dangerous_rule``): among the findings at or above their threshold, the
  first in ``severity_order`` (unlisted ones after all listed), then the larger margin (probability
  minus threshold), then the name. ``reason`` explains every null.

Feature names and the ports are listed in :mod:`processor.steps.ports`; :func:`collect_features`
derives the same features from a result JSON.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from processor.errors import StepError, WeightsError
from processor.models.fusion import FusedModel
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StepEnv, StudyContext
from processor.steps import binding
from processor.steps.ports import (
    CTCLIP_LATENT,
    FEATURE_MODELS,
    FEATURES,
    FUSION,
    KIND_PREFIX,
    LATENT_MODELS,
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
# Where a finding's threshold may come from, in precedence order; there is no default.
THRESHOLD_SOURCES: tuple[str, ...] = ("pipeline", "fusion card", "model card")
MOST_DANGEROUS_RULE = (
    "pathology 1: among findings at or above their threshold (pipeline finding_thresholds, else the "
    "fusion card's, else the model card's; never a default), the first in severity_order (unlisted "
    "after listed), then the larger probability - threshold, then name; none: null. pathology 0: "
    f"{NO_PATHOLOGY!r}. No fusion model: null"
)
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
HEAD_WEIGHTS, HEAD_CARD = "head.pt", "card.json"  # processor.models.head's names (it imports torch)


class HeadParams(Params):
    checkpoint: str = Field("weights/head/", description="folder written by `python run.py fit-head`")


def usable_thresholds(card: Mapping[str, Any]) -> dict[str, float]:
    """A head card's per-finding thresholds, without those of findings where the card's own CV says
    the head is no better than chance: a finding is never called on such a threshold."""
    per_finding = (card.get("cv") or {}).get("per_finding") or {}
    return {
        f: float(t)
        for f, t in (card.get("thresholds") or {}).items()
        if is_number(t) and (per_finding.get(f) or {}).get("better_than_chance", True)
    }


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
        return [self.folder() / HEAD_WEIGHTS, self.folder() / HEAD_CARD]

    def output_sha256(self, output: str) -> str | None:
        weights = self.folder() / HEAD_WEIGHTS
        return self.digest(weights) if output == KIND_PREFIX["ctclip_head"] and weights.is_file() else None

    def bind(self, earlier: Sequence[Step]) -> list[str]:
        """Refuse a head whose card says it was trained on another CT-CLIP checkpoint's latents."""
        return binding.head_bind(self.folder(), binding.read_card(self.folder() / HEAD_CARD), earlier)

    def _check_provenance(self, ctx: StudyContext, card: Mapping[str, Any], folder: Path) -> None:
        found = binding.head_trained_sha(card)
        if found is None:
            ctx.warnings.append(binding.head_unknown(folder))
            return
        latent, trained = found
        current = (ctx.values.get(LATENT_MODELS) or {}).get(latent)
        if trained is None:  # fitted on latents whose checkpoint was not recorded
            ctx.warnings.append(binding.head_unknown(folder))
        elif current is not None and current != trained:
            raise StepError(binding.head_message(folder, trained, current))

    def run(self, ctx: StudyContext) -> None:
        from processor.models.head import load_head

        folder = self.folder()
        head = self.cached(("ctclip.head", str(folder)), lambda: load_head(folder, self.env.device))
        self._check_provenance(ctx, head.card, folder)
        latent = np.asarray(ctx.values[CTCLIP_LATENT.name], dtype=np.float32).ravel()
        expected = head.card["architecture"]["in_dim"]
        if latent.size != expected:
            raise StepError(
                f"the CT-CLIP latent has {latent.size} values but the head in {folder} was trained "
                f"on {expected}. Fix: refit the head (fit-head) on latents of this CT-CLIP model."
            )
        probs = head.probabilities(latent)  # calibrated with the card's per-finding maps
        probabilities = {f: round(float(p), 6) for f, p in zip(head.findings, probs, strict=True)}
        thresholds = usable_thresholds(head.card)
        weak = sorted(set(head.card.get("thresholds", {})) - set(thresholds))
        if weak:
            ctx.warnings.append(
                f"head: no threshold used for {', '.join(weak)}: its card says the head is no better "
                "than chance there (95% CI of the CV AUROC includes 0.5)"
            )
        weights_sha = self.digest(head.weights_path)  # in the result and with each feature (provenance)
        ctx.result.setdefault("models", {})[self.sid] = {
            "kind": "ctclip_head",
            "model": str(head.weights_path.relative_to(folder.parent)),
            "sha256": weights_sha,
            "trained": head.card.get("date"),
            "training_set_hash": head.card.get("training_set_hash"),
            "thresholds": thresholds,
            "probabilities": probabilities,
        }
        named = {f"head.{f}": p for f, p in probabilities.items()}
        ctx.result.setdefault("features", {}).update(named)
        add_features(ctx, named, replace=True, model_sha256=weights_sha)
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

    def bind(self, earlier: Sequence[Step]) -> list[str]:
        """Refuse a booster whose card says a feature came from another checkpoint than the earlier
        step giving it here (zs/lipro: the CT-CLIP checkpoint, head: head.pt, anomaly: its UNet)."""
        model, card = self.paths()
        if not (model.exists() and card.exists()):
            return []
        try:
            fused = self.load()
        except WeightsError:
            return []  # reported by check()
        return binding.fusion_bind(model, fused.card, earlier)

    def _check_provenance(self, ctx: StudyContext, fused: FusedModel, missing: Sequence[str]) -> None:
        trained = binding.fusion_trained(fused.card)
        if trained is None:
            ctx.warnings.append(binding.fusion_unknown(fused.model_path))
            return
        used = [name for name in fused.names if name not in set(missing)]
        found = binding.mismatches(trained, ctx.values.get(FEATURE_MODELS) or {}, used)
        if found:
            raise StepError(binding.fusion_message(fused.model_path, found))
        current = ctx.values.get(FEATURE_MODELS) or {}
        unbound = [n for n in used if trained.get(n) is None and current.get(n) is not None]
        if unbound:  # model outputs it was fitted on without a recorded checkpoint
            ctx.warnings.append(
                binding.fusion_unknown(fused.model_path) + " Unbound: " + ", ".join(unbound[:5])
            )

    def run(self, ctx: StudyContext) -> None:
        p: FusionParams = self.params  # type: ignore[assignment]
        fused = self.load()
        prediction = fused.predict(ctx.values[FEATURES.name])
        probability, by_feature, bias, missing = (
            prediction.probability,
            prediction.by_feature,
            prediction.bias,
            prediction.missing,
        )
        self._check_provenance(ctx, fused, missing)
        by_model: dict[str, float] = {}
        for name, value in by_feature.items():
            group = name.split(".", 1)[0]
            by_model[group] = by_model.get(group, 0.0) + value
        threshold = p.threshold if p.threshold is not None else fused.threshold
        out = FusionOutput(
            probability=round(probability, 6),
            threshold=threshold,
            # a threshold fitted where its feature is no better than chance calls nothing
            finding_thresholds={
                f: t["threshold"]
                for f, t in fused.card.get("finding_thresholds", {}).items()
                if t.get("better_than_chance", True)
            },
            finding_threshold_features={
                f: t["feature"]
                for f, t in fused.card.get("finding_thresholds", {}).items()
                if isinstance(t.get("feature"), str)
            },
            finding_thresholds_vetoed={
                f: t["feature"]
                for f, t in fused.card.get("finding_thresholds", {}).items()
                if isinstance(t.get("feature"), str) and t.get("better_than_chance", True) is False
            },
            contributions={
                "units": "log-odds of raw_probability (SHAP, LightGBM pred_contrib)",
                "bias": round(bias, 6),
                "by_model": {k: round(v, 6) for k, v in sorted(by_model.items())},
                "by_feature": {k: round(v, 6) for k, v in by_feature.items()},
            },
        )
        ctx.values[FUSION.name] = out
        if (fused.card.get("cv") or {}).get("better_than_chance") is False:
            ctx.warnings.append(
                f"fusion: {fused.model_path} is no better than chance by its own card (installed with "
                "--force): probability_of_pathology and pathology carry no evidence"
            )
        if out.finding_thresholds_vetoed:
            ctx.warnings.append(
                "fusion: no threshold for "
                + ", ".join(f"{f} ({feature})" for f, feature in out.finding_thresholds_vetoed.items())
                + ": the fusion card says these outputs are no better than chance"
            )
        ctx.result["fusion"] = {
            "model": fused.model_path.name,
            "sha256": self.digest(fused.model_path),
            "trained": fused.card.get("date"),
            "data_hash": fused.card.get("data_hash"),
            "probability": out.probability,
            "raw_probability": round(prediction.raw, 6),
            "calibration": fused.calibration.method,
            "threshold": threshold,
            "threshold_source": "pipeline"
            if p.threshold is not None
            else fused.card.get("threshold_rule", "card"),
            "features_used": len(fused.names) - len(missing),
            "features_missing": missing,
            "contributions": out.contributions,
            "finding_thresholds": out.finding_thresholds,
            "finding_threshold_features": out.finding_threshold_features,
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
@dataclass(frozen=True)
class Finding:
    """One finding: its probability, the feature it came from, and its threshold when one is fitted.

    ``threshold_from`` is one of :data:`THRESHOLD_SOURCES`, or None with ``threshold`` None: the
    finding has no fitted threshold and is never judged (``positive`` None), never on a default.
    """

    probability: float
    source: str
    threshold: float | None = None
    threshold_from: str | None = None

    @property
    def positive(self) -> bool | None:
        return None if self.threshold is None else self.probability >= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {
            "probability": self.probability,
            "source": self.source,
            "threshold": self.threshold,
            "threshold_from": self.threshold_from,
            "positive": self.positive,
        }


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


def with_thresholds(
    found: Mapping[str, tuple[float, str, float | None]],
    pipeline: Mapping[str, float],
    fusion_card: Mapping[str, float],
    fusion_features: Mapping[str, str] | None = None,
    fusion_vetoed: Mapping[str, str] | None = None,
) -> dict[str, Finding]:
    """Each finding with its threshold: the pipeline's, else the fusion card's, else the model card's.

    A fusion-card threshold was fitted on one feature (``fusion_features``: finding → feature name);
    it is used only when the finding's probability comes from that same feature. When the card
    found that feature no better than chance (``fusion_vetoed``), the finding gets no threshold at
    all (unless the site set one): the model card's own is not used in its place.
    """
    out = {}
    fusion_features, fusion_vetoed = fusion_features or {}, fusion_vetoed or {}
    for name, (probability, source, own) in found.items():
        out[name] = Finding(probability, source)
        if fusion_vetoed.get(name) == source and pipeline.get(name) is None:
            continue  # the fusion card found this very output no better than chance: never called
        fitted_on = fusion_features.get(name)
        card = fusion_card.get(name) if fitted_on in (None, source) else None
        candidates = (pipeline.get(name), card, own)
        for origin, value in zip(THRESHOLD_SOURCES, candidates, strict=True):
            if value is not None and is_number(value):  # a NaN in a card is no threshold
                out[name] = Finding(probability, source, float(value), origin)
                break
    return out


def rank_positive(findings: Mapping[str, Finding], severity_order: Sequence[str]) -> list[str]:
    """The findings at or above their threshold, most dangerous first (:data:`MOST_DANGEROUS_RULE`)."""
    rank = {name: i for i, name in enumerate(severity_order)}
    margins = {
        name: f.probability - f.threshold
        for name, f in findings.items()
        if f.threshold is not None and f.positive
    }
    return sorted(margins, key=lambda name: (rank.get(name, len(rank)), -margins[name], name))


def _no_finding_reason(findings: Mapping[str, Finding]) -> str:
    """Why pathology is 1 but most_dangerous_pathology_type is null."""
    if not findings:
        return "pathology is 1 but no model gave per-finding probabilities"
    if all(f.threshold is None for f in findings.values()):
        return (
            "pathology is 1 but no finding has a fitted threshold (fusion card, model card or the "
            "pipeline's finding_thresholds); a default threshold on uncalibrated probabilities is "
            "never used"
        )
    return "pathology is 1 but no finding reached its fitted threshold"


def decide(
    probability: float | None,
    threshold: float | None,
    findings: Mapping[str, Finding],
    severity_order: Sequence[str],
) -> dict[str, Any]:
    """The decision fields from the fused probability and the findings (pure).

    Follows the truth table in the module docstring; ``reason`` explains every null.
    """
    positive = rank_positive(findings, severity_order)
    reasons: list[str] = []
    worst: str | None = None
    if probability is None:
        pathology = None
        reasons.append(
            "no fusion model, so no decision: probability_of_pathology, pathology and "
            "most_dangerous_pathology_type are null"
        )
    else:
        if threshold is None:
            raise ValueError("a fused probability needs a threshold")
        pathology = int(probability >= threshold)
        if pathology == 0:
            worst = NO_PATHOLOGY
            if positive:
                reasons.append(
                    f"pathology is 0, so {NO_PATHOLOGY!r}, although {', '.join(positive)} reached "
                    + ("its threshold" if len(positive) == 1 else "their thresholds")
                    + ": the fused decision rules"
                )
        elif positive:
            worst = positive[0]
        else:
            reasons.append(_no_finding_reason(findings) + ", so most_dangerous_pathology_type is null")
    unfitted = sorted(name for name, f in findings.items() if f.threshold is None)
    if unfitted:
        reasons.append(
            f"{len(unfitted)} finding(s) have no fitted threshold ({', '.join(unfitted[:3])}"
            + (" …" if len(unfitted) > 3 else "")
            + "), so their threshold and positive are null"
        )
    return {
        "probability_of_pathology": None if probability is None else round(float(probability), 6),
        "pathology": pathology,
        "most_dangerous_pathology_type": worst,
        "most_dangerous_rule": MOST_DANGEROUS_RULE,
        "threshold": threshold,
        "reason": "; ".join(reasons) or None,
        "findings_above_threshold": positive,
        "findings": {name: f.as_dict() for name, f in findings.items()},
    }


class DecisionParams(Params):
    severity_order: list[str] = Field(
        list(SEVERITY_ORDER),
        description=(
            "findings from most to least dangerous: when pathology is 1, most_dangerous_pathology_type "
            "is the first of those at or above their threshold (unlisted after listed, then the larger "
            "probability - threshold, then name)"
        ),
    )
    finding_thresholds: dict[str, float] = Field(
        {},
        description=(
            "site-chosen per-finding thresholds (threshold_from: pipeline); they override the fusion "
            "card's and the model card's fitted ones. A finding with no threshold here or in a "
            "fitted card never counts"
        ),
    )
    sources: list[str] = Field(
        ["head", "lipro", "zs"], min_length=1, description="per-finding probability sources, preferred first"
    )

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "finding_threshold" in data:
            raise PydanticCustomError(
                "extra_forbidden",
                "`finding_threshold` was removed: one default threshold on uncalibrated probabilities "
                "named findings that contradicted `pathology`. Thresholds now come from the fusion "
                "card (fit-fusion with a label column per finding) or the head's card (fit-head); to "
                "choose one as a site, set it per finding under `finding_thresholds`",
            )
        return data

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
        "without one); most_dangerous_pathology_type only when pathology is 1, the most severe finding "
        "at or above a fitted (or site-set) threshold, never a default one."
    )
    Params = DecisionParams
    optional_needs = (FUSION, SCORES)

    def run(self, ctx: StudyContext) -> None:
        p: DecisionParams = self.params  # type: ignore[assignment]
        fusion: FusionOutput | None = ctx.values.get(FUSION.name)
        found = finding_probabilities(ctx.values.get(SCORES.name, []), p.sources)
        findings = with_thresholds(
            found,
            p.finding_thresholds,
            fusion.finding_thresholds if fusion else {},
            fusion.finding_threshold_features if fusion else {},
            fusion.finding_thresholds_vetoed if fusion else {},
        )
        decision = decide(
            fusion.probability if fusion else None,
            fusion.threshold if fusion else None,
            findings,
            p.severity_order,
        )
        decision["contributions"] = fusion.contributions if fusion else None
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
