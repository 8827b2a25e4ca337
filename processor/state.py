"""SQLite state: schema and migrations, the durable queue, and every query. Only this module writes SQL.

An arrival moves ``pending → running → done | failed | quarantined``; a second copy of the same
bytes for the same pipeline name+version is recorded as ``duplicate`` pointing at the first.
Each thread opens its own :class:`State` (SQLite connections are not shared between threads);
the status server opens one with ``readonly=True``.

Names are bytes (:mod:`processor.names`): an arrival's ``name`` is its display name (valid text,
undecodable bytes as ``\\xNN``) and ``name_bytes`` the raw bytes in hex. ``original_path`` and
``current_path`` are stored as text when they are valid UTF-8 and otherwise as a BLOB of their
raw bytes; :meth:`State.arrival` gives both back as the ``str`` that ``os`` functions take.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlite_utils

from processor.names import display_name, escape_surrogates, is_text, name_bytes_hex, raw_name

log = logging.getLogger(__name__)

ACTIVE_STATES = ("pending", "running")
PATH_COLUMNS = ("original_path", "current_path")
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


def _m3_sources(db: sqlite_utils.Database) -> None:
    """URL sources: one row per configured source (poll bookkeeping, HTTP validators), and the
    DICOMweb study versions already fetched. No credential is ever stored here."""
    db["sources"].create({
        "name": str, "kind": str, "url": str, "polls": int, "successes": int, "failures": int,
        "arrivals": int, "last_poll_at": str, "last_success_at": str, "last_error": str,
        "last_error_at": str, "last_detail": str, "etag": str, "last_modified": str, "last_sha256": str,
    }, pk="name", defaults={"polls": 0, "successes": 0, "failures": 0, "arrivals": 0})
    db["source_items"].create({
        "id": int, "source_name": str, "item_key": str, "version": str, "arrival_id": int,
        "fetched_at": str,
    }, pk="id", not_null={"source_name", "item_key", "version"})
    db["source_items"].create_index(["source_name", "item_key", "version"], unique=True)


def _m5_features(db: sqlite_utils.Database) -> None:
    """Model outputs per study, so fit commands never re-run a model (issue 8)."""
    db["features"].create({
        "id": int, "arrival_id": int, "study_uid": str, "accession": str, "name": str, "value": float,
        "created_at": str,
    }, pk="id", foreign_keys=[("arrival_id", "arrivals", "id")], not_null={"study_uid", "name"})
    db["features"].create_index(["arrival_id", "study_uid", "name"], unique=True)
    db["features"].create_index(["study_uid"])
    db["latents"].create({
        "id": int, "arrival_id": int, "study_uid": str, "accession": str, "name": str, "dim": int,
        "vector": bytes, "created_at": str,
    }, pk="id", foreign_keys=[("arrival_id", "arrivals", "id")], not_null={"study_uid", "name"})
    db["latents"].create_index(["arrival_id", "study_uid", "name"], unique=True)
    db["latents"].create_index(["study_uid"])


def _m4_caption_cache(db: sqlite_utils.Database) -> None:
    """Results computed from content (captions): key = hash of image, model, prompt and settings (issue 7)."""
    db["content_cache"].create({"key": str, "value": str, "created_at": str}, pk="key",
                               not_null={"value"})


def _m6_name_bytes(db: sqlite_utils.Database) -> None:
    """The raw bytes of each arrival's name, in hex (names are bytes; ``name`` is for display)."""
    db["arrivals"].add_column("name_bytes", str)


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", _m1_initial),
    ("0003_sources", _m3_sources),
    ("0004_caption_cache", _m4_caption_cache),
    ("0005_features", _m5_features),
    ("0006_name_bytes", _m6_name_bytes),
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
                         source_url: str | None = None, name_bytes: str | None = None,
                         refused: str | None = None) -> Registered:
        """Record an arrival; the same bytes for the same pipeline name+version become a duplicate.

        A copy of an arrival that *failed* is a fresh attempt, not a duplicate (users re-drop to retry).
        ``name`` may be raw (a ``str`` with surrogate escapes): it is stored as its display name, and
        its bytes as ``name_bytes`` unless given. ``refused`` records the arrival as quarantined at
        once with that reason (an input that could not be taken in), so no worker ever claims it.
        """
        row = {"kind": kind, "name": display_name(name), "name_bytes": name_bytes or name_bytes_hex(name),
               "original_path": _stored_path(original_path), "current_path": _stored_path(current_path),
               "sha256": sha256, "size": size, "pipeline_name": pipeline_name,
               "pipeline_version": pipeline_version, "night": int(night), "attempts": 0,
               "source_name": source_name, "source_url": source_url, "created_at": utcnow()}
        with self.transaction():
            first = None if refused else self._first_copy(sha256, pipeline_name, pipeline_version)
            if refused:
                row.update(state="quarantined", error=escape_surrogates(refused), finished_at=utcnow())
            elif first is not None:
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
        return {os.fsdecode(row["current_path"]) for row in self.db.query(
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
        stored = {key: _stored_path(value) if key in PATH_COLUMNS else _storable(value)
                  for key, value in fields.items()}
        self.db["arrivals"].update(arrival_id, stored)

    def requeue(self, arrival_id: int) -> bool:
        cur = self.db.execute("update arrivals set state = 'pending', attempts = 0, error = null "
                              "where id = ? and state in ('failed', 'quarantined')", [arrival_id])
        return cur.rowcount == 1

    def requeue_failed(self) -> int:
        cur = self.db.execute("update arrivals set state = 'pending', attempts = 0, error = null "
                              "where state = 'failed'")
        return cur.rowcount

    def arrival(self, arrival_id: int) -> dict[str, Any]:
        return _loaded_arrival(dict(self.db["arrivals"].get(arrival_id)))

    def arrivals(self, *, limit: int = 10, state: str | None = None) -> list[dict[str, Any]]:
        where, args = ("where state = ?", [state]) if state else ("", [])
        return [_loaded_arrival(row) for row in self.db.query(
            f"select * from arrivals {where} order by id desc limit ?", [*args, limit])]

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
        fields = {key: _storable(value) for key, value in fields.items()}
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

    # ------------------------------------------------------------------ sources
    def source_poll_started(self, name: str, kind: str, url: str, at: str) -> None:
        """Count a poll of a configured source (the row is created on its first poll)."""
        with self.transaction():
            self.db.execute("insert into sources (name, kind, url) values (?, ?, ?) on conflict(name) "
                            "do update set kind = excluded.kind, url = excluded.url", [name, kind, url])
            self.db.execute("update sources set polls = polls + 1, last_poll_at = ? where name = ?",
                            [at, name])

    def source_poll_succeeded(self, name: str, at: str, *, arrivals: int, detail: str) -> None:
        self.db.execute("update sources set successes = successes + 1, arrivals = arrivals + ?, "
                        "last_success_at = ?, last_detail = ? where name = ?", [arrivals, at, detail, name])

    def source_poll_failed(self, name: str, at: str, *, error: str, arrivals: int = 0) -> None:
        self.db.execute("update sources set failures = failures + 1, arrivals = arrivals + ?, "
                        "last_error = ?, last_error_at = ?, last_detail = ? where name = ?",
                        [arrivals, error, at, "error", name])

    def source_validators(self, name: str) -> dict[str, str | None]:
        """The ETag, Last-Modified and body sha256 of the last body taken from an http source."""
        rows = list(self.db.query("select etag, last_modified, last_sha256 from sources where name = ?",
                                  [name]))
        return dict(rows[0]) if rows else {"etag": None, "last_modified": None, "last_sha256": None}

    def set_source_validators(self, name: str, *, etag: str | None, last_modified: str | None,
                              sha256: str) -> None:
        self.db.execute("update sources set etag = ?, last_modified = ?, last_sha256 = ? where name = ?",
                        [etag, last_modified, sha256, name])

    def source_item_known(self, source_name: str, item_key: str, version: str) -> bool:
        """Whether this version of an item (a DICOMweb study) was fetched from this source already."""
        rows = list(self.db.query("select 1 from source_items where source_name = ? and item_key = ? "
                                  "and version = ? limit 1", [source_name, item_key, version]))
        return bool(rows)

    def record_source_item(self, source_name: str, item_key: str, version: str, arrival_id: int | None,
                           at: str) -> None:
        self.db.execute("insert or ignore into source_items (source_name, item_key, version, arrival_id, "
                        "fetched_at) values (?, ?, ?, ?, ?)", [source_name, item_key, version, arrival_id, at])

    def source_items(self, source_name: str) -> list[dict[str, Any]]:
        return list(self.db.query("select * from source_items where source_name = ? order by id",
                                  [source_name]))

    def sources(self) -> list[dict[str, Any]]:
        """Per-source poll bookkeeping for ``status`` and the status endpoint (holds no credentials)."""
        if not self.db["sources"].exists():  # a read-only connection to a database not yet migrated
            return []
        return list(self.db.query(
            "select name, kind, url, polls, successes, failures, arrivals, last_poll_at, last_success_at, "
            "last_error, last_error_at, last_detail from sources order by name"))

    # ------------------------------------------------------------------ reports and status
    # Timestamps are stored as UTC ISO strings of one shape, so ``start``/``end`` compare as text.
    def ping(self) -> int:
        """A cheap query that proves the database answers; the number of arrivals."""
        return int(next(iter(self.db.query("select count(*) as n from arrivals")))["n"])

    def report_studies(self, start: str, end: str) -> list[dict[str, Any]]:
        """Studies finished in ``[start, end)`` with what the report needs of their arrival."""
        return list(self.db.query(
            "select s.id, s.arrival_id, s.study_uid, s.series_uid, s.accession, s.status, "
            "s.probability_of_pathology, s.pathology, s.most_dangerous_pathology_type, s.error, "
            "s.json_path, s.seconds, s.result_json, s.finished_at, a.name as source_file, a.kind, "
            "a.source_name, a.source_url, "
            "a.created_at as received_at from studies s join arrivals a on a.id = s.arrival_id "
            "where s.finished_at >= ? and s.finished_at < ? order by s.finished_at, s.id", [start, end]))

    def report_rejections(self, start: str, end: str) -> list[dict[str, Any]]:
        """Arrivals that ended failed or quarantined in ``[start, end)`` without any study row."""
        return list(self.db.query(
            "select a.id as arrival_id, a.name as source_file, a.kind, a.source_name, a.source_url, a.state, "
            "a.error, "
            "a.created_at as received_at, a.finished_at, a.claimed_at from arrivals a "
            "where a.state in ('failed', 'quarantined') and a.finished_at >= ? and a.finished_at < ? "
            "and not exists (select 1 from studies s where s.arrival_id = a.id) "
            "order by a.finished_at, a.id", [start, end]))

    def finished_since(self, since: str) -> list[str]:
        """``finished_at`` of every report row (study or rejected arrival) finished at or after ``since``."""
        return [row["t"] for row in self.db.query(
            "select finished_at as t from studies where finished_at >= ? union all "
            "select finished_at as t from arrivals where state in ('failed', 'quarantined') "
            "and finished_at >= ?", [since, since])]

    def first_finished(self) -> str | None:
        rows = list(self.db.query(
            "select min(t) as t from (select min(finished_at) as t from studies union all "
            "select min(finished_at) from arrivals where state in ('failed', 'quarantined'))"))
        return rows[0]["t"] if rows else None

    def queue_depth(self) -> dict[str, int]:
        """Active arrivals by state and queue: ``pending_day``, ``pending_night``, ``running``."""
        depth = {"pending_day": 0, "pending_night": 0, "running": 0}
        for row in self.db.query("select state, night, count(*) as n from arrivals "
                                 "where state in ('pending', 'running') group by state, night"):
            key = "running" if row["state"] == "running" else (
                "pending_night" if row["night"] else "pending_day")
            depth[key] += row["n"]
        return depth

    def outcomes_since(self, since: str) -> dict[str, int]:
        """Studies by status finished since ``since``, plus arrivals failed/quarantined without a study."""
        counts = {row["status"]: row["n"] for row in self.db.query(
            "select status, count(*) as n from studies where finished_at >= ? group by status", [since])}
        for row in self.db.query(
                "select state, count(*) as n from arrivals a where state in ('failed', 'quarantined') "
                "and finished_at >= ? and not exists (select 1 from studies s where s.arrival_id = a.id) "
                "group by state", [since]):
            counts[row["state"]] = counts.get(row["state"], 0) + row["n"]
        return counts

    def studies_by_status(self) -> dict[str, int]:
        return {row["status"]: row["n"] for row in self.db.query(
            "select status, count(*) as n from studies group by status")}

    def recent_arrivals(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest arrivals without names, paths or error text (safe for the status endpoint)."""
        return list(self.db.query(
            "select a.id, a.state, a.kind, a.night, a.attempts, a.created_at, a.claimed_at, a.finished_at, "
            "(select count(*) from studies s where s.arrival_id = a.id) as studies "
            "from arrivals a order by a.id desc limit ?", [limit]))

    def step_means(self) -> list[dict[str, Any]]:
        """Mean seconds and run count of each step id over the steps that ran to completion."""
        return list(self.db.query(
            "select step_id, count(*) as runs, avg(seconds) as mean_seconds, sum(seconds) as total_seconds "
            "from step_runs where status = 'done' group by step_id order by step_id"))

    def recent_arrival_spans(self, limit: int = 20) -> list[tuple[str, str]]:
        """(claimed_at, finished_at) of the newest arrivals that finished processing (for an ETA)."""
        return [(row["claimed_at"], row["finished_at"]) for row in self.db.query(
            "select claimed_at, finished_at from arrivals where state in ('done', 'failed') "
            "and claimed_at is not null and finished_at is not null order by id desc limit ?", [limit])]

    def claim_next_until(self, night_before: str | None) -> dict[str, Any] | None:
        """Like :meth:`claim_next`, but night arrivals only when registered before ``night_before``.

        ``None`` claims from the day queue only. The day queue always goes first.
        """
        night_clause = "and night = 0" if night_before is None else "and (night = 0 or created_at < ?)"
        args = [] if night_before is None else [night_before]
        with self.transaction():
            rows = list(self.db.query(
                f"select id from arrivals where state = 'pending' {night_clause} order by night, id limit 1",
                args))
            if not rows:
                return None
            self.db.execute("update arrivals set state = 'running', attempts = attempts + 1, "
                            "claimed_at = ? where id = ?", [utcnow(), rows[0]["id"]])
        return self.arrival(rows[0]["id"])

    # ------------------------------------------------------------------ features
    def record_features(self, arrival_id: int, study_uid: str, accession: str | None,
                        features: dict[str, float], latents: dict[str, Any] | None = None) -> None:
        """Store one study's model outputs (name → number) and latent vectors (float32 BLOBs).

        A re-run of the same arrival replaces them; non-finite numbers are stored as NULL.
        """
        import numpy as np

        now = utcnow()
        with self.transaction():
            for table in ("features", "latents"):
                self.db.execute(f"delete from {table} where arrival_id = ? and study_uid = ?",
                                [arrival_id, study_uid])
            for name, value in sorted(features.items()):
                number = float(value) if value is not None else None
                self.db["features"].insert({
                    "arrival_id": arrival_id, "study_uid": study_uid, "accession": accession, "name": name,
                    "value": number if number is not None and np.isfinite(number) else None,
                    "created_at": now})
            for name, vector in (latents or {}).items():
                if vector is None:
                    continue
                array = np.asarray(vector, dtype="<f4").ravel()
                self.db["latents"].insert({
                    "arrival_id": arrival_id, "study_uid": study_uid, "accession": accession, "name": name,
                    "dim": int(array.size), "vector": array.tobytes(), "created_at": now})

    def study_features(self) -> list[dict[str, Any]]:
        """Features of every study, from its latest arrival that recorded any.

        One dict per study: ``{"study_uid", "accession", "arrival_id", "features": {name: value}}``
        (NULL values come back as NaN).
        """
        studies: dict[str, dict[str, Any]] = {}
        for row in self.db.query(
                "select f.arrival_id, f.study_uid, f.accession, f.name, f.value from features f "
                "join (select study_uid, max(arrival_id) as latest from features group by study_uid) m "
                "on f.study_uid = m.study_uid and f.arrival_id = m.latest order by f.study_uid, f.name"):
            entry = studies.setdefault(row["study_uid"], {
                "study_uid": row["study_uid"], "accession": row["accession"], "arrival_id": row["arrival_id"],
                "features": {}})
            entry["features"][row["name"]] = float("nan") if row["value"] is None else float(row["value"])
        return list(studies.values())

    def study_latents(self, name: str) -> list[dict[str, Any]]:
        """Latent vectors called ``name`` (e.g. ``ctclip``), one per study from its latest arrival.

        One dict per study: ``{"study_uid", "accession", "arrival_id", "vector": float32 array}``.
        """
        import numpy as np

        return [{"study_uid": row["study_uid"], "accession": row["accession"], "arrival_id": row["arrival_id"],
                 "vector": np.frombuffer(row["vector"], dtype="<f4").astype(np.float32)}
                for row in self.db.query(
                    "select l.arrival_id, l.study_uid, l.accession, l.vector from latents l "
                    "join (select study_uid, max(arrival_id) as latest from latents where name = ? "
                    "group by study_uid) m on l.study_uid = m.study_uid and l.arrival_id = m.latest "
                    "where l.name = ? order by l.study_uid", [name, name])]

    # ------------------------------------------------------------------ content cache
    def content_get(self, key: str) -> str | None:
        """The value stored under ``key`` (e.g. a caption), or None."""
        rows = list(self.db.query("select value from content_cache where key = ?", [key]))
        return rows[0]["value"] if rows else None

    def content_put(self, key: str, value: str) -> None:
        self.db.execute("insert or replace into content_cache (key, value, created_at) values (?, ?, ?)",
                        [key, value, utcnow()])

    @staticmethod
    def content_cache(path: Path) -> ContentCacheStore:
        """The ``get``/``put`` content cache that steps use (``StepEnv.content_cache``), on this database."""
        return ContentCacheStore(path)


def _stored_path(path: str | None) -> str | bytes | None:
    """A path as SQLite keeps it: text when valid UTF-8, else a BLOB of its raw bytes."""
    if path is None or is_text(path):
        return path
    return raw_name(path)


def _loaded_path(value: str | bytes | None) -> str | None:
    """A path column back as the ``str`` that ``os`` functions take (surrogate escapes for raw bytes)."""
    return os.fsdecode(value) if isinstance(value, bytes) else value


def _loaded_arrival(row: dict[str, Any]) -> dict[str, Any]:
    for column in PATH_COLUMNS:
        row[column] = _loaded_path(row.get(column))
    return row


def _storable(value: Any) -> Any:
    """Text that SQLite takes: surrogate escapes (bytes of a name) shown as ``\\xNN``."""
    return escape_surrogates(value) if isinstance(value, str) else value


class ContentCacheStore:
    """``get(key)``/``put(key, value)`` over the ``content_cache`` table for any thread: each thread that
    uses it gets its own :class:`State` connection, opened on first use."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._opened: list[State] = []
        self._lock = threading.Lock()

    def _state(self) -> State:
        state = getattr(self._local, "state", None)
        if state is None:
            state = self._local.state = State(self.path)
            with self._lock:
                self._opened.append(state)
        return state

    def get(self, key: str) -> str | None:
        return self._state().content_get(key)

    def put(self, key: str, value: str) -> None:
        self._state().content_put(key, value)

    def close(self) -> None:
        """Close every connection this store opened (call once its threads are done)."""
        with self._lock:
            opened, self._opened = self._opened, []
        for state in opened:
            state.close()
