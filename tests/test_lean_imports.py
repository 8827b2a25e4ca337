"""pydicom without its test-file download libraries (:mod:`processor.lean`): importing pydicom
after ctwatch's package leaves ``requests`` and ``tqdm`` unimported, the finder goes away after
that import, later imports of both work, and where ``requests`` was imported first pydicom sees it."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO, _env

PROBE = """
import json, sys
{before}
import processor
import pydicom.dataset
import pydicom.data.download as download
from processor.lean import PydicomWithoutDownloads
import email.mime.text  # any later import: the finder removes itself
state = {{
    "requests": "requests" in sys.modules,
    "tqdm": "tqdm" in sys.modules,
    "have_requests": download.HAVE_REQUESTS,
    "finder": any(isinstance(f, PydicomWithoutDownloads) for f in sys.meta_path),
}}
import requests, tqdm  # noqa: E401
state["later"] = bool(requests.get and tqdm.tqdm)
print(json.dumps(state))
"""


def _probe(before: str = "") -> dict:
    run = subprocess.run(
        [sys.executable, "-c", PROBE.format(before=before)],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_pydicom_after_ctwatch_imports_neither_requests_nor_tqdm() -> None:
    state = _probe()
    assert state == {"requests": False, "tqdm": False, "have_requests": False, "finder": False, "later": True}


def test_requests_imported_first_is_left_to_pydicom() -> None:
    state = _probe("import requests")
    assert state["requests"] and state["have_requests"] and not state["finder"] and state["later"]
