"""``fit-head``: train the supervised head on stored CT-CLIP latents from a labels CSV.

Latents come from SQLite (``latents`` table, name ``ctclip``, each study's current result),
labels from the CSV (see :mod:`processor.fit.data`). Cross-validation is nested and grouped by
patient (:mod:`processor.fit.nested`): outer folds (stratified on each study's rarest positive
finding, every study of a patient in one fold) give the CV AUROC per finding; inside each
training part, inner folds choose the calibration map and the threshold that the held-out fold is
called with, so sensitivity, specificity and the calibration error are measured on studies no
part of the fit saw. The head is then refitted on all studies, calibrated on the outer
out-of-fold scores, and written with its card, ROC and reliability plots to ``weights/head/``.

``oof.csv`` beside it holds each training study's calibrated out-of-fold probabilities and its
fold: ``fit-fusion`` stacks on those, never on the installed head's in-sample outputs.
The card binds the head to the CT-CLIP checkpoint whose latents trained it (``trained_on``).
"""

from __future__ import annotations

import csv
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from processor.atomic import write_bytes_atomic
from processor.errors import ConfigError
from processor.fit import metrics
from processor.fit.data import (
    OOF_NAME,
    data_hash,
    grouping_note,
    join,
    now_iso,
    patient_groups,
    read_labels,
    study_key,
    training_groups,
    unmatched_note,
)
from processor.fit.nested import INNER_FOLDS, nested_cv, output_card
from processor.models.cache import sha256_file
from processor.models.head import FindingHead, build_head, save_head
from processor.state import State

log = logging.getLogger(__name__)

LATENT_NAME = "ctclip"


@dataclass(frozen=True)
class HeadOptions:
    hidden: int = 0
    dropout: float = 0.1
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-2
    folds: int = 5
    seed: int = 0
    findings: tuple[str, ...] | None = None
    progress: bool = True
    allow_ungrouped: bool = False  # studies processed before patients were recorded: one group each


@dataclass
class HeadFit:
    folder: Path
    findings: list[str]
    cv_auroc: dict[str, float]
    oof: np.ndarray
    labels: np.ndarray
    card: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def train_head(x: np.ndarray, y: np.ndarray, opts: HeadOptions, bar: tqdm | None = None) -> FindingHead:
    """Full-batch AdamW on the masked binary cross-entropy (NaN labels do not count)."""
    torch.manual_seed(opts.seed)
    xt, yt = (
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(np.nan_to_num(y, nan=0.0).astype(np.float32)),
    )
    known = torch.from_numpy(~np.isnan(y)).float()
    model = build_head(x.shape[1], [str(i) for i in range(y.shape[1])], opts.hidden, opts.dropout)
    model.set_normalisation(xt.mean(0), xt.std(0, unbiased=False))
    optimiser = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss(reduction="none")
    model.train()
    for _ in range(opts.epochs):
        optimiser.zero_grad()
        loss = (loss_fn(model(xt), yt) * known).sum() / known.sum().clamp(min=1)
        loss.backward()
        optimiser.step()
        if bar is not None:
            bar.update(1)
    return model.eval()


def _strata(y: np.ndarray) -> np.ndarray:
    """Each study's rarest positive finding (column index), or −1 when it has none."""
    positives = np.nansum(y, axis=0)
    rarity = np.argsort(positives, kind="stable")
    strata = np.full(y.shape[0], -1)
    for col in rarity[::-1]:  # rarest last, so it wins
        strata[np.nan_to_num(y[:, col]) == 1] = col
    return strata


def _latent_source(rows: list[dict[str, Any]], labels_path: Path) -> str | None:
    """The sha256 of the CT-CLIP checkpoint that produced every latent, None when not recorded."""
    shas = {row.get("model_sha256") for row in rows}
    known = sorted(s for s in shas if s)
    if len(known) > 1 or (known and None in shas):
        counts = ", ".join(
            f"{(s or 'unrecorded')[:12]}: {sum(1 for r in rows if r.get('model_sha256') == s)}"
            for s in sorted(shas, key=str)
        )
        raise ConfigError(
            f"{labels_path}: the stored latents come from different CT-CLIP checkpoints ({counts} "
            "studies); a head trained on a mix would score neither model right. Fix: process "
            "the labelled studies again with one checkpoint (`python run.py requeue` or drop "
            "them again), then fit."
        )
    return known[0] if known else None


