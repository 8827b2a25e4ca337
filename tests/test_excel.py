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

from processor.config import ReportSettings
from processor.outputs.excel import (
    CAPTION_HEADER,
    FAILURE_FILL,
    HEADERS,
    PATHOLOGY_FILL,
    pending_path,
)
from processor.outputs.report import LATEST_NAME, Reports, ReportUpdater, day_name
from processor.outputs.result import build_result
from processor.state import State
from tests.conftest import Project, wait_for

TODAY = date.today()


# ---------------------------------------------------------------------------------------- helpers
class Db:
    """A real ctwatch database filled through the State API, as the worker fills it."""

    def __init__(self, root: Path) -> None:
        self.path = root / "state" / "ctwatch.db"
        self.outbox = root / "outbox"
        self.state = State(self.path)
        self.n = 0

    def close(self) -> None:
        self.state.close()

    def arrival(self, name: str) -> dict:
        self.n += 1
        reg = self.state.register_arrival(
            kind="inbox",
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
            steps=[],
            source={"kind": "inbox", "name": name},
            pipeline={"name": "chest-ct", "version": 1},
            device="cpu",
            dicom={},
            warnings=[],
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
            [{"step_id": "series", "uses": "dicom.select_series", "status": "done", "seconds": 0.2}],
        )
        self.state.finish_arrival(arrival.id, "done")
        return {"arrival": arrival.id, "uid": uid, "json": json_path}

    def rejected(self, name: str, reason: str) -> int:
        arrival = self.arrival(name)
        self.state.finish_arrival(arrival.id, "quarantined", error=reason)
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


