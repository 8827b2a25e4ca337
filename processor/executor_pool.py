"""The executor the daemon uses with a CPU pool: :class:`~processor.executor.LocalExecutor` with its
CPU stage in a :class:`~processor.cpupool.CpuPool`, and what a pool process's death costs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from processor.cpupool import CpuPool, PoolProcessDied
from processor.executor import Handle, LocalExecutor, StopCheck
from processor.outputs.recorder import StudyRecorder
from processor.state import Arrival, State, crash_reason
from processor.vocab import ArrivalState

log = logging.getLogger(__name__)


class Died:
    """:class:`PooledExecutor`'s handle for a batch whose pool process died in its CPU stage."""

    def __init__(self, arrivals: Sequence[Arrival], died: PoolProcessDied) -> None:
        self.arrivals = arrivals
        self.died = died


def _never() -> bool:
    return False


class PooledExecutor:
    """:class:`LocalExecutor` with its CPU stage in a :class:`CpuPool` (the executor protocol of
    :mod:`processor.executor`); the GPU stage and every recorded end stay in this process.

    A batch whose pool process died is charged as a crash of the daemon would be
    (:meth:`processor.state.queue.Queue.crashed`): one arrival alone counts a crash and goes back
    to the queue, quarantined with :func:`crash_reason` at ``limits.max_attempts`` crashes; several
    go back uncharged, each to run alone next time. The other batches in flight are not touched.
    """

    def __init__(self, local: LocalExecutor, pool: CpuPool, max_crashes: int) -> None:
        self.local = local
        self.pool = pool
        self.max_crashes = max_crashes

    @property
    def pipeline(self) -> Any:
        return self.local.pipeline

    @property
    def recorder(self) -> StudyRecorder:
        return self.local.recorder

    @property
    def state(self) -> State:
        return self.local.state

    def prepare(self, arrivals: Sequence[Arrival], should_stop: StopCheck = _never) -> Handle:
        try:
            return self.pool.prepare(arrivals, should_stop)
        except PoolProcessDied as died:
            return Died(arrivals, died)

    def complete(self, handle: Handle, should_stop: StopCheck = _never) -> list[ArrivalState]:
        if isinstance(handle, Died):
            return self._crashed(handle)
        return self.local.complete(handle, should_stop)

    def _crashed(self, handle: Died) -> list[ArrivalState]:
        finals = []
        now = self.state.crashed([a.id for a in handle.arrivals], self.max_crashes)
        for arrival in now:
            self.recorder.release(arrival)
            if arrival.state == ArrivalState.RUNNING:  # alone, and at the cap: set aside
                finals.append(
                    self.recorder.reject(arrival, crash_reason(arrival.crashes), ArrivalState.QUARANTINED)
                )
                continue
            log.warning(
                "arrival.cpu_process_died arrival=%s crashes=%s isolate=%s: %s; back to the queue",
                arrival.id,
                arrival.crashes,
                arrival.isolate,
                handle.died,
            )
            finals.append(ArrivalState(arrival.state))
        return finals

    def fail(self, arrivals: Sequence[Arrival], reason: str) -> list[ArrivalState]:
        return self.local.fail(arrivals, reason)

    def close(self) -> None:
        """Nothing held between calls; the pool is closed by its owner (the daemon)."""
        self.local.close()