def fit_head(state: State, labels_path: Path, out: Path, opts: HeadOptions = HeadOptions()) -> HeadFit:
    from processor.fit.calibration import reliability_png
    from processor.provenance import software_versions

    labels = read_labels(labels_path, opts.findings)
    findings = list(labels.columns)
    if not findings:
        raise ConfigError(f"{labels_path}: no label columns. Fix: add one 0/1 column per finding.")
    stored = state.study_latents(LATENT_NAME)
    if not stored:
        raise ConfigError(
            f"{state.path}: no CT-CLIP image latents are stored. Fix: run the pipeline with a "
            "ctclip step (it stores the latent) over the labelled studies, then fit again."
        )
    joined = join(labels, stored)
    note = unmatched_note(joined, len(labels))
    groups = patient_groups(joined.rows, allow_unknown=opts.allow_ungrouped)
    if len(set(groups)) < 2 * opts.folds:
        raise ConfigError(
            f"{labels_path}: {note}, of {len(set(groups))} patients; at least {2 * opts.folds} "
            f"patients are needed for nested {opts.folds}-fold cross-validation. Fix: process more "
            "labelled studies first (or lower --folds)."
        )
    latent_sha = _latent_source(joined.rows, labels_path)
    x = np.stack([row["vector"] for row in joined.rows]).astype(np.float32)
    y = np.stack([labels.columns[f][joined.label_index] for f in findings], axis=1)
    for j, name in enumerate(findings):
        known = y[~np.isnan(y[:, j]), j]
        if known.sum() < 2 * opts.folds or (known == 0).sum() < 2 * opts.folds:
            raise ConfigError(
                f"{labels_path}: finding {name!r} has {int(known.sum())} positive and "
                f"{int((known == 0).sum())} negative matched studies; nested {opts.folds}-fold "
                f"cross-validation needs at least {2 * opts.folds} of each. Fix: add labelled "
                "studies, lower --folds, or leave it out with --findings."
            )
    fits = opts.folds * (INNER_FOLDS + 1) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred rows: extra threads only add synchronisation
    with tqdm(
        total=opts.epochs * fits,
        desc="fit-head",
        unit="epoch",
        file=sys.stderr,
        disable=not opts.progress,
        leave=False,
    ) as bar:

        def fit_predict(train: np.ndarray, test: np.ndarray) -> np.ndarray:
            model = train_head(x[train], y[train], opts, bar)
            return model.probabilities(torch.from_numpy(x[test])).numpy().astype(float)

        try:
            nested = nested_cv(
                fit_predict,
                y,
                groups,
                _strata(y),
                opts.folds,
                opts.seed,
                progress=lambda text: bar.set_postfix_str(text, refresh=False),
            )
            bar.set_postfix_str("all studies", refresh=False)
            final = train_head(x, y, opts, bar)
        except ValueError as exc:
            raise ConfigError(f"{labels_path}: {exc}. Fix: add labelled studies or lower --folds.") from exc
        finally:
            torch.set_num_threads(threads)
    cv: dict[str, dict[str, Any]] = {}
    curves, reliability = {}, {}
    for j, name in enumerate(findings):
        result = nested.outputs[j]
        cv[name] = output_card(result, y[:, j], groups, opts.seed)
        ok = result.known
        fpr, tpr, _ = metrics.roc_curve(y[ok, j], result.raw_oof[ok])
        curves[f"{name} (AUROC {cv[name]['auroc']:.3f})"] = (fpr, tpr)
        reliability[name] = (y[ok, j], result.calibrated_oof[ok])
    keys = [row["study_uid"] for row in joined.rows]
    card = {
        "kind": "ctclip.head",
        "latent": LATENT_NAME,
        "findings": findings,
        "architecture": {"in_dim": int(x.shape[1]), "hidden": opts.hidden, "dropout": opts.dropout},
        "thresholds": {name: round(nested.outputs[j].threshold, 6) for j, name in enumerate(findings)},
        "threshold_rule": "youden on calibrated out-of-fold probabilities",
        "calibration": {name: nested.outputs[j].calibration.as_dict() for j, name in enumerate(findings)},
        "cv": {
            "folds": opts.folds,
            "seed": opts.seed,
            "scheme": "nested, grouped by patient (StratifiedGroupKFold)"
            if not any(r.get("patient_key") is None for r in joined.rows)
            else "nested; NOT grouped by patient for studies processed before patients were recorded",
            "patients": len(set(groups)),
            "per_finding": cv,
        },
        "trained_on": {"latent": LATENT_NAME, "model_sha256": latent_sha},
        "training_keys": sorted(study_key(k) for k in keys),
        # their patients too: the head's outputs on another scan of one of them are in-sample
        "training_groups": training_groups(joined.rows),
        "patient_key_fingerprint": state.patient_key_fingerprint(),
        "training": {
            "studies": len(keys),
            "epochs": opts.epochs,
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "labels_file": str(labels_path),
            "unmatched_labels": len(joined.unmatched),
        },
        "software": software_versions(),
        "training_set_hash": data_hash(keys, x, np.nan_to_num(y, nan=-1)),
        "date": now_iso(),
    }
    weights = save_head(out, final, card)
    write_bytes_atomic(out / OOF_NAME, _oof_csv(joined.rows, nested, findings, sha256_file(weights)))
    write_bytes_atomic(
        out / "roc.png", metrics.roc_png(curves, f"ctclip.head - nested {opts.folds}-fold CV ROC")
    )
    write_bytes_atomic(
        out / "reliability.png",
        reliability_png(reliability, "ctclip.head - calibrated out-of-fold probabilities"),
    )
    if latent_sha is None:
        note += (
            "; the latents' CT-CLIP checkpoint is not recorded (processed by an older ctwatch), "
            "so the head cannot be bound to it: process the studies again to bind it"
        )
    note += "; " + grouping_note(groups, joined.rows)
    log.info("fit_head.done folder=%s studies=%d findings=%d", out, len(keys), len(findings))
    return HeadFit(
        out,
        findings,
        {n: cv[n]["auroc"] for n in findings},
        np.stack([o.calibrated_oof for o in nested.outputs], axis=1),
        y,
        card,
        note,
    )


