"""The "Summary" sheet: how to read the workbook, then counts by status, by step (what ran), by
finding, the failures with their reasons, and probability of pathology per week.

The report's threshold (``reports.threshold``) is a reporting line only: the weekly table and the
By finding table count studies below / at or above it. Pathology (and the light red row) is each
study's decision step's call, against the threshold in its result JSON's decision section."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from openpyxl.styles import Alignment, Font
from openpyxl.utils import get_column_letter
from openpyxl.worksheet.worksheet import Worksheet

from processor.outputs import explain
from processor.outputs.sheets import (
    FONT,
    row_points,
    set_up_printing,
    style_header,
    wrapped_lines,
    write_table,
)
from processor.outputs.workbook_rows import (
    DATETIME_HEADERS,
    FAILED_STATUSES,
    FINDINGS_KEY,
    MINUTE_FORMAT,
    NOTES_HEADER,
    OUTCOMES_KEY,
    PRINTED_COLUMNS,
    PROBABILITY_FORMAT,
    REASON_KEY,
    SUPERSEDED_KEY,
    WHAT_RAN_HEADER,
    Report,
)

KEPT = (
    "The file is kept: in the inbox's .ctwatch/quarantine folder with the reason beside it, or, named "
    "on the command line, where it is."
)
SUMMARY_WIDTHS = [24, 14, 20, 12, 40, *([9] * 10)]  # columns A-O: the widest table (by week) fits


@dataclass(frozen=True)
class Table:
    """One Summary table: its column headers, and its rows as dicts keyed by header."""

    columns: list[str]
    rows: list[dict[str, Any]]

    @classmethod
    def of(cls, rows: list[dict[str, Any]]) -> Table:
        """A table whose columns are the first row's keys (every row has the same keys)."""
        return cls(list(rows[0]) if rows else [], rows)


def write_summary(ws: Worksheet, report: Report) -> None:
    """Fill the (new, empty) Summary sheet ``ws``: heading, legend, then the tables."""
    rows, threshold = report.rows, report.threshold
    heading = [
        report.title,
        f"generated {report.generated:%Y-%m-%d %H:%M}; reporting line {threshold:g} "
        "(reports.threshold; not the decision's threshold)",
        "derived from the ctwatch database; rebuild any time with `python run.py report`",
    ]
    write_table(ws, 1, ["ctwatch report"], [{"ctwatch report": line} for line in heading])
    ws.cell(row=1, column=1).font = Font(name=FONT, bold=True, size=13)
    for col, width in enumerate(SUMMARY_WIDTHS, start=1):
        ws.column_dimensions[get_column_letter(col)].width = width
    start = _write_legend(ws, len(heading) + 3, report)
    for title, table in _summary_tables(rows, threshold):
        ws.cell(row=start, column=1, value=title).font = Font(name=FONT, bold=True, size=12)
        if not table.rows:
            ws.cell(row=start + 1, column=1, value="none")
            start += 4
            continue
        write_table(ws, start + 1, table.columns, table.rows)
        style_header(ws, start + 1, SUMMARY_WIDTHS[: len(table.columns)])
        for r in range(start + 2, start + 2 + len(table.rows)):
            lines = 1
            for c, column in enumerate(table.columns, start=1):
                cell = ws.cell(row=r, column=c)
                cell.alignment = Alignment(horizontal="left", vertical="top", wrap_text=True)
                if column in DATETIME_HEADERS:
                    cell.number_format = MINUTE_FORMAT
                elif column.startswith("Mean"):
                    cell.number_format = PROBABILITY_FORMAT
                elif isinstance(cell.value, str):
                    lines = max(lines, wrapped_lines(cell.value, SUMMARY_WIDTHS[c - 1]))
            ws.row_dimensions[r].height = row_points(lines)
        start += len(table.rows) + 4
    set_up_printing(ws, title=report.title, grid=False)


