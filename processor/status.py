"""The read-only status endpoint: ``/health``, ``/status``, ``/metrics`` and a one-page HTML view.

Standard-library ``ThreadingHTTPServer`` on ``status.host:status.port``. It reads SQLite through
its own read-only connection and the daemon's probes (worker, disk guard, scheduler, model cache);
it never writes, never serves a file, and every other method gets 405. A slow client only holds
its own request thread, and only for ``REQUEST_TIMEOUT`` seconds.

Nothing that could identify a patient leaves this port: no file names, paths, error texts, study
UIDs or accession numbers — arrivals are shown by id, state, times and study count.
"""

from __future__ import annotations

import html
import json
import logging
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from datetime import time as dtime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from processor.redact import redact_optional_url, reduce_source_error
from processor.state import State

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUEST_TIMEOUT = 5.0
RECENT_ARRIVALS = 20
REFRESH_SECONDS = 10


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
    disk: Callable[[], dict[str, Any]] = lambda: {"ok": True, "reason": None, "volumes": []}
    next_jobs: Callable[[], list[dict[str, Any]]] = list
    models: Callable[[], list[dict[str, Any]]] = list
    night: Callable[[datetime], dict[str, Any]] = lambda now: {}
    stopping: Callable[[], bool] = lambda: False
    threads: Callable[[], list[dict[str, Any]]] = list
    intake: Callable[[], dict[str, Any]] = dict
    faults: Callable[[], list[str]] = list


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


