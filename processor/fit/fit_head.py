"""``fit-head``: train the supervised head on stored CT-CLIP latents from a labels CSV.

Latents come from SQLite (``latents`` table, name ``ctclip``, the latest arrival of each study),
labels from the CSV (see :mod:`processor.fit.data`). Folds are stratified on each study's rarest
positive finding (or "none"), so every fold sees every finding. Out-of-fold probabilities give
the CV AUROC per finding and a Youden threshold per finding; the head is then refitted on all
studies and written with its card and ROC plot to ``weights/head/``.
"""

from __future__ import annotations

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
from processor.fit.data import data_hash, join, now_iso, read_labels, unmatched_note
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


def _cross_validate(
    x: np.ndarray,
    y: np.ndarray,
    folds: list[tuple[np.ndarray, np.ndarray]],
    oof: np.ndarray,
    opts: HeadOptions,
) -> FindingHead:
    """Fill ``oof`` with out-of-fold probabilities; return the head refitted on every study."""
    with tqdm(
        total=opts.epochs * (opts.folds + 1),
        desc="fit-head",
        unit="epoch",
        file=sys.stderr,
        disable=not opts.progress,
        leave=False,
    ) as bar:
        for k, (train, test) in enumerate(folds):
            bar.set_postfix_str(f"fold {k + 1}/{opts.folds}", refresh=False)
            model = train_head(x[train], y[train], opts, bar)
            oof[test] = model.probabilities(torch.from_numpy(x[test])).numpy()
        bar.set_postfix_str("all studies", refresh=False)
        return train_head(x, y, opts, bar)


def fit_head(state: State, labels_path: Path, out: Path, opts: HeadOptions = HeadOptions()) -> HeadFit:
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
    if len(joined.rows) < 2 * opts.folds:
        raise ConfigError(
            f"{labels_path}: {note}; at least {2 * opts.folds} are needed for {opts.folds}-fold "
            "cross-validation. Fix: process more labelled studies first."
        )
    x = np.stack([row["vector"] for row in joined.rows]).astype(np.float32)
    y = np.stack([labels.columns[f][joined.label_index] for f in findings], axis=1)
    for j, name in enumerate(findings):
        known = y[~np.isnan(y[:, j]), j]
        if known.sum() < 2 or (known == 0).sum() < 2:
            raise ConfigError(
                f"{labels_path}: finding {name!r} has {int(known.sum())} positive and "
                f"{int((known == 0).sum())} negative matched studies; at least 2 of each are "
                "needed. Fix: add labelled studies or leave it out with --findings."
            )
    folds = metrics.stratified_folds(_strata(y), opts.folds, opts.seed)
    oof = np.full(y.shape, np.nan)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few hundred rows: extra threads only add synchronisation
    try:
        final = _cross_validate(x, y, folds, oof, opts)
    finally:
        torch.set_num_threads(threads)
    cv: dict[str, dict[str, Any]] = {}
    curves = {}
    for j, name in enumerate(findings):
        ok = ~np.isnan(y[:, j])
        threshold = metrics.youden_threshold(y[ok, j], oof[ok, j])
        report = metrics.binary_report(y[ok, j], oof[ok, j], threshold)
        cv[name] = report.as_dict()
        fpr, tpr, _ = metrics.roc_curve(y[ok, j], oof[ok, j])
        curves[f"{name} (AUROC {report.auroc:.3f})"] = (fpr, tpr)
    keys = [row["study_uid"] for row in joined.rows]
    card = {
        "kind": "ctclip.head",
        "latent": LATENT_NAME,
        "findings": findings,
        "architecture": {"in_dim": int(x.shape[1]), "hidden": opts.hidden, "dropout": opts.dropout},
        "thresholds": {name: cv[name]["threshold"] for name in findings},
        "cv": {"folds": opts.folds, "seed": opts.seed, "per_finding": cv},
        "training": {
            "studies": len(keys),
            "epochs": opts.epochs,
            "lr": opts.lr,
            "weight_decay": opts.weight_decay,
            "labels_file": str(labels_path),
            "unmatched_labels": len(joined.unmatched),
        },
        "training_set_hash": data_hash(keys, x, np.nan_to_num(y, nan=-1)),
        "date": now_iso(),
    }
    save_head(out, final, card)
    write_bytes_atomic(out / "roc.png", metrics.roc_png(curves, f"ctclip.head - {opts.folds}-fold CV ROC"))
    log.info("fit_head.done folder=%s studies=%d findings=%d", out, len(keys), len(findings))
    return HeadFit(out, findings, {n: cv[n]["auroc"] for n in findings}, oof, y, card, note)


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
            ]
        )
    table = metrics.format_table(
        ["finding", "n", "pos", "CV AUROC", "CI low", "CI high", "threshold", "sens", "spec"], rows
    )
    weak = [n for n in fit.findings if not fit.card["cv"]["per_finding"][n]["better_than_chance"]]
    lines = [table, ""]
    if weak:
        lines.append("no better than chance (95% CI of the AUROC includes 0.5): " + ", ".join(weak))
    if fit.note:
        lines.append(fit.note)
    lines.append(f"wrote {fit.folder / 'head.pt'}, {fit.folder / 'card.json'} and {fit.folder / 'roc.png'}")
    return "\n".join(lines)
