"""The ``/health`` and ``/status`` documents, built from the daemon's probes and the read-only state.

Nothing that could identify a patient goes in: no file names, input paths, error texts, study UIDs
or accession numbers — arrivals are shown by id, state, times and study count, steps by their
counts and a closed category of why (:class:`processor.vocab.StepProblem`).
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from datetime import time as dtime
from typing import Any, TypeVar

from processor.redact import redact_optional_url, reduce_source_error
from processor.state import State
from processor.state.deliveries import plain_error
from processor.status.cluster import executor_view
from processor.status.plan import PipelinePlan, model_file_facts, step_facts
from processor.status.words import duration_words, headline, night_words, server_time, utc_offset

log = logging.getLogger(__name__)
T = TypeVar("T")

RECENT_ARRIVALS = 20


@dataclass
class Probes:
    """What the daemon tells the status server about itself, as cheap callables."""

    version: str
    device: str
    pipeline: dict[str, Any]
    started_at: float = field(default_factory=time.time)
    worker_alive: Callable[[], bool] = lambda: True
    worker_current: Callable[[], tuple[int | None, float | None]] = lambda: (None, None)
    prefetch_inflight: Callable[[], int] = lambda: 0
    # the CPU pool's processes: {"slot", "pid", "alive", "batches", "deaths"} each (empty: no pool)
    cpu_pool: Callable[[], list[dict[str, Any]]] = list
    # which executor runs the pipeline, and its Dask workers (:func:`processor.status.cluster.executor_view`)
    executor: Callable[[], dict[str, Any]] = lambda: executor_view(None, [])
    disk: Callable[[], dict[str, Any]] = lambda: {"ok": True, "reason": None, "volumes": []}
    next_jobs: Callable[[], list[dict[str, Any]]] = list
    models: Callable[[], list[dict[str, Any]]] = list
    night: Callable[[datetime], dict[str, Any]] = lambda now: {}
    stopping: Callable[[], bool] = lambda: False
    threads: Callable[[], list[dict[str, Any]]] = list
    intake: Callable[[], dict[str, Any]] = dict
    faults: Callable[[], list[str]] = list
    # the running pipeline's steps and model files now (None: not known, e.g. a bare status server)
    plan: Callable[[], PipelinePlan | None] = lambda: None
    # names of the configured send-back destinations and notifications (shown even before any row)
    destinations: Callable[[], list[str]] = list


# ---------------------------------------------------------------------------------------- documents
def health(probes: Probes, state: State | None) -> tuple[int, dict[str, Any]]:
    """200 ``{"status": "healthy"}`` (as the CT-CLIP Inference API), else 503 with the reasons.

    ``state`` None: the database could not even be opened (deleted, unreadable). A probe that
    raises is itself a reason, never a failed answer."""
    reasons: list[str] = []

    def ask(what: str, probe: Callable[[], T], fallback: T) -> T:
        try:
            return probe()
        except Exception as exc:  # noqa: BLE001 — the answer says so; the endpoint always answers
            log.warning("status.probe_failed probe=%s", what, exc_info=True)
            reasons.append(f"the {what} check failed ({type(exc).__name__}); see state/ctwatch.log")
            return fallback

    if ask("shutdown", probes.stopping, False):
        reasons.append("the daemon is shutting down")
    threads: list[dict[str, Any]] = ask("thread", probes.threads, [])
    for thread in threads:
        if not thread["alive"]:
            reasons.append(
                f"the {thread['thread']} thread has stopped (restarted {thread['restarts']} time(s) so far; "
                "it is started again automatically); see state/ctwatch.log"
            )
    if not threads and not ask("worker", probes.worker_alive, False):
        reasons.append("the worker thread is not running; see state/ctwatch.log and restart ctwatch")
    intake: dict[str, Any] = ask("intake", probes.intake, {})
    quiet, stale_after = intake.get("seconds_since_scan"), intake.get("stale_after_seconds")
    if quiet is not None and stale_after is not None and quiet > stale_after:
        reasons.append(
            f"intake has not finished a scan of the inbox for {quiet:.0f} s (one is due every "
            f"{intake.get('scan_interval_seconds', 0):g} s); new files are not being taken in — "
            "see state/ctwatch.log"
        )
    faults: list[str] = ask("fault", probes.faults, [])
    reasons.extend(faults)
    try:
        if state is None:
            raise sqlite3.OperationalError("unable to open database file")
        state.ping()
    except Exception as exc:  # any database failure is the answer here, not a crash
        reasons.append(f"the database does not answer: {type(exc).__name__}: {exc}")
    disk: dict[str, Any] = ask("disk", probes.disk, {"ok": True})
    if not disk.get("ok", True):
        reasons.append(str(disk.get("reason") or "low disk space"))
    if reasons:
        return 503, {"status": "unhealthy", "reasons": reasons}
    return 200, {"status": "healthy"}


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def gpu_memory(device: str) -> dict[str, int] | None:
    """CUDA memory of the daemon's device, only when torch is already loaded (never imports it)."""
    torch = sys.modules.get("torch")
    if not device.startswith("cuda") or torch is None or not torch.cuda.is_available():
        return None
    index = torch.device(device).index or 0
    return {
        "allocated_bytes": int(torch.cuda.memory_allocated(index)),
        "reserved_bytes": int(torch.cuda.memory_reserved(index)),
        "total_bytes": int(torch.cuda.get_device_properties(index).total_memory),
    }


