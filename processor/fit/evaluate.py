"""``evaluate``: how good are the installed models on the site's own labelled studies?

``python run.py evaluate --labels CSV [--findings …] [--out DIR] [--no-orientation]`` reads the
labels CSV (:func:`processor.fit.data.read_labels`: ``study_uid`` or ``accession``, then 0/1 per
column), matches it to the studies in the state database, and reports:

- ``pathology``: the fused ``probability_of_pathology`` (each study's current result: the
  ``studies`` row no later version replaced) and ``anomaly.score`` when stored;
- every other column (a finding): each stored source of it, ``head.``, ``lipro.`` and ``zs.``.

For each: n, positives, AUROC (``roc_auc_score``) with a 95 % percentile-bootstrap interval that
resamples patients (the studies' ``patient_key``; a study without one is a patient of its own),
sensitivity, specificity and the confusion table at the **installed** threshold (the fusion card's
``threshold`` / ``finding_thresholds``, the head card's ``thresholds``; without a card, the
threshold recorded in the studies' ``decision`` section, and the report says which), and the
expected calibration error with a reliability diagram.

Leakage guard: a model is not scored on the studies it was trained on. Cards list them as
``training_keys`` (:func:`processor.fit.data.study_key`); a study in the fusion's, or in the
training set of a model whose output the fusion takes (head, anomaly), is left out of the fused
figures, a study in the head's out of the ``head.*`` figures, and a threshold fitted on a study
leaves it out of that threshold's figures. The report counts them; a card without
``training_keys`` gives a warning that overlap cannot be checked.

The orientation check (:mod:`processor.fit.orientation`) re-runs the zero-shot model on the
labelled studies' inputs under the 8 in-plane flips and rotations (``--no-orientation`` skips it).

Output: a folder (default ``<outbox>/evaluations/<UTC time>/``) with ``report.md``,
``report.json`` (every number), ``roc.png``, ``calibration.png`` (and ``calibration_head.png``),
written atomically and readable by others; one summary line on stdout.

This module's top imports only the standard library: the CLI builds its parser on every start.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processor.fit.installed import (
    FUSED,
    SOURCES,
    TRAINED,
    Card,
    checkpoint_warnings,
    installed_threshold,
    producer,
    read_cards,
    score_models,
    stored_studies,
    threshold_from_results,
)

if TYPE_CHECKING:
    import numpy as np

    from processor.config import Settings
    from processor.fit.data import Labels

log = logging.getLogger(__name__)

EXIT_OK = 0
TARGET = "pathology"


def add_evaluate_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "evaluate",
        parents=[common],
        help="score the installed models on labelled studies: AUROC with CIs, thresholds, calibration",
    )
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="CSV: study_uid or accession, pathology 0/1 and/or 0/1 per finding",
    )
    p.add_argument("--findings", nargs="+", default=None, help="label columns to report (default: all)")
    p.add_argument(
        "--out", type=Path, default=None, help="report folder (default: <outbox>/evaluations/<UTC time>)"
    )
    p.add_argument(
        "--no-orientation",
        action="store_true",
        help="skip the zero-shot orientation check (8 image encodings per labelled study)",
    )
    p.add_argument("--bootstrap", type=_positive, default=2000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write a whole number of at least 1, e.g. 2000")
    return value


def cmd_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from processor.fit.evaluate_report import summary_line, write_report

    evaluation = evaluate(
        settings,
        args.labels,
        findings=args.findings,
        orientation=not args.no_orientation,
        n_boot=args.bootstrap,
        seed=args.seed,
    )
    folder = args.out or default_folder(settings.outbox)
    write_report(folder, evaluation)
    print(summary_line(evaluation, folder))
    return EXIT_OK


def default_folder(outbox: Path) -> Path:
    from datetime import UTC, datetime

    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    folder, n = outbox / "evaluations" / stamp, 1
    while folder.exists():
        n += 1
        folder = outbox / "evaluations" / f"{stamp}-{n}"
    return folder


# ---------------------------------------------------------------------------------------- scores
@dataclass
class Scored:
    """One score against one label column, with the figures of the report (``as_dict``)."""

    label: str
    score: str  # "fused", "anomaly.score", "head.Lung nodule", …
    figures: dict[str, Any] = field(default_factory=dict)
    curve: tuple[np.ndarray, np.ndarray] | None = None  # (y, s) of the studies scored
    probability: bool = True


def figures(
    y: np.ndarray,
    s: np.ndarray,
    groups: Sequence[object],
    threshold: float | None,
    *,
    probability: bool,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """n, positives, AUROC and its patient-bootstrap CI, and at ``threshold`` sensitivity,
    specificity and TP FP FN TN; ECE (10 equal-width bins) for probabilities."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from processor.fit.calibration import (
        bootstrap_auroc_ci,
        confusion_counts,
        expected_calibration_error,
        sensitivity_specificity,
    )

    positives = int(y.sum())
    both = 0 < positives < y.size
    auroc = float(roc_auc_score(y, s)) if both else None
    low, high = bootstrap_auroc_ci(y, s, groups=groups, n_boot=n_boot, seed=seed) if both else (None, None)
    out: dict[str, Any] = {
        "n": int(y.size),
        "positives": positives,
        "auroc": auroc,
        "auroc_ci95": [_num(low), _num(high)],
        "patients": len(set(groups)),
        "threshold": threshold,
        "sensitivity": None,
        "specificity": None,
        "confusion": None,
        "ece": None,
    }
    if threshold is not None and y.size:
        sens, spec = sensitivity_specificity(y, s, threshold)
        tp, fp, fn, tn = confusion_counts(y, s, threshold)
        out.update(
            sensitivity=_num(sens), specificity=_num(spec), confusion={"tp": tp, "fp": fp, "fn": fn, "tn": tn}
        )
    if probability and y.size and bool(np.all((s >= 0) & (s <= 1))):
        out["ece"] = expected_calibration_error(y, s, n_bins=10)
    return out


