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
  Between its two calls per batch — :func:`~processor.cpupool_process.open_batch` (open, scan, plan the studies) and
  :func:`~processor.cpupool_process.run_batch` (the CPU steps) — the daemon's recorder reserves each study's result path, so two
  arrivals in different processes never share one (:meth:`StudyRecorder.json_path`). The
  prepared batch comes back pickled, its members without their closed archives
  (:meth:`processor.bytesource.Member.__reduce__`), and the daemon records it.
- **Same results.** A pool process compiles the daemon's pipeline — the file's text as the daemon
  read it at start, so a process started again after the file was edited still runs the pipeline
  the daemon records; its digest is checked against the daemon's (:class:`ConfigError` otherwise).
  Steps run in the same code (:class:`~processor.executor.LocalExecutor`), so results equal the
  in-process path's.
- **A death is charged to what was in it.** A process found dead before a batch (killed while it
  waited) is started again and charges no one; one that dies with a batch in it charges that batch
  (:class:`~processor.executor_pool.PooledExecutor`). One that cannot be started again (:class:`Unavailable`) sends the
  batch back uncharged and pauses the worker, with the reason on ``/health``.
- **Stop and logs.** A stop request reaches a pool process through a flag in shared memory it
  reads at every chunk read and between steps; its log records go to the daemon's handlers through
  a pipe of its own, made anew at each start (a :class:`logging.handlers.QueueHandler` writing to
  it). Neither has a lock shared between processes: a process killed while it held one (inside
  :class:`multiprocessing.Event`'s ``is_set()`` at a chunk read, or while writing a log record to
  a shared queue) would leave it held for good, and the daemon's next batch and its stop would
  wait on it forever.

