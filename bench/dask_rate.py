"""The Dask executor against the local executor (issue 19, item 6): studies per hour of the real
daemon, the overhead per study, and the bytes a study moves each way.

``python bench/dask_rate.py [--smoke] [--studies N] [--rounds R] [--json FILE]`` (also
``python bench/run.py --dask``).

**Daemon runs** (:func:`bench.daemon_rate.run_once`, the same project and studies as
``bench/daemon_rate.py``: the shipped ``pipelines/chest-ct.yaml`` without weights, so series
selection, HU volume, lung metrics and key-slice previews run; ``max_inflight_studies`` 2, reports
and status page off, device cpu; N uncompressed studies of 300 slices of 512² moved into the inbox at
once). Modes (:data:`MODES`): the local executor (``worker.cpu_workers: 0``, the CPU stage in the
daemon's prefetch thread) and ``executor: {dask: {local: {n_workers: 1 | 2}, inputs: path | bytes}}``
(a LocalCluster of worker processes started by the daemon, each declaring ``GPU: 1``). Every mode
runs once; each further round
(``--rounds``, default 2) runs the local executor and Dask 1 worker ``path`` again, in reverse
order (:data:`AGAIN`); figures are medians over a mode's runs.

Per run, beside :func:`bench.daemon_rate.run_once`'s figures (``per_hour``, ``steady_per_hour``,
``cpu_s_per_study`` of the daemon and every descendant, ...):

* ``idle_cores``: the started, idle daemon's process tree, CPU-s per second over 2 s before the drop
  (a Dask cluster's heartbeats and event loops);
* ``task_s``: the wall seconds each task ran on its worker (the daemon's ``dask.done … seconds=``
  lines: :func:`processor.dask_worker.run_packed` from its start to its return, input bound again in
  ``path`` mode, every step, files collected), ``batch_sizes`` the arrivals per task;
* ``counters``: ``rchar``/``wchar`` of ``/proc/<pid>/io`` summed over the daemon's descendants (the
  Dask worker processes) between the drop and the last JSON, per study in the figures: the bytes
  they read and wrote with read/write system calls — files and pipes: in ``path`` mode the input
  read again from the (shared) filesystem, and the files the steps wrote into the worker's scratch
  folder. Socket traffic (``recv``/``send``) is not counted there, so the task messages are sized
  by the single-study runs below.

**One study at a time, in this process** (:func:`single_study`): a project of the same kind with a
LocalCluster of one worker; the same relabelled studies, each registered and claimed as the daemon
does, then run by the local executor, the Dask executor with ``inputs: path`` and with ``inputs:
bytes`` (``prepare`` then ``complete``: claim → result recorded, nothing overlapping), interleaved,
``repeats`` each, after one warm-up study each. The Dask task's argument is the real
:class:`processor.dask_batch.Batch` that :meth:`processor.executor_dask.DaskExecutor.prepare` submits
(``SizingCluster`` sizes it on its way into :meth:`~processor.dask_cluster.DaskCluster.submit` and
keeps a second reference to the task's result, gathered again after ``complete``), its result the real
:class:`processor.dask_batch.Done`; both are sized and timed with ``distributed.protocol``'s
``serialize`` / ``deserialize`` (what the client, the scheduler and the worker run on them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import daemon_rate  # noqa: E402
from bench.generate import FULL, OUT, SMOKE, StudySpec  # noqa: E402
from bench.gpu_daemon import tree_cpu_seconds  # noqa: E402
from bench.proctree import descendants  # noqa: E402

GOAL_OVERHEAD = 0.05  # issue 19: Dask at 1 worker costs < 5 % of the local executor's time per study
IDLE_BELOW = 0.15  # CPU-s per 0.5 s: a started LocalCluster's tree idles at ~0.08 cores per worker
IDLE_WINDOW = 2.0  # seconds over which the idle tree's CPU is measured before the drop
LOCAL = "local executor"
STUDIES = 10  # per daemon run (full size)


@dataclass(frozen=True)
class Mode:
    """One daemon configuration: ``workers`` 0 is the local executor (CPU pool off)."""

    workers: int
    inputs: str = "path"

    @property
    def name(self) -> str:
        if not self.workers:
            return LOCAL
        return f"dask, {self.workers} worker{'s' if self.workers > 1 else ''}, {self.inputs}"

    def settings(self) -> dict[str, Any]:
        if not self.workers:
            return {}
        return {"executor": {"dask": {"local": {"n_workers": self.workers}, "inputs": self.inputs}}}


MODES = (Mode(0), Mode(1, "path"), Mode(1, "bytes"), Mode(2, "path"), Mode(2, "bytes"))
AGAIN = MODES[:2]  # what later rounds repeat (in reverse order): the overhead's two modes


# ---------------------------------------------------------------------------------------------- daemon runs
def worker_io(pid: int) -> dict[str, float]:
    """``rchar`` and ``wchar`` (bytes through read/write system calls on files and pipes; a socket's
    ``recv``/``send`` is not counted) summed over ``pid``'s descendants, ``pid`` itself left out;
    processes gone are not counted."""
    total = {"rchar": 0.0, "wchar": 0.0}
    for p in descendants(pid)[1:]:
        try:
            for line in (Path("/proc") / str(p) / "io").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in total:
                    total[key] += int(value)
        except (OSError, ValueError):
            continue
    return total


DONE = re.compile(r"dask\.done arrivals=\[([^\]]*)\] worker=(\S+) seconds=([0-9.]+)")


def dask_log(text: str) -> dict[str, Any]:
    """The tasks' wall seconds on their workers, the arrivals per task and the workers that ran
    them, from the daemon's ``dask.done`` lines (:meth:`processor.executor_dask.DaskExecutor.complete`)."""
    found = DONE.findall(text)
    return {
        "task_s": [float(seconds) for _, _, seconds in found],
        "batch_sizes": sorted({len(ids.split(",")) for ids, _, _ in found}),
        "task_workers": sorted({worker for _, worker, _ in found}),
    }


