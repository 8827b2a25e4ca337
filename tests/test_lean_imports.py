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


SKIP_PROBE = """
import json, sys
import processor  # installs the finder first in sys.meta_path

class Recorder:
    seen = set()
    def find_spec(self, name, path=None, target=None):
        self.seen.add(name)
        return None

sys.meta_path.insert(1, Recorder())  # right behind ctwatch's finder
before = set(sys.modules)
import pydicom.dataset
# modules put in sys.modules by the import system (Cython extensions add helpers of their own)
imported = {n for n in set(sys.modules) - before if getattr(sys.modules[n], '__spec__', None) is not None}
assert len(imported) > 50, len(imported)
missed = sorted(imported - Recorder.seen)
print(json.dumps(missed))
"""


def test_the_finder_leaves_without_making_the_next_finder_miss_an_import() -> None:
    """The finder removes itself while the import system loops over ``sys.meta_path``: it must
    not shift the list under that loop, or the finder after it would never be asked for the
    import under way (with the standard finders behind it, a built-in module would not be found)."""
    run = subprocess.run(
        [sys.executable, "-c", SKIP_PROBE], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