def local_midnight(now: datetime) -> datetime:
    """The start of ``now``'s day, with the UTC offset in force at midnight — not ``now``'s, which
    differs by an hour on a daylight-saving change day. A fixed offset equal to the server's own
    (what ``datetime.now().astimezone()`` gives) stands for the server's zone, whose rules the C
    library applies (``TZ``, ``/etc/localtime``); a zone with rules (``ZoneInfo``) applies its own."""
    naive = datetime.combine(now.date(), dtime())
    if isinstance(now.tzinfo, timezone) and now.utcoffset() == now.astimezone().utcoffset():
        return naive.astimezone()
    return naive.replace(tzinfo=now.tzinfo)


#: How far back a step's last run counts for the forecast (a model that failed last week still does).
LAST_RUN_DAYS = 7


def collect_status(probes: Probes, state: State, now: datetime | None = None) -> dict[str, Any]:
    """The ``/status`` document. ``now`` is aware local time (passed in by tests); "today" is the
    server's local day, from its midnight (``today.since``, :func:`local_midnight`)."""
    now = now or datetime.now().astimezone()
    midnight = local_midnight(now)
    today = midnight.astimezone(UTC).isoformat(timespec="seconds")
    depth = state.queue_depth()
    night = probes.night(now)
    spans = [s for s in (_seconds_between(a, b) for a, b in state.recent_arrival_spans(20)) if s is not None]
    mean_arrival = sum(spans) / len(spans) if spans else None
    runnable = (
        depth["pending_urgent"]
        + depth["pending_day"]
        + depth["running"]
        + (depth["pending_night"] if night.get("open") else 0)
    )
    current, since = probes.worker_current()
    eta = None
    if mean_arrival is not None:
        elapsed = time.time() - since if since else 0.0
        eta = round(max(runnable * mean_arrival - min(elapsed, mean_arrival), 0.0), 1)
    _, healthy = health(probes, state)
    outcomes = state.outcomes_since(today)
    try:
        plan = probes.plan()
        plan_problem = None if plan is None else plan.weights_problem
    except Exception:  # noqa: BLE001 — the page answers without the plan and says so
        log.warning("status.plan_failed", exc_info=True)
        plan, plan_problem = (
            None,
            "the pipeline's steps and model files cannot be read now; see state/ctwatch.log",
        )
    last_runs: list[dict[str, Any]] = []
    if probes.pipeline.get("name") is not None and probes.pipeline.get("version") is not None:
        last_runs = state.last_step_runs(
            (midnight - timedelta(days=LAST_RUN_DAYS)).astimezone(UTC).isoformat(timespec="seconds"),
            str(probes.pipeline["name"]),
            int(probes.pipeline["version"]),
        )
    steps = step_facts(
        plan, state.step_counts_since(today), state.last_step_failures(), state.step_means(), now, last_runs
    )
    uptime = round(time.time() - probes.started_at, 1)
    try:
        executor = probes.executor()
    except Exception:  # noqa: BLE001 — the page answers without the workers and says so
        log.warning("status.executor_failed", exc_info=True)
        executor = {"kind": "unknown", "words": "cannot be read now; see state/ctwatch.log"}
    return {
        "status": healthy["status"],
        "reasons": healthy.get("reasons", []),
        "summary": headline(steps, outcomes, state.partial_steps_since(today)),
        "version": probes.version,
        "uptime_seconds": uptime,
        "uptime": duration_words(uptime),
        "now": now.isoformat(timespec="seconds"),
        "clock": {"utc_offset": utc_offset(now), "words": server_time(now)},
        "device": probes.device,
        "gpu_memory": gpu_memory(probes.device),
        "pipeline": probes.pipeline,
        "queue": depth,
        "arrivals_by_state": state.counts_by_state(),
        "today": {
            "since": midnight.isoformat(timespec="seconds"),
            "done": outcomes.get("Success", 0) + outcomes.get("Partial", 0),
            "failed": sum(n for k, n in outcomes.items() if k not in ("Success", "Partial")),
            "by_outcome": outcomes,
        },
        "threads": probes.threads(),
        "intake": probes.intake(),
        "executor": executor,
        "worker": {
            "alive": probes.worker_alive(),
            "current_arrival": current,
            "prefetch_inflight": probes.prefetch_inflight(),
            "cpu_processes": [
                {k: p[k] for k in ("slot", "alive", "batches", "deaths")} for p in probes.cpu_pool()
            ],
            "current_seconds": round(time.time() - since, 1) if since else None,
        },
        "recent_arrivals": [
            {
                "id": r["id"],
                "state": r["state"],
                "queue": "urgent" if r["priority"] == "urgent" else "night" if r["night"] else "day",
                "attempts": r["attempts"],
                "received_at": r["created_at"],
                "claimed_at": r["claimed_at"],
                "finished_at": r["finished_at"],
                "studies": r["studies"],
            }
            for r in state.recent_arrivals(RECENT_ARRIVALS)
        ],
        "steps": steps,
        "model_files": model_file_facts(plan),
        "model_files_problem": plan_problem,
        "pipeline_file_changed": plan.changed_on_disk if plan else False,
        "on_missing_weights": plan.on_missing_weights if plan else None,
        "weights_folder": plan.weights_folder if plan else None,
        "models_loaded": probes.models(),
        "disk": probes.disk(),
        "night": {**night, "words": night_words(night, now, depth["pending_night"])} if night else night,
        "next_jobs": probes.next_jobs(),
        "sources": [source_view(row) for row in state.sources()],
        "deliveries": deliveries_view(state.delivery_summary(), probes.destinations()),
        "eta": {
            "runnable_arrivals": runnable,
            "mean_seconds_per_arrival": round(mean_arrival, 2) if mean_arrival is not None else None,
            "seconds": eta,
            "words": duration_words(eta),
        },
    }


