"""The CPU worker pool (issue 18): the CPU stage in processes of its own, results identical to the
in-process path, a pool process's death charged to its study alone, logs and stop passed through.

Real daemons (``python run.py``) on real ZIPs of real DICOM; a pool process is killed with the
named fault point ``study.started`` (``os._exit(137)``, what the OOM killer leaves) for one poison
input, and by ``kill -9`` of its PID.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from processor.faults import ENV
from tests.conftest import REPO, Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_ctclip_steps import INTERCEPT, PIXEL_SPACING, SLICE_STEP, _install_small_weights, _stored
from tests.test_model_major import STEPS as MODEL_MAJOR_STEPS
from tests.test_model_major import without_report_timing

STEPS = yaml.safe_load((REPO / "pipelines" / "chest-ct.yaml").read_text())["steps"]  # weight-free here
CLIP_STEPS = [
    *STEPS[:4],
    *MODEL_MAJOR_STEPS[3:],
]  # series, volume, lungs, slices; small clip, lipro; decision
TIMING = {"time_of_processing", "finished_at", "source"}


def _inputs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_zip(folder / f"chest{i}.zip", make_series(30, study_uid=f"1.2.826.0.1.3680043.10.543.{i + 1}"))
        for i in range(n)
    ]


def _project(root: Path, cpu_workers: int, steps: list[dict] = STEPS, **overrides: object) -> Project:
    worker = {"cpu_workers": cpu_workers, "max_inflight_studies": 2}
    root.mkdir(parents=True)
    return Project(root, steps, worker=worker, reports={"enabled": False}, **overrides)


def _drop(project: Project, zips: list[Path]) -> None:
    for z in zips:
        data = z.read_bytes()
        (project.inbox / z.name).write_bytes(data)


def _comparable(path: Path, root: Path) -> dict:
    doc = json.loads(path.read_text().replace(str(root), "<root>"))
    for key in TIMING:
        doc.pop(key, None)
    doc["steps"] = [{k: v for k, v in step.items() if k != "seconds"} for step in doc["steps"]]
    return without_report_timing(doc)


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def _status(project: Project) -> tuple[dict, str]:
    """The daemon's /status document and /metrics text, over real HTTP on 127.0.0.1."""
    port = re.findall(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text())[-1]
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/status", timeout=10) as r:
        status = json.loads(r.read())
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    with urllib.request.urlopen(f"{base}/", timeout=10) as r:
        return status, metrics + r.read().decode()  # the status page's words too


def _results_of(project: Project, zips: list[Path]) -> tuple[dict[str, dict], dict, str, int]:
    """Start the daemon, drop ``zips``, wait for a result each: the results by file name
    (:func:`_comparable`), the /status document, the /metrics text with the page's words, and the
    daemon's PID."""
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips)
        wait_for(lambda: len(project.results()) == len(zips), 180, f"{len(zips)} results")
        status, metrics = _status(project)
    finally:
        _stop(proc)
    return {p.name: _comparable(p, project.root) for p in project.results()}, status, metrics, proc.pid


def _pool_pids(project: Project) -> list[int]:
    return [int(m) for m in re.findall(r"cpu_pool\.process_started slot=\d+ pid=(\d+)", project.log_text())]


