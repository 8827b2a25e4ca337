"""A fitted calibration map, applied at run time by the head and fusion steps (numpy only).

Written by the fit commands (:mod:`processor.fit.nested`) into a card's ``calibration`` entry:
``{"method": "isotonic", "x": [...], "y": [...]}`` — ``numpy.interp`` over the breakpoints of
``sklearn.isotonic.IsotonicRegression`` (equal to its ``predict`` with ``out_of_bounds="clip"``) —
or ``{"method": "sigmoid", "a": ..., "b": ...}`` — Platt scaling on the logit,
``1 / (1 + exp(-(a·logit(p) + b)))`` — or ``{"method": "none"}``. Both maps are non-decreasing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(q / (1 - q))


@dataclass(frozen=True)
class Calibration:
    """A non-decreasing map from a model's probability to a calibrated one (JSON round trip)."""

    method: str  # "isotonic" | "sigmoid" | "none"
    params: dict[str, Any] = field(default_factory=dict)

    def apply(self, p: np.ndarray | float) -> np.ndarray:
        """Calibrated probabilities for ``p`` (any shape; NaN stays NaN)."""
        arr = np.asarray(p, dtype=float)
        if self.method == "none":
            return arr
        if self.method == "isotonic":
            out = np.interp(arr, self.params["x"], self.params["y"])
        elif self.method == "sigmoid":
            z = self.params["a"] * logit(arr) + self.params["b"]
            out = 1.0 / (1.0 + np.exp(-z))
        else:
            raise ValueError(f"unknown calibration method {self.method!r}")
        return np.where(np.isnan(arr), np.nan, out)

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, **self.params}

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Calibration:
        """From a card's ``calibration`` entry; a card without one (an older fit) is uncalibrated."""
        if not data:
            return cls("none")
        params = {k: v for k, v in data.items() if k != "method"}
        method = str(data.get("method", "none"))
        if method not in ("none", "isotonic", "sigmoid"):
            raise ValueError(f"unknown calibration method {method!r}")
        return cls(method, params)
