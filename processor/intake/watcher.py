"""Watch the inbox folders and hand over each dropped file or folder once it is *stable*.

A watchdog observer (inotify where available) wakes the scanner early; a periodic scan runs
regardless, because file events do not arrive from SMB/NFS shares, and a scan at start-up picks up
what arrived while the daemon was stopped. An entry is stable when its size and mtime have not
changed for ``stable_seconds``, and — for a ZIP — its central directory reads. A ZIP that stays
unreadable while unchanged for three stable periods is handed over anyway, to be rejected with
its reason rather than wait forever.

An entry is handed over once: if it is still in the inbox afterwards (the intake could not move
it), or the hand-over raised (logged once), it is set aside and left alone until it changes — a
write, or a change of owner or permissions. An entry ctwatch may not read is handed over like any
other once quiet, for the intake to refuse with the reason; nothing an entry or a pass raises ends
the watcher thread (see :class:`InboxWatcher`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from processor.errors import Deferred
from processor.intake.archive import is_zip_path, zip_central_directory_reads
from processor.intake.inbox import CONTROL_DIR, folder_files, is_temporary_name
from processor.names import display_name, display_text

log = logging.getLogger(__name__)
# watchdog's inotify emitter warns (on its own thread, to stderr) when a folder created during its
# recursive walk is added twice; the watch is the same one, so nothing is lost.
warnings.filterwarnings(
    "ignore", message="Callback with id", category=RuntimeWarning, module="watchdog.observers.inotify"
)

Signature = tuple[int, int, float]


def signature(path: Path) -> Signature | None:
    """(file count, total bytes, newest change) of a file or folder; None while it holds temp names
    or is gone. A change is a write or a change of owner or permissions (the later of mtime and
    ctime), so an entry set aside because it could not be read is looked at again once it may be.

    A folder that cannot be walked whole (a sub-folder or file ctwatch may not list or stat) gives
    its own size and change time (count -1), so it still becomes stable and is handed over, to be
    refused with the reason; :func:`processor.intake.inbox.folder_files` says why ``rglob`` is not
    used (it leaves out what it may not list)."""
    try:
        if path.is_dir():
            st = path.stat()
            count, total, newest = 0, 0, _changed(st)
            for child, st in folder_files(path):
                if is_temporary_name(child.name):
                    return None
                count, total, newest = count + 1, total + st.st_size, max(newest, _changed(st))
            return (count, total, newest)
        st = path.stat()
        return (1, st.st_size, _changed(st))
    except FileNotFoundError:
        return None
    except OSError:
        return _own_signature(path)


def _changed(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def _own_signature(path: Path) -> Signature | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    return (-1, st.st_size, _changed(st))


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
    """Finds stable entries in the inbox folders and calls ``on_stable(path, night)`` for each.

    Nothing one entry does ends the scan, and nothing one pass does ends the thread: every failure
    (an entry's, a folder's that cannot be listed, a whole pass's) is caught, counted in
    :attr:`errors` and logged — once, until it changes or goes, not at every scan.
    :attr:`last_scan` (wall-clock seconds) moves only when a pass has run to its end with every
    folder listed, so a caller can tell when intake has stopped scanning; :attr:`unlisted` names the
    folders the last pass could not list, and why.
    """

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
        self.errors = 0
        self.unlisted: dict[Path, str] = {}
        self._failing: dict[Path, str] = {}  # entries whose failure is logged already: what failed
        self.deferred: dict[Path, str] = {}  # entries left for later, not by their fault: why
        self._pass_failure: str | None = None

    # ------------------------------------------------------------------ scanning
    def candidates(self) -> list[tuple[Path, bool]]:
        """Entries of every inbox and night folder that may become arrivals. A folder that cannot be
        listed is named in :attr:`unlisted`; an entry that cannot be looked at is logged and left out
        of this pass."""
        out: list[tuple[Path, bool]] = []
        roots = [(d, False) for d in self.inbox_dirs] + [(d, True) for d in self.night_dirs]
        night_set = {os.path.realpath(d) for d in self.night_dirs}
        unlisted: dict[Path, str] = {}
        for root, night in roots:
            try:
                if not os.path.lexists(root):  # deleted while we run (an emptied night folder): again
                    root.mkdir(parents=True, exist_ok=True)
                    log.warning("watch.folder_recreated folder=%s", display_name(root))
                entries = sorted(root.iterdir())
            except OSError as exc:
                unlisted[root] = _why(exc)
                continue
            for entry in entries:
                try:
                    if _is_candidate(entry, night, night_set):
                        out.append((entry, night))
                except Exception as exc:  # noqa: BLE001 — one entry never ends the scan
                    self._entry_failed(entry, "list", exc)
        self._note_unlisted(unlisted)
        return out

    def scan_once(self) -> list[Path]:
        """Check every candidate once; hand over the stable ones. Returns what was handed over."""
        now = self.clock()
        handed: list[Path] = []
        present: set[Path] = set()
        for path, night in self.candidates():
            present.add(path)
            if self._check(path, night, now):
                handed.append(path)
        self.tracker.prune(present)
        for path in [p for p in self._failing if not os.path.lexists(p)]:
            del self._failing[path]
        for path in [p for p in self.deferred if not os.path.lexists(p)]:
            del self.deferred[path]
        if not self.unlisted:
            self.last_scan = time.time()
        return handed

    def _check(self, path: Path, night: bool, now: float) -> bool:
        """Hand the entry over if it is stable; whether it was. Never raises: a failure is logged
        (once) and the entry set aside until it changes."""
        sig: Signature | None = None
        step = "check"
        try:
            sig = signature(path)
            if sig is None or (sig[0] == 0 and path.is_dir()) or self.tracker.is_set_aside(path, sig):
                return False
            if not self._ready(path, sig, now):
                return False
            step = "handover"
            self.on_stable(path, night)
            if os.path.lexists(path):  # not taken out of the inbox: leave it until it changes
                self.tracker.set_aside(path, sig)
            self._failing.pop(path, None)
            self.deferred.pop(path, None)
            return True
        except Deferred as exc:  # not the entry's fault (the database busy, a stop): left as it is
            if self.deferred.get(path) != str(exc):
                log.warning("watch.handover_deferred path=%s: %s", display_name(path), exc)
            self.deferred[path] = str(exc)
            self.tracker.forget(path)  # looked at again once stable, like a new entry
            return False
        except Exception as exc:  # noqa: BLE001 — one bad entry must not stop the watcher
            self._entry_failed(path, step, exc)
            if sig is not None:
                self.tracker.set_aside(path, sig)
            return False

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

    def _entry_failed(self, path: Path, step: str, exc: Exception) -> None:
        """Count a failure; log it once per entry and kind (a traceback only for what is not an OS
        error). ``step``: list (looking at the entry), check (its signature, stability) or handover."""
        self.errors += 1
        what = f"{step}:{type(exc).__name__}"
        if self._failing.get(path) == what:
            log.debug("watch.%s_failed path=%s again", step, display_name(path))
            return
        self._failing[path] = what
        log.warning(
            "watch.%s_failed path=%s error=%s: %s",
            step,
            display_name(path),
            _why(exc),
            "looked at again next scan" if step == "list" else "left alone until it changes",
            exc_info=not isinstance(exc, OSError),
        )

    def _note_unlisted(self, unlisted: dict[Path, str]) -> None:
        """Count every folder not listed; log it when it starts (or its reason changes) and ends."""
        self.errors += len(unlisted)
        for root, why in unlisted.items():
            if self.unlisted.get(root) != why:
                log.error(
                    "watch.folder_unreadable folder=%s error=%s: nothing in it is taken in; give the "
                    "service user read and search access to it (or create it)",
                    display_name(root),
                    why,
                )
        for root in self.unlisted.keys() - unlisted.keys():
            log.info("watch.folder_readable folder=%s: scanning it again", display_name(root))
        self.unlisted = unlisted

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        """Start the scan thread (and the watchdog observer). The supervisor calls this again when
        the scan thread died: a live observer is kept, a dead one replaced."""
        self._stop.clear()
        for folder in self.inbox_dirs + self.night_dirs:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # each scan names it until it exists (see ``unlisted``)
                log.error("watch.folder_not_created folder=%s error=%s", display_name(folder), _why(exc))
        if self.use_watchdog and not (self._observer is not None and self._observer.is_alive()):
            self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="ctwatch-watcher", daemon=True)
        self._thread.start()

    def _start_observer(self) -> None:
        """File events only wake the scan early: without them (an inbox it may not watch, the inotify
        watch limit reached, folders nested deeper than watchdog's recursive walk goes) the periodic
        scan still finds everything, so no failure here stops the daemon."""
        observer = Observer()
        handler = _WakeHandler(self._wake)
        try:
            for folder in self.inbox_dirs:
                observer.schedule(handler, str(folder), recursive=True)
            observer.start()
        except Exception as exc:  # noqa: BLE001 — a watchdog failure costs only the early wake-ups
            log.warning(
                "watch.events_unavailable error=%s: scanning every %gs instead",
                _why(exc),
                self.scan_interval,
                exc_info=not isinstance(exc, OSError),
            )
            observer.unschedule_all()
            return
        self._observer = observer

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._pass()
            wait = self.scan_interval
            if self.tracker.pending():
                wait = min(wait, max(self.tracker.stable_seconds / 2, 0.1))
            self._wake.wait(wait)
            self._wake.clear()

    def _pass(self) -> None:
        """One scan; an exception ends the pass, never the thread (a traceback once per kind)."""
        try:
            self.scan_once()
        except Exception as exc:  # noqa: BLE001 — the next pass runs; last_scan tells it did not finish
            self.errors += 1
            what = f"{type(exc).__name__}: {exc}"
            if what != self._pass_failure:
                log.exception("watch.scan_failed errors=%d: the next scan runs as usual", self.errors)
            else:
                log.debug("watch.scan_failed again errors=%d", self.errors)
            self._pass_failure = what
            return
        if self._pass_failure is not None:
            log.info("watch.scan_recovered errors=%d", self.errors)
            self._pass_failure = None

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


def _is_candidate(entry: Path, night: bool, night_set: set[str]) -> bool:
    """Whether an inbox entry may become an arrival (``OSError`` when it cannot even be looked at)."""
    if entry.name.startswith(".") or is_temporary_name(entry.name):  # hidden (.DS_Store…) or copying
        return False
    if not night and os.path.realpath(entry) in night_set:  # realpath: never raises on a link loop
        return False
    return not (entry.is_symlink() or is_special(entry))


def _why(exc: BaseException) -> str:
    """An exception as one line of text (names escaped), for a log line."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({display_name(exc.filename)})" if exc.filename else ""
        return display_text(f"{exc.strerror}{where}")
    return display_text(f"{type(exc).__name__}: {exc}")


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