def test_pool_gives_the_in_process_results_and_runs_in_other_processes(tmp_path: Path) -> None:
    """The chest-CT pipeline with small CT-CLIP models: the CPU steps and CT-CLIP's preprocessing
    run in pool processes (the preprocessed tensor crosses back), the models here; every result
    equals the in-process path's."""
    zips = _inputs(tmp_path / "zips", 3)
    zips.append(
        write_zip(
            tmp_path / "zips" / "clip.zip",
            make_series(
                24,
                stored=_stored(1),
                pixel_spacing=PIXEL_SPACING,
                spacing=SLICE_STEP,
                intercept=INTERCEPT,
                study_uid="1.2.826.0.1.3680043.10.543.50",
            ),
        )
    )
    runs = {}
    for workers in (2, 0):
        project = _project(tmp_path / f"w{workers}", workers, steps=CLIP_STEPS)
        _install_small_weights(project.root)
        runs[workers], status, metrics, daemon_pid = _results_of(project, zips)
        log = project.log_text()
        if workers:
            pids = _pool_pids(project)
            assert len(pids) == 2 and daemon_pid not in pids, log[-3000:]
            assert "cpu_workers=2" in log
            pool = status["worker"]["cpu_processes"]
            assert [p["alive"] for p in pool] == [True, True] and sum(p["batches"] for p in pool) == 4
            assert (
                "ctwatch_cpu_processes_alive 2" in metrics and "ctwatch_cpu_process_deaths_total 0" in metrics
            )
            assert "<td>CPU stage</td><td>2 of 2 pool processes running, 4 batches prepared</td>" in metrics
            # the pool processes' log records reach the daemon's log (arrival.start is logged there)
            assert log.count("arrival.start ") == 4, log[-3000:]
            assert "ctclip.preprocessed step=clip target_xyz=32x32x24 stage=cpu" in log
        else:
            assert not _pool_pids(project) and "cpu_workers=0" in log
            assert "<td>CPU stage</td><td>in the daemon (worker.cpu_workers: 0)</td>" in metrics
    assert runs[2].keys() == runs[0].keys() and len(runs[2]) == 4
    for name in runs[2]:
        assert runs[2][name] == runs[0][name], name
    clip = runs[2]["1.2.826.0.1.3680043.10.543.50.json"]["models"]
    assert len(clip["clip"]["probabilities"]) == 18 and clip["lipro"]["probabilities"]
    # the previews the CPU steps wrote in the pool processes are there, as in-process
    assert sorted(p.relative_to(tmp_path / "w2") for p in (tmp_path / "w2" / "outbox").rglob("*.png"))


def test_a_pool_process_that_dies_is_charged_to_its_study_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A poison input kills its pool process each time (limits.max_attempts: 2); the daemon lives,
    the poison input is quarantined "crashed the worker 2 times", its neighbours are done."""
    project = _project(tmp_path / "p", 1, limits={"max_attempts": 2})
    zips = _inputs(tmp_path / "zips", 3)
    zips[1] = zips[1].rename(zips[1].with_name("poison.zip"))
    monkeypatch.setenv(ENV, "study.started~poison")
    proc = project.start()
    monkeypatch.delenv(ENV)
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        _drop(project, zips)
        wait_for(lambda: len(project.results()) == 2 and len(project.receipts()) == 3, 120, "3 receipts")
        assert proc.poll() is None, "the daemon died with its pool process"
    finally:
        _stop(proc)
    by_name = {r["name"]: r for r in project.receipts()}
    assert by_name["poison.zip"]["outcome"] == "rejected", by_name["poison.zip"]
    assert "crashed the worker 2 times" in json.dumps(by_name["poison.zip"])
    assert {by_name[f"chest{i}.zip"]["outcome"] for i in (0, 2)} == {"accepted"}
    assert list(project.inbox.rglob("quarantine/poison.zip"))
    log = project.log_text()
    assert log.count("cpu_pool.process_died") == 2, log[-4000:]
    assert "killed by signal" in log or "exit code 137" in log
    pids = set(_pool_pids(project))  # started at start, then again when work came after a death
    assert len(pids) >= 2 and proc.pid not in pids


def test_kill_9_of_a_pool_process_mid_study_loses_nothing(tmp_path: Path) -> None:
    """kill -9 of the pool process while it prepares: the study goes back, runs again, ends once."""
    project = _project(tmp_path / "k", 1)
    zips = [write_zip(tmp_path / "big.zip", make_series(400, study_uid="1.2.826.0.1.3680043.10.543.99"))]
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        pid = _pool_pids(project)[0]
        _drop(project, zips)
        wait_for(lambda: "arrival.start " in project.log_text(), 60, "the pool to start on it")
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(project.receipts()) == 1, 120, "its receipt")
        assert proc.poll() is None
    finally:
        _stop(proc)
    log = project.log_text()
    (receipt,) = project.receipts()
    if "cpu_pool.process_died" in log:  # killed in time: charged one crash, then done
        assert "killed by signal SIGKILL" in log
        assert log.count("arrival.start ") == 2
    assert receipt["outcome"] == "accepted", receipt
    assert len(project.results()) == 1


def test_pool_processes_end_with_a_killed_daemon(tmp_path: Path) -> None:
    """kill -9 of the daemon: its pool processes exit at once (nothing of a dead daemon's runs on
    beside the next one's work)."""
    project = _project(tmp_path / "d", 2)
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        pids = _pool_pids(project)
        assert len(pids) == 2 and all(Path(f"/proc/{pid}").exists() for pid in pids)
    finally:
        proc.kill()
        proc.wait(30)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), 15, "the pool processes to exit")


