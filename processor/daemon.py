"""The composition root: builds every object from validated settings and runs the daemon."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from processor.config import NotificationSettings, Settings
from processor.cpupool import CpuPool
from processor.dask_cluster import DaskCluster
from processor.delivery import DeliveryService, routes_from_settings
from processor.errors import ConfigError, Deferred, os_error_words
from processor.executor import Executor, LocalExecutor
from processor.executor_dask import DaskExecutor
from processor.executor_pool import PooledExecutor
from processor.handoff import remove_stale
from processor.instance import InstanceLock
from processor.intake.archive import Limits
from processor.intake.orphans import adopt_orphans
from processor.intake.placement import Placements
from processor.intake.register import Intake, Notices
from processor.intake.watcher import InboxWatcher
from processor.lifecycle import Lifecycle, Supervisor
from processor.outputs.layout import OutboxLayout
from processor.outputs.notify import ReasonKind, arrival_outbound, enqueue_daily
from processor.outputs.recorder import StudyRecorder
from processor.outputs.report import ReportUpdater
from processor.outputs.sendback import ObjectMaker
from processor.pipeline.registry import StepRegistry
from processor.pipeline.spec import Pipeline, load_pipeline
from processor.pipeline.step import StepEnv
from processor.pipeline.weightfiles import weight_files_now
from processor.scheduler import (
    Housekeeping,
    NightWindow,
    Scheduler,
    apply_retention,
    done_roots,
    time_of_day,
)
from processor.state import Arrival, Outbound, State
from processor.status import Probes, StatusServer, pipeline_plan
from processor.status.cluster import executor_view
from processor.steps import default_registry
from processor.vocab import ArrivalState
from processor.weights import pinned_sha256
from processor.worker import Worker

if TYPE_CHECKING:
    from processor.models.cache import ModelCache

log = logging.getLogger(__name__)


def resolve_device_name(spec: str) -> str:
    """``auto|cpu|cuda[:N]`` → the concrete device; ``cuda`` without CUDA is a ConfigError.

    ``cpu`` needs no torch: a daemon whose pipeline runs no model then starts without importing it.
    Nor does ``auto`` on a machine with no GPU driver node (:mod:`processor.models.gpu_nodes`):
    torch could only answer "cpu" there.
    """
    text = spec.strip().lower()
    if text == "cpu":
        return "cpu"
    if text == "auto":
        from processor.models.gpu_nodes import gpu_device_nodes

        if not gpu_device_nodes():
            log.info("device.resolved spec=auto device=cpu reason=no GPU driver on this machine")
            return "cpu"
    from processor.models.device import resolve_device

    return str(resolve_device(spec))


def models_can_run(pipeline: Pipeline) -> bool:
    """Whether any model (GPU-stage) step of ``pipeline`` has every weight file it reads now."""
    for compiled in pipeline.steps:
        if compiled.step.device == "cpu":
            continue
        weights = weight_files_now(compiled.step)
        if weights.why is None and not weights.missing:
            return True
    return False


@dataclass
class Components:
    settings: Settings
    pipeline: Pipeline
    device: str
    models: ModelCache
    state: State
    intake: Intake
    # set by the recorder after a finish that queued sends; the delivery thread waits on it
    outbound_wake: threading.Event = field(default_factory=threading.Event)

    def recorder(self, state: State | None = None) -> StudyRecorder:
        """The one writer of results, receipts and final placements, on ``state`` (default: ours)."""
        placements = Placements(self.intake.layout_for)
        s = self.settings
        return StudyRecorder(
            state or self.state,
            OutboxLayout(self.settings.outbox),
            placements.for_arrival,
            device=self.device,
            pipeline={
                "name": self.pipeline.name,
                "version": self.pipeline.version,
                "digest": self.pipeline.digest,
            },
            objects=ObjectMaker(s.study_report, s.destinations, s.outbox, root=s.root),
            notifications=s.notifications,
            outbound_wake=self.outbound_wake,
        )

    def executor(self, state: State | None = None) -> LocalExecutor:
        s = self.settings
        return LocalExecutor(
            self.pipeline,
            self.recorder(state),
            limits=Limits(
                s.limits.max_members,
                s.limits.max_total_bytes,
                s.limits.max_ratio,
                s.limits.max_seconds_per_arrival,
            ),
            finish_study_on_stop=s.worker.shutdown == "study",
            late_series=s.late_series,
        )


def cpu_stage_executor(settings: Settings, device: str, text: str | None = None) -> LocalExecutor:
    """What a CPU pool process (:mod:`processor.cpupool`) runs: the daemon's pipeline (``text``, the
    file as the daemon read it at start; an edit since takes effect at the next start, in every
    process alike) compiled for the daemon's ``device`` (resolved there, so no process but the daemon
    touches CUDA; the CPU steps load no model), the state database opened read-only, and the same
    recorder's paths."""
    return _compose(settings, device, default_registry(), text=text, readonly=True).executor()


