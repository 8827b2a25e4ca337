"""A process and its descendants, read from ``/proc`` (Linux): resident memory sampled in a thread,
and whether a library (e.g. torch's) is mapped in any of them.

RSS is ``VmRSS`` of ``/proc/<pid>/status`` (kB, pages of this process in memory, shared ones
included, so a sum over processes counts a shared library once per process); PSS is ``Pss`` of
``/proc/<pid>/smaps_rollup`` (each shared page divided among the processes that map it, so a sum
over processes counts it once). Descendants are found through ``/proc/<pid>/task/<tid>/children``.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
SHM = Path("/dev/shm")
HANDOFF_PREFIX = "ctwatch-handoff-"  # processor.handoff.PREFIX (the bench does not import processor)


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (children of any of its threads, recursively)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            tasks = list((PROC / str(p) / "task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


def _kb(path: Path, *keys: str) -> list[int]:
    """The ``key:  N kB`` lines of a /proc file, in kB, in the order asked (0 when missing or gone)."""
    found = dict.fromkeys(keys, 0)
    try:
        for line in path.read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in found:
                found[key] = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return list(found.values())


def pss_kb(pids: list[int]) -> int:
    return sum(_kb(PROC / str(p) / "smaps_rollup", "Pss")[0] for p in pids)


def mapping(pids: list[int], needle: str) -> int:
    """How many of the processes map a file whose path contains ``needle`` (e.g. ``libtorch_cpu``)."""
    count = 0
    for p in pids:
        try:
            count += needle in (PROC / str(p) / "maps").read_text()
        except OSError:
            continue
    return count


def handoff_kb(daemon: int, pids: list[int]) -> int:
    """kB of shared memory in the hand-off files of the daemon ``daemon`` (:mod:`processor.handoff`):
    those still in /dev/shm named for it (written by a pool process, not yet taken), and those any
    of ``pids`` maps (taken: unlinked, alive while a view of them is), each file once (by inode).
    Unlike the system's ``Shmem``, nothing another job keeps in shared memory is counted."""
    sizes: dict[int, int] = {}
    try:
        names = [n for n in os.listdir(SHM) if n.startswith(f"{HANDOFF_PREFIX}{daemon}-")]
    except OSError:
        names = []
    for name in names:
        try:
            st = os.stat(SHM / name)
        except OSError:
            continue  # taken meanwhile: found in a mapping below, or already freed
        sizes[st.st_ino] = st.st_blocks * 512
    for p in pids:
        try:
            lines = (PROC / str(p) / "maps").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith(str(SHM / HANDOFF_PREFIX)):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                inode = int(parts[4])
                sizes[inode] = max(sizes.get(inode, 0), end - start)
    return sum(sizes.values()) // 1024


@dataclass(frozen=True)
class Sample:
    """One look at the tree (kB): ``rss`` = Σ VmRSS; ``private`` = Σ (RssAnon + RssFile), i.e. RSS
    without shared-memory pages; ``shmem`` = the system's ``Shmem`` (/proc/meminfo: tmpfs such as
    /dev/shm, written or mapped, by any job); ``handoff`` = the tree's own hand-off files
    (:func:`handoff_kb`); ``pss`` = Σ Pss (every ``pss_every``-th sample, else None)."""

    at: float
    rss: int
    private: int
    shmem: int
    processes: int
    pss: int | None
    handoff: int = 0


class RssSampler:
    """The process tree of ``pid`` every ``period`` s, in a daemon thread (see :class:`Sample`).

    ``peak()`` gives the peak summed RSS and, because a CPU pool hands volumes to the daemon
    through files in /dev/shm (:mod:`processor.handoff`) whose pages are in no process's RSS until
    it touches them, the peak of ``private + (shmem − shmem when idle)``: every shared-memory page
    counted once, whether mapped yet or not (other users of /dev/shm on the machine show up in it).
    """

    def __init__(self, pid: int, period: float = 0.1, pss_every: int = 3) -> None:
        self.pid, self.period, self.pss_every = pid, period, pss_every
        self.samples: list[Sample] = []
        self.cpu_s = 0.0  # this sampler's own CPU time (thread time), to show what watching costs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        began, k = time.thread_time(), 0
        while not self._stop.is_set():
            pids = descendants(self.pid)
            per = [_kb(PROC / str(p) / "status", "VmRSS", "RssAnon", "RssFile") for p in pids]
            shmem = _kb(PROC / "meminfo", "Shmem")[0]
            pss = pss_kb(pids) if k % self.pss_every == 0 else None
            rss, private = sum(v[0] for v in per), sum(v[1] + v[2] for v in per)
            handoff = handoff_kb(self.pid, pids)
            self.samples.append(Sample(time.time(), rss, private, shmem, len(pids), pss, handoff))
            k += 1
            self.cpu_s = time.thread_time() - began
            self._stop.wait(self.period)

    def last_before(self, moment: float) -> Sample | None:
        """The last sample taken before ``moment`` (e.g. the idle daemon before a drop)."""
        before = [s for s in self.samples if s.at <= moment]
        return before[-1] if before else None

    def peak(self, start: float, end: float) -> dict[str, float | int]:
        """Peaks (MiB) between ``start`` and ``end``: summed RSS, RSS with shared memory counted
        once (shared memory relative to the last sample before ``start``), PSS; the most processes."""
        inside = [s for s in self.samples if start <= s.at <= end]
        idle = self.last_before(start)
        base = idle.shmem if idle else min((s.shmem for s in inside), default=0)
        return {
            "samples": len(inside),
            "rss_mb": _mib(max((s.rss for s in inside), default=0)),
            "rss_shm_once_mb": _mib(max((s.private + max(0, s.shmem - base) for s in inside), default=0)),
            "rss_handoff_once_mb": _mib(max((s.private + s.handoff for s in inside), default=0)),
            "pss_mb": _mib(max((s.pss for s in inside if s.pss is not None), default=0)),
            "processes": max((s.processes for s in inside), default=0),
        }


def _mib(kb: int) -> float:
    return round(kb / 1024, 1)