def _health(project: Project) -> tuple[int, dict]:
    port = re.findall(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text())[-1]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _arrival(project: Project, name: str) -> dict:
    with sqlite3.connect(f"file:{project.state_path}?mode=ro", uri=True) as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("select * from arrivals where name = ?", [name]).fetchone())


def test_a_pool_process_started_again_runs_the_daemons_pipeline_and_charges_no_one(tmp_path: Path) -> None:
    """A pool process killed while idle is started again for the next input, which is charged
    nothing, and compiles the pipeline the daemon runs, not the file edited since. One that cannot
    be started again (the weights manifest half edited) leaves the input waiting, uncharged, with
    the reason on /health, and it runs once the cause is gone."""
    project = _project(tmp_path / "r", 1)
    first, second = _inputs(tmp_path / "zips", 2)
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        project.write_pipeline(STEPS[:1], version=2)  # edited for the next start
        os.kill(_pool_pids(project)[0], signal.SIGKILL)
        wait_for(lambda: not _status(project)[0]["worker"]["cpu_processes"][0]["alive"], 10, "it seen dead")
        _drop(project, [first])
        wait_for(lambda: len(project.receipts()) == 1, 60, "the first receipt")
        assert "while idle, no arrival in it" in project.log_text()
        assert {k: _arrival(project, first.name)[k] for k in ("state", "crashes")} == {
            "state": "done",
            "crashes": 0,
        }
        (result,) = project.results()
        doc = json.loads(result.read_text())
        assert doc["pipeline"]["version"] == 1 and [s["step_id"] for s in doc["steps"]][:4] == [
            "series",
            "volume",
            "lungs",
            "slices",
        ]

        (project.root / "weights").mkdir(exist_ok=True)
        manifest = project.root / "weights" / "manifest.yaml"
        manifest.write_text("files: [unclosed\n")
        os.kill(_pool_pids(project)[-1], signal.SIGKILL)
        _drop(project, [second])
        code, health = wait_for(lambda: (h := _health(project))[0] == 503 and h, 60, "/health to say why")
        assert any("could not be started again" in r for r in health["reasons"]), health
        assert {k: _arrival(project, second.name)[k] for k in ("state", "attempts", "crashes")} == {
            "state": "pending",
            "attempts": 0,
            "crashes": 0,
        }
        manifest.unlink()
        wait_for(lambda: len(project.receipts()) == 2, 90, "the second receipt")
        assert proc.poll() is None
    finally:
        _stop(proc)
    assert {r["outcome"] for r in project.receipts()} == {"accepted"}
    assert _arrival(project, second.name)["crashes"] == 0


