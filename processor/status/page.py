"""``/``: the ``/status`` document as one self-refreshing HTML page (inline CSS; no scripts, no assets).

Its order answers a radiographer first: what was analysed today and what the next study will not
get and why (the headline), every pipeline step with today's counts, then the model files; the
machinery (queue, threads, disk, arrivals, jobs, sources) follows. Every value is escaped.
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any

from processor.status.document import RECENT_ARRIVALS
from processor.status.plan import WEIGHTS_LABEL
from processor.status.words import duration_words, local_time
from processor.weights import UNREADABLE

REFRESH_SECONDS = 10
e = html.escape

STYLE = """body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:90em}
h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.4em}h1 span.ok{color:#1a7f37}h1 span.bad{color:#b3261e}
ul.summary{font-size:1.05em;padding-left:1.2em}ul.summary li{margin:.2em 0}
table{border-collapse:collapse;margin:.4em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#1f4e78;color:#fff}td.n{text-align:right}
.skip{background:#fff4d6}.fail{background:#fde2df}.runs{color:#1a7f37}.note{color:#555}
table.steps td:nth-child(6),table.steps td:nth-child(8){min-width:13em}table.steps td:nth-child(7){max-width:30em}"""


def _cell(value: Any, cls: str | None = None) -> str:
    text = "" if value is None else str(value)
    return f'<td class="{cls}">{e(text)}</td>' if cls else f"<td>{e(text)}</td>"


def table(
    headers: list[str],
    rows: list[list[Any]],
    classes: list[list[str | None]] | None = None,
    name: str | None = None,
) -> str:
    """An escaped table; ``classes`` (same shape as ``rows``) styles single cells, ``name`` the table."""
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(_cell(c, (classes[i][j] if classes else None)) for j, c in enumerate(row)) + "</tr>"
        for i, row in enumerate(rows)
    )
    opening = f'<table class="{name}">' if name else "<table>"
    return f"{opening}<tr>{head}</tr>{body or f'<tr><td colspan={len(headers)}>none</td></tr>'}</table>"


def _steps(status: dict[str, Any], now: datetime) -> str:
    rows, classes = [], []
    for s in status["steps"]:
        today, ahead, last = s["today"], s["next_study"], s["last_failure"]
        why = "; ".join(f"{p['count']}× {p['words']}" for p in s["today_problems"]) or "—"
        rows.append(
            [
                f"{s['name']} ({s['step']})" if s["name"] != s["step"] else s["step"],
                today["done"],
                today["skipped"],
                today["failed"],
                today["not_run"],
                why,
                _next_words(ahead),
                f"{last['at_local']} — {last['words']}" if last else "never",
                "—" if s["mean_seconds"] is None else f"{s['mean_seconds']:.2f}",
            ]
        )
        classes.append(
            [
                None,
                "n",
                "n skip" if today["skipped"] else "n",
                "n fail" if today["failed"] else "n",
                "n skip" if today["not_run"] else "n",
                None,
                "runs" if ahead["outcome"] == "runs" else ("fail" if ahead["outcome"] == "fails" else "skip"),
                "fail" if last else None,
                "n",
            ]
        )
    return table(
        [
            "step",
            "done",
            "skipped",
            "failed",
            "not run",
            "why, today",
            "next study",
            "last failure",
            "mean seconds",
        ],
        rows,
        classes,
        "steps",
    ) + (
        '<p class="note">skipped: the step had nothing to work on (a model file missing, or an input '
        "a skipped step did not give); not run: an earlier step failed on that study. "
        "Next study: what the step will do with the next study, as things are now.</p>"
    )


def _next_words(ahead: dict[str, Any]) -> str:
    """The "next study" cell: ``runs``, or the outcome and why (once, when the words already say it)."""
    if ahead["outcome"] == "runs":
        return "runs"
    if ahead["words"].startswith(("will fail", "fails", "not reached")):
        return str(ahead["words"])
    return f"{ahead['outcome'].replace('_', ' ')}: {ahead['words']}"


def _where_weights(folder: str | None) -> str:
    """Where model files go, in the words of this installation's settings (never an absolute path)."""
    if folder and not folder.startswith("<"):
        return f"under {folder}"
    return f"in the weights folder the config names (`weights:`; shown as {WEIGHTS_LABEL}/ above)"


def _model_files(status: dict[str, Any]) -> str:
    files = status.get("model_files", [])
    if status.get("model_files_problem"):
        return f"<p>{e(status['model_files_problem'])}</p>"
    missing = sum(1 for f in files if f["status"] == "missing")
    unreadable = sum(1 for f in files if f["status"] == UNREADABLE)
    notes = []
    if missing:
        notes.append(
            f"{missing} of {len(files)} missing: install them {_where_weights(status.get('weights_folder'))} — "
            "`python run.py weights` lists where each comes from."
        )
    if unreadable:
        notes.append(
            f"{unreadable} cannot be read: copy that model folder again from its source; "
            "`python run.py weights` says what is wrong."
        )
    note = (
        " ".join(notes)
        if notes
        else f"All {len(files)} installed."
        if files
        else "This pipeline uses no model files."
    )
    rows = [
        [", ".join(f["steps"]), f["file"], "installed" if f["installed"] else f["status"].upper()]
        for f in files
    ]
    classes: list[list[str | None]] = [[None, None, None if f["installed"] else "fail"] for f in files]
    return table(["used by step", "file", "status"], rows, classes) + f'<p class="note">{e(note)}</p>'


def status_html(status: dict[str, Any]) -> str:
    """A page that refreshes itself every ``REFRESH_SECONDS``, with the facts of ``/status``."""
    now = datetime.fromisoformat(status["now"])
    on_dask = (status.get("executor") or {}).get("kind") == "dask"
    ok = status["status"] == "healthy"
    pipeline = status["pipeline"]
    clock = status.get("clock", {}).get("words", "server time")
    today = status["today"]
    facts = [
        ["health", status["status"] + ("" if ok else ": " + "; ".join(status["reasons"]))],
        ["version", status["version"]],
        ["up for", status["uptime"]],
        ["device", status["device"]],
        [
            "pipeline",
            f"{pipeline.get('name')} v{pipeline.get('version')}"
            + (
                " — the pipeline file changed since ctwatch started; restart ctwatch to use it"
                if status.get("pipeline_file_changed")
                else ""
            ),
        ],
        ["queue", ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in status["queue"].items())],
        [
            "today",
            f"{today['done']} done, {today['failed']} failed ("
            + (", ".join(f"{k}: {v}" for k, v in sorted(today["by_outcome"].items())) or "none")
            + ")",
        ],
        *_send_back_row(status.get("deliveries") or {}),
        ["current arrival", status["worker"]["current_arrival"] or "none"],
        [
            "threads",
            ", ".join(
                f"{t['thread']} {'up' if t['alive'] else 'DOWN'}"
                + (f" (restarted {t['restarts']}×)" if t["restarts"] else "")
                for t in status.get("threads", [])
            )
            or "—",
        ],
        *executor_rows(status.get("executor") or {}, status["worker"].get("cpu_processes", [])),
        ["time to empty the queue", status["eta"]["words"]],
        ["night window", (status["night"] or {}).get("words", "not configured")],
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
    summary = "".join(f"<li>{e(line)}</li>" for line in status.get("summary", []))
    arrivals = table(
        ["arrival", "state", "queue", "attempts", "received", "claimed", "finished", "studies"],
        [
            [
                a["id"],
                a["state"],
                a["queue"],
                a["attempts"],
                local_time(a["received_at"], now),
                local_time(a["claimed_at"], now),
                local_time(a["finished_at"], now),
                a["studies"],
            ]
            for a in status["recent_arrivals"]
        ],
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>ctwatch — {e(status["status"])}</title>
<style>{STYLE}</style>
</head><body>
<h1>ctwatch <span class="{"ok" if ok else "bad"}">{e(status["status"])}</span></h1>
<ul class="summary">{summary}</ul>
<p class="note">As of {e(now.strftime("%Y-%m-%d %H:%M:%S"))}, {e(clock)}: every time on this page is in it.
Refreshes every {REFRESH_SECONDS} s. Machine-readable: /status, /health, /metrics.</p>
{table(["what", "value"], facts)}
<h2>Steps — today, since 00:00 ({e(clock)})</h2>
{_steps(status, now)}
<h2>Model files</h2>
{_model_files(status)}
<h2>Last {RECENT_ARRIVALS} arrivals</h2>
{arrivals}
<h2>Models loaded{" in this daemon (the Dask workers' are listed below)" if on_dask else ""}</h2>
{
        table(
            ["model", "hits", "GPU bytes"],
            [[m.get("key"), m.get("hits"), m.get("gpu_bytes")] for m in status["models_loaded"]],
        )
    }
{dask_workers_table(status.get("executor") or {})}
<h2>Next scheduled jobs</h2>
{
        table(
            ["job", "next run"],
            [[j["id"], local_time(j["next_run"], now) or j["next_run"]] for j in status["next_jobs"]],
        )
    }
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
                    local_time(r["last_success_at"], now),
                    f"{local_time(r['last_error_at'], now)}: {r['last_error']}" if r["last_error"] else None,
                ]
                for r in status["sources"]
            ],
        )
    }