def daemon_runs(
    zips: Sequence[Path],
    modes: Sequence[Mode],
    rounds: int,
    say: Callable[[str], None],
    again: Sequence[Mode] = AGAIN,
) -> list[dict[str, Any]]:
    """Every mode once, then ``again``'s modes once per further round (odd rounds in reverse order),
    back to back. A run in which a study does not succeed is kept as ``{"mode", "studies", "error"}``."""
    runs: list[dict[str, Any]] = []
    timeout = 120.0 + 20.0 * len(zips)
    for r in range(rounds):
        order = list(modes) if r == 0 else [m for m in again if m in modes]
        for mode in order if r % 2 == 0 else list(reversed(order)):
            say(f"  daemon, {mode.name}: {len(zips)} studies dropped at once ...")
            try:
                run = daemon_rate.run_once(
                    zips,
                    0,
                    daemon_rate.MAX_INFLIGHT,
                    timeout,
                    extra=mode.settings(),
                    counters=worker_io,
                    from_log=dask_log,
                    idle_below=IDLE_BELOW,
                    idle_window=IDLE_WINDOW,
                )
            except RuntimeError as exc:  # kept as the figure: this mode did not process the studies
                say(f"    FAILED: {str(exc)[:600]}")
                runs.append({"mode": mode.name, "studies": len(zips), "error": str(exc)[:2000]})
                continue
            run["mode"] = mode.name
            say(
                f"    {run['per_hour']:.0f}/h (steady {run['steady_per_hour'] or 0:.0f}/h, {run['wall_s']:.1f} s), "
                f"{run['cpu_s_per_study']:.2f} CPU-s per study, idle {run['idle_cores']:.3f} cores, "
                f"load {run['loadavg']}"
            )
            runs.append(run)
    return runs


