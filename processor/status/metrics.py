"""``/metrics``: the facts of the ``/status`` document as Prometheus text exposition format 0.0.4."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

Family = Callable[[str, str, str, list[tuple[dict[str, Any], float]]], None]


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _unix(stamp: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(stamp)).timestamp() if stamp else None
    except ValueError:
        return None


def _value(value: Any) -> str:
    number = float(value)
    if number != number:
        return "NaN"
    if number in (float("inf"), float("-inf")):
        return "+Inf" if number > 0 else "-Inf"
    return str(int(number)) if number.is_integer() and abs(number) < 2**53 else repr(number)


def metrics_text(status: dict[str, Any], totals: dict[str, int]) -> str:
    """Prometheus text exposition format 0.0.4 for a ``/status`` document."""
    out: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict[str, Any], float]]) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            rendered = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{rendered}}} {_value(value)}" if rendered else f"{name} {_value(value)}")

    family("ctwatch_up", "gauge", "1 when healthy, 0 otherwise.", [({}, status["status"] == "healthy")])
    family(
        "ctwatch_info",
        "gauge",
        "Version, device and pipeline of this daemon.",
        [
            (
                {
                    "version": status["version"],
                    "device": status["device"],
                    "pipeline": status["pipeline"].get("name"),
                    "pipeline_version": status["pipeline"].get("version"),
                },
                1,
            )
        ],
    )
    family(
        "ctwatch_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
        [({}, status["uptime_seconds"])],
    )
    family(
        "ctwatch_queue_depth",
        "gauge",
        "Active arrivals by state and queue (urgent: from inbox.urgent_dirs, taken first).",
        [
            ({"state": "pending", "queue": "urgent"}, status["queue"]["pending_urgent"]),
            ({"state": "pending", "queue": "day"}, status["queue"]["pending_day"]),
            ({"state": "pending", "queue": "night"}, status["queue"]["pending_night"]),
            ({"state": "running", "queue": "any"}, status["queue"]["running"]),
        ],
    )
    family(
        "ctwatch_arrivals",
        "gauge",
        "Arrivals in the database by state.",
        [({"state": k}, v) for k, v in sorted(status["arrivals_by_state"].items())],
    )
    family(
        "ctwatch_studies_total",
        "counter",
        "Studies processed, by processing status.",
        [({"status": k}, v) for k, v in sorted(totals.items())],
    )
    family(
        "ctwatch_today",
        "gauge",
        "Studies (and rejected or failed arrivals) finished today, by outcome.",
        [({"outcome": k}, v) for k, v in sorted(status["today"]["by_outcome"].items())],
    )
    family(
        "ctwatch_step_mean_seconds",
        "gauge",
        "Mean seconds per completed run of each step.",
        [({"step": s["step"]}, s["mean_seconds"]) for s in status["steps"] if s["mean_seconds"] is not None],
    )
    family(
        "ctwatch_step_runs_total",
        "counter",
        "Completed runs of each step.",
        [({"step": s["step"]}, s["runs"]) for s in status["steps"]],
    )
    family(
        "ctwatch_step_today",
        "gauge",
        "Runs of each pipeline step finished today (server's local day), by status; 0 when it did not run.",
        [({"step": s["step"], "status": k}, n) for s in status["steps"] for k, n in s["today"].items()],
    )
    family(
        "ctwatch_step_problems_today",
        "gauge",
        "Runs of each step finished today without a result, by why (a closed category).",
        [
            ({"step": s["step"], "problem": p["problem"] or "none"}, p["count"])
            for s in status["steps"]
            for p in s["today_problems"]
        ],
    )
    family(
        "ctwatch_step_ready",
        "gauge",
        "1 when the step will run on the next study, 0 when it will be skipped or fail (see problem).",
        [
            (
                {"step": s["step"], "problem": s["next_study"]["problem"] or "none"},
                s["next_study"]["outcome"] == "runs",
            )
            for s in status["steps"]
            if s["in_pipeline"]
        ],
    )
    family(
        "ctwatch_step_model_files_missing",
        "gauge",
        "Weight files of each step that are not installed.",
        [
            ({"step": s["step"]}, len(s["next_study"]["missing_files"]))
            for s in status["steps"]
            if s["in_pipeline"]
        ],
    )
    family(
        "ctwatch_model_file_installed",
        "gauge",
        "1 when a model file (or folder) the pipeline uses is installed, 0 when it is missing or unreadable.",
        [
            ({"file": f["file"], "steps": ",".join(f["steps"])}, f["installed"])
            for f in status.get("model_files", [])
        ],
    )
    last_failures: list[tuple[dict[str, Any], float]] = []
    for s in status["steps"]:
        at = _unix(s["last_failure"]["at"]) if s["last_failure"] else None
        if at is not None:
            last_failures.append(({"step": s["step"], "problem": s["last_failure"]["problem"] or "none"}, at))
    family(
        "ctwatch_step_last_failure_timestamp_seconds",
        "gauge",
        "Unix time of each step's most recent failure, with why (a closed category).",
        last_failures,
    )
    family(
        "ctwatch_models_loaded",
        "gauge",
        "Models resident in the model cache.",
        [({}, len(status["models_loaded"]))],
    )
    family(
        "ctwatch_worker_alive", "gauge", "1 while the worker thread runs.", [({}, status["worker"]["alive"])]
    )
    threads = status.get("threads", [])
    family(
        "ctwatch_thread_up",
        "gauge",
        "1 while each supervised thread runs.",
        [({"thread": t["thread"]}, t["alive"]) for t in threads],
    )
    family(
        "ctwatch_thread_restarts_total",
        "counter",
        "Times the supervisor restarted each thread after it died.",
        [({"thread": t["thread"]}, t["restarts"]) for t in threads],
    )
    quiet = status.get("intake", {}).get("seconds_since_scan")
    family(
        "ctwatch_intake_seconds_since_scan",
        "gauge",
        "Seconds since the watcher last finished a scan of the inbox folders.",
        [] if quiet is None else [({}, quiet)],
    )
    family(
        "ctwatch_prefetch_inflight",
        "gauge",
        "Batches prepared ahead of the GPU stage (bounded).",
        [({}, status["worker"]["prefetch_inflight"])],
    )
    pool = status["worker"].get("cpu_processes", [])
    family(
        "ctwatch_cpu_processes_alive",
        "gauge",
        "CPU pool processes running now (worker.cpu_workers; 0 without a pool).",
        [({}, sum(1 for p in pool if p["alive"]))],
    )
    family(
        "ctwatch_cpu_process_deaths_total",
        "counter",
        "CPU pool processes that died (each charged to the batch it was preparing).",
        [({}, sum(p["deaths"] for p in pool))],
    )
    deliveries = status.get("deliveries", {})
    family(
        "ctwatch_deliveries",
        "gauge",
        "Rows of the send-back queue by destination (or notification) name and state.",
        [
            ({"destination": name, "state": state}, d[state])
            for name, d in deliveries.items()
            for state in ("pending", "sent", "failed", "superseded")
        ],
    )
    family(
        "ctwatch_delivery_oldest_pending_seconds",
        "gauge",
        "Age of the oldest row still waiting to be sent, per destination (absent when none waits).",
        [
            ({"destination": name}, d["oldest_pending_seconds"])
            for name, d in deliveries.items()
            if d["oldest_pending_seconds"] is not None
        ],
    )
    _executor(family, status.get("executor") or {})
    disk = status["disk"]
    family(
        "ctwatch_disk_ok", "gauge", "0 while the disk guard stops new claims.", [({}, disk.get("ok", True))]
    )
    family(
        "ctwatch_disk_free_bytes",
        "gauge",
        "Free bytes on each guarded volume.",
        [({"volume": v["volume"]}, v["free_bytes"]) for v in disk.get("volumes", [])],
    )
    night = status["night"]
    if night:
        family(
            "ctwatch_night_window_open",
            "gauge",
            "1 while the night window is open.",
            [({}, night.get("open", False))],
        )
        start = _unix(night.get("next_start"))
        family(
            "ctwatch_night_window_next_start_timestamp_seconds",
            "gauge",
            "Unix time the night window opens next.",
            [] if start is None else [({}, start)],
        )
    eta = status["eta"]["seconds"]
    family(
        "ctwatch_queue_eta_seconds",
        "gauge",
        "Estimated seconds to finish the runnable queue.",
        [] if eta is None else [({}, eta)],
    )
    gpu = status.get("gpu_memory")
    if gpu:
        family(
            "ctwatch_gpu_memory_bytes",
            "gauge",
            "CUDA memory of the daemon's device.",
            [({"kind": k.removesuffix("_bytes")}, v) for k, v in sorted(gpu.items())],
        )
    return "\n".join(out) + "\n"


def _executor(family: Family, executor: dict[str, Any]) -> None:
    """Which executor runs, and on Dask each worker's batches and model loads, labelled by the
    worker's name and address only (never a file name or UID)."""
    kind = executor.get("kind", "unknown")
    family(
        "ctwatch_executor_info",
        "gauge",
        "Which executor runs the pipeline (local: in this daemon; dask: on Dask workers).",
        [({"executor": kind, "cluster": executor.get("cluster", "none")}, 1)],
    )
    if kind != "dask":
        return
    workers = executor.get("workers", [])
    ready = [w for w in workers if w["ready"]]
    family("ctwatch_dask_workers", "gauge", "Dask workers connected to the scheduler.", [({}, len(workers))])
    family(
        "ctwatch_dask_worker_ready",
        "gauge",
        "1 when the Dask worker can run batches (its ctwatch plugin answers), 0 when not.",
        [(_who(w), w["ready"]) for w in workers],
    )
    for name, kind_, help_text, key in (
        ("ctwatch_dask_worker_in_flight", "gauge", "Batches running on the Dask worker now.", "in_flight"),
        ("ctwatch_dask_worker_done_total", "counter", "Batches the Dask worker finished.", "done"),
        ("ctwatch_dask_worker_failed_total", "counter", "Batches that raised on the Dask worker.", "failed"),
        (
            "ctwatch_dask_worker_model_loads_total",
            "counter",
            "Models the Dask worker loaded since it started (a resident model is loaded once).",
            "model_loads",
        ),
    ):
        family(name, kind_, help_text, [(_who(w), w[key]) for w in ready])
    family(
        "ctwatch_dask_worker_models_loaded",
        "gauge",
        "Models resident on the Dask worker.",
        [(_who(w), len(w["models_loaded"])) for w in ready],
    )


def _who(worker: dict[str, Any]) -> dict[str, Any]:
    return {"worker": worker["name"], "address": worker["address"]}
