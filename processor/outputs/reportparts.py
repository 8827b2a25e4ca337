"""The sections of the study report page (:mod:`processor.outputs.studyreport`), each as HTML.

Each function takes the study's result document (every section optional) and returns a piece of
the page, every text escaped (:func:`escape`) and every number of the document tagged by :func:`_num`
with its JSON Pointer (RFC 6901) and value. Plain words come from :mod:`processor.outputs.explain`,
which the Excel report uses too, so both say the same.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from processor.outputs import explain
from processor.outputs.workbook_rows import CAPTION_HEADER, series_words
from processor.provenance import software_versions
from processor.vocab import StepStatus, StudyStatus

NOT_A_DIAGNOSIS = "AI-generated — not a diagnosis"
RESEARCH_USE = (
    "For research use only. The numbers and probabilities on this page were computed automatically by "
    "AI models and image-processing software. They are not a diagnosis, were not reviewed by a "
    "clinician, and must not be used on their own for a clinical decision: the images must be read by "
    "a qualified radiologist."
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SHA_SHOWN = 12  # hex digits of a checksum shown; the whole one is in the title attribute
STATUS_WORDS: dict[str, str] = {
    StudyStatus.SUCCESS: "analysed",
    StudyStatus.PARTIAL: "partly analysed — some steps did not run or failed (see What ran)",
    StudyStatus.FAILURE: "not analysed",
}
STEP_STATUS_WORDS: dict[str, str] = {
    StepStatus.DONE: explain.Outcome.DONE.value,
    StepStatus.SKIPPED: "skipped",
    StepStatus.FAILED: explain.Outcome.FAILED.value,
    StepStatus.NOT_RUN: explain.Outcome.NOT_RUN.value,
}


# ------------------------------------------------------------------------------------------- small parts
def escape(value: Any) -> str:
    """``value`` as HTML text (``html.escape``, quotes too: safe in an attribute)."""
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    """A finite number, else None (booleans, text, NaN and infinity are no numbers to show)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def _pointer(*keys: Any) -> str:
    """A JSON Pointer (RFC 6901) to a value of the document: ``~`` and ``/`` in keys escaped."""
    return "".join("/" + str(k).replace("~", "~0").replace("/", "~1") for k in keys)


def _num(value: Any, fmt: str, *keys: Any, valid: bool = True) -> str:
    """A number of the document at ``keys``, formatted with ``fmt``, tagged with where it is and
    its value; "—" when there is no number there."""
    number = _number(value)
    if number is None:
        return '<span class="none">—</span>'
    shown = format(int(number) if fmt == "d" else number, fmt)
    care = "" if valid else ' data-valid="false"'
    cls = "num" if valid else "num care"
    field, exact = escape(_pointer(*keys)), escape(json.dumps(value))
    return f'<span class="{cls}" data-field="{field}" data-value="{exact}"{care}>{escape(shown)}</span>'


def _sha(value: Any) -> str:
    if not isinstance(value, str) or not value:
        return '<span class="none">—</span>'
    return f'<code title="{escape(value)}">{escape(value[:SHA_SHOWN])}</code>'


def _when(stamp: Any) -> str:
    """A stored ISO timestamp in this machine's local time with its offset; as given if unreadable."""
    if not isinstance(stamp, str) or not stamp:
        return "—"
    try:
        moment = datetime.fromisoformat(stamp).astimezone()
    except ValueError:
        return escape(stamp)
    offset = moment.strftime("%z")
    return escape(f"{moment:%Y-%m-%d %H:%M} (UTC{offset[:3]}:{offset[3:]})")


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    """A two-column table body: label (text, escaped here) and value (HTML, escaped by the caller)."""
    return "".join(f"<tr><th>{escape(label)}</th><td>{value}</td></tr>" for label, value in pairs)


def _items(texts: Iterable[str]) -> str:
    return "".join(f"<li>{escape(t)}</li>" for t in texts)


