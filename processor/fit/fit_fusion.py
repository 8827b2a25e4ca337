"""``fit-fusion``: train the LightGBM fusion booster on stored features and a labels CSV.

Features come from SQLite (``features`` table, those of each study's current result); a feature a
study lacks is NaN, which LightGBM routes down its learned default branch, so a partial ensemble
still fuses. Labels: ``pathology`` (0/1) is the target; any other column whose name is a finding
gets a threshold on the first stored probability of it found among ``head.``, ``lipro.``, ``zs.``
(Youden, chosen nested like the fused one), for ``most_dangerous_pathology_type``.

**Stacking without leakage.** A model fitted on the same labelled studies (the site's head, the
anomaly detector) gives in-sample outputs on them, which look far better than it is. So:

- ``head.*`` of a study the installed head was trained on is replaced by the head's out-of-fold
  probability from ``<head>/oof.csv`` (written by ``fit-head``, calibrated the same way);
- ``head.*`` stored by another head, or with no recorded checkpoint, and ``anomaly.*`` of a study
  the anomaly model was trained on, are refused with the fix (process those studies again with the
  installed models, leave the feature out with ``--features``, or leave the studies out);
- every feature must come from one checkpoint (its sha256 is recorded with each stored value);
  the card records them in ``trained_on.feature_models`` and the fusion step refuses features from
  another checkpoint.

Cross-validation is nested and grouped by patient (:mod:`processor.fit.nested`): the CV AUROC
(95 % CI by a patient bootstrap), sensitivity and specificity at thresholds chosen inside each
training part, and the expected calibration error of probabilities calibrated (isotonic or Platt,
chosen by CV) inside each training part. A model whose AUROC interval includes 0.5 is reported as
no better than chance and is not installed unless ``--force``. Output in ``weights/fusion/``:
``model.txt``, ``card.json`` (feature names, calibration, threshold on the calibrated scale, CV
figures, what it was trained on), ``roc.png`` and ``reliability.png``.
"""

from __future__ import annotations

import csv
import fnmatch
import json
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
    OOF_NAME,
    TrainingSet,
    data_hash,
    grouping_note,
    join,
    now_iso,
    patient_groups,
    read_labels,
    study_key,
    training_groups,
    unmatched_note,
    write_card,
)
from processor.fit.nested import INNER_FOLDS, nested_cv, output_card
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
    allow_ungrouped: bool = False  # studies processed before patients were recorded: one group each
    head: Path | None = None  # the installed head's folder (its oof.csv and card)
    anomaly: Path | None = None  # the installed anomaly model's folder (its card's training_keys)


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


@dataclass
class _Fitted:
    """A site-fitted model whose outputs are features: its checkpoint sha, card, OOF values."""

    prefix: str
    folder: Path | None
    sha256: str | None = None
    card: dict[str, Any] = field(default_factory=dict)  # training_keys, training_groups
    oof: dict[str, dict[str, float]] = field(default_factory=dict)  # study_key → feature → value


def _installed(prefix: str, folder: Path | None, weights: str) -> _Fitted:
    """The model in ``folder``; its ``oof.csv`` counts only when written for this very checkpoint."""
    from processor.models.cache import sha256_file

    if folder is None or not (folder / "card.json").is_file() or not (folder / weights).is_file():
        return _Fitted(prefix, None)
    card = json.loads((folder / "card.json").read_text(encoding="utf-8"))
    fitted = _Fitted(prefix, folder, sha256_file(folder / weights), card)
    oof_path = folder / OOF_NAME
    if oof_path.is_file():
        with oof_path.open(newline="", encoding="utf-8") as fh:
            for record in csv.DictReader(fh):
                if record.get(f"{prefix}_sha256") != fitted.sha256:
                    continue  # left by another fit: its values are not this model's out-of-fold ones
                fitted.oof[record["study_key"]] = {
                    k: float(v) for k, v in record.items() if k.startswith(f"{prefix}.") and v != ""
                }
    return fitted


