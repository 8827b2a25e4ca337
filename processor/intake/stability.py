"""When an inbox entry last changed: its signature, and since when it has stayed the same.

An entry's *signature* is its file count, total bytes and newest change (the later of mtime and
ctime, so a change of owner or permissions counts); :class:`StabilityTracker` remembers each
candidate's signature and since when it has not changed, which the watcher
(:mod:`processor.intake.watcher`) compares with the quiet period before it hands the entry over,
and the entries set aside until they change.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from processor.intake.inbox import folder_files, is_temporary_name

Signature = tuple[int, int, float]


def signature(path: Path) -> Signature | None:
    """(file count, total bytes, newest change) of a file or folder (see :func:`looked_at`)."""
    return looked_at(path)[0]


def looked_at(path: Path) -> tuple[Signature | None, list[Path]]:
    """(file count, total bytes, newest change) of a file or folder, None when it is gone; and the
    files of a folder under a temporary name, which it counts too (while one is written, the folder
    changes). A change is a write or a change of owner or permissions (the later of mtime and
    ctime), so an entry set aside because it could not be read is looked at again once it may be.

    A folder that cannot be walked whole (a sub-folder or file ctwatch may not list or stat) gives
    its own size and change time (count -1), so it still becomes stable and is handed over, to be
    refused with the reason; :func:`processor.intake.inbox.folder_files` says why ``rglob`` is not
    used (it leaves out what it may not list)."""
    temporary: list[Path] = []
    try:
        if path.is_dir():
            st = path.stat()
            count, total, newest = 0, 0, _changed(st)
            for child, st in folder_files(path):
                if is_temporary_name(child.name):
                    temporary.append(child)
                count, total, newest = count + 1, total + st.st_size, max(newest, _changed(st))
            return (count, total, newest), temporary
        st = path.stat()
        return (1, st.st_size, _changed(st)), temporary
    except FileNotFoundError:
        return None, []
    except OSError:
        return _own_signature(path), []


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

    def stable(self, path: Path, sig: Signature, now: float, need: float | None = None) -> float | None:
        """Seconds the entry has been unchanged once past ``need`` (default ``stable_seconds``), else None."""
        need = self.stable_seconds if need is None else need
        seen = self._seen.get(path)
        if seen is None or seen.sig != sig:
            self._seen[path] = _Seen(sig, now)
            return None if need > 0 else 0.0
        quiet = now - seen.since
        return quiet if quiet >= need else None

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

    def known(self) -> set[Path]:
        """The entries this tracker remembers (seen, or set aside)."""
        return set(self._seen) | set(self._set_aside)

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