def _model_words(document: Mapping[str, Any], step_id: str) -> str:
    """A model's name for people: its step's words ("CT-LiPro classifier"), and its id."""
    for step in document.get("steps") or []:
        if isinstance(step, Mapping) and step.get("step_id") == step_id:
            words = explain.step_words(step)
            return words if words == step_id else f"{words} ({step_id})"
    return step_id


# ------------------------------------------------------------------------------------------- sections
def identifiers(document: Mapping[str, Any], institution: str) -> str:
    selection = _section(document, "series_selection")
    chosen = next(
        (
            s
            for s in selection.get("series") or []
            if isinstance(s, dict) and s.get("series_uid") == selection.get("chosen")
        ),
        {},
    )
    status = str(document.get("processing_status") or "")
    pairs = [
        ("Accession", f'<span class="running">{escape(document.get("accession") or "—")}</span>'),
        *([("Study date", escape(document["study_date"]))] if document.get("study_date") else []),
        ("Series analysed", escape(series_words(chosen) or "—")),
        ("Status", f"<b>{escape(status)}</b> — {escape(STATUS_WORDS.get(status, status))}"),
        ("Analysed", _when(document.get("finished_at"))),
        ("Study UID", f'<span class="uid">{escape(document.get("study_uid") or "—")}</span>'),
    ]
    place = f'<p class="institution">{escape(institution)}</p>' if institution else ""
    return f'{place}<table class="ids">{_rows(pairs)}</table>'


def notices(document: Mapping[str, Any]) -> str:
    out = []
    replaced = document.get("superseded_by")
    if isinstance(replaced, Mapping):
        out.append(
            f"Not this study's current result: the result of arrival {escape(replaced.get('arrival_id'))} "
            "replaces it."
        )
    earlier = document.get("supersedes")
    if isinstance(earlier, Mapping):
        out.append(
            f"A new version of this study's result: it replaces the result of arrival "
            f"{escape(earlier.get('arrival_id'))} (more images arrived); earlier reports and AI objects "
            "of this study in the PACS are out of date."
        )
    if document.get("processing_status") == StudyStatus.FAILURE:
        out.append(
            "Not analysed: " + escape(explain.short_reason(document.get("error")) or "no reason recorded")
        )
    return "".join(f'<p class="notice">{text}</p>' for text in out)


def decision(document: Mapping[str, Any]) -> str:
    made = _section(document, "decision")
    pathology = document.get("pathology")
    if pathology not in (0, 1):
        why = made.get("reason") or "no decision step gave one (see What ran)"
        return (
            f'<p class="verdict none">No AI decision for this study.</p><p class="reason">{escape(why)}</p>'
        )
    threshold = _num(made.get("threshold"), ".3f", "decision", "threshold")
    worst = document.get("most_dangerous_pathology_type")
    verdict = '<span class="yes">Pathology suspected</span>' if pathology == 1 else "No significant pathology"
    pairs = [
        ("AI result", f"{verdict} (pathology = {_num(pathology, 'd', 'pathology')})"),
        (
            "Probability of pathology",
            f"{_num(document.get('probability_of_pathology'), '.3f', 'probability_of_pathology')}"
            f" — threshold {threshold}",
        ),
        ("Most dangerous finding", escape(worst) if worst else '<span class="none">none named</span>'),
    ]
    fusion = _section(document, "fusion")
    by_model = _section(_section(fusion, "contributions"), "by_model")
    if by_model:
        parts = [
            f"{escape(name)} {_num(v, '+.3f', 'fusion', 'contributions', 'by_model', name)}"
            for name, v in by_model.items()
        ]
        pairs.append(("Contributions (log-odds)", ", ".join(parts)))
    why = f'<p class="reason">{escape(made["reason"])}</p>' if made.get("reason") else ""
    return f'<table class="kv decision">{_rows(pairs)}</table>{why}'


