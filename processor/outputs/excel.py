"""Excel workbooks derived from SQLite rows: a "Studies" sheet and a "Summary" sheet.

The workbook is a *view*: it is rebuilt from the database every time and never read back.
It is written to a temp file beside the target and renamed over it. When the target is locked
(someone has it open — Excel leaves ``~$name``, LibreOffice ``.~lock.name#`` beside it — or the
rename is refused, as on a Windows share), the same content goes to ``<name>-pending.xlsx`` and
the caller retries later; the real file, once written, carries every row and the pending file
is removed.

The rows and columns are in :mod:`processor.outputs.workbook_rows` (plain words from
:mod:`processor.outputs.explain`), the Summary sheet in :mod:`processor.outputs.workbook_summary`,
header style, row heights and print set-up in :mod:`processor.outputs.sheets`.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from openpyxl import Workbook
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from processor.atomic import file_mode
from processor.faults import fault_point
from processor.outputs.sheets import (
    FONT,
    row_points,
    set_up_printing,
    style_header,
    wrapped_lines,
    write_table,
)
from processor.outputs.workbook_rows import (
    CAPTION_HEADER,
    FAILED_STATUSES,
    FAILURE_FILL,
    FROZEN,
    HEADERS,
    NOTES_HEADER,
    PATHOLOGY_FILL,
    PRINTED_COLUMNS,
    STUDY_COLUMNS,
    SUPERSEDED_FILL,
    SUPERSEDED_KEY,
    WHAT_RAN_HEADER,
    Report,
    notes,
    rejection_row,
    study_row,
    top_findings,
)
from processor.outputs.workbook_summary import probability_by_week, write_summary

log = logging.getLogger(__name__)

__all__ = [
    "CAPTION_HEADER",
    "FAILURE_FILL",
    "HEADERS",
    "NOTES_HEADER",
    "PATHOLOGY_FILL",
    "WHAT_RAN_HEADER",
    "Published",
    "Report",
    "notes",
    "pending_path",
    "probability_by_week",
    "publish",
    "rejection_row",
    "study_row",
    "top_findings",
    "write_workbook",
]


def write_workbook(path: Path, report: Report) -> None:
    """Write the whole workbook to ``path`` (not atomic by itself; see :func:`publish`), with
    openpyxl: the Studies sheet first, then the Summary sheet."""
    workbook = Workbook()
    workbook.remove(workbook.worksheets[0])  # the empty "Sheet" a new workbook has
    studies = workbook.create_sheet("Studies")
    write_table(studies, 1, HEADERS, report.rows)
    _style_studies(studies, report)
    write_summary(workbook.create_sheet("Summary"), report)
    workbook.save(path)


def _style_studies(ws: Worksheet, report: Report) -> None:
    rows = report.rows
    style_header(ws, 1, [c.width for c in STUDY_COLUMNS])
    ws.freeze_panes = FROZEN
    last_row = max(len(rows) + 1, 2)
    ws.auto_filter.ref = f"A1:{get_column_letter(len(STUDY_COLUMNS))}{last_row}"
    set_up_printing(
        ws,
        title=report.title,
        print_area=f"A1:{get_column_letter(len(PRINTED_COLUMNS))}{last_row}",
        title_rows="1:1",
    )
    json_col = HEADERS.index("JSON") + 1
    status_col = HEADERS.index("Status") + 1
    for col, column in enumerate(STUDY_COLUMNS, start=1):
        ws.column_dimensions[get_column_letter(col)].width = column.width
    pathology_fill = PatternFill("solid", fgColor=PATHOLOGY_FILL)
    failure_fill = PatternFill("solid", fgColor=FAILURE_FILL)
    superseded_fill = PatternFill("solid", fgColor=SUPERSEDED_FILL)
    for r, row in enumerate(rows, start=2):
        fill = None
        if row.get(SUPERSEDED_KEY) is not None:
            fill = superseded_fill
        elif row.get("Status") in FAILED_STATUSES:
            fill = failure_fill
            ws.cell(row=r, column=status_col).font = Font(name=FONT, bold=True, color="FF9C0006")
        elif row.get("Pathology") == 1:
            fill = pathology_fill
        lines = 1
        for col, column in enumerate(STUDY_COLUMNS, start=1):
            cell = ws.cell(row=r, column=col)
            cell.alignment = Alignment(vertical="top", wrap_text=column.wrap)
            if column.number_format:
                cell.number_format = column.number_format
            if fill is not None:
                cell.fill = fill
            if column.wrap and row.get(column.header):
                lines = max(lines, wrapped_lines(str(row[column.header]), column.width))
        ws.row_dimensions[r].height = row_points(lines)
        link = row.get("JSON")
        if link:
            cell = ws.cell(row=r, column=json_col)
            cell.value = "open JSON"
            cell.hyperlink = link
            cell.font = Font(name=FONT, color="FF0563C1", underline="single")


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