SOURCE_FIELDS = (
    "name",
    "kind",
    "url",
    "polls",
    "successes",
    "failures",
    "arrivals",
    "last_poll_at",
    "last_success_at",
    "last_error",
    "last_error_at",
    "last_detail",
)


def deliveries_view(summary: dict[str, dict[str, Any]], configured: list[str]) -> dict[str, dict[str, Any]]:
    """The send-back queue per destination or notification name (configured ones first, with zeros
    before their first row): ``pending``, ``sent``, ``failed``, ``oldest_pending_seconds``,
    ``last_error`` (ctwatch's words, redacted again here) and ``last_error_at``. No file name, UID or
    arrival: the rows themselves are listed by ``python run.py status`` only."""
    view: dict[str, dict[str, Any]] = {}
    for name in [*configured, *sorted(set(summary) - set(configured))]:
        found = summary.get(name, {})
        view[name] = {
            "pending": int(found.get("pending", 0)),
            "sent": int(found.get("sent", 0)),
            "failed": int(found.get("failed", 0)),
            "superseded": int(found.get("superseded", 0)),
            "oldest_pending_seconds": found.get("oldest_pending_seconds"),
            "last_error": plain_error(found.get("last_error")),
            "last_error_at": found.get("last_error_at"),
        }
    return view


def source_view(row: dict[str, Any]) -> dict[str, Any]:
    """One URL source as served: these fields only, the URL without credentials or query and the error
    as its category (again here, whatever the row holds — nothing from outside leaves this port)."""
    view = {key: row.get(key) for key in SOURCE_FIELDS}
    view["url"] = redact_optional_url(view["url"])
    view["last_error"] = reduce_source_error(view["last_error"])
    return view
