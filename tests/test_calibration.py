"""processor.fit.calibration against hand-worked examples and scikit-learn computed independently."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image
from scipy.stats import norm
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from processor.fit.calibration import (
    bootstrap_auroc_ci,
    confusion_counts,
    expected_calibration_error,
    reliability_png,
    sensitivity_specificity,
    weighted_aurocs,
)


def test_ece_hand_worked_two_bins() -> None:
    # Two bins: [0, 0.5] holds 0.1, 0.3, 0.4 (mean p 0.8/3, observed 1/3: gap 1/15);
    # (0.5, 1] holds 0.6, 0.8, 0.9 (mean p 2.3/3, observed 2/3: gap 1/10). ECE = ½·1/15 + ½·1/10 = 1/12.
    y = [0, 1, 0, 1, 1, 0]
    p = [0.1, 0.3, 0.4, 0.6, 0.8, 0.9]
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(1 / 12, abs=1e-12)


def test_ece_bins_are_calibration_curves() -> None:
    # A probability on a bin edge (0.5, 0.2) falls in the lower bin, as in calibration_curve, so the
    # ECE equals the count-weighted gap of sklearn's own curve.
    rng = np.random.default_rng(3)
    p = np.r_[rng.random(200), 0.5, 0.2, 0.0, 1.0]
    y = (rng.random(p.size) < p**2).astype(int)
    observed, predicted = calibration_curve(y, p, n_bins=5, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 6)[1:-1], p), minlength=5)
    counts = counts[counts > 0]
    expected = float(np.sum(counts / p.size * np.abs(observed - predicted)))
    assert expected_calibration_error(y, p, n_bins=5) == pytest.approx(expected, abs=1e-12)


def test_ece_is_zero_when_calibrated_and_rejects_bad_input() -> None:
    assert expected_calibration_error([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error([0, 1], [0.2, 1.2])
    with pytest.raises(ValueError, match="0 or 1"):
        expected_calibration_error([0, 2], [0.2, 0.3])


def test_sensitivity_specificity_hand_worked() -> None:
    y = [1, 1, 1, 0, 0, 0, 0]
    p = [0.9, 0.4, 0.2, 0.4, 0.3, 0.1, 0.6]
    # threshold 0.4: called 0.9, 0.4 (pos), 0.4, 0.6 (neg) -> TP 2 FP 2 FN 1 TN 2.
    assert confusion_counts(y, p, 0.4) == (2, 2, 1, 2)
    sens, spec = sensitivity_specificity(y, p, 0.4)
    assert (sens, spec) == (pytest.approx(2 / 3), pytest.approx(2 / 4))
    sens, spec = sensitivity_specificity([0, 0], [0.1, 0.9], 0.5)
    assert math.isnan(sens) and spec == 0.5


def test_weighted_aurocs_equal_roc_auc_score_on_each_resample() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 60)
    s = np.round(rng.normal(size=60) + y, 1)  # rounded: many ties
    weights = rng.integers(0, 4, size=(25, 60))
    got = weighted_aurocs(y, s, weights)
    for b in range(25):
        idx = np.repeat(np.arange(60), weights[b])
        assert got[b] == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
    assert np.isnan(weighted_aurocs(y, s, (y == 1).astype(float)[None, :]))[0]


def _binormal(n: int, seed: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n // 2, int), np.ones(n - n // 2, int)]
    return y, rng.normal(size=n) + shift * y


def test_bootstrap_ci_covers_the_truth_and_shrinks_like_one_over_root_n() -> None:
    truth = float(norm.cdf(1.0 / math.sqrt(2)))  # AUROC of N(1, 1) against N(0, 1): 0.760
    y, s = _binormal(4000, seed=7)
    low, high = bootstrap_auroc_ci(y, s, n_boot=1000)
    assert low < truth < high
    assert low < roc_auc_score(y, s) < high
    y_small, s_small = _binormal(1000, seed=8)
    low_s, high_s = bootstrap_auroc_ci(y_small, s_small, n_boot=1000)
    assert low_s < truth < high_s
    ratio = (high_s - low_s) / (high - low)  # n 4x smaller: interval ~2x wider
    assert 1.6 < ratio < 2.6


def test_grouped_bootstrap_is_not_fooled_by_duplicates() -> None:
    y, s = _binormal(300, seed=11)
    low, high = bootstrap_auroc_ci(y, s, n_boot=1000)
    patient = np.r_[np.arange(300), np.arange(300)]
    y2, s2 = np.r_[y, y], np.r_[s, s]  # every patient scanned twice, the same result
    naive = bootstrap_auroc_ci(y2, s2, n_boot=1000)
    grouped = bootstrap_auroc_ci(y2, s2, groups=patient, n_boot=1000)
    assert grouped[1] - grouped[0] > 1.25 * (naive[1] - naive[0])
    assert grouped[1] - grouped[0] == pytest.approx(high - low, rel=0.15)
    # None keys are patients of their own: identical to no groups at all.
    assert bootstrap_auroc_ci(y, s, groups=[None] * 300, n_boot=200) == bootstrap_auroc_ci(y, s, n_boot=200)


def test_bootstrap_gives_nan_when_a_class_is_too_rare() -> None:
    assert all(math.isnan(v) for v in bootstrap_auroc_ci([1, 1, 1], [0.1, 0.2, 0.3]))
    # One positive in 20: (19/20)^20 = 36 % of resamples lack it (> 10 % skipped).
    y = np.r_[1, np.zeros(19, int)]
    assert all(math.isnan(v) for v in bootstrap_auroc_ci(y, np.linspace(0, 1, 20), n_boot=500))
    # Six in 20: 0.1 % skipped, fine.
    y = np.r_[np.ones(6, int), np.zeros(14, int)]
    low, high = bootstrap_auroc_ci(y, np.linspace(1, 0, 20), n_boot=500)
    assert low == high == 1.0


def test_reliability_png_draws_each_curve() -> None:
    y, s = _binormal(400, seed=2)
    p = 1 / (1 + np.exp(-s))
    data = reliability_png({"fused": (y, p), "head": (y, np.clip(p * 0.5, 0, 1))}, "calibration")
    img = Image.open(io.BytesIO(data)).convert("RGB")
    assert img.size == (560, 630)
    colours = {c for _, c in img.getcolors(maxcolors=100_000) or []}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours
