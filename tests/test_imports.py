"""Import only what runs (issue 18, item 2): a fresh install's `process` — the shipped chest-CT
pipeline with no model file present, on the CPU — and the daemon with its CPU pool, from its start
through a study and the Excel workbooks, never import torch, transformers, diffusers, pandas or SciPy
(the lung and body masks label with connected-components-3d: :mod:`processor.dicom.components`);
`process` imports neither httpx (the URL allow-list lives apart from it) nor asyncio; pydicom is
imported without requests (:mod:`processor.lean`). Checking the
pipeline, listing each step's model files and recording the skips read file names and small
configs only; a model library is imported when a model is loaded. pandas is for the ``fit``
commands: sqlite-utils is imported without it (:mod:`processor.state.sqlitelib`) and the
workbooks are written with openpyxl."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import openpyxl
import pytest

from processor.models.gpu_nodes import gpu_device_nodes
from tests.conftest import REPO, Project, _env
from tests.dicomgen import make_series, write_zip

NOT_AT_RUN_TIME = ("torch", "transformers", "diffusers", "pandas", "scipy", "requests")
# and `process` of a file fetches nothing and starts no Dask worker
NOT_IN_PROCESS = (*NOT_AT_RUN_TIME, "httpx", "asyncio")

PROBE = f"""
import json, sys
from processor.cli import main
code = main(["process", sys.argv[1], "--config", sys.argv[2]])
print(json.dumps({{"code": code, "loaded": [m for m in {NOT_IN_PROCESS!r} if m in sys.modules]}}))
"""

# The daemon as `python run.py` starts it; a watcher thread waits until the rolling workbook
# holds the dropped study, notes what was imported — in the daemon, and in its CPU pool's
# processes the shared libraries of pandas, torch and SciPy that an import maps (Linux) — then stops
# the daemon as a service manager does (SIGTERM).
DAEMON_PROBE = f"""
import json, multiprocessing, os, re, signal, sys, threading, time
from pathlib import Path
import openpyxl
from processor.cli import main

def mapped(pid):
    maps = Path(f"/proc/{{pid}}/maps")
    text = maps.read_text() if maps.exists() else ""
    return sorted({{m.group(1) for m in re.finditer(r"/(pandas|torch|scipy)/\\S*\\.so", text)}})

def watch():
    latest, deadline = Path("outbox/reports/ctwatch-latest.xlsx"), time.monotonic() + 90
    while time.monotonic() < deadline:
        if latest.exists() and openpyxl.load_workbook(latest, read_only=True)["Studies"].max_row >= 2:
            break
        time.sleep(0.2)
    pool = {{p.pid: mapped(p.pid) for p in multiprocessing.active_children()}}
    loaded = [m for m in {NOT_AT_RUN_TIME!r} if m in sys.modules]
    Path("loaded.json").write_text(json.dumps({{"daemon": loaded, "pool": pool}}))
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=watch, daemon=True).start()
sys.exit(main(["run", "--config", sys.argv[1]]))
"""


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_process_on_a_fresh_install_imports_no_model_library(tmp_path: Path, device: str) -> None:
    # ``auto`` is the shipped default; with no GPU driver on the machine torch could only say "cpu"
    if device == "auto" and gpu_device_nodes():
        pytest.skip(f"this machine has GPU driver nodes {gpu_device_nodes()}: auto must ask torch")
    project = Project(tmp_path, device=device)
    shutil.copy(REPO / "pipelines" / "chest-ct.yaml", project.pipeline)
    drop = write_zip(project.root / "drop.zip", make_series(20))
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(drop), str(project.config)],
        cwd=project.root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    (result,) = project.results()
    steps = {s["step_id"]: s["status"] for s in json.loads(result.read_text())["steps"]}
    assert steps["clip"] == steps["anomaly"] == steps["head"] == "skipped", "the model steps were checked"
    assert outcome["code"] == 0 and outcome["loaded"] == [], outcome


def test_the_daemon_through_a_study_and_its_workbooks_imports_no_model_library_nor_pandas(
    tmp_path,
) -> None:
    # the CPU stage in a pool process, as the daemon runs by default (the suite's daemons use none)
    project = Project(tmp_path, reports={"debounce_seconds": 0}, worker={"cpu_workers": 1})
    shutil.copy(REPO / "pipelines" / "chest-ct.yaml", project.pipeline)
    write_zip(project.inbox / "drop.zip", make_series(20))
    run = subprocess.run(
        [sys.executable, "-c", DAEMON_PROBE, str(project.config)],
        cwd=project.root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    workbook = openpyxl.load_workbook(project.outbox / "reports" / "ctwatch-latest.xlsx")
    studies = workbook["Studies"]
    header = [c.value for c in studies[1]]
    assert [r[header.index("Source file")] for r in studies.iter_rows(min_row=2, values_only=True)] == [
        "drop.zip"
    ], "the workbook holds the study"
    loaded = json.loads((project.root / "loaded.json").read_text())
    assert len(loaded["pool"]) == 1, "the CPU pool's process was checked"
    assert loaded["daemon"] == [] and not any(loaded["pool"].values()), loaded


def test_gpu_driver_nodes_are_found_under_a_root(tmp_path: Path) -> None:
    assert gpu_device_nodes(str(tmp_path)) == []
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidia0").touch()
    (tmp_path / "dev" / "nvidia-uvm").touch()  # not a card: alone it proves nothing
    assert gpu_device_nodes(str(tmp_path)) == ["/dev/nvidia0"]
    (tmp_path / "dev" / "kfd").touch()
    assert gpu_device_nodes(str(tmp_path)) == ["/dev/kfd", "/dev/nvidia0"]
    # before the driver has made its nodes: a card on the PCI bus is enough to ask torch
    (tmp_path / "dev" / "kfd").unlink()
    (tmp_path / "dev" / "nvidia0").unlink()
    pci = tmp_path / "sys" / "bus" / "pci" / "devices"
    for slot, vendor, kind in (
        ("0000:00:02.0", "0x8086", "0x030000"),
        ("0000:01:00.0", "0x10de", "0x030200"),
    ):
        (pci / slot).mkdir(parents=True)
        (pci / slot / "vendor").write_text(vendor + "\n")
        (pci / slot / "class").write_text(kind + "\n")
    assert gpu_device_nodes(str(tmp_path)) == ["/sys/bus/pci/devices/0000:01:00.0"]  # not Intel's
    (pci / "0000:01:00.0" / "class").write_text("0x020000\n")  # an NVIDIA network card
    assert gpu_device_nodes(str(tmp_path)) == []