def fill_standard(db: Db) -> dict:
    return {
        "sick": db.study(
            "sick.zip",
            probability=0.91,
            findings={"Lung nodule": 0.93, "Emphysema": 0.41, "Pleural effusion": 0.62, "Atelectasis": 0.1},
            caption="Irregular nodule in the right upper lobe — lung window",
            lungs={"volume_ml": 5234.4, "laa950_percent": 12.34, "plausible": True},
        ),
        "well": db.study(
            "well.zip",
            probability=0.12,
            findings={"Lung nodule": 0.2, "Emphysema": 0.05},
            lungs={"volume_ml": 4800.0, "laa950_percent": 2.1},
        ),
        "failed": db.study("broken.zip", status="Failure", error="step series: fewer than 20 slices"),
        "bare": db.study("bare.zip"),  # no decision, no models, no lungs: every section is optional
        "rejected": db.rejected("notes.zip", "no DICOM images found among 1 file(s)"),
    }


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
    assert ws.freeze_panes == "A2"
    assert ws.auto_filter.ref == f"A1:{openpyxl.utils.get_column_letter(len(HEADERS))}6"
    assert all(c.font.bold for c in ws[1]) and ws["A1"].fill.fgColor.rgb == "FF1F4E78"
    caption_column = openpyxl.utils.get_column_letter(HEADERS.index(CAPTION_HEADER) + 1)
    assert ws.column_dimensions[caption_column].width == 60
    rows = sheet_rows(ws)
    assert len(rows) == 5
    by_file = {r["Source file"]: (i + 2, r) for i, r in enumerate(rows)}

    line, sick = by_file["sick.zip"]
    assert sick["Study UID"] == made["sick"]["uid"] and sick["Accession"] == "ACC12345"
    assert (sick["Series number"], sick["Series description"], sick["Slices"]) == (2, "CHEST 1.0 B70f", 241)
    assert sick["Status"] == "Success" and sick["Pathology"] == 1
    assert sick["Probability of pathology"] == pytest.approx(0.91)
    assert sick["Most dangerous type"] == "Lung nodule"
    assert [(sick[f"Finding {i}"], sick[f"P {i}"]) for i in (1, 2, 3)] == [
        ("Lung nodule", pytest.approx(0.93)),
        ("Pleural effusion", pytest.approx(0.62)),
        ("Emphysema", pytest.approx(0.41)),
    ]
    assert sick["Lung volume (mL)"] == pytest.approx(5234.4) and sick["%LAA-950"] == pytest.approx(12.34)
    assert sick[CAPTION_HEADER].startswith("Irregular nodule")
    assert sick["Processing time (s)"] == pytest.approx(12.5)
    assert isinstance(sick["Received"], datetime) and isinstance(sick["Finished"], datetime)
    formats = {h: ws.cell(row=line, column=HEADERS.index(h) + 1).number_format for h in HEADERS}
    assert formats["Received"] == "yyyy-mm-dd hh:mm:ss" and formats["Finished"] == "yyyy-mm-dd hh:mm:ss"
    assert formats["Probability of pathology"] == "0.000" and formats["P 1"] == "0.000"
    assert formats["Lung volume (mL)"] == "#,##0" and formats["%LAA-950"] == "0.0"
    link = ws.cell(row=line, column=HEADERS.index("JSON") + 1)
    assert link.hyperlink is not None and not Path(link.hyperlink.target).is_absolute()
    assert (db.outbox / "reports" / link.hyperlink.target).resolve() == made["sick"]["json"].resolve()
    assert all(
        ws.cell(row=line, column=c).fill.fgColor.rgb == PATHOLOGY_FILL for c in range(1, len(HEADERS) + 1)
    )

    line, well = by_file["well.zip"]
    assert well["Pathology"] == 0 and well["Finding 3"] is None
    assert ws.cell(row=line, column=1).fill.fgColor.rgb != PATHOLOGY_FILL

    for name, status, reason in (
        ("broken.zip", "Failure", "fewer than 20 slices"),
        ("notes.zip", "Rejected", "no DICOM images"),
    ):
        line, row = by_file[name]
        assert row["Status"] == status and reason in row["Error"]
        assert ws.cell(row=line, column=1).fill.fgColor.rgb == FAILURE_FILL
        assert ws.cell(row=line, column=HEADERS.index("Status") + 1).font.bold

    _, bare = by_file["bare.zip"]
    assert bare["Probability of pathology"] is None and bare["Finding 1"] is None and bare["Slices"] == 241
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
    assert "decision threshold 0.5" in " ".join(str(v) for v in flat)

    def table(title: str) -> list[tuple]:
        start = next(i for i, row in enumerate(cells) if row[0] == title)
        out = []
        for row in cells[start + 1 :]:
            if row[0] is None:
                break
            out.append(tuple(v for v in row if v is not None))
        return out

    by_status = dict(table("By status")[1:])
    assert by_status == {"Success": 3, "Failure": 1, "Rejected": 1}
    findings = {row[0]: row for row in table("By finding")[1:]}
    assert findings["Lung nodule"][1:4] == (2, 2, 1)  # most dangerous twice, in top 3 twice, ≥ 0.5 once
    assert findings["Pleural effusion"][1:4] == (0, 1, 1)
    failures = table("Failures")
    assert [r[-1] for r in failures[1:]] == [
        "step series: fewer than 20 slices",
        "no DICOM images found among 1 file(s)",
    ]
    weekly = table("Probability of pathology by week (threshold 0.5)")
    header, week = weekly[0], dict(zip(weekly[0], weekly[1], strict=True))
    assert "0.9–1.0" in header and "0.1–0.2" in header
    assert week["Studies"] == 4 and week["At or above threshold"] == 1 and week["Below threshold"] == 1
    assert week["No probability"] == 2 and week["0.9–1.0"] == 1 and week["0.1–0.2"] == 1
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
    assert set(rows) == {"sick.zip", "well.zip", "broken.zip", "bare.zip", "notes.zip"}
    sick = rows["sick.zip"]
    assert sick["Study UID"] == made["sick"]["uid"] and sick["Accession"] == "ACC12345"
    assert sick["Probability of pathology"] == "0.910" and sick["P 2"] == "0.620"
    assert sick[CAPTION_HEADER] == "Irregular nodule in the right upper lobe — lung window"
    assert sick["Lung volume (mL)"] == "5,234" and sick["JSON"] == "open JSON"
    datetime.strptime(sick["Received"], "%Y-%m-%d %H:%M:%S")
    assert rows["notes.zip"]["Status"] == "Rejected"
