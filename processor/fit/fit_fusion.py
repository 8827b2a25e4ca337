"""``fit-fusion``: train the LightGBM fusion booster on stored features and a labels CSV.

Features come from SQLite (``features`` table, the latest arrival of each study); a feature a
study lacks is NaN, which LightGBM routes down its learned default branch, so a partial ensemble
still fuses. Labels: ``pathology`` (0/1) is the target; any other column whose name is a finding
calibrates that finding's threshold on the first stored probability of it found among
``head.``, ``lipro.``, ``zs.`` (Youden), for ``most_dangerous_pathology_type``.

Stratified k-fold CV gives out-of-fold probabilities → AUROC (95 % CI), and the operating
threshold (Youden, or the highest reaching ``--target-sensitivity``) with its sensitivity and
specificity. A model whose AUROC interval includes 0.5 is reported as no better than chance and
is not installed unless ``--force``. Output in ``weights/fusion/``: ``model.txt``, ``card.json``
(feature names, threshold, CV metrics, data hash), ``roc.png``.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from processor.atomic import write_bytes_atomic
from processor.errors import ConfigError
from processor.fit import metrics
from processor.fit.data import (
    data_hash,
    join,
    now_iso,
    read_labels,
    unmatched_note,
    write_card,
)
from processor.models.fusion import booster_name
from processor.state import State

log = logging.getLogger(__name__)

TARGET = "pathology"
FINDING_SOURCES = ("head", "lipro", "zs")


@dataclass(frozen=True)
class FusionOptions:
    folds: int = 5
    seed: int = 0
    rounds: int = 200
    learning_rate: float = 0.05
    num_leaves: int = 7
    target_sensitivity: float | None = None
    features: tuple[str, ...] | None = None  # fnmatch patterns; None = every stored feature
    force: bool = False
    progress: bool = True


@dataclass
class FusionFit:
    folder: Path
    installed: bool
    report: metrics.BinaryReport
    feature_names: list[str]
    oof: np.ndarray
    labels: np.ndarray
    matrix: np.ndarray
    card: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def lgb_params(n: int, opts: FusionOptions) -> dict[str, Any]:
    return {
        "objective": "binary",
        "learning_rate": opts.learning_rate,
        "num_leaves": opts.num_leaves,
        "min_data_in_leaf": int(max(3, min(20, n // 10))),
        "lambda_l2": 1.0,
        "feature_pre_filter": False,
        "seed": opts.seed,
        "deterministic": True,
        "num_threads": 1,  # a few thousand rows at most: more threads only add synchronisation
        "verbose": -1,
    }


def train_booster(x: np.ndarray, y: np.ndarray, names: Sequence[str], opts: FusionOptions) -> Any:
    import lightgbm as lgb

    data = lgb.Dataset(x, label=y, feature_name=list(names), params={"verbose": -1}, free_raw_data=False)
    return lgb.train(lgb_params(len(y), opts), data, num_boost_round=opts.rounds)


def _select_features(rows: list[dict[str, Any]], patterns: Sequence[str] | None) -> list[str]:
    names = sorted({name for row in rows for name, v in row["features"].items() if not np.isnan(v)})
    if patterns:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    return names


def _finding_thresholds(labels: Any, joined: Any, names: list[str], x: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for column, values in labels.columns.items():
        if column == TARGET:
            continue
        source = next((f"{p}.{column}" for p in FINDING_SOURCES if f"{p}.{column}" in names), None)
        if source is None:
            continue
        y = values[joined.label_index]
        s = x[:, names.index(source)]
        ok = ~np.isnan(y) & ~np.isnan(s)
        if y[ok].sum() < 1 or (y[ok] == 0).sum() < 1:
            continue
        threshold = metrics.youden_threshold(y[ok], s[ok])
        out[column] = {"feature": source, **metrics.binary_report(y[ok], s[ok], threshold).as_dict()}
    return out


def fit_fusion(
    state: State, labels_path: Path, out: Path, opts: FusionOptions = FusionOptions()
) -> FusionFit:
    labels = read_labels(labels_path)
    if TARGET not in labels.columns:
        raise ConfigError(
            f"{labels_path}: no `{TARGET}` column. Fix: add a 0/1 column `{TARGET}` (1 = any "
            "pathology) beside study_uid or accession."
        )
    stored = state.study_features()
    if not stored:
        raise ConfigError(
            f"{state.path}: no model features are stored. Fix: process the labelled studies with "
            "the pipeline first; every model step records its outputs there."
        )
    joined = join(labels, stored)
    y_all = labels.columns[TARGET][joined.label_index]
    keep = ~np.isnan(y_all)
    rows = [r for r, k in zip(joined.rows, keep, strict=True) if k]
    y = y_all[keep]
    note = unmatched_note(joined, len(labels))
    if len(rows) < 2 * opts.folds or y.sum() < opts.folds or (y == 0).sum() < opts.folds:
        raise ConfigError(
            f"{labels_path}: {note}; {int(y.sum())} positive and {int((y == 0).sum())} negative "
            f"with features. {opts.folds}-fold CV needs at least {opts.folds} of each. Fix: "
            "process more labelled studies (or lower --folds)."
        )
    names = _select_features(rows, opts.features)
    if not names:
        raise ConfigError(
            f"no stored feature matches {list(opts.features or [])}. Fix: check --features "
            "against the names in the study JSON's `features` section."
        )
    inner = [booster_name(n) for n in names]
    if len(set(inner)) != len(inner):
        raise ConfigError("two feature names differ only in punctuation: " + ", ".join(names))
    x = np.array([[row["features"].get(n, np.nan) for n in names] for row in rows], dtype=np.float64)
    folds = metrics.stratified_folds(y, opts.folds, opts.seed)
    oof = np.full(y.shape, np.nan)
    with tqdm(
        total=opts.folds + 1,
        desc="fit-fusion",
        unit="fit",
        file=sys.stderr,
        disable=not opts.progress,
        leave=False,
    ) as bar:
        for k, (train, test) in enumerate(folds):
            bar.set_postfix_str(f"fold {k + 1}/{opts.folds}")
            oof[test] = train_booster(x[train], y[train], inner, opts).predict(x[test])
            bar.update(1)
        bar.set_postfix_str("all studies")
        booster = train_booster(x, y, inner, opts)
        bar.update(1)
    if opts.target_sensitivity is not None:
        threshold = metrics.threshold_for_sensitivity(y, oof, opts.target_sensitivity)
        rule = f"sensitivity>={opts.target_sensitivity:g}"
    else:
        threshold, rule = metrics.youden_threshold(y, oof), "youden"
    report = metrics.binary_report(y, oof, threshold)
    keys = [r["study_uid"] for r in rows]
    card = {
        "kind": "fusion.lightgbm",
        "feature_names": names,
        "booster_feature_names": inner,
        "threshold": round(float(threshold), 6),
        "threshold_rule": rule,
        "cv": {"folds": opts.folds, "seed": opts.seed, **report.as_dict()},
        "finding_thresholds": _finding_thresholds(
            labels,
            joined,
            names,
            np.array([[r["features"].get(n, np.nan) for n in names] for r in joined.rows], dtype=np.float64),
        ),
        "params": lgb_params(len(y), opts),
        "num_boost_round": opts.rounds,
        "training": {
            "studies": len(keys),
            "positives": int(y.sum()),
            "labels_file": str(labels_path),
            "unmatched_labels": len(joined.unmatched),
        },
        "data_hash": data_hash(keys, np.nan_to_num(x, nan=-1e300), y),
        "date": now_iso(),
    }
    installed = report.better_than_chance or opts.force
    out.mkdir(parents=True, exist_ok=True)
    if installed:
        tmp = out / ".model.txt.tmp"
        booster.save_model(str(tmp))
        os.replace(tmp, out / "model.txt")
        write_card(out / "card.json", card)
        fpr, tpr, _ = metrics.roc_curve(y, oof)
        write_bytes_atomic(
            out / "roc.png",
            metrics.roc_png(
                {f"fusion (AUROC {report.auroc:.3f})": (fpr, tpr)},
                f"fusion.lightgbm - {opts.folds}-fold CV ROC",
                marker=(1 - report.specificity, report.sensitivity),
            ),
        )
    log.info(
        "fit_fusion.done folder=%s studies=%d auroc=%.3f installed=%s",
        out,
        len(keys),
        report.auroc,
        installed,
    )
    return FusionFit(out, installed, report, names, oof, y, x, card, note)


def report_text(fit: FusionFit) -> str:
    r = fit.report
    rows: list[list[object]] = [
        ["studies", r.n],
        ["positives", r.positives],
        ["CV AUROC", r.auroc],
        ["AUROC 95% CI", f"{r.auroc_low:.3f}–{r.auroc_high:.3f}"],
        [f"threshold ({fit.card['threshold_rule']})", r.threshold],
        ["sensitivity", r.sensitivity],
        ["specificity", r.specificity],
        ["features", len(fit.feature_names)],
    ]
    lines = [metrics.format_table(["metric", "value"], rows)]
    thresholds = fit.card["finding_thresholds"]
    if thresholds:
        lines += [
            "",
            metrics.format_table(
                ["finding", "from feature", "AUROC", "threshold"],
                [[name, t["feature"], t["auroc"], t["threshold"]] for name, t in thresholds.items()],
            ),
        ]
    lines += ["", fit.note]
    if not r.better_than_chance:
        lines.append(
            f"the model is no better than chance (CV AUROC {r.auroc:.3f}, 95% CI {r.auroc_low:.3f}–"
            f"{r.auroc_high:.3f} includes 0.5): the labels do not follow from these features."
        )
    if fit.installed:
        lines.append(
            f"wrote {fit.folder / 'model.txt'}, {fit.folder / 'card.json'} and {fit.folder / 'roc.png'}"
        )
    else:
        lines.append(
            "nothing installed; check the labels and features, or pass --force to install it anyway."
        )
    return "\n".join(lines)
