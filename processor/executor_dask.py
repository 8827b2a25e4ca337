"""The Dask executor (issue 19): the pipeline on Dask distributed workers, the daemon still the
only writer.

``executor: {dask: {local: {n_workers: 2}}}`` starts a :class:`distributed.LocalCluster` inside the
daemon; ``executor: {dask: {scheduler: tcp://host:8786}}`` joins a scheduler whose workers were
started with ``python run.py worker`` (:mod:`processor.dask_worker`). One code path serves both.

Per batch (a day arrival, or a night batch of up to ``night_batch`` arrivals, model-major):

1. **On the coordinator** (:meth:`DaskExecutor.prepare`, in a prefetch thread): the arrivals are
   opened, scanned and planned against SQLite (late series included) and their result paths
   reserved by the one recorder — exactly the local executor's :meth:`~LocalExecutor.open_batch`.
   The batch is submitted as one task asking for ``resources={"GPU": 1}`` (a worker runs one at a
   time) under a key from the pipeline's digest and each arrival's sha256 and claim
   (:func:`~processor.dask_batch.batch_key`): one claim in flight, one task — at most one of ours per
   GPU worker, and a stuck one has its worker restarted (:meth:`DaskExecutor._watch`).
2. **On a worker** (:func:`~processor.dask_worker.run_batch`): every step, with the models the
   worker keeps loaded; nothing durable is written there.
3. **On the coordinator** (:meth:`DaskExecutor.complete`): the files the steps wrote are written
   into the outbox, and the recorder records the batch as for the local executor (JSON, SQLite,
   receipts, Excel).

Failures: a worker that dies mid-batch → Dask runs the task again on another worker (at least
once); the coordinator records the one result it gets (exactly once). A batch that killed more than
``allowed_failures`` workers (:class:`distributed.KilledWorker`) is charged as a crash of the
daemon would be: alone, it is set aside ("crashed N Dask workers"); with others, each goes back to
run alone. A worker that cannot run batches at all (no plugin, an input it cannot see, no worker
with the GPU resource) sends the batch back uncharged and pauses processing with the reason on
``/health`` (:class:`~processor.errors.Unavailable`). A coordinator that dies leaves its arrivals
``running`` in SQLite; its next start puts them back in the queue (``recover``) and submits them
again. A stop request cancels the tasks in flight; their arrivals go back to the queue.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.atomic import write_bytes_atomic
from processor.bytesource import carried
from processor.dask_batch import Batch, Done, InputChanged, WorkerNotReady, batch_key, carries_bytes
from processor.dask_cluster import DaskCluster, pack, quietly
from processor.errors import Unavailable
from processor.executor import Handle, LocalExecutor, Prepared, StopCheck, study_keys
from processor.state import Arrival, State
from processor.vocab import ArrivalState

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2  # how often a waiting complete() looks at the stop request
STUCK_LIMITS = 3  # a task is stuck after 3 × limits.max_seconds_per_arrival per arrival


def _never() -> bool:
    return False


def killed_reason(workers: int) -> str:
    return (
        f"crashed {workers} Dask worker{'s' if workers != 1 else ''} (each died while running only "
        "this input: out of memory, "
        "or a fault in native code); it is set aside so the others go on. Check the workers' logs, "
        "then requeue it with `python run.py requeue <arrival id>` once the cause is fixed"
    )


@dataclass
class Sent:
    """:class:`DaskExecutor`'s handle: the batch as the coordinator prepared it, and its task
    (None when nothing of it needs a worker: every arrival rejected, or a stop while reading)."""

    prepared: Prepared
    future: Any
    submitted: float
    limit: float = 0.0  # seconds it may run (STUCK_LIMITS × limits.max_seconds_per_arrival per arrival)
    stuck: str | None = None  # why it was stopped as stuck (its worker restarted), to be charged

    def __post_init__(self) -> None:
        self.arrivals: Sequence[Arrival] = self.prepared.arrivals


class DaskExecutor:
    """The executor protocol of :mod:`processor.executor` on Dask (see the module docstring)."""

    def __init__(self, local: LocalExecutor, cluster: DaskCluster, max_crashes: int) -> None:
        self.local = local
        self.cluster = cluster
        self.dask = cluster.dask
        self.max_crashes = max_crashes
        self._gate = threading.Lock()
        self._running: dict[Any, Sent] = {}  # our submitted tasks, until done
        self._watched = time.monotonic()
        # bumped when one of our tasks finishes: its waiters wake at once, not at their next poll
        self._finished = threading.Condition()
        self._finishes = 0

    @property
    def pipeline(self) -> Any:
        return self.local.pipeline

    @property
    def recorder(self) -> Any:
        return self.local.recorder

    @property
    def state(self) -> State:
        return self.local.state

    # ------------------------------------------------------------------ on the coordinator, then submitted
    def prepare(self, arrivals: Sequence[Arrival], should_stop: StopCheck = _never) -> Handle:
        local = self.local
        with ExitStack() as stack:
            prepared = local.open_batch(arrivals, stack, should_stop, self.recorder.locate)
            if prepared.stopped or not prepared.opened:
                prepared.gpu_done = True
                return Sent(prepared, None, time.monotonic())
            sent: Sent | None = None
            try:
                local.attach_paths(prepared, local.reserve_paths(study_keys(prepared)))
                inputs = self._ship(prepared)
                batch = Batch(
                    prepared,
                    self.pipeline.digest,
                    self.pipeline.text,
                    inputs,
                    local.limits if inputs else None,
                )
                limit = STUCK_LIMITS * local.limits.max_seconds_per_arrival * max(1, len(arrivals))
                packed = pack(batch)  # now, not between two tasks once a worker is free
                sent = self._submit_when_a_worker_is_free(
                    batch, packed, batch_key(arrivals, self.pipeline.digest), limit, should_stop
                )
                if sent is None:  # a stop request while it waited
                    self._release_paths_of(prepared.arrivals)
                    prepared.stopped = True
                    prepared.gpu_done = True
                    return Sent(prepared, None, time.monotonic())
                log.info("dask.submitted arrivals=%s key=%s", [a.id for a in arrivals], sent.future.key)
            except BaseException:
                if sent is not None:  # submitted, but no handle will reach complete(): withdrawn
                    with self._gate:
                        self._running.pop(sent.future, None)
                    quietly(sent.future.cancel)
                self._release_paths_of(prepared.arrivals)
                raise
        return sent

    def _submit_when_a_worker_is_free(
        self, batch: Batch, packed: bytes, key: str, limit: float, should_stop: StopCheck
    ) -> Sent | None:
        """Submit ``batch`` once fewer of our tasks are unfinished (or their workers restarting)
        than GPU workers can take work; None at a stop request. Dask hands a task that asks for
        resources to a worker at once, busy or not, and counts every task handed to a worker that
        dies against it (``allowed-failures``): a batch queued behind a poison one would be charged
        with its deaths. One task per worker keeps a death charged to the batch that was running.
        The check and the submission hold the gate together, so two threads never take one place."""
        while True:
            seen = self._finishes
            self._watch()
            with self._gate:
                busy = len(self._running) + self.cluster.restarting
                if busy < max(1, self.cluster.gpu_workers()):
                    future = self.cluster.submit(batch, key, packed)
                    sent = self._running[future] = Sent(batch.prepared, future, time.monotonic(), limit)
                    future.add_done_callback(self._wake)
                    return sent
            if should_stop():
                return None
            self._pause(seen)

    def _wake(self, _future: Any = None) -> None:
        """A done callback of our tasks (run in a thread of Dask's client): wake the waiters."""
        with self._finished:
            self._finishes += 1
            self._finished.notify_all()

    def _pause(self, seen: int) -> None:
        """Wait :data:`POLL_SECONDS`, or less when one of our tasks finished since ``seen`` (the
        count of finishes read before the caller looked): a worker that is free again gets its next
        batch, and a result is recorded, without waiting for the next poll."""
        with self._finished:
            if self._finishes == seen:
                self._finished.wait(POLL_SECONDS)

    def _watch(self) -> None:
        """Forget our finished tasks (and a lost client's, which never finish), and stop the stuck
        ones: a task running past its limit has its worker restarted (a running task cannot be
        cancelled, and a hung one would hold that worker and the batches queued behind it) and is
        marked to be charged by :meth:`complete`. The clocks stand still while no GPU worker is
        connected. Called by every thread that waits on Dask, so a stuck task is found whether the
        worker thread waits for it or for a prefetch thread held at the gate."""
        with self._gate:
            now = time.monotonic()
            elapsed, self._watched = now - self._watched, now
            for future in list(self._running):
                if future.done() or not self.cluster.ours(future):
                    del self._running[future]
            idle = self.cluster.gpu_workers() == 0
            for future, sent in list(self._running.items()):
                if idle:
                    sent.submitted += elapsed
                elif sent.stuck is None and now - sent.submitted > sent.limit:
                    restarted = self.cluster.restart_worker_running(future.key)
                    log.error(
                        "dask.task_stuck arrivals=%s restarted=%s", [a.id for a in sent.arrivals], restarted
                    )
                    # charged only when it was running and its worker restarts; else it goes back
                    # uncharged (a task that cannot be stopped holds a worker: a pause, not a verdict)
                    sent.stuck = (
                        f"it ran past {sent.limit:g} s on a Dask worker" if restarted else UNSTOPPABLE
                    )
                    quietly(future.cancel)
                    del self._running[future]

    def _ship(self, prepared: Prepared) -> dict[int, str]:
        """Carry the bytes of the studies that need them (``inputs: bytes``, or a study merged from
        several arrivals); the others travel by path: arrival id → its input as workers see it."""
        inputs: dict[int, str] = {}
        for item in prepared.opened:
            by_path = self.dask.inputs == "path"
            for study in item.studies:
                lineage = item.lineage.get(study.uid)
                merged = lineage is not None and tuple(lineage.input_ids) != (item.arrival.id,)
                if by_path and not merged:
                    continue
                for series in study.series.values():
                    for instance in series.instances:
                        instance.member = carried(instance.member)
            if by_path and any(not carries_bytes(study) for study in item.studies):
                path = self.recorder.locate(item.arrival)
                if path is None:  # moved away since it was opened: read it on the next try
                    raise Unavailable(f"the input of arrival {item.arrival.id} moved while it was sent")
                inputs[item.arrival.id] = self.dask.worker_path(path)
        return inputs

    # ------------------------------------------------------------------ the result, recorded here
    def complete(self, handle: Handle, should_stop: StopCheck = _never) -> list[ArrivalState]:
        """Wait for the batch's task, write the files it brought back, and record the batch.

        A task running past ``STUCK_LIMITS`` × ``limits.max_seconds_per_arrival`` per arrival since
        it was submitted (each worker runs one of ours at a time, so it starts then) is stopped
        (:meth:`_watch`) and charged as a crash; the clock stands still while no worker with the GPU
        resource is connected. With none for ``executor.dask.connect_seconds``, or the scheduler
        lost, the batch goes back uncharged and processing pauses (:class:`Unavailable`)."""
        assert isinstance(handle, Sent), type(handle)
        if handle.future is None:
            return self.local.complete(handle.prepared, should_stop)
        workerless: float | None = None
        while True:
            if handle.stuck is not None:
                return self._stopped_as_stuck(handle)
            seen = self._finishes
            try:
                # distributed 2026.8's result(timeout=…) fails with UnboundLocalError when a result
                # takes longer than the timeout to arrive (dask/distributed#8514): wait on done()
                if not handle.future.done():
                    raise FutureTimeout
                done: Done = handle.future.result()
                # Here now: the worker may drop it. A result still wanted would be copied to another
                # worker when its worker retires, or computed again when its worker is lost.
                quietly(handle.future.release)
                break
            except FutureTimeout:
                self._pause(seen)
                if should_stop() and not self.local.finish_study_on_stop:
                    quietly(handle.future.cancel)
                    return [self.local._release(a, "shutdown") for a in handle.arrivals]
                self._watch()
                now = time.monotonic()
                lost = not self.cluster.ours(handle.future)
                if lost or self.cluster.gpu_workers() == 0:
                    workerless = now if workerless is None else workerless
                    if lost or now - workerless > self.dask.connect_seconds:
                        quietly(handle.future.cancel)
                        self._release_paths(handle)
                        raise Unavailable(self.cluster.fault() or _NO_WORKER) from None
                    continue
                workerless = None
            except (WorkerNotReady, CancelledError) as exc:
                if handle.stuck is not None:  # cancelled by _watch in another thread meanwhile
                    return self._stopped_as_stuck(handle)
                self._release_paths(handle)
                raise Unavailable(_words(exc)) from exc
            except InputChanged as exc:
                return self._ended(handle, str(exc), only=exc.arrival_id)
            except Exception as exc:
                if type(exc).__name__ == "KilledWorker":  # the scheduler's allowed-failures + 1 deaths
                    deaths = int(getattr(exc, "allowed_failures", self.dask.allowed_failures)) + 1
                    return self._crashed(handle, str(exc), cap=1, deaths=deaths)
                self._release_paths(handle)
                if _lost_link(exc):  # the client or its connection closed: not the study's fault
                    raise Unavailable(
                        self.cluster.fault() or f"the link to Dask broke ({type(exc).__name__})"
                    ) from exc
                raise
        try:
            for folder, files in done.files.items():
                for name, data in files.items():
                    write_bytes_atomic(Path(folder) / name, data)
        except BaseException:  # the outbox, not the study: back to the queue (the worker's fault path)
            self._release_paths(handle)
            raise
        log.info(
            "dask.done arrivals=%s worker=%s seconds=%.2f",
            [a.id for a in handle.arrivals],
            done.worker,
            done.seconds,
        )
        return self.local.complete(done.prepared, should_stop)

    def _stopped_as_stuck(self, handle: Sent) -> list[ArrivalState]:
        if handle.stuck == UNSTOPPABLE:
            self._release_paths(handle)
            raise Unavailable(UNSTOPPABLE)
        return self._crashed(handle, handle.stuck or "", cap=None)

    def _rejected_ends(self, prepared: Prepared) -> dict[int, ArrivalState]:
        """Record the arrivals of ``prepared`` rejected on the coordinator (unreadable input)."""
        if not prepared.rejected:
            return {}
        rest = Prepared(
            [a for a in prepared.arrivals if a.id in prepared.rejected],
            rejected=prepared.rejected,
            gpu_done=True,
        )
        return {a.id: final for a, final in zip(rest.arrivals, self.local.complete(rest), strict=True)}

    def _ended(self, handle: Sent, reason: str, only: int | None = None) -> list[ArrivalState]:
        """The batch failed on its worker for ``reason`` (not a crash): each arrival fails with it,
        or only arrival ``only`` when the reason is its alone (its input changed); the others go
        back to the queue uncharged, to run again."""
        prepared = handle.prepared
        finals = self._rejected_ends(prepared)
        for arrival in prepared.arrivals:
            if arrival.id in finals:
                continue
            self.recorder.release(arrival)
            if only is None or arrival.id == only:
                finals[arrival.id] = self.recorder.reject(arrival, reason, ArrivalState.FAILED)
            else:
                self.state.release(arrival.id)
                finals[arrival.id] = ArrivalState.PENDING
        return [finals[a.id] for a in prepared.arrivals]

    def _crashed(self, handle: Sent, why: str, cap: int | None, deaths: int = 0) -> list[ArrivalState]:
        """The task killed its workers (``cap`` 1: alone, set aside at once) or got stuck (``cap``
        None: charged as a crash, set aside at ``limits.max_attempts``); several arrivals go back
        uncharged, each to run alone. Arrivals rejected on the coordinator are recorded as such."""
        prepared = handle.prepared
        finals = self._rejected_ends(prepared)
        ran = [a.id for a in prepared.arrivals if a.id not in prepared.rejected]
        log.warning("dask.task_crashed arrivals=%s: %s", ran, why)
        for arrival in self.state.crashed(ran, cap or self.max_crashes):
            self.recorder.release(arrival)
            if arrival.state == ArrivalState.RUNNING:  # alone, and at the cap: set aside
                reason = killed_reason(deaths) if cap else crash_words(why)
                finals[arrival.id] = self.recorder.reject(arrival, reason, ArrivalState.QUARANTINED)
            else:
                finals[arrival.id] = ArrivalState(arrival.state)
        return [finals[a.id] for a in prepared.arrivals]

    def _release_paths(self, handle: Sent) -> None:
        self._release_paths_of(handle.arrivals)

    def _release_paths_of(self, arrivals: Sequence[Arrival]) -> None:
        for arrival in arrivals:
            self.recorder.release(arrival)

    def fail(self, arrivals: Sequence[Arrival], reason: str) -> list[ArrivalState]:
        return self.local.fail(arrivals, reason)

    def close(self) -> None:
        """Nothing held between calls; the cluster is closed by its owner (the daemon)."""
        self.local.close()


def crash_words(why: str) -> str:
    return (
        f"{why}, more than once; it is set aside so the others go on. Check the workers' logs, then "
        "requeue it with `python run.py requeue <arrival id>` once the cause is fixed"
    )


def _words(exc: BaseException) -> str:
    if isinstance(exc, CancelledError):
        return "the Dask scheduler dropped the task (it restarted, or lost its workers)"
    return str(exc)


UNSTOPPABLE = (
    "a Dask task ran past its time limit and its worker could not be restarted (no nanny, or it did "
    "not answer); the batch goes back to the queue uncharged — restart that worker"
)
_NO_WORKER = "no Dask worker with the GPU resource is connected; start one with `python run.py worker`"


def _lost_link(exc: BaseException) -> bool:
    """A failure of the coordinator's link to Dask (its client closed, a comm gone), not of a task."""
    return type(exc).__name__ in {"ClosedClientError", "CommClosedError", "StreamClosedError"} or (
        isinstance(exc, TimeoutError)
        and type(exc).__module__.startswith(("distributed", "asyncio", "builtins"))
    )
