"""One ctwatch process per state database: an exclusive lock held for the life of a run.

The daemon (``run``) and the one-shot ``process`` command both take an exclusive ``flock`` on
``<state database>.lock`` before they touch anything: crash recovery treats every ``running``
arrival as left by a dead process, which is only true when no other process is working on the
same database. A second instance is refused at once, in plain words, before it recovers, cleans
or claims anything. The lock dies with the process (kill -9 included); the file itself stays.

A lock file deleted while its daemon runs (a clean-up habit after a kill -9) would let a second
instance lock a new file: the daemon checks its file every few seconds (:meth:`InstanceLock.
still_held`) and locks a new one at once (:meth:`InstanceLock.reassert`); if another process got
there first, the daemon stops rather than share the database.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from processor.errors import ConfigError


class InstanceLock:
    """``acquire()`` or a :class:`ConfigError` naming the process that holds it; ``release()``."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = Path(state_path)
        self.path = self.state_path.with_name(self.state_path.name + ".lock")
        self._fd: int | None = None
        self._what = "ctwatch"
        self._inode: tuple[int, int] | None = None

    def acquire(self, what: str = "ctwatch") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another ctwatch ({holder}) holds {self.state_path}, so this {what} does not start "
                "and has touched nothing. Fix: stop the other one first, or (for `process`) drop the "
                "files into the running daemon's inbox instead."
            ) from None
        if _inode_at(self.path) != _inode_of(fd):  # deleted or replaced between open and flock: again
            os.close(fd)
            return self.acquire(what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}\n".encode(), 0)
        self._fd, self._inode, self._what = fd, _inode_of(fd), what

    @property
    def held(self) -> bool:
        return self._fd is not None

    def still_held(self) -> bool:
        """Whether the file at the lock's path is still the one this process holds locked."""
        return self._fd is not None and _inode_at(self.path) == self._inode

    def reassert(self) -> None:
        """Lock the file at the path again (after it was deleted or replaced); ConfigError when
        another process holds it now."""
        old = self._fd
        self._fd = self._inode = None
        try:
            self.acquire(self._what)
        finally:
            if old is not None:
                os.close(old)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = self._inode = None


def _inode_of(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _inode_at(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
