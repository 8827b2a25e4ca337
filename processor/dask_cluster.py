"""The coordinator's link to Dask (issue 19): a :class:`distributed.Client` on a LocalCluster the
daemon starts, or on an outside scheduler, kept connected.

An outside scheduler may be down when the daemon starts, or go away later: the daemon starts
anyway, and a thread of its own connects again every :data:`RECONNECT_SECONDS` (a Dask client
that failed to reconnect within its timeout closes itself for good). Meanwhile :meth:`fault` says
why nothing is processed, for ``/health``; submissions raise
:class:`~processor.errors.Unavailable` (the batch goes back uncharged). Every question to the
scheduler is bounded (:data:`ASK_SECONDS`), so a hung scheduler holds neither the status page nor
the worker.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from processor.config import DaskSettings, Settings, usable_cores
from processor.dask_batch import Batch
from processor.errors import Unavailable
from processor.redact import redact_url

log = logging.getLogger(__name__)

STATS_SECONDS = 2.0  # the workers' figures for status are at most this old
ASK_SECONDS = 5.0  # the longest a question to the scheduler may take
RECONNECT_SECONDS = 5.0  # how often a lost outside scheduler is tried again
WORKERLESS_FAULT_SECONDS = 15.0  # no GPU worker this long (not a nanny's restart): a fault on /health
RESTART_SECONDS = 60.0  # how long a worker restart (a stuck task's) may take


# Dask's periodic work that ctwatch has no use for, made rarer on its workers and the LocalCluster's
# scheduler: on 2 cores an idle LocalCluster of one worker took 0.07 cores with Dask's defaults and
# 0.02 with these, and a 2 s task 0.10-0.15 CPU-s more than its own (0.03 with these; bench/README.md
# "Dask executor"). None of it detects failures: a worker lost is seen when its connection closes
# or its heartbeats stop (kept as they are), a dead worker process by its nanny.
QUIET = {
    # the check that the event loop is not blocked (a warning past tick.limit, 3 s): every 20 ms
    "distributed.admin.tick.interval": "1s",
    # the CPU / memory / network figures of the dashboard (none here): every 500 ms
    "distributed.admin.system-monitor.interval": "2s",
    # the dashboard's statistical profiler, which samples every thread's stack every 10 ms
    "distributed.worker.profile.enabled": False,
}


def worker_environ(n_workers: int) -> dict[str, str | None]:
    """The environment Dask's nanny gives each worker process (``distributed.nanny.pre-spawn-environ``;
    a variable the operator set in the environment wins, None unsets one), changed from Dask's
    defaults so that steps run on a worker as they run in the daemon:

    - the thread counts of numpy's and torch's math libraries: the cores shared out among
      ``n_workers`` (at least 1), not Dask's 1, which would run CPU steps and CPU inference on one core;
    - ``MALLOC_TRIM_THRESHOLD_`` unset: Dask's 65536 turns glibc's dynamic mmap threshold off, so each
      volume and mask is mapped and faulted in afresh (measured on the weight-free steps of a
      300-slice study: 2.11 → 2.67 CPU-s, minor faults ×7.5; bench/README.md "Dask executor")."""
    import dask
    import distributed  # noqa: F401 — loads distributed's configuration defaults

    configured = dask.config.get("distributed.nanny.pre-spawn-environ") or {}
    environ: dict[str, str | None] = {str(k): None if v is None else str(v) for k, v in configured.items()}
    environ["MALLOC_TRIM_THRESHOLD_"] = None
    share = str(max(1, usable_cores() // max(1, n_workers)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environ[name] = share
    return environ


class DaskCluster:
    """See the module docstring. ``device``: what LocalCluster workers run on (the daemon's)."""

    def __init__(self, settings: Settings, dask: DaskSettings, device: str) -> None:
        self.settings = settings
        self.dask = dask
        self.device = device
        self.client: Any = None
        self.cluster: Any = None
        self._lock = threading.Lock()
        self._stats: tuple[float, list[dict[str, Any]]] = (0.0, [])
        self._gpu: tuple[float, int] = (0.0, 0)
        self._workerless_since: float | None = None
        self.restarting = 0  # worker restarts under way (stuck tasks)
        self._unreachable_since: datetime | None = None
        self._closing = threading.Event()
        self._keeper: threading.Thread | None = None
        # one thread asks the scheduler; a hung question leaves at most this one thread waiting
        self._asker = ThreadPoolExecutor(1, thread_name_prefix="ctwatch-dask-ask")
        # the status page's questions wait in a line of their own, never in front of the executor's
        self._status_asker = ThreadPoolExecutor(1, thread_name_prefix="ctwatch-dask-status")
        self._status_lock = threading.Lock()

    @property
    def address(self) -> str:
        """The scheduler's address, credentials (if any) removed: it is shown on ``/health``."""
        return redact_url(
            self.dask.scheduler or (self.cluster.scheduler_address if self.cluster is not None else "")
        )

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start the LocalCluster (its workers with the ctwatch plugin), or connect to the outside
        scheduler — and, when it cannot be reached now, keep trying in a thread."""
        if self.dask.local is not None:
            self._start_local()
            return
        self._connect()
        self._keeper = threading.Thread(target=self._keep_connected, name="ctwatch-dask-connect", daemon=True)
        self._keeper.start()

    def _start_local(self) -> None:
        import dask
        from distributed import Client, LocalCluster

        from processor.dask_worker import PLUGIN, CtwatchPlugin

        local = self.dask.local
        assert local is not None
        if local.resources.get("GPU", 0) < 1:
            raise Unavailable("executor.dask.local.resources must give each worker GPU: 1")
        settings = {
            **QUIET,
            # one batch per GPU worker at a time (executor_dask): no queued task to steal
            "distributed.scheduler.work-stealing": False,
            "distributed.scheduler.allowed-failures": self.dask.allowed_failures,
            "distributed.nanny.pre-spawn-environ": worker_environ(local.n_workers),
        }
        with dask.config.set(settings):
            self.cluster = LocalCluster(
                n_workers=local.n_workers,
                threads_per_worker=local.threads_per_worker,
                processes=True,
                resources=dict(local.resources),
                host="127.0.0.1",
                scheduler_port=0,
                dashboard_address=None,
                silence_logs=logging.WARNING,
            )
        client = Client(self.cluster, set_as_default=False)
        client.register_plugin(CtwatchPlugin(self.settings, self.device), name=PLUGIN)
        self._adopt(client)

    def _connect(self) -> bool:
        """One try at the outside scheduler (within ``connect_seconds``); False when unreachable."""
        from distributed import Client

        try:
            client = Client(self.dask.scheduler, timeout=self.dask.connect_seconds, set_as_default=False)
        except Exception as exc:  # noqa: BLE001 — OSError, TimeoutError: tried again shortly
            if self._unreachable_since is None:
                self._unreachable_since = datetime.now(UTC)
                log.error(
                    "dask.unreachable scheduler=%s: %s; trying again every %g s",
                    self.dask.scheduler,
                    exc,
                    RECONNECT_SECONDS,
                )
            return False
        old, self._unreachable_since = self.client, None
        self._adopt(client)
        if old is not None:
            quietly(old.close)
        return True

    def _adopt(self, client: Any) -> None:
        # the workers' records of ctwatch's own loggers, logged while they run a batch, go to the
        # daemon's log (state/ctwatch.log) beside the coordinator's
        client.forward_logging("processor", level=logging.getLogger("processor").getEffectiveLevel())
        with self._lock:
            if self._closing.is_set():  # closed while this connected: not kept
                quietly(client.close)
                return
            self.client = client
            self._gpu = (0.0, 0)
        log.info("dask.connected scheduler=%s", client.scheduler.address)

    def _keep_connected(self) -> None:
        while not self._closing.wait(RECONNECT_SECONDS):
            client = self.client
            if client is None or client.status not in ("running", "connecting", "newly-created"):
                if self._unreachable_since is None:
                    self._unreachable_since = datetime.now(UTC)
                    log.error("dask.disconnected scheduler=%s; connecting again", self.dask.scheduler)
                self._connect()

    def close(self) -> None:
        self._closing.set()
        if self._keeper is not None:
            self._keeper.join(self.dask.connect_seconds + ASK_SECONDS)
        self._asker.shutdown(wait=False, cancel_futures=True)
        self._status_asker.shutdown(wait=False, cancel_futures=True)
        if self.client is not None:
            quietly(self.client.close)
        if self.cluster is not None:
            quietly(self.cluster.close)
        self.client = self.cluster = None

    # ------------------------------------------------------------------ use
    def current(self) -> Any:
        """The client when it is connected, else None."""
        client = self.client
        return client if client is not None and client.status == "running" else None

    def submit(self, batch: Batch, key: str, packed: bytes | None = None) -> Any:
        """Submit ``batch`` as one task asking for ``resources={"GPU": 1}``: ``packed``, the batch
        as :func:`pack` makes it (packed here when None); :class:`Unavailable` while the scheduler
        cannot be reached."""
        client = self.current()
        if client is None:
            raise Unavailable(self.fault() or "the Dask scheduler cannot be reached")
        from processor.dask_worker import run_packed

        packed = pack(batch) if packed is None else packed
        return client.submit(run_packed, packed, key=key, resources={"GPU": 1}, pure=False, retries=0)

    def ours(self, future: Any) -> bool:
        """Whether ``future`` belongs to the client now connected (a lost client's never finish)."""
        return future.client is self.client and self.current() is not None

    def restart_worker_running(self, key: str) -> bool:
        """Restart (through its nanny, in the background) the worker running task ``key``: a task
        cannot be interrupted, and a hung one would hold its worker and GPU for good. False when
        no worker is found running it (then nothing is restarted). :attr:`restarting` counts the
        restarts under way, so no other batch is handed that worker meanwhile."""
        client = self.current()
        if client is None:
            return False
        try:
            processing = self._bounded(client.processing)
        except Exception as exc:  # noqa: BLE001
            log.warning("dask.restart_skipped key=%s: %s", key, exc)
            return False
        addresses = [address for address, keys in processing.items() if key in keys]
        if not addresses:
            return False

        def restart() -> None:
            try:
                outcome = client.restart_workers(addresses, timeout=RESTART_SECONDS, raise_for_error=False)
                log.warning("dask.worker_restarted workers=%s outcome=%s (a stuck task)", addresses, outcome)
            except Exception as exc:  # noqa: BLE001 — e.g. a worker without a nanny
                log.error("dask.worker_restart_failed workers=%s: %s", addresses, exc)
            finally:
                with self._lock:
                    self.restarting -= 1

        with self._lock:
            self.restarting += 1
        threading.Thread(target=restart, name="ctwatch-dask-restart", daemon=True).start()
        return True

    def _bounded(self, call: Callable[[], Any], asker: ThreadPoolExecutor | None = None) -> Any:
        """``call()`` given at most :data:`ASK_SECONDS` (``TimeoutError`` then)."""
        return (asker or self._asker).submit(call).result(timeout=ASK_SECONDS)

    def gpu_workers(self) -> int:
        """How many connected workers declare the GPU resource (at most :data:`STATS_SECONDS` old;
        0 while the scheduler cannot be reached)."""
        with self._lock:
            at, count = self._gpu
            if time.monotonic() - at < STATS_SECONDS:
                return count
            client = self.current()
            info: dict[str, Any] = {}
            if client is not None:
                try:
                    info = self._bounded(lambda: client.scheduler_info(n_workers=-1)).get("workers", {})
                except Exception as exc:  # noqa: BLE001 — a slow answer is not "no worker": keep the last
                    log.warning("dask.scheduler_slow: %s", exc)
                    self._gpu = (time.monotonic(), count)
                    return count
            # workers that can take a batch: not draining (closing_gracefully) nor paused
            count = sum(
                1
                for w in info.values()
                if w.get("resources", {}).get("GPU", 0) >= 1 and w.get("status", "running") == "running"
            )
            now = time.monotonic()
            self._gpu = (now, count)
            self._workerless_since = None if count else (self._workerless_since or now)
            return count

    def fault(self) -> str | None:
        """Why no batch can run now, in plain words for ``/health`` (None when workers are there)."""
        if self._unreachable_since is not None or (self.client is not None and self.current() is None):
            lost = self._unreachable_since or datetime.now(UTC)
            return (
                f"the Dask scheduler {self.address} cannot be reached (since "
                f"{lost.isoformat(timespec='seconds')}); processing waits and nothing is charged"
            )
        workers, since = self._gpu[1], self._workerless_since  # cached: /health never waits on Dask
        if workers == 0 and since is not None and time.monotonic() - since > WORKERLESS_FAULT_SECONDS:
            return (
                f"no Dask worker with the GPU resource is connected to {self.address}; processing "
                f"waits — start one with `python run.py worker --scheduler {self.address}`"
            )
        return None

    def workers(self) -> list[dict[str, Any]]:
        """Each worker's name, address, device, models loaded, batches in flight and done (at most
        :data:`STATS_SECONDS` old; the last known while the scheduler cannot be reached)."""
        if not self._status_lock.acquire(blocking=False):  # another request is asking: the last rows
            return self._stats[1] if self.current() is not None else []
        try:
            return self._workers()
        finally:
            self._status_lock.release()

    def _workers(self) -> list[dict[str, Any]]:
        at, cached = self._stats
        client = self.current()
        if time.monotonic() - at < STATS_SECONDS or client is None:
            return cached if client is not None else []
        from processor.dask_worker import worker_stats

        asker = self._status_asker
        try:
            info = self._bounded(lambda: client.scheduler_info(n_workers=-1), asker).get("workers", {})
            stats = self._bounded(
                lambda: client.run(worker_stats, on_error="return", wait=True, callback_timeout=ASK_SECONDS),
                asker,
            )
        except Exception as exc:  # noqa: BLE001 — status must answer while the scheduler is gone
            log.warning("dask.stats_failed: %s", exc)
            return cached
        rows = []
        for address, worker in sorted(info.items()):
            row = stats.get(address)
            row = row if isinstance(row, dict) else {"error": str(row)}
            rows.append(
                {
                    "address": address,
                    "name": str(worker.get("name", "")),
                    "resources": worker.get("resources", {}),
                    **row,
                }
            )
        self._stats = (time.monotonic(), rows)
        return rows


def pack(batch: Batch) -> bytes:
    """``batch`` pickled, as a task carries it (:func:`processor.dask_worker.run_packed`). Dask's
    scheduler unpickles a task's argument and pickles it again on its way to the worker; bytes it
    passes on as they are. A study's batch is mostly parsed headers (0.44 MB of Python objects for
    361 files): submitted as objects, a round trip took 0.16 s against 0.05 s packed, most of it in
    the coordinator's process between two tasks (bench/README.md "Dask executor")."""
    return pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)


def quietly(call: Callable[[], Any]) -> None:
    """``call()``, whose failure (a client already closed, a comm gone) changes nothing."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        log.debug("dask.ignored %s: %s", getattr(call, "__name__", call), exc)
