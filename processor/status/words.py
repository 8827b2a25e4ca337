"""Plain words for the status page: durations, local times, the night window, why a step gave nothing,
and the headline (what was analysed today, what the next study will not get).

Everything here turns facts ctwatch holds (numbers, its own settings, closed categories) into
sentences; no function takes text from a study or from outside, so nothing here can leak one.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from processor.vocab import StepProblem

#: Why a step gave no result, in a radiographer's words (the key is ``step_runs.problem``).
PROBLEM_WORDS: dict[str, str] = {
    StepProblem.MODEL_MISSING: "model file missing",
    StepProblem.MODEL_UNUSABLE: (
        "model file could not be loaded (corrupt, incomplete or the wrong kind) — "
        "check it with `python run.py weights --verify`"
    ),
    StepProblem.NEEDS_SKIPPED: "an earlier step it needs was skipped",
    StepProblem.EARLIER_FAILED: "an earlier step failed",
    StepProblem.WITHHELD: "the study lacks something this step needs (for example the pixel spacing)",
    StepProblem.STUDY: "could not process the study (its row in the Excel report says why)",
    StepProblem.OUT_OF_MEMORY: "out of GPU memory",
    StepProblem.INTERNAL: "internal error (a bug) — see state/ctwatch.log",
    StepProblem.UNRECORDED: "failed (recorded by an older ctwatch; its reason is in the Excel report)",
}
NO_REASON = "no reason recorded"


def problem_words(problem: str | None) -> str:
    """The words for a :class:`StepProblem` value; anything else (None, an unknown value) is "no reason recorded"."""
    return PROBLEM_WORDS.get(problem or "", NO_REASON)


def duration_words(seconds: float | None) -> str:
    """``12 s``, ``4 min 10 s``, ``5 h 12 min``, ``2 days 3 h`` (rounded to the second); None: unknown."""
    if seconds is None:
        return "unknown"
    total = max(int(round(seconds)), 0)
    minutes, secs = divmod(total, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    if days:
        return f"{days} day{'s' if days != 1 else ''}" + (f" {hrs} h" if hrs else "")
    if hours:
        return f"{hours} h" + (f" {mins} min" if mins else "")
    if minutes:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    return f"{secs} s"


def utc_offset(now: datetime) -> str:
    """``UTC+01:00`` for an aware ``now``."""
    offset = now.utcoffset() or timedelta(0)
    sign = "-" if offset < timedelta(0) else "+"
    minutes = abs(int(offset.total_seconds())) // 60
    return f"UTC{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def server_time(now: datetime) -> str:
    """How the page names the server's clock: ``server time, CET (UTC+01:00)``."""
    name = now.tzname() or ""
    offset = utc_offset(now)
    if offset == "UTC+00:00" and name in ("", "UTC", "GMT", offset):
        return "server time, UTC"
    return f"server time, {name} ({offset})" if name and name != offset else f"server time ({offset})"


def local_time(stamp: str | None, now: datetime) -> str | None:
    """A stored UTC ISO timestamp as ``YYYY-MM-DD HH:MM`` in ``now``'s time zone; None stays None."""
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(stamp).astimezone(now.tzinfo).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return None


def night_words(night: dict[str, Any], now: datetime, waiting: int) -> str:
    """The night window in a sentence (from the daemon's night probe: ``window``, ``open``,
    ``run_on``, ``next_start``) with the ``waiting`` night-folder inputs; "not configured" when empty."""
    window = str(night.get("window") or "")
    if "-" not in window:
        return "not configured"
    start, end = window.split("-", 1)
    inputs = f"{waiting} input{'s' if waiting != 1 else ''} from the night folder"
    if start == end:
        return f"open all day ({server_time(now)}): night-folder inputs are processed at any time."
    if night.get("open"):
        text = f"open now, until {end} ({server_time(now)}); {inputs} still waiting."
    else:
        opens = ""
        if night.get("next_start"):
            try:
                wait = (datetime.fromisoformat(str(night["next_start"])) - now).total_seconds()
                opens = f" (in {duration_words(wait)})"
            except ValueError:
                opens = ""
        text = (
            f"closed now; opens at {start}{opens} and closes at {end} ({server_time(now)}); "
            f"{inputs} wait for it."
        )
    if night.get("run_on"):
        return text + f" A night batch not finished by {end} runs on until it is done."
    return text + f" Night-folder inputs not finished by {end} wait for the next night."


def count_words(n: int, one: str, many: str | None = None) -> str:
    """``1 study``, ``3 studies``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def _partly(partial: int, why: Mapping[str, int]) -> str:
    """``3 partly (some steps skipped)``, worded from what the Partial studies' steps did."""
    if not partial:
        return "0 partly"
    kinds = [k for k in ("skipped", "failed") if why.get(k)]
    if not kinds:
        return f"{partial} partly (some steps gave no result)"
    return f"{partial} partly (some steps {' or '.join(kinds)})"


def headline(
    steps: list[dict[str, Any]], today: Mapping[str, int], partial_why: Mapping[str, int] | None = None
) -> list[str]:
    """The page's first lines: what was analysed today, and what the next study will not get and why.

    ``today``: :meth:`State.outcomes_since`; ``partial_why``: :meth:`State.partial_steps_since` (how
    many of today's Partial studies had a step skipped, and how many a step failed)."""
    success, partial = today.get("Success", 0), today.get("Partial", 0)
    failure = today.get("Failure", 0)
    rejected, failed = today.get("quarantined", 0), today.get("failed", 0)
    ends = []
    if rejected:
        ends.append(f"{count_words(rejected, 'input')} rejected as unusable (no study could be analysed)")
    if failed:
        ends.append(
            f"{count_words(failed, 'input')} failed before any result (ctwatch crashed on it or an "
            "internal error; the Excel report says which)"
        )
    lines = [
        f"Today: {count_words(success + partial + failure, 'study', 'studies')} processed — "
        f"{success} with every step, {_partly(partial, partial_why or {})}, {failure} failed"
        + ("; " + "; ".join(ends) if ends else "")
        + "."
    ]
    planned = [s for s in steps if s["in_pipeline"]]
    idle = [s for s in planned if s["next_study"]["outcome"] != "runs"]
    if not planned:
        return lines
    if not idle:
        lines.append(f"Every step of the pipeline ({len(planned)}) is ready to run on the next study.")
        return lines
    groups: dict[str, list[str]] = {}
    for s in idle:
        groups.setdefault(problem_words(s["next_study"]["problem"]), []).append(s["name"])
    reasons = "; ".join(f"{why}: {', '.join(names)}" for why, names in groups.items())
    files = any(s["next_study"]["missing_files"] or s["next_study"]["unreadable_files"] for s in idle)
    lines.append(
        f"{len(idle)} of {len(planned)} steps will not run on the next study — {reasons}."
        + (" See Model files below." if files else "")
    )
    return lines
