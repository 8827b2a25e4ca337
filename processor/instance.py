"""One ctwatch process per state database: an exclusive lock held for the life of a run.

The daemon (``run``) and the one-shot ``process`` command both take an exclusive ``flock`` on
``<state database>.lock`` before they touch anything: crash recovery treats every ``running``
arrival as left by a dead process, which is only true when no other process is working on the
same database. A second instance is refused at once, in plain words, before it recovers, cleans
or claims anything. The lock dies with the process (kill -9 included); the file itself stays.
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

    def acquire(self, what: str = "ctwatch") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"state {self.state_path}: another ctwatch process ({holder}) is using this state "
                f"database, so this {what} does not start. Fix: stop the other one first, or (for "
                "`process`) drop the files into the running daemon's inbox instead."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
