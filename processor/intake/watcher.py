"""Watch the inbox folders and hand over each dropped file or folder once it is *stable*.

A watchdog observer (inotify where available) wakes the scanner early; a periodic scan runs
regardless, because file events do not arrive from SMB/NFS shares, and a scan at start-up picks up
what arrived while the daemon was stopped.

An entry is taken when it is *complete*:

* a file once its size and change time have not changed for ``stable_seconds`` (the quiet period);
* a folder once its file count, total size and newest change have not changed for
  ``folder_stable_seconds`` (longer: a network copy of a folder pauses between files);
* and its content reads whole: a ZIP's central directory reads; a DICOM file, and every DICOM file
  of a folder, parses and holds all of its Pixel Data (:mod:`processor.intake.complete`).

Content that stays unreadable while unchanged for three quiet periods is handed over anyway, never
waited on for ever: a ZIP to be rejected with its reason; a folder to be processed with what reads —
the warning ``watch.unfinished_handover`` names each file that did not, the reader sets it aside
(counted under ``skipped`` in the receipt, or the study fails naming it when its pixels are cut
short) and it stays in the folder, kept whole in ``done/`` or ``quarantine/``; nothing is deleted.

A file or folder dropped under a temporary name (``x.zip.part``, rsync's ``.x.zip.XXXXXX``; see
:func:`processor.intake.inbox.is_temporary_name`) waits until it is renamed. A file under such a
name *inside* a dropped folder is a copy in progress, or a leftover that will never be renamed (a
desktop's ``.directory``, an editor's ``~$notes.docx``, a thumbnail cache's dot-file): the folder
waits while it changes, and once the folder has stayed unchanged for :data:`LEFTOVER_PERIODS` of its
quiet periods the file is a leftover — the folder is taken, the reader sets the file aside (counted
under ``skipped``) and it stays in the folder. A folder that waits on such a file past one quiet
period is logged once (``watch.waiting_on_temporary``, naming the files) so that an admin sees why.

Events come from every inbox, night and urgent folder; one inside another (the default night and
urgent folders lie in the day inbox) is covered by that one's recursive watch and not watched twice.

On a local disk a ZIP or DICOM file is taken as soon as its writer has closed it (or renamed it into
place) and its content reads whole, without the quiet period (:mod:`processor.intake.closes`, which
also says why network shares keep the quiet period and how a write after the close is handled).

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
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.observers.api import BaseObserver

from processor.errors import Deferred
from processor.intake.closes import SETTLE_SECONDS, CloseEvents
from processor.intake.complete import ContentChecks
from processor.intake.events import WakeHandler, close_roots, start_observer, watched_folders
from processor.intake.inbox import error_text, is_temporary_name
from processor.intake.stability import Signature, StabilityTracker, is_special, looked_at
from processor.names import display_name

log = logging.getLogger(__name__)

UNREADABLE_PERIODS = 3  # quiet periods an entry whose content does not read whole is waited for
LEFTOVER_PERIODS = 3  # quiet periods a folder holding temporary-named files is waited for


class InboxWatcher:
    """Finds stable entries in the inbox folders and calls ``on_stable(path, night)`` for each.

    ``urgent_dirs`` are scanned like day inboxes (``night`` False; the caller tells their entries
    apart by folder); a day inbox never takes a night or urgent folder inside it in as an entry.

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
        urgent_dirs: Iterable[Path] = (),
        folder_stable_seconds: float | None = None,
    ) -> None:
        self.inbox_dirs = [Path(p) for p in inbox_dirs]
        self.night_dirs = [Path(p) for p in night_dirs]
        self.urgent_dirs = [Path(p) for p in urgent_dirs]
        self.scan_interval = scan_interval
        self.on_stable = on_stable
        self.clock = clock
        self.tracker = StabilityTracker(stable_seconds)
        # a folder's quiet period (seconds; None: a file's); never shorter than a file's
        self.folder_stable_seconds = max(stable_seconds, folder_stable_seconds or 0.0)
        self.closes = CloseEvents((), clock, settle=min(SETTLE_SECONDS, stable_seconds))
        self.contents = ContentChecks()
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
        self._temporary_logged: set[Path] = set()  # folders whose wait on temporary names is logged
        self._pass_failure: str | None = None

    # ------------------------------------------------------------------ scanning
    def candidates(self) -> list[tuple[Path, bool]]:
        """Entries of every inbox and night folder that may become arrivals. A folder that cannot be
        listed is named in :attr:`unlisted`; an entry that cannot be looked at is logged and left out
        of this pass."""
        out: list[tuple[Path, bool]] = []
        roots = [(d, False) for d in self.inbox_dirs + self.urgent_dirs] + [
            (d, True) for d in self.night_dirs
        ]
        night_set = {os.path.realpath(d) for d in self.night_dirs + self.urgent_dirs}  # lanes, not entries
        unlisted: dict[Path, str] = {}
        for root, night in roots:
            try:
                if not os.path.lexists(root):  # deleted while we run (an emptied night folder): again
                    root.mkdir(parents=True, exist_ok=True)
                    log.warning("watch.folder_recreated folder=%s", display_name(root))
                entries = sorted(root.iterdir())
            except OSError as exc:
                unlisted[root] = error_text(exc)
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
        listed_at = self.clock()
        handed: list[Path] = []
        present: set[Path] = set()
        for path, night in self.candidates():
            present.add(path)
            # the clock read for each entry: a scan whose hand-overs take seconds must not date a
            # change it sees late to the scan's start (the quiet period would be cut short)
            if self._check(path, night, self.clock()):
                handed.append(path)
        # what was remembered of the entries of a folder that could not be listed this time is kept
        # (set aside, quiet since, closed): a listing that fails once must not hand them over again
        present |= self._remembered_in(set(self.unlisted))
        self.tracker.prune(present)
        self.closes.prune(present, listed_at)  # not a close that came in after the listing began
        self.contents.prune(present)
        for path in [p for p in self._failing if not os.path.lexists(p)]:
            del self._failing[path]
        for path in [p for p in self.deferred if not os.path.lexists(p)]:
            del self.deferred[path]
        self._temporary_logged &= present
        if not self.unlisted:
            self.last_scan = time.time()
        return handed

    def _remembered_in(self, folders: set[Path]) -> set[Path]:
        """The entries of ``folders`` that the tracker, the closes or the contents remember."""
        if not folders:
            return set()
        known = self.tracker.known() | self.closes.known() | self.contents.known()
        return {path for path in known if path.parent in folders}

    def _check(self, path: Path, night: bool, now: float) -> bool:
        """Hand the entry over if it is stable; whether it was. Never raises: a failure is logged
        (once) and the entry set aside until it changes."""
        sig: Signature | None = None
        step = "check"
        try:
            sig, temporary = looked_at(path)
            if sig is None or (sig[0] == 0 and path.is_dir()) or self.tracker.is_set_aside(path, sig):
                return False
            if not self._ready(path, sig, now, temporary):
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

    def _ready(self, path: Path, sig: Signature, now: float, temporary: list[Path]) -> bool:
        """Whether the entry is complete (see the module docstring): quiet for its period and whole,
        or unreadable for :data:`UNREADABLE_PERIODS` of them; or a file closed on a local disk and
        whole. A folder holding ``temporary`` (temporary-named files) waits for
        :data:`LEFTOVER_PERIODS` of its quiet periods."""
        folder = path.is_dir()
        need = self.folder_stable_seconds if folder else self.tracker.stable_seconds
        quiet = self.tracker.stable(path, sig, now, need)
        if quiet is None:
            if folder or not self.closes.settled(path, sig[1], now):
                return False
            content = self.contents.of(path, sig)
            if content.missing or not content.known:
                self.closes.forget(path)  # unchanged until written again: the quiet period decides
                return False
            log.info("watch.closed path=%s: taken as its writer closed it", display_name(path))
        else:
            if temporary and not self._leftovers(path, temporary, quiet, need):
                return False
            missing = self.contents.of(path, sig).missing
            if missing:
                if quiet < UNREADABLE_PERIODS * max(need, 1.0):
                    log.debug(
                        "watch.unfinished path=%s quiet=%.1f: %s", display_name(path), quiet, missing[0][1]
                    )
                    return False
                _log_unfinished_handover(path, quiet, missing)
        self.tracker.forget(path)
        self.closes.forget(path)
        self.contents.forget(path)
        self._temporary_logged.discard(path)
        return True

    def _leftovers(self, path: Path, temporary: list[Path], quiet: float, need: float) -> bool:
        """Whether a folder's temporary-named files have stayed unchanged long enough to be leftovers
        (the folder quiet for :data:`LEFTOVER_PERIODS` quiet periods); logged once when it waits."""
        if quiet >= LEFTOVER_PERIODS * max(need, 1.0):
            log.info(
                "watch.leftovers_set_aside path=%s files=%d: taken; its temporary-named files (%s) "
                "were unchanged for %d quiet periods, so they are not copies in progress: they are "
                "skipped, and kept in the folder",
                display_name(path),
                len(temporary),
                _parts(path, temporary),
                LEFTOVER_PERIODS,
            )
            return True
        if path not in self._temporary_logged:
            self._temporary_logged.add(path)
            log.warning(
                "watch.waiting_on_temporary path=%s files=%d: waiting while it holds files named as "
                "copies in progress (%s); once the folder is unchanged for %d quiet periods (%.0f s) "
                "they count as leftovers, are skipped and the folder is taken",
                display_name(path),
                len(temporary),
                _parts(path, temporary),
                LEFTOVER_PERIODS,
                LEFTOVER_PERIODS * max(need, 1.0),
            )
        return False

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
            error_text(exc),
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
        for folder in self.inbox_dirs + self.night_dirs + self.urgent_dirs:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # each scan names it until it exists (see ``unlisted``)
                log.error(
                    "watch.folder_not_created folder=%s error=%s", display_name(folder), error_text(exc)
                )
        if self.use_watchdog and not (self._observer is not None and self._observer.is_alive()):
            self._start_observer()
        self._thread = threading.Thread(target=self._loop, name="ctwatch-watcher", daemon=True)
        self._thread.start()

    def _start_observer(self) -> None:
        """Start the watchdog observer (:func:`processor.intake.events.start_observer`); the scan
        runs without it when it cannot start."""
        folders = self.inbox_dirs + self.night_dirs + self.urgent_dirs
        self.closes.roots = close_roots(folders)
        observer = start_observer(
            WakeHandler(self._wake, self.closes), self.watched_folders(), self.scan_interval
        )
        if observer is not None:
            self._observer = observer

    def watched_folders(self) -> list[Path]:
        """The inbox, night and urgent folders to watch (recursively), each once: a folder inside
        another (the same folder after links are resolved, or one below it) is left to that one."""
        return watched_folders(self.inbox_dirs + self.night_dirs + self.urgent_dirs)

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._pass()
            wait = self.scan_interval
            if self.tracker.pending():
                wait = min(wait, max(self.tracker.stable_seconds / 2, 0.1))
            settling = self.closes.waiting(self.clock())
            if settling is not None:  # a closed file is looked at again as soon as its close settles
                wait = min(wait, settling + 0.01)
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
            try:
                self._observer.stop()
            except (KeyError, OSError) as exc:
                # watchdog's inotify bookkeeping of a watched folder that was just moved or removed
                # (an arrival's work folder) can fail while it unschedules (watchdog #758; seen here
                # as KeyError of the folder's path): its threads are told to stop all the same, and
                # the daemon's shutdown goes on (it exited 1 with a traceback instead)
                log.warning(
                    "watch.observer_stop error=%s: the watches are dropped with the process",
                    type(exc).__name__,
                )

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


def _parts(path: Path, parts: list[Path]) -> str:
    """Up to five parts of a folder by their relative names (escaped), and how many more."""
    shown = ", ".join(display_name(part.relative_to(path).as_posix()) for part in parts[:5])
    return shown + (f" and {len(parts) - 5} more" if len(parts) > 5 else "")


def _log_unfinished_handover(path: Path, quiet: float, missing: list[tuple[Path, str]]) -> None:
    """Say, in plain words, which parts of an entry are handed over although they never read whole."""
    shown = "; ".join(
        f"{display_name(part.relative_to(path).as_posix() if part != path else part.name)}: {why}"
        for part, why in missing[:5]
    )
    more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
    log.warning(
        "watch.unfinished_handover path=%s quiet=%.1f files=%d: taken in although unchanged for %d quiet "
        "periods and still not whole (%s%s); what does not read is refused or set aside with the reason "
        "in the receipt, and kept with the input: nothing is deleted",
        display_name(path),
        quiet,
        len(missing),
        UNREADABLE_PERIODS,
        shown,
        more,
    )