def collect_status(probes: Probes, state: State, now: datetime | None = None) -> dict[str, Any]:
    """The ``/status`` document. ``now`` is local time (passed in by tests)."""
    now = now or datetime.now().astimezone()
    midnight = datetime.combine(now.date(), dtime(), tzinfo=now.tzinfo)
    today = midnight.astimezone(UTC).isoformat(timespec="seconds")
    depth = state.queue_depth()
    night = probes.night(now)
    spans = [s for s in (_seconds_between(a, b) for a, b in state.recent_arrival_spans(20)) if s is not None]
    mean_arrival = sum(spans) / len(spans) if spans else None
    runnable = depth["pending_day"] + depth["running"] + (depth["pending_night"] if night.get("open") else 0)
    current, since = probes.worker_current()
    eta = None
    if mean_arrival is not None:
        elapsed = time.time() - since if since else 0.0
        eta = round(max(runnable * mean_arrival - min(elapsed, mean_arrival), 0.0), 1)
    _, healthy = health(probes, state)
    outcomes = state.outcomes_since(today)
    return {
        "status": healthy["status"],
        "reasons": healthy.get("reasons", []),
        "version": probes.version,
        "uptime_seconds": round(time.time() - probes.started_at, 1),
        "now": now.isoformat(timespec="seconds"),
        "device": probes.device,
        "gpu_memory": gpu_memory(probes.device),
        "pipeline": probes.pipeline,
        "queue": depth,
        "arrivals_by_state": state.counts_by_state(),
        "today": {
            "done": outcomes.get("Success", 0) + outcomes.get("Partial", 0),
            "failed": sum(n for k, n in outcomes.items() if k not in ("Success", "Partial")),
            "by_outcome": outcomes,
        },
        "threads": probes.threads(),
        "intake": probes.intake(),
        "worker": {
            "alive": probes.worker_alive(),
            "current_arrival": current,
            "prefetch_inflight": probes.prefetch_inflight(),
            "current_seconds": round(time.time() - since, 1) if since else None,
        },
        "recent_arrivals": [
            {
                "id": r["id"],
                "state": r["state"],
                "queue": "night" if r["night"] else "day",
                "attempts": r["attempts"],
                "received_at": r["created_at"],
                "claimed_at": r["claimed_at"],
                "finished_at": r["finished_at"],
                "studies": r["studies"],
            }
            for r in state.recent_arrivals(RECENT_ARRIVALS)
        ],
        "steps": [
            {"step": r["step_id"], "runs": r["runs"], "mean_seconds": round(r["mean_seconds"], 3)}
            for r in state.step_means()
        ],
        "models_loaded": probes.models(),
        "disk": probes.disk(),
        "night": night,
        "next_jobs": probes.next_jobs(),
        "sources": [source_view(row) for row in state.sources()],
        "eta": {
            "runnable_arrivals": runnable,
            "mean_seconds_per_arrival": round(mean_arrival, 2) if mean_arrival is not None else None,
            "seconds": eta,
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


def source_view(row: dict[str, Any]) -> dict[str, Any]:
    """One URL source as served: these fields only, the URL without credentials or query and the error
    as its category (again here, whatever the row holds — nothing from outside leaves this port)."""
    view = {key: row.get(key) for key in SOURCE_FIELDS}
    view["url"] = redact_optional_url(view["url"])
    view["last_error"] = reduce_source_error(view["last_error"])
    return view


# ---------------------------------------------------------------------------------------- metrics
def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


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
        "Active arrivals by state and queue.",
        [
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
        [({"step": s["step"]}, s["mean_seconds"]) for s in status["steps"]],
    )
    family(
        "ctwatch_step_runs_total",
        "counter",
        "Completed runs of each step.",
        [({"step": s["step"]}, s["runs"]) for s in status["steps"]],
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


# ---------------------------------------------------------------------------------------- HTML
def status_html(status: dict[str, Any]) -> str:
    """A self-refreshing page with the same facts as ``/status``; inline CSS, no scripts or assets."""
    e = html.escape

    def table(headers: list[str], rows: list[list[Any]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = (
            "".join(
                "<tr>" + "".join(f"<td>{e('' if c is None else str(c))}</td>" for c in row) + "</tr>"
                for row in rows
            )
            or f"<tr><td colspan={len(headers)}>none</td></tr>"
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    ok = status["status"] == "healthy"
    pipeline = status["pipeline"]
    eta = status["eta"]["seconds"]
    facts = [
        ["health", status["status"] + ("" if ok else ": " + "; ".join(status["reasons"]))],
        ["version", status["version"]],
        ["uptime", f"{status['uptime_seconds']:.0f} s"],
        ["device", status["device"]],
        ["pipeline", f"{pipeline.get('name')} v{pipeline.get('version')}"],
        ["queue", ", ".join(f"{k}={v}" for k, v in status["queue"].items())],
        [
            "today",
            f"{status['today']['done']} done, {status['today']['failed']} failed ("
            + (", ".join(f"{k}={v}" for k, v in sorted(status["today"]["by_outcome"].items())) or "none")
            + ")",
        ],
        ["current arrival", status["worker"]["current_arrival"]],
        [
            "threads",
            ", ".join(
                f"{t['thread']} {'up' if t['alive'] else 'DOWN'}"
                + (f" (restarted {t['restarts']}×)" if t["restarts"] else "")
                for t in status.get("threads", [])
            )
            or "—",
        ],
        ["ETA of the queue", "unknown" if eta is None else f"{eta:.0f} s"],
        ["night window", json.dumps(status["night"])],
        [
            "disk",
            ("ok" if status["disk"].get("ok", True) else status["disk"].get("reason"))
            + " — "
            + ", ".join(
                f"{v['volume']} {v['free_bytes'] / 1e9:.1f} GB free"
                for v in status["disk"].get("volumes", [])
            ),
        ],
    ]
    if status.get("gpu_memory"):
        facts.append(["GPU memory", ", ".join(f"{k}={v}" for k, v in status["gpu_memory"].items())])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>ctwatch — {e(status["status"])}</title>
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}h1{{font-size:1.3em}}
h1 span{{color:{"#1a7f37" if ok else "#b3261e"}}}table{{border-collapse:collapse;margin:.4em 0 1.2em}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:left}}th{{background:#1f4e78;color:#fff}}</style>
</head><body>
<h1>ctwatch <span>{e(status["status"])}</span></h1>
<p>{e(status["now"])} — refreshes every {REFRESH_SECONDS} s. Machine-readable: /status, /health, /metrics.</p>
{table(["what", "value"], facts)}
<h2>Last {RECENT_ARRIVALS} arrivals</h2>
{
        table(
            ["arrival", "state", "queue", "attempts", "received", "claimed", "finished", "studies"],
            [
                [
                    a["id"],
                    a["state"],
                    a["queue"],
                    a["attempts"],
                    a["received_at"],
                    a["claimed_at"],
                    a["finished_at"],
                    a["studies"],
                ]
                for a in status["recent_arrivals"]
            ],
        )
    }
<h2>Steps</h2>
{
        table(
            ["step", "runs", "mean seconds"],
            [[s["step"], s["runs"], s["mean_seconds"]] for s in status["steps"]],
        )
    }
<h2>Models loaded</h2>
{
        table(
            ["model", "hits", "GPU bytes"],
            [[m.get("key"), m.get("hits"), m.get("gpu_bytes")] for m in status["models_loaded"]],
        )
    }
<h2>Next scheduled jobs</h2>
{table(["job", "next run"], [[j["id"], j["next_run"]] for j in status["next_jobs"]])}
<h2>URL sources</h2>
{
        table(
            ["source", "kind", "url", "polls", "failures", "arrivals", "last success", "last error"],
            [
                [
                    r["name"],
                    r["kind"],
                    r["url"],
                    r["polls"],
                    r["failures"],
                    r["arrivals"],
                    r["last_success_at"],
                    f"{r['last_error_at']}: {r['last_error']}" if r["last_error"] else None,
                ]
                for r in status["sources"]
            ],
        )
    }
</body></html>
"""


# ---------------------------------------------------------------------------------------- server
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: StatusServer

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name="ctwatch-status-request",
            daemon=True,
        )
        thread.start()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "ctwatch"
    sys_version = ""
    protocol_version = "HTTP/1.0"
    timeout = REQUEST_TIMEOUT

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:  # noqa: N802 (the http.server naming)
        path = urlsplit(self.path).path
        route = {
            "/": self._page,
            "/health": self._health,
            "/status": self._status,
            "/metrics": self._metrics,
        }.get(path)
        if route is None:
            self._send(
                404,
                "application/json",
                {"error": "not found", "paths": ["/", "/health", "/status", "/metrics"]},
            )
            return
        try:
            route()
        except Exception as exc:  # a failed read answers 503 with every reason known; the server lives
            log.exception("status.request_failed path=%s", path)
            _, known = health(self.server.app.probes, None)
            self._send(
                503,
                "application/json",
                {
                    "status": "unhealthy",
                    "reasons": [f"status unavailable: {type(exc).__name__}", *known.get("reasons", [])],
                },
            )

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method but GET: 405, whatever its name
            return self._not_allowed
        raise AttributeError(name)

    def _not_allowed(self) -> None:
        self._send(
            405,
            "application/json",
            {"error": f"method {self.command} not allowed; this endpoint is read-only (GET)"},
            allow="GET",
        )

    def _health(self) -> None:
        app = self.server.app
        try:
            code, document = app.read(lambda state, probes: health(probes, state))
        except sqlite3.Error:  # the database cannot even be opened: said, with every other reason
            log.warning("status.database_unavailable path=/health", exc_info=True)
            code, document = health(app.probes, None)
        self._send(code, "application/json", document)

    def _status(self) -> None:
        self._send(200, "application/json", self.server.app.read(lambda s, p: collect_status(p, s)))

    def _metrics(self) -> None:
        status, totals = self.server.app.read(lambda s, p: (collect_status(p, s), s.studies_by_status()))
        self._send(200, "text/plain; version=0.0.4; charset=utf-8", metrics_text(status, totals))

    def _page(self) -> None:
        self._send(
            200,
            "text/html; charset=utf-8",
            status_html(self.server.app.read(lambda s, p: collect_status(p, s))),
        )

    def _send(self, code: int, content_type: str, body: Any, allow: str | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body, indent=1, default=str)).encode("utf-8")
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        if allow:
            self.send_header("Allow", allow)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the http.server signature)
        log.debug("status.request client=%s %s", self.client_address[0], format % args)


class StatusServer:
    """Owns the HTTP server, its ``ctwatch-status`` thread and its read-only SQLite connection."""

    def __init__(self, state_path: Path, probes: Probes, host: str, port: int) -> None:
        self.state_path = state_path
        self.probes = probes
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self._state: State | None = None
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def read(self, query: Callable[[State, Probes], Any]) -> Any:
        """Run ``query`` on the read-only connection (one request at a time on it)."""
        with self._lock:
            if self._state is None:
                self._state = State(self.state_path, readonly=True, timeout=2.0)
            return query(self._state, self.probes)

    def start(self) -> None:
        """Bind (OSError when the port is taken) and serve on the ``ctwatch-status`` thread.

        Called again by the supervisor when that thread died: the old socket is closed first and
        the same port is bound again."""
        if self._server is not None:
            self._server.server_close()
        port = self.port if self.port is not None else self.requested_port
        self._server = _Server((self.host, port), _Handler)
        self._server.app = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="ctwatch-status",
            daemon=True,
        )
        self._thread.start()
        log.info(
            "status.listening url=http://%s:%d/ host=%s port=%d", self.host, self.port, self.host, self.port
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            if self._state is not None:
                self._state.close()
                self._state = None