Memory is bounded by the caller: the worker's prefetcher takes at most ``max_inflight_studies``
batches ahead, and calls :meth:`CpuPool.prepare` from that many threads at most.
"""

from __future__ import annotations

import ctypes
import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from processor import cpupool_process
from processor.config import Settings
from processor.errors import ConfigError, Unavailable
from processor.executor import LocalExecutor, Prepared, StopCheck
from processor.handoff import remove_stale, unpack
from processor.state import Arrival

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often a waiting call looks at the stop request
START_SECONDS = 300.0  # a pool process that is not ready by then (compiling the pipeline) is an error
STUCK_LIMITS = 3  # a call is stuck after 3 × limits.max_seconds_per_arrival per arrival
LOG_DRAIN_SECONDS = 5.0  # how long a stopped process's last log records may take to arrive


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
        self.stop: Any = self.context.RawValue(ctypes.c_bool, False)  # no lock: see the module doc
        self.executor: ProcessPoolExecutor | None = None
        self.pid: int | None = None
        self.batches = 0
        self.deaths = 0
        self._logs: threading.Thread | None = None

    def start(self) -> None:
        """Start the process and wait until its pipeline is compiled (ConfigError if it cannot be)."""
        logs, to_daemon = self.context.Pipe(duplex=False)
        self.executor = ProcessPoolExecutor(
            max_workers=1,
            mp_context=self.context,
            initializer=cpupool_process.init,
            initargs=(*self._initargs, self.stop, to_daemon),
        )
        self._logs = threading.Thread(
            target=_forward_logs, args=(logs,), name=f"ctwatch-pool-logs-{self.index}", daemon=True
        )
        self._logs.start()
        try:
            self.pid = self.executor.submit(os.getpid).result(timeout=START_SECONDS)
        except Exception as exc:
            self.shutdown()
            raise ConfigError(
                f"a CPU worker process could not start ({type(exc).__name__}: {exc}); "
                "see state/ctwatch.log, or set worker.cpu_workers: 0 to run the CPU stage in the daemon"
            ) from exc
        finally:
            to_daemon.close()  # the process holds its own end: the forwarding ends when it is gone
        log.info("cpu_pool.process_started slot=%d pid=%s", self.index, self.pid)

    def alive(self) -> bool:
        """Whether the process is running: started, and not seen dead by its executor since."""
        return self.executor is not None and not getattr(self.executor, "_broken", False)

    def died_idle(self) -> None:
        """The process died between two batches (``kill -9``, the OOM killer choosing it while it
        waited): no batch was in it, so none is charged; it is started again for the next."""
        self._died("while idle, no arrival in it")

    def call(self, should_stop: StopCheck, fn: Any, *args: Any, limit: float | None = None) -> Any:
        """``fn(*args)`` in the process; a stop request is passed on while it runs. A call still
        running after ``limit`` seconds (a decoder or a step stuck in native code, which no check
        inside the process can stop) has its process killed: :class:`PoolProcessDied`, charged to
        the batch as any death is."""
        assert self.executor is not None
        self.stop.value = False
        deadline = None if limit is None else time.monotonic() + limit
        try:
            future: Future[Any] = self.executor.submit(fn, *args)
        except BrokenProcessPool as exc:  # died between two calls
            raise self._died() from exc
        while True:
            if should_stop():
                self.stop.value = True
            try:
                return future.result(timeout=POLL_SECONDS)
            except TimeoutError:
                if deadline is not None and time.monotonic() > deadline and self.pid is not None:
                    log.error(
                        "cpu_pool.process_stuck slot=%d pid=%s seconds=%.0f: killed, its batch charged",
                        self.index,
                        self.pid,
                        limit,
                    )
                    deadline = None
                    os.kill(self.pid, signal.SIGKILL)
                continue
            except BrokenProcessPool as exc:
                raise self._died() from exc

    def _died(self, when: str = "with a batch in it") -> PoolProcessDied:
        exitcode = None
        processes = getattr(self.executor, "_processes", None) or {}  # the one process, by pid
        for process in list(processes.values()):
            process.join(timeout=5)
            exitcode = process.exitcode
            # The executor's own thread reaps it too: the loser of the two waits sees no code until
            # the winner has stored it, a moment later.
            deadline = time.monotonic() + 1.0
            while exitcode is None and time.monotonic() < deadline:
                time.sleep(0.01)
                exitcode = process.exitcode
        self.deaths += 1
        if self.pid is not None:
            remove_stale(writer=self.pid)  # a hand-off file it wrote and the daemon never mapped
        log.error(
            "cpu_pool.process_died slot=%d pid=%s %s, %s: started again",
            self.index,
            self.pid,
            exit_words(exitcode),
            when,
        )
        self.shutdown()
        return PoolProcessDied(exitcode)

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        if self._logs is not None:  # the process is gone: its last records are forwarded
            self._logs.join(timeout=LOG_DRAIN_SECONDS)
            self._logs = None
        self.pid = None


class CpuPool:
    """``processes`` pool processes preparing batches for :class:`~processor.executor_pool.PooledExecutor`.

    ``build(settings, device, text)``: a module-level function (pickled by name) that each process
    calls to compile its executor from the daemon's pipeline ``text``; ``executor``: the daemon's
    own, whose pipeline (text and digest) each process gets and whose recorder reserves the result
    paths.
    """

    def __init__(
        self,
        settings: Settings,
        executor: LocalExecutor,
        processes: int,
        *,
        device: str,
        build: Callable[[Settings, str, str | None], LocalExecutor],
    ) -> None:
        if processes < 1:
            raise ValueError(f"a CPU pool needs at least one process (got {processes})")
        self.executor = executor
        # A call running this long per arrival is stuck (reading stops itself at the limit, a
        # late series' earlier parts each get their own): its process is killed (see _Slot.call).
        self.stuck_seconds = STUCK_LIMITS * settings.limits.max_seconds_per_arrival
        level = logging.getLogger().getEffectiveLevel()
        pipeline = executor.pipeline
        initargs = (build, settings, device, pipeline.digest, pipeline.text or None, level)
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
                raise errors[0]
            for slot in self._slots:
                self._free.put(slot)
            self._started = True

    def prepare(self, arrivals: Sequence[Arrival], should_stop: StopCheck) -> Prepared:
        """The CPU stage of ``arrivals`` (claimed, ``running``) in a free pool process; blocks.

        :class:`PoolProcessDied` when the process died meanwhile (it is started again for the next
        call); ``OSError`` / ``sqlite3.Error`` from the process as :meth:`LocalExecutor.prepare`
        raises them; :class:`Unavailable` when a process cannot be started again (the worker sends
        the batch back uncharged and pauses; the next call tries to start it again).
        """
        self.start()
        slot = self._free.get()
        try:
            if slot.executor is not None and not slot.alive():  # died since its last batch
                slot.died_idle()
            if slot.executor is None:
                try:
                    slot.start()
                except ConfigError as exc:  # e.g. the weights manifest edited into invalid YAML
                    raise Unavailable("a CPU worker process could not be started again") from exc
            located = {a.id: _located(self.executor, a) for a in arrivals}
            limit = self.stuck_seconds * len(arrivals)
            keys = slot.call(should_stop, cpupool_process.open_batch, list(arrivals), located, limit=limit)
            by_id = {a.id: a for a in arrivals}
            paths = self.executor.reserve_paths([(by_id[aid], uid) for aid, uid in keys])
            try:
                prepared: Prepared = unpack(
                    slot.call(should_stop, cpupool_process.run_batch, paths, limit=limit)
                )
            except BaseException:  # the batch goes back (or is charged): its reserved paths are free again
                for arrival in arrivals:
                    self.executor.recorder.release(arrival)
                raise
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
                "alive": s.alive(),
                "batches": s.batches,
                "deaths": s.deaths,
            }
            for s in self._slots
        ]

    def close(self) -> None:
        """Stop every process (after the call it runs returns) and its log forwarding."""
        with self._lock:
            for slot in self._slots:
                slot.stop.value = True
                slot.shutdown()
            self._started = False


def _located(executor: LocalExecutor, arrival: Arrival) -> str | None:
    path = executor.recorder.locate(arrival)
    return None if path is None else str(path)


def _forward_logs(logs: multiprocessing.connection.Connection) -> None:
    """Hand each log record a pool process sends to this process's handlers, as if logged here,
    until the process is gone (its end of the pipe closed)."""
    with logs:
        while True:
            try:
                record: logging.LogRecord = logs.recv()
            except (EOFError, OSError):
                return
            except Exception:  # noqa: BLE001 — one record that does not unpickle; the next ones come
                log.warning("cpu_pool.log_record_lost", exc_info=True)
                continue
            record.processName = "cpu-pool"
            logging.getLogger(record.name).handle(record)
