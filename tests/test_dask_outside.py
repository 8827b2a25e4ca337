"""The Dask executor on an outside scheduler (issue 19): ``dask scheduler`` as its own process,
workers started by ``python run.py worker`` and by ``dask worker --preload processor.dask_preload``,
and a daemon with ``executor: {dask: {scheduler: tcp://…}}`` — real processes on 127.0.0.1, real
ZIPs of real DICOM, every process stopped by its PID."""

from __future__ import annotations

import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client

from tests.conftest import REPO, Project, _env, wait_for
from tests.test_cpu_pool import STEPS, _drop, _health, _inputs, _stop

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+ ")


class Children:
    """Child processes with their logs; each stopped by its PID at the end (SIGTERM, then SIGKILL)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], **env: str) -> subprocess.Popen[bytes]:
        with (self.folder / f"{name}.log").open("ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**_env(), **env})
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    kids = Children(tmp_path)
    try:
        yield kids
    finally:
        kids.stop_all()


def _scheduler(children: Children, **env: str) -> str:
    """A ``dask scheduler`` on a free loopback port; its address."""
    children.start(
        "scheduler",
        [
            sys.executable,
            "-m",
            "dask",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--dashboard-address",
            "127.0.0.1:0",
        ],
        **env,
    )
    found = wait_for(
        lambda: re.search(r"Scheduler at:\s+(tcp://127\.0\.0\.1:\d+)", children.log("scheduler")),
        60,
        "the Dask scheduler to listen",
    )
    assert isinstance(found, re.Match)
    return found.group(1)


def _done_by(project: Project) -> list[str]:
    return re.findall(r"dask\.done arrivals=\S+ worker=(\S+)", project.log_text())


PLAIN_WORKER = ["--resources", "GPU=1", "--nthreads", "1", "--memory-limit", "0", "--no-dashboard"]


def test_outside_scheduler_with_run_py_worker_then_dask_worker_preload(
    tmp_path: Path, children: Children
) -> None:
    """Two studies run on a ``python run.py worker`` (pipeline and models on the worker, results
    recorded by the daemon). SIGTERM while a task runs there drains the worker: that task finishes
    on it, the one queued behind it goes back uncharged (the worker is retired, not lost), exit 0.
    A plain ``dask worker --preload processor.dask_preload`` then takes the handed-back task and the
    third study, and runs no earlier batch again."""
    # No lost worker allowed: a drain that Dask took for a lost worker fails the queued task.
    address = _scheduler(children, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    (tmp_path / "daemon").mkdir()
    project = Project(
        tmp_path / "daemon",
        STEPS,
        executor={"dask": {"scheduler": address}},
        worker={"cpu_workers": 0},
        reports={"enabled": False},
    )
    zips = _inputs(tmp_path / "zips", 3)

    def _hold(gate: str, began: str) -> str:
        """A Dask task, not ctwatch's, that runs until ``gate`` exists; its worker's name. Nested:
        it travels by value, so a worker imports no test module for it."""
        from pathlib import Path
        from time import sleep

        from distributed import get_worker

        Path(began).touch()
        while not Path(gate).exists():
            sleep(0.05)
        return str(get_worker().name)

    gate, began = str(tmp_path / "gate"), str(tmp_path / "began")
    ctwatch_worker = [sys.executable, str(REPO / "run.py"), "worker", "--scheduler", address]
    worker = children.start(
        "worker", [*ctwatch_worker, "--config", str(project.config), "--name", "outside-1"]
    )
    wait_for(lambda: "worker.started name=outside-1" in children.log("worker"), 90, "the ctwatch worker")
    daemon = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips[:2])
        wait_for(lambda: len(project.results()) == 2, 120, "2 results")
        wait_for(lambda: len(_done_by(project)) == 2, 30, "2 dask.done lines")
        assert _done_by(project) == ["outside-1", "outside-1"]

        with Client(address, set_as_default=False) as client:
            held = client.submit(_hold, gate, began, resources={"GPU": 1}, pure=False)
            wait_for(Path(began).exists, 60, "the held task to start")
            queued = client.submit(_hold, gate, began, resources={"GPU": 1}, pure=False)
            wait_for(lambda: sum(map(len, client.processing().values())) == 2, 30, "both tasks on the worker")
            worker.send_signal(signal.SIGTERM)
            wait_for(
                lambda: "worker.draining name=outside-1 running=1" in children.log("worker"), 30, "drain"
            )
            assert worker.poll() is None  # still finishing the task it runs
            Path(gate).touch()
            assert held.result(timeout=60) == "outside-1"
            held.release()
            assert worker.wait(60) == 0
            log = children.log("worker")
            assert (
                "worker.drained name=outside-1 handed_back_running=0 handed_back_queued=1 retired=True" in log
            )
            assert "worker.plugin_ready name=outside-1 device=cpu" in log
            ours = [line for line in log.splitlines() if "processor." in line and not line.startswith(" ")]
            assert ours and all(LINE.match(line) for line in ours), ours  # the project's log format

            children.start(
                "plain",
                [sys.executable, "-m", "dask", "worker", address, *PLAIN_WORKER, "--name", "plain-1"]
                + ["--preload", "processor.dask_preload"],
                CTWATCH_CONFIG=str(project.config),
            )
            assert queued.result(timeout=90) == "plain-1"  # handed back by the drain, run once more
        assert "worker.plugin_ready name=plain-1 device=cpu" in children.log("plain")
        _drop(project, zips[2:])
        wait_for(lambda: len(project.results()) == 3, 120, "the third result")
        wait_for(lambda: len(_done_by(project)) == 3, 30, "3 dask.done lines")
        assert _done_by(project)[2] == "plain-1"
        assert children.log("plain").count("series.chosen") == 1  # no batch of the first worker again
    finally:
        _stop(daemon)
    assert "Traceback" not in project.log_text()


@pytest.mark.parametrize(
    ("device", "command"),
    [
        ("cuda", ["run.py", "worker", "--scheduler", "tcp://127.0.0.1:9"]),
        ("cpu", ["run.py", "worker", "--scheduler", "tcp://127.0.0.1:9", "--gpu", "0"]),
        ("cuda", ["-m", "dask", "worker", "tcp://127.0.0.1:9", "--no-nanny", *PLAIN_WORKER]),
    ],
    ids=["device-cuda", "gpu-flag", "dask-worker-preload"],
)
def test_worker_asked_for_cuda_without_cuda_exits_with_the_reason(
    tmp_path: Path, device: str, command: list[str]
) -> None:
    """``device: cuda`` (or ``--gpu 0``) on a machine without CUDA: the worker exits 2 with the
    reason and the fix before it joins a scheduler — never a silent CPU worker, nor (under ``dask
    worker --preload``, where Dask would go on after a failed preload) a worker without its plugin."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    project = Project(tmp_path, device=device)
    if command[0] == "run.py":
        command = [str(REPO / "run.py"), *command[1:], "--config", str(project.config)]
    else:
        command = [*command, "--preload", "processor.dask_preload"]
    env = {**_env(), "CTWATCH_CONFIG": str(project.config)}
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stderr
    assert "CUDA is not available on this machine" in done.stderr
    assert "Hint: set device to cpu" in done.stderr
    assert "Registered to" not in done.stderr  # it never joined


