"""Ordinary faults under a running daemon: nothing stops intake or processing for good, no input
loses its outcome, and ``/health`` tells the truth while the fault lasts.

Real faults only: a read-only outbox (the daemon runs without the capabilities that let root
write anywhere), a full tmpfs, a second process holding SQLite's write lock past the busy timeout,
an input deleted from the work folder, the state database deleted, threads that end.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from processor.config import load_settings
from processor.daemon import Daemon, build
from processor.intake.orphans import adopt_orphans
from processor.state import State
from processor.status import Probes, health
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_spine_e2e import _stop, db_rows, states
from tests.test_unreadable_inputs import start_daemon

IS_ROOT = os.geteuid() == 0

DELAYED = [
    {"id": "series", "uses": "dicom.select_series"},
    {"id": "hold", "uses": "util.delay", "with": {"seconds": 2}},
]


def _start(project: Project, *, unprivileged: bool = False) -> subprocess.Popen[str]:
    """The daemon as a child process; ``unprivileged``: without root's override-everything powers."""
    return start_daemon(project) if unprivileged else project.start()


def _status_url(project: Project) -> str:
    found = wait_for(
        lambda: re.findall(r"status\.listening url=(http://127\.0\.0\.1:\d+)/", project.log_text()),
        60,
        "the status port",
    )
    assert isinstance(found, list)
    return found[-1]


def _health(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _unhealthy_with(url: str, words: str) -> bool:
    code, body = _health(url)
    return code == 503 and any(words in reason for reason in body.get("reasons", []))


def _no_thread_died(project: Project) -> None:
    text = project.log_text()
    assert "thread.died" not in text and "worker.crashed" not in text, text[-3000:]


# ---------------------------------------------------------------------------------------- outbox
def test_a_read_only_outbox_holds_claims_and_the_study_runs_when_writable_again(project: Project) -> None:
    if not IS_ROOT:
        pytest.skip("needs root to drop the capabilities that override file modes")
    project.write_pipeline(  # a step that writes previews into the outbox before the recorder
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "slices", "uses": "render.key_slices", "with": {"count": 1, "windows": ["lung"]}},
        ]
    )
    project.outbox.mkdir(parents=True)
    daemon = _start(project, unprivileged=True)
    try:
        url = _status_url(project)
        project.outbox.chmod(0o555)  # the share went read-only under the daemon
        wait_for(lambda: _unhealthy_with(url, "outbox folder cannot be written"), 60, "/health to say why")
        write_zip(project.inbox / "study.zip", make_series(20))
        wait_for(lambda: states(project) == [("pending",)], 30, "the study registered")
        time.sleep(2)
        assert states(project) == [("pending",)], "never started only to fail writing its previews"
        project.outbox.chmod(0o755)  # the cause goes away; nobody restarts the daemon
        wait_for(lambda: states(project) == [("done",)], 60, "the study done")
        wait_for(lambda: _health(url)[0] == 200, 30, "/health green again")
        [result] = [json.loads(p.read_text()) for p in project.results()]
        assert result["processing_status"] == "Success", result.get("error")
        assert db_rows(project, "select attempts, crashes from arrivals") == [(1, 0)]
    finally:
        project.outbox.chmod(0o755)
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    _no_thread_died(project)


def test_a_full_outbox_disk_pauses_the_finish_and_it_completes_when_space_returns(project: Project) -> None:
    project.outbox.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(project.outbox)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        filler = project.outbox / "filler.bin"
        with filler.open("wb") as fh, pytest.raises(OSError):
            while True:  # fill it to the last block
                fh.write(b"\0" * 65536)
                fh.flush()
        config = yaml.safe_load(project.config.read_text())
        config["disk"] = {"min_free_gb": 0}  # no disk guard: the write itself meets the full disk
        # no report page: the result's end is recorded, and the full disk is met placing it (a page
        # that cannot be written sends the batch back before its end is recorded, like any world fault)
        config["study_report"] = {"make": []}
        project.config.write_text(yaml.safe_dump(config))
        daemon = _start(project)
        try:
            url = _status_url(project)
            write_zip(project.inbox / "study.zip", make_series(20))
            wait_for(lambda: _unhealthy_with(url, "could not be written out"), 60, "/health to say why")
            filler.unlink()  # space returns
            wait_for(lambda: db_rows(project, "select placed from arrivals") == [(1,)], 60, "placed")
            wait_for(lambda: _health(url)[0] == 200, 30, "/health green again")
            assert len(project.results()) == 1
        finally:
            assert _stop(daemon) == 0, project.log_text()[-3000:]
    finally:
        subprocess.run(["umount", "-l", str(project.outbox)], check=False)
    _no_thread_died(project)
    assert "No space left on device" in project.log_text()


