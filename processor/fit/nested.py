"""Nested, patient-grouped cross-validation: honest out-of-fold scores, calibration and thresholds.

The fit commands report what a model will do on *new patients*, so nothing that is reported may
have seen the study it is reported on:

1. **Outer folds** (``StratifiedGroupKFold``, grouped by patient): a model trained on the other
   folds scores each held-out fold → raw out-of-fold (OOF) scores; the AUROC comes from these.
2. **Inside each outer training part**, inner grouped folds give inner OOF scores; on them a
   calibration map is chosen and fitted, and the decision threshold is chosen on the calibrated
   inner scores. That map and that threshold are applied to the held-out fold only. Pooled over
   the folds this gives calibrated OOF probabilities (for the expected calibration error) and
   yes/no calls (for sensitivity and specificity) that no part of the fit has seen.
3. **The installed model** is trained on every study; its calibration map is fitted on the outer
   OOF scores and its threshold is chosen on the calibrated outer OOF scores.

Calibration (:class:`Calibration`): ``isotonic`` (``sklearn.isotonic.IsotonicRegression``) or
``sigmoid`` (Platt 1999: a logistic regression on the score's logit, ``sklearn.linear_model``),
chosen by grouped CV of the Brier score (ties and failures: sigmoid, the smoother map). At run
time the map is applied without scikit-learn: isotonic is ``numpy.interp`` over the fitted
breakpoints (what ``IsotonicRegression.predict`` does with ``out_of_bounds="clip"``), sigmoid is
``1 / (1 + exp(-(a·logit(p) + b)))``. Both are non-decreasing, so a threshold keeps its meaning.

Cost: ``k`` outer fits, ``k × inner_folds`` inner fits (3 by default) and one final fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from processor.fit import metrics
from processor.models.calibration_map import Calibration, logit

INNER_FOLDS = 3  # folds inside each outer training part (calibration and threshold choice)
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``fit_predict(train_idx, test_idx)`` → scores (len(test_idx), n_outputs) of a model trained on train_idx."""


def fit_calibration(y: np.ndarray, p: np.ndarray, method: str) -> Calibration:
    """Fit ``method`` ("isotonic" | "sigmoid" | "none") on labels ``y`` and scores ``p`` in [0, 1]."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if method == "none":
        return Calibration("none")
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        # never 0 or 1: n studies cannot show certainty, so the map stays within [0.5/n, 1 − 0.5/n]
        floor = 0.5 / max(1, y.size)
        iso = IsotonicRegression(y_min=floor, y_max=1.0 - floor, increasing=True, out_of_bounds="clip").fit(
            p, y
        )
        return Calibration(
            "isotonic",
            {
                "x": [round(float(v), 8) for v in iso.X_thresholds_],
                "y": [round(float(v), 8) for v in iso.y_thresholds_],
            },
        )
    if method == "sigmoid":
        from sklearn.linear_model import LogisticRegression

        # C large: Platt scaling is an unpenalised fit of two numbers
        lr = LogisticRegression(C=1e4, solver="newton-cholesky", max_iter=200).fit(
            logit(p)[:, None], y.astype(int)
        )
        a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
        if a <= 0:  # a decreasing map would turn the ranking round: the scores carry no signal
            a, b = 0.0, float(logit(np.array([y.mean()]))[0])
        return Calibration("sigmoid", {"a": round(a, 8), "b": round(b, 8)})
    raise ValueError(f"unknown calibration method {method!r}")


def choose_calibration(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray, k: int, seed: int
) -> tuple[Calibration, dict[str, float]]:
    """The map (isotonic or sigmoid) with the lower grouped-CV Brier score, fitted on all of (y, p).

    Returns the fitted map and the CV Brier score of each method.
    """
    scores: dict[str, float] = {}
    try:
        folds = metrics.grouped_folds(y.astype(int), groups, min(k, np.unique(groups).size), seed)
    except ValueError:
        folds = []
    for method in ("sigmoid", "isotonic"):
        errors = []
        for tr, te in folds:
            if np.unique(y[tr]).size < 2:
                continue
            cal = fit_calibration(y[tr], p[tr], method)
            errors.append(float(np.mean((cal.apply(p[te]) - y[te]) ** 2)) * te.size)
        scores[method] = sum(errors) / max(1, sum(te.size for _, te in folds)) if errors else math.inf
    best = "isotonic" if scores["isotonic"] < scores["sigmoid"] else "sigmoid"
    return fit_calibration(y, p, best), scores


def choose_threshold(y: np.ndarray, p: np.ndarray, target_sensitivity: float | None) -> float:
    """Youden's J, or the highest threshold reaching ``target_sensitivity``."""
    if target_sensitivity is None:
        return metrics.youden_threshold(y, p)
    return metrics.threshold_for_sensitivity(y, p, target_sensitivity)