def build(settings: Settings, registry: StepRegistry | None = None) -> Components:
    """Compile the pipeline (ConfigError on any problem), open state, wire intake."""
    components = _compose(settings, resolve_device_name(settings.device), registry or default_registry())
    settings.outbox.mkdir(parents=True, exist_ok=True)
    return components


def _compose(
    settings: Settings,
    device: str,
    registry: StepRegistry,
    *,
    text: str | None = None,
    readonly: bool = False,
) -> Components:
    from processor.models.cache import ModelCache

    m = settings.models
    models = ModelCache(m.capacity, device, m.gpu_memory_budget_gb, precision=m.precision)
    env = StepEnv(
        root=settings.root,
        device=device,
        models=models,
        content_cache=State.content_cache(settings.state),
        pinned_sha256=pinned_sha256(settings),
    )
    pipeline = load_pipeline(settings.pipeline, registry, env, text)
    state = State(settings.state, readonly=readonly, timeout=settings.limits.database_busy_seconds)
    wake = threading.Event()
    intake = Intake(
        state,
        pipeline_name=pipeline.name,
        pipeline_version=pipeline.version,
        inbox_dirs=settings.inbox.dirs,
        outbox=settings.outbox,
        notices=refusal_notices(settings),
        outbound_wake=wake,
    )
    return Components(settings, pipeline, device, models, state, intake, outbound_wake=wake)


def refusal_notices(settings: Settings) -> Notices | None:
    """The failure notifications of an input refused at intake (None: no notification wants them)."""
    notifications = [n for n in settings.notifications if "failure" in n.on]
    if not notifications:
        return None

    def notices(arrival: Arrival, state: str, reason: str) -> list[Outbound]:
        return arrival_outbound(notifications, arrival, state, reason, kind=ReasonKind.NOT_TAKEN_IN)

    return notices


def log_paths(settings: Settings, pipeline: Pipeline, device: str) -> None:
    log.info("config file=%s root=%s", settings.config_file, settings.root)
    log.info(
        "config inbox=%s night=%s urgent=%s outbox=%s state=%s",
        ",".join(map(str, settings.inbox.dirs)),
        ",".join(map(str, settings.inbox.night_dirs)),
        ",".join(map(str, settings.inbox.urgent_dirs)),
        settings.outbox,
        settings.state,
    )
    log.info(
        "config pipeline=%s name=%s version=%s steps=%d device=%s",
        settings.pipeline,
        pipeline.name,
        pipeline.version,
        len(pipeline.steps),
        device,
    )


