"""The rows of the "Studies" sheet, built from SQLite rows (``State.report_studies`` and
``State.report_rejections``) and the result document each study row stores: its columns, what
prints, and the keys the Summary sheet counts.

A row is a dict keyed by column header, plus :data:`FINDINGS_KEY`, :data:`REASON_KEY` and
:data:`OUTCOMES_KEY`, which are no column. Every result section is optional: a row from an older
ctwatch, or from a study that failed early, shows what it has.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processor.names import display_name
from processor.outputs import explain
from processor.redact import redact_optional_url

CAPTION_HEADER = "Caption (auto-generated, not a diagnosis)"
WHAT_RAN_HEADER = "What ran"  # which steps ran, which did not and why, in plain words
NOTES_HEADER = (
    "Notes"  # the study's warnings in plain words: set-aside images, phases, fallbacks, gaps, lung flags
)
PATHOLOGY_FILL = "FFFFC7CE"  # light red: the decision said pathology = 1
FAILURE_FILL = "FFFCE4D6"  # light orange: the study (or the whole arrival) could not be analysed
SUPERSEDED_FILL = "FFE7E6E6"  # grey: a later version of the study's result replaced this one
FAILED_STATUSES = ("Failure", *explain.Rejection)  # a study not analysed, or an arrival that gave no study

DATETIME_FORMAT = "yyyy-mm-dd hh:mm:ss"
MINUTE_FORMAT = "yyyy-mm-dd hh:mm"
PROBABILITY_FORMAT = "0.000"


@dataclass(frozen=True)
class Column:
    """One "Studies" column: header, width (characters), number format, whether its text wraps."""

    header: str
    width: float
    number_format: str | None = None
    wrap: bool = False


# What a radiographer reads, and prints: A4 landscape, one page wide (about 62 % with Calibri or
# Carlito; LibreOffice without them falls back to the wider DejaVu Sans and fits at about 48 %).
PRINTED_COLUMNS = [
    Column("Received", 17, MINUTE_FORMAT),
    Column("Source file", 14, wrap=True),
    Column("Accession", 11, wrap=True),
    Column("Study UID", 20, wrap=True),  # 64 characters at most: wrapped, never cut, the full value kept
    Column("Series", 14, wrap=True),
    Column("Status", 9),
    Column(WHAT_RAN_HEADER, 30, wrap=True),
    Column("Probability of pathology", 12, PROBABILITY_FORMAT),
    Column("Pathology", 10, "0"),
    Column("Most dangerous type", 12, wrap=True),
    Column("Top findings", 19, wrap=True),
    Column("Lung volume (mL)", 9, "#,##0"),
    Column("%LAA-950", 8, "0.0"),
    Column(CAPTION_HEADER, 22, wrap=True),
    Column(NOTES_HEADER, 30, wrap=True),
]
# On screen only, right of the print area: for whoever runs ctwatch.
SCREEN_COLUMNS = [
    Column("Finished", 19, DATETIME_FORMAT),
    Column("Source", 22, wrap=True),
    Column("Arrival", 8, "0"),
    Column("Processing time (s)", 11, "0.0"),
    Column("JSON", 11),
]
STUDY_COLUMNS = PRINTED_COLUMNS + SCREEN_COLUMNS
HEADERS = [c.header for c in STUDY_COLUMNS]
DATETIME_HEADERS = ("Received", "Finished")
FROZEN = "D2"  # the header row and Received, Source file, Accession stay in view when scrolling
# Keys of a row dict that are not columns: what the Summary counts.
FINDINGS_KEY, REASON_KEY, OUTCOMES_KEY = "_findings", "_reason", "_outcomes"
SUPERSEDED_KEY = "_superseded_by"  # the arrival whose newer result replaced this row's (late series)


# ---------------------------------------------------------------------------------------- rows
def _local(value: str | None) -> datetime | None:
    """A stored UTC ISO timestamp → naive local time (Excel has no time zones)."""
    if not value:
        return None
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone().replace(tzinfo=None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN → empty


def top_findings(result: dict[str, Any], n: int = 3) -> list[tuple[str, float]]:
    """The ``n`` highest per-finding probabilities across every model (a finding counts once)."""
    best: dict[str, float] = {}
    models = result.get("models")
    for model in models.values() if isinstance(models, dict) else []:
        probabilities = model.get("probabilities") if isinstance(model, dict) else None
        if not isinstance(probabilities, dict):
            continue
        for finding, p in probabilities.items():
            value = _number(p)
            if value is not None and value > best.get(str(finding), -1.0):
                best[str(finding)] = value
    return sorted(best.items(), key=lambda item: (-item[1], item[0]))[:n]


def _chosen_series(result: dict[str, Any]) -> dict[str, Any]:
    selection = result.get("series_selection")
    if not isinstance(selection, dict):
        return {}
    chosen = selection.get("chosen")
    for series in selection.get("series") or []:
        if isinstance(series, dict) and chosen and series.get("series_uid") == chosen:
            return series
    return {}


def series_words(series: dict[str, Any]) -> str | None:
    """The chosen series as "2 CHEST 1.0 B70f, 241 slices" (number, description, slice count)."""
    number, slices = _number(series.get("number")), _number(series.get("count") or series.get("slices"))
    head = " ".join(
        part for part in (f"{number:g}" if number is not None else None, series.get("description")) if part
    )
    tail = f"{slices:g} slices" if slices is not None else None
    return ", ".join(part for part in (head, tail) if part) or None


def _caption(result: dict[str, Any]) -> str | None:
    captions = result.get("captions")
    if not isinstance(captions, list):
        return None
    texts = [str(c["text"]).strip() for c in captions if isinstance(c, dict) and c.get("text")]
    return " | ".join(t for t in texts if t) or None


def notes(result: dict[str, Any]) -> str | None:
    """The study's warnings as one cell: a bullet per warning on its own line, in the order they
    arose, lung plausibility flags in words (:func:`processor.outputs.explain.notes`)."""
    return explain.bullets(explain.notes(result))


def _section(result: dict[str, Any], key: str) -> dict[str, Any]:
    value = result.get(key)
    return value if isinstance(value, dict) else {}


def study_row(row: dict[str, Any], reports_dir: Path) -> dict[str, Any]:
    """One "Studies" row from a ``State.report_studies`` row; every result section is optional."""
    try:
        result = json.loads(row.get("result_json") or "{}")
    except ValueError:
        result = {}
    result = result if isinstance(result, dict) else {}
    decision = _section(result, "decision")
    lungs = _section(result, "lungs")
    findings = top_findings(result)
    probability = _number(row.get("probability_of_pathology"))
    if probability is None:
        probability = _number(decision.get("probability_of_pathology"))
    pathology = row.get("pathology") if row.get("pathology") is not None else decision.get("pathology")
    status = row.get("status") or result.get("processing_status")
    return {
        "Received": _local(row.get("received_at")),
        "Source file": _shown_name(row.get("source_file")),
        "Accession": row.get("accession"),
        "Study UID": row.get("study_uid"),
        "Series": series_words(_chosen_series(result)),
        "Status": status,
        WHAT_RAN_HEADER: (
            _replaced_words(row.get("superseded_by"), result.get("superseded_by"))
            + _version_words(result.get("supersedes"), result.get("inputs"))
            + (explain.what_ran(result, status=status, error=row.get("error"), probability=probability) or "")
        )
        or None,
        "Probability of pathology": probability,
        "Pathology": int(pathology) if pathology in (0, 1, True, False) else None,
        "Most dangerous type": row.get("most_dangerous_pathology_type")
        or decision.get("most_dangerous_pathology_type"),
        "Top findings": "\n".join(f"{name} {p:.3f}" for name, p in findings) or None,
        "Lung volume (mL)": _number(lungs.get("volume_ml")),
        "%LAA-950": _number(lungs.get("laa950_percent")),
        CAPTION_HEADER: _caption(result),
        NOTES_HEADER: notes(result),
        "Finished": _local(row.get("finished_at")),
        "Source": source_label(row),
        "Arrival": row.get("arrival_id"),
        "Processing time (s)": _number(row.get("seconds")),
        "JSON": _relative_link(row.get("json_path"), reports_dir),
        FINDINGS_KEY: findings,
        REASON_KEY: explain.short_reason(row.get("error")),
        OUTCOMES_KEY: explain.step_outcomes(result),
        SUPERSEDED_KEY: row.get("superseded_by"),
    }


def _replaced_words(superseded_by: Any, pointer: Any) -> str:
    """The first line of What ran for a result that is not the study's current one (late series),
    else "": a later version replaced it, or — ``pointer`` (the result's ``superseded_by``) with
    ``reason: fewer_images`` — it lacked images the current result used and came out worse."""
    if superseded_by is None:
        return ""
    if isinstance(pointer, dict) and pointer.get("reason") == "fewer_images":
        return (
            f"NOT CURRENT: the result of arrival {superseded_by} stays this study's current one — this "
            "analysis lacked some of the images it used (no longer on disk, or changed) and came out "
            "worse: read that row.\n"
        )
    return (
        f"REPLACED by the result of arrival {superseded_by}, which analysed this study again with "
        "images that arrived later: read that row.\n"
    )


def _version_words(supersedes: Any, inputs: Any) -> str:
    """The first line of What ran for a new version of a study (late series), else "": which
    arrivals' images it used and whose result it replaced."""
    if not isinstance(supersedes, dict):
        return ""
    parts = [i for i in inputs or [] if isinstance(i, dict) and isinstance(i.get("arrival_id"), int)]
    used = [int(i["arrival_id"]) for i in parts if not i.get("missing")]
    left_out = [int(i["arrival_id"]) for i in parts if i.get("missing")]
    words = f"NEW VERSION of this study, replacing the result of arrival {supersedes.get('arrival_id')}"
    if used:
        words += ": analysed with the images of arrivals " + ", ".join(str(a) for a in sorted(used))
    if left_out:
        words += " (those of arrivals " + ", ".join(str(a) for a in sorted(left_out)) + " could not be used)"
    return words + ".\n"


def source_label(row: dict[str, Any]) -> str:
    """Where the arrival came from: the inbox, or a URL source's name and URL (never credentials)."""
    if row.get("source_name"):
        return f"{row['source_name']} ({redact_optional_url(row.get('source_url')) or row.get('kind')})"
    return {"night": "night inbox", "cli": "command line"}.get(str(row.get("kind")), "inbox")


def rejection_row(row: dict[str, Any]) -> dict[str, Any]:
    """A "Studies" row for an arrival that produced no study (a ``State.report_rejections`` row):
    rejected, set aside after crashing the worker, or failed (:class:`explain.Rejection`)."""
    out: dict[str, Any] = dict.fromkeys(HEADERS)
    claimed, finished = _local(row.get("claimed_at")), _local(row.get("finished_at"))
    out.update(
        {
            "Received": _local(row.get("received_at")),
            "Finished": finished,
            "Source file": _shown_name(row.get("source_file")),
            "Source": source_label(row),
            "Arrival": row.get("arrival_id"),
            "Status": str(explain.rejection(row)),
            WHAT_RAN_HEADER: explain.rejection_what_ran(row),
            "Processing time (s)": (finished - claimed).total_seconds() if claimed and finished else None,
            FINDINGS_KEY: [],
            REASON_KEY: explain.short_reason(row.get("error")),
            OUTCOMES_KEY: [],
        }
    )
    return out


def _shown_name(name: str | None) -> str | None:
    """A file name as a cell can hold it: undecodable bytes and control characters escaped."""
    return display_name(name) if name is not None else None


def _relative_link(json_path: str | None, reports_dir: Path) -> str | None:
    """The JSON's path relative to the workbook, with forward slashes (works on a mapped share)."""
    if not json_path:
        return None
    try:
        return Path(os.path.relpath(json_path, reports_dir)).as_posix()
    except ValueError:  # another drive on Windows
        return Path(json_path).as_posix()


@dataclass(frozen=True)
class Report:
    """What one workbook shows: a title, the rows (already in "Studies" shape) and the threshold."""

    title: str
    rows: list[dict[str, Any]]
    threshold: float
    generated: datetime