@dataclass
class OutputResult:
    """One output column (a finding, or pathology) of a nested CV.

    ``raw_oof``: outer OOF scores; ``calibrated_oof``: each outer fold calibrated by a map fitted
    inside its own training part; ``called``: each outer fold thresholded by a threshold chosen
    inside its own training part; ``calibration`` and ``threshold``: what is installed.
    """

    known: np.ndarray  # rows with a label for this output
    raw_oof: np.ndarray
    calibrated_oof: np.ndarray
    called: np.ndarray
    fold_thresholds: list[float]
    calibration: Calibration
    brier_by_method: dict[str, float]
    threshold: float


@dataclass
class NestedResult:
    folds: list[tuple[np.ndarray, np.ndarray]]
    fold_of: np.ndarray  # outer fold of each row (−1: never held out)
    outputs: list[OutputResult]


def nested_cv(
    fit_predict: FitPredict,
    y: np.ndarray,
    groups: Sequence[str],
    strata: Sequence[object] | np.ndarray,
    k: int,
    seed: int,
    *,
    calibrate: bool = True,
    target_sensitivity: float | None = None,
    inner_folds: int = INNER_FOLDS,
    progress: Callable[[str], None] | None = None,
) -> NestedResult:
    """Run the scheme in the module docstring. ``y``: (n, n_outputs) 0/1 with NaN = unknown.

    Raises ValueError when an output has too few positives or negatives in some training part.
    """
    y = np.asarray(y, dtype=float)
    if y.ndim == 1:
        y = y[:, None]
    n, n_out = y.shape
    group_arr = np.asarray([str(g) for g in groups])
    outer = metrics.grouped_folds(strata, group_arr, k, seed)
    raw = np.full((n, n_out), np.nan)
    calibrated = np.full((n, n_out), np.nan)
    called = np.zeros((n, n_out), dtype=bool)
    fold_of = np.full(n, -1)
    fold_thresholds: list[list[float]] = [[] for _ in range(n_out)]
    strata_arr = np.asarray([str(s) for s in strata])
    for f, (tr, te) in enumerate(outer):
        if progress:
            progress(f"fold {f + 1}/{len(outer)}")
        fold_of[te] = f
        raw[te] = fit_predict(tr, te)
        inner_raw = np.full((tr.size, n_out), np.nan)
        inner = metrics.grouped_folds(strata_arr[tr], group_arr[tr], inner_folds, seed + 1 + f)
        for itr, ite in inner:
            inner_raw[ite] = fit_predict(tr[itr], tr[ite])
        for j in range(n_out):
            ok = ~np.isnan(y[tr, j]) & ~np.isnan(inner_raw[:, j])
            yj, pj = y[tr, j][ok], inner_raw[ok, j]
            if np.unique(yj).size < 2:
                raise ValueError(f"output {j}: a training part of fold {f + 1} has one class only")
            if calibrate:
                cal, _ = choose_calibration(yj, pj, group_arr[tr][ok], k, seed)
            else:
                cal = Calibration("none")
            threshold = choose_threshold(yj, cal.apply(pj), target_sensitivity)
            fold_thresholds[j].append(threshold)
            calibrated[te, j] = cal.apply(raw[te, j])
            called[te, j] = calibrated[te, j] >= threshold
    outputs = []
    for j in range(n_out):
        known = ~np.isnan(y[:, j]) & ~np.isnan(raw[:, j])
        if calibrate:
            cal, brier = choose_calibration(y[known, j], raw[known, j], group_arr[known], k, seed)
        else:
            cal, brier = Calibration("none"), {}
        threshold = choose_threshold(y[known, j], cal.apply(raw[known, j]), target_sensitivity)
        outputs.append(
            OutputResult(
                known,
                raw[:, j],
                calibrated[:, j],
                called[:, j],
                fold_thresholds[j],
                cal,
                brier,
                threshold,
            )
        )
    return NestedResult(outer, fold_of, outputs)


def output_card(result: OutputResult, y: np.ndarray, groups: Sequence[str], seed: int) -> dict[str, Any]:
    """The card's honest figures for one output: AUROC (grouped bootstrap CI) of the raw OOF scores,
    sensitivity/specificity of the nested calls, ECE and Brier of the calibrated OOF probabilities."""
    from processor.fit.calibration import expected_calibration_error

    known = result.known
    yk = np.asarray(y, dtype=float)[known]
    group_arr = np.asarray([str(g) for g in groups])[known]
    report = metrics.binary_report(
        yk, result.raw_oof[known], result.threshold, groups=group_arr, called=result.called[known], seed=seed
    )
    cal = result.calibrated_oof[known]
    return {
        **report.as_dict(),
        "sensitivity_rule": "nested: each held-out fold called at the threshold chosen in its training folds",
        "fold_thresholds": [round(t, 6) for t in result.fold_thresholds],
        "ece": round(expected_calibration_error(yk, cal), 4),
        "brier": round(float(np.mean((cal - yk) ** 2)), 4),
        "calibration": result.calibration.as_dict(),
        "calibration_cv_brier": {m: round(v, 5) for m, v in result.brier_by_method.items()},
    }
