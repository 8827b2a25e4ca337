"""Watch the inbox folders and hand over each dropped file or folder once it is *stable*.

A watchdog observer (inotify where available) wakes the scanner early; a periodic scan runs
regardless, because file events do not arrive from SMB/NFS shares, and a scan at start-up picks up
what arrived while the daemon was stopped. An entry is stable when its size and mtime have not
changed for ``stable_seconds``, and — for a ZIP — its central directory reads. A ZIP that stays
unreadable while unchanged for three stable periods is handed over anyway, to be rejected with
its reason rather than wait forever.

An entry is handed over once: if it is still in the inbox afterwards (the intake could not move
it), or the hand-over raised (logged once), it is set aside and left alone until it changes.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from processor.intake.archive import is_zip_path, zip_central_directory_reads
from processor.intake.inbox import CONTROL_DIR, is_temporary_name
from processor.names import display_name

log = logging.getLogger(__name__)

Signature = tuple[int, int, float]


def signature(path: Path) -> Signature | None:
    """(file count, total bytes, newest mtime) of a file or folder; None while it holds temp names
    or is gone. A folder that cannot be listed gives its own size and mtime (count -1), so it still
    becomes stable and is handed over, to be rejected with the reason."""
    try:
        if path.is_dir():
            count, total, newest = 0, 0, path.stat().st_mtime
            for child in path.rglob("*"):
                if is_temporary_name(child.name) and child.is_file():
                    return None
                if child.is_file():
                    st = child.stat()
                    count, total, newest = count + 1, total + st.st_size, max(newest, st.st_mtime)
            return (count, total, newest)
        st = path.stat()
        return (1, st.st_size, st.st_mtime)
    except FileNotFoundError:
        return None
    except OSError:
        return _own_signature(path)


def _own_signature(path: Path) -> Signature | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return (-1, st.st_size, st.st_mtime)


def is_special(path: Path) -> bool:
    """A FIFO, socket or device: never an arrival (reading a FIFO would block the watcher)."""
    try:
        return not (path.is_file() or path.is_dir())
    except OSError:
        return False


@dataclass
class _Seen:
    sig: Signature
    since: float


class StabilityTracker:
    """Remembers each candidate's signature and since when it has not changed."""

    def __init__(self, stable_seconds: float) -> None:
        self.stable_seconds = stable_seconds
        self._seen: dict[Path, _Seen] = {}
        self._set_aside: dict[Path, Signature] = {}

    def stable(self, path: Path, sig: Signature, now: float) -> float | None:
        """Seconds the entry has been unchanged once past the threshold, else None."""
        seen = self._seen.get(path)
        if seen is None or seen.sig != sig:
            self._seen[path] = _Seen(sig, now)
            return None if self.stable_seconds > 0 else 0.0
        quiet = now - seen.since
        return quiet if quiet >= self.stable_seconds else None

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def set_aside(self, path: Path, sig: Signature) -> None:
        """Leave an entry alone until its signature changes (its hand-over failed, or it is still
        in the inbox after it: the intake could not move it, and has written its receipt)."""
        self._set_aside[path] = sig

    def is_set_aside(self, path: Path, sig: Signature) -> bool:
        if path in self._set_aside and self._set_aside[path] != sig:
            del self._set_aside[path]
        return path in self._set_aside

    def prune(self, present: set[Path]) -> None:
        for path in list(self._seen):
            if path not in present:
                del self._seen[path]
        for path in list(self._set_aside):
            if path not in present:
                del self._set_aside[path]

    def pending(self) -> int:
        """Entries seen but not yet stable (set-aside entries are not waited on)."""
        return len(self._seen)


