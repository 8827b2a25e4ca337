"""One SQLite database, one connection per thread, opened on first use inside that thread.

SQLite connections must not be shared between threads; :class:`Database` hides that: any thread
may call it, and each gets its own connection (WAL journal, ``synchronous=NORMAL``, foreign
keys on). ``close()`` closes them all, once the threads that used them are done. Read-only
handles (the status endpoint) open with ``mode=ro`` and never migrate.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from processor.names import escape_surrogates, is_text, raw_name
from processor.state.schema import MIGRATIONS
from processor.state.sqlitelib import Database as SqliteUtilsDatabase
from processor.vocab import utcnow

log = logging.getLogger(__name__)

PATH_COLUMNS = ("original_path", "current_path", "final_path")


class Database:
    """The connection-per-thread core that every part of :class:`processor.state.State` uses."""

    def __init__(self, path: Path, *, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.timeout = timeout
        self._local = threading.local()
        self._opened: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db  # noqa: B018 — open now, so a missing or unreadable database fails at construction
        if not readonly:
            self._migrate()

    @property
    def db(self) -> SqliteUtilsDatabase:
        """This thread's connection (opened on first use)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = SqliteUtilsDatabase(self._connect())
        return db

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            conn = sqlite3.connect(
                f"{self.path.as_uri()}?mode=ro", uri=True, timeout=self.timeout, check_same_thread=False
            )
        else:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._opened.append(conn)
        return conn

    def close(self) -> None:
        """Close every connection opened through this object (after the threads using it ended)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for conn in opened:
            conn.close()
        self._local = threading.local()

    def _migrate(self) -> None:
        self.db.table("_migrations").create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
        done = {row["name"] for row in self.db.table("_migrations").rows}
        for name, apply in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                apply(self.db)
                self.db.table("_migrations").insert({"name": name, "applied_at": utcnow()})
            log.info("state.migrated name=%s db=%s", name, self.path)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """An IMMEDIATE transaction: the write lock is taken up front, so check-then-insert is atomic."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``: ``"ok"`` or SQLite's description of the damage."""
        return "; ".join(str(row[0]) for row in self.db.execute("PRAGMA integrity_check").fetchall())


def stored_path(path: str | None) -> str | bytes | None:
    """A path as SQLite keeps it: text when valid UTF-8, else a BLOB of its raw bytes."""
    if path is None or is_text(path):
        return path
    return raw_name(path)


def loaded_path(value: str | bytes | None) -> str | None:
    """A path column back as the ``str`` that ``os`` functions take (surrogate escapes for raw bytes)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def storable(value: Any) -> Any:
    """Text that SQLite takes: surrogate escapes (bytes of a name) shown as ``\\xNN``."""
    return escape_surrogates(value) if isinstance(value, str) else value


def dumps(document: Any) -> str:
    return json.dumps(document, default=str)