def _num(value: float | None) -> float | None:
    import math

    return None if value is None or math.isnan(value) else float(value)


# ---------------------------------------------------------------------------------------- evaluation
@dataclass
class Evaluation:
    """Everything the report shows: scored rows, what was left out and why, warnings, orientation."""

    labels_file: Path
    database: Path
    created: str
    labelled: int
    matched: int
    unmatched: list[str]
    cards: dict[str, Card]
    pathology: list[Scored] = field(default_factory=list)
    findings: list[Scored] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)  # model → labelled studies it was trained on
    warnings: list[str] = field(default_factory=list)
    orientation: dict[str, Any] = field(default_factory=dict)
    n_boot: int = 2000
    seed: int = 0


def evaluate(
    settings: Settings,
    labels_path: Path,
    *,
    findings: Sequence[str] | None = None,
    orientation: bool = True,
    n_boot: int = 2000,
    seed: int = 0,
) -> Evaluation:
    """Score the stored outputs of the labelled studies; ConfigError (with the fix) when none match."""
    from processor.errors import ConfigError
    from processor.fit.data import join, now_iso, read_labels
    from processor.state import State

    labels = read_labels(labels_path)
    columns = _columns(labels, findings, labels_path)
    if not settings.state.exists():
        raise ConfigError(
            f"no state database at {settings.state}: process the labelled studies first "
            "(`python run.py process ...` or the daemon), then evaluate."
        )
    state = State(settings.state)
    try:
        joined = join(labels, stored_studies(state))
        if not joined.rows:
            raise ConfigError(
                f"{labels_path}: none of its {len(labels)} studies is in {settings.state} (e.g. "
                f"{', '.join(joined.unmatched[:3])}). Fix: process them first (`python run.py process "
                "...` or the daemon), and check that the CSV's study_uid / accession are those of the "
                "DICOM (StudyInstanceUID, AccessionNumber)."
            )
        evaluation = Evaluation(
            labels_path,
            settings.state,
            now_iso(),
            len(labels),
            len(joined.rows),
            joined.unmatched,
            cards={},
            n_boot=n_boot,
            seed=seed,
        )
        evaluation.cards = read_cards(settings.weights, evaluation.warnings)
        values = {c: labels.columns[c][joined.label_index] for c in columns}
        _score_all(evaluation, joined.rows, values, state.patient_key_fingerprint())
        if not evaluation.pathology and not evaluation.findings:
            raise ConfigError(
                f"{labels_path}: {len(joined.rows)} labelled studies are stored, but none has a model "
                f"output for the columns {columns}. Fix: install the model weights "
                "(`python run.py weights`) and process the studies again, or check the column names "
                "against the findings (e.g. `Lung nodule`)."
            )
        if orientation:
            from processor.fit.orientation import orientation_check

            evaluation.orientation = orientation_check(
                settings, state, joined.rows, values, n_boot=n_boot, seed=seed
            )
        else:
            evaluation.orientation = {"skipped": "--no-orientation was given"}
        if evaluation.orientation.get("warning"):
            evaluation.warnings.append(evaluation.orientation["warning"])
    finally:
        state.close()
    return evaluation


