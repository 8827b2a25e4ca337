"""An older database's schema brought up to date for a command that only reads it.

``report``, ``status`` and ``export`` read the state through a read-only connection, which never
migrates (:mod:`processor.state.db`); on a database an older ctwatch wrote — a restored backup, or
one a daemon of the previous version left — their queries would name columns it lacks.
:func:`bring_up_to_date` applies the missing migrations first, holding the state lock
(:class:`processor.instance.InstanceLock`) while it does, so it never happens under a running
ctwatch: a daemon of this version has migrated the database when it started, and one of an older
version must not find its schema changed under it.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from processor.errors import ConfigError
from processor.instance import InstanceLock
from processor.state.db import Database
from processor.state.schema import MIGRATIONS

log = logging.getLogger(__name__)


def pending_migrations(path: Path) -> list[str]:
    """Names of the migrations (:data:`MIGRATIONS`, in order) the database at ``path`` lacks; read-only."""
    conn = sqlite3.connect(f"{Path(path).as_uri()}?mode=ro", uri=True, timeout=30.0)
    try:
        try:
            done = {row[0] for row in conn.execute("select name from _migrations")}
        except sqlite3.OperationalError:  # no _migrations table: nothing applied yet
            done = set()
    finally:
        conn.close()
    return [name for name, _ in MIGRATIONS if name not in done]


def bring_up_to_date(path: Path, what: str) -> list[str]:
    """Apply the migrations the database at ``path`` lacks, under the state lock; returns their
    names (empty: it was up to date, nothing was touched). ``what`` names the command in messages.

    :class:`ConfigError`, with the fix, when it is behind and cannot be brought up to date:
    another ctwatch holds it (an older daemon runs on it), or it or its folder cannot be written.
    """
    pending = pending_migrations(path)
    if not pending:
        return []
    behind = (
        f"{path} was written by an older ctwatch: its schema lacks {len(pending)} update(s) "
        f"(from {pending[0]} on), which `{what}` applies before it reads"
    )
    lock = InstanceLock(path)
    try:
        lock.acquire(f"{what} command, bringing the schema up to date")
    except ConfigError:
        raise ConfigError(
            f"{behind}, but another ctwatch holds the database now (its process id is in "
            f"{lock.path}), so nothing was changed. Fix: stop that ctwatch, or wait if it is just "
            f"starting (a daemon of this version brings the schema up to date itself), then run "
            f"`{what}` again."
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"{behind}, but its folder cannot be written ({exc.strerror}: {lock.path}). Fix: copy the "
            f"database to a writable folder and point `state:` in the config at the copy."
        ) from exc
    try:
        Database(path).close()
    except sqlite3.Error as exc:
        raise ConfigError(
            f"{behind}, but it cannot be written ({exc}). Fix: make it writable, or copy it to a "
            f"writable folder and point `state:` in the config at the copy."
        ) from exc
    finally:
        lock.release()
    log.info("state.upgraded db=%s migrations=%s", path, ",".join(pending))
    return pending
