"""Excel workbooks derived from SQLite rows: a "Studies" sheet and a "Summary" sheet.

The workbook is a *view*: it is rebuilt from the database every time and never read back.
It is written to a temp file beside the target and renamed over it. When the target is locked
(someone has it open — Excel leaves ``~$name``, LibreOffice ``.~lock.name#`` beside it — or the
rename is refused, as on a Windows share), the same content goes to ``<name>-pending.xlsx`` and
the caller retries later; the real file, once written, carries every row and the pending file
is removed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from processor.atomic import file_mode
from processor.faults import fault_point
from processor.names import display_name
from processor.redact import redact_optional_url

log = logging.getLogger(__name__)

CAPTION_HEADER = "Caption (auto-generated, not a diagnosis)"
PATHOLOGY_FILL = "FFFFC7CE"  # light red: the decision said pathology = 1
FAILURE_FILL = "FFFCE4D6"  # light orange: the study (or the whole arrival) could not be analysed
HEADER_FILL = "FF1F4E78"
FAILED_STATUSES = ("Failure", "Failed", "Rejected")

DATETIME_FORMAT = "yyyy-mm-dd hh:mm:ss"
PROBABILITY_FORMAT = "0.000"

NOTES_HEADER = (
    "Notes"  # the study's warnings in plain words: set-aside images, phases, fallbacks, gaps, lung flags
)
NOTE_SEPARATOR = "\n• "
NOTES_WIDTH = 60  # characters
LINE_POINTS = 15.0  # row height of one wrapped line of the default 11 pt font


def _wrapped_height(text: str, width: float) -> float:
    """Row height (points) that shows ``text`` wrapped at about ``width`` characters: Excel and
    LibreOffice do not grow a row for wrapped text written by openpyxl, so lines would overlap."""
    per_line = max(1, int(width * 1.1))
    lines = sum(max(1, -(-len(part) // per_line)) for part in text.split("\n"))
    return min(409.0, LINE_POINTS * lines)


# (header, width, number format or None)
STUDY_COLUMNS: list[tuple[str, float, str | None]] = [
    ("Received", 19, DATETIME_FORMAT),
    ("Finished", 19, DATETIME_FORMAT),
    ("Source file", 28, None),
    ("Source", 28, None),
    ("Arrival", 8, "0"),
    ("Study UID", 30, None),
    ("Accession", 14, None),
    ("Series number", 8, "0"),
    ("Series description", 24, None),
    ("Slices", 8, "0"),
    ("Status", 10, None),
    ("Probability of pathology", 12, PROBABILITY_FORMAT),
    ("Pathology", 10, "0"),
    ("Most dangerous type", 22, None),
    ("Finding 1", 20, None),
    ("P 1", 8, PROBABILITY_FORMAT),
    ("Finding 2", 20, None),
    ("P 2", 8, PROBABILITY_FORMAT),
    ("Finding 3", 20, None),
    ("P 3", 8, PROBABILITY_FORMAT),
    ("Lung volume (mL)", 11, "#,##0"),
    ("%LAA-950", 9, "0.0"),
    (CAPTION_HEADER, 60, None),
    ("Processing time (s)", 11, "0.0"),
    (NOTES_HEADER, NOTES_WIDTH, None),
    ("Error", 50, None),
    ("JSON", 14, None),
]
HEADERS = [c[0] for c in STUDY_COLUMNS]
DATETIME_HEADERS = ("Received", "Finished")


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


def _caption(result: dict[str, Any]) -> str | None:
    captions = result.get("captions")
    if not isinstance(captions, list):
        return None
    texts = [str(c["text"]).strip() for c in captions if isinstance(c, dict) and c.get("text")]
    return " | ".join(t for t in texts if t) or None


def notes(result: dict[str, Any]) -> str | None:
    """The study's warnings as one cell: a bullet per warning, in the order they arose."""
    warnings = result.get("warnings")
    texts = [str(w).strip() for w in warnings if str(w).strip()] if isinstance(warnings, list) else []
    return ("• " + NOTE_SEPARATOR.join(texts)) if texts else None


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
    series = _chosen_series(result)
    findings = top_findings(result)
    probability = _number(row.get("probability_of_pathology"))
    if probability is None:
        probability = _number(decision.get("probability_of_pathology"))
    pathology = row.get("pathology") if row.get("pathology") is not None else decision.get("pathology")
    out: dict[str, Any] = {
        "Received": _local(row.get("received_at")),
        "Finished": _local(row.get("finished_at")),
        "Source file": _shown_name(row.get("source_file")),
        "Source": source_label(row),
        "Arrival": row.get("arrival_id"),
        "Study UID": row.get("study_uid"),
        "Accession": row.get("accession"),
        "Series number": _number(series.get("number")),
        "Series description": series.get("description"),
        "Slices": _number(series.get("count") or series.get("slices")),
        "Status": row.get("status"),
        "Probability of pathology": probability,
        "Pathology": int(pathology) if pathology in (0, 1, True, False) else None,
        "Most dangerous type": row.get("most_dangerous_pathology_type")
        or decision.get("most_dangerous_pathology_type"),
        "Lung volume (mL)": _number(lungs.get("volume_ml")),
        "%LAA-950": _number(lungs.get("laa950_percent")),
        CAPTION_HEADER: _caption(result),
        "Processing time (s)": _number(row.get("seconds")),
        NOTES_HEADER: notes(result),
        "Error": row.get("error"),
        "JSON": _relative_link(row.get("json_path"), reports_dir),
    }
    for i in range(3):
        name, p = findings[i] if i < len(findings) else (None, None)
        out[f"Finding {i + 1}"] = name
        out[f"P {i + 1}"] = p
    return out


