"""What runs inside a CPU pool process (:mod:`processor.cpupool`): its set-up and its two calls
per batch.

:func:`init` sets a process up (Ctrl-C left to the daemon, an exit the moment the daemon is gone,
log records sent to the daemon through the process's own pipe, the daemon's pipeline compiled and
its digest checked); :func:`open_batch` opens, scans and plans a batch and keeps its archives open;
:func:`run_batch` runs the CPU steps over it with the result paths the daemon reserved and hands
the prepared batch back packed (:mod:`processor.handoff`).
"""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from processor.config import Settings
from processor.errors import ConfigError
from processor.executor import LocalExecutor, Prepared, study_keys
from processor.handoff import Packed, pack
from processor.hugepages import hand_volumes_off
from processor.state import Arrival


class ToDaemon:
    """The "queue" of a pool process's :class:`logging.handlers.QueueHandler`: its own pipe to the
    daemon, written by this process alone (the handler's lock orders its threads)."""

    def __init__(self, conn: multiprocessing.connection.Connection) -> None:
        self.conn = conn

    def put_nowait(self, record: logging.LogRecord) -> None:
        self.conn.send(record)


_EXECUTOR: LocalExecutor | None = None
_STOP: Any = None  # the slot's stop flag (a shared ctypes bool)
_BATCH: tuple[ExitStack, Prepared] | None = None


def init(
    build: Callable[[Settings, str, str | None], LocalExecutor],
    settings: Settings,
    device: str,
    digest: str,
    text: str | None,
    level: int,
    stop: Any,
    to_daemon: multiprocessing.connection.Connection,
) -> None:
    """Set up a pool process: logs to the daemon, Ctrl-C left to the daemon, the pipeline compiled."""
    global _EXECUTOR, _STOP
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon stops us through ``stop``
    hand_volumes_off()  # each volume goes to the daemon through shared memory
    _exit_with_the_daemon()
    root = logging.getLogger()
    to_daemon_queue: Any = ToDaemon(to_daemon)  # QueueHandler calls put_nowait only
    root.handlers[:] = [logging.handlers.QueueHandler(to_daemon_queue)]
    root.setLevel(level)
    executor = build(settings, device, text)
    if executor.pipeline.digest != digest:
        raise ConfigError(
            f"a CPU worker process compiled another pipeline than the daemon's ({settings.pipeline}); "
            "restart the daemon"
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


def open_batch(arrivals: list[Arrival], located: dict[int, str | None]) -> list[tuple[int, str]]:
    """First call per batch: open, scan and plan; the archives stay open for :func:`_run`."""
    global _BATCH
    assert _EXECUTOR is not None and _STOP is not None
    _drop_batch()
    stack = ExitStack()
    try:
        prepared = _EXECUTOR.open_batch(
            arrivals,
            stack,
            _stop_requested,
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


def run_batch(paths: list[Path]) -> Packed:
    """Second call per batch: the CPU steps over the studies, given their reserved result paths;
    the prepared batch goes back packed (its volumes through shared memory, :mod:`processor.handoff`)."""
    global _BATCH
    assert _EXECUTOR is not None and _STOP is not None and _BATCH is not None
    stack, prepared = _BATCH
    _BATCH = None
    with stack:
        if not prepared.stopped:
            _EXECUTOR.attach_paths(prepared, paths)
            _EXECUTOR.run_cpu_steps(prepared, _stop_requested)
    daemon = multiprocessing.parent_process()
    return pack(prepared, daemon.pid if daemon is not None and daemon.pid is not None else os.getppid())


def _stop_requested() -> bool:
    return bool(_STOP.value)


def _drop_batch() -> None:
    global _BATCH
    if _BATCH is not None:
        _BATCH[0].close()
        _BATCH = None
