"""Transparent huge pages: numpy's hint off by default (no kernel memory compaction on the hot
path), and the HU volume on huge pages where the kernel has them free (:func:`volume_array`).

On Linux, numpy asks the kernel for transparent huge pages (``madvise(MADV_HUGEPAGE)``) on each
array of 4 MiB and more. Where ``/sys/kernel/mm/transparent_hugepage/defrag`` is ``madvise`` (the
usual default), the first touch of such an array makes the kernel compact memory, in the page
fault, until it has a free 2 MiB page. ctwatch allocates volumes of hundreds of MB in fresh
processes (the daemon's CPU pool processes, each ``process`` run). Measured on a 300 x 512^2
study (issue 18, item 3): where memory was fragmented, the lung mask's first call took 3 CPU-s,
2.2-2.5 of them the kernel compacting memory, and the hint off cut a ``process`` run's CPU time by
a quarter; where free memory held enough whole 2 MiB blocks (no compaction), the hint off made no
difference beyond noise (CPU medians of 3-5: 4.41 s on vs 4.50 s off, 3.86 vs 3.89; kernel time
about 0.35 s less, user time about as much more). So off: it bounds a cost that depends on the
machine's memory state, for a gain (fewer TLB misses) that arrays read once or twice barely see.

numpy's setting is the environment variable ``NUMPY_MADVISE_HUGEPAGE`` (``0`` off, ``1`` on),
read when numpy is imported (NumPy reference, "Global state: madvise hugepage on Linux",
https://numpy.org/doc/stable/reference/global_state.html). :func:`huge_pages_off_by_default` sets
it to ``0`` in ctwatch's environment, so numpy in this process and in every process it starts
(the CPU pool's, which are spawned) reads it; where numpy is already imported it also sets
numpy's flag directly. A value already in the environment is the operator's choice and is kept:
``NUMPY_MADVISE_HUGEPAGE=1`` in the service's environment turns the hint back on.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from pathlib import Path

import numpy as np

ENV = "NUMPY_MADVISE_HUGEPAGE"
THP = Path("/sys/kernel/mm/transparent_hugepage")
BUDDYINFO = Path("/proc/buddyinfo")
VOLUME_MIN_BYTES = 32 << 20  # below this the page faults saved are few
FREE_MARGIN = 2  # huge pages asked for only while at least this many times as many lie free


def huge_pages_off_by_default() -> None:
    """Turn numpy's huge-page hint off for this process and its children, unless :data:`ENV` is set.

    Call it first thing at start-up, before large arrays exist (those already allocated keep
    their hint). Uses numpy's ``_set_madvise_hugepage`` only where numpy is already imported
    (the function is private: where a numpy lacks it, the environment variable still reaches
    the processes started from here).
    """
    if ENV in os.environ:
        return
    os.environ[ENV] = "0"
    numpy = sys.modules.get("numpy")
    if numpy is None:
        return  # numpy reads the variable when it is imported
    core = getattr(numpy, "_core", None) or getattr(numpy, "core", None)  # numpy 2 / numpy 1.26
    setter = getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)
    if setter is not None:
        setter(False)


def volume_array(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array like ``np.empty(shape, dtype)``, on transparent huge pages
    where the kernel has enough of them free that none needs compacting (:func:`huge_pages_free`).

    For the HU volume, written once by the reader (``pread`` into each slice) and read by every step.
    On a 2-core AMD EPYC VM (issue 18), reading a 300 x 512^2 series into a fresh 2 MiB-aligned
    ``MADV_HUGEPAGE`` mapping took 46-48 ms against 106-112 ms into ``np.empty`` (4 KiB pages: one
    page fault and, under nested paging, one costly TLB miss per 4 KiB), and 32-34 ms against
    77-88 ms into memory already written. The mapping is anonymous and private, 2 MiB aligned (a
    huge page must be; the unused head and tail are never touched, so never backed), freed with the
    array; small arrays, a kernel without transparent huge pages, or too few free 2 MiB blocks get
    ``np.empty``. Source: Linux ``madvise(2)`` (MADV_HUGEPAGE), Documentation/admin-guide/mm/transhuge.rst.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    huge = _huge_page_bytes()
    if nbytes < VOLUME_MIN_BYTES or huge is None or not huge_pages_free(-(-nbytes // huge), huge):
        return np.empty(shape, dtype)
    try:
        region = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except (OSError, ValueError, AttributeError):  # no such advice here: 4 KiB pages it is
        return np.empty(shape, dtype)
    raw = np.frombuffer(region, np.uint8)  # its base keeps the mapping alive; unmapped with the last view
    skip = -raw.ctypes.data % huge
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


def huge_pages_free(needed: int, huge: int, buddyinfo: str | None = None) -> bool:
    """Whether at least :data:`FREE_MARGIN` x ``needed`` free blocks of ``huge`` bytes lie in the
    kernel's free lists (``/proc/buddyinfo``: free blocks of each order, 2^order pages, per zone),
    so that faulting ``needed`` huge pages in takes free ones and never waits for compaction."""
    if buddyinfo is None:
        try:
            buddyinfo = BUDDYINFO.read_text()
        except OSError:
            return False
    order = (huge // mmap.PAGESIZE).bit_length() - 1  # 9 for 2 MiB of 4 KiB pages
    free = 0
    for line in buddyinfo.splitlines():
        counts = line.split()[4:]  # "Node 0, zone   Normal  c0 c1 ...": free blocks of order 0, 1, ...
        try:
            free += sum(int(c) << (k - order) for k, c in enumerate(counts) if k >= order)
        except ValueError:  # not the layout above: no huge pages rather than a guess
            return False
    return free >= FREE_MARGIN * needed


def _huge_page_bytes() -> int | None:
    """The size of a transparent huge page, None where they are off (``never``) or unknown."""
    try:
        if "[never]" in (THP / "enabled").read_text():
            return None
        size = int((THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return None
    return size if size > mmap.PAGESIZE and size & (size - 1) == 0 else None