def lungs(document: Mapping[str, Any]) -> str:
    measured = _section(document, "lungs")
    if not measured:
        return '<p class="none">No lung measurements (see What ran).</p>'
    valid = measured.get("plausible") is not False and not measured.get("flags")
    care = "" if valid else ' <span class="flag">⚠ use with care</span>'
    rows = [  # label, key, format, unit (the Excel's formats: #,##0 and 0.0)
        ("Lung volume", "volume_ml", ",.0f", "mL"),
        ("%LAA-950", "laa950_percent", ".1f", "%"),
        ("Mean lung density", "mean_lung_density_hu", ".0f", "HU"),
    ]
    body = "".join(
        f"<tr><th>{escape(label)}</th><td>{_num(measured.get(key), fmt, 'lungs', key, valid=valid)} "
        f"{escape(unit)}{care}</td></tr>"
        for label, key, fmt, unit in rows
    )
    said = [str(n) for n in measured.get("notes") or [] if str(n).strip()]
    flags = [str(f).replace("_", " ") for f in measured.get("flags") or []]
    if valid:
        words = f'<p class="ok">{escape(measured.get("summary") or "The lungs were found whole.")}</p>'
    else:
        words = (
            '<p class="care-words"><b>Lung numbers — use with care:</b> these numbers are partial or '
            f"not plausible.</p><ul>{_items(said or flags or ['not plausible'])}</ul>"
        )
    return f'<table class="kv lungs">{body}</table>{words}'


def _image_uri(entry: Mapping[str, Any], json_dir: Path) -> tuple[str | None, str]:
    """The preview as a ``data:`` URI, or None and why it is not shown."""
    name = entry.get("file")
    if not isinstance(name, str) or not name:
        return None, "no image file recorded"
    path = json_dir / name
    if not path.resolve().is_relative_to(json_dir.resolve()):
        return None, "its file lies outside the study's folder"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"its file could not be read ({exc.strerror or type(exc).__name__})"
    if not data.startswith(PNG_SIGNATURE):
        return None, "its file is not a PNG image"
    expected = entry.get("sha256")
    if isinstance(expected, str) and hashlib.sha256(data).hexdigest() != expected:
        return None, "its file changed after the study was analysed (checksum differs)"
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii"), ""


def images(document: Mapping[str, Any], json_dir: Path) -> str:
    slices = document.get("key_slices")
    if not isinstance(slices, list) or not slices:
        return '<p class="none">No key images (see What ran).</p>'
    captions = {
        str(c.get("image")): str(c.get("text"))
        for c in document.get("captions") or []
        if isinstance(c, Mapping) and c.get("text")
    }
    figures = []
    for i, entry in enumerate(slices):
        if not isinstance(entry, Mapping):
            continue
        uri, why = _image_uri(entry, json_dir)
        window = str(entry.get("window") or "")
        shown = (
            f'<img src="{uri}" alt="{escape(window)} window preview">'
            if uri
            else f'<div class="missing">Image not shown: {escape(why)}</div>'
        )
        width = _num(entry.get("width"), ".0f", "key_slices", i, "width")
        level = _num(entry.get("level"), ".0f", "key_slices", i, "level")
        z = _num(entry.get("z_mm"), ".1f", "key_slices", i, "z_mm")
        text = f"<b>{escape(window.capitalize())} window</b> W {width} / L {level}<br>z {z} mm"
        caption = captions.get(str(entry.get("file")))
        if caption:
            text += f'<br><span class="caption">{escape(CAPTION_HEADER)}: {escape(caption)}</span>'
        figures.append(f"<figure>{shown}<figcaption>{text}</figcaption></figure>")
    method = _section(document, "key_slices_method")
    orientation = _section(method, "orientation").get("convention")
    note = (
        "Radiological view: the patient's left is on the image's right. "
        if orientation == "radiological"
        else ""
    )
    note += "z: the slice's position along the slice normal, as the image positions give it."
    return f'<div class="figures">{"".join(figures)}</div><p class="small">{escape(note)}</p>'