# ---------------------------------------------------------------------------------------------- one study at a time
def wire_size(obj: Any) -> tuple[int, float, float]:
    """Bytes of ``obj`` as ``distributed`` serializes it for a message (header and frames), and the
    seconds to serialize and to deserialize it once."""
    from distributed.protocol import deserialize, serialize
    from distributed.utils import nbytes

    t0 = time.perf_counter()
    header, frames = serialize(obj, on_error="raise")
    t1 = time.perf_counter()
    deserialize(header, frames)
    t2 = time.perf_counter()
    size = sum(nbytes(f) for f in frames) + len(json.dumps(header, default=str))
    return size, t1 - t0, t2 - t1


def _carried(batch: Any) -> tuple[int, int]:
    """How many DICOM members the batch carries with their bytes, and those bytes."""
    from processor.bytesource import _Carried

    members = [
        i.member
        for item in batch.prepared.opened
        for study in item.studies
        for series in study.series.values()
        for i in series.instances
        if isinstance(i.member, _Carried)
    ]
    return len(members), sum(m.size for m in members)


def single_study(zips: Sequence[Path], repeats: int, say: Callable[[str], None]) -> list[dict[str, Any]]:
    """Claim → result recorded for one study at a time: the local executor, Dask ``path`` and Dask
    ``bytes`` (one LocalCluster worker), interleaved (see the module docstring), after one warm-up
    study each (not counted); ``3 × (repeats + 1)`` studies of ``zips``, each used once."""
    import logging

    from distributed import Future

    from processor.config import load_settings
    from processor.daemon import build
    from processor.dask_cluster import DaskCluster
    from processor.executor_dask import DaskExecutor

    sized: list[dict[str, Any]] = []

    class SizingCluster(DaskCluster):
        """:class:`DaskCluster` whose ``submit`` sizes the batch it is handed, then submits it."""

        def submit(self, batch: Any, key: str, packed: bytes | None = None) -> Any:
            size, ser, de = wire_size(batch)
            members, member_bytes = _carried(batch)
            future = super().submit(batch, key, packed)
            sized.append(
                {
                    "result": Future(future.key, self.client),  # holds the result for sizing after complete()
                    "batch_bytes": size,
                    "batch_serialize_s": round(ser, 4),
                    "batch_deserialize_s": round(de, 4),
                    "carried_members": members,
                    "carried_member_bytes": member_bytes,
                }
            )
            return future

    if len(zips) < 3 * (repeats + 1):
        raise ValueError(f"single_study needs {3 * (repeats + 1)} studies, got {len(zips)}")
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctwatch-dask-single-") as tmp:
        root = Path(tmp)
        config = daemon_rate._project(root, 0, daemon_rate.MAX_INFLIGHT, Mode(1, "path").settings())
        settings = load_settings(config)
        components = build(settings)
        local = components.executor(components.state)
        dask = settings.executor.dask
        assert dask is not None
        cluster = SizingCluster(settings, dask, components.device)
        cluster.start()
        for name in ("distributed", "processor"):  # this process's share of the figures, not its logs
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            by_path = DaskExecutor(local, cluster, settings.limits.max_attempts)
            by_bytes = DaskExecutor(local, cluster, settings.limits.max_attempts)
            by_bytes.dask = dask.model_copy(update={"inputs": "bytes"})
            executors: dict[str, Any] = {LOCAL: local, "dask, path": by_path, "dask, bytes": by_bytes}
            staged = iter(daemon_rate._stage(zips[: 3 * (repeats + 1)], root / "staging"))
            for r in range(-1, repeats):  # round -1: one warm-up study each (imports, the worker's compile)
                for name in executors if r % 2 == 0 else list(reversed(executors)):
                    row = _one(name, executors[name], next(staged), components, sized)
                    if "error" in row:
                        say(f"    {name}: FAILED: {row['error']}")
                    else:
                        say(
                            f"    {name}: {row['wall_s']:.2f} s claim → recorded (prepare {row['prepare_s']:.2f}, "
                            f"complete {row['complete_s']:.2f}), {row['tree_cpu_s']:.2f} CPU-s"
                        )
                    if r >= 0:
                        out.append(row)
        finally:
            cluster.close()
            components.state.close()
    return out


