"""Timed jobs (APScheduler ``BackgroundScheduler``) and the rules they rely on.

Jobs only enqueue: they wake the watcher or the worker, ask the report thread for a roll-over,
or hand retention to the ``ctwatch-housekeeping`` thread. The rules take the time as an argument
(``NightWindow.night_before(now)``, ``apply_retention(..., today)``), so tests never touch the clock.

Night batches: arrivals from ``inbox.night_dirs`` are registered at once and claimed only while
the window is open, after the day queue. When the window closes, the batch pauses and resumes the
next night — unless ``schedule.night_run_on`` is set, in which case the arrivals registered before
the window closed keep running (later ones still wait for the next window).
"""

from __future__ import annotations

import logging
import queue
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

from processor.redact import quiet_loggers

log = logging.getLogger(__name__)

Job = Callable[[datetime], None]


def local_now() -> datetime:
    return datetime.now().astimezone()


# ---------------------------------------------------------------------------------------- night window
@dataclass(frozen=True)
class NightWindow:
    """A daily local-time window ``HH:MM-HH:MM``; it may wrap past midnight (``22:00-05:00``).

    A window whose start equals its end is open all day.
    """

    start: time
    end: time

    @classmethod
    def parse(cls, text: str) -> NightWindow:
        match = re.fullmatch(r"(\d\d):(\d\d)-(\d\d):(\d\d)", text.strip())
        if not match:
            raise ValueError(f"night window {text!r} must look like 01:00-06:00")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        return cls(time(h1, m1), time(h2, m2))

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def contains(self, now: datetime) -> bool:
        t = now.time().replace(tzinfo=None)
        if self.start == self.end:
            return True
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def _at(self, day: date, when: time, now: datetime) -> datetime:
        return datetime.combine(day, when, tzinfo=now.tzinfo)

    def current_end(self, now: datetime) -> datetime:
        """The end of the open window ``now`` is in (call only when ``contains(now)``)."""
        end_today = self._at(now.date(), self.end, now)
        return end_today if end_today > now else end_today + timedelta(days=1)

    def last_end(self, now: datetime) -> datetime:
        """The most recent window end at or before ``now``."""
        end_today = self._at(now.date(), self.end, now)
        return end_today if end_today <= now else end_today - timedelta(days=1)

    def next_start(self, now: datetime) -> datetime:
        start_today = self._at(now.date(), self.start, now)
        return start_today if start_today > now else start_today + timedelta(days=1)

    def night_before(self, now: datetime, *, run_on: bool = False) -> datetime | None:
        """Night arrivals registered before the returned instant may be claimed now; None: none may.

        Inside the window that is the window's end (so every night arrival so far). Outside it,
        with ``run_on``, the end of the last window: the unfinished batch runs on, later drops wait.
        """
        if self.start == self.end:
            return now + timedelta(days=1)
        if self.contains(now):
            return self.current_end(now)
        return self.last_end(now) if run_on else None


def time_of_day(text: str) -> time:
    """``"07:00"`` (24-hour, as ``notifications[].daily_at`` is checked) → that local time of day."""
    return time.fromisoformat(text)


# ---------------------------------------------------------------------------------------- retention
def done_roots(folders: Iterable[Path]) -> list[Path]:
    """The ``.ctwatch/done`` folders of the given inbox (and night) folders, without repeats."""
    seen: dict[Path, None] = {}
    for folder in folders:
        seen[(Path(folder) / ".ctwatch" / "done").resolve()] = None
    return list(seen)


def apply_retention(roots: Iterable[Path], keep_days: int, today: date) -> list[Path]:
    """Remove ``<root>/<YYYY-MM-DD>/`` folders of archived inputs dated more than ``keep_days`` ago.

    Only dated folders are touched; anything else under ``done/`` (and quarantine) is left alone.
    """
    cutoff = today - timedelta(days=keep_days)
    removed = []
    for root in roots:
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            try:
                day = date.fromisoformat(child.name)
            except ValueError:
                continue
            if day >= cutoff or child.is_symlink() or not child.is_dir():
                continue
            shutil.rmtree(child)
            removed.append(child)
            log.info(
                "retention.removed folder=%s age_days=%d keep_days=%d", child, (today - day).days, keep_days
            )
    return removed


