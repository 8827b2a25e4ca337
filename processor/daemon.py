"""The composition root: builds every object from validated settings and runs the daemon."""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from processor.config import Settings
from processor.intake.archive import Limits
from processor.intake.register import Intake
from processor.intake.watcher import InboxWatcher
from processor.pipeline.registry import StepRegistry
from processor.pipeline.spec import Pipeline, load_pipeline
from processor.pipeline.step import StepEnv
from processor.state import State
from processor.steps import default_registry
from processor.worker import LocalExecutor, Worker

log = logging.getLogger(__name__)


def resolve_device_name(spec: str) -> str:
    """``auto|cpu|cuda[:N]`` → the concrete device; ``cuda`` without CUDA is a ConfigError."""
    from processor.models.device import resolve_device

    return str(resolve_device(spec))


@dataclass
class Components:
    settings: Settings
    pipeline: Pipeline
    device: str
    state: State
    intake: Intake

    def executor(self, state: State) -> LocalExecutor:
        s = self.settings
        return LocalExecutor(state, self.pipeline, outbox=s.outbox, device=self.device,
                             limits=Limits(s.limits.max_members, s.limits.max_total_bytes, s.limits.max_ratio),
                             layout_for=self.intake.layout_for)


def build(settings: Settings, registry: StepRegistry | None = None) -> Components:
    """Compile the pipeline (ConfigError on any problem), open state, wire intake."""
    device = resolve_device_name(settings.device)
    env = StepEnv(root=settings.root, device=device)
    pipeline = load_pipeline(settings.pipeline, registry or default_registry(), env)
    state = State(settings.state)
    intake = Intake(state, pipeline_name=pipeline.name, pipeline_version=pipeline.version,
                    inbox_dirs=settings.inbox.dirs, outbox=settings.outbox)
    settings.outbox.mkdir(parents=True, exist_ok=True)
    return Components(settings, pipeline, device, state, intake)


def log_paths(settings: Settings, pipeline: Pipeline, device: str) -> None:
    log.info("config file=%s root=%s", settings.config_file, settings.root)
    log.info("config inbox=%s night=%s outbox=%s state=%s",
             ",".join(map(str, settings.inbox.dirs)), ",".join(map(str, settings.inbox.night_dirs)),
             settings.outbox, settings.state)
    log.info("config pipeline=%s name=%s version=%s steps=%d device=%s", settings.pipeline,
             pipeline.name, pipeline.version, len(pipeline.steps), device)


class Daemon:
    """Watcher → SQLite queue → worker; runs until ``stop()`` (signal handlers only call that)."""

    def __init__(self, components: Components) -> None:
        self.c = components
        s = components.settings
        self.stop_requested = threading.Event()
        self.worker = Worker(s.state, components.executor)
        self.watcher = InboxWatcher(
            s.inbox.dirs, s.inbox.night_dirs, stable_seconds=s.inbox.stable_seconds,
            scan_interval=s.inbox.scan_interval_seconds, on_stable=self._on_stable,
            use_watchdog=s.inbox.use_watchdog)
        self._watch_state: State | None = None
        self._threads_started = False

    def _on_stable(self, path: Path, night: bool) -> None:
        assert self._watch_state is not None
        intake = Intake(self._watch_state, pipeline_name=self.c.pipeline.name,
                        pipeline_version=self.c.pipeline.version, inbox_dirs=self.c.settings.inbox.dirs,
                        outbox=self.c.settings.outbox)
        if intake.accept(path, night=night) is not None:
            self.worker.wake_event.set()

    def recover(self) -> None:
        for row in self.c.state.recover_running(self.c.settings.limits.max_attempts):
            log.warning("arrival.recovered arrival=%s state=%s attempts=%s", row["id"], row["state"],
                        row["attempts"])

    def start(self) -> None:
        self.recover()
        self._watch_state = State(self.c.settings.state)
        self.worker.start()
        self.watcher.start()
        self._threads_started = True
        log.info("daemon.started pid_threads=worker,watcher")

    def run_until_stopped(self) -> int:
        self.start()
        try:
            while not self.stop_requested.wait(0.5):
                pass
        finally:
            self.shutdown()
        return 0

    def stop(self) -> None:
        self.stop_requested.set()

    def shutdown(self, timeout: float = 60.0) -> None:
        log.info("daemon.stopping")
        self.watcher.stop()
        self.worker.stop()
        self.watcher.join(timeout)
        self.worker.join(timeout)
        if self._watch_state is not None:
            self._watch_state.close()
        self.c.state.close()
        log.info("daemon.stopped")


def disk_free_gb(path: Path) -> float:
    probe = path
    while not probe.exists():
        probe = probe.parent
    return shutil.disk_usage(probe).free / 1e9
