"""The send-back queue: what goes out of ctwatch, one row per destination and event (table ``deliveries``).

A row is written in the same transaction as the end it reports (:meth:`Queue.finish` with
``outbound=``; :meth:`Deliveries.enqueue` for rows of their own: the daily summary, an input refused
at intake), so nothing recorded is ever left unsent and nothing unrecorded is ever sent. The files
it names are in the outbox before that transaction; a row holds their paths relative to the outbox
and their sha256, so a send after a restart or a kill -9 sends the very same bytes (same SOP Instance
UIDs: the PACS keeps one copy).

States (:class:`DeliveryState`)::

    pending ──send──▶ sent
       │ ▲
       │ └─ retry (back-off; the destination's other rows wait behind it)
       ▼
     failed   (an error retrying cannot fix, or still failing ``give_up_after`` after it began)
    pending ──a later version of the study recorded──▶ superseded   (never sent)
    sent | failed ──resend──▶ pending   (attempts back to 0, next try now; a superseded row only by id)

``next_try_at`` and ``first_failed_at`` are Unix seconds (callers pass ``now`` in);
``created_at``, ``sent_at`` and ``last_error_at`` are ISO 8601 UTC text like every stored time.
``last_error`` is ctwatch's words only (:func:`plain_error` on every write and read): never a token,
a URL's credentials or query, a file name or a UID.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from processor.redact import redact_url
from processor.state.db import Database
from processor.vocab import utcnow


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"
    SUPERSEDED = "superseded"  # never sent: a later version of the study is sent instead


class DeliveryEvent(StrEnum):
    """Why a row was queued: a study's results (``study``), a study with ``pathology: 1``, a study
    or an arrival that could not be analysed (``failure``), the daily summary (``daily``)."""

    STUDY = "study"
    PATHOLOGY = "pathology"
    FAILURE = "failure"
    DAILY = "daily"


@dataclass(frozen=True)
class Outbound:
    destination: str  # a destination's or notification's `name`
    event: str  # "study" | "pathology" | "failure" | "daily"
    arrival_id: int | None  # None for the daily summary
    study_uid: str | None  # None for arrival-level events and the daily summary
    items: tuple[Mapping[str, Any], ...]
    # DICOM/folder items: {"kind": "sr"|"sc"|"pdf"|"html", "path": "<path relative to the outbox>",
    #   "sop_instance_uid": str | None, "sha256": str}; the file exists before the row is inserted.
    # webhook: exactly one item {"kind": "webhook", "payload": {...JSON...}}


@dataclass(frozen=True)
class Delivery:
    """One row of ``deliveries`` as the senders and ``status`` see it."""

    id: int
    destination: str
    event: str
    arrival_id: int | None
    study_uid: str | None
    items: tuple[dict[str, Any], ...]
    state: DeliveryState
    attempts: int  # sends tried (sent, retried or failed); 0 again after a resend
    next_try_at: float  # Unix seconds
    first_failed_at: float | None  # Unix seconds: when its destination began failing it (give_up_after)
    last_error: str | None
    last_error_at: str | None
    created_at: str
    sent_at: str | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Delivery:
        return cls(
            id=int(row["id"]),
            destination=str(row["destination"]),
            event=str(row["event"]),
            arrival_id=row["arrival_id"],
            study_uid=row["study_uid"],
            items=tuple(json.loads(row["items"])),
            state=DeliveryState(row["state"]),
            attempts=int(row["attempts"] or 0),
            next_try_at=float(row["next_try_at"]),
            first_failed_at=None if row["first_failed_at"] is None else float(row["first_failed_at"]),
            last_error=plain_error(row["last_error"]),
            last_error_at=row["last_error_at"],
            created_at=str(row["created_at"]),
            sent_at=row["sent_at"],
        )


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_UID = re.compile(r"\b(?:\d+\.){4,}\d+\b")  # a DICOM UID (an IPv4 address has only four parts)
_BEARER = re.compile(r"(?i)\b(bearer|authorization:)(\s+)[A-Za-z0-9._~+/=-]{8,}")
MAX_ERROR_CHARS = 400


def plain_error(text: str | None) -> str | None:
    """An error as stored and shown: URLs without credentials, query or fragment
    (:func:`~processor.redact.redact_url`), no bearer token, no DICOM UID, one line, at most 400
    characters.
    The senders write ctwatch's words only; this is the guard behind them."""
    if text is None:
        return None
    text = _URL.sub(lambda m: redact_url(m[0]), str(text))
    text = _BEARER.sub(lambda m: f"{m[1]}{m[2]}[hidden]", text)
    text = _UID.sub("[UID]", text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _checked(row: Outbound) -> dict[str, Any]:
    """The row's columns; ``ValueError`` for a row no sender could send (a bug in its maker)."""
    if not row.destination:
        raise ValueError("an outbound row needs a destination name")
    DeliveryEvent(row.event)
    if not row.items:
        raise ValueError(f"an outbound row for {row.destination} has no items")
    webhook = [i for i in row.items if i.get("kind") == "webhook"]
    if webhook and (len(row.items) != 1 or not isinstance(webhook[0].get("payload"), Mapping)):
        raise ValueError("a webhook row holds exactly one item with a JSON object as payload")
    for item in row.items:
        if item.get("kind") != "webhook" and not (item.get("path") and item.get("sha256")):
            raise ValueError(f"a file item needs path and sha256 (kind {item.get('kind')!r})")
    return {
        "destination": row.destination,
        "event": str(row.event),
        "arrival_id": row.arrival_id,
        "study_uid": row.study_uid,
        "items": json.dumps([dict(i) for i in row.items], default=str),
    }


class Deliveries(Database):
    # ------------------------------------------------------------------ queueing
    def insert_outbound(self, outbound: Iterable[Outbound], now: float | None = None) -> list[int]:
        """Insert rows ``pending``, due at once, **inside the caller's open transaction** (used by
        :meth:`~processor.state.queue.Queue.finish`); returns their ids. ``ValueError`` (nothing
        inserted by this call) for a row without destination or items, or an unknown event."""
        rows = [_checked(row) for row in outbound]
        stamp, due = utcnow(), time.time() if now is None else now
        ids = []
        for row in rows:
            pk = (
                self.db.table("deliveries")
                .insert(
                    {
                        **row,
                        "state": str(DeliveryState.PENDING),
                        "attempts": 0,
                        "next_try_at": due,
                        "created_at": stamp,
                    }
                )
                .last_pk
            )
            assert pk is not None
            ids.append(int(pk))
        return ids

    def enqueue(self, outbound: Sequence[Outbound], now: float | None = None) -> list[int]:
        """Queue rows outside an arrival's end (the daily summary, an input refused at intake), in
        one transaction of their own; returns their ids (empty for no rows)."""
        if not outbound:
            return []
        with self.transaction():
            return self.insert_outbound(outbound, now)

    # ------------------------------------------------------------------ the sender's side
    def due(self, now: float, destination: str | None = None, limit: int = 20) -> list[Delivery]:
        """Pending rows whose next try is at or before ``now`` (Unix seconds), oldest first (by id, so
        a destination's oldest waiting row is the one that finds out whether it is back)."""
        where, args = ("and destination = ?", [destination]) if destination is not None else ("", [])
        return [
            Delivery.from_row(row)
            for row in self.db.query(
                f"select * from deliveries where state = 'pending' and next_try_at <= ? {where} "
                "order by id limit ?",
                [now, *args, limit],
            )
        ]

    def next_try(self, destination: str) -> float | None:
        """The earliest ``next_try_at`` of the destination's pending rows (None: nothing waits)."""
        row = next(
            iter(
                self.db.query(
                    "select min(next_try_at) as t from deliveries where state = 'pending' and destination = ?",
                    [destination],
                )
            )
        )
        return None if row["t"] is None else float(row["t"])

    def waiting_destinations(self) -> set[str]:
        """Names with pending rows (a destination no longer configured shows up here)."""
        return {
            r["destination"]
            for r in self.db.query("select distinct destination from deliveries where state = 'pending'")
        }

    def delivery(self, delivery_id: int) -> Delivery | None:
        rows = list(self.db.query("select * from deliveries where id = ?", [delivery_id]))
        return Delivery.from_row(rows[0]) if rows else None

    def mark_sent(self, delivery_id: int, now: float | None = None) -> bool:
        """The send succeeded (one more attempt counted); False when the row was not pending.

        Its destination is up: its other pending rows are due now and their give-up clock stops. A
        row superseded while it was being sent ends ``sent`` too (the destination has it)."""
        now = time.time() if now is None else now
        with self.transaction():
            # a row superseded while it was being sent did reach the destination: it is sent
            cur = self.db.execute(
                "update deliveries set state = 'sent', attempts = attempts + 1, sent_at = ? "
                "where id = ? and state in ('pending', 'superseded')",
                [utcnow(), delivery_id],
            )
            self.db.execute(
                "update deliveries set next_try_at = min(next_try_at, ?), first_failed_at = null "
                "where state = 'pending' and destination = "
                "(select destination from deliveries where id = ?)",
                [now, delivery_id],
            )
        return cur.rowcount == 1

    def mark_retry(self, delivery_id: int, error: str, next_try_at: float, now: float | None = None) -> None:
        """The send failed in a way that may pass: one more attempt, ``error`` kept, tried again at
        ``next_try_at``. Its destination is taken to be down, so its other pending rows wait behind
        this one (``next_try_at`` no earlier than this row's) and count from now toward
        ``give_up_after`` (``first_failed_at`` set where unset)."""
        now = time.time() if now is None else now
        with self.transaction():
            rows = list(self.db.query("select destination from deliveries where id = ?", [delivery_id]))
            if not rows:
                return
            self.db.execute(
                "update deliveries set attempts = attempts + 1, next_try_at = ?, last_error = ?, "
                "last_error_at = ?, first_failed_at = coalesce(first_failed_at, ?) "
                "where id = ? and state = 'pending'",
                [next_try_at, plain_error(error), utcnow(), now, delivery_id],
            )
            self.db.execute(
                "update deliveries set next_try_at = max(next_try_at, ?), "
                "first_failed_at = coalesce(first_failed_at, ?) "
                "where destination = ? and state = 'pending' and id != ?",
                [next_try_at, now, rows[0]["destination"], delivery_id],
            )

    def mark_failed(self, delivery_id: int, error: str, *, attempted: bool = True) -> None:
        """The row ends ``failed`` with ``error`` (``resend`` takes it again); ``attempted``: this
        failure was a send (counted as an attempt), not a refusal before any."""
        self.db.execute(
            "update deliveries set state = 'failed', attempts = attempts + ?, last_error = ?, "
            "last_error_at = ? where id = ? and state = 'pending'",
            [int(attempted), plain_error(error), utcnow(), delivery_id],
        )

    def retire_superseded(self, earlier: Sequence[int], study_uid: str, by_arrival: int) -> int:
        """Inside the finishing transaction of arrival ``by_arrival``, whose result of ``study_uid``
        supersedes those of the ``earlier`` arrivals: their study sends still pending (or failed, which
        ``resend --failed`` would otherwise send after the new version) end
        ``superseded`` (never sent: the new version is sent instead; ``resend`` takes such a row only
        by its id); returns how many."""
        if not earlier:
            return 0
        cur = self.db.execute(
            "update deliveries set state = 'superseded', last_error = ?, last_error_at = ? "
            f"where state in ('pending', 'failed') and event = 'study' and study_uid = ? "
            f"and arrival_id in ({','.join('?' * len(earlier))})",
            [
                f"not sent: arrival {by_arrival} analysed the study again and its result is sent instead",
                utcnow(),
                study_uid,
                *[int(a) for a in earlier],
            ],
        )
        return cur.rowcount

    def study_destinations(self, arrival_ids: Sequence[int], study_uid: str) -> set[str]:
        """Destinations the results of ``study_uid`` by ``arrival_ids`` were queued for, sent or not
        (a new version of the study goes to each of them, whatever its ``when``)."""
        if not arrival_ids:
            return set()
        return {
            r["destination"]
            for r in self.db.query(
                "select distinct destination from deliveries where event = 'study' and study_uid = ? "
                f"and arrival_id in ({','.join('?' * len(arrival_ids))})",
                [study_uid, *[int(a) for a in arrival_ids]],
            )
        }

    def give_up_waiting(self, destination: str, error: str, failing_since: float) -> int:
        """End ``failed`` the destination's pending rows that have waited on its failures since
        ``failing_since`` or earlier (Unix seconds; the give-up of the row ahead of them); returns
        how many."""
        cur = self.db.execute(
            "update deliveries set state = 'failed', last_error = ?, last_error_at = ? "
            "where destination = ? and state = 'pending' and first_failed_at <= ? and attempts > 0",
            [plain_error(error), utcnow(), destination, failing_since],
        )
        return cur.rowcount

    def resend(
        self,
        ids: Sequence[int] = (),
        *,
        failed: bool = False,
        since: datetime | None = None,
        destination: str | None = None,
        among: Iterable[str] | None = None,
        now: float | None = None,
    ) -> int:
        """Put rows back to ``pending``, next try ``now``: those with ``ids`` (sent or failed),
        every ``failed`` one, or every sent or failed one created ``since`` (aware time; daily
        summaries are not sent again); ``destination``: only that destination's; ``among``: only
        rows of these destinations (the configured ones). Attempts
        go back to 0 and the give-up clock restarts; the last error is kept until the next send.
        Pending rows are left as they are. Returns how many rows were set back."""
        clauses: list[str] = []
        args: list[Any] = []
        if ids:
            clauses.append(f"id in ({','.join('?' * len(ids))})")
            args += [int(i) for i in ids]
        if failed:
            clauses.append("state = 'failed'")
        if since is not None:  # a day's daily summary is not sent again
            clauses.append("(created_at >= ? and event != 'daily')")
            args.append(since.astimezone(UTC).isoformat(timespec="seconds"))
        if not clauses:
            return 0
        where = " or ".join(clauses)
        if destination is not None:
            where = f"({where}) and destination = ?"
            args.append(destination)
        if among is not None:  # only destinations a running daemon would send to
            names = list(among)
            where = f"({where}) and destination in ({','.join('?' * len(names))})"
            args += names
        cur = self.db.execute(
            "update deliveries set state = 'pending', attempts = 0, first_failed_at = null, sent_at = null, "
            f"next_try_at = ? where state != 'pending' and ({where})"
            + ("" if ids else " and state != 'superseded'"),
            [time.time() if now is None else now, *args],
        )
        return cur.rowcount

    # ------------------------------------------------------------------ reading (status)
    def delivery_summary(self, now: float | None = None) -> dict[str, dict[str, Any]]:
        """Per destination name: ``pending``, ``sent``, ``failed``, ``superseded`` (counts),
        ``oldest_pending_seconds`` (age of the oldest pending row, None when none), ``last_error``
        and ``last_error_at`` (the most recent error of any of its rows, None when none or when a
        send went through since)."""
        if not self.db.table("deliveries").exists():  # a read-only connection to an older database
            return {}
        now = time.time() if now is None else now
        summary: dict[str, dict[str, Any]] = {}

        def entry(name: str) -> dict[str, Any]:
            return summary.setdefault(
                name,
                {
                    "pending": 0,
                    "sent": 0,
                    "failed": 0,
                    "superseded": 0,
                    "oldest_pending_seconds": None,
                    "last_error": None,
                    "last_error_at": None,
                },
            )

        for row in self.db.query(
            "select destination, state, count(*) as n, min(created_at) as oldest from deliveries "
            "group by destination, state"
        ):
            found = entry(row["destination"])
            if row["state"] in tuple(DeliveryState):
                found[row["state"]] = int(row["n"])
            if row["state"] == DeliveryState.PENDING and row["oldest"]:
                age = now - datetime.fromisoformat(row["oldest"]).timestamp()
                found["oldest_pending_seconds"] = round(max(age, 0.0), 1)
        for row in self.db.query(  # each destination's latest error (the later row on a tie), one pass
            "select destination, last_error, last_error_at from (select destination, last_error, "
            "last_error_at, row_number() over (partition by destination order by last_error_at desc, "
            "id desc) as rn from deliveries where last_error_at is not null and state != 'superseded') "
            "where rn = 1"
        ):
            found = entry(row["destination"])
            found["last_error"], found["last_error_at"] = plain_error(row["last_error"]), row["last_error_at"]
        for row in self.db.query(  # an error older than the last send that went through is over
            "select destination, max(sent_at) as sent_at from deliveries where sent_at is not null "
            "group by destination"
        ):
            found = entry(row["destination"])
            if found["last_error_at"] and row["sent_at"] > found["last_error_at"]:
                found["last_error"] = found["last_error_at"] = None
        return dict(sorted(summary.items()))

    def recent_deliveries(self, limit: int = 10) -> list[Delivery]:
        """What ``status`` lists: failed rows, then pending ones, newest first within each."""
        if not self.db.table("deliveries").exists():  # a read-only connection to an older database
            return []
        return [
            Delivery.from_row(row)
            for row in self.db.query(
                "select * from deliveries where state not in ('sent', 'superseded') "
                "order by state = 'failed' desc, id desc limit ?",
                [limit],
            )
        ]


__all__ = ["Deliveries", "Delivery", "DeliveryEvent", "DeliveryState", "Outbound", "plain_error"]
