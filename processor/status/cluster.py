"""Which executor runs the pipeline, and the Dask workers, as served by ``/status`` and said in words.

``executor: local`` (the default): the pipeline runs in the daemon; only that is said.
``executor: {dask: …}``: each worker the scheduler knows, from
:meth:`processor.dask_cluster.DaskCluster.workers`, reduced to these fields only — its name and
address (an operator's choice and a network address), device, the models it keeps loaded (kind and
file name) and its batch counts. Nothing a worker sends as text goes out: a worker that
cannot answer is shown as not ready, never with its error (which may name an input).
"""

from __future__ import annotations

from typing import Any

from processor.config import DaskSettings
from processor.redact import redact_url

NOT_READY = "not ready (it cannot run batches yet: see that worker's log)"


def executor_words(dask: DaskSettings | None) -> str:
    """``local``, ``dask (LocalCluster, 2 workers)`` or ``dask (scheduler tcp://host:8786)``: the
    line ``python run.py status`` and the status page show (from the settings alone)."""
    if dask is None:
        return "local (the pipeline runs in this daemon)"
    if dask.local is not None:
        n = dask.local.n_workers
        return f"dask (LocalCluster, {n} worker{'s' if n != 1 else ''} started by this daemon)"
    return f"dask (scheduler {redact_url(str(dask.scheduler))})"


def worker_view(row: dict[str, Any]) -> dict[str, Any]:
    """One worker as ``/status`` serves it: ``name``, ``address``, ``ready``, ``device``,
    ``in_flight``, ``done``, ``failed`` (batches), ``model_loads`` (models loaded since the worker
    started) and ``models_loaded`` (``[{model, loads, hits}]``, :func:`model_name`); counts are
    None when not ready."""
    ready = "error" not in row
    models = (row.get("models_loaded") or []) if ready else []
    return {
        "name": str(row.get("name", "")),
        "address": redact_url(str(row.get("address", ""))),
        "ready": ready,
        "device": str(row["device"]) if ready and row.get("device") is not None else None,
        "in_flight": _count(row, "in_flight", ready),
        "done": _count(row, "done", ready),
        "failed": _count(row, "failed", ready),
        "model_loads": _count(row, "model_loads", ready),
        "models_loaded": [
            {
                "model": model_name(str(m.get("key"))),
                "loads": int(m.get("loads") or 0),
                "hits": int(m.get("hits") or 0),
            }
            for m in models
        ],
    }


def model_name(key: str) -> str:
    """A model cache key (``kind:/path/file:…:device:dtype``, :func:`processor.models.cache._name`)
    as ``kind (file)``: the kind and the name of its first file, without the folders (this port
    shows no absolute paths); just the kind when the key names no file."""
    kind, *parts = key.split(":")
    files = [part.rstrip("/").rsplit("/", 1)[-1] for part in parts if "/" in part]
    return f"{kind} ({files[0]})" if files else kind


def _count(row: dict[str, Any], key: str, ready: bool) -> int | None:
    return int(row.get(key) or 0) if ready else None


def executor_view(dask: DaskSettings | None, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``/status`` ``executor`` object: ``kind`` (``local`` or ``dask``), ``words``
    (:func:`executor_words`), and for Dask ``cluster`` (``local`` or ``scheduler``), ``workers``
    (:func:`worker_view` each, by name) and ``workers_words`` (:func:`workers_words`)."""
    if dask is None:
        return {"kind": "local", "words": executor_words(None)}
    rows = sorted((worker_view(w) for w in workers), key=lambda w: (w["name"], w["address"]))
    return {
        "kind": "dask",
        "cluster": "local" if dask.local is not None else "scheduler",
        "words": executor_words(dask),
        "workers": rows,
        "workers_words": workers_words(rows, dask),
    }


def workers_words(rows: list[dict[str, Any]], dask: DaskSettings) -> str:
    """``2 connected — 0 (cpu): 3 done, 1 in flight, models: clip, lipro; 1 (cpu): …`` for a PACS
    admin; with none connected, how to start one."""
    if not rows:
        if dask.local is not None:
            return "none connected yet (the LocalCluster is starting, or its workers died: see the log)"
        return (
            f"none connected: start one on each GPU machine with `python run.py worker --scheduler "
            f"{redact_url(str(dask.scheduler))} --gpu 0`"
        )
    parts = []
    for w in rows:
        who = f"{w['name'] or w['address']} ({w['device']})" if w["ready"] else w["name"] or w["address"]
        if not w["ready"]:
            parts.append(f"{who}: {NOT_READY}")
            continue
        text = f"{who}: {w['done']} done, {w['in_flight']} in flight"
        if w["failed"]:
            text += f", {w['failed']} failed"
        models = ", ".join(m["model"] for m in w["models_loaded"])
        parts.append(text + f", models: {models or 'none loaded yet'}")
    return f"{len(rows)} connected — " + "; ".join(parts)