def _write_legend(ws: Worksheet, start: int, report: Report) -> int:
    """ "How to read this workbook": a term in column A, its meaning across B-O. Returns the next free row."""
    ws.cell(row=start, column=1, value="How to read this workbook").font = Font(name=FONT, bold=True, size=12)
    last = get_column_letter(len(SUMMARY_WIDTHS))
    width = sum(SUMMARY_WIDTHS[1:])
    for r, (term, meaning) in enumerate(_legend(report), start=start + 1):
        ws.cell(row=r, column=1, value=term).font = Font(name=FONT, bold=True)
        ws.cell(row=r, column=1).alignment = Alignment(vertical="top")
        cell = ws.cell(row=r, column=2, value=meaning)
        cell.alignment = Alignment(vertical="top", wrap_text=True)
        ws.merge_cells(f"B{r}:{last}{r}")
        ws.row_dimensions[r].height = row_points(wrapped_lines(meaning, width))
    return start + len(_legend(report)) + 3


def _legend(report: Report) -> list[tuple[str, str]]:
    printed = f"A-{get_column_letter(len(PRINTED_COLUMNS))}"
    return [
        ("Success", "every step of the pipeline ran."),
        (
            "Partial",
            f"the study was analysed, but some steps did not run or failed; the '{WHAT_RAN_HEADER}' "
            "column says which and why (AI models not installed: see `python run.py weights`).",
        ),
        ("Failure", f"the study could not be analysed; '{WHAT_RAN_HEADER}' gives the reason and the fix."),
        (
            "Rejected",
            f"ctwatch could not read the file as a CT study ('{WHAT_RAN_HEADER}' says why). {KEPT}",
        ),
        (
            "Set aside",
            "ctwatch's worker died each time it processed only this file (out of memory, or a decoder "
            f"fault), so it was set aside for the others to go on. {KEPT} Check the log; once the cause "
            "is fixed: `python run.py requeue <Arrival>`.",
        ),
        (
            "Failed",
            f"ctwatch could not process the file (not the file's fault). {KEPT} Process it again with "
            "`python run.py requeue <Arrival>`.",
        ),
        (
            "Light red row",
            "pathology = 1: the pipeline's decision step called the study pathological, against its own "
            "threshold (the fusion model's fitted one, or the one the pipeline sets); that threshold is "
            "in the result JSON's decision section.",
        ),
        (
            "Reporting line",
            f"{report.threshold:g} (reports.threshold): the Summary counts studies below it and at or "
            "above it, per week and per finding. It is not the decision's threshold and sets neither "
            "Pathology nor the row colour.",
        ),
        ("Orange row", "a study that failed, or a file that was rejected, set aside or failed."),
        (
            "Grey row",
            "not the study's current result: REPLACED by a later one made when more of its images "
            "arrived, or NOT CURRENT (made with fewer images and came out worse); What ran names the "
            "arrival of the current one, and only that one is counted below.",
        ),
        (
            NOTES_HEADER,
            "one bullet per warning: images set aside, phases, gaps, fallbacks, and lung numbers to "
            "use with care (lungs cut by the scan range, a volume that is not plausible).",
        ),
        (
            "Printing",
            f"the Studies sheet prints columns {printed} (Received to Notes) on A4 landscape, one page "
            "wide, the header row on every page; Finished, Source, Arrival, processing time and the "
            "JSON link are on screen only.",
        ),
    ]