def _oof_csv(rows: list[dict[str, Any]], nested: Any, findings: list[str], head_sha256: str) -> bytes:
    """study_key (not the UID), fold, ``head.<finding>`` (calibrated out-of-fold probabilities), and
    the sha256 of the head.pt they belong to: fit-fusion ignores the file beside another head."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["study_key", "head_sha256", "fold", *(f"head.{f}" for f in findings)])
    for i, row in enumerate(rows):
        values = [nested.outputs[j].calibrated_oof[i] for j in range(len(findings))]
        writer.writerow(
            [
                study_key(row["study_uid"]),
                head_sha256,
                int(nested.fold_of[i]),
                *("" if np.isnan(v) else f"{v:.6f}" for v in values),
            ]
        )
    return buffer.getvalue().encode()


def report_text(fit: HeadFit) -> str:
    rows = []
    for name in fit.findings:
        m = fit.card["cv"]["per_finding"][name]
        low, high = m["auroc_ci95"]
        rows.append(
            [
                name,
                m["n"],
                m["positives"],
                m["auroc"],
                low,
                high,
                m["threshold"],
                m["sensitivity"],
                m["specificity"],
                m["ece"],
                m["calibration"]["method"],
            ]
        )
    table = metrics.format_table(
        [
            "finding",
            "n",
            "pos",
            "CV AUROC",
            "CI low",
            "CI high",
            "threshold",
            "sens",
            "spec",
            "ECE",
            "calibration",
        ],
        rows,
    )
    weak = [n for n in fit.findings if not fit.card["cv"]["per_finding"][n]["better_than_chance"]]
    lines = [
        table,
        "",
        f"nested {fit.card['cv']['folds']}-fold CV grouped by patient: AUROC from out-of-fold scores; "
        "sens/spec and ECE on held-out folds called and calibrated by what their training folds chose",
    ]
    if weak:
        lines.append("no better than chance (95% CI of the AUROC includes 0.5): " + ", ".join(weak))
    if fit.note:
        lines.append(fit.note)
    lines.append(
        f"wrote {fit.folder / 'head.pt'}, {fit.folder / 'card.json'}, {fit.folder / OOF_NAME}, "
        f"{fit.folder / 'roc.png'} and {fit.folder / 'reliability.png'}"
    )
    return "\n".join(lines)
