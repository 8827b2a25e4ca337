"""numpy's transparent-huge-page hint is off in a process that ctwatch's command line started
(issue 18, item 3; :mod:`processor.hugepages`): whether numpy is imported before the command
line runs or after, unless the operator set ``NUMPY_MADVISE_HUGEPAGE`` — then that is kept.
numpy's own default on Linux (kernel 4.6 and newer) and elsewhere is on, so each case can fail."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from processor import hugepages
from processor.dicom.scan import scan_members
from processor.dicom.volume import load_volume
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen
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
    plain = hugepages.volume_array(shape, np.float32)  # none free (and hu still in use): 4 KiB pages
    assert plain.shape == shape and plain.dtype == np.float32 and plain.flags.c_contiguous
    plain[...] = 1.5
    assert _anon_huge_kib(plain.ctypes.data) == 0
    small = hugepages.volume_array((2, 64, 64), np.int16)
    assert small.base is None and small.shape == (2, 64, 64), "small arrays are numpy's own"


def test_a_volume_lends_its_memory_to_the_next_only_once_nothing_refers_to_it() -> None:
    shape = (70, 512, 512)  # 35 MiB of int16
    hu = hugepages.volume_array(shape, np.int16)
    first = hu.ctypes.data
    hu[...] = 7
    row, buffer = hu[5, 100], memoryview(hu[60])
    del hu
    gc.collect()
    other = hugepages.volume_array(shape, np.int16)  # a view and a buffer of the first still exist
    assert other.ctypes.data != first
    other[...] = -3
    assert (row == 7).all() and (np.frombuffer(buffer, np.int16) == 7).all(), "untouched by the next"
    del row, buffer
    gc.collect()
    again = hugepages.volume_array((66, 512, 512), np.int16)  # fewer slices: fits the first
    assert again.ctypes.data == first
    del again, other
    gc.collect()
    bigger = hugepages.volume_array((90, 512, 512), np.float32)  # fits neither: a fresh mapping
    bigger[...] = 0.25
    assert float(bigger.sum()) == 0.25 * bigger.size
    assert not hugepages._SPARE._slot, "the spare that did not fit was let go"


@pytest.mark.parametrize("variant", ["int16", "float32 after int16", "fewer slices"])
def test_volumes_decoded_one_after_another_hold_their_own_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variant: str
) -> None:
    """The volume reader writes every slice of memory an earlier volume of the process held: each
    volume equals its own truth, never a mix (ZIPs of real DICOM, every volume on lent memory)."""
    monkeypatch.setattr(hugepages, "VOLUME_MIN_BYTES", 0)
    first, first_truth = dicomgen.small_series(4, 24, seed=1)
    n = 3 if variant == "fewer slices" else 4
    second, second_truth = dicomgen.small_series(n, 24, seed=2)
    if variant == "float32 after int16":  # decoded into int16 first, then again into float32
        for ds in second:
            ds.RescaleIntercept = "-32000"
        second_truth = second_truth + np.float32(1024 - 32000)
    hu = _volume(tmp_path / "first.zip", first)
    np.testing.assert_array_equal(hu, first_truth.astype(np.int16))
    where = hu.ctypes.data
    del hu
    gc.collect()
    hu = _volume(tmp_path / "second.zip", second)
    assert hu.dtype == (np.float32 if variant == "float32 after int16" else np.int16)
    np.testing.assert_array_equal(hu, second_truth.astype(hu.dtype))
    if variant != "float32 after int16":
        assert hu.ctypes.data == where, "the first volume's memory was lent again"


def _volume(path: Path, datasets: list) -> np.ndarray:
    dicomgen.write_zip(path, datasets)
    with open_arrival(path, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        return load_volume(series).hu


def test_a_process_that_hands_its_volumes_off_keeps_no_memory_between_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU pool process copies each volume into shared memory for the daemon: the mapping of a
    volume it no longer uses is let go, not kept for the next."""
    monkeypatch.setattr(hugepages._SPARE, "enabled", True)  # as it was, after this test
    hu = hugepages.volume_array((70, 512, 512), np.int16)
    del hu
    gc.collect()
    assert hugepages._SPARE._slot, "kept where volumes stay in the process"
    hugepages.hand_volumes_off()
    assert not hugepages._SPARE._slot
    hu = hugepages.volume_array((70, 512, 512), np.int16)
    hu[...] = 1
    del hu
    gc.collect()
    assert not hugepages._SPARE._slot
