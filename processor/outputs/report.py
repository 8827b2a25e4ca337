"""Which workbooks to write, from which rows, and when.

:class:`Reports` turns SQLite rows into ``ctwatch-YYYY-MM-DD.xlsx`` (rows finished that local day)
and ``ctwatch-latest.xlsx`` (the last ``rolling_days`` days). :class:`ReportUpdater` is the
``ctwatch-reports`` thread: after a study finishes it rewrites the touched days and the rolling
workbook, at most once per ``debounce_seconds``; at midnight (``rollover``) at once; a locked
target is retried at every update until it is written.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from pathlib import Path
from typing import TYPE_CHECKING

from processor.config import ReportSettings

if TYPE_CHECKING:
    from processor.outputs.excel import Published
from processor.state import State

log = logging.getLogger(__name__)

LATEST_NAME = "ctwatch-latest.xlsx"


def day_name(day: date) -> str:
    return f"ctwatch-{day.isoformat()}.xlsx"


def local_midnight_utc(day: date) -> str:
    """The start of a local calendar day as a stored-timestamp string (UTC ISO, seconds)."""
    return datetime.combine(day, dtime()).astimezone().astimezone(UTC).isoformat(timespec="seconds")


def local_day(stored: str) -> date:
    parsed = datetime.fromisoformat(stored)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone().date()


class Reports:
    """Builds and publishes workbooks from one State connection (read-only is enough)."""

    def __init__(
        self, state: State, settings: ReportSettings, clock: Callable[[], datetime] = datetime.now
    ) -> None:
        from processor.outputs import excel  # openpyxl loads only where workbooks are written

        self.excel = excel
        self.state = state
        self.settings = settings
        self.dir = settings.dir
        self.clock = clock

    def rows(self, first: date, last: date) -> list[dict]:
        """Report rows finished between local days ``first`` and ``last`` (inclusive), oldest first."""
        start, end = local_midnight_utc(first), local_midnight_utc(last + timedelta(days=1))
        rows = [self.excel.study_row(r, self.dir) for r in self.state.report_studies(start, end)]
        rows += [self.excel.rejection_row(r) for r in self.state.report_rejections(start, end)]
        return sorted(rows, key=lambda r: (r["Finished"] or datetime.min, r["Arrival"] or 0))

    def write_day(self, day: date) -> Published:
        report = self.excel.Report(
            f"ctwatch — studies finished on {day.isoformat()}",
            self.rows(day, day),
            self.settings.threshold,
            self.clock(),
        )
        return self.excel.publish(self.dir / day_name(day), report)

    def write_latest(self, today: date) -> Published:
        first = today - timedelta(days=self.settings.rolling_days - 1)
        report = self.excel.Report(
            f"ctwatch — last {self.settings.rolling_days} day(s): {first.isoformat()} to {today.isoformat()}",
            self.rows(first, today),
            self.settings.threshold,
            self.clock(),
        )
        return self.excel.publish(self.dir / LATEST_NAME, report)

    def rebuild(self, since: date | None, today: date) -> list[Published]:
        """Every day from ``since`` (default: the first day with a row) to ``today``, then the latest."""
        if since is None:
            first = self.state.first_finished()
            since = local_day(first) if first else today
        outcomes = []
        day = since
        while day <= today:
            if day == today or self.rows(day, day):
                outcomes.append(self.write_day(day))
            day += timedelta(days=1)
        outcomes.append(self.write_latest(today))
        return outcomes


class ReportUpdater:
    """The ``ctwatch-reports`` thread: debounced rewrites after studies finish, and the roll-over."""

    def __init__(
        self, state_path: Path, settings: ReportSettings, *, clock: Callable[[], datetime] = datetime.now
    ) -> None:
        self.state_path = state_path
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._dirty = True  # the first pass writes today's and the rolling workbook
        self._force_days: set[date] = set()
        self._force = False
        self._retry: set[date | None] = set()  # None stands for the rolling workbook
        self._since: str | None = None
        self._last_write = float("-inf")
        self._thread: threading.Thread | None = None
        self.writes = 0
        self.last_outcomes: list[Published] = []

    # ------------------------------------------------------------------ requests (any thread)
    def notify(self) -> None:
        """A study (or arrival) finished: rewrite within ``debounce_seconds``."""
        with self._lock:
            self._dirty = True
        self._wake.set()

    def rollover(self, now: datetime) -> None:
        """Midnight: finish yesterday's workbook, start today's and move the rolling window, now."""
        today = now.date()
        with self._lock:
            self._force_days |= {today - timedelta(days=1), today}
            self._force = True
        self._wake.set()

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ctwatch-reports", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def due_in(self) -> float | None:
        """Seconds until the next write is due, 0 for now, None when nothing is waiting."""
        with self._lock:
            if self._force:
                return 0.0
            if not (self._dirty or self._retry):
                return None
        return max(0.0, self._last_write + self.settings.debounce_seconds - time.monotonic())

    def _loop(self) -> None:
        state = State(self.state_path, readonly=True)
        reports = Reports(state, self.settings, self.clock)
        try:
            while not self._stop.is_set():
                due = self.due_in()
                if due == 0.0:
                    self._update_logged(reports)
                    continue
                self._wake.wait(due)
                self._wake.clear()
            if self.due_in() is not None:  # a last write on the way out, so no finished row waits
                self._update_logged(reports)
        finally:
            state.close()

    def _update_logged(self, reports: Reports) -> None:
        try:
            self.update(reports)
        except Exception:  # a report bug must not stop the daemon; rows stay in SQLite
            log.exception("report.update_failed dir=%s", self.settings.dir)
            with self._lock:
                self._dirty = True
            self._last_write = time.monotonic()

    def update(self, reports: Reports) -> list[Published]:
        """One pass: the days with rows finished since the last pass, forced days, retries, latest."""
        now = self.clock()
        today = now.date()
        started = (datetime.now(UTC) - timedelta(seconds=2)).isoformat(timespec="seconds")
        with self._lock:
            since = self._since or local_midnight_utc(today - timedelta(days=1))
            days: set[date] = {today} | self._force_days | {d for d in self._retry if d is not None}
            self._dirty = self._force = False
            self._force_days = set()
            self._retry = set()
        days |= {local_day(t) for t in reports.state.finished_since(since)}
        written = {day: reports.write_day(day) for day in sorted(days)}
        latest = reports.write_latest(today)
        outcomes = [*written.values(), latest]
        retry: set[date | None] = {day for day, outcome in written.items() if outcome.pending}
        if latest.pending:
            retry.add(None)
        with self._lock:
            self._retry |= retry
            self._since = started
        self._last_write = time.monotonic()
        self.writes += 1
        self.last_outcomes = outcomes
        return outcomes
