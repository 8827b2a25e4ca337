"""numpy's transparent-huge-page hint is off in a process that ctwatch's command line started
(issue 18, item 3; :mod:`processor.hugepages`): whether numpy is imported before the command
line runs or after, unless the operator set ``NUMPY_MADVISE_HUGEPAGE`` — then that is kept.
numpy's own default on Linux (kernel 4.6 and newer) and elsewhere is on, so each case can fail."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from processor import hugepages
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


BUDDYINFO = """Node 0, zone      DMA      0      0      0      0      0      0      0      0      1      1      3
Node 0, zone    DMA32      2      3      0      2      3      2      1      4      4      2    752
Node 0, zone   Normal  24356  20089  12393   5832   3883   2301   1061    502    190    127    977
"""


def test_free_huge_pages_are_counted_from_every_zones_free_lists() -> None:
    # 2 MiB of 4 KiB pages is order 9: DMA 1 + 3 x 2, DMA32 2 + 752 x 2, Normal 127 + 977 x 2
    free = (1 + 6) + (2 + 1504) + (127 + 1954)
    assert hugepages.huge_pages_free(free // 2, 2 << 20, BUDDYINFO)
    assert not hugepages.huge_pages_free(free // 2 + 1, 2 << 20, BUDDYINFO), "a margin of 2x"
    no_free = "Node 0, zone   Normal  9999 9999 9999 9999 9999 9999 9999 9999 9999 0 0\n"
    assert not hugepages.huge_pages_free(1, 2 << 20, no_free), "only blocks of 2 MiB and more count"
    assert not hugepages.huge_pages_free(1, 2 << 20, "Node 0, zone Normal 0 0 0 0 0 0 0 0 0 x 999\n"), (
        "not buddyinfo"
    )


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages of the mapping holding ``address`` (Linux ``/proc/self/smaps``)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0]
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            inside = start <= address < end
        elif inside and first == "AnonHugePages:":
            return int(line.split()[1])
    return 0


def test_the_volume_lies_on_huge_pages_when_they_are_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = (80, 512, 512)  # 40 MiB of int16: above VOLUME_MIN_BYTES
    huge = hugepages._huge_page_bytes()
    if huge is None or not hugepages.huge_pages_free(shape[0], huge):
        pytest.skip("this kernel has transparent huge pages off, or too few free")
    hu = hugepages.volume_array(shape, np.int16)
    assert hu.shape == shape and hu.dtype == np.int16 and hu.flags.c_contiguous and hu.flags.writeable
    assert hu.ctypes.data % huge == 0, "a huge page must be aligned"
    hu[...] = np.arange(512, dtype=np.int16)  # every page touched
    assert int(hu[79, 511, 511]) == 511 and int(hu[0, 0, 0]) == 0
    assert _anon_huge_kib(hu.ctypes.data) >= 20 * 1024, "the kernel backed it with huge pages"
    (tmp_path / "buddyinfo").write_text("Node 0, zone   Normal  9999 9999 0 0 0 0 0 0 0 0 0\n")
    monkeypatch.setattr(hugepages, "BUDDYINFO", tmp_path / "buddyinfo")
    plain = hugepages.volume_array(shape, np.float32)  # none free: numpy's own memory
    assert plain.shape == shape and plain.dtype == np.float32 and plain.base is None
    small = hugepages.volume_array((2, 64, 64), np.int16)
    assert small.base is None and small.shape == (2, 64, 64)
