"""A small bounded prefetch pool: prepare the next studies on the CPU while the current one is used.

``Prefetcher(prepare, max_inflight, workers)`` runs ``prepare(job)`` — the CPU part of a study:
reading the ZIP, decoding, preprocessing — in worker threads named ``ctwatch-prefetch-N``, up to
``max_inflight`` jobs ahead of the consumer, and hands the results back **in job order**::

    with Prefetcher(prepare, max_inflight=2) as pool:
        for item in pool.map(jobs):          # jobs: any iterable, consumed lazily
            if item.error is not None:       # one bad study does not stop the rest
                log.warning("study.failed job=%s error=%s", item.job, item.error)
                continue
            infer(item.value)                # GPU work overlaps prepare() of the next jobs

Bound (memory): ``inflight`` counts the jobs taken from the iterable whose results have not yet
been handed to the consumer — being prepared, queued, or prepared and waiting. It never exceeds
``max_inflight``; the item the consumer holds is not counted, so at most ``max_inflight + 1``
prepared studies exist at once (plus whatever the consumer keeps itself, e.g. a batch).
``inflight`` may be read from any thread (the status endpoint).

Errors: an exception raised by ``prepare`` is delivered in that job's :class:`Prefetched`
(``error``; ``get()`` re-raises it); the other jobs go on. An exception raised by the *iterable*
itself propagates out of ``map``.

Shutdown: ``close()`` (or leaving the ``with`` block) drops the jobs not yet started, waits for
the at most ``workers`` running ``prepare`` calls to return, and joins the threads. Leaving a
``map`` loop early (``break``) drops that loop's pending jobs too; the pool can be used again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

_STOP = object()


@dataclass
class Prefetched(Generic[T, U]):
    """The outcome of ``prepare(job)``: ``value`` or ``error``, and how long it took."""

    job: T
    value: U | None = None
    error: BaseException | None = None
    prepare_seconds: float = 0.0  # wall time of prepare(job) in its worker
    waited_seconds: float = 0.0  # how long the consumer waited for it (0 when it was ready)

    @property
    def ok(self) -> bool:
        return self.error is None

    def get(self) -> U:
        """The value, or re-raise the exception ``prepare`` raised for this job."""
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


@dataclass
class _Slot(Generic[T, U]):
    result: Prefetched[T, U]
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # the consumer no longer wants it
    skipped: bool = False  # dropped before prepare() ran (cancelled or closed)


class PrefetchClosed(RuntimeError):
    """``close()`` was called while ``map`` still had jobs to deliver."""


class Prefetcher(Generic[T, U]):
    """Run ``prepare`` for up to ``max_inflight`` jobs ahead in ``workers`` threads; see the module doc."""

    def __init__(self, prepare: Callable[[T], U], max_inflight: int, workers: int = 1) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1 (got {max_inflight})")
        if workers < 1:
            raise ValueError(f"workers must be at least 1 (got {workers})")
        self.prepare = prepare
        self.max_inflight = max_inflight
        self.workers = workers
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # guards _inflight, _closed, _mapping, _threads and queue puts
        self._inflight = 0
        self._closed = False
        self._mapping = False

    # ------------------------------------------------------------------ public
    @property
    def inflight(self) -> int:
        """Jobs taken but not yet handed to the consumer (preparing, queued or ready)."""
        with self._lock:
            return self._inflight

    def map(self, jobs: Iterable[T]) -> Generator[Prefetched[T, U], None, None]:
        """Yield a :class:`Prefetched` per job, in job order, preparing up to ``max_inflight`` ahead.

        One ``map`` at a time per pool. Raises :class:`PrefetchClosed` when the pool is closed
        before every job was delivered.
        """
        if self._closed:
            raise PrefetchClosed("Prefetcher is closed; create a new one")
        return self._generate(iter(jobs))

    def close(self) -> None:
        """Drop jobs not yet started, let running ``prepare`` calls finish, join the threads."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
            for _ in threads:
                self._queue.put(_STOP)
        for thread in threads:
            thread.join()
        log.debug("prefetch.closed threads=%d", len(threads))

    def __enter__(self) -> Prefetcher[T, U]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ consumer side
    def _generate(self, jobs: Iterator[T]) -> Generator[Prefetched[T, U], None, None]:
        with self._lock:
            if self._mapping:
                raise RuntimeError("Prefetcher.map is already running; finish or break that loop first")
            self._mapping = True
        pending: deque[_Slot[T, U]] = deque()
        try:
            self._fill(jobs, pending)
            while pending:
                slot = pending.popleft()
                started = time.perf_counter()
                slot.done.wait()
                slot.result.waited_seconds = time.perf_counter() - started
                with self._lock:
                    self._inflight -= 1
                if slot.skipped:
                    raise PrefetchClosed(f"Prefetcher closed before job {slot.result.job!r} was prepared")
                # refill before handing over, so max_inflight jobs prepare while the consumer works
                self._fill(jobs, pending)
                yield slot.result
        finally:
            # early exit (break, an error, close): drop what has not started, wait for what has,
            # so that inflight stays a true count of prepared studies held in memory
            for slot in pending:
                slot.cancelled = True
            for slot in pending:
                slot.done.wait()
            with self._lock:
                self._inflight -= len(pending)
                self._mapping = False

    def _fill(self, jobs: Iterator[T], pending: deque[_Slot[T, U]]) -> None:
        """Take jobs from the iterable until ``max_inflight`` are pending (or it is exhausted)."""
        while len(pending) < self.max_inflight:
            if self._closed:  # do not take a job (e.g. a claimed study) that will not be prepared
                raise PrefetchClosed("Prefetcher was closed while map() was running")
            try:
                job = next(jobs)
            except StopIteration:
                return
            slot: _Slot[T, U] = _Slot(Prefetched(job))
            with self._lock:
                if self._closed:
                    raise PrefetchClosed("Prefetcher was closed while map() was running")
                self._start_threads()
                self._inflight += 1
                pending.append(slot)
                self._queue.put(slot)

    # ------------------------------------------------------------------ worker side
    def _start_threads(self) -> None:
        """Start the worker threads on first use (called with the lock held)."""
        while len(self._threads) < self.workers:
            thread = threading.Thread(
                target=self._work, name=f"ctwatch-prefetch-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            self._run(item)  # type: ignore[arg-type]
            # hold nothing while waiting for the next job: the consumer frees a result it is done with
            del item

    def _run(self, slot: _Slot[T, U]) -> None:
        if slot.cancelled or self._closed:
            slot.skipped = True
            slot.done.set()
            return
        started = time.perf_counter()
        try:
            slot.result.value = self.prepare(slot.result.job)
        except BaseException as exc:  # delivered to the consumer with its job, never swallowed
            slot.result.error = exc
        slot.result.prepare_seconds = time.perf_counter() - started
        slot.done.set()