# ---------------------------------------------------------------------------------------- database
def test_the_database_write_locked_past_the_busy_timeout_sends_the_arrival_back_uncharged(
    project: Project,
) -> None:
    project.write_pipeline(DELAYED)
    settings = yaml.safe_load(project.config.read_text())
    settings["limits"] = {"database_busy_seconds": 3}  # SQLite's busy timeout: 30 s by default
    project.config.write_text(yaml.safe_dump(settings))
    daemon = _start(project)
    holder = None
    try:
        url = _status_url(project)
        write_zip(project.inbox / "study.zip", make_series(20))
        wait_for(lambda: states(project) == [("running",)], 60, "the study to run")
        holder = subprocess.Popen(  # another process takes SQLite's write lock for 8 s, past the 3 s wait
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
                "c.execute('begin immediate'); print('locked', flush=True); time.sleep(8); c.rollback()",
                str(project.state_path),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        write_zip(project.inbox / "second.zip", make_series(20))  # dropped while the lock is held
        wait_for(lambda: "worker.finish_failed" in project.log_text(), 60, "the finish to fail")
        assert _unhealthy_with(url, "processing paused"), _health(url)
        wait_for(lambda: _unhealthy_with(url, "intake paused"), 30, "/health to name the waiting drop")
        assert (project.inbox / "second.zip").exists(), "left in the inbox, not quarantined"
        holder.wait(60)
        wait_for(lambda: states(project) == [("done",), ("done",)], 120, "both done once the lock is gone")
        # "done" is committed before the receipt is written and the input moved: wait for placed
        wait_for(lambda: db_rows(project, "select placed from arrivals") == [(1,), (1,)], 60, "placed")
        assert db_rows(project, "select attempts, crashes from arrivals") == [(1, 0), (1, 0)], "never charged"
        assert len(project.results()) == 2 and len(project.receipts()) == 2
        assert not list((project.inbox / ".ctwatch").glob("quarantine/*"))
    finally:
        if holder is not None:
            holder.kill()
            holder.wait(10)
            if holder.stdout is not None:
                holder.stdout.close()
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    _no_thread_died(project)


def test_the_state_database_deleted_while_running_stops_claims_and_a_restart_takes_the_work_back(
    project: Project,
) -> None:
    project.write_pipeline(DELAYED)
    daemon = _start(project)
    try:
        url = _status_url(project)
        for i in range(5):
            write_zip(project.inbox / f"s{i}.zip", make_series(20))
        wait_for(lambda: len(states(project)) == 5 and ("done",) in states(project), 90, "one study done")
        for suffix in ("", "-wal", "-shm"):  # an operator "resets" ctwatch by deleting its database
            Path(str(project.state_path) + suffix).unlink(missing_ok=True)
        wait_for(lambda: _unhealthy_with(url, "was deleted"), 30, "/health to say the database went")
        time.sleep(3)  # whatever was running finishes; nothing new is claimed
        write_zip(project.inbox / "late.zip", make_series(20))
        time.sleep(3)
        assert (project.inbox / "late.zip").exists(), "not taken in while the database is gone"
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    work = project.inbox / ".ctwatch" / "work"
    waiting = sorted(p.name for p in work.iterdir())
    assert waiting, "the test meant to leave inputs in the work folder"
    again = _start(project)
    try:
        wait_for(
            lambda: len(project.receipts()) >= len(waiting) + 1 and not list(work.iterdir()),
            120,
            "the work folder's inputs and the late one finished",
        )
    finally:
        assert _stop(again) == 0, project.log_text()[-3000:]
    assert "arrival.adopted" in project.log_text()
    assert not (project.inbox / "late.zip").exists()
    done = {p.name for p in (project.inbox / ".ctwatch" / "done").rglob("*.zip")}
    assert done == {f"s{i}.zip" for i in range(5)} | {"late.zip"}, done
    assert len(project.results()) == 6, "every study has its JSON, none twice"


def test_inputs_in_the_work_folder_without_a_row_are_registered_once(tmp_path: Path) -> None:
    project = Project(tmp_path)
    settings = load_settings(project.config)
    components = build(settings)
    state = components.state
    work = project.inbox / ".ctwatch" / "work"
    work.mkdir(parents=True)
    write_zip(work / "a7-orphan.zip", make_series(20))
    folder = work / "a3-folder"
    folder.mkdir()
    (folder / "x.dcm").write_bytes(b"not really")
    known = state.register_arrival(
        kind="inbox",
        name="known.zip",
        original_path=str(project.inbox / "known.zip"),
        current_path=str(project.inbox / "known.zip"),
        sha256="0" * 64,
        size=1,
        pipeline_name="test-ct",
        pipeline_version=1,
    )
    write_zip(work / f"a{known.arrival_id}-known.zip", make_series(20))  # moved, row not updated
    try:
        ids = adopt_orphans(state, settings.inbox.dirs, pipeline_name="test-ct", pipeline_version=1)
        assert len(ids) == 2
        rows = {a.name: a for a in (state.arrival(i) for i in ids)}
        assert set(rows) == {"orphan.zip", "folder"} and all(a.state == "pending" for a in rows.values())
        assert rows["orphan.zip"].current_path == str(work / "a7-orphan.zip")
        assert adopt_orphans(state, settings.inbox.dirs, pipeline_name="test-ct", pipeline_version=1) == []
    finally:
        state.close()


# ---------------------------------------------------------------------------------------- threads
def test_a_dead_thread_is_named_on_health_restarted_and_counted(project: Project) -> None:
    settings = load_settings(project.config)
    daemon = Daemon(build(settings))
    daemon.start()
    supervisor = daemon.supervisor
    supervisor.stop()  # its looks are taken by hand below, so the dead thread can be seen first
    supervisor.join(10)
    supervisor._stop.clear()
    try:
        assert daemon.status is not None
        url = f"http://127.0.0.1:{daemon.status.port}"
        wait_for(lambda: _health(url)[0] == 200, 30, "healthy at first")
        daemon.watcher._stop.set()  # the watcher's loop ends while the daemon runs
        daemon.watcher._wake.set()
        daemon.watcher.join(10)
        code, body = _health(url)
        assert code == 503 and any("the watcher thread has stopped" in r for r in body["reasons"]), body
        supervisor.check()
        assert daemon.watcher.is_alive(), "started again by the supervisor"
        write_zip(project.inbox / "after.zip", make_series(20))
        wait_for(lambda: len(project.receipts()) == 1, 60, "a study dropped afterwards processed")
        with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
            metrics = response.read().decode()
        assert 'ctwatch_thread_restarts_total{thread="watcher"} 1' in metrics
        assert 'ctwatch_thread_up{thread="watcher"} 1' in metrics
        assert _health(url)[0] == 200
    finally:
        daemon.stop()
        daemon.shutdown()


def test_health_says_when_intake_has_not_scanned_for_several_intervals(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    try:
        fresh = {"seconds_since_scan": 4.0, "stale_after_seconds": 60.0, "scan_interval_seconds": 5.0}
        stale = {**fresh, "seconds_since_scan": 75.0}
        probes = Probes(version="t", device="cpu", pipeline={}, intake=lambda: fresh)
        assert health(probes, state)[0] == 200
        probes.intake = lambda: stale
        code, body = health(probes, state)
        assert code == 503 and any(
            "has not finished a scan of the inbox for 75 s" in r for r in body["reasons"]
        )
    finally:
        state.close()


def test_the_status_thread_is_restarted_on_the_same_port(project: Project) -> None:
    settings = load_settings(project.config)
    daemon = Daemon(build(settings))
    daemon.supervisor.interval = 0.5
    daemon.start()
    try:
        assert daemon.status is not None and daemon.status._server is not None
        port = daemon.status.port
        daemon.status._server.shutdown()  # serve_forever returns: the status thread ends
        wait_for(lambda: daemon.supervisor.restarts().get("status") == 1, 30, "the status thread restarted")
        wait_for(lambda: _health(f"http://127.0.0.1:{port}")[0] == 200, 30, "served again on the same port")
    finally:
        daemon.stop()
        daemon.shutdown()


def test_sigterm_while_large_inputs_are_hashed_exits_within_seconds_and_leaves_them(project: Project) -> None:
    for i in range(3):  # sparse: quick to make, seconds to hash
        with (project.inbox / f"big{i}.zip").open("wb") as fh:
            fh.truncate(6 * 2**30)
    daemon = _start(project)
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        time.sleep(1.5)  # the watcher is hashing the first one now
    finally:
        started = time.monotonic()
        assert _stop(daemon) == 0, project.log_text()[-3000:]
        took = time.monotonic() - started
    assert took < 20, f"SIGTERM took {took:.0f} s"
    left = sorted(p.name for p in project.inbox.glob("big*.zip"))
    assert len(left) >= 2, "the ones not taken in stay in the inbox for the next start"
    assert "watch.handover_deferred" in project.log_text() or len(left) == 3


def test_a_deleted_night_folder_is_made_again_and_intake_stays_healthy(project: Project) -> None:
    daemon = _start(project)
    try:
        url = _status_url(project)
        night = project.inbox / "night"
        wait_for(night.is_dir, 30, "the night folder")
        night.rmdir()  # an operator tidies up
        wait_for(lambda: "watch.folder_recreated" in project.log_text(), 30, "the folder made again")
        assert night.is_dir() and _health(url)[0] == 200
        write_zip(night / "n.zip", make_series(20))
        wait_for(lambda: len(states(project)) == 1, 30, "a night drop registered")
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]


def test_a_folder_copied_from_a_mac_becomes_stable_but_one_being_copied_by_rsync_waits(
    tmp_path: Path,
) -> None:
    from processor.intake.stability import looked_at, signature

    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "1.dcm").write_bytes(b"x" * 10)
    (folder / ".DS_Store").write_bytes(b"finder")
    (folder / "._1.dcm").write_bytes(b"appledouble")
    sig = signature(folder)
    assert sig is not None and sig[0] == 3, "Finder's leftovers never make a folder wait for ever"
    (folder / ".2.dcm.Xa81Bq").write_bytes(b"half")  # rsync's name while it copies 2.dcm
    sig, temporary = looked_at(folder)  # the folder waits on it (tests/test_complete_before_taken.py)
    assert sig is not None and sig[0] == 4 and temporary == [folder / ".2.dcm.Xa81Bq"]


