"""End to end: real ZIPs of real DICOM through `process` and through the running daemon."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import jsonschema

from processor.outputs.result import load_schema
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_folder, write_zip

API_FIELDS = {
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "most_dangerous_pathology_type",
    "processing_status",
    "time_of_processing",
    "error",
}


def validate(path: Path) -> dict:
    document = json.loads(path.read_text())
    jsonschema.validate(document, load_schema())
    assert document.keys() >= API_FIELDS
    return document


def db_rows(project: Project, sql: str) -> list[tuple]:
    conn = sqlite3.connect(project.state_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def states(project: Project) -> list[tuple]:
    """Arrival states, or [] while the daemon has not created its database yet."""
    if not project.state_path.exists():
        return []
    try:
        return db_rows(project, "select state from arrivals")
    except sqlite3.OperationalError:
        return []


# ---------------------------------------------------------------- process command
def test_process_two_studies_in_one_zip(project: Project, tmp_path: Path) -> None:
    a, b = make_series(21, description="A"), make_series(25, description="B")
    path = write_zip(tmp_path / "two.zip", a + b, shuffle_seed=7, extension="")
    proc = project.run("process", str(path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    results = project.results()
    assert len(results) == 2
    docs = {validate(p)["study_uid"]: validate(p) for p in results}
    assert set(docs) == {a[0].StudyInstanceUID, b[0].StudyInstanceUID}
    for doc in docs.values():
        assert doc["processing_status"] in ("Success", "Partial")
        assert doc["source"]["sha256"] and doc["pipeline"]["name"] == "test-ct"
        assert doc["steps"][0]["status"] == "done"
    assert path.exists(), "process must not move files named on the command line"


def test_process_rejects_non_dicom_with_reason(project: Project, tmp_path: Path) -> None:
    path = tmp_path / "notes.zip"
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.txt", "hello")
    proc = project.run("process", str(path))
    assert proc.returncode == 1
    assert "no DICOM images found" in proc.stderr
    receipt = project.receipts()[0]
    assert receipt["outcome"] == "rejected" and "no DICOM" in receipt["message"]
    status = project.run("status")
    assert "quarantined=1" in status.stdout and "no DICOM images found" in status.stdout


def test_process_study_without_eligible_series_is_failure(project: Project, tmp_path: Path) -> None:
    path = write_folder(tmp_path / "short", make_series(5))
    proc = project.run("process", str(path))
    assert proc.returncode == 1
    doc = validate(project.results()[0])
    assert doc["processing_status"] == "Failure"
    assert "fewer than" in doc["error"] and doc["series_selection"]["series"][0]["reason"]


def test_pipeline_version_bump_reprocesses(project: Project, tmp_path: Path) -> None:
    path = write_zip(tmp_path / "s.zip", make_series(20))
    assert project.run("process", str(path)).returncode == 0
    again = project.run("process", str(path))
    assert "duplicate of arrival 1" in again.stdout
    project.write_pipeline([{"id": "series", "uses": "dicom.select_series"}], version=2)
    third = project.run("process", str(path))
    assert "duplicate" not in third.stdout
    assert len(project.results()) == 2  # the second result sits beside the first, never over it


# ---------------------------------------------------------------- daemon
def start_with_a_running_study(project: Project, hold_seconds: float) -> subprocess.Popen[str]:
    """The daemon, once a dropped study is running (held ``hold_seconds`` by ``util.delay``)."""
    project.write_pipeline(
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "hold", "uses": "util.delay", "with": {"seconds": hold_seconds}},
        ]
    )
    write_zip(project.inbox / "study.zip", make_series(20))
    daemon = project.start()
    try:
        wait_for(lambda: states(project) == [("running",)], 60, "a running arrival")
    except BaseException:
        daemon.kill()
        daemon.wait(timeout=30)
        raise
    return daemon


def _stop(proc) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


def test_daemon_drop_duplicate_and_growing_file(project: Project, tmp_path: Path) -> None:
    daemon = project.start()
    try:
        series = make_series(22)
        source = write_zip(tmp_path / "study.zip", series)
        data = source.read_bytes()
        # A copy that arrives in pieces over a few seconds: processed once, after it stops growing.
        target = project.inbox / "study.zip"
        with target.open("wb") as fh:
            step = len(data) // 4 + 1
            for i in range(0, len(data), step):
                fh.write(data[i : i + step])
                fh.flush()
                time.sleep(0.4)
        wait_for(lambda: len(project.results()) == 1, 60, "the first result")
        wait_for(lambda: any(r["outcome"] == "accepted" for r in project.receipts()), 30, "receipt")
        # The same bytes dropped again under another name: one result, one duplicate receipt.
        (project.inbox / "again.zip").write_bytes(data)
        wait_for(lambda: any(r["outcome"] == "duplicate" for r in project.receipts()), 60, "duplicate")
        # A hostile ZIP goes to quarantine with a note; the daemon carries on.
        (project.inbox / "slip.zip").write_bytes(_zip_slip_bytes())
        wait_for(
            lambda: list((project.inbox / ".ctwatch" / "quarantine").glob("slip.zip.error.txt")),
            60,
            "quarantine note",
        )
        later = write_zip(tmp_path / "later.zip", make_series(20))
        os.replace(later, project.inbox / "later.zip")
        wait_for(lambda: len(project.results()) == 2, 60, "a result after the bad input")
    finally:
        assert _stop(daemon) == 0, project.log_text()
    assert len(project.results()) == 2
    validate(project.results()[0])
    receipts = project.receipts()
    assert sorted(r["outcome"] for r in receipts) == ["accepted", "accepted", "duplicate", "rejected"]
    note = (project.inbox / ".ctwatch" / "quarantine" / "slip.zip.error.txt").read_text()
    assert "zip-slip" in note
    kept = sorted(p.name for p in (project.inbox / ".ctwatch").rglob("*.zip"))
    assert kept == ["again.zip", "later.zip", "slip.zip", "study.zip"], "nothing dropped is deleted"
    assert db_rows(project, "select count(*) from arrivals where state='duplicate'") == [(1,)]
    assert "arrival.registered" in project.log_text()


def test_daemon_picks_up_files_present_at_start_and_folders(project: Project, tmp_path: Path) -> None:
    write_zip(project.inbox / "waiting.zip", make_series(20))
    write_folder(project.inbox / "folder-drop", make_series(21), extension=".dcm")
    daemon = project.start()
    try:
        wait_for(lambda: len(project.results()) == 2, 60, "both results")
    finally:
        assert _stop(daemon) == 0


def test_sigkill_during_study_then_restart(project: Project, tmp_path: Path) -> None:
    daemon = start_with_a_running_study(project, 4)
    daemon.kill()
    daemon.wait(timeout=30)
    assert project.results() == []
    # What a write interrupted by the kill would leave: removed at the next start, never served.
    stale = project.outbox / "2000-01-01" / ".1.2.3.json.abcd.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_text("{half")
    restarted = project.start()
    try:
        wait_for(lambda: states(project) == [("done",)], 60, "done after restart")
    finally:
        assert _stop(restarted) == 0
    assert len(project.results()) == 1
    assert db_rows(project, "select attempts from arrivals") == [(2,)]
    assert "arrival.recovered" in project.log_text()
    assert not stale.exists() and "outbox.stale_temp_removed" in project.log_text()


def test_sigterm_during_study_leaves_no_running_row(project: Project) -> None:
    project.write_pipeline(
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "hold", "uses": "util.delay", "with": {"seconds": 2}},
            {"id": "hold2", "uses": "util.delay", "with": {"seconds": 2}},
        ]
    )
    write_zip(project.inbox / "study.zip", make_series(20))
    daemon = project.start()
    try:
        wait_for(lambda: states(project) == [("running",)], 60, "a running arrival")
    finally:
        assert _stop(daemon) == 0
    assert db_rows(project, "select state, attempts from arrivals") == [("pending", 0)]
    assert project.results() == [] and not list(project.outbox.rglob("*.tmp"))


def _zip_slip_bytes() -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../outside.dcm", b"x")
    return buf.getvalue()