class Daemon:
    """Watcher → SQLite queue → worker, plus reports, scheduler and status; runs until ``stop()``.

    Signal handlers only call ``stop()``; the main loop then drains: the worker finishes the current
    step (``worker.shutdown: step``) or study (``study``) or puts the arrival back to pending, every
    thread is joined, and ``run_until_stopped`` returns 0.
    """

    def __init__(self, components: Components, lock: InstanceLock | None = None) -> None:
        self.c = components
        s = components.settings
        self.stop_requested = threading.Event()
        self.window = NightWindow.parse(s.schedule.night_window)
        self.disk = DiskGuard(guarded_volumes(s), s.disk.min_free_gb)
        self.reports = ReportUpdater(s.state, s.reports) if s.reports.enabled else None
        local = components.executor()
        self.recorder = local.recorder
        processes = s.worker.cpu_processes(models_can_run(components.pipeline))
        self.cpu_pool: CpuPool | None = None
        self.dask: DaskCluster | None = None
        executor: Executor = local
        if s.executor.dask is not None:  # the pipeline runs on Dask workers; no CPU pool here
            processes = 0
            self.dask = DaskCluster(s, s.executor.dask, components.device)
            executor = DaskExecutor(local, self.dask, s.limits.max_attempts)
        elif processes:
            self.cpu_pool = CpuPool(s, local, processes, device=components.device, build=cpu_stage_executor)
            executor = PooledExecutor(local, self.cpu_pool, s.limits.max_attempts)
        self.state_file = StateFileGuard(s.state)
        self._next_replay = 0.0
        self.worker = Worker(
            components.state,
            executor,
            can_claim=self._may_take,
            on_start=self.recorder.replay,
            on_idle=self._idle_replay,
            night_before=self._night_before,
            on_processed=self._on_processed,
            night_batch=s.worker.night_batch,
            max_inflight=s.worker.max_inflight_studies,
            prefetch_workers=max(1, s.worker.max_inflight_studies if self.dask else processes),
        )
        self.watcher = InboxWatcher(
            s.inbox.dirs,
            s.inbox.night_dirs,
            stable_seconds=s.inbox.stable_seconds,
            folder_stable_seconds=s.inbox.folder_stable_seconds,
            scan_interval=s.inbox.scan_interval_seconds,
            on_stable=self._on_stable,
            use_watchdog=s.inbox.use_watchdog,
            urgent_dirs=s.inbox.urgent_dirs,
        )
        self._urgent_dirs = {os.path.realpath(d) for d in s.inbox.urgent_dirs}
        self.housekeeping = Housekeeping()
        self.scheduler = Scheduler(
            window=self.window,
            on_rollover=self._on_rollover,
            on_night_start=self._on_wake,
            on_rescan=self._on_wake,
            on_retention=self._on_retention if s.retention.keep_days else None,
            rescan_seconds=RESCAN_SECONDS,
            daily=[
                (f"daily-summary-{n.name}", time_of_day(n.daily_at), partial(self._on_daily_summary, n))
                for n in s.notifications
                if "daily" in n.on
            ],
        )
        # imported here: the poller imports httpx (0.27 CPU-s), which `process` and the CPU pool never use
        from processor.intake.poller import SourcePoller, SourceThreads

        self.poller = SourcePoller(
            s, s.state, self._intake_for, on_arrival=self._on_source_arrival, may_fetch=self._may_take
        )
        self.sources = SourceThreads(self.poller)
        self.status = (
            StatusServer(s.state, self._probes(), s.status.host, s.status.port) if s.status.enabled else None
        )
        self._watch_state: State | None = None
        kept: dict[str, Lifecycle] = {
            "worker": self.worker,
            "watcher": self.watcher,
            "scheduler": self.scheduler,
            "housekeeping": self.housekeeping,
        }
        if self.reports is not None:
            kept["reports"] = self.reports
        if self.status is not None:
            kept["status"] = self.status
        if list(self.poller.schedule()):
            kept["sources"] = self.sources
        routes = routes_from_settings(s)  # send-back: destinations and notifications, one thread each
        wake = components.outbound_wake
        self.delivery = DeliveryService(components.state, routes, s.outbox, wake=wake) if routes else None
        self._send_faults_seen: list[str] = []
        self._send_faults_until = 0.0
        if self.delivery is not None:
            kept["delivery"] = self.delivery
        self.supervisor = Supervisor(kept)
        self.lock = lock or InstanceLock(s.state)
        self._threads_started = False
        self._started_at: float | None = None

    # ------------------------------------------------------------------ hooks (other threads)
    def _may_take(self) -> bool:
        """New work may be claimed or fetched: the state database is ours and the disk has room."""
        return self.state_file.lost is None and self.disk.ok()

    def _idle_replay(self) -> None:
        """On the worker's idle passes, at most every ``IDLE_REPLAY_SECONDS``: place recorded ends an
        OS error interrupted (a read-only outbox, a full disk)."""
        if time.monotonic() < self._next_replay:
            return
        self._next_replay = time.monotonic() + IDLE_REPLAY_SECONDS
        self.recorder.replay(settle_seconds=REPLAY_SETTLE_SECONDS)

    def _on_stable(self, path: Path, night: bool) -> None:
        assert self._watch_state is not None
        if self.state_file.lost is not None:
            raise StateLost(self.state_file.lost)  # the watcher sets it aside; taken in after a restart
        urgent = os.path.realpath(path.parent) in self._urgent_dirs
        if self._intake_for(self._watch_state).accept(path, night=night, urgent=urgent) is not None:
            self.worker.wake_event.set()

    def _intake_for(self, state: State) -> Intake:
        s = self.c.settings
        return Intake(
            state,
            pipeline_name=self.c.pipeline.name,
            pipeline_version=self.c.pipeline.version,
            inbox_dirs=s.inbox.dirs,
            outbox=s.outbox,
            should_stop=self.stop_requested.is_set,
            notices=refusal_notices(s),
            outbound_wake=self.c.outbound_wake,
        )

    def _on_source_arrival(self, arrival_id: int) -> None:
        self.worker.wake_event.set()

    def _night_before(self, now: datetime) -> datetime | None:
        return self.window.night_before(now, run_on=self.c.settings.schedule.night_run_on)

    def _on_processed(self, arrival_id: int, outcome: str) -> None:
        if self.reports is not None and outcome != "pending":
            self.reports.notify()

    def _on_wake(self, now: datetime) -> None:
        self.watcher.wake()
        self.worker.wake_event.set()

    def _on_rollover(self, now: datetime) -> None:
        if self.reports is not None:
            self.reports.rollover(now)

    def _on_daily_summary(self, notification: NotificationSettings, now: datetime) -> None:
        """Queue the notification's summary of yesterday (on the housekeeping thread; once a day
        however often this fires, :func:`processor.outputs.notify.enqueue_daily`)."""

        def queue() -> None:
            if enqueue_daily(self.c.state, [notification], now):
                self.c.outbound_wake.set()

        self.housekeeping.submit(f"daily-summary-{notification.name}", queue)

    def _on_retention(self, now: datetime) -> None:
        s = self.c.settings
        keep_days = s.retention.keep_days
        assert keep_days is not None
        roots = done_roots([*s.inbox.dirs, *s.inbox.night_dirs, *s.inbox.urgent_dirs])
        self.housekeeping.submit("retention", lambda: apply_retention(roots, keep_days, now.date()))

    def _probes(self) -> Probes:
        s = self.c.settings
        pipeline = {
            "name": self.c.pipeline.name,
            "version": self.c.pipeline.version,
            "digest": self.c.pipeline.digest,
        }
        return Probes(
            version=ctwatch_version(),
            device=self.c.device,
            pipeline=pipeline,
            worker_alive=self.worker.is_alive,
            worker_current=lambda: (self.worker.current, self.worker.current_since),
            prefetch_inflight=lambda: self.worker.prefetcher.inflight if self.worker.prefetcher else 0,
            cpu_pool=self.cpu_pool.processes if self.cpu_pool is not None else list,
            executor=self._executor_probe,
            disk=self.disk.report,
            next_jobs=self.scheduler.next_jobs,
            models=self._models_loaded,
            night=lambda now: {
                "window": str(self.window),
                "open": self.window.contains(now),
                "run_on": s.schedule.night_run_on,
                "next_start": self.window.next_start(now).isoformat(timespec="seconds"),
            },
            stopping=self.stop_requested.is_set,
            threads=lambda: self.supervisor.report(),
            intake=self._intake_probe,
            faults=self._faults,
            plan=lambda: pipeline_plan(self.c.pipeline, s),
            destinations=lambda: [d.name for d in s.destinations] + [n.name for n in s.notifications],
        )

    def _executor_probe(self) -> dict[str, Any]:
        """Which executor runs the pipeline and, on Dask, its workers (no file names or UIDs)."""
        return executor_view(self.c.settings.executor.dask, self.dask.workers() if self.dask else [])

    def _intake_probe(self) -> dict[str, float | None]:
        """Seconds since the watcher last finished a scan, and when that means intake is stuck."""
        s = self.c.settings.inbox
        last = self.watcher.last_scan or self._started_at
        return {
            "seconds_since_scan": None if last is None else round(time.time() - last, 1),
            "scan_interval_seconds": s.scan_interval_seconds,
            "stale_after_seconds": max(
                INTAKE_STALE_SCANS * s.scan_interval_seconds, INTAKE_STALE_MIN_SECONDS
            ),
        }

    def _faults(self) -> list[str]:
        """Conditions that stop work without stopping a thread, in plain words (no outside text)."""
        faults = []
        if self.state_file.lost is not None:
            faults.append(self.state_file.lost)
        deferred = list(self.watcher.deferred.copy().values())
        if deferred:
            faults.append(
                f"intake paused for {len(deferred)} input(s): {deferred[0].split(';')[0]}; they stay in "
                "the inbox and are tried again"
            )
        paused = self.worker.paused_reason()
        if paused is not None:
            faults.append(paused)
        dask = self.dask.fault() if self.dask is not None else None
        if dask is not None and (paused is None or dask not in paused):
            faults.append(dask)
        if self.delivery is not None:
            faults += self._send_faults()
        if self.recorder.unplaced_failures:
            faults.append(
                f"{self.recorder.unplaced_failures} finished arrival(s) could not be written out yet "
                "(results, receipt or the move of the input); tried again every "
                f"{IDLE_REPLAY_SECONDS:g} s — see state/ctwatch.log"
            )
        return faults

    def _send_faults(self) -> list[str]:
        """Destinations whose oldest waiting row has waited ``SEND_FAULT_SECONDS`` and whose last
        send failed: results are not reaching a PACS (names, counts and ctwatch's words only)."""
        from processor.status.words import duration_words

        now = time.monotonic()
        if now < self._send_faults_until:  # /health is asked often: the queue is read every 10 s
            return self._send_faults_seen
        out = []
        for name, d in self.c.state.delivery_summary().items():
            oldest = d.get("oldest_pending_seconds") or 0
            if d.get("pending") and d.get("last_error") and oldest >= SEND_FAULT_SECONDS:
                out.append(
                    f"send-back to {name} is failing: {d['last_error']}; {d['pending']} waiting, the "
                    f"oldest for {duration_words(oldest)} (they go out when it answers again)"
                )
        self._send_faults_seen, self._send_faults_until = out, now + SEND_FAULT_CHECK_SECONDS
        return out

    def _models_loaded(self) -> list[dict]:
        return [
            {k: m.get(k) for k in ("key", "hits", "gpu_bytes", "load_seconds")}
            for m in self.c.models.loaded()
        ]

    # ------------------------------------------------------------------ life cycle
    def recover(self) -> None:
        """After a crash: what was in flight back to the queue (crashes charged fairly) and our own
        half-written temp files gone. Recorded ends a crash interrupted (receipt, move, note) are
        finished by the worker thread first thing, each time it starts."""
        s = self.c.settings
        for row in self.c.state.recover_in_flight(s.limits.max_attempts):
            log.warning(
                "arrival.recovered arrival=%s state=%s crashes=%s isolate=%s",
                row.id,
                row.state,
                row.crashes,
                row.isolate,
            )
            if row.state != ArrivalState.QUARANTINED:
                continue
            # the crash cap set it aside: its notifications, queued just after the transaction that
            # ended it (a kill in between loses them)
            if self.c.state.enqueue(arrival_outbound(s.notifications, row, row.state, row.error)):
                self.c.outbound_wake.set()
        if self.delivery is None:  # no destination left: rows queued for removed ones end, saying so
            DeliveryService(self.c.state, {}, s.outbox).fail_unrouted()
        for stale in remove_stale_temp_files(s.outbox, s.reports.dir):
            log.warning("outbox.stale_temp_removed path=%s", stale)
        for stale in remove_stale():  # a killed daemon's CPU-pool hand-off files in shared memory
            log.warning("handoff.stale_removed path=%s", stale)
        adopt_orphans(
            self.c.state,
            [*s.inbox.dirs, *s.inbox.night_dirs, *s.inbox.urgent_dirs],
            pipeline_name=self.c.pipeline.name,
            pipeline_version=self.c.pipeline.version,
        )

    def start(self) -> None:
        if not self.lock.held:  # the CLI takes it before the database is opened
            self.lock.acquire("daemon")
        self.state_file.remember()
        self._started_at = time.time()
        self.recover()
        self._watch_state = self.c.state
        s = self.c.settings
        if self.status is not None:
            try:
                self.status.start()
            except OSError as exc:
                raise ConfigError(
                    f"status.port: cannot listen on {s.status.host}:{s.status.port} "
                    f"({exc.strerror or exc}). Fix: choose a free port, or set "
                    "status.enabled: false."
                ) from exc
        if self.reports is not None:
            self.reports.start()
        self.housekeeping.start()
        if self.cpu_pool is not None:  # a process that cannot compile the pipeline: ConfigError now
            self.cpu_pool.start()
        if self.dask is not None:  # the LocalCluster started, or the scheduler reached: now
            self.dask.start()
        self.worker.start()
        self.watcher.start()
        self.scheduler.start()
        self.poller.clean_staging(self.c.state.active_paths())
        self.sources.start()
        if self.delivery is not None:
            self.delivery.start()
        self.supervisor.start()  # from now on a part whose thread dies is started again
        self._threads_started = True
        log.info(
            "daemon.started threads=worker,watcher,scheduler,housekeeping%s%s sources=%d night_window=%s "
            "disk_min_free_gb=%g shutdown=%s cpu_workers=%d max_inflight_studies=%d",
            ",reports" if self.reports else "",
            ",status" if self.status else "",
            len(s.sources),
            self.window,
            s.disk.min_free_gb,
            s.worker.shutdown,
            self.cpu_pool.size if self.cpu_pool else 0,
            s.worker.max_inflight_studies,
        )

    def run_until_stopped(self) -> int:
        try:
            self.start()
            ticks = 0
            while not self.stop_requested.wait(0.5):
                ticks += 1
                if ticks % LOCK_CHECK_TICKS == 0:
                    self._check_lock()
                    self.state_file.check()
        finally:
            self.shutdown()
        return 0

    def _check_lock(self) -> None:
        """Our lock file must still be the one we hold (see :mod:`processor.instance`)."""
        if self.lock.still_held():
            return
        try:
            self.lock.reassert()
            log.warning(
                "daemon.lock_recreated path=%s: the lock file was deleted or replaced", self.lock.path
            )
        except ConfigError as exc:
            log.error(
                "daemon.lock_lost path=%s: %s; stopping so two processes never share the database",
                self.lock.path,
                exc,
            )
            self.stop()

    def stop(self) -> None:
        self.stop_requested.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        log.info("daemon.stopping current_arrival=%s", self.worker.current)
        self.stop_requested.set()
        self.supervisor.stop()
        self.supervisor.join(timeout)
        self.scheduler.shutdown()
        self.sources.stop()
        self.watcher.stop()
        self.worker.stop()
        if self.delivery is not None:  # a send under way ends within its timeout; an unsent row stays pending
            self.delivery.stop()
        self.sources.join(timeout)
        self.watcher.join(timeout)
        self.worker.join(timeout)
        if self.worker.is_alive():
            log.warning(
                "daemon.worker_still_running arrival=%s; it returns to pending at the next start",
                self.worker.current,
            )
        if self.delivery is not None:
            self.delivery.join(1.0)
            if self.delivery.running():  # a send under way: a slow PACS may hold it to its timeout
                log.info("daemon.waiting_for_sends: a send under way ends within its timeout_seconds")
                self.delivery.join(timeout)
        if self.cpu_pool is not None:
            self.cpu_pool.close()
        if self.dask is not None:
            self.dask.close()
        if self.reports is not None:  # after the worker, so the last finished study is in the workbooks
            self.reports.stop()
            self.reports.join(timeout)
        self.housekeeping.stop()
        self.housekeeping.join(timeout)
        if self.status is not None:
            self.status.stop()
        self.c.state.close()
        self.lock.release()
        log.info("daemon.stopped")