def test_temp_files_a_kill_left_are_removed_at_start_also_in_a_reports_folder_outside_the_outbox(
    tmp_path: Path,
) -> None:
    project = Project(tmp_path, reports={"dir": "workbooks"})
    reports = tmp_path / "workbooks"
    reports.mkdir()
    workbook_temp = reports / ".ctwatch-2026-11-29.x1y2.tmp.xlsx"  # what Excel publishing leaves
    workbook_temp.write_bytes(b"PK half")
    json_temp = project.outbox / "2026-11-29" / ".1.2.3.json.ab12.tmp"
    json_temp.parent.mkdir(parents=True)
    json_temp.write_text("{half")
    kept = reports / "notes.tmp.txt"  # not ours: left alone
    kept.write_text("mine")
    daemon = Daemon(build(load_settings(project.config)))
    daemon.start()
    try:
        assert not workbook_temp.exists() and not json_temp.exists() and kept.exists()
    finally:
        daemon.stop()
        daemon.shutdown()


def test_reasons_name_the_input_as_dropped_not_as_it_lies_in_the_work_folder(project: Project) -> None:
    (project.inbox / "empty.zip").write_bytes(b"")
    (project.inbox / "login.zip").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    daemon = _start(project)
    try:
        wait_for(lambda: len(project.receipts()) == 2, 60, "both receipts")
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    reasons = {r["name"]: r["message"] for r in project.receipts()}
    assert reasons["empty.zip"].startswith("the file empty.zip is empty (0 bytes)"), reasons
    assert reasons["login.zip"].startswith("the file login.zip is an HTML page"), reasons
