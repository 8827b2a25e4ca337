"""Timing helpers: wall time (``time.perf_counter``) and process CPU time (``time.process_time``,
all threads of this process: decode pools, torch intra-op threads and prefetch threads included).

``bench/run.py`` sets ``OMP_WAIT_POLICY=PASSIVE`` before torch loads, so torch's idle OpenMP threads
sleep instead of spinning after each parallel region and their waiting is not counted as work."""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

R = TypeVar("R")


@dataclass
class Samples:
    """Repeated measurements of one stage."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def n(self) -> int:
        return len(self.cpu)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def wall_median(self) -> float:
        return statistics.median(self.wall)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "cpu_s_median": round(self.cpu_median, 6),
            "wall_s_median": round(self.wall_median, 6),
            "n": self.n,
        }


class Clock:
    """Split points of one run: ``lap()`` returns (wall, cpu) seconds since the previous lap."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def lap(self) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out = (wall - self.wall, cpu - self.cpu)
        self.wall, self.cpu = wall, cpu
        return out


def timed(fn: Callable[[], R], samples: Samples | None = None) -> tuple[R, float, float]:
    """Run ``fn`` once; return (result, wall s, cpu s) and add them to ``samples``."""
    clock = Clock()
    result = fn()
    wall, cpu = clock.lap()
    if samples is not None:
        samples.add(wall, cpu)
    return result, wall, cpu


def repeat(fn: Callable[[], R], n: int, samples: Samples | None = None) -> tuple[R, Samples]:
    """Run ``fn`` ``n`` times (a garbage collection before each, outside the timing)."""
    samples = samples if samples is not None else Samples()
    result: R | None = None
    for _ in range(n):
        result = None
        gc.collect()
        result, _, _ = timed(fn, samples)
    return result, samples  # type: ignore[return-value]