RESCAN_SECONDS = 60.0
WRITE_PROBE_SECONDS = 5.0  # how often the disk guard checks that its folders can be written
IDLE_REPLAY_SECONDS = 10.0
SEND_FAULT_SECONDS = 600.0  # a destination failing with rows waiting this long is named on /health
SEND_FAULT_CHECK_SECONDS = 10.0  # how often /health reads the send queue for it
INTAKE_STALE_SCANS = 6  # /health turns 503 when no scan finished for this many intervals…
INTAKE_STALE_MIN_SECONDS = 60.0  # …and at least this long (hashing a large ZIP holds a scan)
LOCK_CHECK_TICKS = 4  # the lock file is checked every 4 × 0.5 s
REPLAY_SETTLE_SECONDS = 5.0  # an end recorded this long ago and still not placed was interrupted


def remove_stale_temp_files(*folders: Path) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` (and workbook ``.<name>.*.tmp.xlsx``) files an interrupted atomic
    write left in the outbox and the reports folder (ours, never user data)."""
    patterns = (".*.tmp", ".*.tmp.xlsx")
    stale = sorted(
        {p for folder in folders if folder.exists() for pattern in patterns for p in folder.rglob(pattern)}
    )
    for path in stale:
        if path.is_file():
            path.unlink(missing_ok=True)
    return stale


class StateLost(Deferred):
    """The state database file was deleted or replaced under the running daemon: a dropped file is
    left in the inbox, for the restart."""


class StateFileGuard:
    """Notices the state database deleted or replaced while the daemon runs (an inode check).

    The daemon's connections still write to the file they opened; a deleted one is gone at exit and
    a replaced one is not the file a restart will read. From then on nothing new is claimed, fetched
    or taken in, and ``/health`` says why; a restart opens the file now at the path, and the inputs
    in the work folder with no row there are registered again (:mod:`processor.intake.orphans`).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: tuple[int, int] | None = None
        self.lost: str | None = None

    def remember(self) -> None:
        self._inode = self._now()

    def check(self) -> None:
        if self.lost is not None or self._inode is None:
            return
        now = self._now()
        if now == self._inode:
            return
        what = "deleted" if now is None else "replaced by another file"
        self.lost = (
            f"the state database (the `state` setting) was {what} while ctwatch ran: nothing new is "
            "claimed or taken in. Restart ctwatch (inputs waiting in the work folder are registered "
            "again at start)"
        )
        log.error("state.lost path=%s: %s", self.path, what)

    def _now(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return st.st_dev, st.st_ino


def guarded_volumes(settings: Settings) -> list[tuple[str, Path]]:
    """The folders whose free space the disk guard watches: the outbox and every inbox (work) folder."""
    volumes = [("outbox", settings.outbox)]
    dirs = settings.inbox.dirs
    volumes += [("work" if len(dirs) == 1 else f"work{i}", d) for i, d in enumerate(dirs)]
    return volumes


class DiskGuard:
    """Stops new claims while free space on a guarded volume is below ``min_free_gb``, or while the
    outbox cannot be written (a read-only share, a lost permission) or a folder cannot be checked.

    Arrivals keep being registered and wait safely in the inbox; claims resume when space returns.
    ``min_free_gb`` may be changed at run time (tests use a tiny and a huge threshold).
    """

    def __init__(self, volumes: list[tuple[str, Path]], min_free_gb: float) -> None:
        self.volumes = volumes
        self.min_free_gb = min_free_gb
        self._low: str | None = None
        self._lock = threading.Lock()
        self._probed_until = 0.0
        self._unwritable_now: list[str] = []

    def report(self) -> dict:
        free: list[tuple[str, int]] = []
        problems = []
        for name, path in self.volumes:
            try:
                free.append((name, int(disk_free_gb(path) * 1e9)))
            except OSError as exc:  # e.g. a parent folder lost its search permission
                problems.append(f"the {name} folder cannot be checked ({os_error_words(exc)})")
        low = [(name, n) for name, n in free if n < self.min_free_gb * 1e9]
        if low:
            problems.append(
                "low disk space: "
                + ", ".join(f"{n / 1e9:.1f} GB free on the {name} volume" for name, n in low)
                + f", below disk.min_free_gb = {self.min_free_gb:g}"
            )
        problems += self._unwritable()
        reason = None
        if problems:
            reason = "; ".join(problems) + "; new arrivals wait in the inbox until this is fixed"
        self._note(reason)
        return {
            "ok": not problems,
            "reason": reason,
            "min_free_gb": self.min_free_gb,
            "volumes": [{"volume": name, "free_bytes": n} for name, n in free],
        }

    def _unwritable(self) -> list[str]:
        """The guarded folders ctwatch cannot create a file in (read-only share, lost permission),
        looked at every ``WRITE_PROBE_SECONDS``: a study is never started only to fail writing its
        previews or results."""
        now = time.monotonic()
        with self._lock:
            if now < self._probed_until:
                return list(self._unwritable_now)
            self._probed_until = now + WRITE_PROBE_SECONDS
        found = []
        for name, path in self.volumes:
            if name != "outbox" or not path.is_dir():
                continue  # the inboxes' own folders are the intake's; a missing outbox is created
            try:
                fd, probe = tempfile.mkstemp(prefix=".ctwatch-probe.", suffix=".tmp", dir=path)
                os.close(fd)
                os.unlink(probe)
            except OSError as exc:
                found.append(f"the {name} folder cannot be written ({os_error_words(exc)})")
        with self._lock:
            self._unwritable_now = found
        return found

    def ok(self) -> bool:
        return bool(self.report()["ok"])

    def _note(self, reason: str | None) -> None:
        with self._lock:
            before, self._low = self._low, reason
        if reason and not before:
            log.warning("disk.low claims=stopped reason=%r", reason)
        elif before and not reason:
            log.info("disk.ok claims=resumed min_free_gb=%g", self.min_free_gb)


def ctwatch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ctwatch")
    except PackageNotFoundError:  # running from a checkout that was not pip-installed
        import tomllib

        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        try:
            return str(tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"])
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "unknown"


def disk_free_gb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e9