def findings(document: Mapping[str, Any]) -> str:
    models = {
        sid: m
        for sid, m in _section(document, "models").items()
        if isinstance(m, Mapping) and isinstance(m.get("probabilities"), Mapping)
    }
    decided = _section(_section(document, "decision"), "findings")
    names: dict[str, float] = {}
    for m in models.values():
        for name, p in m["probabilities"].items():
            names[str(name)] = max(names.get(str(name), -1.0), _number(p) or -1.0)
    if not names:
        return '<p class="none">No model gave per-finding probabilities (see What ran).</p>'
    above = [str(f) for f in _section(document, "decision").get("findings_above_threshold") or []]
    order = [f for f in above if f in names] + sorted(
        (f for f in names if f not in above), key=lambda f: (-names[f], f)
    )
    head = "".join(f"<th>{escape(_model_words(document, sid))}</th>" for sid in models)
    rows = []
    for name in order:
        cells = "".join(
            f"<td>{_num(m['probabilities'].get(name), '.3f', 'models', sid, 'probabilities', name)}</td>"
            for sid, m in models.items()
        )
        rows.append(f"<tr><th>{escape(name)}</th>{cells}{_threshold_cells(document, decided, name)}</tr>")
    return (
        f'<table class="grid findings"><thead><tr><th>Finding</th>{head}<th>Threshold</th>'
        f"<th>At or above</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
        '<p class="small">Probabilities from 0 to 1 per model. Zero-shot probabilities are a two-way '
        "softmax and not calibrated; a finding is judged only against a fitted threshold (none: no "
        "fitted threshold), never a default.</p>"
    )


def _threshold_cells(document: Mapping[str, Any], decided: Mapping[str, Any], name: str) -> str:
    """The finding's threshold (and where it comes from) and whether the decision's probability is
    at or above it: from the decision, else a model card's (the head's ``thresholds``)."""
    found = decided.get(name)
    if isinstance(found, Mapping) and _number(found.get("threshold")) is not None:
        model = str(found.get("source") or "").split(".", 1)[0]  # "head.Emphysema": the head's output
        source = " · ".join(str(s) for s in (found.get("threshold_from"), model) if s)
        value = _num(found["threshold"], ".3f", "decision", "findings", name, "threshold")
        positive = found.get("positive")
        mark = '<b class="yes">yes</b>' if positive is True else "no" if positive is False else "—"
        return f'<td>{value}<br><span class="small">{escape(source)}</span></td><td>{mark}</td>'
    for sid, model in _section(document, "models").items():
        thresholds = model.get("thresholds") if isinstance(model, Mapping) else None
        if isinstance(thresholds, Mapping) and _number(thresholds.get(name)) is not None:
            value = _num(thresholds[name], ".3f", "models", sid, "thresholds", name)
            return f'<td>{value}<br><span class="small">model card · {escape(sid)}</span></td><td>—</td>'
    return '<td><span class="none">none</span></td><td>—</td>'


