"""The ports the built-in steps exchange through ``ctx.values``: each name with its Python type.

=============== ===================== ============================================================
port            type                  provided by → read by
=============== ===================== ============================================================
series          Series                dicom.select_series → ct.volume
volume          Volume                ct.volume → quantify.lungs, render.key_slices, ctclip.*,
                                      anomaly.diffusion
lung_mask       numpy.ndarray (bool)  quantify.lungs → anomaly.diffusion, render.key_slices (optional)
key_slices      list[KeySlice]        render.key_slices → caption.image_to_text
captions        list[dict]            caption.image_to_text
ctclip_latent   numpy.ndarray (f32)   the first ctclip.* step → ctclip.head; persisted by the recorder
features        dict[str, float]      quantify.lungs, ctclip.*, ctclip.head, anomaly.diffusion →
                                      fusion.lightgbm; persisted by the recorder (``fit-fusion`` reads them)
scores          list[ModelScores]     ctclip.*, ctclip.head → decision.pathology (optional)
fusion          FusionOutput          fusion.lightgbm → decision.pathology (optional)
=============== ===================== ============================================================

Two companion values travel with these ports (they are not ports of their own: a step that
declares the port may read its companion). Both map a name to the sha256 of the checkpoint file
that produced the value — the same digest the step writes as ``sha256`` in its result section,
with ``+bf16``/``+fp16`` appended when a CT-CLIP step ran at that precision (:func:`model_identity`)
— or None for a weight-free value; the recorder stores them as each row's ``model_sha256``:

=============== ===================== ============================================================
value           type                  written by → read by
=============== ===================== ============================================================
feature_models  dict[str, str | None] :func:`add_features`, one entry per feature it adds or
                                      replaces (None: ``lungs.*``) → fusion.lightgbm (binding)
latent_models   dict[str, str | None] :func:`set_latent` (``{"ctclip": sha256}`` from the step whose
                                      latent ``ctclip_latent`` holds) → ctclip.head (binding)
=============== ===================== ============================================================

``features`` is accumulated: every step that has some adds them with :func:`add_features`. Names:
``zs.<finding>`` (ctclip.zero_shot), ``lipro.<finding>`` (ctclip.classify), ``head.<finding>``,
``anomaly.score``, ``lungs.volume_ml``, ``lungs.laa950_percent``, ``lungs.mean_lung_density_hu``;
only finite numbers. A model's probabilities keep the first value given under a name (the first
of two zero-shot steps wins); the values a step also writes into ``result["features"]`` (head,
anomaly) replace earlier ones — the rules :func:`processor.steps.ensemble.collect_features`
applies to the result JSON, so the two always agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from processor.dicom.scan import Series
from processor.dicom.volume import Volume
from processor.pipeline.step import Port, StudyContext

SERIES = Port("series", Series)
VOLUME = Port("volume", Volume)
LUNG_MASK = Port("lung_mask", np.ndarray)
KEY_SLICES = Port("key_slices", list)
CAPTIONS = Port("captions", list)
CTCLIP_LATENT = Port("ctclip_latent", np.ndarray)
FEATURES = Port("features", dict)
SCORES = Port("scores", list)

FEATURE_MODELS = "feature_models"  # companion of FEATURES: name → checkpoint sha256 or None
LATENT_MODELS = "latent_models"  # companion of CTCLIP_LATENT: {"ctclip": checkpoint sha256}

KIND_PREFIX = {"ctclip_zero_shot": "zs", "ctclip_lipro": "lipro", "ctclip_head": "head"}
LUNG_FEATURES = ("volume_ml", "laa950_percent", "mean_lung_density_hu")


@dataclass(frozen=True)
class ModelScores:
    """One model's per-finding probabilities; ``source`` is its feature prefix (zs, lipro, head)."""

    step_id: str
    source: str
    probabilities: Mapping[str, float]
    thresholds: Mapping[str, float] = field(default_factory=dict)  # the model's own fitted ones


@dataclass(frozen=True)
class FusionOutput:
    """What decision.pathology takes from fusion.lightgbm (the same values as ``result["fusion"]``)."""

    probability: float
    threshold: float
    finding_thresholds: Mapping[str, float]
    contributions: Mapping[str, Any]
    # finding → the feature its threshold was fitted on (e.g. "head.Lung nodule"): the threshold
    # holds for that model's probability only, never for another source's
    finding_threshold_features: Mapping[str, str] = field(default_factory=dict)
    # finding → feature whose fitted threshold the card itself says is no better than chance: that
    # model output is never called, not even on its own model's card
    finding_thresholds_vetoed: Mapping[str, str] = field(default_factory=dict)


FUSION = Port("fusion", FusionOutput)


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool): what a feature may hold."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def add_features(
    ctx: StudyContext, values: Mapping[str, Any], *, replace: bool = False, model_sha256: str | None = None
) -> None:
    """Add the finite ``values`` to the ``features`` port (created empty by the first provider).

    ``replace``: a value replaces one already there (head and anomaly); otherwise the first stays.
    ``model_sha256``: the checkpoint the values come from (None: weight-free), recorded in
    ``values["feature_models"]`` for each value that went in, so a name's provenance is always that
    of the value it holds.
    """
    features: dict[str, float] = ctx.values.setdefault(FEATURES.name, {})
    models: dict[str, str | None] = ctx.values.setdefault(FEATURE_MODELS, {})
    for name, value in values.items():
        if not is_number(value) or (name in features and not replace):
            continue
        features[name] = float(value)
        models[name] = model_sha256


def set_latent(ctx: StudyContext, latent: np.ndarray, model_sha256: str, name: str = "ctclip") -> None:
    """Provide ``ctclip_latent`` unless an earlier step did (the first CT-CLIP step's latent wins), with
    its checkpoint's sha256 in ``values["latent_models"][name]``."""
    if CTCLIP_LATENT.name in ctx.values:
        return
    ctx.values[CTCLIP_LATENT.name] = latent
    ctx.values.setdefault(LATENT_MODELS, {})[name] = model_sha256


def add_scores(ctx: StudyContext, scores: ModelScores) -> None:
    """Append one model's per-finding probabilities to the ``scores`` port (in run order)."""
    ctx.values.setdefault(SCORES.name, []).append(scores)


def model_identity(sha256: str, precision: str = "fp32") -> str:
    """What a model output is bound to: the checkpoint's sha256, with ``+bf16`` or ``+fp16``
    appended when the model ran at that precision. Outputs of one checkpoint at two precisions are
    not comparable (bf16 moved the reference model's probabilities by up to 0.12,
    docs/precision.md), so a head or fusion fitted on one refuses the other."""
    return sha256 if precision == "fp32" else f"{sha256}+{precision}"
