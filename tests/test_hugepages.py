"""numpy's transparent-huge-page hint is off in a process that ctwatch's command line started
(issue 18, item 3; :mod:`processor.hugepages`): whether numpy is imported before the command
line runs or after, unless the operator set ``NUMPY_MADVISE_HUGEPAGE`` — then that is kept.
numpy's own default on Linux (kernel 4.6 and newer) and elsewhere is on, so each case can fail."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import Project, _env

PROBE = """
import json, os, sys
if sys.argv[2] == "numpy-first":
    import numpy
from processor.cli import main
code = main(["status", "--config", sys.argv[1]])
import numpy
try:
    from numpy._core.multiarray import _get_madvise_hugepage
except ImportError:  # numpy 1.26
    from numpy.core.multiarray import _get_madvise_hugepage
print(json.dumps({"code": code, "hint": bool(_get_madvise_hugepage()),
                  "env": os.environ.get("NUMPY_MADVISE_HUGEPAGE")}))
"""


def _probe(project: Project, order: str, operator: str | None) -> dict:
    env = _env()
    env.pop("NUMPY_MADVISE_HUGEPAGE", None)
    if operator is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = operator
    run = subprocess.run(
        [sys.executable, "-c", PROBE, str(project.config), order],
        cwd=project.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("order", ["numpy-first", "numpy-after"])
def test_the_command_line_turns_numpys_huge_page_hint_off(project: Project, order: str) -> None:
    outcome = _probe(project, order, None)
    assert outcome == {"code": 0, "hint": False, "env": "0"}, "the processes it starts inherit the 0"


def test_the_operators_setting_is_kept(project: Project) -> None:
    assert _probe(project, "numpy-after", "1") == {"code": 0, "hint": True, "env": "1"}