<h2>Send-back (results to PACS and folders, notifications)</h2>
{_deliveries(status, now)}
</body></html>
"""


def _send_back_row(deliveries: dict[str, Any]) -> list[list[str]]:
    """The facts table's send-back line (none without destinations): per destination what waits,
    what failed and its last error, so an outage shows at the top of the page."""
    if not deliveries:
        return []
    parts = []
    for name, d in deliveries.items():
        words = f"{name}: {d['sent']} sent, {d['pending']} waiting, {d['failed']} failed"
        if d.get("last_error"):
            words += f" — last error: {d['last_error']}"
        parts.append(words)
    return [["send-back", "; ".join(parts) + " (table: Send-back, below)"]]


def _deliveries(status: dict[str, Any], now: datetime) -> str:
    """One row per destination or notification: the queue's counts, how long the oldest waits, and
    the last error in ctwatch's words."""
    rows, classes = [], []
    for name, d in (status.get("deliveries") or {}).items():
        waiting = d["oldest_pending_seconds"]
        rows.append(
            [
                name,
                d["pending"],
                d["sent"],
                d["failed"],
                "—" if waiting is None else duration_words(waiting),
                f"{local_time(d['last_error_at'], now)}: {d['last_error']}" if d["last_error"] else "—",
            ]
        )
        classes.append([None, "n", "n", "n fail" if d["failed"] else "n", None, None])
    return table(
        ["destination", "waiting", "sent", "failed", "oldest waiting for", "last error"], rows, classes
    ) + (
        '<p class="note">Failed rows are sent again with <code>python run.py resend --failed</code> '
        "(or by id: <code>python run.py status</code> lists them).</p>"
        if any(d["failed"] for d in (status.get("deliveries") or {}).values())
        else ""
    )


