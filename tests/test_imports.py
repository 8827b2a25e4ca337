"""Import only what runs (issue 18, item 2, in part): a fresh install's `process` — the shipped
chest-CT pipeline with no model file present, on the CPU — never imports torch, transformers or
diffusers. Checking the pipeline, listing each step's model files and recording the skips read
file names and small configs only; a model library is imported when a model is loaded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import REPO, Project, _env
from tests.dicomgen import make_series, write_zip

MODEL_LIBRARIES = ("torch", "transformers", "diffusers")

PROBE = f"""
import json, sys
from processor.cli import main
code = main(["process", sys.argv[1], "--config", sys.argv[2]])
print(json.dumps({{"code": code, "loaded": [m for m in {MODEL_LIBRARIES!r} if m in sys.modules]}}))
"""


def test_process_on_a_fresh_install_imports_no_model_library(project: Project) -> None:
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
