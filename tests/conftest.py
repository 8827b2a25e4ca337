"""Shared fixtures: a temporary ctwatch project (config, inbox, outbox, state) and a thread-leak guard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Bytecode is cached during the tests even where the environment says not to write it
# (PYTHONDONTWRITEBYTECODE): otherwise each xdist worker rewrites every test module's asserts
# again (~10 CPU-s) and each daemon, pool, worker and CLI process the tests start compiles
# ctwatch's modules again (~0.4 CPU-s each, some hundreds of them). Set before the workers start.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves one of our threads running."""
    before = {t.ident for t in threading.enumerate()}
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = [
            t
            for t in threading.enumerate()
            if t.ident not in before and t.is_alive() and t.name.startswith("ctwatch")
        ]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads leaked: {[t.name for t in leaked]}"


class Project:
    """A throw-away ctwatch installation under a temp folder."""

    def __init__(self, root: Path, pipeline_steps: list[dict] | None = None, **overrides: object) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.inbox = root / "inbox"
        self.outbox = root / "outbox"
        self.state_path = root / "state" / "ctwatch.db"
        self.config = root / "config.yaml"
        self.pipeline = root / "pipeline.yaml"
        steps = pipeline_steps or [
            {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}}
        ]
        self.write_pipeline(steps)
        settings = {
            "root": ".",
            "inbox": {
                "dirs": ["inbox"],
                "night_dirs": ["inbox/night"],
                "stable_seconds": 0.5,
                "folder_stable_seconds": 1.0,
                "scan_interval_seconds": 0.3,
            },
            "outbox": "outbox",
            "state": "state/ctwatch.db",
            "pipeline": "pipeline.yaml",
            "device": "cpu",
            "status": {"host": "127.0.0.1", "port": 0},
            # The CPU stage in the daemon's own threads: a pool process takes seconds to start on
            # CI's two cores, for each of the suite's daemons. tests/test_cpu_pool.py runs the pool
            # (the default) and checks its results equal these.
            "worker": {"cpu_workers": 0},
        }
        for key, value in overrides.items():
            settings[key] = value
        self.config.write_text(yaml.safe_dump(settings))
        self.inbox.mkdir(parents=True, exist_ok=True)

    def write_pipeline(self, steps: list[dict], version: int = 1, name: str = "test-ct") -> None:
        self.pipeline.write_text(yaml.safe_dump({"name": name, "version": version, "steps": steps}))

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(REPO / "run.py"), *args, "--config", str(self.config)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env=_env(),
        )

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """The daemon (or another command) as a child process; ``env``: variables added to its environment."""
        with (self.root / "daemon.log").open("a") as log:  # the child keeps its own descriptor
            return subprocess.Popen(
                [sys.executable, str(REPO / "run.py"), *args, "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=self.root,
                env=_env() | (env or {}),
            )

    def results(self) -> list[Path]:
        return sorted(p for p in self.outbox.glob("*/*.json") if p.parent.name != "receipts")

    def receipts(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.outbox / "receipts").glob("*.json"))]

    def log_text(self) -> str:
        path = self.root / "daemon.log"
        return path.read_text() if path.exists() else ""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HOME", str(REPO))
    return env


@pytest.fixture
def project(tmp_path: Path) -> Project:
    return Project(tmp_path)


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def stop_child(proc: subprocess.Popen, *, grace: float = 30.0) -> int | None:
    """Stop a child process by its PID: SIGTERM, then SIGKILL after ``grace`` seconds; reaped.
    Returns its exit code (None when it had to be killed); safe on one that already ended."""
    if proc.poll() is not None:
        return proc.returncode
    proc.terminate()
    try:
        return proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return None