def _stack(
    rows: list[dict[str, Any]],
    names: list[str],
    fitted: list[_Fitted],
    labels_path: Path,
    fingerprint: str | None = None,
) -> tuple[np.ndarray, dict[str, str | None], list[str]]:
    """The feature matrix with out-of-fold values where a model saw the study, the checkpoint of
    each feature, and notes; ConfigError listing every in-sample or unbound input with its fix."""
    x = np.array([[row["features"].get(n, np.nan) for n in names] for row in rows], dtype=np.float64)
    sources: dict[str, str | None] = {}
    problems: list[str] = []
    notes: list[str] = []
    for j, name in enumerate(names):
        prefix = name.split(".", 1)[0]
        model = next((f for f in fitted if f.prefix == prefix and f.folder is not None), None)
        shas = {
            (row.get("models") or {}).get(name)
            for row, v in zip(rows, x[:, j], strict=True)
            if not np.isnan(v)
        }
        if model is not None:
            training = TrainingSet.of(model.card)
            gaps = training.gaps(fingerprint)
            if gaps and any(not np.isnan(v) for v in x[:, j]):
                problems.append(
                    f"{name}: cannot tell which studies the {prefix} model in {model.folder} saw: "
                    f"{'; '.join(gaps)}. Fix: refit it (fit-{prefix}) where this state database is, "
                    "or leave the feature out with --features."
                )
                continue
            replaced = in_sample = foreign = 0
            for i, row in enumerate(rows):
                # the study, or another scan of its patient, was in the model's training set
                trained_on_it = training.contains(row)
                value_sha = (row.get("models") or {}).get(name)
                key = study_key(row["study_uid"])
                if trained_on_it and name in model.oof.get(key, {}):
                    x[i, j] = model.oof[key][name]
                    replaced += 1
                elif np.isnan(x[i, j]):
                    continue
                elif value_sha is None or value_sha != model.sha256:
                    foreign += 1
                elif trained_on_it:
                    in_sample += 1
            if foreign:
                problems.append(
                    f"{name}: {foreign} studies have values from another {prefix} model than the "
                    f"installed one in {model.folder} (or from an unrecorded one): its training set "
                    "is unknown, so they may be in-sample. Fix: process those studies again with "
                    "the installed model, or leave the feature out with --features."
                )
            if in_sample:
                how = "fit-head writes them to oof.csv" if prefix == "head" else "no out-of-fold scores exist"
                problems.append(
                    f"{name}: {in_sample} studies (or other scans of their patients) were in the "
                    f"{prefix} model's training set, so their values are in-sample ({how}). Fix: "
                    "leave the feature out with --features, or leave those studies out of the "
                    "labels CSV."
                )
            if replaced:
                notes.append(
                    f"{name}: out-of-fold values for {replaced} studies the {prefix} model was trained on"
                )
            sources[name] = model.sha256
            continue
        if prefix in ("head", "anomaly") and any(not np.isnan(v) for v in x[:, j]):
            problems.append(
                f"{name}: no installed {prefix} model (with its card) to tell which studies it was "
                f"trained on. Fix: keep the {prefix} folder that produced these values in "
                f"weights/, or leave the feature out with --features."
            )
            continue
        known = sorted(s for s in shas if s)
        if len(known) > 1 or (known and None in shas):
            problems.append(
                f"{name}: values from {len(shas)} different checkpoints (or unrecorded ones). Fix: "
                "process the labelled studies again with one checkpoint, or leave it out with --features."
            )
            continue
        sources[name] = known[0] if known else None
    if problems:
        raise ConfigError(
            f"{labels_path}: fit-fusion refuses inputs that would leak or mix models:\n  - "
            + "\n  - ".join(problems)
        )
    return x, sources, notes


