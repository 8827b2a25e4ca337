"""SQLite state: schema and migrations, the durable queue, and every query. Only this module writes SQL.

An arrival moves ``pending → running → done | failed | quarantined``; a second copy of the same
bytes for the same pipeline name+version is recorded as ``duplicate`` pointing at the first.
Each thread opens its own :class:`State` (SQLite connections are not shared between threads);
the status server opens one with ``readonly=True``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

log = logging.getLogger(__name__)

ACTIVE_STATES = ("pending", "running")
FINAL_STATES = ("done", "failed", "quarantined", "duplicate")


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _m1_initial(db: sqlite_utils.Database) -> None:
    db["arrivals"].create({
        "id": int, "kind": str, "source_name": str, "source_url": str, "name": str,
        "original_path": str, "current_path": str, "sha256": str, "size": int,
        "pipeline_name": str, "pipeline_version": int, "state": str, "night": int,
        "attempts": int, "error": str, "duplicate_of": int, "receipt_path": str,
        "created_at": str, "claimed_at": str, "finished_at": str,
    }, pk="id", not_null={"kind", "name", "sha256", "state"}, defaults={"attempts": 0, "night": 0})
    db["arrivals"].create_index(["sha256", "pipeline_name", "pipeline_version"])
    db["arrivals"].create_index(["state", "night", "id"])
    db["studies"].create({
        "id": int, "arrival_id": int, "study_uid": str, "series_uid": str, "accession": str,
        "status": str, "probability_of_pathology": float, "pathology": int,
        "most_dangerous_pathology_type": str, "error": str, "json_path": str, "seconds": float,
        "result_json": str, "created_at": str, "finished_at": str,
    }, pk="id", foreign_keys=[("arrival_id", "arrivals", "id")])
    db["studies"].create_index(["arrival_id", "study_uid"], unique=True)
    db["studies"].create_index(["json_path"])
    db["step_runs"].create({
        "id": int, "arrival_id": int, "study_uid": str, "step_id": str, "uses": str,
        "status": str, "seconds": float, "error": str, "finished_at": str,
    }, pk="id", foreign_keys=[("arrival_id", "arrivals", "id")])
    db["step_runs"].create_index(["arrival_id", "study_uid"])


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", _m1_initial),
]


@dataclass(frozen=True)
class Registered:
    """Outcome of registering an arrival: its id, and the id of the original when a duplicate."""

    arrival_id: int
    duplicate_of: int | None


class State:
    """One connection to the ctwatch database. Each thread opens its own (created anywhere, used by one)."""

    def __init__(self, path: Path, *, readonly: bool = False, timeout: float = 30.0) -> None:
        self.path = Path(path)
        if readonly:
            conn = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True, timeout=timeout,
                                   check_same_thread=False)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        self.db = sqlite_utils.Database(conn)
        self.readonly = readonly
        if not readonly:
            self._migrate()

    def close(self) -> None:
        self.db.conn.close()

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        self.db["_migrations"].create({"name": str, "applied_at": str}, pk="name", if_not_exists=True)
        done = {row["name"] for row in self.db["_migrations"].rows}
        for name, apply in MIGRATIONS:
            if name in done:
                continue
            with self.transaction():
                apply(self.db)
                self.db["_migrations"].insert({"name": name, "applied_at": utcnow()})
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

    # ------------------------------------------------------------------ arrivals
    def register_arrival(self, *, kind: str, name: str, original_path: str, current_path: str,
                         sha256: str, size: int, pipeline_name: str, pipeline_version: int,
                         night: bool = False, source_name: str | None = None,
                         source_url: str | None = None) -> Registered:
        """Record an arrival; the same bytes for the same pipeline name+version become a duplicate.

        A copy of an arrival that *failed* is a fresh attempt, not a duplicate (users re-drop to retry).
        """
        row = {"kind": kind, "name": name, "original_path": original_path, "current_path": current_path,
               "sha256": sha256, "size": size, "pipeline_name": pipeline_name,
               "pipeline_version": pipeline_version, "night": int(night), "attempts": 0,
               "source_name": source_name, "source_url": source_url, "created_at": utcnow()}
        with self.transaction():
            first = self._first_copy(sha256, pipeline_name, pipeline_version)
            if first is not None:
                row.update(state="duplicate", duplicate_of=first, finished_at=utcnow())
            else:
                row.update(state="pending")
            arrival_id = self.db["arrivals"].insert(row).last_pk
        return Registered(int(arrival_id), first)

    def _first_copy(self, sha256: str, name: str, version: int) -> int | None:
        rows = list(self.db.query(
            "select id from arrivals where sha256 = ? and pipeline_name = ? and pipeline_version = ? "
            "and state not in ('duplicate', 'failed') order by id limit 1", [sha256, name, version]))
        return rows[0]["id"] if rows else None

    def claim(self, arrival_id: int) -> dict[str, Any] | None:
        """Take one specific pending arrival (the ``process`` command), or None if it is not pending."""
        with self.transaction():
            cur = self.db.execute("update arrivals set state = 'running', attempts = attempts + 1, "
                                  "claimed_at = ? where id = ? and state = 'pending'", [utcnow(), arrival_id])
        return self.arrival(arrival_id) if cur.rowcount == 1 else None

    def active_paths(self) -> set[str]:
        """Current paths of arrivals not yet finished (the watcher must not register them again)."""
        return {row["current_path"] for row in self.db.query(
            "select current_path from arrivals where state in ('pending', 'running') "
            "and current_path is not null")}

    def claim_next(self, *, allow_night: bool) -> dict[str, Any] | None:
        """Atomically take the oldest pending arrival (day queue first) and mark it running."""
        night_clause = "" if allow_night else "and night = 0"
        with self.transaction():
            rows = list(self.db.query(
                f"select * from arrivals where state = 'pending' {night_clause} "
                "order by night, id limit 1"))
            if not rows:
                return None
            row = rows[0]
            self.db.execute("update arrivals set state = 'running', attempts = attempts + 1, "
                            "claimed_at = ? where id = ?", [utcnow(), row["id"]])
        return self.arrival(row["id"])

    def recover_running(self, max_attempts: int) -> list[dict[str, Any]]:
        """After a crash: ``running`` rows go back to ``pending``, or to ``failed`` past the cap."""
        recovered = []
        with self.transaction():
            for row in list(self.db.query("select * from arrivals where state = 'running'")):
                if row["attempts"] >= max_attempts:
                    self._set(row["id"], state="failed", finished_at=utcnow(),
                              error=f"gave up after {row['attempts']} attempts interrupted by a crash "
                                    "or restart; requeue it with `python run.py requeue "
                                    f"{row['id']}` once the cause is fixed")
                else:
                    self._set(row["id"], state="pending")
                recovered.append(self.arrival(row["id"]))
        return recovered

    def release(self, arrival_id: int) -> None:
        """Put a running arrival back to pending without counting the attempt (clean shutdown)."""
        self.db.execute("update arrivals set state = 'pending', attempts = max(attempts - 1, 0) "
                        "where id = ? and state = 'running'", [arrival_id])

    def finish_arrival(self, arrival_id: int, state: str, *, error: str | None = None,
                       current_path: str | None = None, receipt_path: str | None = None) -> None:
        assert state in FINAL_STATES, state
        fields: dict[str, Any] = {"state": state, "error": error, "finished_at": utcnow()}
        if current_path is not None:
            fields["current_path"] = current_path
        if receipt_path is not None:
            fields["receipt_path"] = receipt_path
        self._set(arrival_id, **fields)

    def update_arrival(self, arrival_id: int, **fields: Any) -> None:
        self._set(arrival_id, **fields)

    def _set(self, arrival_id: int, **fields: Any) -> None:
        self.db["arrivals"].update(arrival_id, fields)

    def requeue(self, arrival_id: int) -> bool:
        cur = self.db.execute("update arrivals set state = 'pending', attempts = 0, error = null "
                              "where id = ? and state in ('failed', 'quarantined')", [arrival_id])
        return cur.rowcount == 1

    def requeue_failed(self) -> int:
        cur = self.db.execute("update arrivals set state = 'pending', attempts = 0, error = null "
                              "where state = 'failed'")
        return cur.rowcount

    def arrival(self, arrival_id: int) -> dict[str, Any]:
        return dict(self.db["arrivals"].get(arrival_id))

    def arrivals(self, *, limit: int = 10, state: str | None = None) -> list[dict[str, Any]]:
        where, args = ("where state = ?", [state]) if state else ("", [])
        return list(self.db.query(f"select * from arrivals {where} order by id desc limit ?", [*args, limit]))

    def counts_by_state(self) -> dict[str, int]:
        return {row["state"]: row["n"] for row in self.db.query(
            "select state, count(*) as n from arrivals group by state")}

    # ------------------------------------------------------------------ studies and steps
    def json_path_owner(self, json_path: str) -> tuple[int, str] | None:
        rows = list(self.db.query("select arrival_id, study_uid from studies where json_path = ? limit 1",
                                  [json_path]))
        return (rows[0]["arrival_id"], rows[0]["study_uid"]) if rows else None

    def record_study(self, arrival_id: int, study_uid: str, fields: dict[str, Any],
                     steps: list[dict[str, Any]]) -> None:
        """Store one study's outcome and its step runs; a re-run of the same arrival replaces them."""
        document = fields.pop("result", None)
        row = {"arrival_id": arrival_id, "study_uid": study_uid, "finished_at": utcnow(), **fields,
               "result_json": json.dumps(document, default=str) if document is not None else None}
        with self.transaction():
            self.db.execute("delete from step_runs where arrival_id = ? and study_uid = ?",
                            [arrival_id, study_uid])
            existing = list(self.db.query("select id, created_at from studies where arrival_id = ? "
                                          "and study_uid = ?", [arrival_id, study_uid]))
            if existing:
                self.db["studies"].update(existing[0]["id"], row)
            else:
                self.db["studies"].insert({**row, "created_at": utcnow()})
            for step in steps:
                self.db["step_runs"].insert({"arrival_id": arrival_id, "study_uid": study_uid,
                                             "finished_at": utcnow(), **step})

    def studies_for(self, arrival_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("select * from studies where arrival_id = ? order by id", [arrival_id]))

    def step_runs(self, arrival_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("select * from step_runs where arrival_id = ? order by id", [arrival_id]))
