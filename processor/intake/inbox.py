"""Where a dropped file lives during its life, and the moves between those places.

``<inbox>/.ctwatch/work/`` while it is processed, then ``.ctwatch/done/<date>/`` or
``.ctwatch/quarantine/`` (with ``<name>.error.txt`` saying why). Every move is a rename on the
same filesystem; nothing a user dropped is ever deleted by this module.

Names in those folders are display names (:func:`processor.names.display_name`: valid text, bytes
that are not UTF-8 shown as ``\\xNN``), shortened to fit the filesystem's 255-byte limit; the
original bytes of a name stay in SQLite and the receipt (``name_bytes``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from processor.errors import Deferred
from processor.names import display_name, display_text, escape_surrogates, raw_name

log = logging.getLogger(__name__)

NAME_MAX_BYTES = 255  # longest file name (in bytes) on ext4, XFS, NTFS (UTF-16 units), SMB
TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", ".filepart", ".!ut")
CONTROL_DIR = ".ctwatch"


# Dot-names that desktops leave for good beside copied files (Finder's folder settings and AppleDouble
# resource forks): never temporary, or a folder copied from a Mac would never become stable.
DESKTOP_LEFTOVERS = (".DS_Store", "._")


def is_temporary_name(name: str) -> bool:
    """Names that copy tools use while a file is still being written (rsync's ``.name.XXXXXX``, a
    browser's ``.crdownload``…); they wait until renamed. ``.DS_Store`` and ``._*`` are not."""
    if name == DESKTOP_LEFTOVERS[0] or name.startswith(DESKTOP_LEFTOVERS[1]):
        return False
    lower = name.lower()
    return name.startswith(".") or name.startswith("~$") or lower.endswith(TEMP_SUFFIXES)


def sha256_of(path: Path, should_stop: Callable[[], bool] | None = None) -> tuple[str, int]:
    """Content hash (hex) and size in bytes of a file, or of a folder (each file's relative name as
    raw bytes, a NUL, its bytes; in sorted order). ``OSError`` when something cannot be read —
    ``PermissionError`` naming the part, for a file or sub-folder ctwatch may not read.
    ``should_stop`` is asked at every MiB: :class:`~processor.errors.Deferred` once it says yes."""
    digest = hashlib.sha256()
    size = 0
    if path.is_dir():
        for child, _ in folder_files(path):
            digest.update(raw_name(child.relative_to(path).as_posix()) + b"\x00")
            size += _feed(digest, child, should_stop)
    else:
        size = _feed(digest, path, should_stop)
    return digest.hexdigest(), size


def folder_files(root: Path) -> Iterator[tuple[Path, os.stat_result]]:
    """Every regular file under ``root`` with its ``lstat``, in the order ``sorted(root.rglob("*"))``
    gives. Symbolic links are neither followed nor listed; nor are pipes, sockets and devices.

    ``Path.rglob`` silently leaves out a sub-folder it may not list; this raises ``PermissionError``
    (its ``filename`` the folder or file) for any part it cannot list or stat, so a folder is never
    taken for complete when it is not. A part that vanishes during the walk is left out (``root``
    itself must exist). Iterative: no nesting depth is too deep.
    """
    stack: list[tuple[Path, os.stat_result | None]] = [(root, None)]
    while stack:
        path, st = stack.pop()
        if st is not None:
            yield path, st
            continue
        try:
            with os.scandir(path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except FileNotFoundError:
            if path == root:
                raise
            continue
        children: list[tuple[Path, os.stat_result | None]] = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    children.append((Path(entry.path), None))
                elif entry.is_file(follow_symlinks=False):
                    children.append((Path(entry.path), entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
        stack.extend(reversed(children))  # the first name next: a folder's files before its next sibling


def _feed(digest: hashlib._Hash, path: Path, should_stop: Callable[[], bool] | None = None) -> int:
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            if should_stop is not None and should_stop():
                raise Deferred("the daemon is stopping; the input is taken in at the next start")
            digest.update(chunk)
            size += len(chunk)
    return size


@dataclass(frozen=True)
class InboxLayout:
    """The control folders of one inbox directory."""

    inbox: Path

    @property
    def control(self) -> Path:
        return self.inbox / CONTROL_DIR

    @property
    def work(self) -> Path:
        return self.control / "work"

    @property
    def quarantine(self) -> Path:
        return self.control / "quarantine"

    def done(self, day: date) -> Path:
        return self.control / "done" / day.isoformat()

    def ensure(self) -> None:
        for folder in (self.work, self.quarantine, self.control / "done"):
            folder.mkdir(parents=True, exist_ok=True)


def work_name(arrival_id: int, name: str) -> str:
    """``a<id>-<name>``: the input's name in the work folder (``name``: its display name)."""
    return fit_name(f"a{arrival_id}-{display_name(name)}")


def fit_name(name: str, spare: int = 0) -> str:
    """``name`` cut (before its extension) to fit ``NAME_MAX_BYTES - spare`` bytes of UTF-8."""
    limit = NAME_MAX_BYTES - spare
    if len(name.encode("utf-8")) <= limit:
        return name
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem or len(suffix) > 16:
        stem, suffix = name, ""
    suffix = f".{suffix}" if suffix else ""
    room = limit - len(suffix.encode("utf-8"))
    return stem.encode("utf-8")[:room].decode("utf-8", "ignore") + suffix


def free_path(folder: Path, name: str, arrival_id: int) -> Path:
    """``folder/name`` if free, else ``folder/<stem>.a<id><suffix>`` (then a counter).

    ``name`` is shown as its display name and cut to leave room for ``.error.txt`` beside it.
    """
    name = fit_name(display_name(name), spare=len(".error.txt"))
    candidate = folder / name
    if not candidate.exists() and not candidate.is_symlink():
        return candidate
    stem, suffix = (name.rsplit(".", 1)[0], "." + name.rsplit(".", 1)[1]) if "." in name else (name, "")
    stem = fit_name(stem, spare=len(suffix) + len(f".a{arrival_id}-99.error.txt"))
    candidate = folder / f"{stem}.a{arrival_id}{suffix}"
    counter = 1
    while candidate.exists():
        counter += 1
        candidate = folder / f"{stem}.a{arrival_id}-{counter}{suffix}"
    return candidate


def move(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest) if not dest.exists() else _refuse(dest)
    log.debug("file.moved from=%s to=%s", display_name(src), display_name(dest))
    return dest


def _refuse(dest: Path) -> None:
    raise FileExistsError(f"will not overwrite {dest}")


def write_error_note(target: Path, reason: str) -> Path:
    """``<name>.error.txt`` beside a quarantined input, in plain words (UTF-8). ``OSError`` if unwritable."""
    note = target.with_name(target.name + ".error.txt")
    note.write_text(
        f"ctwatch could not process {display_name(target.name)}.\n\nReason: {escape_surrogates(reason)}\n\n"
        "The file is kept here unchanged. Fix the cause, then copy it into the inbox again "
        "(or run `python run.py requeue <arrival id>`).\n",
        encoding="utf-8",
    )
    return note


def error_text(exc: BaseException) -> str:
    """An exception as one line of text (names escaped), for a log line."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({display_name(exc.filename)})" if exc.filename else ""
        return display_text(f"{exc.strerror}{where}")
    return display_text(f"{type(exc).__name__}: {exc}")
