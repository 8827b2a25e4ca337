"""The durable queue: registering arrivals, claiming them, crash recovery, and their recorded end.

An arrival moves ``pending → (prepared →) running → done | failed | quarantined``. Only the
worker claims. ``prepared`` is the prefetcher's hold while it runs the CPU stage: not charged.
Crash accounting is by what was in flight when the process died (:meth:`Queue.recover_in_flight`):
one arrival alone is charged a crash; several together are each sent back uncharged and marked
``isolate``, so each runs alone next time and a crash then names its cause — a poison input never
takes innocent neighbours with it.

The end of an arrival is recorded *before* any file moves (:meth:`Queue.finish`): final state,
reason, receipt document and intended placement in one transaction, ``placed = 0``; the move and
the receipt file follow and :meth:`Queue.mark_placed` closes it. After a crash in between, the
recorder replays the recorded intent (:meth:`Queue.unplaced`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from processor.names import display_name, escape_surrogates, name_bytes_hex
from processor.state.arrival import Arrival, Registered
from processor.state.db import PATH_COLUMNS, Database, dumps, storable, stored_path
from processor.state.deliveries import Outbound
from processor.vocab import FINAL_STATES, ArrivalState, Priority, StudyStatus, utcnow

_CLAIM = "update arrivals set state = 'running', attempts = attempts + 1, claimed_at = ? where id = ?"


class Queue(Database):
    # ------------------------------------------------------------------ registering
    def register_arrival(
        self,
        *,
        kind: str,
        name: str,
        original_path: str,
        current_path: str,
        sha256: str,
        size: int,
        pipeline_name: str,
        pipeline_version: int,
        night: bool = False,
        source_name: str | None = None,
        source_url: str | None = None,
        name_bytes: str | None = None,
        refused: str | None = None,
        priority: Priority = Priority.ROUTINE,
    ) -> Registered:
        """Record an arrival; the same bytes for the same pipeline name+version become a duplicate
        of the earlier arrival that gave (or is giving) their result.

        A copy of bytes whose earlier arrival gave no usable result — it was rejected, failed, was
        quarantined (crash cap included), or a study of it failed — is a *fresh attempt*, not a
        duplicate: the quarantine note and the receipt tell users to fix the cause and drop the
        file again. Its ``retry_of`` names the latest such arrival (of any pipeline version). An urgent
        copy of bytes still waiting in the queue (``pending`` or ``prepared``) makes that arrival urgent
        (and a day arrival, if it was a night one), so it is taken next.
        ``name`` may be raw (a ``str`` with surrogate escapes): it is stored as its display name, and
        its bytes as ``name_bytes`` unless given. ``refused`` records the arrival as quarantined at
        once with that reason (an input that could not be taken in), so no worker ever claims it.
        """
        row = {
            "kind": kind,
            "name": display_name(name),
            "name_bytes": name_bytes or name_bytes_hex(name),
            "original_path": stored_path(original_path),
            "current_path": stored_path(current_path),
            "sha256": sha256,
            "size": size,
            "pipeline_name": pipeline_name,
            "pipeline_version": pipeline_version,
            "night": int(night),
            "priority": str(Priority(priority)),
            "attempts": 0,
            "source_name": source_name,
            "source_url": source_url,
            "created_at": utcnow(),
        }
        with self.transaction():
            first = None if refused else self._first_copy(sha256, pipeline_name, pipeline_version)
            retry_of = None if first is not None else self._last_without_result(sha256)
            row["retry_of"] = retry_of
            if refused:
                row.update(
                    state="quarantined", error=escape_surrogates(refused), finished_at=utcnow(), placed=0
                )
            elif first is not None:
                row.update(state="duplicate", duplicate_of=first, finished_at=utcnow(), placed=0)
                if Priority(priority) == Priority.URGENT:  # asked for now: the waiting copy goes first
                    self.db.execute(
                        "update arrivals set priority = 'urgent', night = 0 "
                        "where id = ? and state in ('pending', 'prepared')",
                        [first],
                    )
            else:
                row.update(state="pending")
            arrival_id = self.db.table("arrivals").insert(row).last_pk
        assert arrival_id is not None
        return Registered(int(arrival_id), first, retry_of)

    def _first_copy(self, sha256: str, name: str, version: int) -> int | None:
        """The earliest arrival of these bytes for this pipeline that gave a result that is still its
        study's current one (or may give one: pending or running), else None.

        Bytes whose result a later version replaced (late series) are not a duplicate here: they are
        read, and end ``duplicate`` of the current result when it used all their images
        (:mod:`processor.intake.late_series`), else make a new version that does."""
        rows = list(
            self.db.query(
                "select id from arrivals a where sha256 = ? and pipeline_name = ? and pipeline_version = ? "
                f"and state not in ('duplicate', 'failed', 'quarantined') and not {_A_STUDY_FAILED} "
                f"and not {_A_RESULT_REPLACED} order by id limit 1",
                [sha256, name, version, StudyStatus.FAILURE],
            )
        )
        return rows[0]["id"] if rows else None

    def _last_without_result(self, sha256: str) -> int | None:
        """The latest arrival of these bytes that ended without a usable result (see
        :meth:`register_arrival`), else None."""
        rows = list(
            self.db.query(
                "select id from arrivals a where sha256 = ? and (state in ('failed', 'quarantined') "
                f"or (state = 'done' and {_A_STUDY_FAILED})) order by id desc limit 1",
                [sha256, StudyStatus.FAILURE],
            )
        )
        return rows[0]["id"] if rows else None

    def unfinished_copies(self, size: int, pipeline_name: str, pipeline_version: int) -> list[Arrival]:
        """Pending arrivals of ``size`` bytes for this pipeline (what a killed run left), oldest first;
        the caller compares their sha256 (hashing only when there is a candidate)."""
        rows = self.db.query(
            "select * from arrivals where size = ? and pipeline_name = ? and pipeline_version = ? "
            "and state = 'pending' order by id",
            [size, pipeline_name, pipeline_version],
        )
        return [Arrival.from_row(row) for row in rows]

    def source_has_body(self, source_name: str, sha256: str) -> bool:
        """Whether these bytes were already taken from this URL source (and did not fail): a poll after
        a crash between registering a body and recording the source's validators finds them here."""
        rows = list(
            self.db.query(
                "select 1 from arrivals where source_name = ? and sha256 = ? and state != 'failed' limit 1",
                [source_name, sha256],
            )
        )
        return bool(rows)

    def active_paths(self) -> set[str]:
        """Paths of arrivals not yet finished or not yet placed (the watcher must not register them again)."""
        return {
            os.fsdecode(row["current_path"])
            for row in self.db.query(
                "select current_path from arrivals where (state in ('pending', 'prepared', 'running') "
                "or placed = 0) and current_path is not null"
            )
        }

    def path_rows(self) -> list[dict[str, object]]:
        """``id, name, original_path, current_path, final_path`` of every arrival (paths as text)."""
        columns = ("original_path", "current_path", "final_path")
        return [
            {**dict(row), **{c: os.fsdecode(row[c]) if row[c] else None for c in columns}}
            for row in self.db.query(
                "select id, name, original_path, current_path, final_path from arrivals order by id"
            )
        ]

    # ------------------------------------------------------------------ claiming
    def claim(self, arrival_id: int) -> Arrival | None:
        """Take one pending (or prepared) arrival for processing: ``running``, one attempt charged."""
        with self.transaction():
            cur = self.db.execute(
                "update arrivals set state = 'running', attempts = attempts + 1, "
                "claimed_at = ? where id = ? and state in ('pending', 'prepared')",
                [utcnow(), arrival_id],
            )
        return self.arrival(arrival_id) if cur.rowcount == 1 else None

    def prepare(self, arrival_id: int) -> Arrival | None:
        """Hold a pending arrival for the prefetcher's CPU stage (``prepared``): no attempt charged."""
        cur = self.db.execute(
            "update arrivals set state = 'prepared', claimed_at = ? where id = ? and state = 'pending'",
            [utcnow(), arrival_id],
        )
        return self.arrival(arrival_id) if cur.rowcount == 1 else None

    def peek_next(self, night_before: str | None) -> Arrival | None:
        """The arrival the next claim would take (urgent first, then the day queue; night ones
        registered before ``night_before``, none when it is None), without taking it."""
        night_clause = "and night = 0" if night_before is None else "and (night = 0 or created_at < ?)"
        args = [] if night_before is None else [night_before]
        rows = list(
            self.db.query(
                f"select * from arrivals where state = 'pending' {night_clause} "
                "order by priority = 'urgent' desc, night, id limit 1",
                args,
            )
        )
        return Arrival.from_row(rows[0]) if rows else None

    def urgent_waiting(self) -> bool:
        """Whether an urgent arrival waits: in the queue, or taken ahead by the prefetcher
        (``prepared``) but not started."""
        rows = self.db.query(
            "select 1 from arrivals where state in ('pending', 'prepared') and priority = 'urgent' limit 1"
        )
        return any(True for _ in rows)

    def claim_next_until(self, night_before: str | None) -> Arrival | None:
        """Atomically take the next arrival (see :meth:`peek_next`) and mark it running."""
        with self.transaction():
            head = self.peek_next(night_before)
            if head is None:
                return None
            self.db.execute(_CLAIM, [utcnow(), head.id])
        return self.arrival(head.id)

    def claim_next(self, *, allow_night: bool) -> Arrival | None:
        """The oldest pending arrival (day queue first), marked running."""
        return self.claim_next_until("9999-12-31T23:59:59+00:00" if allow_night else None)

    def release(self, arrival_id: int) -> None:
        """Put a running or prepared arrival back to pending, uncharged (clean shutdown)."""
        self.db.execute(
            "update arrivals set attempts = max(attempts - (state = 'running'), 0), "
            "state = 'pending' where id = ? and state in ('running', 'prepared')",
            [arrival_id],
        )

    def recover_in_flight(self, max_crashes: int) -> list[Arrival]:
        """At start-up, after a crash: what was in flight goes back to the queue, charged fairly.

        ``prepared`` arrivals (waiting in the prefetch queue, not started) go back untouched. One
        ``running`` arrival alone (no other running, no recorded end still being placed) is charged the crash (``crashes + 1``); at ``max_crashes`` it
        ends quarantined ("crashed the worker N times"), its placement left to the recorder's replay.
        Several running together are each sent back uncharged with ``isolate`` set, so each runs
        alone next time and a crash then names its cause.
        """
        recovered: list[Arrival] = []
        with self.transaction():
            self.db.execute("update arrivals set state = 'pending' where state = 'prepared'")
            rows = list(self.db.query("select * from arrivals where state = 'running' order by id"))
            # An end recorded while that arrival ran, and not yet placed, was in flight too: the crash
            # may be its. (Older unplaced ends — stuck on an OS error — say nothing about this crash.)
            finishing = 0
            if len(rows) == 1:
                finishing = next(
                    iter(
                        self.db.query(
                            "select count(*) as n from arrivals where placed = 0 and finished_at >= ?",
                            [rows[0]["claimed_at"] or ""],
                        )
                    )
                )["n"]
            alone = len(rows) == 1 and finishing == 0
            for row in rows:
                capped = self._charge_crash(row, alone, max_crashes)
                if capped is not None:
                    self._set(
                        row["id"],
                        isolate=0,
                        state="quarantined",
                        crashes=capped,
                        finished_at=utcnow(),
                        placed=0,
                        error=crash_reason(capped),
                    )
                recovered.append(self.arrival(row["id"]))
        return recovered

    def crashed(self, arrival_ids: Sequence[int], max_crashes: int) -> list[Arrival]:
        """A CPU pool process (:mod:`processor.cpupool`) died while these ``running`` arrivals were
        in it: charged as :meth:`recover_in_flight` charges the death of the whole process. One
        alone gets ``crashes + 1`` and goes back to the queue — or, at ``max_crashes``, stays
        ``running`` for the caller to end it quarantined with :func:`crash_reason`; several together
        go back uncharged with ``isolate`` set. Returns the arrivals as they are now."""
        with self.transaction():
            rows = [
                row
                for arrival_id in arrival_ids
                for row in self.db.query(
                    "select * from arrivals where id = ? and state = 'running'", [arrival_id]
                )
            ]
            alone = len(rows) == 1
            for row in rows:
                capped = self._charge_crash(row, alone, max_crashes)
                if capped is not None:
                    self._set(row["id"], crashes=capped)
        return [self.arrival(arrival_id) for arrival_id in arrival_ids]

    def _charge_crash(self, row: Any, alone: bool, max_crashes: int) -> int | None:
        """The one rule of crash charging, for an arrival in flight when a process died: alone, it
        counts a crash and goes back to the queue; with others, it goes back uncharged, marked
        ``isolate``. Returns its crash count instead, sending nothing back, when alone it reached
        ``max_crashes`` (the caller ends it)."""
        crashes = row["crashes"] + (1 if alone else 0)
        if alone and crashes >= max_crashes:
            return crashes
        if alone:
            self._set(row["id"], state="pending", crashes=crashes)
        else:
            self._set(row["id"], state="pending", isolate=1)
        return None

    # ------------------------------------------------------------------ the end of an arrival
    def finish(
        self,
        arrival_id: int,
        state: ArrivalState,
        *,
        error: str | None,
        final_path: str | None,
        receipt_path: str,
        receipt: dict[str, Any],
        studies: list[dict[str, Any]] | None = None,
        duplicate_of: int | None = None,
        late_series: str | None = None,
        outbound: Sequence[Outbound] = (),
    ) -> None:
        """Record an arrival's end in one transaction, before any file moves (intent first).

        ``studies``: per study ``{"study_uid", "fields", "steps", "features", "latents"}`` (see
        :meth:`processor.state.results.Results.write_study`) and ``"supersedes"``: the arrivals whose
        results of the study were current when it was planned (:meth:`~processor.state.versions.
        Versions.supersede`; :class:`~processor.errors.VersionConflict`, nothing recorded, when that
        changed meanwhile); ``"stays_out"``: true when it does not replace them (only checked). ``final_path``: where the input is to go (None: it stays where it is).
        ``duplicate_of``: the arrival whose result it duplicates (nothing new in it); ``late_series``:
        ``ignore`` when a study of it was not analysed under that setting (:meth:`requeue` may then
        send it back). ``outbound``: the rows of the send-back queue this end makes (results for
        destinations, notifications), inserted ``pending`` in the same transaction
        (:meth:`~processor.state.deliveries.Deliveries.insert_outbound`; their files already written).
        The arrival is left ``placed = 0`` until :meth:`mark_placed`.
        """
        assert state in FINAL_STATES, state
        with self.transaction():
            for study in studies or []:
                study = dict(study)
                earlier = study.pop("supersedes", None)
                stays_out = study.pop("stays_out", False)
                if earlier is not None:
                    self.supersede(  # type: ignore[attr-defined]
                        arrival_id,
                        study["study_uid"],
                        earlier,
                        study["fields"].get("json_path"),
                        stays_out=stays_out,
                    )
                    if not stays_out:  # the earlier versions' sends still waiting are never made
                        self.retire_superseded(earlier, study["study_uid"], arrival_id)  # type: ignore[attr-defined]
                self.write_study(arrival_id, **study)  # type: ignore[attr-defined]
            if duplicate_of is not None or late_series is not None:
                marks = {"duplicate_of": duplicate_of, "late_series": late_series}
                self._set(arrival_id, **{k: v for k, v in marks.items() if v is not None})
            self._set(
                arrival_id,
                state=state,
                error=error,
                finished_at=utcnow(),
                final_path=final_path,
                receipt_path=receipt_path,
                receipt_json=dumps(receipt),
                placed=0,
                isolate=0,
            )
            if outbound:
                self.insert_outbound(outbound)  # type: ignore[attr-defined]

    def mark_placed(self, arrival_id: int, current_path: str | None) -> None:
        """The input is where the recorded end put it; the receipt is written."""
        fields: dict[str, Any] = {"placed": 1}
        if current_path is not None:
            fields["current_path"] = current_path
        self._set(arrival_id, **fields)

    def unplaced(self, finished_before: str | None = None) -> list[tuple[Arrival, dict[str, Any] | None]]:
        """Finished arrivals whose move or receipt may not have happened, with their receipt document
        (only those finished before ``finished_before``, when given)."""
        clause, args = ("and finished_at < ?", [finished_before]) if finished_before else ("", [])
        return [
            (Arrival.from_row(row), json.loads(row["receipt_json"]) if row["receipt_json"] else None)
            for row in self.db.query(f"select * from arrivals where placed = 0 {clause} order by id", args)
        ]

    def finish_arrival(
        self,
        arrival_id: int,
        state: str,
        *,
        error: str | None = None,
        current_path: str | None = None,
        receipt_path: str | None = None,
    ) -> None:
        """Set a final state directly (intake's refusals and duplicates, which move nothing after)."""
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
        stored = {
            key: stored_path(value) if key in PATH_COLUMNS else storable(value)
            for key, value in fields.items()
        }
        self.db.table("arrivals").update(arrival_id, stored)

    def requeue(self, arrival_id: int) -> bool:
        """Put a failed, quarantined or ignored arrival back in the queue. One with a study that was
        not analysed under ``late_series: ignore`` (``ignored``, or ``done`` with other studies) is
        then analysed again with ``new_version``: that study as a new version with the earlier images."""
        cur = self.db.execute(
            "update arrivals set late_series = case when late_series = 'ignore' then 'new_version' "
            "else late_series end, state = 'pending', attempts = 0, crashes = 0, isolate = 0, "
            "error = null where id = ? and (state in ('failed', 'quarantined', 'ignored') "
            "or (state = 'done' and late_series = 'ignore')) and placed is not 0",
            [arrival_id],
        )
        return cur.rowcount == 1

    def requeue_failed(self) -> int:
        cur = self.db.execute(
            "update arrivals set state = 'pending', attempts = 0, crashes = 0, isolate = 0, "
            "error = null where state = 'failed' and placed is not 0"
        )
        return cur.rowcount

    # ------------------------------------------------------------------ reading
    def arrival(self, arrival_id: int) -> Arrival:
        return Arrival.from_row(dict(self.db.table("arrivals").get(arrival_id)))

    def arrivals(self, *, limit: int = 10, state: str | None = None) -> list[Arrival]:
        where, args = ("where state = ?", [state]) if state else ("", [])
        return [
            Arrival.from_row(row)
            for row in self.db.query(
                f"select * from arrivals {where} order by id desc limit ?", [*args, limit]
            )
        ]

    def counts_by_state(self) -> dict[str, int]:
        return {
            row["state"]: row["n"]
            for row in self.db.query("select state, count(*) as n from arrivals group by state")
        }


_A_STUDY_FAILED = "exists (select 1 from studies s where s.arrival_id = a.id and s.status = ?)"  # one of the arrival's studies could not be analysed: the arrival gave no full result
_A_RESULT_REPLACED = (  # a result of the arrival is not its study's current one (late series)
    "exists (select 1 from studies s where s.arrival_id = a.id and s.superseded_by is not null)"
)


def crash_reason(crashes: int) -> str:
    return (
        f"crashed the worker {crashes} times (the process died while only this input was being "
        "processed: out of memory, or a decoder fault); it is set aside so the others go on. "
        "Check the log, then requeue it with `python run.py requeue <arrival id>` once the cause is fixed"
    )