def steps(document: Mapping[str, Any]) -> str:
    rows = []
    for i, step in enumerate(document.get("steps") or []):
        if not isinstance(step, Mapping):
            continue
        status = str(step.get("status"))
        words = STEP_STATUS_WORDS.get(status, status)
        if status == StepStatus.SKIPPED and step.get("missing"):
            words = explain.Outcome.NOT_INSTALLED.value
        reason = step.get("reason") or step.get("error") or ""
        if status == StepStatus.FAILED and step.get("missing"):
            reason = f"{reason} — {explain.WEIGHTS_HINT}"
        seconds = _num(step.get("seconds"), ".2f", "steps", i, "seconds")
        rows.append(
            f'<tr class="{escape(status)}"><td>{escape(explain.step_words(step))}</td>'
            f'<td>{escape(words)}</td><td>{seconds}</td><td class="why">{escape(reason)}</td></tr>'
        )
    summary = explain.what_ran(
        document,
        status=document.get("processing_status"),
        error=document.get("error"),
        probability=_number(document.get("probability_of_pathology")),
    )
    lines = f"<ul>{_items(summary.splitlines())}</ul>" if summary else ""
    return (
        f'{lines}<table class="grid steps"><thead><tr><th>Step</th><th>Outcome</th><th>Seconds</th>'
        f"<th>Why (when it did not run)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def notes(document: Mapping[str, Any]) -> str:
    # the lung step's warning is said under Lung measurements, in its words: not again here
    warnings = [w for w in document.get("warnings") or [] if not str(w).startswith("lungs:")]
    texts = explain.notes({**document, "warnings": warnings, "lungs": None})
    for sid, model in _section(document, "models").items():
        if isinstance(model, Mapping):
            texts += [f"{sid}: {w}" for w in model.get("warnings") or [] if str(w).strip()]
    texts += [f"anomaly: {w}" for w in _section(document, "anomaly").get("warnings") or []]
    error = document.get("error")
    out = f'<p class="error"><b>Error:</b> {escape(error)}</p>' if error else ""
    return out + (f"<ul>{_items(texts)}</ul>" if texts else '<p class="none">No warnings.</p>')


def provenance(document: Mapping[str, Any]) -> str:
    rows = []
    for sid, model in _section(document, "models").items():
        if not isinstance(model, Mapping):
            continue
        run_on = " ".join(str(model[k]) for k in ("device", "precision") if model.get(k))
        rows.append((_model_words(document, sid), model, run_on))
    anomaly = _section(document, "anomaly")
    if anomaly:
        rows.append(("anomaly detector", anomaly, ""))
    fusion = _section(document, "fusion")
    if fusion:
        rows.append(("fusion", fusion, ""))
    body = "".join(
        f"<tr><td>{escape(words)}</td><td>{escape(m.get('model') or '—')}</td>"
        f"<td>{_sha(m.get('sha256'))}</td><td>{escape(m.get('trained') or '—')}</td>"
        f"<td>{escape(run_on or '—')}</td></tr>"
        for words, m, run_on in rows
    )
    extra = []
    if anomaly:
        score = _num(anomaly.get("score"), ".6f", "anomaly", "score")
        how = escape(anomaly.get("aggregate") or "")
        extra.append(
            ("Anomaly score", f"{score} ({how} over the slices; higher: less like the scans it learnt)")
        )
    pipeline = _section(document, "pipeline")
    version = _num(pipeline.get("version"), "d", "pipeline", "version")
    name = escape(pipeline.get("name") or "—")
    seconds = " s" if _number(document.get("time_of_processing")) is not None else ""
    extra += [
        ("Pipeline", f"{name} version {version} · digest {_sha(pipeline.get('digest'))}"),
        ("Device", escape(document.get("device") or "—")),
        ("Processing time", _num(document.get("time_of_processing"), ".1f", "time_of_processing") + seconds),
        ("Report made by", escape(f"ctwatch {software_versions().get('ctwatch', '')}".strip())),
    ]
    table = (
        '<table class="grid models"><thead><tr><th>Model</th><th>File</th><th>sha256</th><th>Trained</th>'
        f"<th>Ran on</th></tr></thead><tbody>{body}</tbody></table>"
        if rows
        else '<p class="none">No model ran.</p>'
    )
    return f'{table}<table class="kv">{_rows(extra)}</table>'


def disclaimers(document: Mapping[str, Any]) -> str:
    licences: dict[str, list[str]] = {}
    for model in _section(document, "models").values():
        if isinstance(model, Mapping) and model.get("licence"):
            licences.setdefault(str(model["licence"]), []).append(str(model.get("model") or "?"))
    texts = [RESEARCH_USE]
    texts += [f"Model weights {', '.join(files)}: licence {lic}." for lic, files in licences.items()]
    return "".join(f"<p>{escape(t)}</p>" for t in texts)
