"""File events that wake the watcher's scan early, and the watchdog observer that delivers them.

A watchdog observer (inotify where available) watches every inbox, night and urgent folder
recursively, each once (:func:`watched_folders`); :class:`WakeHandler` wakes the scan of
:class:`processor.intake.watcher.InboxWatcher` on any event and tells
:class:`processor.intake.closes.CloseEvents` when a file was closed after writing, renamed into
place or written again, on the folders whose filesystem makes close events trustworthy
(:func:`close_roots`). The events only wake the scan early: without them the periodic scan still
finds everything, so no failure here stops the daemon (:func:`start_observer`).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from processor.intake.closes import CloseEvents, close_events_trusted, filesystem_type
from processor.intake.inbox import CONTROL_DIR, error_text
from processor.names import display_name

log = logging.getLogger(__name__)
# watchdog's inotify emitter warns (on its own thread, to stderr) when a folder created during its
# recursive walk is added twice; the watch is the same one, so nothing is lost.
warnings.filterwarnings(
    "ignore", message="Callback with id", category=RuntimeWarning, module="watchdog.observers.inotify"
)


def start_observer(
    handler: FileSystemEventHandler, folders: list[Path], scan_interval: float
) -> BaseObserver | None:
    """A started observer sending every event under ``folders`` (recursively) to ``handler``; None
    when it could not start. File events only wake the scan early: without them (an inbox it may not
    watch, the inotify watch limit reached, folders nested deeper than watchdog's recursive walk
    goes) the periodic scan still finds everything, so no failure here stops the daemon."""
    observer = Observer()
    for folder in folders:
        try:
            observer.schedule(handler, str(folder), recursive=True)
        except Exception as exc:  # noqa: BLE001 — this folder is scanned without early wake-ups
            log.warning(
                "watch.events_unavailable folder=%s error=%s: scanning it every %gs instead",
                display_name(folder),
                error_text(exc),
                scan_interval,
                exc_info=not isinstance(exc, OSError),
            )
    try:
        observer.start()
    except Exception as exc:  # noqa: BLE001 — a watchdog failure costs only the early wake-ups
        log.warning(
            "watch.events_unavailable error=%s: scanning every %gs instead",
            error_text(exc),
            scan_interval,
            exc_info=not isinstance(exc, OSError),
        )
        observer.unschedule_all()
        return None
    return observer


def watched_folders(folders: list[Path]) -> list[Path]:
    """The folders to watch (recursively), each once: a folder inside another (the same folder
    after links are resolved, or one below it) is left to that one."""
    real = [os.path.realpath(f) for f in folders]
    return [
        folder
        for i, folder in enumerate(folders)
        if not any(
            (real[i] == other and j < i) or real[i].startswith(other.rstrip("/") + "/")
            for j, other in enumerate(real)
            if j != i
        )
    ]


def close_roots(folders: list[Path]) -> set[Path]:
    """The folders on a local filesystem, whose files may be taken when their writer closes them
    (:mod:`processor.intake.closes`); each folder's filesystem is logged."""
    roots = set()
    for folder in folders:
        fs = filesystem_type(folder)
        trusted = close_events_trusted(fs)
        if trusted:
            roots.add(folder)
        log.info(
            "watch.close_events folder=%s filesystem=%s: %s",
            display_name(folder),
            fs or "unknown",
            "a ZIP or DICOM file is taken once its writer closes it and it reads whole"
            if trusted
            else "not a local disk (or unknown), so every file waits for its quiet period",
        )
    return roots


class WakeHandler(FileSystemEventHandler):
    """Wakes the scan on any event outside the control folder, and tells ``closes`` when a file
    was closed after writing, renamed into place, or written again."""

    def __init__(self, wake: threading.Event, closes: CloseEvents | None = None) -> None:
        self._wake = wake
        self._closes = closes

    def on_any_event(self, event: FileSystemEvent) -> None:
        src = os.fsdecode(event.src_path)
        if f"/{CONTROL_DIR}" in src or isinstance(event, FileOpenedEvent | FileClosedNoWriteEvent):
            return  # ctwatch's own work, or a reader: nothing changed
        closes = self._closes
        if closes is not None:
            if isinstance(event, FileClosedEvent):
                closes.closed(src)
            elif isinstance(event, FileMovedEvent):
                closes.written(src)
                closes.closed(event.dest_path)
            elif isinstance(event, FileModifiedEvent | FileCreatedEvent):
                closes.written(src)
        self._wake.set()
