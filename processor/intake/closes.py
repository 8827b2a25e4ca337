"""Close-after-write events: the fast path that takes a copied file within a second of its copy ending.

On a local disk, Linux's inotify reports when a writer closes a file (``IN_CLOSE_WRITE``, watchdog's
``FileClosedEvent``) and when a file is renamed into place (``FileMovedEvent``: rsync, browsers and
``curl`` write under a temporary name, then rename). Either means "the writer is done with it" — for
this session. A copy tool that writes in sessions closes, reopens and appends; a write after a close
(``FileModifiedEvent``) voids it, and a close counts only once it has *settled*: no write for
:data:`SETTLE_SECONDS` and the size unchanged since. The watcher still checks the content (a ZIP's
central directory reads, a DICOM file holds its whole Pixel Data) before it takes a closed file;
otherwise the entry waits for the quiet period like any other.

Network shares keep the quiet period: inotify sees only the writes made through this machine's own
kernel, never those of the file server or of other clients of an SMB/NFS share. Which inboxes may
use close events is decided from the filesystem type in ``/proc/self/mounts`` (Linux's mount
table): only the local filesystems in :data:`LOCAL_FILESYSTEMS`; anything else (``cifs``,
``smb3``, ``nfs``, ``nfs4``, ``fuse.sshfs``…, or no mount table) waits for the quiet period.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Local block-device and memory filesystems, on which inotify sees every write (Linux's filesystems).
LOCAL_FILESYSTEMS = frozenset(
    {
        "ext2",
        "ext3",
        "ext4",
        "xfs",
        "btrfs",
        "zfs",
        "f2fs",
        "jfs",
        "reiserfs",
        "bcachefs",
        "nilfs2",
        "tmpfs",
        "ramfs",
        "overlay",
        "vfat",
        "exfat",
        "ntfs3",
        "hfsplus",
    }
)
SETTLE_SECONDS = 0.5  # a close counts once no write followed it for this long (at most the quiet period)
MOUNTS = Path("/proc/self/mounts")
_ESCAPE = re.compile(r"\\([0-7]{3})")  # the mount table writes space, tab, newline, backslash as \ooo


def filesystem_type(path: Path, mounts: str | None = None) -> str | None:
    """The filesystem type of the mount that holds ``path`` (symbolic links resolved), from the text
    of a Linux mount table (default: ``/proc/self/mounts``); None when there is none to read."""
    if mounts is None:
        try:
            mounts = MOUNTS.read_bytes().decode("utf-8", "surrogateescape")
        except OSError:
            return None
    target = os.path.realpath(path)
    best: tuple[int, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[1])
        inside = point == "/" or target == point or target.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) >= best[0]):  # a later mount on the same point wins
            best = (len(point), fields[2])
    return None if best is None else best[1]


def close_events_trusted(fs_type: str | None) -> bool:
    """Whether close events on a filesystem of this type mean the copy's writer is done (see the
    module docstring)."""
    return fs_type in LOCAL_FILESYSTEMS


@dataclass
class _Close:
    at: float  # the clock when the event was handled
    size: int  # the file's size then


class CloseEvents:
    """The settled close (or rename-into-place) of files that lie directly in a trusted inbox folder.

    Fed from watchdog's observer thread (:meth:`closed`, :meth:`written`), read by the scan thread
    (:meth:`settled`); a lock keeps the two apart. ``roots``: the folders whose direct entries may be
    taken on a close (the inbox and night folders on a local filesystem).
    """

    def __init__(
        self, roots: Iterable[Path], clock: Callable[[], float], settle: float = SETTLE_SECONDS
    ) -> None:
        self.roots = {Path(r) for r in roots}
        self.clock = clock
        self.settle = settle
        self._lock = threading.Lock()
        self._closes: dict[Path, _Close] = {}

    def closed(self, path: str | bytes) -> None:
        """A writer closed ``path`` (or renamed a finished file to it)."""
        entry = Path(os.fsdecode(path))
        if entry.parent not in self.roots:
            return
        try:
            size = entry.stat().st_size
        except OSError:
            return
        with self._lock:
            self._closes[entry] = _Close(self.clock(), size)

    def written(self, path: str | bytes) -> None:
        """``path`` was written to (or created) again: an earlier close no longer counts."""
        with self._lock:
            self._closes.pop(Path(os.fsdecode(path)), None)

    def settled(self, path: Path, size: int, now: float) -> bool:
        """Whether ``path`` was closed at least :attr:`settle` seconds ago, not written since, and
        still has the size it had when it was closed."""
        with self._lock:
            close = self._closes.get(path)
        return close is not None and now - close.at >= self.settle and close.size == size

    def waiting(self, now: float) -> float | None:
        """Seconds until the next recorded close settles; None when every one has (or none is recorded)."""
        with self._lock:
            left = [c.at + self.settle - now for c in self._closes.values()]
        left = [t for t in left if t > 0]
        return min(left) if left else None

    def forget(self, path: Path) -> None:
        with self._lock:
            self._closes.pop(path, None)

    def known(self) -> set[Path]:
        """The entries whose close is remembered."""
        with self._lock:
            return set(self._closes)

    def prune(self, present: set[Path], listed_at: float) -> None:
        """Forget the closes of entries not ``present`` in a listing begun at ``listed_at`` (the
        clock); a close recorded since then is kept: its file may have appeared after its folder was
        listed (dropped while the scan handed over another), and the next scan looks at it."""
        with self._lock:
            for path in [p for p, c in self._closes.items() if p not in present and c.at < listed_at]:
                del self._closes[path]