def _columns(labels: Labels, findings: Sequence[str] | None, path: Path) -> list[str]:
    from processor.errors import ConfigError

    if findings is None:
        return list(labels.columns)
    missing = [f for f in findings if f not in labels.columns]
    if missing:
        raise ConfigError(
            f"{path}: no column {', '.join(map(repr, missing))}. Fix: check the spelling; the label "
            f"columns are {list(labels.columns)}."
        )
    return ([TARGET] if TARGET in labels.columns and TARGET not in findings else []) + list(findings)


def _score_all(
    evaluation: Evaluation,
    rows: list[dict[str, Any]],
    values: dict[str, np.ndarray],
    fingerprint: str | None = None,
) -> None:
    import numpy as np

    scorer = _Scorer(evaluation, rows, fingerprint)
    for label, y_all in values.items():
        if label == TARGET:
            scores = [(FUSED, np.array([np.nan if r["fused"] is None else r["fused"] for r in rows]))]
            scores += _feature_scores(rows, ["anomaly.score"])
        else:
            scores = _feature_scores(rows, [f"{src}.{label}" for src in SOURCES])
        for score, s_all in scores:
            scored = scorer.score(label, score, y_all, s_all)
            if scored is not None:
                (evaluation.pathology if label == TARGET else evaluation.findings).append(scored)
    evaluation.warnings += checkpoint_warnings(rows)


def _stored_model(row: dict[str, Any], score: str) -> str | None:
    """The checkpoint that produced a study's stored ``score`` (the fusion's from its result JSON)."""
    if score == FUSED:
        return ((row.get("result") or {}).get("fusion") or {}).get("sha256")
    return (row.get("models") or {}).get(score)


