"""The supervisor keeps the worker alive: a thread that died is started again, with a back-off."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from processor.lifecycle import Supervisor
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_spine_e2e import _stop, db_rows, start_with_a_running_study


class _Part:
    """A long-running part whose thread ends at once (as a loop would when an error escapes it)."""

    def __init__(self) -> None:
        self.starts = 0
        self.survive = False
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.starts += 1
        self._thread = threading.Thread(target=self._run, name="ctwatch-test-part", daemon=True)
        self._thread.start()
        self._thread.join(5) if not self.survive else None

    def _run(self) -> None:
        if self.survive:
            self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def test_supervisor_restarts_a_dead_part_with_a_doubling_back_off() -> None:
    part = _Part()
    supervisor = Supervisor({"worker": part}, interval=1.0, max_backoff=4.0)
    supervisor._kept = []  # built by start(); built here so check() runs without the loop thread
    supervisor.start()
    supervisor.stop()
    supervisor.join(5)
    supervisor._stop.clear()
    restarted_at = []
    for now in [float(t) for t in range(0, 20)]:
        before = part.starts
        supervisor.check(now)
        if part.starts > before:
            restarted_at.append(now)
    assert restarted_at == [0.0, 1.0, 3.0, 7.0, 11.0, 15.0, 19.0], "1, 2, 4, 4… seconds apart (capped)"
    assert supervisor.restarts() == {"worker": 7}
    part.survive = True
    supervisor.check(100.0)
    assert part.is_alive()
    supervisor.check(101.0)
    assert part.starts == 8, "a live part is left alone"
    part.stop()
    part.join(5)


def test_an_os_error_while_recording_pauses_the_worker_and_the_end_is_placed_later(project: Project) -> None:
    receipts = project.outbox / "receipts"
    receipts.parent.mkdir(parents=True, exist_ok=True)
    receipts.write_text("in the way")  # every receipt write now fails: an OS error escapes the recorder
    write_zip(project.inbox / "study.zip", make_series(20))
    daemon = project.start()
    try:
        wait_for(lambda: "worker.finish_failed" in project.log_text(), 60, "the finish to fail")
        assert db_rows(project, "select state, placed from arrivals") == [("done", 0)], (
            "its end is recorded before the receipt and the move"
        )
        receipts.unlink()  # the cause goes away; nobody restarts the daemon
        wait_for(
            lambda: db_rows(project, "select placed from arrivals") == [(1,)], 90, "the recorded end finished"
        )
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    receipt = json.loads(next(receipts.glob("*.json")).read_text())
    assert receipt["outcome"] == "accepted" and len(project.results()) == 1
    done = list((project.inbox / ".ctwatch" / "done").rglob("study.zip"))
    assert len(done) == 1 and not list((project.inbox / ".ctwatch" / "work").iterdir())
    assert "worker.crashed" not in project.log_text() and "thread.died" not in project.log_text(), (
        "the worker thread lives through an OS error"
    )


def test_supervisor_thread_is_named_and_stops(tmp_path: Path) -> None:
    supervisor = Supervisor({}, interval=0.05)
    supervisor.start()
    assert supervisor.is_alive()
    supervisor.stop()
    supervisor.join(5)
    assert not supervisor.is_alive()


def test_a_second_instance_on_the_same_state_is_refused_before_it_touches_anything(project: Project) -> None:
    first = start_with_a_running_study(project, 3)
    try:
        file_log = project.state_path.parent / "ctwatch.log"
        log_before = file_log.read_text()
        second = project.run("run", timeout=60)
        assert second.returncode == 2, second.stderr
        holder = f"another ctwatch (pid {first.pid}, daemon) holds {project.state_path}"
        assert holder in second.stderr, second.stderr
        cli = project.run("process", str(project.inbox / "nothing.zip"), timeout=60)
        assert cli.returncode == 2 and "drop the files into the running daemon's inbox" in cli.stderr
        assert holder in cli.stderr, cli.stderr
        assert file_log.read_text().count("config file=") == log_before.count("config file=") == 1, (
            "the refused ones logged nothing: they stopped before opening the log or the database"
        )
        wait_for(
            lambda: db_rows(project, "select state from arrivals") == [("done",)], 60, "the first one's study"
        )
    finally:
        assert _stop(first) == 0, project.log_text()[-3000:]
    assert db_rows(project, "select attempts, crashes from arrivals") == [(1, 0)], (
        "not recovered by the second"
    )
    assert "arrival.recovered" not in project.log_text()


def test_process_run_again_after_a_killed_process_finishes_the_input(
    project: Project, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, _env

    study = write_zip(tmp_path / "mine" / "study.zip", make_series(20))
    env = {**_env(), "CTWATCH_FAULT": "study.started"}
    killed = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "process", str(study), "--config", str(project.config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=project.root,
        env=env,
    )
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert db_rows(project, "select state from arrivals") == [("running",)]
    again = project.run("process", str(study), timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "\tSuccess\t" in again.stdout
    assert db_rows(project, "select id, state, crashes from arrivals order by id")[0] == (1, "done", 1)
    assert os.path.exists(study), "named on the command line: it stays where it is"


def test_a_deleted_lock_file_is_locked_again_so_a_second_instance_is_still_refused(project: Project) -> None:
    first = project.start()
    lock = project.state_path.with_name(project.state_path.name + ".lock")
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        lock.unlink()  # a clean-up habit after a kill -9
        wait_for(lambda: "daemon.lock_recreated" in project.log_text(), 30, "the lock file locked again")
        second = project.run("run", timeout=60)
        assert second.returncode == 2 and f"holds {project.state_path}" in second.stderr
    finally:
        assert _stop(first) == 0, project.log_text()[-3000:]


def test_process_reports_an_input_the_crash_cap_quarantined_instead_of_trying_it_again(
    project: Project, tmp_path: Path
) -> None:
    import subprocess
    import sys

    from tests.conftest import REPO, _env

    poison = write_zip(tmp_path / "mine" / "poison.zip", make_series(20))
    env = {**_env(), "CTWATCH_FAULT": "study.started~poison"}  # it crashes the process every time

    def process() -> subprocess.CompletedProcess[str]:
        command = [
            sys.executable,
            str(REPO / "run.py"),
            "process",
            str(poison),
            "--config",
            str(project.config),
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=project.root, env=env)

    assert [process().returncode for _ in range(3)] == [137, 137, 137]
    last = process()
    assert last.returncode == 1, last.stderr[-2000:]
    assert "quarantined" in last.stderr and "crashed the worker 3 times" in last.stderr
    assert db_rows(project, "select state, crashes from arrivals") == [("quarantined", 3)]