def test_a_scheduler_down_at_start_and_lost_mid_run_charges_nothing(
    tmp_path: Path, children: Children
) -> None:
    """The daemon starts while its scheduler is down: it runs, /health says why nothing is
    processed, and nothing is charged. Once a scheduler and a worker are up the studies run; the
    scheduler killed (-9) mid-study and started again on the same port: the daemon connects again
    and every study ends once, accepted, with no attempt recorded as failed and no crash charged."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    (tmp_path / "daemon").mkdir()
    steps = [*STEPS[:2], {"id": "hold", "uses": "util.delay", "with": {"seconds": 3}}, *STEPS[2:]]
    project = Project(
        tmp_path / "daemon",
        steps,
        executor={"dask": {"scheduler": address, "connect_seconds": 3}},
        worker={"cpu_workers": 0},
        reports={"enabled": False},
    )
    scheduler = [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port)]
    scheduler += ["--no-dashboard"]
    worker = [
        sys.executable,
        str(REPO / "run.py"),
        "worker",
        "--scheduler",
        address,
        "--config",
        str(project.config),
    ]
    daemon = project.start()
    try:
        wait_for(
            lambda: "daemon.started" in project.log_text(), 90, "the daemon to start without its scheduler"
        )
        _drop(project, _inputs(tmp_path / "zips", 3))
        code, health = wait_for(lambda: (h := _health(project))[0] == 503 and h, 60, "/health to say why")
        assert "cannot be reached" in json.dumps(health), health
        assert _charged(project) == {}, "nothing is charged while the scheduler is down"

        first = children.start("scheduler", scheduler)
        wait_for(lambda: "Scheduler at:" in children.log("scheduler"), 60, "the scheduler")
        children.start("worker", [*worker, "--name", "w1"])
        wait_for(lambda: "dask.batch_started" in project.log_text(), 120, "a study on the worker")
        first.kill()
        first.wait(30)
        wait_for(lambda: "cannot be reached" in json.dumps(_health(project)[1]), 60, "/health to say why")
        children.start("scheduler2", scheduler)
        wait_for(lambda: "Scheduler at:" in children.log("scheduler2"), 60, "the scheduler again")
        children.start("worker2", [*worker, "--name", "w2"])
        wait_for(lambda: len(project.receipts()) == 3, 180, "3 receipts")
        assert _health(project)[0] == 200
    finally:
        _stop(daemon)
    assert sorted(r["outcome"] for r in project.receipts()) == ["accepted"] * 3
    assert len(project.results()) == 3
    log = project.log_text()
    for aid in (1, 2, 3):
        assert log.count(f"arrival.done arrival={aid} ") == 1, log[-4000:]
    assert "arrival.failed" not in log and "finish_crashed" not in log
    assert _charged(project) == {}


def _charged(project: Project) -> dict[str, int]:
    """Arrivals charged a crash, or ended failed: name → crashes."""
    with sqlite3.connect(f"file:{project.state_path}?mode=ro", uri=True) as db:
        rows = db.execute("select name, crashes, state from arrivals").fetchall()
    return {name: crashes for name, crashes, state in rows if crashes or state == "failed"}
