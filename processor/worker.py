"""The worker: the one thread that claims arrivals and hands them to the executor.

Urgent arrivals first, then the day queue; night arrivals only when the schedule allows (and then,
model-major, in batches of ``night_batch``). With ``max_inflight`` > 0 the next arrivals' CPU stage
runs in prefetch threads (``prefetch_workers`` of them, one per CPU pool process when the executor
has a pool, :mod:`processor.cpupool`) while this thread completes the current ones; an arrival waiting in the
prefetch queue is only *prepared* (not charged an attempt) until the prefetch thread starts on it.
An arrival that was in flight with others when the process died (``isolate``) is run alone, so a
crash is charged to the input that caused it.

An urgent arrival never waits for work that has not started: a night batch stops growing at it,
and a routine batch taken ahead for the prefetcher is not started while urgent work waits — it goes
back to the queue, uncharged. The urgent one waits only for the batches already started: the one
being completed and the one in its CPU stage (a day arrival each, or a night batch of up to
``night_batch`` studies, which run model-major as one unit and are never split).
"""

from __future__ import annotations

import errno
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

from processor.errors import Unavailable, os_error_words
from processor.executor import Executor, Handle
from processor.faults import fault_point
from processor.prefetch import Prefetcher
from processor.state import Arrival, State
from processor.vocab import ArrivalState, Priority

log = logging.getLogger(__name__)


FAR_FUTURE = "9999-12-31T23:59:59+00:00"