class _Scorer:
    """Scores one (label, score) pair at a time over the labelled studies, with the leakage guard."""

    def __init__(
        self, evaluation: Evaluation, rows: list[dict[str, Any]], fingerprint: str | None = None
    ) -> None:
        import numpy as np

        from processor.fit.data import TrainingSet, patient_groups, study_key

        self.evaluation, self.rows = evaluation, rows
        self.keys = [study_key(r["study_uid"]) for r in rows]
        self.groups = patient_groups(rows, allow_unknown=True)
        unknown = sum(1 for r in rows if r.get("patient_key") is None)
        if unknown:
            evaluation.warnings.append(
                f"{unknown} studies were processed before ctwatch recorded patients: each counts as "
                "a patient of its own in the confidence intervals, and other scans of a model's "
                "training patients among them cannot be recognised. Fix: process them again."
            )
        self.warned: set[str] = set()
        # the studies each model saw, or another scan of whose patient it saw
        self.trained: dict[str, np.ndarray] = {}
        for model, card in evaluation.cards.items():
            if card.training_keys is not None and card.data is not None:
                training = TrainingSet.of(card.data)
                hit = np.array([training.contains(r) for r in rows], dtype=bool)
                self.trained[model] = hit
                evaluation.left_out[model] = int(hit.sum())
                gaps = [g for g in training.gaps(fingerprint) if "training studies" not in g]
                if gaps:
                    evaluation.warnings.append(
                        f"{card.path}: {'; '.join(gaps)}, so other scans of its training patients "
                        f"cannot be recognised and may be scored as held out. Fix: refit it (fit-{model})."
                    )

    def _warn_once(self, model: str, text: str) -> None:
        if model not in self.warned:
            self.warned.add(model)
            self.evaluation.warnings.append(text)

    def guard(
        self, score: str, models: Sequence[str], usable: np.ndarray
    ) -> tuple[np.ndarray, dict[str, int]]:
        """Studies in the training set of any of ``models`` (mask), and how many each one took first."""
        import numpy as np

        excluded = np.zeros(len(self.rows), dtype=bool)
        left: dict[str, int] = {}
        for model in models:
            card = self.evaluation.cards[model]
            if card.data is None:
                if model == producer(score):
                    self._warn_once(
                        model,
                        f"{score}: no card at {card.path}, so the model that produced these values is "
                        f"not installed there and overlap with {TRAINED[model]}'s training set cannot be "
                        "checked. Fix: install the model the studies were processed with, or process "
                        "them again with the installed one.",
                    )
                continue
            if model not in self.trained:
                self._warn_once(
                    model,
                    f"{card.path} has no training_keys (fitted before ctwatch recorded them): overlap "
                    f"between {TRAINED[model]}'s training set and these studies cannot be checked. Fix: "
                    f"refit it (fit-{model}) to record them.",
                )
                continue
            hit = self.trained[model] & usable
            if (hit & ~excluded).any():
                left[model] = int((hit & ~excluded).sum())
            excluded |= hit
        # values the installed model did not produce: its card says nothing about their training set
        maker = producer(score)
        installed = self.evaluation.cards.get(maker) if maker else None
        if installed is not None and installed.data is not None and installed.weights_sha256:
            other = (
                np.array([_stored_model(r, score) != installed.weights_sha256 for r in self.rows]) & usable
            )
            if (other & ~excluded).any():
                left[f"{maker} (another checkpoint)"] = int((other & ~excluded).sum())
                self._warn_once(
                    f"{maker}-checkpoint",
                    f"{score}: {int(other.sum())} studies were scored by another {maker} model than "
                    f"the one installed in {installed.path.parent} (or by an unrecorded one); they are "
                    "left out, since its training set is unknown. Fix: process them again with the "
                    "installed model.",
                )
            excluded |= other
        return excluded, left

    def score(self, label: str, score: str, y_all: np.ndarray, s_all: np.ndarray) -> Scored | None:
        import numpy as np

        e = self.evaluation
        threshold, origin, fitted_on = installed_threshold(e.cards, self.rows, label, score)
        usable = ~np.isnan(y_all) & ~np.isnan(s_all)
        excluded, left = self.guard(
            score, list(dict.fromkeys([*score_models(e.cards, score), *fitted_on])), usable
        )
        ok = usable & ~excluded
        if not ok.any():
            return None
        y, s = y_all[ok].astype(int), s_all[ok]
        is_probability = score != "anomaly.score"
        groups = [g for g, k in zip(self.groups, ok, strict=True) if k]
        scored = Scored(label, score, probability=is_probability, curve=(y, s))
        scored.figures = figures(
            y, s, groups, threshold, probability=is_probability, n_boot=e.n_boot, seed=e.seed
        )
        scored.figures.update(threshold_from=origin, left_out=left)
        recorded = threshold_from_results([r for r, k in zip(self.rows, ok, strict=True) if k], label, score)
        if recorded is not None and threshold is not None and abs(recorded[0] - threshold) > 1e-6:
            scored.figures["threshold_in_results"] = recorded[0]
            e.warnings.append(
                f"{label} / {score}: the studies were decided at {recorded[0]:.4g} ({recorded[1]}), the "
                f"installed threshold is {threshold:.4g} ({origin}); figures use the installed one. "
                "Process the studies again to decide them with the installed models."
            )
        return scored


def _feature_scores(rows: Sequence[dict[str, Any]], names: Iterable[str]) -> list[tuple[str, np.ndarray]]:
    import numpy as np

    out = []
    for name in names:
        s = np.array([r["features"].get(name, np.nan) for r in rows], dtype=float)
        if not np.isnan(s).all():
            out.append((name, s))
    return out