def _one(
    name: str, executor: Any, zip_path: Path, components: Any, sized: list[dict[str, Any]]
) -> dict[str, Any]:
    """One study through ``executor``: registered, claimed, ``prepare``, ``complete`` (timed, wall
    and the CPU of this process and its children); for Dask, the task's argument and result sized
    (also when ``complete`` fails: the row then has ``error`` instead of the times)."""
    state = components.state
    aid = components.intake.accept_in_place(zip_path)
    assert aid is not None, zip_path
    claimed = state.claim(aid)
    assert claimed is not None, aid
    row: dict[str, Any] = {"executor": name, "arrival": aid}
    cpu0, t0 = tree_cpu_seconds(os.getpid()) or 0.0, time.perf_counter()
    handle = executor.prepare([claimed])
    t1 = time.perf_counter()
    try:
        finals = executor.complete(handle)
        if list(finals) != ["done"]:  # processor.vocab.ArrivalState, a StrEnum
            raise RuntimeError(f"ended as {[str(f) for f in finals]}")
    except Exception as exc:  # noqa: BLE001 — kept as the figure: this executor failed here
        row["error"] = f"{type(exc).__name__}: {exc}"[:600]
    else:
        t2, cpu1 = time.perf_counter(), tree_cpu_seconds(os.getpid()) or 0.0
        row.update(
            {
                "wall_s": round(t2 - t0, 4),
                "prepare_s": round(t1 - t0, 4),
                "complete_s": round(t2 - t1, 4),
                "tree_cpu_s": round(cpu1 - cpu0, 3),
            }
        )
    if name != LOCAL:
        row.update(sized.pop())
        held = row.pop("result")
        try:
            done = held.result()  # gathered again from the worker (no timeout), not timed
        except Exception as exc:  # noqa: BLE001 — the result's size stays unknown; the row says why
            row["result_error"] = f"{type(exc).__name__}: {exc}"[:300]
            return row
        finally:
            held.release()
        size, ser, de = wire_size(done)
        files = sum(len(data) for folder in done.files.values() for data in folder.values())
        row.update(
            {
                "task_s": round(done.seconds, 4),
                "done_bytes": size,
                "done_file_bytes": files,
                "done_serialize_s": round(ser, 4),
                "done_deserialize_s": round(de, 4),
            }
        )
    return row


# ---------------------------------------------------------------------------------------------- profile: the worker's malloc
TRIM = {"MALLOC_TRIM_THRESHOLD_": "65536"}  # distributed.nanny.pre-spawn-environ's default for a worker


def steps_here(zip_path: str, passes: int) -> dict[str, Any]:
    """The weight-free steps over one study, ``passes`` times in this process
    (:func:`bench.engine.time_steps`): each step's median CPU-s, and minor page faults per pass."""
    import resource

    from bench import engine

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with engine.scratch("ctwatch-dask-malloc-") as tmp:
        pipeline = engine.compile_pipeline(cast("list[dict]", engine.WEIGHT_FREE), engine.bench_env(tmp))
        times = engine.time_steps(Path(zip_path), pipeline, passes, tmp)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return {
        "cpu_s": {label.split(" ")[0]: _med(samples.cpu) for label, samples in times.samples.items()},
        "minor_faults_per_pass": faults / passes,
    }


