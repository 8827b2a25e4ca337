"""Calibration and uncertainty of binary scores: ECE, a reliability diagram, a bootstrap AUROC CI.

Shared by the fit commands (the card's calibration figures) and ``evaluate`` (the report). The
metrics come from scikit-learn (``roc_auc_score``, ``confusion_matrix``, ``calibration_curve``);
what is written here is only what scikit-learn lacks:

- the expected calibration error (Guo et al. 2017) on the same equal-width bins as
  ``calibration_curve(strategy="uniform")``;
- a reliability diagram drawn with Pillow like ``metrics.roc_png`` (matplotlib is not a
  dependency);
- a percentile bootstrap of the AUROC, optionally resampling whole groups (patients), so two scans
  of one patient stay together. Its replicates are computed for all resamples at once (a weighted
  Mann–Whitney count, equal to ``roc_auc_score`` on each resample — a test checks this); calling
  ``roc_auc_score`` 2,000 times costs seconds per finding.

A case is positive when ``p >= threshold`` (the rule of the ``decision`` step).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np

from processor.fit.metrics import labels_and_scores

ArrayLike = Sequence[float] | np.ndarray


def _binary(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(labels as 0/1 ints, scores as floats), checked: same length, labels 0 or 1, scores finite."""
    y_arr, p_arr = labels_and_scores(y, p)
    if not np.isfinite(p_arr).all():
        raise ValueError("scores must be finite (drop studies without a score first)")
    return y_arr.astype(int), p_arr


