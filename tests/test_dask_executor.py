"""The Dask executor (issue 19): the pipeline on Dask distributed workers, the daemon still the
only writer — real daemons (``python run.py``) with a real LocalCluster of worker processes, real
ZIPs of real DICOM, workers killed by PID and by a poison input (the named fault point
``study.started``: ``os._exit(137)``)."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
from pathlib import Path

import pytest

from processor.faults import ENV
from tests.conftest import Project, wait_for
from tests.test_cpu_pool import CLIP_STEPS, STEPS, _drop, _inputs, _results_of, _stop
from tests.test_ctclip_steps import _install_small_weights


def _dask_project(
    root: Path, steps: list[dict] = CLIP_STEPS, n_workers: int = 2, limits: dict | None = None, **dask: object
) -> Project:
    root.mkdir(parents=True)
    executor = {"dask": {"local": {"n_workers": n_workers}, **dask}}
    return Project(
        root,
        steps,
        worker={"cpu_workers": 0, "max_inflight_studies": 2},
        reports={"enabled": False},
        executor=executor,
        **({"limits": limits} if limits else {}),
    )


def test_dask_results_equal_the_local_executor(tmp_path: Path) -> None:
    """10 studies on a LocalCluster of 2 worker processes (abstract GPU=1 each): 10 results equal to
    the local executor's, each model loaded once per worker, not per study."""
    zips = _inputs(tmp_path / "zips", 10)
    runs = {}
    for kind in ("dask", "local"):
        if kind == "dask":
            project = _dask_project(tmp_path / kind)
        else:
            (tmp_path / kind).mkdir()
            project = Project(tmp_path / kind, CLIP_STEPS, reports={"enabled": False})
        _install_small_weights(project.root)
        runs[kind], status, _, _ = _results_of(project, zips)
        if kind == "dask":
            workers = status["executor"]["workers"]
            assert len(workers) == 2 and sum(w["done"] for w in workers) == 10, workers
            ran = {name for _, name, _ in _started(project)}
            for worker in workers:  # a model a worker used was loaded there once, whatever it ran
                assert all(m["loads"] == 1 for m in worker["models_loaded"]), worker
                assert worker["model_loads"] == len(worker["models_loaded"]) == (2 if worker["done"] else 0)
            assert ran == {w["name"] for w in workers if w["done"]}
            assert _started(project) and all(len(ids) == 1 for ids, _, _ in _started(project))
    assert len(runs["dask"]) == 10 and runs["dask"] == runs["local"]


DELAY_STEPS = [*STEPS[:2], {"id": "hold", "uses": "util.delay", "with": {"seconds": 3}}, *STEPS[2:]]


def _started(project: Project) -> list[tuple[list[int], str, int]]:
    """(arrival ids, worker name, worker pid) of each ``dask.batch_started`` the workers logged."""
    return [
        (json.loads(ids), name, int(pid))
        for ids, name, pid in re.findall(
            r"dask\.batch_started arrivals=(\[[0-9, ]*\]) worker=(\S+) pid=(\d+)", project.log_text()
        )
    ]


def test_a_worker_killed_mid_study_loses_nothing(tmp_path: Path) -> None:
    """kill -9 of the worker process running a study: Dask runs the task again on a worker, and
    every study ends with exactly one JSON, recorded once."""
    project = _dask_project(tmp_path / "k", DELAY_STEPS)
    zips = _inputs(tmp_path / "zips", 3)
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips[:1])
        wait_for(lambda: _started(project), 60, "a worker to start the study")
        ((_, name, pid),) = _started(project)
        _drop(project, zips[1:])
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(project.receipts()) == 3, 180, "3 receipts")
        assert proc.poll() is None
    finally:
        _stop(proc)
    receipts = project.receipts()
    assert sorted(r["outcome"] for r in receipts) == ["accepted"] * 3, receipts
    assert len(project.results()) == 3
    runs = [s for s in _started(project) if s[0] == [1]]
    assert len(runs) == 2 and runs[1][2] != pid, runs  # ran again, in another process
    log = project.log_text()
    assert log.count("arrival.done arrival=1 ") == 1, log[-4000:]
    with sqlite3.connect(project.root / "state" / "ctwatch.db") as db:
        (crashes,) = db.execute("select crashes from arrivals where id = 1").fetchone()
    assert crashes == 0  # a lost worker is not the study's fault once it finished elsewhere