def malloc_profile(zip_path: Path, say: Callable[[str], None], passes: int = 3) -> dict[str, Any]:
    """Where a Dask worker's extra step time goes: :func:`steps_here` in a fresh process without
    ``MALLOC_*`` settings and in one with :data:`TRIM` (what a Dask nanny puts into its worker's
    environment), interleaved ABBA. Any ``MALLOC_*`` setting turns off glibc's dynamic mmap
    threshold, so every large array (a volume, a mask) is mapped afresh and its pages faulted in
    again, pass after pass."""
    kinds = {"no MALLOC_ setting": False, "MALLOC_TRIM_THRESHOLD_=65536": True}
    found: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
    code = (
        "import json, sys; from bench.dask_rate import steps_here; "
        "print(json.dumps(steps_here(sys.argv[1], int(sys.argv[2]))))"
    )
    for order in (list(kinds), list(reversed(kinds))):
        for kind in order:
            env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
            if kinds[kind]:
                env.update(TRIM)
            done = subprocess.run(
                [sys.executable, "-c", code, str(zip_path), str(passes)],
                env=env, capture_output=True, text=True, check=True, timeout=600,
            )  # fmt: skip
            found[kind].append(json.loads(done.stdout.strip().splitlines()[-1]))
    out: dict[str, Any] = {}
    for kind, rows in found.items():
        steps = {step: round(_med([r["cpu_s"][step] for r in rows]), 3) for step in rows[0]["cpu_s"]}
        out[kind] = {
            "cpu_s": steps,
            "steps_cpu_s": round(sum(steps.values()), 3),
            "minor_faults_per_pass": round(_med([r["minor_faults_per_pass"] for r in rows])),
        }
    plain, trim = (out[k] for k in kinds)
    out["trim_vs_none_steps_cpu"] = round(trim["steps_cpu_s"] / plain["steps_cpu_s"], 3)
    out["passes"] = passes
    say(
        f"    steps CPU-s per study {plain['steps_cpu_s']:.2f} without, {trim['steps_cpu_s']:.2f} with "
        f"MALLOC_TRIM_THRESHOLD_=65536; minor page faults per pass {plain['minor_faults_per_pass']} / "
        f"{trim['minor_faults_per_pass']}"
    )
    return out