def _probabilities(y: ArrayLike, p: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_arr, p_arr = _binary(y, p)
    if y_arr.size == 0:
        raise ValueError("no predictions to calibrate")
    if (p_arr < 0).any() or (p_arr > 1).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return y_arr, p_arr


def _bin_ids(p: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins on [0, 1], exactly as ``calibration_curve(strategy="uniform")`` assigns them:
    bin m holds ((m-1)/M, m/M], the first also holds 0."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.searchsorted(edges[1:-1], p)


def expected_calibration_error(y: ArrayLike, p: ArrayLike, n_bins: int = 10) -> float:
    """Expected calibration error of probabilities ``p`` for binary labels ``y``.

    ECE = Σ_m (|B_m| / n) · |mean(y in B_m) − mean(p in B_m)|, summed over the non-empty bins B_m of
    ``n_bins`` equal-width bins on [0, 1] (bin m holds ((m−1)/M, m/M]; the first also holds 0).
    Source: Guo, Pleiss, Sun & Weinberger, "On Calibration of Modern Neural Networks", ICML 2017,
    eq. 3 (after Naeini et al. 2015), written for the positive-class probability of a binary model
    (accuracy → observed positive rate, confidence → mean predicted probability). The bins are
    those of ``sklearn.calibration.calibration_curve(strategy="uniform")``, so the diagram and the
    number agree.
    """
    y_arr, p_arr = _probabilities(y, p)
    ids = _bin_ids(p_arr, n_bins)
    total = np.bincount(ids, minlength=n_bins).astype(float)
    observed = np.bincount(ids, weights=y_arr, minlength=n_bins)
    predicted = np.bincount(ids, weights=p_arr, minlength=n_bins)
    used = total > 0
    gaps = np.abs(observed[used] - predicted[used]) / total[used]
    return float(np.sum(total[used] / p_arr.size * gaps))


def sensitivity_specificity(y: ArrayLike, p: ArrayLike, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of the rule positive = ``p >= threshold``; NaN for a class that is
    absent."""
    tp, fp, fn, tn = confusion_counts(y, p, threshold)
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return sens, spec


def confusion_counts(y: ArrayLike, p: ArrayLike, threshold: float) -> tuple[int, int, int, int]:
    """(TP, FP, FN, TN) of the rule positive = ``p >= threshold`` (``sklearn.metrics.confusion_matrix``)."""
    from sklearn.metrics import confusion_matrix

    y_arr, p_arr = _binary(y, p)
    tn, fp, fn, tp = confusion_matrix(y_arr, (p_arr >= threshold).astype(int), labels=[0, 1]).ravel()
    return int(tp), int(fp), int(fn), int(tn)


def weighted_aurocs(y: ArrayLike, s: ArrayLike, weights: np.ndarray) -> np.ndarray:
    """AUROC of ``s`` for ``y`` under each row of ``weights`` (shape (B, n): how often each case is
    drawn in resample b); NaN where a resample holds one class only.

    A weighted Mann–Whitney count with ties counting one half: for integer weights it equals
    ``roc_auc_score(y, s, sample_weight=w)``, i.e. ``roc_auc_score`` on the resample itself.
    """
    y_arr, s_arr = _binary(y, s)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    if w.shape[1] != y_arr.size:
        raise ValueError(f"weights have {w.shape[1]} columns for {y_arr.size} cases")
    order = np.argsort(s_arr, kind="mergesort")
    ranked = s_arr[order]
    starts = np.r_[0, np.flatnonzero(np.diff(ranked)) + 1]  # first case of each run of equal scores
    w_sorted = w[:, order]
    pos = np.add.reduceat(w_sorted * y_arr[order], starts, axis=1)
    neg = np.add.reduceat(w_sorted * (1 - y_arr[order]), starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    wins = np.sum(pos * (below + 0.5 * neg), axis=1)
    pairs = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs > 0, wins / np.where(pairs > 0, pairs, 1.0), np.nan)


def bootstrap_auroc_ci(
    y: ArrayLike,
    s: ArrayLike,
    *,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``roc_auc_score(y, s)``.

    Each of ``n_boot`` resamples draws cases with replacement (Efron & Tibshirani, "An Introduction
    to the Bootstrap", 1993, ch. 13, the percentile interval). With ``groups`` (e.g. hashed patient
    keys; ``None`` entries are groups of their own) whole groups are drawn instead — the cluster
    bootstrap (Davison & Hinkley, "Bootstrap Methods and their Application", 1997, §3.8; Field &
    Welsh 2007), so two scans of one patient move together and the interval is not narrowed by
    counting one patient twice. Resamples holding one class only have no AUROC and are skipped;
    when more than 10 % are skipped the bounds are NaN (too few cases of a class to say). Returns
    (NaN, NaN) when ``y`` itself holds one class only.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    y_arr, s_arr = _binary(y, s)
    nan = (float("nan"), float("nan"))
    if y_arr.size == 0 or y_arr.min() == y_arr.max():
        return nan
    replicates = np.concatenate(
        [
            weighted_aurocs(y_arr, s_arr, weights)
            for weights in bootstrap_weights(y_arr.size, groups=groups, n_boot=n_boot, seed=seed)
        ]
    )
    kept = replicates[~np.isnan(replicates)]
    if kept.size == 0 or n_boot - kept.size > 0.10 * n_boot:
        return nan
    alpha = 1.0 - level
    low, high = np.quantile(kept, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_weights(
    n: int,
    *,
    groups: Sequence[object] | np.ndarray | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    max_cells: int = 2_000_000,
) -> Iterator[np.ndarray]:
    """The resamples of :func:`bootstrap_auroc_ci` as weights: (b, n) arrays of how often each of
    the ``n`` cases is drawn, ``n_boot`` rows in all, in chunks of at most ``max_cells`` cells.

    With ``groups`` whole groups are drawn (every case of a drawn group gets its group's count).
    The same ``seed`` gives the same resamples, so several scores of the same cases can be compared
    on identical resamples (a paired bootstrap).
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    group_of = _group_index(groups, n)
    n_groups = int(group_of.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, max_cells // max(n, n_groups, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        drawn = rng.integers(0, n_groups, size=(b, n_groups))
        counts = np.bincount((drawn + n_groups * np.arange(b)[:, None]).ravel(), minlength=b * n_groups)
        yield counts.reshape(b, n_groups)[:, group_of]
        done += b


def _group_index(groups: Sequence[object] | np.ndarray | None, n: int) -> np.ndarray:
    """Dense group ids 0..G-1 for ``n`` cases; no groups, or a ``None`` key, is a group of one."""
    if groups is None:
        return np.arange(n)
    keys = list(groups)
    if len(keys) != n:
        raise ValueError(f"groups ({len(keys)}) and labels ({n}) differ in length")
    ids: dict[object, int] = {}
    out = np.empty(n, dtype=int)
    for i, key in enumerate(keys):
        if key is None or (isinstance(key, float) and math.isnan(key)):
            out[i] = len(ids)
            ids[("__alone__", i)] = out[i]
        else:
            out[i] = ids.setdefault(key, len(ids))
    return out


def reliability_png(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    title: str,
    n_bins: int = 10,
    size: int = 560,
) -> bytes:
    """PNG bytes of a reliability diagram: per curve (label → (y, p)) the observed positive rate
    against the mean predicted probability in ``n_bins`` equal-width bins
    (``sklearn.calibration.calibration_curve``, strategy uniform), the diagonal of perfect
    calibration, a legend with each curve's ECE and n, and under the plot a strip with the
    histogram of p per curve (the share of cases in each bin, scaled to the tallest bar)."""
    from sklearn.calibration import calibration_curve

    from processor.fit.metrics import COLOURS, UnitSquare

    strip = 70
    frame = UnitSquare.new(size, extra_height=strip)
    draw, font, xy = frame.draw, frame.font, frame.xy
    left, top, right, width = frame.left, frame.top, frame.right, frame.width

    hist_top, hist_bottom = size + 4, size + strip - 8
    draw.rectangle([left, hist_top, right, hist_bottom], outline=(200, 200, 200))
    bin_width = width / n_bins
    names = list(curves)
    checked = {name: _probabilities(*curves[name]) for name in names}
    shares = {
        name: np.bincount(_bin_ids(p_arr, n_bins), minlength=n_bins) / p_arr.size
        for name, (_, p_arr) in checked.items()
    }
    tallest = max((float(s.max()) for s in shares.values()), default=1.0)
    for i, name in enumerate(names):
        y_arr, p_arr = checked[name]
        colour = COLOURS[i % len(COLOURS)]
        observed, predicted = calibration_curve(y_arr, p_arr, n_bins=n_bins, strategy="uniform")
        points = [xy(float(px), float(py)) for px, py in zip(predicted, observed, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        ece = expected_calibration_error(y_arr, p_arr, n_bins)
        label = f"{name}  ECE {ece:.3f}  n={p_arr.size}"
        draw.text((left + 8, top + 8 + 14 * i), label, fill=colour, font=font)
        bar = bin_width / max(len(names), 1)
        for m, frac in enumerate(shares[name]):
            if frac <= 0:
                continue
            x0 = left + m * bin_width + i * bar
            y0 = hist_bottom - float(frac) / tallest * (hist_bottom - hist_top - 2)
            draw.rectangle([x0 + 1, y0, x0 + bar - 1, hist_bottom], fill=colour)
    draw.text((left, 4), title, fill="black", font=font)
    draw.text((left + width / 2 - 60, size - 22), "mean predicted probability", fill="black", font=font)
    draw.text((4, top - 14), "observed positive rate", fill="black", font=font)
    draw.text((4, hist_top + 2), "cases", fill=(90, 90, 90), font=font)
    draw.text((4, hist_top + 14), "per bin", fill=(90, 90, 90), font=font)
    return frame.png()
