"""The CPU worker pool: the CPU stage of arrivals in processes of their own (issue 18).

The worker thread owns the GPU; reading an arrival, decoding its pixels and the CPU steps hold the
interpreter's GIL for seconds per study, so one process cannot keep a GPU busy. :class:`CpuPool`
runs that stage in ``worker.cpu_workers`` processes, each a
:class:`concurrent.futures.ProcessPoolExecutor` of **one** process (a *slot*), started with
``spawn`` (the daemon has threads; ``fork`` would copy their locks):

- **One study's crash is its own.** A slot whose process dies (a decoder fault, the OOM killer)
  fails only the call it was running (:class:`PoolProcessDied`, with the exit code); the slot is
  started again. A pool of several processes would break every call in flight.
- **The recorder stays the only writer.** A pool process opens the state database read-only.
  Between its two calls per batch — :func:`_open` (open, scan, plan the studies) and
  :func:`_run` (the CPU steps) — the daemon's recorder reserves each study's result path, so two
  arrivals in different processes never share one (:meth:`StudyRecorder.json_path`). The
  prepared batch comes back pickled, its members without their closed archives
  (:meth:`processor.bytesource.Member.__reduce__`), and the daemon records it.
- **Same results.** A pool process compiles the same pipeline file; its digest is checked against
  the daemon's at start (:class:`ConfigError` otherwise). Steps run in the same code
  (:class:`~processor.executor.LocalExecutor`), so results equal the in-process path's.
- **Stop and logs.** A stop request reaches a pool process through an event it checks at every
  chunk read and between steps; its log records go to the daemon's handlers through a queue
  (:class:`logging.handlers.QueueListener`).

Memory is bounded by the caller: the worker's prefetcher takes at most ``max_inflight_studies``
batches ahead, and calls :meth:`CpuPool.prepare` from that many threads at most.
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from processor.config import Settings
from processor.errors import ConfigError
from processor.executor import Handle, LocalExecutor, Prepared, StopCheck, study_keys
from processor.handoff import Packed, pack, remove_stale, unpack
from processor.outputs.recorder import StudyRecorder
from processor.state import Arrival, State, crash_reason
from processor.vocab import ArrivalState

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often a waiting call looks at the stop request
START_SECONDS = 300.0  # a pool process that is not ready by then (compiling the pipeline) is an error


class PoolProcessDied(Exception):
    """The pool process preparing a batch died (killed, out of memory, a fault in native code)."""

    def __init__(self, exitcode: int | None) -> None:
        self.exitcode = exitcode
        super().__init__(f"the CPU worker process died ({exit_words(exitcode)})")


def exit_words(exitcode: int | None) -> str:
    """A process's exit code in words: ``killed by signal SIGKILL`` (e.g. the OOM killer), ``exit code 3``."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class _Slot:
    """One pool process: a one-process executor, started again after its process dies."""

    def __init__(self, index: int, initargs: tuple[Any, ...]) -> None:
        self.index = index
        self._initargs = initargs
        self.context = multiprocessing.get_context("spawn")
        self.stop: Event = self.context.Event()
        self.executor: ProcessPoolExecutor | None = None
        self.pid: int | None = None
        self.batches = 0
        self.deaths = 0

    def start(self) -> None:
        """Start the process and wait until its pipeline is compiled (ConfigError if it cannot be)."""
        self.executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=self.context,
            initializer=_init,
            initargs=(*self._initargs, self.stop),
        )
        try:
            self.pid = self.executor.submit(os.getpid).result(timeout=START_SECONDS)
        except Exception as exc:
            self.shutdown()
            raise ConfigError(
                f"a CPU worker process could not start ({type(exc).__name__}: {exc}); "
                "see state/ctwatch.log, or set worker.cpu_workers: 0 to run the CPU stage in the daemon"
            ) from exc
        log.info("cpu_pool.process_started slot=%d pid=%s", self.index, self.pid)

    def call(self, should_stop: StopCheck, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` in the process; a stop request is passed on while it runs."""
        assert self.executor is not None
        self.stop.clear()
        try:
            future: Future[Any] = self.executor.submit(fn, *args)
        except BrokenProcessPool as exc:  # died between two calls
            raise self._died() from exc
        while True:
            if should_stop():
                self.stop.set()
            try:
                return future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                continue
            except BrokenProcessPool as exc:
                raise self._died() from exc

    def _died(self) -> PoolProcessDied:
        exitcode = None
        processes = getattr(self.executor, "_processes", None) or {}  # the one process, by pid
        for process in list(processes.values()):
            process.join(timeout=5)
            exitcode = process.exitcode
        self.deaths += 1
        if self.pid is not None:
            remove_stale(writer=self.pid)  # a hand-off file it wrote and the daemon never mapped
        log.error(
            "cpu_pool.process_died slot=%d pid=%s %s: started again",
            self.index,
            self.pid,
            exit_words(exitcode),
        )
        self.shutdown()
        return PoolProcessDied(exitcode)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        self.pid = None


class CpuPool:
    """``processes`` pool processes preparing batches for :class:`PooledExecutor`'s worker.

    ``build(settings, device)``: a module-level function (pickled by name) that each process
    calls to compile its executor; ``executor``: the daemon's own, whose pipeline digest each
    process must get and whose recorder reserves the result paths.
    """

    def __init__(
        self,
        settings: Settings,
        executor: LocalExecutor,
        processes: int,
        *,
        device: str,
        build: Callable[[Settings, str], LocalExecutor],
    ) -> None:
        if processes < 1:
            raise ValueError(f"a CPU pool needs at least one process (got {processes})")
        self.executor = executor
        self._log_queue: multiprocessing.queues.Queue[logging.LogRecord] = multiprocessing.get_context(
            "spawn"
        ).Queue()
        self._listener = logging.handlers.QueueListener(
            self._log_queue, _Forward(), respect_handler_level=False
        )
        level = logging.getLogger().getEffectiveLevel()
        initargs = (build, settings, device, executor.pipeline.digest, self._log_queue, level)
        self._slots = [_Slot(index, initargs) for index in range(processes)]
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    @property
    def size(self) -> int:
        return len(self._slots)

    def start(self) -> None:
        """Start every process (in parallel) and wait for each to be ready; ConfigError if one cannot."""
        with self._lock:
            if self._started:
                return
            self._listener.start()
            errors: list[BaseException] = []

            def start(slot: _Slot) -> None:
                try:
                    slot.start()
                except BaseException as exc:  # noqa: BLE001 — raised below, after every slot is tried
                    errors.append(exc)

            threads = [
                threading.Thread(target=start, args=(s,), name="ctwatch-pool-start") for s in self._slots
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                for slot in self._slots:
                    slot.shutdown()
                self._listener.stop()
                raise errors[0]
            for slot in self._slots:
                self._free.put(slot)
            self._started = True

    def prepare(self, arrivals: Sequence[Arrival], should_stop: StopCheck) -> Prepared:
        """The CPU stage of ``arrivals`` (claimed, ``running``) in a free pool process; blocks.

        :class:`PoolProcessDied` when the process died meanwhile (it is started again for the next
        call); ``OSError`` / ``sqlite3.Error`` from the process as :meth:`LocalExecutor.prepare`
        raises them; :class:`ConfigError` when a process cannot be started again.
        """
        self.start()
        slot = self._free.get()
        try:
            if slot.executor is None:
                slot.start()
            located = {a.id: _located(self.executor, a) for a in arrivals}
            keys = slot.call(should_stop, _open, list(arrivals), located)
            by_id = {a.id: a for a in arrivals}
            paths = self.executor.reserve_paths([(by_id[aid], uid) for aid, uid in keys])
            prepared: Prepared = unpack(slot.call(should_stop, _run, paths))
            slot.batches += 1
            return prepared
        finally:
            self._free.put(slot)

    def processes(self) -> list[dict[str, Any]]:
        """Each pool process: ``{"slot", "pid", "alive", "batches", "deaths"}`` (for status)."""
        return [
            {
                "slot": s.index,
                "pid": s.pid,
                "alive": s.executor is not None,
                "batches": s.batches,
                "deaths": s.deaths,
            }
            for s in self._slots
        ]

    def close(self) -> None:
        """Stop every process (after the call it runs returns) and the log forwarding."""
        with self._lock:
            for slot in self._slots:
                slot.stop.set()
                slot.shutdown()
            if self._started:
                self._listener.stop()
            self._started = False


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


def _located(executor: LocalExecutor, arrival: Arrival) -> str | None:
    path = executor.recorder.locate(arrival)
    return None if path is None else str(path)


class _Forward(logging.Handler):
    """Hands a pool process's log record to this process's handlers, as if logged here."""

    def emit(self, record: logging.LogRecord) -> None:
        record.processName = "cpu-pool"
        logging.getLogger(record.name).handle(record)


# ---------------------------------------------------------------------- in the pool process
_EXECUTOR: LocalExecutor | None = None
_STOP: Event | None = None
_BATCH: tuple[ExitStack, Prepared] | None = None


def _init(
    build: Callable[[Settings, str], LocalExecutor],
    settings: Settings,
    device: str,
    digest: str,
    log_queue: Any,
    level: int,
    stop: Event,
) -> None:
    """Set up a pool process: logs to the daemon, Ctrl-C left to the daemon, the pipeline compiled."""
    global _EXECUTOR, _STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon stops us through ``stop``
    _exit_with_the_daemon()
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    root.setLevel(level)
    executor = build(settings, device)
    if executor.pipeline.digest != digest:
        raise ConfigError(
            f"the pipeline file {settings.pipeline} changed after the daemon started; restart the daemon"
        )
    _EXECUTOR, _STOP = executor, stop


def _exit_with_the_daemon() -> None:
    """End this process the moment the daemon is gone (``kill -9``, the OOM killer): nothing of a
    dead daemon's may go on reading inputs or writing previews beside the next daemon's work."""
    parent = multiprocessing.parent_process()
    if parent is None:  # pragma: no cover - always set in a spawned process
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="ctwatch-daemon-watch", daemon=True).start()


def _open(arrivals: list[Arrival], located: dict[int, str | None]) -> list[tuple[int, str]]:
    """First call per batch: open, scan and plan; the archives stay open for :func:`_run`."""
    global _BATCH
    assert _EXECUTOR is not None and _STOP is not None
    _drop_batch()
    stack = ExitStack()
    try:
        prepared = _EXECUTOR.open_batch(
            arrivals,
            stack,
            _STOP.is_set,
            lambda a: None if located[a.id] is None else Path(located[a.id] or ""),
        )
    except OSError as exc:  # e.g. EarlierPartFault: sent back plain, so that it unpickles
        stack.close()
        raise OSError(exc.errno, exc.strerror or str(exc)) from None
    except BaseException:
        stack.close()
        raise
    _BATCH = (stack, prepared)
    if prepared.stopped:
        return []
    return [(arrival.id, uid) for arrival, uid in study_keys(prepared)]


def _run(paths: list[Path]) -> Packed:
    """Second call per batch: the CPU steps over the studies, given their reserved result paths;
    the prepared batch goes back packed (its volumes through shared memory, :mod:`processor.handoff`)."""
    global _BATCH
    assert _EXECUTOR is not None and _STOP is not None and _BATCH is not None
    stack, prepared = _BATCH
    _BATCH = None
    with stack:
        if not prepared.stopped:
            _EXECUTOR.attach_paths(prepared, paths)
            _EXECUTOR.run_cpu_steps(prepared, _STOP.is_set)
    daemon = multiprocessing.parent_process()
    return pack(prepared, daemon.pid if daemon is not None and daemon.pid is not None else os.getppid())


def _drop_batch() -> None:
    global _BATCH
    if _BATCH is not None:
        _BATCH[0].close()
        _BATCH = None