class InboxWatcher:
    """Finds stable entries in the inbox folders and calls ``on_stable(path, night)`` for each."""

    def __init__(
        self,
        inbox_dirs: Iterable[Path],
        night_dirs: Iterable[Path],
        *,
        stable_seconds: float,
        scan_interval: float,
        on_stable: Callable[[Path, bool], None],
        use_watchdog: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.inbox_dirs = [Path(p) for p in inbox_dirs]
        self.night_dirs = [Path(p) for p in night_dirs]
        self.scan_interval = scan_interval
        self.on_stable = on_stable
        self.clock = clock
        self.tracker = StabilityTracker(stable_seconds)
        self.use_watchdog = use_watchdog
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None  # Observer is the platform's BaseObserver subclass
        self.last_scan: float | None = None

    # ------------------------------------------------------------------ scanning
    def candidates(self) -> list[tuple[Path, bool]]:
        out: list[tuple[Path, bool]] = []
        roots = [(d, False) for d in self.inbox_dirs] + [(d, True) for d in self.night_dirs]
        night_set = {d.resolve() for d in self.night_dirs}
        for root, night in roots:
            if not root.is_dir():
                continue
            for entry in sorted(root.iterdir()):
                if entry.name == CONTROL_DIR or is_temporary_name(entry.name):
                    continue
                if entry.resolve() in night_set and not night:
                    continue
                if entry.is_symlink() or is_special(entry):
                    continue
                out.append((entry, night))
        return out

    def scan_once(self) -> list[Path]:
        """Check every candidate once; hand over the stable ones. Returns what was handed over."""
        now = self.clock()
        handed: list[Path] = []
        present: set[Path] = set()
        for path, night in self.candidates():
            present.add(path)
            sig = signature(path)
            if sig is None or (sig[0] == 0 and path.is_dir()) or self.tracker.is_set_aside(path, sig):
                continue
            try:
                if self._ready(path, sig, now):
                    self.on_stable(path, night)
                    handed.append(path)
                    if os.path.lexists(path):  # not taken out of the inbox: leave it until it changes
                        self.tracker.set_aside(path, sig)
            except Exception:  # one bad entry must not stop the watcher; logged once, then set aside
                log.exception(
                    "watch.handover_failed path=%s: left alone until it changes", display_name(path)
                )
                self.tracker.set_aside(path, sig)
        self.tracker.prune(present)
        self.last_scan = time.time()
        return handed

    def _ready(self, path: Path, sig: Signature, now: float) -> bool:
        """Whether the entry is stable (and, for a ZIP, readable or unreadable for long enough)."""
        quiet = self.tracker.stable(path, sig, now)
        if quiet is None:
            return False
        if path.is_file() and _incomplete_zip(path):
            if quiet < 3 * max(self.tracker.stable_seconds, 1.0):
                log.debug("watch.zip_unreadable path=%s quiet=%.1f", display_name(path), quiet)
                return False
            log.warning("watch.zip_unreadable_handover path=%s quiet=%.1f", display_name(path), quiet)
        self.tracker.forget(path)
        return True

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        for folder in self.inbox_dirs + self.night_dirs:
            folder.mkdir(parents=True, exist_ok=True)
        if self.use_watchdog:
            self._observer = Observer()
            handler = _WakeHandler(self._wake)
            for folder in self.inbox_dirs:
                self._observer.schedule(handler, str(folder), recursive=True)
            self._observer.start()
        self._thread = threading.Thread(target=self._loop, name="ctwatch-watcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.scan_once()
            wait = self.scan_interval
            if self.tracker.pending():
                wait = min(wait, max(self.tracker.stable_seconds / 2, 0.1))
            self._wake.wait(wait)
            self._wake.clear()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._observer is not None:
            self._observer.stop()

    def join(self, timeout: float | None = None) -> None:
        if self._observer is not None:
            self._observer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _incomplete_zip(path: Path) -> bool:
    """A ZIP whose central directory does not read (yet). A file that cannot be opened at all is
    not waited for: the intake rejects it with the reason."""
    try:
        return is_zip_path(path) and not zip_central_directory_reads(path)
    except OSError:
        return False


class _WakeHandler(FileSystemEventHandler):
    def __init__(self, wake: threading.Event) -> None:
        self._wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if f"/{CONTROL_DIR}" not in str(event.src_path):
            self._wake.set()