# ---------------------------------------------------------------------------------------- threads
class Housekeeping:
    """The ``ctwatch-housekeeping`` thread: runs tasks the scheduler enqueues, one at a time."""

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[str, Callable[[], Any]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.done = 0

    def submit(self, name: str, task: Callable[[], Any]) -> None:
        self._queue.put((name, task))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ctwatch-housekeeping", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            name, task = item
            try:
                task()
            except Exception:  # one failed chore must not end housekeeping; logged once here
                log.exception("housekeeping.failed task=%s", name)
            self.done += 1

    def stop(self) -> None:
        self._queue.put(None)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class Scheduler:
    """APScheduler jobs: report roll-over at midnight, retention, night-window start, periodic rescan,
    and the daily jobs the daemon adds (notifications' summaries).

    Each job receives the local time it ran at and only enqueues work elsewhere.
    """

    def __init__(
        self,
        *,
        window: NightWindow,
        on_rollover: Job,
        on_night_start: Job,
        on_rescan: Job,
        on_retention: Job | None = None,
        rescan_seconds: float = 60.0,
        retention_at: time = time(0, 30),
        daily: Sequence[tuple[str, time, Job]] = (),
    ) -> None:
        """``daily``: more jobs, each ``(job id, local time, job)`` run once a day at that time (the
        notifications' daily summaries)."""
        # APScheduler logs every job addition and run at INFO; our own schedule.* lines say enough.
        quiet_loggers("apscheduler")
        jobs: list[tuple[Job, str, str, dict[str, Any]]] = [
            (on_rollover, "report-rollover", "cron", {"hour": 0, "minute": 0}),
            (
                on_night_start,
                "night-window-start",
                "cron",
                {"hour": window.start.hour, "minute": window.start.minute},
            ),
            (on_rescan, "rescan", "interval", {"seconds": rescan_seconds}),
        ]
        if on_retention is not None:
            jobs.append(
                (
                    on_retention,
                    "retention",
                    "cron",
                    {"hour": retention_at.hour, "minute": retention_at.minute},
                )
            )
        jobs += [(job, job_id, "cron", {"hour": at.hour, "minute": at.minute}) for job_id, at, job in daily]
        self._jobs = jobs
        self._scheduler = self._build()
        self._started = False

    def _build(self) -> Any:
        from apscheduler.executors.pool import ThreadPoolExecutor
        from apscheduler.schedulers.background import BackgroundScheduler

        scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 600},
        )
        for job, job_id, trigger, when in self._jobs:
            scheduler.add_job(_run(job, job_id), trigger, id=job_id, name=job_id, **when)
        return scheduler

    def start(self) -> None:
        """Start the jobs. Called again by the supervisor when APScheduler's thread died: that
        scheduler is put away and a fresh one with the same jobs is started."""
        if self._started:  # APScheduler cannot start a scheduler twice: a fresh one, same jobs
            if self._scheduler.running:
                try:
                    self._scheduler.shutdown(wait=False)
                except Exception:  # noqa: BLE001 — it is replaced whatever state it was left in
                    log.warning("schedule.shutdown_failed: replaced by a fresh scheduler", exc_info=True)
            self._scheduler = self._build()
        self._started = True
        self._scheduler.start()

    def shutdown(self) -> None:
        if self._scheduler.running:
            self._scheduler.shutdown(wait=True)

    def stop(self) -> None:
        """Stop and wait for a running job (:class:`processor.lifecycle.Lifecycle`)."""
        self.shutdown()

    def join(self, timeout: float | None = None) -> None:
        """Nothing more to wait for: :meth:`stop` already waited."""

    def is_alive(self) -> bool:
        """Running, and its thread alive (a dead thread leaves APScheduler's flag set)."""
        thread = getattr(self._scheduler, "_thread", None)
        return bool(self._scheduler.running) and thread is not None and thread.is_alive()

    def run_now(self, job_id: str) -> None:
        """Fire a job at once (it still runs on the scheduler's thread and receives the real time)."""
        self._scheduler.modify_job(job_id, next_run_time=local_now())

    def next_jobs(self) -> list[dict[str, Any]]:
        """Job id and next run time (local ISO), soonest first — for the status endpoint."""
        jobs: list[tuple[datetime, str]] = [
            (job.next_run_time, job.id)
            for job in self._scheduler.get_jobs()
            if getattr(job, "next_run_time", None) is not None
        ]
        return [{"id": i, "next_run": t.isoformat(timespec="seconds")} for t, i in sorted(jobs)]


def _run(job: Job, name: str) -> Callable[[], None]:
    def fire() -> None:
        now = local_now()
        log.log(
            logging.DEBUG if name == "rescan" else logging.INFO,
            "schedule.fired job=%s at=%s",
            name,
            now.isoformat(timespec="seconds"),
        )
        job(now)

    fire.__name__ = f"ctwatch_{name.replace('-', '_')}"
    return fire
