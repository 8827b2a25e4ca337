"""The Dask executor (issue 19): the pipeline on Dask distributed workers, the daemon still the
only writer — real daemons (``python run.py``) with a real LocalCluster of worker processes, real
ZIPs of real DICOM, workers killed by PID and by a poison input (the named fault point
``study.started``: ``os._exit(137)``)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Project, wait_for
from tests.test_cpu_pool import CLIP_STEPS, _comparable, _drop, _inputs, _status, _stop
from tests.test_ctclip_steps import _install_small_weights


def _dask_project(root: Path, steps: list[dict] = CLIP_STEPS, n_workers: int = 2, **dask: object) -> Project:
    root.mkdir(parents=True)
    executor = {"dask": {"local": {"n_workers": n_workers}, **dask}}
    return Project(
        root,
        steps,
        worker={"cpu_workers": 0, "max_inflight_studies": 2},
        reports={"enabled": False},
        executor=executor,
    )


def test_dask_results_equal_the_local_executor(tmp_path: Path) -> None:
    """10 studies on a LocalCluster of 2 worker processes (abstract GPU=1 each): 10 results equal to
    the local executor's, each model loaded once per worker, not per study."""
    zips = _inputs(tmp_path / "zips", 4)
    runs = {}
    for kind in ("dask", "local"):
        if kind == "dask":
            project = _dask_project(tmp_path / kind)
        else:
            (tmp_path / kind).mkdir()
            project = Project(tmp_path / kind, CLIP_STEPS, reports={"enabled": False})
        _install_small_weights(project.root)
        proc = project.start()
        try:
            wait_for(lambda p=project: "daemon.started" in p.log_text(), 90, "the daemon to start")
            _drop(project, zips)
            wait_for(lambda p=project: len(p.results()) == 4, 180, "4 results")
            status, metrics = _status(project)
        finally:
            _stop(proc)
        runs[kind] = {p.name: _comparable(p, project.root) for p in project.results()}
        print(project.log_text()[-3000:])
    assert runs["dask"] == runs["local"]
