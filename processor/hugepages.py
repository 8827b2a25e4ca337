"""Transparent huge pages: numpy's hint off by default (no kernel memory compaction on the hot
path), and the HU volume on huge pages where the kernel has them free, on the mapping of the
process's last volume once nothing refers to that one (:func:`volume_array`).

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

import contextlib
import math
import mmap
import os
import sys
import weakref
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
    """An uninitialised C-contiguous array like ``np.empty(shape, dtype)``: for volumes of
    :data:`VOLUME_MIN_BYTES` and more, on memory this process already has mapped and written where
    it can (:class:`_Spare`), else on a fresh mapping, on transparent huge pages where the kernel
    has enough of them free that none needs compacting (:func:`huge_pages_free`).

    For the HU volume, written once by the reader (``pread`` into each slice) and read by every
    step. On a 2-core AMD EPYC VM (issue 18), reading a 300 x 512^2 series into a fresh 2 MiB-aligned
    ``MADV_HUGEPAGE`` mapping took 46-48 ms against 106-112 ms into ``np.empty`` (4 KiB pages: one
    page fault and, under nested paging, one costly TLB miss per 4 KiB), and 32-34 ms against
    77-88 ms into memory already written: half of a fresh mapping's cost is the kernel zeroing its
    pages (``clear_page``) as they are first touched. So the mapping of a volume no longer used is
    kept for the next one (one per process, :class:`_Spare`). The mapping is anonymous and private,
    2 MiB aligned (a huge page must be; the unused head and tail are never touched, so never
    backed) and unmapped when a volume that does not fit it asks for memory; small arrays and a
    mapping that fails get ``np.empty``. Sources: Linux ``madvise(2)`` (MADV_HUGEPAGE, MADV_FREE),
    Documentation/admin-guide/mm/transhuge.rst.

    Like ``np.empty``, the array holds whatever the memory held: here, possibly an earlier volume
    of this process. The reader writes every slice before anything reads it.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < VOLUME_MIN_BYTES:
        return np.empty(shape, dtype)
    mapping = _SPARE.take(nbytes)
    if mapping is None:
        mapping = _Mapping.new(nbytes)
        if mapping is None:
            return np.empty(shape, dtype)
    return mapping.lend(shape, dtype)


class _Mapping:
    """An anonymous private mapping of ``capacity`` usable bytes from ``start`` (2 MiB aligned when
    ``huge``), lent to one volume at a time (:meth:`lend`) and handed to :data:`_SPARE` when the
    last array over it is gone."""

    __slots__ = ("region", "start", "capacity", "huge")

    def __init__(self, region: mmap.mmap, start: int, capacity: int, huge: bool) -> None:
        self.region, self.start, self.capacity, self.huge = region, start, capacity, huge

    @classmethod
    def new(cls, nbytes: int) -> _Mapping | None:
        """A fresh mapping for ``nbytes``: on huge pages when they are free; None when the kernel
        refuses one (the caller takes ``np.empty``)."""
        page = mmap.PAGESIZE
        huge = _worth_huge(nbytes)
        align = huge or page
        capacity = -(-nbytes // align) * align  # whole huge pages: MADV_FREE then frees them whole
        try:
            region = mmap.mmap(-1, capacity + align - page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except (OSError, ValueError, OverflowError):
            return None
        if huge is not None:
            try:
                region.madvise(mmap.MADV_HUGEPAGE)
            except (OSError, ValueError, AttributeError):  # no such advice here: 4 KiB pages it is
                huge = None
        start = -_address(region) % align
        return cls(region, start, capacity, huge is not None)

    def lend(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An array over the mapping's first bytes. Its base is a :class:`_Loan` that every view of
        it keeps alive (numpy's ``base``), and the mapping goes back to :data:`_SPARE` only when
        that loan is collected: never while any view, slice or buffer of the volume exists."""
        loan = _Loan()
        loan.__array_interface__ = {
            "shape": tuple(shape),
            "typestr": dtype.str,
            "data": (_address(self.region) + self.start, False),
            "version": 3,
        }
        weakref.finalize(loan, _SPARE.give, self).atexit = False
        return np.asarray(loan)

    def forget_contents(self) -> None:
        """``MADV_FREE`` on the used bytes: the kernel may take the pages back under memory pressure
        instead of swapping them (a later write then faults in zeroed ones), and otherwise they are
        reused as they are. Kept mapped either way."""
        with contextlib.suppress(OSError, ValueError, AttributeError):  # before Linux 4.5: kept as they are
            self.region.madvise(mmap.MADV_FREE, self.start, self.capacity)


class _Loan:
    """The ``base`` of a volume lent from a :class:`_Mapping` (numpy's array interface protocol)."""

    __slots__ = ("__array_interface__", "__weakref__")
    __array_interface__: dict[str, object]


class _Spare:
    """The one mapping this process keeps between volumes: taken by the next volume that fits it,
    unmapped when one does not (so a process never holds more than its largest recent volume
    while it holds none). Process-wide like the allocator it stands in for, and safe across
    threads without a lock: a take and a give are each one list operation, atomic under the GIL,
    and a give can run inside any allocation (the finalizer of a collected volume)."""

    def __init__(self) -> None:
        self._slot: list[_Mapping] = []
        self.enabled = True  # False in a process whose volumes leave it (:func:`hand_volumes_off`)

    def take(self, nbytes: int) -> _Mapping | None:
        """The kept mapping when it holds ``nbytes`` (and is on huge pages, or none are free now);
        otherwise it is released and None is returned."""
        try:
            mapping = self._slot.pop()
        except IndexError:
            return None
        if mapping.capacity >= nbytes and (mapping.huge or _worth_huge(nbytes) is None):
            return mapping
        return None  # dropped here: unmapped once nothing refers to it

    def give(self, mapping: _Mapping) -> None:
        """Keep ``mapping`` (its contents forgotten), or the kept one when that is larger."""
        if not self.enabled:
            return  # unmapped once the finalizer lets go of it
        try:
            kept: _Mapping | None = self._slot.pop()
        except IndexError:
            kept = None
        if kept is None or mapping.capacity >= kept.capacity:
            mapping.forget_contents()
            kept = mapping
        self._slot.append(kept)
        while len(self._slot) > 1:  # two threads gave at once: one is enough
            with contextlib.suppress(IndexError):
                self._slot.pop(0)


def hand_volumes_off() -> None:
    """Keep no mapping between volumes in this process: its volumes leave it (a CPU pool process
    copies each into shared memory for the daemon, :mod:`processor.handoff`), and memory kept here
    while it waits for the daemon to take the next study would grow the memory that
    ``max_inflight_studies`` bounds by one volume per pool process."""
    _SPARE.enabled = False
    _SPARE._slot.clear()


def _worth_huge(nbytes: int) -> int | None:
    """The huge page size, where a mapping of ``nbytes`` can be put on huge pages without
    compaction (:func:`huge_pages_free`); else None."""
    huge = _huge_page_bytes()
    return huge if huge is not None and huge_pages_free(-(-nbytes // huge), huge) else None


def _address(region: mmap.mmap) -> int:
    """The address of the first byte of ``region`` (the view that tells it is gone at once)."""
    return int(np.frombuffer(region, np.uint8).ctypes.data)


_SPARE = _Spare()


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