class Worker:
    """The one thread that claims arrivals and runs them, day queue first; night only when allowed.

    Hooks, all optional: ``night_allowed(now)`` (may night arrivals be claimed?) or the finer
    ``night_before(now)`` (night arrivals registered before the returned instant may; None: none),
    ``can_claim()`` (the disk guard), ``on_processed(arrival_id, outcome)`` (the report thread),
    ``on_start()`` (run first in the thread, each time it starts: the recorder's replay),
    ``on_idle()`` (run on each idle pass: the replay of ends an OS error left unfinished) and
    ``clock()`` (local time, so tests can put the worker in the night window).
    """

    def __init__(
        self,
        state: State,
        executor: Executor,
        clock: Callable[[], datetime] = datetime.now,
        *,
        night_allowed: Callable[[datetime], bool] = lambda now: True,
        can_claim: Callable[[], bool] = lambda: True,
        poll_seconds: float = 1.0,
        night_before: Callable[[datetime], datetime | None] | None = None,
        on_processed: Callable[[int, str], None] | None = None,
        night_batch: int = 1,
        max_inflight: int = 0,
        on_start: Callable[[], object] | None = None,
        on_idle: Callable[[], object] | None = None,
        prefetch_workers: int = 1,
    ) -> None:
        self.state = state
        self.on_start = on_start
        self.on_idle = on_idle
        self.executor = executor
        self.clock = clock
        self.night_batch = night_batch
        self.max_inflight = max_inflight
        self.prefetch_workers = prefetch_workers  # threads preparing at once (CPU pool processes)
        self.prefetcher: Prefetcher[list[Arrival], Handle] | None = None
        self.night_allowed = night_allowed
        self.night_before = night_before
        self.can_claim = can_claim
        self.on_processed = on_processed
        self.poll_seconds = poll_seconds
        self.stop_event = threading.Event()
        self.wake_event = threading.Event()
        self.current: int | None = None
        self.current_since: float | None = None
        self.last_beat = time.time()
        self.idle_passes = 0
        self.processed = 0
        self._held: set[int] = set()  # prepared or claimed here, not yet completed
        self._unreleased: set[int] = set()  # to go back to the queue; the database refused so far
        self._thread: threading.Thread | None = None
        self.fault: str | None = None  # why finishing failed last (plain words, no outside text)
        self._retry_at = 0.0  # monotonic: no claim before this, after a fault (backing off)
        self._backoff = 0.0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.stop_event.clear()
        self._thread = threading.Thread(target=self._loop, name="ctwatch-worker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake_event.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the loop
    def night_cutoff(self, now: datetime) -> str | None:
        """The stored-timestamp bound for night arrivals at ``now`` (None: day queue only)."""
        if self.night_before is None:
            return FAR_FUTURE if self.night_allowed(now) else None
        before = self.night_before(now)
        return None if before is None else before.astimezone(UTC).isoformat(timespec="seconds")

    def _loop(self) -> None:
        pool = (
            Prefetcher(self._prepare_ahead, self.max_inflight, min(self.prefetch_workers, self.max_inflight))
            if self.max_inflight > 0
            else None
        )
        self.prefetcher = pool
        try:
            self._release(self._held | self._unreleased, "restart")  # left by a previous life of this thread
            if self.on_start is not None:  # e.g. finish recorded ends a crash or a dead thread left
                self._guarded("on_start", self.on_start)
            while not self.stop_event.is_set():
                self.last_beat = time.time()
                handled = self._run_prefetched(pool) if pool is not None else 0
                if not handled and not self.stop_event.is_set():
                    handled = self._run_claimed()
                if not handled:
                    if self._unreleased:
                        self._release(set(self._unreleased), "fault")
                    if self.on_idle is not None:
                        self._guarded("on_idle", self.on_idle)
                    self.idle_passes += 1
                    self.wake_event.wait(self.poll_seconds)
                    self.wake_event.clear()
        except BaseException:  # a bug outside any arrival: the supervisor starts us again
            log.exception("worker.crashed current=%s: held arrivals go back to the queue", self.current)
            raise
        finally:
            if pool is not None:
                pool.close()
            self._release(set(self._held), "shutdown")
            self.executor.close()

    def _guarded(self, what: str, hook: Callable[[], object]) -> None:
        """Run a hook; an error in it is logged and tried again later, never the end of the loop."""
        try:
            hook()
        except Exception:  # noqa: BLE001 — e.g. the database locked by another process for a while
            log.exception("worker.%s_failed: tried again on the next pass", what)

    def _release(self, ids: set[int], reason: str) -> None:
        """Prepared or claimed here and never completed: back to the queue, uncharged. An id the
        database refuses now (locked, disk full) is kept and tried again on the next idle pass."""
        for arrival_id in sorted(ids):
            self._held.discard(arrival_id)
            try:
                self.state.release(arrival_id)
            except sqlite3.Error:
                log.exception("arrival.release_failed arrival=%s: tried again later", arrival_id)
                self._unreleased.add(arrival_id)
                continue
            self._unreleased.discard(arrival_id)
            log.info("arrival.released arrival=%s reason=%s", arrival_id, reason)

    def _run_claimed(self) -> int:
        """Claim the next arrival (and, at night, a batch) and run both stages here."""
        batch = self._take_batch(prepare=False)
        if not batch:
            return 0
        self._finish(
            batch,
            lambda: self.executor.complete(
                self.executor.prepare(batch, self.stop_event.is_set), self.stop_event.is_set
            ),
        )
        return 1

    def _run_prefetched(self, pool: Prefetcher[list[Arrival], Handle]) -> int:
        """The CPU stage of the next batches in the prefetch thread while this thread completes."""
        handled = 0
        for item in pool.map(self._prepared_batches()):
            batch = item.job
            if isinstance(item.error, UrgentFirst):  # put back; held again if taken again meanwhile
                self._held.difference_update(
                    a.id for a in batch if self.state.arrival(a.id).state == "pending"
                )
            elif isinstance(item.error, WORLD_ERRORS):  # e.g. the database locked: retried, not failed
                self._faulted(batch, item.error)
            elif item.error is not None:
                reason = f"internal error: {type(item.error).__name__}: {item.error}"
                self._finish(batch, functools.partial(self.executor.fail, batch, reason))
            else:
                assert item.value is not None
                self._finish(
                    batch, functools.partial(self.executor.complete, item.value, self.stop_event.is_set)
                )
            # let the finished batch go (its volumes are hundreds of MB) before waiting for the next
            del item
            handled += 1
            if self.stop_event.is_set():
                break
        return handled

    def _prepare_ahead(self, batch: list[Arrival]) -> Handle:
        """In the prefetch thread: the batch is claimed (``running``, charged) when its work starts —
        unless it is routine and an urgent arrival waits (in the queue, or taken ahead behind it):
        then it goes back to the queue untouched (:class:`UrgentFirst`), at its place: it is taken
        again right after the urgent one."""
        if not any(a.priority == Priority.URGENT for a in batch) and self.state.urgent_waiting():
            for arrival in batch:
                self.state.release(arrival.id)  # prepared → pending; no attempt was charged
            log.info("worker.urgent_first put_back=%s", [a.id for a in batch])
            raise UrgentFirst([a.id for a in batch])
        claimed = [self.state.claim(arrival.id) or arrival for arrival in batch]
        handle = self.executor.prepare(claimed, self.stop_event.is_set)
        for arrival in batch:
            fault_point("prefetch.prepared", arrival.name)
        return handle

    def _prepared_batches(self) -> Iterator[list[Arrival]]:
        """Batches taken as ``prepared`` while there is work; ends at an empty queue or at an
        arrival that must run alone (``isolate``), which :meth:`_run_claimed` then takes."""
        while not self.stop_event.is_set():
            batch = self._take_batch(prepare=True)
            if not batch:
                return
            yield batch

    def _take_batch(self, *, prepare: bool) -> list[Arrival]:
        """The next arrival (plus a night batch) taken as ``prepared`` or claimed ``running``.

        Empty when the queue is empty, claims are paused (disk guard), or — when preparing — the
        next arrival must run alone. A night batch ends early at an urgent arrival (the next in line).
        """
        try:
            first = self._take(prepare=prepare, alone_ok=not prepare)
            if first is None:
                return []
            batch = [first]
            while first.night and not first.isolate and len(batch) < self.night_batch:
                more = self._take(prepare=prepare, alone_ok=False, night_only=True)
                if more is None:
                    break
                batch.append(more)
            return batch
        except WORLD_ERRORS:  # e.g. the database locked, the disk full; wait and try again
            log.exception("worker.claim_failed db=%s", self.state.path)
            return []

    def _take(self, *, prepare: bool, alone_ok: bool, night_only: bool = False) -> Arrival | None:
        if time.monotonic() < self._retry_at or not self.can_claim():
            return None
        candidate = self.state.peek_next(self.night_cutoff(self.clock()))
        if candidate is None or (candidate.isolate and not alone_ok) or (night_only and not candidate.night):
            return None
        taken = self.state.prepare(candidate.id) if prepare else self.state.claim(candidate.id)
        if taken is not None:
            self._held.add(taken.id)
            fault_point("arrival.claimed", taken.name)
            if taken.isolate:
                log.info(
                    "arrival.isolated arrival=%s: it was in flight with others when the process died; "
                    "it runs alone",
                    taken.id,
                )
        return taken

    def _finish(self, batch: list[Arrival], run: Callable[[], list[ArrivalState]]) -> None:
        self.current, self.current_since = batch[0].id, time.time()
        try:
            outcomes = run()
        except WORLD_ERRORS as exc:  # the outbox, the disk or the database, not the input
            self._faulted(batch, exc)
            return
        except Exception as exc:  # noqa: BLE001 — a bug while finishing: this batch fails, we go on
            log.exception("worker.finish_crashed arrivals=%s", [a.id for a in batch])
            try:
                outcomes = self._fail_unrecorded(batch, f"internal error: {type(exc).__name__}: {exc}")
            except WORLD_ERRORS as world:  # and then the outbox or the database failed too
                self._faulted(batch, world)
                return
        finally:
            self.current = self.current_since = None
        self._held.difference_update(a.id for a in batch)
        self.fault, self._backoff = None, 0.0
        self.processed += len(batch)
        if self.on_processed is not None:
            for arrival, outcome in zip(batch, outcomes, strict=True):
                self.on_processed(arrival.id, outcome)

    def paused_reason(self) -> str | None:
        """Why claims are paused right now (after a fault, until its back-off ends), else None."""
        return self.fault if self.fault is not None and time.monotonic() < self._retry_at else None

    def _faulted(self, batch: list[Arrival], exc: BaseException) -> None:
        """Finishing failed because of the world (read-only outbox, full disk, database locked or
        gone): the batch goes back to the queue uncharged (an end already recorded is placed by
        the replay), and claims pause with a doubling back-off until the cause goes away."""
        now = time.monotonic()
        if now >= self._retry_at:  # failed again after the back-off: wait longer (batches in flight
            # together that meet the same fault, e.g. prefetched ones, count once)
            self._backoff = min(FAULT_MAX_BACKOFF, self._backoff * 2 or FAULT_FIRST_BACKOFF)
            self._retry_at = now + self._backoff
        self.fault = (
            f"processing paused: {fault_text(exc)}; the arrival goes back to the queue and is tried "
            f"again in {self._backoff:.0f} s (see state/ctwatch.log)"
        )
        log.error(
            "worker.finish_failed arrivals=%s retry_in=%.0f: %s",
            [a.id for a in batch],
            self._backoff,
            fault_text(exc),
            exc_info=None if isinstance(exc, Unavailable) else exc,  # a known condition, said in words
        )
        self._release({a.id for a in batch}, "fault")

    def _fail_unrecorded(self, batch: list[Arrival], reason: str) -> list[ArrivalState]:
        """Record ``reason`` as the end of each arrival of the batch whose end is not recorded yet."""
        outcomes = []
        for arrival in batch:
            now = self.state.arrival(arrival.id)
            if now.state in (ArrivalState.RUNNING, ArrivalState.PREPARED):
                outcomes.extend(self.executor.fail([now], reason))
            else:
                outcomes.append(ArrivalState(now.state))
        return outcomes


class UrgentFirst(Exception):  # noqa: N818 — a signal between the worker's threads, not an error
    """A routine batch taken ahead was put back in the queue because urgent work waits."""


WORLD_ERRORS = (OSError, sqlite3.Error, Unavailable)
FAULT_FIRST_BACKOFF = 5.0
FAULT_MAX_BACKOFF = 60.0


def fault_text(exc: BaseException) -> str:
    """What went wrong, in plain words without a path, a name or any text from outside."""
    if isinstance(exc, Unavailable):
        return str(exc)
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
        return f"the state database refused a write ({code})"
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        return f"a file could not be read, written or moved ({os_error_words(exc)}, {name})"
    return f"a file could not be read, written or moved ({type(exc).__name__})"