def _finding_thresholds(
    labels: Any, joined: Any, names: list[str], x: np.ndarray, groups: list[str], opts: FusionOptions
) -> dict[str, Any]:
    """Per finding column: a Youden threshold on its first stored probability, chosen and scored nested."""
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
        if y[ok].sum() < 2 * opts.folds or (y[ok] == 0).sum() < 2 * opts.folds:
            continue
        scores = s[ok]
        group_ok = [g for g, k in zip(groups, ok, strict=True) if k]

        def identity(_train: np.ndarray, test: np.ndarray, scores: np.ndarray = scores) -> np.ndarray:
            return scores[test][:, None]  # no model: only the threshold is chosen inside the folds

        try:
            nested = nested_cv(
                identity,
                y[ok],
                group_ok,
                y[ok].astype(int),
                opts.folds,
                opts.seed,
                calibrate=False,
            )
        except ValueError:
            continue
        out[column] = {"feature": source, **output_card(nested.outputs[0], y[ok], group_ok, opts.seed)}
        out[column]["threshold"] = round(nested.outputs[0].threshold, 6)
    return out


def fit_fusion(
    state: State, labels_path: Path, out: Path, opts: FusionOptions = FusionOptions()
) -> FusionFit:
    from processor.fit.calibration import reliability_png
    from processor.provenance import software_versions

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
    groups = patient_groups(rows, allow_unknown=opts.allow_ungrouped)
    need = 2 * opts.folds
    if len(set(groups)) < need or y.sum() < need or (y == 0).sum() < need:
        raise ConfigError(
            f"{labels_path}: {note}; {int(y.sum())} positive and {int((y == 0).sum())} negative "
            f"with features, of {len(set(groups))} patients. Nested {opts.folds}-fold CV needs at "
            f"least {need} of each. Fix: process more labelled studies (or lower --folds)."
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
    fitted = [
        _installed("head", opts.head, "head.pt"),
        _installed("anomaly", opts.anomaly, "unet/diffusion_pytorch_model.safetensors"),
    ]
    fingerprint = state.patient_key_fingerprint()
    x, sources, stack_notes = _stack(rows, names, fitted, labels_path, fingerprint)
    with tqdm(
        total=opts.folds * (INNER_FOLDS + 1) + 1,
        desc="fit-fusion",
        unit="fit",
        file=sys.stderr,
        disable=not opts.progress,
        leave=False,
    ) as bar:

        def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
            scores = train_booster(x[train], y[train], inner, opts).predict(x[test])
            bar.update(1)
            return np.asarray(scores, dtype=float)[:, None]

        try:
            nested = nested_cv(
                fit_predict,
                y,
                groups,
                y.astype(int),
                opts.folds,
                opts.seed,
                target_sensitivity=opts.target_sensitivity,
                progress=bar.set_postfix_str,
            )
        except ValueError as exc:
            raise ConfigError(f"{labels_path}: {exc}. Fix: add labelled studies or lower --folds.") from exc
        bar.set_postfix_str("all studies")
        booster = train_booster(x, y, inner, opts)
        bar.update(1)
    result = nested.outputs[0]
    figures = output_card(result, y, groups, opts.seed)
    report = metrics.binary_report(
        y, result.raw_oof, result.threshold, groups=groups, called=result.called, seed=opts.seed
    )
    rule = f"sensitivity>={opts.target_sensitivity:g}" if opts.target_sensitivity is not None else "youden"
    keys = [r["study_uid"] for r in rows]
    all_groups = patient_groups(joined.rows, allow_unknown=opts.allow_ungrouped)
    card = {
        "kind": "fusion.lightgbm",
        "feature_names": names,
        "booster_feature_names": inner,
        "threshold": round(float(result.threshold), 6),
        "threshold_rule": rule,
        "threshold_scale": "calibrated probability",
        "calibration": result.calibration.as_dict(),
        "cv": {
            "folds": opts.folds,
            "seed": opts.seed,
            "scheme": "nested, grouped by patient (StratifiedGroupKFold)"
            if not any(r.get("patient_key") is None for r in rows)
            else "nested; NOT grouped by patient for studies processed before patients were recorded",
            "patients": len(set(groups)),
            **figures,
        },
        "finding_thresholds": _finding_thresholds(
            labels,
            joined,
            names,
            _stack(joined.rows, names, fitted, labels_path, fingerprint)[0],
            all_groups,
            opts,
        ),
        "params": lgb_params(len(y), opts),
        "num_boost_round": opts.rounds,
        "trained_on": {"feature_models": sources},
        # every study any part of the fit saw (the pathology rows and the finding-threshold rows)
        "training_keys": sorted({study_key(r["study_uid"]) for r in joined.rows}),
        "training_groups": training_groups(joined.rows),
        "patient_key_fingerprint": fingerprint,
        "training": {
            "studies": len(keys),
            "positives": int(y.sum()),
            "labels_file": str(labels_path),
            "unmatched_labels": len(joined.unmatched),
            "stacking": stack_notes,
        },
        "software": software_versions(),
        "data_hash": data_hash(keys, np.nan_to_num(x, nan=-1e300), y),
        "date": now_iso(),
    }
    note = "; ".join([note, grouping_note(groups, rows), *stack_notes])
    installed = report.better_than_chance or opts.force
    out.mkdir(parents=True, exist_ok=True)
    if installed:
        tmp = out / ".model.txt.tmp"
        booster.save_model(str(tmp))
        os.replace(tmp, out / "model.txt")
        write_card(out / "card.json", card)
        fpr, tpr, _ = metrics.roc_curve(y, result.raw_oof)
        write_bytes_atomic(
            out / "roc.png",
            metrics.roc_png(
                {f"fusion (AUROC {report.auroc:.3f})": (fpr, tpr)},
                f"fusion.lightgbm - nested {opts.folds}-fold CV ROC",
                marker=(1 - report.specificity, report.sensitivity),
            ),
        )
        write_bytes_atomic(
            out / "reliability.png",
            reliability_png(
                {"fusion (calibrated out-of-fold)": (y, result.calibrated_oof)},
                "fusion.lightgbm - reliability",
            ),
        )
    log.info(
        "fit_fusion.done folder=%s studies=%d auroc=%.3f installed=%s",
        out,
        len(keys),
        report.auroc,
        installed,
    )
    return FusionFit(out, installed, report, names, result.calibrated_oof, y, x, card, note)


def report_text(fit: FusionFit) -> str:
    r = fit.report
    cv = fit.card["cv"]
    rows: list[list[object]] = [
        ["studies", r.n],
        ["patients", cv["patients"]],
        ["positives", r.positives],
        ["CV AUROC", r.auroc],
        ["AUROC 95% CI", f"{r.auroc_low:.3f}–{r.auroc_high:.3f}"],
        [f"threshold ({fit.card['threshold_rule']}, calibrated)", fit.card["threshold"]],
        ["sensitivity (nested)", r.sensitivity],
        ["specificity (nested)", r.specificity],
        ["calibration", cv["calibration"]["method"]],
        ["ECE (calibrated, out-of-fold)", cv["ece"]],
        ["features", len(fit.feature_names)],
    ]
    lines = [metrics.format_table(["metric", "value"], rows)]
    thresholds = fit.card["finding_thresholds"]
    if thresholds:
        lines += [
            "",
            metrics.format_table(
                ["finding", "from feature", "AUROC", "threshold", "sens", "spec"],
                [
                    [name, t["feature"], t["auroc"], t["threshold"], t["sensitivity"], t["specificity"]]
                    for name, t in thresholds.items()
                ],
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
            f"wrote {fit.folder / 'model.txt'}, {fit.folder / 'card.json'}, {fit.folder / 'roc.png'} "
            f"and {fit.folder / 'reliability.png'}"
        )
    else:
        lines.append(
            "nothing installed; check the labels and features, or pass --force to install it anyway."
        )
    return "\n".join(lines)
