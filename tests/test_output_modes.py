"""Outputs are for other accounts on the shared folder too: every file ctwatch writes gets the mode the
umask allows (0644 under umask 022), checked by reading it as another user (``setpriv``)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests import dicomgen
from tests.conftest import REPO, Project, _env

NOBODY = 65534
STEPS = [
    {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
    {"id": "slices", "uses": "render.key_slices"},
]


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder other accounts may enter (pytest's own tmp folders are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="ctwatch-modes-", dir="/tmp"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _process_under_umask(root: Path, mask: str) -> Project:
    project = Project(root, STEPS, reports={"enabled": True})
    hu, _ = dicomgen.chest_phantom((24, 64, 64))
    datasets = dicomgen.make_series(24, stored=np.round(hu + 1024).astype(np.int16), pixel_spacing=5.0)
    study = dicomgen.write_zip(root / "study.zip", datasets)
    command = f'umask {mask} && exec "$0" "$@"'
    for args in (["process", str(study)], ["report"]):
        done = subprocess.run(
            [
                "sh",
                "-c",
                command,
                sys.executable,
                str(REPO / "run.py"),
                *args,
                "--config",
                str(project.config),
            ],
            capture_output=True,
            text=True,
            cwd=root,
            env=_env(),
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return project


def _outputs(project: Project) -> list[Path]:
    files = [p for p in project.outbox.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".json", ".png", ".xlsx"} <= kinds, kinds  # result, receipt, previews, workbooks
    return files


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="reading as another user needs root and setpriv (util-linux)",
)
def test_another_account_reads_every_output_under_umask_022(shared_root: Path) -> None:
    project = _process_under_umask(shared_root, "022")
    for path in _outputs(project):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
        read = subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "cat", str(path)],
            capture_output=True,
            timeout=30,
        )
        assert read.returncode == 0, (path, read.stderr)
        assert read.stdout == path.read_bytes()


def test_a_private_umask_keeps_outputs_private(shared_root: Path) -> None:
    project = _process_under_umask(shared_root, "077")
    for path in _outputs(project):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
