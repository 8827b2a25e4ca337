"""Night window, retention, scheduled jobs, disk guard and shutdown modes — time is passed in."""

from __future__ import annotations

import json
import logging
import re
import signal
import sqlite3
import threading
import urllib.error
import urllib.request
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path

import pytest

from processor.config import load_settings
from processor.daemon import Components, Daemon, DiskGuard, build, guarded_volumes
from processor.outputs.report import day_name
from processor.scheduler import Housekeeping, NightWindow, Scheduler, apply_retention, done_roots
from processor.state import State
from processor.worker import Worker
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip

MONDAY = date(2025, 3, 10)


def at(hour: int, minute: int = 0, day: date = MONDAY) -> datetime:
    return datetime.combine(day, time(hour, minute))


# ---------------------------------------------------------------------------------------- night window
def test_night_window_rules() -> None:
    window = NightWindow.parse("01:00-06:00")
    assert str(window) == "01:00-06:00"
    assert [window.contains(at(h, m)) for h, m in ((0, 59), (1, 0), (5, 59), (6, 0), (14, 0))] == [
        False,
        True,
        True,
        False,
        False,
    ]
    assert window.night_before(at(2)) == at(6), "inside: every night arrival so far may run"
    assert window.night_before(at(14)) is None, "outside: the night batch pauses"
    assert window.night_before(at(14), run_on=True) == at(6), "run on: the batch of last night continues"
    assert window.night_before(at(0, 30), run_on=True) == at(6, day=MONDAY - timedelta(days=1))
    assert window.next_start(at(14)) == at(1, day=MONDAY + timedelta(days=1))

    wrapping = NightWindow.parse("22:00-05:00")
    assert [wrapping.contains(at(h)) for h in (21, 22, 23, 0, 4, 5, 12)] == [
        False,
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    assert wrapping.night_before(at(23)) == at(5, day=MONDAY + timedelta(days=1))
    assert wrapping.night_before(at(3)) == at(5)
    aware = datetime(2025, 3, 10, 2, 0, tzinfo=UTC)
    assert window.night_before(aware) == datetime(2025, 3, 10, 6, 0, tzinfo=UTC)
    assert NightWindow.parse("00:00-00:00").contains(at(13)), "start == end: open all day"
    with pytest.raises(ValueError, match="01:00-06:00"):
        NightWindow.parse("1am-6am")


def test_claim_day_first_and_night_cutoff(tmp_path: Path) -> None:
    state = State(tmp_path / "db.sqlite")

    def register(name: str, night: bool, created: str) -> int:
        aid = state.register_arrival(
            kind="night" if night else "inbox",
            name=name,
            original_path=name,
            current_path=name,
            sha256=name * 8,
            size=1,
            pipeline_name="p",
            pipeline_version=1,
            night=night,
        ).arrival_id
        state.update_arrival(aid, created_at=created)
        return aid

    n1 = register("n1", True, "2025-03-10T00:30:00+00:00")
    n2 = register("n2", True, "2025-03-10T07:00:00+00:00")
    d1 = register("d1", False, "2025-03-10T08:00:00+00:00")
    try:
        assert state.claim_next_until(None).id == d1, "the day queue goes first, even when younger"
        assert state.claim_next_until(None) is None, "outside the window night arrivals wait"
        assert state.claim_next_until("2025-03-10T06:00:00+00:00").id == n1
        assert state.claim_next_until("2025-03-10T06:00:00+00:00") is None, "n2 came after the window"
        assert state.claim_next_until("2025-03-11T06:00:00+00:00").id == n2
    finally:
        state.close()


class Clock:
    """Local wall-clock time the worker sees; the test moves it."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _components(project: Project, **overrides) -> Components:
    return build(load_settings(project.config, overrides))


def _drop(
    components: Components, project: Project, name: str, *, night: bool = False, slices: int = 20
) -> int:
    folder = project.inbox / "night" if night else project.inbox
    path = write_zip(folder / name, make_series(slices))
    aid = components.intake.accept(path, night=night)
    assert aid is not None
    return aid


def _states(components: Components, *ids: int) -> list[str]:
    return [components.state.arrival(i).state for i in ids]


def _idle_after(worker: Worker, passes: int = 2) -> None:
    """Wait until the worker has looked at the queue and found nothing it may claim, twice."""
    seen = worker.idle_passes
    worker.wake_event.set()
    wait_for(lambda: worker.idle_passes >= seen + passes, 30, "the worker to go idle")


def test_night_arrivals_wait_run_in_the_window_after_the_day_queue_and_pause_at_its_end(
    project: Project,
) -> None:
    # Wall-clock times from tomorrow on: arrivals are registered now, and "now" never runs backwards.
    tomorrow = date.today() + timedelta(days=1)
    components = _components(project)
    window = NightWindow.parse("01:00-06:00")
    clock = Clock(at(14, day=tomorrow))
    gate = threading.Event()
    gate.set()
    order: list[int] = []
    d1 = _drop(components, project, "day-1.zip")
    n1 = _drop(components, project, "night-1.zip", night=True)
    n2 = _drop(components, project, "night-2.zip", night=True)

    def processed(aid: int, outcome: str) -> None:
        order.append(aid)
        if aid == n1:
            clock.now = at(6, 30, day=tomorrow + timedelta(days=1))  # the window closes meanwhile

    worker = Worker(
        components.state,
        components.executor(),
        night_before=window.night_before,
        can_claim=gate.is_set,
        on_processed=processed,
        clock=clock,
        poll_seconds=0.05,
    )
    worker.start()
    try:
        wait_for(lambda: order == [d1], 60, "the day arrival")
        _idle_after(worker)
        assert _states(components, n1, n2) == ["pending", "pending"], "night arrivals wait for the window"

        gate.clear()  # hold claims while a day arrival comes in and the window opens
        _idle_after(worker)
        d2 = _drop(components, project, "day-2.zip")
        clock.now = at(2, day=tomorrow + timedelta(days=1))
        gate.set()
        wait_for(lambda: len(order) == 3, 60, "a night arrival inside the window")
        assert order == [d1, d2, n1], "the day queue goes first, then the night batch in arrival order"
        _idle_after(worker)
        assert _states(components, n2) == ["pending"], "the batch pauses when the window ends"

        clock.now = at(1, 30, day=tomorrow + timedelta(days=2))  # the next night
        wait_for(lambda: len(order) == 4, 60, "the rest of the batch the next night")
        assert order == [d1, d2, n1, n2]
    finally:
        worker.stop()
        worker.join(30)
        components.state.close()
    assert not worker.is_alive()
    assert len(project.results()) == 4


# ---------------------------------------------------------------------------------------- retention
def _archive(root: Path, day: str, name: str) -> Path:
    path = root / ".ctwatch" / "done" / day / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK")
    return path


def test_retention_removes_only_old_dated_folders(tmp_path: Path) -> None:
    inbox, night = tmp_path / "inbox", tmp_path / "inbox" / "night"
    today = date(2025, 3, 10)
    old = _archive(inbox, "2025-03-01", "old.zip")
    edge = _archive(inbox, "2025-03-03", "edge.zip")
    fresh = _archive(inbox, "2025-03-10", "fresh.zip")
    odd = _archive(inbox, "not-a-date", "odd.zip")
    quarantined = inbox / ".ctwatch" / "quarantine" / "bad.zip"
    quarantined.parent.mkdir(parents=True)
    quarantined.write_bytes(b"x")
    roots = done_roots([inbox, night, inbox])
    assert roots == [(inbox / ".ctwatch" / "done").resolve(), (night / ".ctwatch" / "done").resolve()]
    removed = apply_retention(roots, keep_days=7, today=today)
    assert removed == [old.parent.resolve()]
    assert not old.exists() and edge.exists() and fresh.exists() and odd.exists() and quarantined.exists()


def test_housekeeping_runs_tasks_and_survives_a_failing_one(caplog: pytest.LogCaptureFixture) -> None:
    housekeeping = Housekeeping()
    housekeeping.start()
    ran: list[str] = []
    try:
        housekeeping.submit("broken", lambda: 1 / 0)
        housekeeping.submit("fine", lambda: ran.append("fine"))
        wait_for(lambda: housekeeping.done == 2, 10, "both tasks")
    finally:
        housekeeping.stop()
        housekeeping.join(10)
    assert ran == ["fine"] and "housekeeping.failed task=broken" in caplog.text


def test_scheduled_jobs_retention_and_rollover_in_a_running_daemon(project: Project) -> None:
    today = date.today()
    old = _archive(project.inbox, (today - timedelta(days=30)).isoformat(), "old.zip")
    kept = _archive(project.inbox, today.isoformat(), "kept.zip")
    daemon = Daemon(_components(project, **{"retention.keep_days": 7, "reports.debounce_seconds": 3600}))
    daemon.start()
    try:
        jobs = {j["id"]: j["next_run"] for j in daemon.scheduler.next_jobs()}
        assert set(jobs) == {"report-rollover", "night-window-start", "rescan", "retention"}
        assert (
            jobs["report-rollover"][11:19] == "00:00:00" and jobs["night-window-start"][11:19] == "01:00:00"
        )
        assert jobs["retention"][11:19] == "00:30:00"
        daemon.scheduler.run_now("retention")
        wait_for(lambda: not old.exists(), 30, "retention to remove the 30-day-old archive")
        assert kept.exists()
        yesterday = project.outbox / "reports" / day_name(today - timedelta(days=1))
        daemon.scheduler.run_now("report-rollover")
        wait_for(yesterday.exists, 30, "the roll-over to close yesterday's workbook")
    finally:
        daemon.shutdown()


def test_retention_job_absent_unless_configured() -> None:
    window = NightWindow.parse("01:00-06:00")
    scheduler = Scheduler(window=window, on_rollover=print, on_night_start=print, on_rescan=print)
    scheduler.start()
    try:
        assert {j["id"] for j in scheduler.next_jobs()} == {"report-rollover", "night-window-start", "rescan"}
    finally:
        scheduler.shutdown()


# ---------------------------------------------------------------------------------------- disk guard
def test_disk_guard_stops_claims_and_resumes(project: Project, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    components = _components(project)
    guard = DiskGuard(guarded_volumes(components.settings), min_free_gb=1e9)  # a petabyte: never there
    worker = Worker(components.state, components.executor(), can_claim=guard.ok, poll_seconds=0.05)
    aid = _drop(components, project, "waits.zip")
    worker.start()
    try:
        _idle_after(worker, 3)
        assert _states(components, aid) == ["pending"], "the arrival waits safely while space is low"
        report = guard.report()
        assert report["ok"] is False and "disk.min_free_gb" in report["reason"]
        assert {v["volume"] for v in report["volumes"]} == {"outbox", "work"}
        guard.min_free_gb = 0.000001  # space "returns"
        wait_for(lambda: _states(components, aid) == ["done"], 60, "the claim after space returns")
    finally:
        worker.stop()
        worker.join(30)
        components.state.close()
    assert "disk.low claims=stopped" in caplog.text and "disk.ok claims=resumed" in caplog.text


def test_disk_guard_in_health_and_status_of_a_running_daemon(tmp_path: Path) -> None:
    project = Project(tmp_path, disk={"min_free_gb": 1e9})
    write_zip(project.inbox / "waits.zip", make_series(20))
    proc = project.start()
    try:
        match = wait_for(
            lambda: re.search(r"status\.listening url=(http://[^/ ]+)/", project.log_text()),
            60,
            "the status server",
        )
        base = match.group(1)
        wait_for(lambda: "arrival.registered" in project.log_text(), 60, "the arrival to be registered")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + "/health", timeout=10)
        assert err.value.code == 503
        health = json.loads(err.value.read())
        err.value.close()
        assert health["status"] == "unhealthy" and "low disk space" in health["reasons"][0]
        with urllib.request.urlopen(base + "/status", timeout=10) as response:
            status = json.loads(response.read())
        assert status["disk"]["ok"] is False and status["queue"]["pending_day"] == 1
        assert "disk.low claims=stopped" in project.log_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    conn = sqlite3.connect(project.state_path)
    assert conn.execute("select state from arrivals").fetchall() == [("pending",)]
    conn.close()
    assert project.results() == []


# ---------------------------------------------------------------------------------------- shutdown modes
@pytest.mark.parametrize("mode", ["step", "study"])
def test_shutdown_mode_step_or_study(project: Project, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    project.write_pipeline(
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "hold", "uses": "util.delay", "with": {"seconds": 0.5}},
            {"id": "hold2", "uses": "util.delay", "with": {"seconds": 0.5}},
        ]
    )
    components = _components(project, **{"worker.shutdown": mode})
    aid = _drop(components, project, "study.zip")
    worker = Worker(components.state, components.executor(), poll_seconds=0.05)
    worker.start()
    try:
        wait_for(
            lambda: "step.done" in caplog.text and "step=series" in caplog.text,
            30,
            "the study to be under way (its first step done)",
        )
        worker.stop()
        worker.join(30)
        assert not worker.is_alive()
        row = components.state.arrival(aid)
    finally:
        worker.stop()
        worker.join(30)
        components.state.close()
    if mode == "step":
        assert (row.state, row.attempts) == ("pending", 0)
        assert project.results() == [] and not list(project.outbox.rglob("*.tmp"))
    else:
        assert row.state == "done"
        assert len(project.results()) == 1
        steps = json.loads(project.results()[0].read_text())["steps"]
        assert [s["status"] for s in steps] == ["done", "done", "done"]
