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
from pathlib import Path
from typing import Any

import numpy as np

from processor.errors import WeightsError


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
        except (OSError, ValueError, KeyError, lgb.basic.LightGBMError) as exc:
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

    def predict(self, features: Mapping[str, float]) -> tuple[float, dict[str, float], float, list[str]]:
        """(probability, SHAP contribution per feature, bias, missing feature names) for one study."""
        row = np.array([[features.get(n, np.nan) for n in self.names]], dtype=np.float64)
        probability = float(self.booster.predict(row)[0])
        contrib = self.booster.predict(row, pred_contrib=True)[0]
        by_feature = {n: float(c) for n, c in zip(self.names, contrib[:-1], strict=True)}
        missing = [n for n in self.names if not _finite(features.get(n))]
        return probability, by_feature, float(contrib[-1]), missing