# ---------------------------------------------------------------------------------------------- figures
def _med(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def figures(runs: list[dict[str, Any]], single: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per mode over its runs that succeeded, the overhead of Dask at 1 worker against the
    local executor (steady wall seconds and CPU seconds per study), the single-study figures (the
    bytes a study moves each way among them); ``failures``: what did not succeed, by mode."""
    modes: dict[str, Any] = {}
    failures: dict[str, list[str]] = {}
    for name in dict.fromkeys(r["mode"] for r in runs):
        failed = [r["error"] for r in runs if r["mode"] == name and "error" in r]
        if failed:
            failures[name] = failed
        mine = [r for r in runs if r["mode"] == name and "error" not in r]
        if mine:
            modes[name] = _mode_figures(mine)
    out: dict[str, Any] = {"modes": modes}
    local = modes.get(LOCAL)
    if local:
        out["rate_vs_local"] = {
            k: round(v["per_hour"] / local["per_hour"], 3) for k, v in modes.items() if k != LOCAL
        }
        out["steady_rate_vs_local"] = {
            k: round(v["steady_per_hour"] / local["steady_per_hour"], 3)
            for k, v in modes.items()
            if k != LOCAL
        }
        one = [m for m in MODES if m.workers == 1]
        out["overhead_1_worker"] = {
            mode.name.removeprefix("dask, 1 worker, "): {
                "steady_s_per_study": round(m["steady_s_per_study"] / local["steady_s_per_study"] - 1, 4),
                "cpu_s_per_study": round(m["cpu_s_per_study"] / local["cpu_s_per_study"] - 1, 4),
                **_paired(runs, mode.name),
            }
            for mode in one
            if (m := modes.get(mode.name)) and m["steady_s_per_study"] and local["steady_s_per_study"]
        }
    if single:
        out["single_study"] = _single_figures(single)
        for row in single:
            if "error" in row:
                failures.setdefault(f"one study at a time, {row['executor']}", []).append(row["error"])
    out["failures"] = failures
    return out


def _paired(runs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The overhead of mode ``name`` against the local executor round by round: its k-th run that
    succeeded against the local executor's k-th (run next to it: each round runs the two back to
    back), steady s/study and CPU-s/study, and the medians of those ratios."""
    ok = [r for r in runs if "error" not in r and r["steady_per_hour"]]
    pairs = list(
        zip([r for r in ok if r["mode"] == LOCAL], [r for r in ok if r["mode"] == name], strict=False)
    )
    if not pairs:
        return {}
    wall = [local["steady_per_hour"] / run["steady_per_hour"] - 1 for local, run in pairs]
    cpu = [run["cpu_s_per_study"] / local["cpu_s_per_study"] - 1 for local, run in pairs]
    return {
        "pairs_steady_s_per_study": [round(v, 4) for v in wall],
        "pairs_cpu_s_per_study": [round(v, 4) for v in cpu],
        "pairs_median_steady_s_per_study": round(_med(wall), 4),
        "pairs_median_cpu_s_per_study": round(_med(cpu), 4),
    }


def _mode_figures(mine: list[dict[str, Any]]) -> dict[str, Any]:
    n = mine[0]["studies"]
    task_s = [s for r in mine for s in r.get("task_s", [])]
    steady = _med([r["steady_per_hour"] or 0.0 for r in mine])
    return {
        "per_hour": round(_med([r["per_hour"] for r in mine]), 1),
        "steady_per_hour": round(steady, 1),
        "steady_s_per_study": round(3600 / steady, 3) if steady else None,
        "cpu_s_per_study": round(_med([r["cpu_s_per_study"] for r in mine]), 3),
        "daemon_own_cpu_s_per_study": round(_med([r["daemon_own_cpu_s_per_study"] for r in mine]), 3),
        "cores_busy": round(_med([r["cores_busy"] for r in mine]), 2),
        "idle_cores": round(_med([r["idle_cores"] for r in mine]), 3),
        "first_json_s": round(_med([r["first_json_s"] for r in mine]), 2),
        "startup_s": round(_med([r["startup_s"] for r in mine]), 2),
        "peak_rss_mb": round(_med([r["peak"]["rss_mb"] for r in mine]), 1),
        "task_s_median": round(_med(task_s), 3) if task_s else None,
        "worker_rchar_mb_per_study": round(_med([r["counters"]["rchar"] for r in mine]) / n / 1e6, 2),
        "worker_wchar_mb_per_study": round(_med([r["counters"]["wchar"] for r in mine]) / n / 1e6, 2),
        "step_wall_s": {
            step: round(_med([r["step_wall_s"][step] for r in mine]), 3) for step in mine[0]["step_wall_s"]
        },
        "runs_per_hour": [r["per_hour"] for r in mine],
        "runs_steady_per_hour": [r["steady_per_hour"] for r in mine],
        "loadavg": [r["loadavg"] for r in mine],
    }


SINGLE_KEYS = (
    "wall_s",
    "prepare_s",
    "complete_s",
    "tree_cpu_s",
    "task_s",
    "batch_bytes",
    "done_bytes",
    "done_file_bytes",
    "carried_members",
    "carried_member_bytes",
    "batch_serialize_s",
    "batch_deserialize_s",
    "done_serialize_s",
    "done_deserialize_s",
)


def _single_figures(single: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per executor of the single-study rows (a key over the rows that have it: a failed
    study has its sizes but no times), and each Dask executor's overhead against the local one."""
    by: dict[str, list[dict[str, Any]]] = {}
    for row in single:
        by.setdefault(row["executor"], []).append(row)
    out: dict[str, Any] = {}
    for name, rows in by.items():
        out[name] = {
            k: round(_med([r[k] for r in rows if k in r]), 4)
            for k in SINGLE_KEYS
            if any(k in r for r in rows)
        }
        out[name]["n"] = sum("error" not in r for r in rows)
        out[name]["failed"] = len(rows) - out[name]["n"]
    local = out.get(LOCAL)
    if local and "wall_s" in local:
        out["overhead_vs_local"] = {
            name: {
                "wall_s": round(v["wall_s"] / local["wall_s"] - 1, 4),
                "tree_cpu_s": round(v["tree_cpu_s"] / local["tree_cpu_s"] - 1, 4),
            }
            for name, v in out.items()
            if name != LOCAL and "wall_s" in v
        }
    return out


def print_figures(figs: dict[str, Any], say: Callable[[str], None]) -> None:
    say("\nthe real daemon, local executor against Dask (LocalCluster), N studies dropped at once (medians)")
    say(f"  {'mode':<34} {'studies/h':>9} {'steady/h':>9} {'s/study':>8} {'CPU-s/st':>8} {'idle cores':>10} "
        f"{'task s':>7} {'wkr file read MB/st':>19} {'wkr file write MB/st':>20}")  # fmt: skip
    for name, m in figs["modes"].items():
        task = f"{m['task_s_median']:.2f}" if m["task_s_median"] is not None else "–"
        say(
            f"  {name:<34} {m['per_hour']:>9.0f} {m['steady_per_hour']:>9.0f} {m['steady_s_per_study'] or 0:>8.2f} "
            f"{m['cpu_s_per_study']:>8.2f} {m['idle_cores']:>10.3f} {task:>7} "
            f"{m['worker_rchar_mb_per_study']:>19.1f} {m['worker_wchar_mb_per_study']:>20.1f}"
        )
    for name, m in figs["modes"].items():
        walls = ", ".join(f"{step} {seconds:.2f}" for step, seconds in m["step_wall_s"].items())
        say(f"  {name}: daemon process {m['daemon_own_cpu_s_per_study']:.2f} CPU-s/study, {m['cores_busy']:.2f} "
            f"cores busy, peak RSS {m['peak_rss_mb']:.0f} MiB, started in {m['startup_s']:.1f} s; steps: {walls}")  # fmt: skip
    for inputs, o in figs.get("overhead_1_worker", {}).items():
        verdict = "met" if o["steady_s_per_study"] < GOAL_OVERHEAD else "not met"
        say(
            f"  overhead, Dask 1 worker ({inputs}) vs local: steady s/study {o['steady_s_per_study']:+.1%} "
            f"(goal < {GOAL_OVERHEAD:.0%}: {verdict}), CPU-s/study {o['cpu_s_per_study']:+.1%}"
        )
        if "pairs_steady_s_per_study" in o:
            say(
                f"    round by round: s/study {', '.join(f'{v:+.1%}' for v in o['pairs_steady_s_per_study'])} "
                f"(median {o['pairs_median_steady_s_per_study']:+.1%}); CPU-s/study "
                f"{', '.join(f'{v:+.1%}' for v in o['pairs_cpu_s_per_study'])} "
                f"(median {o['pairs_median_cpu_s_per_study']:+.1%})"
            )
    single = figs.get("single_study")
    if single:
        say("\n  one study at a time (claim → recorded, nothing overlapping; medians)")
        for name, v in single.items():
            if name == "overhead_vs_local":
                continue
            line = f"    {name:<14}"
            if "wall_s" in v:
                line += (
                    f" {v['wall_s']:.2f} s (prepare {v['prepare_s']:.2f}, complete {v['complete_s']:.2f}), "
                    f"{v['tree_cpu_s']:.2f} CPU-s"
                )
            if v["failed"]:
                line += f" {v['failed']} of {v['n'] + v['failed']} FAILED"
            if "batch_bytes" in v:
                line += (
                    f"; argument {v['batch_bytes'] / 1e6:.2f} MB ({v['carried_members']:.0f} members carried, "
                    f"serialize {v['batch_serialize_s']:.3f} s + deserialize {v['batch_deserialize_s']:.3f} s)"
                )
            if "done_bytes" in v:
                line += (
                    f", result {v['done_bytes'] / 1e6:.2f} MB (files {v['done_file_bytes'] / 1e6:.2f} MB; "
                    f"{v['done_serialize_s']:.3f} + {v['done_deserialize_s']:.3f} s); task on the worker "
                    f"{v['task_s']:.2f} s"
                )
            say(line)
        for name, o in single.get("overhead_vs_local", {}).items():
            say(f"    overhead {name} vs local: wall {o['wall_s']:+.1%}, CPU {o['tree_cpu_s']:+.1%}")
    malloc = figs.get("malloc_profile")
    if malloc:
        plain, trim = malloc["no MALLOC_ setting"], malloc["MALLOC_TRIM_THRESHOLD_=65536"]
        say(
            f"\n  profile: the steps in a fresh process, {malloc['passes']} passes, CPU-s per study without / with "
            f"Dask's MALLOC_TRIM_THRESHOLD_=65536: "
            + ", ".join(f"{k} {plain['cpu_s'][k]:.2f} / {trim['cpu_s'][k]:.2f}" for k in plain["cpu_s"])
            + f"; all {plain['steps_cpu_s']:.2f} / {trim['steps_cpu_s']:.2f} (×{malloc['trim_vs_none_steps_cpu']:.2f}); "
            f"minor page faults per pass {plain['minor_faults_per_pass']} / {trim['minor_faults_per_pass']}"
        )
    for name, errors in figs.get("failures", {}).items():
        say(f"  FAILED — {name}: {len(errors)}x, e.g. {errors[0][:400]}")


# ---------------------------------------------------------------------------------------------- entry points
def run(
    spec: StudySpec,
    n: int,
    rounds: int,
    repeats: int,
    out: Path,
    say: Callable[[str], None],
    modes: Sequence[Mode] = MODES,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Studies, daemon runs, single-study runs and figures: what ``bench/run.py --dask`` calls.
    A mode that fails is reported in ``figures["failures"]``; the others are measured all the same."""
    zips = daemon_rate.make_studies(spec, max(n, 3 * (repeats + 1)), out, say)
    runs = daemon_runs(zips[:n], modes, rounds, say)
    for r in runs:
        if "error" not in r and r["complete"] != r["studies"]:
            r["error"] = f"not every study ran its weight-free steps: {r['statuses']}"
    single: list[dict[str, Any]] = []
    if repeats:
        say(f"  one study at a time, local / Dask path / Dask bytes, x{repeats} interleaved ...")
        single = single_study(zips, repeats, say)
    say("  profile: the weight-free steps in a process with and without Dask's MALLOC_TRIM_THRESHOLD_ ...")
    malloc = malloc_profile(zips[0], say, passes=3 if repeats > 1 else 1)
    figs = figures(runs, single)
    figs["malloc_profile"] = malloc
    figs["study"] = f"{spec.slices} slices of {spec.size}² (+ scout, 5 mm series), uncompressed ZIP"
    figs["studies"] = n
    figs["rounds"] = rounds
    return figs, runs, single


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="studies of 24 slices of 64², 2 per run (seconds)")
    p.add_argument("--studies", "-k", type=int, help="studies per daemon run (default 10; smoke 2)")
    p.add_argument(
        "--rounds",
        type=int,
        help="rounds: every mode, then the local executor and Dask 1 worker path again, reversed (default 2; smoke 1)",
    )
    p.add_argument("--repeats", type=int, help="single-study runs per executor (default 3; smoke 1)")
    p.add_argument("--json", type=Path, help="write the figures and every run to this file")
    p.add_argument("--out", type=Path, default=OUT, help="cache folder for generated studies")
    args = p.parse_args(argv)

    def say(text: str) -> None:
        print(text, flush=True)

    spec = SMOKE if args.smoke else FULL
    n = args.studies or (2 if args.smoke else STUDIES)
    rounds = args.rounds or (1 if args.smoke else 2)
    repeats = args.repeats if args.repeats is not None else (1 if args.smoke else 3)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    say(f"dask rate — {date} — {os.cpu_count()} cores, load {[round(v, 2) for v in os.getloadavg()]}")
    started = time.perf_counter()
    figs, runs, single = run(spec, n, rounds, repeats, args.out, say)
    print_figures(figs, say)
    say(f"\ndask bench finished in {time.perf_counter() - started:.0f} s")
    if args.json:
        document = {"date": date, "cores": os.cpu_count(), "figures": figs, "runs": runs, "single": single}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 1 if figs["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