def test_a_pool_process_killed_inside_its_stop_check_leaves_no_lock_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pool process checks the stop request at every chunk read. With a multiprocessing.Event
    there, ``kill -9`` while reading took the event's lock with it now and then (seen in 1 of ~6
    runs of the kill -9 test above): the daemon's next batch and its stop then waited on it forever.
    Here the process dies holding the lock of the stop request, if it has one: the next batch runs,
    the new process's log records arrive, and the pool still closes."""
    from processor.config import load_settings
    from processor.cpupool import CpuPool
    from processor.daemon import build, cpu_stage_executor

    project = _project(tmp_path / "e", 1)
    (zipped,) = _inputs(tmp_path / "zips", 1)
    _drop(project, [zipped])
    c = build(load_settings(project.config))
    arrival_id = c.intake.accept(project.inbox / zipped.name)
    assert arrival_id is not None
    arrival = c.state.claim(arrival_id)
    caplog.set_level(logging.INFO)  # the level pool processes log at
    pool = CpuPool(c.settings, c.executor(), 1, device="cpu", build=cpu_stage_executor)
    pool.start()
    try:
        slot = pool._slots[0]
        dead = slot.pid
        lock = getattr(slot.stop, "_cond", None)  # a multiprocessing.Event's; a shared flag has none
        assert dead is not None and (lock is None or lock.acquire(timeout=5))  # as if the process held it
        os.kill(dead, signal.SIGKILL)
        wait_for(lambda: not pool.processes()[0]["alive"], 10, "the process seen dead")
        caplog.clear()
        done: list[object] = []
        worker = threading.Thread(target=lambda: done.append(pool.prepare([arrival], lambda: False)))
        worker.start()
        worker.join(60)
        assert done, "the next batch waited on the dead process's lock"
        (prepared,) = done
        assert [run.ctx.study.uid for run in prepared.runs] == ["1.2.826.0.1.3680043.10.543.1"]  # type: ignore[attr-defined]
        pool_records = [r.getMessage() for r in caplog.records if r.processName == "cpu-pool"]
        assert any(m.startswith("arrival.start ") for m in pool_records), caplog.text
        assert pool.processes()[0]["alive"] and pool.processes()[0]["pid"] != dead
    finally:
        closer = threading.Thread(target=pool.close)
        closer.start()
        closer.join(30)
        c.state.close()
    assert not closer.is_alive(), "the pool did not close"


def test_a_stuck_pool_process_is_killed_and_its_batch_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A call still running past its limit (a decoder stuck in native code: no check inside the
    process can stop it) has its process killed; the death is charged as any other, and the next
    call gets a fresh process."""
    import time

    from processor.config import load_settings
    from processor.cpupool import CpuPool, PoolProcessDied
    from processor.daemon import build, cpu_stage_executor

    project = _project(tmp_path / "s", 1)
    c = build(load_settings(project.config))
    pool = CpuPool(c.settings, c.executor(), 1, device="cpu", build=cpu_stage_executor)
    pool.start()
    try:
        slot = pool._slots[0]
        stuck = slot.pid
        started = time.monotonic()
        with pytest.raises(PoolProcessDied, match="killed by signal SIGKILL"):
            slot.call(lambda: False, time.sleep, 3600, limit=1.0)
        assert time.monotonic() - started < 30
        assert f"cpu_pool.process_stuck slot=0 pid={stuck}" in caplog.text
        assert stuck is not None and not Path(f"/proc/{stuck}").exists()
        assert pool.processes()[0]["deaths"] == 1
        slot.start()
        assert slot.call(lambda: False, os.getpid, limit=30) not in (stuck, os.getpid())
    finally:
        pool.close()
        c.state.close()


def test_unset_cpu_workers_keep_a_core_for_the_models_only_when_a_model_can_run(tmp_path: Path) -> None:
    from processor.config import load_settings, usable_cores
    from processor.daemon import build, models_can_run
    from processor.pipeline.weightfiles import weight_files_now

    project = Project(tmp_path, worker={"max_inflight_studies": 16})
    shutil.copy(REPO / "pipelines" / "chest-ct.yaml", project.pipeline)
    settings = load_settings(project.config)
    worker = settings.worker.model_copy(update={"cpu_workers": None})
    components = build(settings)
    try:
        pipeline = components.pipeline
        assert not models_can_run(pipeline), "a fresh install has no model file"
        assert worker.cpu_processes(models_can_run=False) == usable_cores()
        assert worker.cpu_processes(models_can_run=True) == max(1, usable_cores() - 1)
        assert worker.model_copy(update={"cpu_workers": 0}).cpu_processes(False) == 0, "0 stays off"
        model = next(c.step for c in pipeline.steps if c.step.device == "gpu")
        for path in weight_files_now(model).missing:  # one model's files arrive: now it can run
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        assert models_can_run(pipeline)
    finally:
        components.state.close()