def source_label(row: dict[str, Any]) -> str:
    """Where the arrival came from: the inbox, or a URL source's name and URL (never credentials)."""
    if row.get("source_name"):
        return f"{row['source_name']} ({redact_optional_url(row.get('source_url')) or row.get('kind')})"
    return {"night": "night inbox", "cli": "command line"}.get(str(row.get("kind")), "inbox")


def rejection_row(row: dict[str, Any]) -> dict[str, Any]:
    """A "Studies" row for an arrival that produced no study (rejected input, or failed outright)."""
    out: dict[str, Any] = dict.fromkeys(HEADERS)
    claimed, finished = _local(row.get("claimed_at")), _local(row.get("finished_at"))
    out.update(
        {
            "Received": _local(row.get("received_at")),
            "Finished": finished,
            "Source file": _shown_name(row.get("source_file")),
            "Source": source_label(row),
            "Arrival": row.get("arrival_id"),
            "Status": "Rejected" if row.get("state") == "quarantined" else "Failed",
            "Error": row.get("error"),
            "Processing time (s)": (finished - claimed).total_seconds() if claimed and finished else None,
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


# ---------------------------------------------------------------------------------------- workbook
@dataclass(frozen=True)
class Report:
    """What one workbook shows: a title, the rows (already in "Studies" shape) and the threshold."""

    title: str
    rows: list[dict[str, Any]]
    threshold: float
    generated: datetime


def write_workbook(path: Path, report: Report) -> None:
    """Write the whole workbook to ``path`` (not atomic by itself; see :func:`publish`)."""
    studies = pd.DataFrame(report.rows, columns=HEADERS)
    for header in DATETIME_HEADERS:
        studies[header] = pd.to_datetime(studies[header])
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        studies.to_excel(writer, sheet_name="Studies", index=False)
        _style_studies(writer.sheets["Studies"], report.rows)
        _write_summary(writer, report)


def _style_header(ws: Worksheet, row: int, columns: int) -> None:
    for col in range(1, columns + 1):
        cell = ws.cell(row=row, column=col)
        cell.font = Font(bold=True, color="FFFFFFFF")
        cell.fill = PatternFill("solid", fgColor=HEADER_FILL)
        cell.alignment = Alignment(vertical="center", wrap_text=True)


def _style_studies(ws: Worksheet, rows: list[dict[str, Any]]) -> None:
    _style_header(ws, 1, len(STUDY_COLUMNS))
    ws.row_dimensions[1].height = 32
    ws.freeze_panes = "A2"
    last = get_column_letter(len(STUDY_COLUMNS))
    ws.auto_filter.ref = f"A1:{last}{max(len(rows) + 1, 2)}"
    json_col = HEADERS.index("JSON") + 1
    status_col = HEADERS.index("Status") + 1
    for col, (_header, width, fmt) in enumerate(STUDY_COLUMNS, start=1):
        ws.column_dimensions[get_column_letter(col)].width = width
        if fmt:
            for r in range(2, len(rows) + 2):
                ws.cell(row=r, column=col).number_format = fmt
    pathology_fill = PatternFill("solid", fgColor=PATHOLOGY_FILL)
    failure_fill = PatternFill("solid", fgColor=FAILURE_FILL)
    for r, row in enumerate(rows, start=2):
        fill = None
        if row.get("Status") in FAILED_STATUSES:
            fill = failure_fill
            ws.cell(row=r, column=status_col).font = Font(bold=True, color="FF9C0006")
        elif row.get("Pathology") == 1:
            fill = pathology_fill
        if fill is not None:
            for col in range(1, len(STUDY_COLUMNS) + 1):
                ws.cell(row=r, column=col).fill = fill
        if row.get(NOTES_HEADER):
            ws.cell(row=r, column=HEADERS.index(NOTES_HEADER) + 1).alignment = Alignment(
                vertical="top", wrap_text=True
            )
            ws.row_dimensions[r].height = _wrapped_height(str(row[NOTES_HEADER]), NOTES_WIDTH)
        link = row.get("JSON")
        if link:
            cell = ws.cell(row=r, column=json_col)
            cell.value = "open JSON"
            cell.hyperlink = link
            cell.font = Font(color="FF0563C1", underline="single")


def _write_summary(writer: pd.ExcelWriter, report: Report) -> None:
    rows, threshold = report.rows, report.threshold
    sheet = "Summary"
    notes = pd.DataFrame(
        {
            "ctwatch report": [
                report.title,
                f"generated {report.generated:%Y-%m-%d %H:%M}; decision threshold {threshold:g}",
                "derived from the ctwatch database; rebuild any time with `python run.py report`",
            ]
        }
    )
    notes.to_excel(writer, sheet_name=sheet, index=False)
    ws = writer.sheets[sheet]
    ws.cell(row=1, column=1).font = Font(bold=True, size=13)
    start = len(notes) + 3
    for title, frame in _summary_tables(rows, threshold):
        ws.cell(row=start, column=1, value=title).font = Font(bold=True, size=12)
        if frame.empty:
            ws.cell(row=start + 1, column=1, value="none")
            start += 4
            continue
        frame.to_excel(writer, sheet_name=sheet, index=False, startrow=start)
        _style_header(ws, start + 1, len(frame.columns))
        for r in range(start + 2, start + 2 + len(frame)):
            for c, column in enumerate(frame.columns, start=1):
                if column in DATETIME_HEADERS:
                    ws.cell(row=r, column=c).number_format = DATETIME_FORMAT
                elif column.startswith("Mean"):
                    ws.cell(row=r, column=c).number_format = PROBABILITY_FORMAT
        start += len(frame) + 4
    ws.column_dimensions["A"].width = 28
    for col in range(2, 18):
        ws.column_dimensions[get_column_letter(col)].width = 14
    ws.column_dimensions["E"].width = 50


def _summary_tables(rows: list[dict[str, Any]], threshold: float) -> list[tuple[str, pd.DataFrame]]:
    statuses = Counter(str(r.get("Status") or "unknown") for r in rows)
    by_status = pd.DataFrame([{"Status": k, "Count": v} for k, v in sorted(statuses.items())])
    return [
        ("By status", by_status),
        ("By finding", _by_finding(rows, threshold)),
        (
            "Failures",
            pd.DataFrame(
                [
                    {
                        "Received": r.get("Received"),
                        "Source file": r.get("Source file"),
                        "Study UID": r.get("Study UID"),
                        "Status": r.get("Status"),
                        "Reason": r.get("Error"),
                    }
                    for r in rows
                    if r.get("Status") in FAILED_STATUSES
                ],
                columns=["Received", "Source file", "Study UID", "Status", "Reason"],
            ),
        ),
        (f"Probability of pathology by week (threshold {threshold:g})", probability_by_week(rows, threshold)),
    ]


def _by_finding(rows: list[dict[str, Any]], threshold: float) -> pd.DataFrame:
    scored: Counter[str] = Counter()
    above: Counter[str] = Counter()
    dangerous: Counter[str] = Counter(
        str(r["Most dangerous type"]) for r in rows if r.get("Most dangerous type")
    )
    sums: Counter[str] = Counter()
    for row in rows:
        for i in range(1, 4):
            name, p = row.get(f"Finding {i}"), row.get(f"P {i}")
            if name and p is not None:
                scored[name] += 1
                sums[name] += p
                above[name] += p >= threshold
    names = sorted(set(scored) | set(dangerous), key=lambda n: (-dangerous[n], -above[n], n))
    return pd.DataFrame(
        [
            {
                "Finding": n,
                "Most dangerous type (studies)": dangerous[n],
                "In top 3 (studies)": scored[n],
                f"P ≥ {threshold:g} (studies)": above[n],
                "Mean P when in top 3": (sums[n] / scored[n]) if scored[n] else None,
            }
            for n in names
        ]
    )


BINS = [round(i / 10, 1) for i in range(11)]


def probability_by_week(rows: Iterable[dict[str, Any]], threshold: float) -> pd.DataFrame:
    """Studies per week (Monday start) in probability bins of 0.1, and below/at-or-above the threshold."""
    labels = [f"{BINS[i]:.1f}–{BINS[i + 1]:.1f}" for i in range(10)]
    weeks: dict[date, dict[str, Any]] = {}
    for row in rows:
        when = row.get("Finished") or row.get("Received")
        p = row.get("Probability of pathology")
        if when is None or row.get("Status") in ("Rejected", "Failed"):
            continue
        week = when.date() - timedelta(days=when.weekday())
        bucket = weeks.setdefault(
            week,
            {
                "Week starting": week.isoformat(),
                "Studies": 0,
                "Below threshold": 0,
                "At or above threshold": 0,
                "No probability": 0,
                **dict.fromkeys(labels, 0),
            },
        )
        bucket["Studies"] += 1
        if p is None:
            bucket["No probability"] += 1
            continue
        bucket["At or above threshold" if p >= threshold else "Below threshold"] += 1
        bucket[labels[min(int(p * 10), 9)]] += 1
    return pd.DataFrame([weeks[w] for w in sorted(weeks)])


# ---------------------------------------------------------------------------------------- publishing
@dataclass(frozen=True)
class Published:
    """Where a workbook went: ``path`` is the target, or the ``-pending`` file when ``pending``."""

    target: Path
    path: Path | None
    pending: bool
    reason: str | None = None


def pending_path(target: Path) -> Path:
    return target.with_name(f"{target.stem}-pending{target.suffix}")


def lock_reason(target: Path) -> str | None:
    """Why ``target`` must not be replaced now, or None. Office lock files mean a user has it open."""
    for lock in (target.with_name(f"~${target.name}"), target.with_name(f".~lock.{target.name}#")):
        if lock.exists():
            return f"open in a spreadsheet program (lock file {lock.name})"
    if target.exists() and not os.access(target, os.W_OK):
        return "the file is read-only"
    return None


def _atomic(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=".tmp.xlsx", dir=target.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fault_point("excel.writing", target.name)
        os.chmod(tmp, file_mode())  # readable by the other accounts the umask allows, not mkstemp's 0600
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def publish(target: Path, report: Report) -> Published:
    """Write ``report`` to ``target`` atomically, or to its ``-pending`` file when it is locked.

    Never raises for a locked or unwritable target (OSError): the outcome says what happened.
    """
    write = lambda path: write_workbook(path, report)  # noqa: E731
    pending = pending_path(target)
    reason = lock_reason(target)
    if reason is None:
        try:
            _atomic(target, write)
        except OSError as exc:
            reason = f"{type(exc).__name__}: {exc.strerror or exc}"
        else:
            try:
                pending.unlink(missing_ok=True)
            except OSError as exc:
                log.warning("report.pending_not_removed path=%s error=%r", pending, str(exc))
            log.info("report.written path=%s rows=%d", target, len(report.rows))
            return Published(target, target, False)
    try:
        _atomic(pending, write)
    except OSError as exc:
        log.warning(
            "report.unwritable target=%s reason=%r pending_error=%r; will retry at the next update",
            target,
            reason,
            str(exc),
        )
        return Published(target, None, True, reason)
    log.warning(
        "report.locked target=%s reason=%r wrote=%s; will retry at the next update",
        target,
        reason,
        pending.name,
    )
    return Published(target, pending, True, reason)
