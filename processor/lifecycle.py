"""One life cycle for every long-running part of the daemon, and a supervisor that keeps them alive.

Each part (worker, watcher, scheduler, housekeeping, reports, status server, source pollers)
implements :class:`Lifecycle`. The :class:`Supervisor` thread looks at the parts it is told to
keep alive every ``interval`` seconds; a part that died (an OS or SQLite error escaped its loop)
is logged and started again, with a back-off that doubles up to ``max_backoff`` while it keeps
dying, so a cause that goes away (a full disk freed, a lock released) never needs a restart of the
daemon by hand.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger(__name__)


class Lifecycle(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


@dataclass
class _Kept:
    name: str
    part: Lifecycle
    restarts: int = 0
    next_try: float = 0.0
    backoff: float = 0.0
    down_since: float | None = None


@dataclass
class Supervisor:
    """Restarts the parts in ``keep`` when their thread died (see the module docstring)."""

    keep: dict[str, Lifecycle]
    interval: float = 2.0
    max_backoff: float = 60.0
    _kept: list[_Kept] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self._kept = [_Kept(name, part) for name, part in self.keep.items()]

    def start(self) -> None:
        if not self._kept:
            self._kept = [_Kept(name, part) for name, part in self.keep.items()]
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="ctwatch-supervisor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def restarts(self) -> dict[str, int]:
        """How often each kept part was restarted (for the status endpoint)."""
        return {kept.name: kept.restarts for kept in self._kept}

    def report(self) -> list[dict[str, object]]:
        """Each kept part: ``{"thread", "alive", "restarts"}`` — for ``/health``, ``/status``, ``/metrics``."""
        return [
            {"thread": kept.name, "alive": bool(kept.part.is_alive()), "restarts": kept.restarts}
            for kept in self._kept
        ]

    def check(self, now: float | None = None) -> None:
        """One look at every kept part (the loop calls this every ``interval`` seconds)."""
        now = time.monotonic() if now is None else now
        for kept in self._kept:
            if self._stop.is_set():
                return
            if kept.part.is_alive():
                if kept.down_since is not None and now - kept.down_since > self.max_backoff:
                    kept.backoff = 0.0  # it stayed up: the next death starts the back-off afresh
                    kept.down_since = None
                continue
            if now < kept.next_try:
                continue
            kept.backoff = min(self.max_backoff, kept.backoff * 2 or self.interval)
            kept.next_try = now + kept.backoff
            kept.down_since = now
            kept.restarts += 1
            log.error(
                "thread.died part=%s restarts=%d: starting it again (next try in %.0f s if it dies again)",
                kept.name,
                kept.restarts,
                kept.backoff,
            )
            try:
                kept.part.start()
            except Exception:  # noqa: BLE001 — the supervisor itself must live; tried again later
                log.exception("thread.restart_failed part=%s", kept.name)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.check()