def test_a_poison_study_that_kills_its_workers_is_set_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study that makes every worker running it exit (``os._exit(137)`` at ``study.started``) is
    quarantined "crashed 2 Dask workers" after allowed_failures: 1; its neighbours are done and
    charged nothing, though one worker runs them all (a batch queued on a worker that dies would be
    counted against by Dask: the executor hands a worker one batch at a time)."""
    project = _dask_project(tmp_path / "p", STEPS, n_workers=1, allowed_failures=1)
    zips = _inputs(tmp_path / "zips", 3)
    zips[1] = zips[1].rename(zips[1].with_name("poison.zip"))
    by_name = _receipts_under_a_fault(project, zips, "study.started~poison", monkeypatch)
    assert by_name["poison.zip"]["outcome"] == "rejected", by_name["poison.zip"]
    assert "crashed 2 Dask workers" in json.dumps(by_name["poison.zip"])
    assert {by_name[f"chest{i}.zip"]["outcome"] for i in (0, 2)} == {"accepted"}
    assert len(project.results()) == 2
    assert list(project.inbox.rglob("quarantine/poison.zip"))
    with sqlite3.connect(project.root / "state" / "ctwatch.db") as db:
        charged = dict(db.execute("select name, crashes + isolate from arrivals").fetchall())
    assert charged["chest0.zip"] == charged["chest2.zip"] == 0, charged


def test_kill_9_of_the_daemon_with_tasks_in_flight(tmp_path: Path) -> None:
    """kill -9 of the coordinator while its workers run studies: no worker outlives it, and after a
    restart every study ends exactly once."""
    project = _dask_project(tmp_path / "d", DELAY_STEPS)
    zips = _inputs(tmp_path / "zips", 3)
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips)
        wait_for(lambda: len(_started(project)) >= 2, 60, "two studies on workers")
        pids = {pid for _, _, pid in _started(project)}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        wait_for(lambda: not any(_alive(pid) for pid in pids), 60, "the workers to end with the daemon")
        assert not project.receipts() or len(project.receipts()) < 3
        proc = project.start()
        wait_for(lambda: len(project.receipts()) == 3, 180, "3 receipts after the restart")
    finally:
        if proc.poll() is None:
            _stop(proc)
    assert sorted(r["outcome"] for r in project.receipts()) == ["accepted"] * 3
    assert len(project.results()) == 3
    for aid in (1, 2, 3):
        assert project.log_text().count(f"arrival.done arrival={aid} ") == 1


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[-1].startswith("Z"))


def test_a_stuck_study_has_its_worker_restarted_and_charges_no_one_else(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study that never ends on its worker (``study.started~hang!hang``): past 3 ×
    limits.max_seconds_per_arrival its worker is restarted (a running task cannot be cancelled) and
    it is charged a crash; at limits.max_attempts it is quarantined. The studies behind it, on the
    same single worker, are done and charged nothing."""
    project = _dask_project(
        tmp_path / "h", STEPS, n_workers=1, limits={"max_seconds_per_arrival": 2, "max_attempts": 2}
    )
    zips = _inputs(tmp_path / "zips", 3)
    zips[0] = zips[0].rename(zips[0].with_name("hang.zip"))
    by_name = _receipts_under_a_fault(project, zips, "study.started~hang!hang", monkeypatch)
    assert by_name["hang.zip"]["outcome"] == "rejected", by_name["hang.zip"]
    assert "ran past 6 s on a Dask worker" in json.dumps(by_name["hang.zip"])
    assert {by_name[f"chest{i}.zip"]["outcome"] for i in (1, 2)} == {"accepted"}
    with sqlite3.connect(project.root / "state" / "ctwatch.db") as db:
        charged = dict(db.execute("select name, crashes + isolate from arrivals").fetchall())
    assert charged["chest1.zip"] == charged["chest2.zip"] == 0, charged
    assert project.log_text().count("dask.task_stuck") == 2


def _receipts_under_a_fault(
    project: Project, zips: list[Path], rule: str, monkeypatch: pytest.MonkeyPatch
) -> dict[str, dict]:
    """Run the daemon (its workers inherit ``CTWATCH_FAULT=rule``) until every ZIP has a receipt;
    the receipts by input name. The daemon must outlive what the rule does to its workers."""
    monkeypatch.setenv(ENV, rule)
    proc = project.start()
    monkeypatch.delenv(ENV)
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips)
        wait_for(lambda: len(project.receipts()) == len(zips), 180, f"{len(zips)} receipts")
        assert proc.poll() is None, "the daemon died with its workers"
    finally:
        _stop(proc)
    return {r["name"]: r for r in project.receipts()}
