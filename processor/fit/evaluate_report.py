"""The ``evaluate`` report folder: ``report.json`` (every number), ``report.md``, the figures, and
the one-line summary. Files are written atomically (:func:`processor.atomic.write_bytes_atomic`)
and made readable by every account (0644; the folder 0755): reports are for the whole team."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from processor.atomic import write_bytes_atomic
from processor.fit.evaluate import FUSED, TARGET, TRAINED, Evaluation, Scored

VERSION = 1
MAX_CURVES = 8


def document(evaluation: Evaluation) -> dict[str, Any]:
    """``report.json``: every number of the report (NaN → null)."""
    e = evaluation
    return _clean(
        {
            "kind": "ctwatch.evaluation",
            "version": VERSION,
            "created": e.created,
            "labels_file": str(e.labels_file),
            "database": str(e.database),
            "studies": {
                "labelled": e.labelled,
                "found": e.matched,
                "not_found": len(e.unmatched),
                "not_found_examples": e.unmatched[:10],
            },
            "cards": {
                name: {
                    "path": str(card.path),
                    "installed": card.data is not None,
                    "training_keys": None if card.training_keys is None else len(card.training_keys),
                    "date": (card.data or {}).get("date"),
                }
                for name, card in e.cards.items()
            },
            "left_out": {
                model: {"studies": n, "because": f"{TRAINED[model]} was trained on them"}
                for model, n in e.left_out.items()
            },
            "bootstrap": {
                "resamples": e.n_boot,
                "seed": e.seed,
                "method": "percentile bootstrap of roc_auc_score, resampling patients (patient_key; "
                "a study without one is its own patient)",
            },
            "pathology": {s.score: s.figures for s in e.pathology},
            "findings": _findings(e.findings),
            "macro_auroc": macro_auroc(e.findings),
            "orientation": e.orientation,
            "warnings": e.warnings,
        }
    )


def _findings(scored: list[Scored]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for s in scored:
        out.setdefault(s.label, {})[s.score.split(".", 1)[0]] = {"feature": s.score, **s.figures}
    return out


def macro_auroc(scored: list[Scored]) -> dict[str, dict[str, Any]]:
    """Per source: the mean AUROC over its findings with both classes present."""
    by: dict[str, list[float]] = {}
    for s in scored:
        if s.figures.get("auroc") is not None:
            by.setdefault(s.score.split(".", 1)[0], []).append(s.figures["auroc"])
    return {src: {"auroc": sum(v) / len(v), "findings": len(v)} for src, v in by.items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if hasattr(value, "item"):  # numpy scalars
        return _clean(value.item())
    return value


# ---------------------------------------------------------------------------------------- markdown
def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ci(fig: dict[str, Any]) -> str:
    low, high = fig.get("auroc_ci95") or (None, None)
    return "–" if low is None or high is None else f"{low:.3f}–{high:.3f}"


def _row(name: str, fig: dict[str, Any]) -> str:
    c = fig.get("confusion") or {}
    left = ", ".join(f"{n} ({m})" for m, n in (fig.get("left_out") or {}).items())
    cells = [
        name,
        _f(fig["n"]),
        _f(fig["positives"]),
        _f(fig.get("auroc")),
        _ci(fig),
        _f(fig.get("threshold"), 4),
        _f(fig.get("sensitivity")),
        _f(fig.get("specificity")),
        " ".join(_f(c.get(k)) for k in ("tp", "fp", "fn", "tn")) if c else "–",
        _f(fig.get("ece")),
        left or "–",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = (
    "| {first} | n | positives | AUROC | 95 % CI | threshold | sensitivity | specificity | "
    "TP FP FN TN | ECE | left out |\n|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|"
)


def markdown(evaluation: Evaluation, files: dict[str, str]) -> str:
    e = evaluation
    lines = [
        f"# ctwatch evaluation, {e.created}",
        "",
        f"Labels `{e.labels_file}`: {e.labelled} studies, {e.matched} found in `{e.database}`"
        + (
            f" ({len(e.unmatched)} not processed yet, e.g. {', '.join(e.unmatched[:3])})."
            if e.unmatched
            else "."
        ),
        "",
    ]
    if e.warnings:
        lines += ["## Warnings", "", *(f"- {w}" for w in e.warnings), ""]
    if e.left_out:
        lines += ["## Left out (training sets)", ""]
        lines += [f"- {n} studies left out: {TRAINED[m]} was trained on them." for m, n in e.left_out.items()]
        lines += [
            "",
            "A model is not scored on its own training studies, nor on those of a model whose output "
            "it takes (the fusion takes the head's and the anomaly model's), nor with a threshold "
            "fitted on them.",
            "",
        ]
    if e.pathology:
        lines += ["## Pathology", "", HEADER.format(first="score")]
        lines += [_row("fused probability" if s.score == FUSED else s.score, s.figures) for s in e.pathology]
        lines += ["", *_threshold_notes(e.pathology), ""]
    if e.findings:
        lines += ["## Findings", "", HEADER.format(first="finding / source")]
        lines += [_row(f"{s.label} / {s.score.split('.', 1)[0]}", s.figures) for s in e.findings]
        macro = macro_auroc(e.findings)
        lines += [
            "",
            "Macro AUROC: "
            + "; ".join(
                f"{src} {m['auroc']:.3f} ({m['findings']} finding{'s' if m['findings'] != 1 else ''})"
                for src, m in macro.items()
            )
            + ".",
            "",
            *_threshold_notes(e.findings),
            "",
        ]
    lines += [f"![{name}]({name})" for name in files.values() if name.endswith(".png")]
    lines += ["", *_orientation(e.orientation), ""]
    lines += [
        "## How these numbers are made",
        "",
        f"- AUROC: `sklearn.metrics.roc_auc_score`; 95 % CI: percentile bootstrap ({e.n_boot} "
        f"resamples, seed {e.seed}) resampling patients (a study without a patient key is its own "
        "patient); `–` when a class is too rare for a stable interval.",
        "- Sensitivity, specificity, TP FP FN TN: a study is called positive when its score is at or "
        "above the threshold; thresholds are the installed cards' (else the ones the studies were "
        "decided with), never chosen on these labels.",
        "- ECE: expected calibration error, 10 equal-width bins (Guo et al. 2017)"
        + (
            "; `calibration.png` shows the reliability diagram of the fused probability."
            if "calibration.png" in files
            else "; no fused probability was scored, so there is no reliability diagram of it."
        ),
        "",
    ]
    return "\n".join(lines)


def _threshold_notes(scored: list[Scored]) -> list[str]:
    origins: dict[str, list[str]] = {}
    for s in scored:
        origin = s.figures.get("threshold_from") or "none installed or recorded (no sensitivity/specificity)"
        origins.setdefault(origin, []).append("fused probability" if s.score == FUSED else s.score)
    return [f"Thresholds from {o}: {', '.join(names)}." for o, names in origins.items()]


def _orientation(o: dict[str, Any]) -> list[str]:
    lines = ["## Orientation (zero-shot, in-plane flips and rotations)", ""]
    if o.get("skipped"):
        return [*lines, f"Not checked: {o['skipped']}."]
    lines += [
        f"{o['studies']} studies, findings {', '.join(o['findings'])}; {o['encodings']} image encodings "
        f"in {o['seconds']:.0f} s.",
        "",
        "| transform | what it does | macro AUROC | Δ vs identity | 95 % CI of Δ |",
        "|---|---|---:|---:|---|",
    ]
    for t in o["transforms"]:
        low, high = t["delta_ci95"]
        ci = "–" if low is None or high is None else f"{low:+.3f} to {high:+.3f}"
        lines.append(
            f"| {t['name']} | {t['description']} | {t['macro_auroc']:.3f} | {t['delta_vs_identity']:+.3f} | {ci} |"
        )
    lines += ["", f"Verdict: {o['verdict']}"]
    if o.get("note_stored"):
        lines += ["", f"Note: {o['note_stored']}."]
    return lines


# ---------------------------------------------------------------------------------------- figures
def figures_png(evaluation: Evaluation) -> dict[str, bytes]:
    """``roc.png`` (the fused probability and anomaly score, else per-finding curves of the first
    source), ``calibration.png`` (fused) and ``calibration_head.png`` (head findings)."""
    from sklearn.metrics import roc_curve

    from processor.fit.calibration import reliability_png
    from processor.fit.metrics import roc_png

    e = evaluation
    out: dict[str, bytes] = {}
    curves = [s for s in e.pathology if s.figures.get("auroc") is not None]
    title = "pathology: ROC"
    if not curves:
        first = next(
            (s.score.split(".", 1)[0] for s in e.findings if s.figures.get("auroc") is not None), None
        )
        curves = [
            s for s in e.findings if s.score.startswith(f"{first}.") and s.figures.get("auroc") is not None
        ]
        title = f"findings ({first}): ROC"
    if curves:
        marker = None
        roc = {}
        for s in curves[:MAX_CURVES]:
            assert s.curve is not None
            fpr, tpr, _ = roc_curve(*s.curve)
            name = "fused" if s.score == FUSED else (s.label if s.label != TARGET else s.score)
            roc[f"{name} (AUROC {s.figures['auroc']:.3f})"] = (fpr, tpr)
            if (
                s.score == FUSED
                and s.figures.get("sensitivity") is not None
                and s.figures.get("specificity") is not None
            ):
                marker = (1 - s.figures["specificity"], s.figures["sensitivity"])
        out["roc.png"] = roc_png(roc, title, marker=marker)
    fused = [s for s in e.pathology if s.score == FUSED and s.figures.get("ece") is not None]
    if fused and fused[0].curve is not None:
        out["calibration.png"] = reliability_png(
            {"fused probability": fused[0].curve}, "pathology: reliability"
        )
    head = [s for s in e.findings if s.score.startswith("head.") and s.figures.get("ece") is not None]
    if head:
        out["calibration_head.png"] = reliability_png(
            {s.label: s.curve for s in head[:MAX_CURVES] if s.curve is not None}, "head findings: reliability"
        )
    return out


def write_report(folder: Path, evaluation: Evaluation) -> dict[str, Path]:
    """Write the report folder; returns name → path of every file written."""
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    pngs = figures_png(evaluation)
    names = {"report": "report.md", "json": "report.json", **{n: n for n in pngs}}
    doc = document(evaluation)
    doc["files"] = sorted(names.values())
    payloads: dict[str, bytes] = {
        "report.json": (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode(),
        "report.md": markdown(evaluation, names).encode(),
        **pngs,
    }
    written = {}
    for name, data in payloads.items():
        path = folder / name
        write_bytes_atomic(path, data)
        os.chmod(path, 0o644)
        written[name] = path
    return written


def summary_line(evaluation: Evaluation, folder: Path) -> str:
    """One line: studies, the fused AUROC (CI) and its operating point, where the report is."""
    e = evaluation
    parts = [f"evaluate: {e.matched} studies"]
    fused = next((s for s in e.pathology if s.score == FUSED), None)
    if fused is not None and fused.figures.get("auroc") is not None:
        f = fused.figures
        text = f"fused AUROC {f['auroc']:.3f} ({_ci(f)})"
        if f.get("sensitivity") is not None and f.get("specificity") is not None:
            text += f", sens {f['sensitivity']:.2f} spec {f['specificity']:.2f} at {f['threshold']:.2g}"
        if fused.figures["n"] != e.matched:
            text += f" on {fused.figures['n']}"
        parts.append(text)
    else:
        parts.append("no fused probability")
    macro = macro_auroc(e.findings)
    if macro:
        parts.append("macro AUROC " + " ".join(f"{src} {m['auroc']:.3f}" for src, m in macro.items()))
    if e.warnings:
        parts.append(f"{len(e.warnings)} warning(s)")
    return ", ".join(parts) + f"; report: {folder / 'report.md'}"
