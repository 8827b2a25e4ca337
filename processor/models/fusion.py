"""The fusion booster at run time: a LightGBM model file checked against its ``card.json``.

``fit-fusion`` (:mod:`processor.fit.fit_fusion`) writes ``model.txt`` and ``card.json`` (feature
names in order, the fitted threshold, per-finding thresholds); the ``fusion.lightgbm`` step loads
them here. A booster whose feature names differ from its card's is refused: the two came from
different fits. Inside the booster a feature is named by :func:`booster_name` (LightGBM refuses
JSON punctuation and spaces in names such as ``head.Lung nodule``). lightgbm is imported when a
model is loaded, so importing this module stays cheap.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from processor.errors import WeightsError
from processor.models.calibration_map import Calibration


def booster_name(name: str) -> str:
    """The name a feature has inside the booster (LightGBM refuses JSON punctuation and spaces)."""
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class FusedModel:
    """A booster checked against its card: same feature names, in the same order."""

    def __init__(self, model_path: Path, card_path: Path) -> None:
        import lightgbm as lgb

        try:
            self.card: dict[str, Any] = json.loads(card_path.read_text(encoding="utf-8"))
            self.booster = lgb.Booster(model_file=str(model_path))
            self.names: list[str] = list(self.card["feature_names"])
            self.threshold = float(self.card["threshold"])
            self.calibration = Calibration.from_dict(self.card.get("calibration"))
        except (OSError, ValueError, KeyError, TypeError, lgb.basic.LightGBMError) as exc:
            raise WeightsError(
                f"{model_path}: cannot load the fusion model with {card_path.name} ({exc}). "
                "Fix: run `python run.py fit-fusion` again."
            ) from exc
        inner = self.booster.feature_name()
        expected = [booster_name(n) for n in self.names]
        if inner != expected:
            diff = sorted(set(inner) ^ set(expected))[:5] or ["(same names, different order)"]
            raise WeightsError(
                f"{model_path}: the booster's {len(inner)} feature names differ from the "
                f"{len(expected)} in {card_path} (e.g. {', '.join(diff)}); refusing to fuse with "
                "a model and card from different fits. Fix: keep model.txt and card.json from "
                "the same fit-fusion run together."
            )
        self.model_path = model_path

    def predict(self, features: Mapping[str, float]) -> Prediction:
        """The calibrated probability, the booster's own, SHAP contributions and missing features."""
        row = np.array([[features.get(n, np.nan) for n in self.names]], dtype=np.float64)
        raw = float(self.booster.predict(row)[0])
        contrib = self.booster.predict(row, pred_contrib=True)[0]
        by_feature = {n: float(c) for n, c in zip(self.names, contrib[:-1], strict=True)}
        missing = [n for n in self.names if not _finite(features.get(n))]
        probability = float(self.calibration.apply(raw))
        return Prediction(probability, raw, by_feature, float(contrib[-1]), missing)


@dataclass(frozen=True)
class Prediction:
    """One study's fusion output. ``probability``: calibrated (the card's map; what the threshold is
    on); ``raw``: the booster's output; ``by_feature``/``bias``: SHAP values in log-odds of ``raw``."""

    probability: float
    raw: float
    by_feature: dict[str, float]
    bias: float
    missing: list[str]
