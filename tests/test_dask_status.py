"""The Dask workers on the status port and in ``python run.py status`` (issue 19, "Visibility").

A real daemon (``python run.py``) with a LocalCluster of one worker process runs the weight-free
chest-CT steps on two real ZIPs of real DICOM, each named with the patient's name; ``/status``,
``/metrics`` and the page, read over real HTTP, show the executor and the worker with its done count
— and nothing of the patient. (The local executor's line: tests/test_status_browser.py.) The
reduction of what workers send (models by kind and file, a worker's error never shown) is checked
on rows as :meth:`processor.dask_cluster.DaskCluster.workers` gives them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from processor.config import DaskSettings
from processor.status.cluster import executor_view
from tests.conftest import Project, wait_for
from tests.dicomgen import PATIENT_NAME, make_series, write_zip
from tests.test_cpu_pool import STEPS, _status, _stop

UIDS = ["1.2.826.0.1.3680043.10.543.71", "1.2.826.0.1.3680043.10.543.72"]


def test_dask_workers_shown_with_their_batches(tmp_path: Path) -> None:
    (tmp_path / "site").mkdir()
    project = Project(
        tmp_path / "site",
        STEPS,
        worker={"cpu_workers": 0},
        reports={"enabled": False},
        executor={"dask": {"local": {"n_workers": 1}}},
    )
    names = [f"{PATIENT_NAME} {i}.zip" for i in range(2)]
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        for name, uid in zip(names, UIDS, strict=True):
            write_zip(project.inbox / name, make_series(30, study_uid=uid))
        wait_for(lambda: len(project.receipts()) == 2, 120, "2 receipts")
        # the workers' figures are cached up to 2 s: wait for both batches to be counted
        wait_for(lambda: _status(project)[0]["executor"]["workers"][0]["done"] == 2, 10, "2 batches done")
        status, metrics_and_page = _status(project)
    finally:
        _stop(proc)

    executor = status["executor"]
    assert {k: executor[k] for k in ("kind", "cluster", "words")} == {
        "kind": "dask",
        "cluster": "local",
        "words": "dask (LocalCluster, 1 worker started by this daemon)",
    }
    [worker] = executor["workers"]
    address = worker.pop("address")
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", address), address
    assert worker == {
        "name": "0",
        "ready": True,
        "device": "cpu",
        "in_flight": 0,
        "done": 2,
        "failed": 0,
        "model_loads": 0,
        "models_loaded": [],
    }
    labels = f'worker="0",address="{address}"'
    for line in (
        'ctwatch_executor_info{executor="dask",cluster="local"} 1',
        "ctwatch_dask_workers 1",
        f"ctwatch_dask_worker_ready{{{labels}}} 1",
        f"ctwatch_dask_worker_in_flight{{{labels}}} 0",
        f"ctwatch_dask_worker_done_total{{{labels}}} 2",
        f"ctwatch_dask_worker_model_loads_total{{{labels}}} 0",
    ):
        assert f"\n{line}\n" in metrics_and_page, line
    for row in (
        "<td>CPU stage</td><td>on the Dask workers, with every other step (this daemon reads and plans each input)</td>",
        "<td>executor</td><td>dask (LocalCluster, 1 worker started by this daemon)</td>",
        "<td>Dask workers</td><td>1 connected — 0 (cpu): 2 done, 0 in flight, models: none loaded yet</td>",
        f"<tr><td>0</td><td>{address}</td><td>cpu</td>"
        '<td class="n">0</td><td class="n">2</td><td class="n">0</td><td>none loaded yet</td></tr>',
    ):
        assert row in metrics_and_page, row
    everything = json.dumps(status) + metrics_and_page
    for secret in (PATIENT_NAME, "CompressedSamples", *UIDS):
        assert secret not in everything, secret

    cli = project.run("status")
    assert cli.returncode == 0, cli.stderr
    assert "executor: dask (LocalCluster, 1 worker started by this daemon)" in cli.stdout
    assert "Dask workers: the running daemon lists them" in cli.stdout


def test_worker_rows_keep_only_counts_model_files_and_no_error_text() -> None:
    key = "ctclip:/srv/ctwatch/weights/ct_clip/CT_VocabFine_v2.pt:/srv/ctwatch/weights/ct_clip/vocab.txt:cuda:0:fp16"
    rows = [
        {
            "address": "tcp://10.0.0.7:40001",
            "name": "gpu1",
            "resources": {"GPU": 1},
            "device": "cuda:0",
            "models_loaded": [{"key": key, "loads": 1, "hits": 41, "gpu_bytes": 9, "load_seconds": 3.2}],
            "model_loads": 1,
            "in_flight": 1,
            "done": 41,
            "failed": 0,
            "pid": 4242,
        },
        {
            "address": "tcp://10.0.0.8:40001",
            "name": "gpu0",
            "resources": {"GPU": 1},
            "error": f"Dask worker gpu0 cannot read /mnt/pacs/{PATIENT_NAME}.zip",
        },
    ]
    view = executor_view(DaskSettings(scheduler="tcp://10.0.0.5:8786"), rows)
    assert view["words"] == "dask (scheduler tcp://10.0.0.5:8786)"
    assert [w["name"] for w in view["workers"]] == ["gpu0", "gpu1"]
    assert view["workers"][1]["models_loaded"] == [
        {"model": "ctclip (CT_VocabFine_v2.pt)", "loads": 1, "hits": 41}
    ]
    assert view["workers"][0] == {
        "name": "gpu0",
        "address": "tcp://10.0.0.8:40001",
        "ready": False,
        "device": None,
        "in_flight": None,
        "done": None,
        "failed": None,
        "model_loads": None,
        "models_loaded": [],
    }
    assert view["workers_words"] == (
        "2 connected — gpu0: not ready (it cannot run batches yet: see that worker's log); "
        "gpu1 (cuda:0): 41 done, 1 in flight, models: ctclip (CT_VocabFine_v2.pt)"
    )
    served = json.dumps(view)
    assert PATIENT_NAME not in served and "/srv/" not in served and "4242" not in served
    assert (
        "python run.py worker --scheduler tcp://10.0.0.5:8786"
        in executor_view(DaskSettings(scheduler="tcp://10.0.0.5:8786"), [])["workers_words"]
    )
