"""Read models for the reports (Excel) and the status endpoint. Nothing here writes."""

from __future__ import annotations

from typing import Any

from processor.state.db import Database


class ReadModels(Database):
    # Timestamps are stored as UTC ISO strings of one shape, so ``start``/``end`` compare as text.
    def ping(self) -> int:
        """A cheap query that proves the database answers; the number of arrivals."""
        return int(next(iter(self.db.query("select count(*) as n from arrivals")))["n"])

    def report_studies(self, start: str, end: str) -> list[dict[str, Any]]:
        """Studies finished in ``[start, end)`` with what the report needs of their arrival.

        ``superseded_by``: NULL for the current result of the study, else the arrival whose result is
        current instead: a newer one (a late series, a newer pipeline) that replaced it, or, for a
        new version kept out because it lacked images and came out worse, the one that stayed
        current (:mod:`processor.state.versions`).
        """
        return list(
            self.db.query(
                "select s.id, s.arrival_id, s.study_uid, s.series_uid, s.accession, s.status, s.superseded_by, "
                "s.probability_of_pathology, s.pathology, s.most_dangerous_pathology_type, s.error, "
                "s.json_path, s.seconds, s.result_json, s.finished_at, a.name as source_file, a.kind, "
                "a.source_name, a.source_url, "
                "a.created_at as received_at from studies s join arrivals a on a.id = s.arrival_id "
                "where s.finished_at >= ? and s.finished_at < ? order by s.finished_at, s.id",
                [start, end],
            )
        )

    def report_rejections(self, start: str, end: str) -> list[dict[str, Any]]:
        """Arrivals that ended failed or quarantined in ``[start, end)`` without any study row, with
        ``crashes`` (deaths of the worker on it alone) and ``placed`` (0 while its move is pending)."""
        return list(
            self.db.query(
                "select a.id as arrival_id, a.name as source_file, a.kind, a.source_name, a.source_url, a.state, "
                "a.error, a.crashes, a.placed, "
                "a.created_at as received_at, a.finished_at, a.claimed_at from arrivals a "
                "where a.state in ('failed', 'quarantined') and a.finished_at >= ? and a.finished_at < ? "
                "and not exists (select 1 from studies s where s.arrival_id = a.id) "
                "order by a.finished_at, a.id",
                [start, end],
            )
        )

    def finished_since(self, since: str) -> list[str]:
        """``finished_at`` of every report row (study or rejected arrival) finished at or after ``since``."""
        return [
            row["t"]
            for row in self.db.query(
                "select finished_at as t from studies where finished_at >= ? union all "
                "select finished_at as t from arrivals where state in ('failed', 'quarantined') "
                "and finished_at >= ?",
                [since, since],
            )
        ]

    def first_finished(self) -> str | None:
        rows = list(
            self.db.query(
                "select min(t) as t from (select min(finished_at) as t from studies union all "
                "select min(finished_at) from arrivals where state in ('failed', 'quarantined'))"
            )
        )
        return rows[0]["t"] if rows else None

    def queue_depth(self) -> dict[str, int]:
        """Active arrivals by state and queue: ``pending_urgent`` (from ``inbox.urgent_dirs``, taken
        first), ``pending_day``, ``pending_night`` (each pending arrival in one of the three) and
        ``running``; ``prepared`` (taken ahead by the prefetcher) counts as pending."""
        depth = {"pending_urgent": 0, "pending_day": 0, "pending_night": 0, "running": 0}
        for row in self.db.query(
            "select state, night, priority = 'urgent' as urgent, count(*) as n from arrivals "
            "where state in ('pending', 'prepared', 'running') group by 1, 2, 3"
        ):
            if row["state"] == "running":
                key = "running"
            elif row["urgent"]:
                key = "pending_urgent"
            else:
                key = "pending_night" if row["night"] else "pending_day"
            depth[key] += row["n"]
        return depth

    def outcomes_since(self, since: str) -> dict[str, int]:
        """Studies by status finished since ``since``, plus arrivals failed/quarantined without a study."""
        counts = {
            row["status"]: row["n"]
            for row in self.db.query(
                "select status, count(*) as n from studies where finished_at >= ? group by status", [since]
            )
        }
        for row in self.db.query(
            "select state, count(*) as n from arrivals a where state in ('failed', 'quarantined') "
            "and finished_at >= ? and not exists (select 1 from studies s where s.arrival_id = a.id) "
            "group by state",
            [since],
        ):
            counts[row["state"]] = counts.get(row["state"], 0) + row["n"]
        return counts

    def studies_by_status(self) -> dict[str, int]:
        return {
            row["status"]: row["n"]
            for row in self.db.query("select status, count(*) as n from studies group by status")
        }

    def recent_arrivals(self, limit: int = 20) -> list[dict[str, Any]]:
        """The newest arrivals without names, paths or error text (safe for the status endpoint)."""
        return list(
            self.db.query(
                "select a.id, a.state, a.kind, a.night, a.priority, a.attempts, a.created_at, a.claimed_at, "
                "a.finished_at, "
                "(select count(*) from studies s where s.arrival_id = a.id) as studies "
                "from arrivals a order by a.id desc limit ?",
                [limit],
            )
        )

    def step_means(self) -> list[dict[str, Any]]:
        """Mean seconds and run count of each step id over the steps that ran to completion."""
        return list(
            self.db.query(
                "select step_id, count(*) as runs, avg(seconds) as mean_seconds, sum(seconds) as total_seconds "
                "from step_runs where status = 'done' group by step_id order by step_id"
            )
        )

    def step_counts_since(self, since: str) -> list[dict[str, Any]]:
        """Step runs finished at or after ``since``: ``step_id, uses, status, problem, n`` per group
        (``problem``: :class:`processor.vocab.StepProblem`, None for done). No error text."""
        return list(
            self.db.query(
                "select step_id, max(uses) as uses, status, problem, count(*) as n from step_runs "
                "where finished_at >= ? group by step_id, status, problem order by step_id",
                [since],
            )
        )

    def last_step_failures(self) -> list[dict[str, Any]]:
        """The newest failed run of each step id: ``step_id, problem, finished_at``. No error text."""
        # SQLite takes the bare ``problem`` from the row holding max(finished_at)
        return list(
            self.db.query(
                "select step_id, problem, max(finished_at) as finished_at from step_runs "
                "where status = 'failed' group by step_id order by step_id"
            )
        )

    def last_step_runs(self, since: str, pipeline_name: str, pipeline_version: int) -> list[dict[str, Any]]:
        """The newest run of each step id finished since ``since`` in arrivals of that pipeline name
        and version: ``step_id, uses, status, problem, finished_at``. No error text."""
        # SQLite takes the bare columns from the row holding max(finished_at)
        return list(
            self.db.query(
                "select r.step_id, r.uses, r.status, r.problem, max(r.finished_at) as finished_at "
                "from step_runs r join arrivals a on a.id = r.arrival_id where r.finished_at >= ? "
                "and a.pipeline_name = ? and a.pipeline_version = ? group by r.step_id order by r.step_id",
                [since, pipeline_name, pipeline_version],
            )
        )

    def partial_steps_since(self, since: str) -> dict[str, int]:
        """Of the Partial studies finished since ``since``: how many had a step ``skipped`` and how
        many had one ``failed`` (a study may count in both)."""
        rows = list(
            self.db.query(
                "select coalesce(sum(skipped), 0) as skipped, coalesce(sum(failed), 0) as failed from "
                "(select max(r.status = 'skipped') as skipped, max(r.status = 'failed') as failed "
                "from studies s join step_runs r on r.arrival_id = s.arrival_id and r.study_uid = s.study_uid "
                "where s.status = 'Partial' and s.finished_at >= ? group by s.id)",
                [since],
            )
        )
        return {"skipped": int(rows[0]["skipped"]), "failed": int(rows[0]["failed"])}

    def day_counts(self, start: str, end: str) -> dict[str, Any]:
        """The daily summary's numbers (:func:`processor.outputs.notify.daily_counts`): ``arrivals``
        that ended in ``[start, end)`` by state, ``studies`` recorded then by status and, of them,
        ``pathology`` (how many with ``pathology = 1``); ``deliveries``: per destination or
        notification name, rows ``pending`` now, ``sent`` and ``failed`` (given up) in the window
        (daily summaries themselves left out); ``waiting``: arrivals in the queue now (pending or
        prepared) and ``oldest_waiting``: the oldest one's ``created_at`` (None: none). Counts only,
        no names or text."""
        arrivals = {
            row["state"]: row["n"]
            for row in self.db.query(
                "select state, count(*) as n from arrivals where finished_at >= ? and finished_at < ? "
                "and state in ('done', 'failed', 'quarantined', 'duplicate', 'ignored') group by state",
                [start, end],
            )
        }
        studies, pathology = {}, 0
        for row in self.db.query(
            "select status, count(*) as n, coalesce(sum(pathology = 1), 0) as pathology from studies "
            "where finished_at >= ? and finished_at < ? group by status",
            [start, end],
        ):
            studies[row["status"]] = row["n"]
            pathology += row["pathology"]
        waiting = next(
            iter(
                self.db.query(
                    "select count(*) as n, min(created_at) as oldest from arrivals "
                    "where state in ('pending', 'prepared')"
                )
            )
        )
        deliveries: dict[str, dict[str, int]] = {}
        for row in self.db.query(
            "select destination, sum(state = 'pending') as pending, "
            "sum(state = 'sent' and sent_at >= ? and sent_at < ?) as sent, "
            "sum(state = 'failed' and last_error_at >= ? and last_error_at < ?) as failed "
            "from deliveries where event != 'daily' group by destination order by destination",
            [start, end, start, end],
        ):
            deliveries[row["destination"]] = {k: int(row[k] or 0) for k in ("pending", "sent", "failed")}
        return {
            "arrivals": arrivals,
            "studies": studies,
            "pathology": pathology,
            "deliveries": deliveries,
            "waiting": waiting["n"],
            "oldest_waiting": waiting["oldest"],
        }

    def daily_queued(self, destination: str, day: str) -> bool:
        """Whether the daily summary of ``day`` (``YYYY-MM-DD``, its payload's ``day``) is already in
        the send queue for ``destination`` (pending, sent or failed)."""
        rows = self.db.query(
            "select 1 from deliveries where destination = ? and event = 'daily' "
            "and json_extract(items, '$[0].payload.day') = ? limit 1",
            [destination, day],
        )
        return any(True for _ in rows)

    def recent_arrival_spans(self, limit: int = 20) -> list[tuple[str, str]]:
        """(claimed_at, finished_at) of the newest arrivals that finished processing (for an ETA)."""
        return [
            (row["claimed_at"], row["finished_at"])
            for row in self.db.query(
                "select claimed_at, finished_at from arrivals where state in ('done', 'failed') "
                "and claimed_at is not null and finished_at is not null order by id desc limit ?",
                [limit],
            )
        ]