def cpu_stage_words(pool: list[dict[str, Any]]) -> str:
    """Where reading and the CPU steps run, in words: the daemon itself, or its pool processes."""
    if not pool:
        return "in the daemon (worker.cpu_workers: 0)"
    alive = sum(1 for p in pool if p["alive"])
    deaths = sum(p["deaths"] for p in pool)
    batches = sum(p["batches"] for p in pool)
    text = f"{alive} of {len(pool)} pool process{'es' if len(pool) != 1 else ''} running, {batches} batch"
    text += "es prepared" if batches != 1 else " prepared"
    if deaths:
        text += f"; {deaths} died (each charged to the arrival it held, see the log: cpu_pool.process_died)"
    return text


def executor_rows(executor: dict[str, Any], pool: list[dict[str, Any]]) -> list[list[Any]]:
    """The "CPU stage" and "executor" facts, and on Dask the "Dask workers" one (how many, each
    one's counts); on Dask the CPU steps run on the workers, whatever ``worker.cpu_workers`` says."""
    if executor.get("kind") != "dask":
        return [["CPU stage", cpu_stage_words(pool)], ["executor", executor.get("words", "unknown")]]
    return [
        ["CPU stage", "on the Dask workers, with every other step (this daemon reads and plans each input)"],
        ["executor", executor.get("words", "unknown")],
        ["Dask workers", executor.get("workers_words", "")],
    ]


def dask_workers_table(executor: dict[str, Any]) -> str:
    """A row per Dask worker (nothing with the local executor)."""
    if executor.get("kind") != "dask":
        return ""
    rows, classes = [], []
    for w in executor.get("workers", []):
        models = "; ".join(
            f"{m['model']}: loaded {m['loads']}×, used {m['hits']}×" for m in w["models_loaded"]
        )
        rows.append(
            [
                w["name"],
                w["address"],
                w["device"] if w["ready"] else "not ready — see that worker's log",
                w["in_flight"],
                w["done"],
                w["failed"],
                models or ("none loaded yet" if w["ready"] else None),
            ]
        )
        classes.append(
            [None, None, None if w["ready"] else "fail", "n", "n", "n fail" if w["failed"] else "n", None]
        )
    return "<h2>Dask workers</h2>\n" + table(
        ["worker", "address", "device", "in flight", "done", "failed", "models loaded"], rows, classes
    )