def _summary_tables(rows: list[dict[str, Any]], threshold: float) -> list[tuple[str, Table]]:
    replaced = sum(1 for r in rows if r.get(SUPERSEDED_KEY) is not None)
    rows = [r for r in rows if r.get(SUPERSEDED_KEY) is None]  # each study counted once: its current result
    statuses = Counter(str(r.get("Status") or "unknown") for r in rows)
    if replaced:
        statuses["Not the current result (not counted above)"] = replaced
    counted = sorted((k, v) for k, v in statuses.items() if not k.startswith("Not the current"))
    counted += [(k, v) for k, v in statuses.items() if k.startswith("Not the current")]  # last
    by_status = Table(["Status", "Count"], [{"Status": k, "Count": v} for k, v in counted])
    return [
        ("By status", by_status),
        ("What ran (studies)", _what_ran_table(rows)),
        ("By finding", _by_finding(rows, threshold)),
        (
            "Failures",
            Table(
                ["Received", "Source file", "Study UID", "Status", "Reason"],
                [
                    {
                        "Received": r.get("Received"),
                        "Source file": r.get("Source file"),
                        "Study UID": r.get("Study UID"),
                        "Status": r.get("Status"),
                        "Reason": r.get(REASON_KEY),
                    }
                    for r in rows
                    if r.get("Status") in FAILED_STATUSES
                ],
            ),
        ),
        (
            f"Probability of pathology by week (reporting line {threshold:g}, not the decision's threshold)",
            probability_by_week(rows, threshold),
        ),
    ]


def _what_ran_table(rows: list[dict[str, Any]]) -> Table:
    """Per step (in pipeline order), how many studies it ran for, lacked its model, skipped, failed."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        for outcome in row.get(OUTCOMES_KEY) or []:
            counts.setdefault(outcome.words, Counter())[outcome.outcome] += 1
    return Table(
        ["Step", *(o.capitalize() for o in explain.Outcome)],
        [{"Step": words, **{o.capitalize(): c[o] for o in explain.Outcome}} for words, c in counts.items()],
    )


def _by_finding(rows: list[dict[str, Any]], threshold: float) -> Table:
    scored: Counter[str] = Counter()
    above: Counter[str] = Counter()
    dangerous: Counter[str] = Counter(
        str(r["Most dangerous type"]) for r in rows if r.get("Most dangerous type")
    )
    sums: Counter[str] = Counter()
    for row in rows:
        for name, p in row.get(FINDINGS_KEY) or []:
            scored[name] += 1
            sums[name] += p
            above[name] += p >= threshold
    names = sorted(set(scored) | set(dangerous), key=lambda n: (-dangerous[n], -above[n], n))
    return Table.of(
        [
            {
                "Finding": n,
                "Most dangerous type (studies)": dangerous[n],
                "In top 3 (studies)": scored[n],
                f"P ≥ {threshold:g}, reporting line (studies)": above[n],
                "Mean P when in top 3": (sums[n] / scored[n]) if scored[n] else None,
            }
            for n in names
        ]
    )


BINS = [round(i / 10, 1) for i in range(11)]


def probability_by_week(rows: Iterable[dict[str, Any]], threshold: float) -> Table:
    """Studies per week (Monday start) in probability bins of 0.1, and below / at or above the
    reporting line ``threshold`` (:func:`line_columns`); arrivals that gave no study are left out."""
    labels = [f"{BINS[i]:.1f}–{BINS[i + 1]:.1f}" for i in range(10)]
    below, above = line_columns(threshold)
    weeks: dict[date, dict[str, Any]] = {}
    for row in rows:
        when = row.get("Finished") or row.get("Received")
        p = row.get("Probability of pathology")
        if when is None or row.get("Status") in tuple(explain.Rejection):
            continue
        week = when.date() - timedelta(days=when.weekday())
        bucket = weeks.setdefault(
            week,
            {
                "Week starting": week.isoformat(),
                "Studies": 0,
                below: 0,
                above: 0,
                "No probability": 0,
                **dict.fromkeys(labels, 0),
            },
        )
        bucket["Studies"] += 1
        if p is None:
            bucket["No probability"] += 1
            continue
        bucket[above if p >= threshold else below] += 1
        bucket[labels[min(int(p * 10), 9)]] += 1
    return Table.of([weeks[w] for w in sorted(weeks)])


def line_columns(threshold: float) -> tuple[str, str]:
    """The weekly table's headers for the studies below and at or above the reporting line."""
    return f"Below {threshold:g} (reporting line)", f"At or above {threshold:g} (reporting line)"
