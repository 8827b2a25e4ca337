"""Binary-classification metrics, patient-grouped folds, a metrics table and a ROC plot (Pillow).

AUROC and the ROC curve are scikit-learn's (``roc_auc_score``, ``roc_curve``); tied scores count
one half. The AUROC's 95 % interval is a percentile bootstrap that resamples patients, not scans
(:func:`processor.fit.calibration.bootstrap_auroc_ci`), so two scans of one patient move together.
Folds: ``StratifiedGroupKFold`` — every study of a patient lands in the same fold. Thresholds:
Youden's J (max sensitivity + specificity − 1) or the highest threshold that reaches a target
sensitivity. A case is positive when ``score >= threshold`` (the same rule as the ``decision`` step).
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def labels_and_scores(
    y: Sequence[float] | np.ndarray, s: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, scores)`` as flat float arrays, checked: the same length, labels 0 or 1.
    ValueError otherwise."""
    y_arr = np.asarray(y, dtype=float).ravel()
    s_arr = np.asarray(s, dtype=float).ravel()
    if y_arr.shape != s_arr.shape:
        raise ValueError(f"labels ({y_arr.size}) and scores ({s_arr.size}) differ in length")
    if not np.isin(y_arr, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y_arr, s_arr


def _arrays(
    y: Sequence[float] | np.ndarray, s: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y_arr, s_arr = labels_and_scores(y, s)
    return y_arr.astype(bool), s_arr


def auroc(y: Sequence[float] | np.ndarray, s: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN when one class only."""
    from sklearn.metrics import roc_auc_score

    pos, scores = _arrays(y, s)
    if pos.all() or not pos.any():
        return float("nan")
    return float(roc_auc_score(pos, scores))


def roc_curve(
    y: Sequence[float] | np.ndarray, s: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds descending; the first point is (0, 0) at +inf.

    ``sklearn.metrics.roc_curve`` with every distinct score kept as a threshold.
    """
    from sklearn.metrics import roc_curve as sk_roc_curve

    pos, scores = _arrays(y, s)
    if pos.all() or not pos.any():  # sklearn warns and returns NaN rates: say it plainly instead
        raise ValueError("a ROC curve needs positive and negative cases")
    fpr, tpr, thresholds = sk_roc_curve(pos, scores, drop_intermediate=False)
    return fpr, tpr, thresholds


def decided_sensitivity_specificity(y: np.ndarray, called: np.ndarray) -> tuple[float, float]:
    """Sensitivity and specificity of yes/no calls (``called``) against labels ``y`` (0/1)."""
    pos, called = np.asarray(y, dtype=bool), np.asarray(called, dtype=bool)
    sens = float((called & pos).sum() / pos.sum()) if pos.any() else float("nan")
    spec = float((~called & ~pos).sum() / (~pos).sum()) if (~pos).any() else float("nan")
    return sens, spec


def youden_threshold(y: Sequence[float] | np.ndarray, s: Sequence[float] | np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity − 1 (ties: the higher threshold)."""
    fpr, tpr, thresholds = roc_curve(y, s)
    j = tpr[1:] - fpr[1:]
    return float(thresholds[1:][int(np.argmax(j))])


def threshold_for_sensitivity(
    y: Sequence[float] | np.ndarray, s: Sequence[float] | np.ndarray, target: float
) -> float:
    """The highest threshold whose sensitivity is at least ``target`` (best specificity for it)."""
    if not 0 < target <= 1:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    _, tpr, thresholds = roc_curve(y, s)
    ok = np.flatnonzero(tpr[1:] >= target - 1e-12)
    return float(thresholds[1:][ok[0]])


@dataclass(frozen=True)
class BinaryReport:
    n: int
    positives: int
    auroc: float
    auroc_low: float
    auroc_high: float
    threshold: float
    sensitivity: float
    specificity: float

    @property
    def better_than_chance(self) -> bool:
        """True when the 95 % interval of the AUROC lies above 0.5."""
        return not math.isnan(self.auroc_low) and self.auroc_low > 0.5

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "positives": self.positives,
            "auroc": _r(self.auroc),
            "auroc_ci95": [_r(self.auroc_low), _r(self.auroc_high)],
            "threshold": _r(self.threshold),
            "sensitivity": _r(self.sensitivity),
            "specificity": _r(self.specificity),
            "better_than_chance": self.better_than_chance,
        }


def _r(value: float) -> float | None:
    return None if value is None or math.isnan(value) else round(float(value), 4)


def binary_report(
    y: Sequence[float] | np.ndarray,
    s: Sequence[float] | np.ndarray,
    threshold: float,
    *,
    groups: Sequence[str] | None = None,
    called: np.ndarray | None = None,
    seed: int = 0,
) -> BinaryReport:
    """AUROC with a patient-grouped bootstrap 95 % CI, and sensitivity/specificity.

    ``called``: the yes/no calls to score (e.g. each held-out fold thresholded at the threshold
    chosen inside its own training folds); default ``s >= threshold``.
    """
    from processor.fit.calibration import bootstrap_auroc_ci

    pos, scores = _arrays(y, s)
    auc = auroc(pos, scores)
    if math.isnan(auc):
        low = high = float("nan")
    else:
        low, high = bootstrap_auroc_ci(pos.astype(float), scores, groups=groups, seed=seed)
    if called is None:
        called = scores >= threshold
    sens, spec = decided_sensitivity_specificity(pos, called)
    return BinaryReport(int(pos.size), int(pos.sum()), auc, low, high, threshold, sens, spec)


def grouped_folds(
    strata: Sequence[object] | np.ndarray,
    groups: Sequence[str] | np.ndarray,
    k: int,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs: every row of a group (patient) in one fold, strata balanced.

    ``sklearn.model_selection.StratifiedGroupKFold(k, shuffle=True, random_state=seed)``. Raises
    ValueError when there are fewer groups than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    strata_arr = np.asarray([str(s) for s in strata])
    # groups numbered by first appearance: the folds depend on the data and the seed only, not on
    # the spelling of the (keyed, per-database) patient pseudonyms
    first: dict[str, int] = {}
    group_arr = np.asarray([first.setdefault(str(g), len(first)) for g in groups])
    if k < 2:
        raise ValueError("cross-validation needs at least 2 folds")
    if np.unique(group_arr).size < k:
        raise ValueError(f"{np.unique(group_arr).size} patients cannot be split into {k} folds")
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        # sklearn warns when a stratum has fewer patients than folds; the folds are still valid
        warnings.filterwarnings("ignore", message=".*least populated class.*", category=UserWarning)
        folds = list(splitter.split(np.zeros(strata_arr.size), strata_arr, group_arr))
    return [(np.sort(tr), np.sort(te)) for tr, te in folds if te.size]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with aligned columns (numbers right-aligned)."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.3f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in text)]) for i, h in enumerate(headers)]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows) for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)
        )

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in text)]).rstrip()


COLOURS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


@dataclass(frozen=True)
class UnitSquare:
    """A plot of [0, 1] × [0, 1] on a Pillow image: the frame, the grid and 0.0–1.0 ticks drawn, the
    diagonal in grey. ``xy`` maps data to pixels; ``left, top, right, bottom`` bound the plot."""

    image: Image.Image
    draw: ImageDraw.ImageDraw
    font: Any
    left: int
    top: int
    right: int
    bottom: int

    @classmethod
    def new(cls, size: int, extra_height: int = 0) -> UnitSquare:
        image = Image.new("RGB", (size, size + extra_height), "white")
        frame = cls(image, ImageDraw.Draw(image), ImageFont.load_default(), 56, 34, size - 16, size - 46)
        for tick in np.linspace(0, 1, 6):
            x, y = frame.xy(tick, tick)
            frame.draw.line([(x, frame.top), (x, frame.bottom)], fill=(230, 230, 230))
            frame.draw.line([(frame.left, y), (frame.right, y)], fill=(230, 230, 230))
            frame.draw.text((x - 8, frame.bottom + 6), f"{tick:.1f}", fill="black", font=frame.font)
            frame.draw.text((frame.left - 30, y - 6), f"{tick:.1f}", fill="black", font=frame.font)
        frame.draw.rectangle([frame.left, frame.top, frame.right, frame.bottom], outline="black")
        frame.draw.line([frame.xy(0, 0), frame.xy(1, 1)], fill=(160, 160, 160), width=1)
        return frame

    @property
    def width(self) -> int:
        return self.right - self.left

    def xy(self, fx: float, fy: float) -> tuple[float, float]:
        return self.left + fx * self.width, self.bottom - fy * (self.bottom - self.top)

    def png(self) -> bytes:
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()


def roc_png(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    size: int = 560,
    marker: tuple[float, float] | None = None,
) -> bytes:
    """PNG bytes of ROC curves (label → (fpr, tpr)), with the chance diagonal and an optional point."""
    frame = UnitSquare.new(size)
    draw, font, xy = frame.draw, frame.font, frame.xy
    for i, (label, (fpr, tpr)) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        draw.line([xy(float(f), float(t)) for f, t in zip(fpr, tpr, strict=True)], fill=colour, width=2)
        draw.text(
            (frame.left + 8, frame.bottom - 16 - 14 * (len(curves) - 1 - i)), label, fill=colour, font=font
        )
    if marker is not None:
        x, y = xy(*marker)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline="black", width=2)
    draw.text((frame.left, 10), title, fill="black", font=font)
    draw.text(
        (frame.left + frame.width / 2 - 70, size - 22), "1 - specificity (FPR)", fill="black", font=font
    )
    draw.text((4, frame.top - 26), "sensitivity", fill="black", font=font)
    return frame.png()
