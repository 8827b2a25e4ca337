"""Studies per hour of the real daemon, CPU worker pool off and on (issue 18, item 7).

``python bench/daemon_rate.py [--smoke] [--studies N] [--baseline] [--workers 0 1 2] [--rounds R] [--json FILE]``

For each ``worker.cpu_workers`` value (default 0 = pool off, the CPU stage in the daemon's prefetch
thread; 1 and 2 pool processes), one daemon (``python run.py run``, a child process) on a fresh
throw-away project: the shipped ``pipelines/chest-ct.yaml`` with no weights installed (its model
steps recorded as skipped: series selection, HU volume, lung metrics, key-slice previews run),
``max_inflight_studies`` 2, reports and status page off, device cpu, quiet period 1 s. Once it is
started and idle, N studies are dropped into its inbox at once (each ZIP moved in; hard links into
the project, so the drop itself costs no copy), and the run ends with the N-th result JSON. The
modes run back to back in one process; with ``--rounds 2`` the second round runs in reverse order.

``--baseline`` adds a first mode: issue 18's "today", the daemon of commit bc513e6 (its own
``run.py`` and ``pipelines/chest-ct.yaml`` from the worktree :func:`bench.baseline.ensure` makes,
``PYTHONPATH`` that tree) with the same settings less ``worker.cpu_workers`` (a key it lacks: its
CPU stage runs in its one prefetch thread), on the same studies; ``rate_vs_baseline`` then gives
each mode's studies/hour ÷ that one's (goal for the pool on 2 cores: ≥ 1.8). ``--workers`` with
no value runs the baseline alone.

The studies: ``bench/generate.py``'s uncompressed study (default 300 slices of 512², a scout and a
5 mm series: 361 DICOM files, 191 MB), relabelled N times with new UIDs (same pixels,
:func:`bench.latency.relabelled`) so each is its own study; cached under ``bench/out/<spec>/daemon/``
(3.6 GB for 20 full-size studies). ``--smoke`` studies (24 slices of 64²) are generated one by one.
Before and after the modes, :mod:`bench.ceiling` measures what a second process gains on the
machine at that moment (``two_process_ceiling``): the most a pool of two can reach.

Figures per run:

* ``per_hour``: N ÷ (last result JSON's mtime − the drop) × 3600 — intake included (the quiet
  period, hashing), the daemon's first study too (it was idle, its imports done);
  ``steady_per_hour``: (N − 1) ÷ (last JSON − first JSON) × 3600, the queue's steady state;
* ``cpu_s_per_study``: user + system CPU of the daemon and all its descendants (pool processes,
  multiprocessing's resource tracker) from ``/proc/<pid>/stat`` between the drop and the last
  JSON, ÷ N (:func:`bench.gpu_daemon.tree_cpu_seconds`); ``startup_cpu_s``: the same from the
  daemon's start to the drop; ``daemon_own_cpu_s_per_study``: the daemon process alone (intake,
  worker, recorder; with the pool, receiving the prepared studies); ``cores_busy``: the tree's CPU
  seconds ÷ wall seconds (2.0 = both cores of a 2-core machine, all the time);
* ``peak_rss_mb`` (MiB): the peak of the summed RSS of that process tree, sampled every 0.1 s
  (:class:`bench.proctree.RssSampler`); ``idle_rss_mb`` the sum just before the drop; ``hu_mb``
  one study's HU volume (int16, slices × rows × columns × 2 bytes); ``peak_rss_over_hu`` = peak ÷
  hu. The pool hands volumes over in /dev/shm files (:mod:`processor.handoff`), in no RSS until
  touched, so ``peak_rss_shm_once_mb`` is the peak of the tree's RSS without shared pages plus the
  system's shared memory above its idle level (each shared page once, mapped or not);
  ``growth_over_hu`` = (that peak − the same when idle) ÷ hu, the memory the studies in flight
  added at the worst moment in HU volumes; ``growth_per_inflight_study_over_hu`` = that ÷
  (``max_inflight_studies`` + 1: the studies prepared ahead plus the one the worker holds).
  The system's shared memory counts whatever other jobs keep in /dev/shm too (another daemon's
  hand-off files while a second bench runs), so ``peak_rss_handoff_once_mb`` counts only this
  daemon's own hand-off files (in /dev/shm under its PID, or mapped by one of its processes, each
  once: :func:`bench.proctree.handoff_kb`), and ``growth_tree_over_hu`` /
  ``growth_tree_per_inflight_study_over_hu`` are the same figures from it (the goal's figure);
  ``peak_pss_mb``: the peak of the summed PSS;
* ``first_json_s``: the drop → the first JSON (an idle daemon: the drop → JSON latency of one study
  with 1 s of quiet, in a queue of N);
* ``step_wall_s``: the median wall seconds of each step in the results (the JSON's ``steps``);
* ``torch_processes``: how many processes of the tree had ``libtorch_cpu`` mapped at the end.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench import baseline, ceiling  # noqa: E402
from bench.generate import (  # noqa: E402
    FULL,
    OUT,
    SMOKE,
    StudySpec,
    ensure_studies,
    study_datasets,
    write_variant,
)
from bench.gpu_daemon import tree_cpu_seconds  # noqa: E402
from bench.proctree import RssSampler, Sample, descendants, mapping  # noqa: E402

WORKERS = (0, 1, 2)  # worker.cpu_workers per mode: 0 = pool off (today's path)
BASELINE = "baseline"  # the mode that runs issue 18's "today" (bench.baseline.COMMIT), not this tree
GENERATE_BELOW = 8 << 20  # pixel bytes under which each study is generated afresh, not relabelled
MAX_INFLIGHT = 2  # worker.max_inflight_studies (the default)
WEIGHT_FREE = ("series", "volume", "lungs", "slices")  # chest-ct.yaml's steps that need no weights
GOAL_RATE = 1.8  # issue 18: daemon studies/hour on 2 cores ≥ 1.8 × today's (pool off)
GOAL_RSS = 2.0  # issue 18: peak RSS per study ≤ 2 × the HU volume's size


def label(workers: int | str | None) -> str:
    if workers in (BASELINE, None):
        return f"today ({baseline.COMMIT})"
    return "pool off" if workers == 0 else f"pool, {workers} process{'es' if workers > 1 else ''}"


# ---------------------------------------------------------------------------------------------- studies
def make_studies(spec: StudySpec, n: int, out: Path, say: Callable[[str], None]) -> list[Path]:
    """N uncompressed study ZIPs of ``spec``, each with its own UIDs (generated once, then cached).

    Small studies (under :data:`GENERATE_BELOW` pixel bytes, e.g. ``--smoke``) are generated one by
    one (each call draws new UIDs); large ones are relabelled copies of one generated study, in
    spawned processes (generating a 300-slice study takes ~20 s, relabelling it ~3 s)."""
    base = ensure_studies(spec, ("uncompressed",), out, say)["uncompressed"]
    folder = base.parent / "daemon"
    paths = [folder / f"study-{i:02d}.zip" for i in range(1, n + 1)]
    missing = [p for p in paths if not p.exists()]
    if missing and spec.pixel_bytes < GENERATE_BELOW:
        for path in missing:
            write_variant(path, study_datasets(spec), "uncompressed", seed=spec.seed)
    elif missing:
        say(f"relabelling {len(missing)} copies of {base} (new UIDs, same pixels) into {folder} ...")
        folder.mkdir(parents=True, exist_ok=True)
        workers = max(1, min(len(missing), os.cpu_count() or 1))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_relabel_copy, [str(base)] * len(missing), [str(p) for p in missing]))
    return paths


def _relabel_copy(source: str, target: str) -> None:
    """One relabelled copy of ``source`` (a worker process; imports torch through bench.engine)."""
    from bench.latency import _members, relabelled

    members = relabelled(_members(Path(source)))
    tmp = Path(target).with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    tmp.replace(target)


# ---------------------------------------------------------------------------------------------- one daemon
def _project(
    root: Path, workers: int | None, max_inflight: int, extra: dict[str, Any] | None = None, tree: Path = REPO
) -> Path:
    """The throw-away project's settings; ``workers`` None: no ``worker.cpu_workers`` key (the baseline)."""
    shutil.copyfile(tree / "pipelines" / "chest-ct.yaml", root / "pipeline.yaml")
    worker = {"max_inflight_studies": max_inflight} | ({} if workers is None else {"cpu_workers": workers})
    (root / "inbox").mkdir()
    settings = {
        "root": ".",
        "inbox": {
            "dirs": ["inbox"],
            "stable_seconds": 1,
            "folder_stable_seconds": 2,
            "scan_interval_seconds": 0.5,
        },
        "outbox": "outbox",
        "state": "state/ctwatch.db",
        "pipeline": "pipeline.yaml",
        "weights": "weights",  # none installed: the model steps are recorded as skipped
        "device": "cpu",
        "status": {"enabled": False},
        "reports": {"enabled": False},
        "disk": {"min_free_gb": 1},
        "worker": worker,
        **(extra or {}),  # e.g. bench/dask_rate.py's executor
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return config


def _stage(zips: Sequence[Path], staging: Path) -> list[Path]:
    """Hard links to the cached ZIPs beside the inbox (a copy across file systems)."""
    staging.mkdir()
    out = []
    for path in zips:
        target = staging / path.name
        try:
            os.link(path, target)
        except OSError:
            shutil.copyfile(path, target)
        out.append(target)
    return out


def _results(outbox: Path) -> list[Path]:
    return sorted(
        p for p in outbox.glob("*/*.json") if p.parent.name not in ("receipts", "reports") and p.is_file()
    )


def _wait(
    predicate: Callable[[], Any], timeout: float, what: str, daemon: subprocess.Popen, log: Path
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited ({daemon.returncode}) before {what}:\n{_tail(log)}")
        time.sleep(0.05)
    raise RuntimeError(f"daemon bench: timed out after {timeout:.0f} s waiting for {what}:\n{_tail(log)}")


FAILED = re.compile(r"^.* arrival\.(failed|quarantined) .*$", re.MULTILINE)


class _NoFailure:
    """Called while waiting: True while no study of the run failed or was set aside (every bench
    study must succeed); RuntimeError with the daemon's line at once otherwise, rather than waiting
    out the timeout. Reads only what the log gained since the last call (whole lines)."""

    def __init__(self, log: Path) -> None:
        self.log, self.offset = log, 0

    def __call__(self) -> bool:
        with self.log.open("rb") as fh:
            fh.seek(self.offset)
            text = fh.read()
        end = text.rfind(b"\n") + 1
        self.offset += end
        found = FAILED.search(text[:end].decode(errors="replace"))
        if found:
            raise RuntimeError(f"daemon bench: a study did not succeed: {found.group(0)}")
        return True


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def own_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of the process itself (all its threads, no children)."""
    text = (Path("/proc") / str(pid) / "stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle(pid: int, timeout: float = 60.0, below: float = 0.01) -> float:
    """Wait until the process tree uses < ``below`` CPU-s over 0.5 s (default 2 % of a core: pool
    processes started and compiled); returns its CPU seconds then."""
    deadline, before = time.monotonic() + timeout, tree_cpu_seconds(pid) or 0.0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = tree_cpu_seconds(pid) or 0.0
        if now - before < below:
            return now
        before = now
    return before


def run_once(
    zips: Sequence[Path],
    workers: int | None,
    max_inflight: int,
    timeout: float,
    extra: dict[str, Any] | None = None,
    counters: Callable[[int], dict[str, float]] | None = None,
    from_log: Callable[[str], dict[str, Any]] | None = None,
    idle_below: float = 0.01,
    idle_window: float = 0.0,
    tree: Path = REPO,
) -> dict[str, Any]:
    """One daemon with ``worker.cpu_workers: workers``; the N studies dropped at once (see the module doc).

    ``extra``: more top-level settings (e.g. ``executor``); ``counters(daemon pid)``: figures read at
    the drop and at the last JSON, their differences kept as ``counters``; ``from_log(log text)``:
    figures taken from the daemon's log at the end, merged into the run; ``idle_below``: the CPU-s
    per 0.5 s under which the started daemon counts as idle (a Dask cluster's heartbeats use more);
    ``idle_window`` > 0: the idle tree's CPU measured over that many seconds before the drop
    (``idle_cores``); ``tree``: the checkout whose daemon runs (``workers`` None for one without
    ``worker.cpu_workers``: :func:`bench.baseline.ensure`'s), with ``PYTHONPATH`` that tree alone."""
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ctwatch-daemon-rate-") as tmp:
        root = Path(tmp)
        config = _project(root, workers, max_inflight, extra, tree)
        staged = _stage(zips, root / "staging")
        log = root / "daemon.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if tree != REPO:
            env = baseline.child_env(tree)
        began = time.time()
        with log.open("a") as sink:
            daemon = subprocess.Popen(
                [sys.executable, str(tree / "run.py"), "run", "--config", str(config)],
                stdout=sink, stderr=subprocess.STDOUT, cwd=root, env=env,
            )  # fmt: skip
        try:
            with RssSampler(daemon.pid) as sampler:
                started = _wait(
                    lambda: re.search(r"daemon\.started(?: .*cpu_workers=(\d+))?", log.read_text(errors="replace")),
                    timeout, "it started", daemon, log,
                )  # fmt: skip
                startup_s = time.time() - began
                cpu0 = _idle(daemon.pid, below=idle_below)
                idle_cores = None
                if idle_window > 0:
                    time.sleep(idle_window)
                    cpu_idle = tree_cpu_seconds(daemon.pid) or 0.0
                    idle_cores, cpu0 = round((cpu_idle - cpu0) / idle_window, 3), cpu_idle
                own0 = own_cpu_seconds(daemon.pid)
                count0 = counters(daemon.pid) if counters else {}
                dropped = time.time()
                for path in staged:
                    os.replace(path, root / "inbox" / path.name)
                outbox, no_failure = root / "outbox", _NoFailure(log)
                _wait(
                    lambda: no_failure() and len(_results(outbox)) >= len(zips),
                    timeout,
                    f"{len(zips)} result JSONs",
                    daemon,
                    log,
                )
                cpu1 = tree_cpu_seconds(daemon.pid) or 0.0
                own1 = own_cpu_seconds(daemon.pid)
                count1 = counters(daemon.pid) if counters else {}
                ended = time.time()
                torch_processes = mapping(descendants(daemon.pid), "libtorch_cpu")
            docs = [(p.stat().st_mtime, json.loads(p.read_text())) for p in _results(outbox)]
            logged = from_log(log.read_text(errors="replace")) if from_log else {}
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
    docs.sort(key=lambda d: d[0])
    wall = docs[-1][0] - dropped
    steps: dict[str, list[float]] = {}
    for _, doc in docs:
        for step in doc.get("steps", []):
            if step.get("status") == "done":  # processor.vocab.StepStatus.DONE; skipped ones are not timed
                steps.setdefault(step["step_id"], []).append(float(step["seconds"]))
    return {
        "mode": BASELINE if workers is None else workers,
        "cpu_workers": workers,
        "pool_processes": int(started.group(1) or 0),
        "max_inflight_studies": max_inflight,
        "studies": len(zips),
        "results": len(docs),
        "statuses": dict(Counter(d["processing_status"] for _, d in docs)),  # Partial: model steps skipped
        "complete": sum(
            set(WEIGHT_FREE) <= {s["step_id"] for s in d["steps"] if s["status"] == "done"} for _, d in docs
        ),
        "wall_s": round(wall, 2),
        "per_hour": round(len(docs) / wall * 3600, 1),
        "first_json_s": round(docs[0][0] - dropped, 2),
        "steady_per_hour": round((len(docs) - 1) / (docs[-1][0] - docs[0][0]) * 3600, 1)
        if len(docs) > 1
        else None,
        "cpu_s": round(cpu1 - cpu0, 2),
        "daemon_own_cpu_s_per_study": round((own1 - own0) / len(docs), 3),
        "cores_busy": round((cpu1 - cpu0) / wall, 2),
        "cpu_s_per_study": round((cpu1 - cpu0) / len(docs), 3),
        "startup_s": round(startup_s, 2),
        "startup_cpu_s": round(cpu0, 2),
        "idle": _idle_memory(sampler.last_before(dropped)),
        "peak": sampler.peak(dropped, ended),
        "sampler_cpu_s": round(sampler.cpu_s, 2),
        "torch_processes": torch_processes,
        "step_wall_s": {k: round(statistics.median(v), 3) for k, v in steps.items()},
        "loadavg": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        **({"counters": {k: count1[k] - count0.get(k, 0.0) for k in count1}} if counters else {}),
        **({"idle_cores": idle_cores} if idle_window > 0 else {}),
        **logged,
    }


# ---------------------------------------------------------------------------------------------- modes
def measure(
    zips: Sequence[Path],
    workers: Sequence[int | str] = WORKERS,
    rounds: int = 1,
    max_inflight: int = MAX_INFLIGHT,
    timeout: float = 900.0,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Every mode once per round, back to back (odd rounds in reverse order); a mode is a
    ``worker.cpu_workers`` value or :data:`BASELINE`."""
    runs = []
    old_tree = baseline.ensure() if BASELINE in workers else None
    for r in range(rounds):
        for w in workers if r % 2 == 0 else list(reversed(workers)):
            say(f"  daemon, {label(w)}: {len(zips)} studies dropped at once ...")
            if w == BASELINE:
                assert old_tree is not None
                run = run_once(zips, None, max_inflight, timeout, tree=old_tree)
            else:
                run = run_once(zips, int(w), max_inflight, timeout)
            say(
                f"    {run['per_hour']:.0f}/h ({run['wall_s']:.1f} s), {run['cpu_s_per_study']:.2f} CPU-s per study, "
                f"peak RSS {run['peak']['rss_mb']:.0f} MB (idle {run['idle']['rss_mb']:.0f}), load {run['loadavg']}"
            )
            runs.append(run)
    return runs


def _idle_memory(sample: Sample | None) -> dict[str, float]:
    """The idle daemon's summed RSS, its RSS without shared memory, and that with its hand-off files (MiB)."""
    if sample is None:
        return {"rss_mb": 0.0, "rss_shm_once_mb": 0.0, "rss_handoff_once_mb": 0.0}
    return {
        "rss_mb": round(sample.rss / 1024, 1),
        "rss_shm_once_mb": round(sample.private / 1024, 1),
        "rss_handoff_once_mb": round((sample.private + sample.handoff) / 1024, 1),
    }


def figures(runs: list[dict[str, Any]], hu_bytes: int) -> dict[str, Any]:
    """Medians per mode over the rounds, the ratios against pool off and the baseline, and the
    memory figures."""
    hu_mb = hu_bytes / 2**20
    modes: dict[str, Any] = {}
    present = {r.get("mode", r["cpu_workers"]) for r in runs}
    order = [BASELINE] * (BASELINE in present) + sorted(m for m in present if m != BASELINE)
    for w in order:
        mine = [r for r in runs if r.get("mode", r["cpu_workers"]) == w]
        peak = statistics.median(r["peak"]["rss_mb"] for r in mine)
        idle = statistics.median(r["idle"]["rss_mb"] for r in mine)
        peak_once = statistics.median(r["peak"]["rss_shm_once_mb"] for r in mine)
        idle_once = statistics.median(r["idle"]["rss_shm_once_mb"] for r in mine)
        growth = peak_once - idle_once
        peak_tree = statistics.median(r["peak"]["rss_handoff_once_mb"] for r in mine)
        growth_tree = peak_tree - statistics.median(r["idle"]["rss_handoff_once_mb"] for r in mine)
        in_flight = mine[0]["max_inflight_studies"] + 1
        modes[label(w)] = {
            "cpu_workers": None if w == BASELINE else w,
            "per_hour": round(statistics.median(r["per_hour"] for r in mine), 1),
            "cpu_s_per_study": round(statistics.median(r["cpu_s_per_study"] for r in mine), 3),
            "first_json_s": round(statistics.median(r["first_json_s"] for r in mine), 2),
            "steady_per_hour": round(statistics.median(r["steady_per_hour"] or 0.0 for r in mine), 1),
            "daemon_own_cpu_s_per_study": round(
                statistics.median(r["daemon_own_cpu_s_per_study"] for r in mine), 3
            ),
            "cores_busy": round(statistics.median(r["cores_busy"] for r in mine), 2),
            "peak_rss_mb": round(peak, 1),
            "idle_rss_mb": round(idle, 1),
            "peak_pss_mb": round(statistics.median(r["peak"]["pss_mb"] for r in mine), 1),
            "peak_rss_over_hu": round(peak / hu_mb, 3),
            "peak_rss_shm_once_mb": round(peak_once, 1),
            "growth_over_hu": round(growth / hu_mb, 3),
            "growth_per_inflight_study_over_hu": round(growth / in_flight / hu_mb, 3),
            "peak_rss_handoff_once_mb": round(peak_tree, 1),
            "growth_tree_over_hu": round(growth_tree / hu_mb, 3),
            "growth_tree_per_inflight_study_over_hu": round(growth_tree / in_flight / hu_mb, 3),
            "runs_per_hour": [r["per_hour"] for r in mine],
            "torch_processes": max(r["torch_processes"] for r in mine),
            "step_wall_s": {
                step: round(statistics.median(r["step_wall_s"][step] for r in mine), 3)
                for step in mine[0]["step_wall_s"]
            },
        }
    out: dict[str, Any] = {"hu_mb": round(hu_mb, 1), "modes": modes}
    off = modes.get(label(0))
    if off:
        out["rate_vs_pool_off"] = {
            k: round(v["per_hour"] / off["per_hour"], 3) for k, v in modes.items() if v["cpu_workers"]
        }
        out["cpu_per_study_vs_pool_off"] = {
            k: round(v["cpu_s_per_study"] / off["cpu_s_per_study"], 3)
            for k, v in modes.items()
            if v["cpu_workers"]
        }
    today = modes.get(label(BASELINE))
    if today:
        others = {k: v for k, v in modes.items() if v["cpu_workers"] is not None}
        out["rate_vs_baseline"] = {k: round(v["per_hour"] / today["per_hour"], 3) for k, v in others.items()}
        out["steady_rate_vs_baseline"] = {
            k: round(v["steady_per_hour"] / today["steady_per_hour"], 3) for k, v in others.items()
        }
        out["cpu_per_study_vs_baseline"] = {
            k: round(v["cpu_s_per_study"] / today["cpu_s_per_study"], 3) for k, v in others.items()
        }
    return out


def print_figures(figs: dict[str, Any], say: Callable[[str], None]) -> None:
    say(
        f"\nthe real daemon, N studies dropped at once (HU volume {figs['hu_mb']:.1f} MiB per study; medians)"
    )
    say(f"  {'mode':<20} {'studies/h':>10} {'CPU-s/study':>12} {'→1st JSON s':>12} {'peak RSS MiB':>12} "
        f"{'idle MiB':>8} {'peak/HU':>8} {'growth/HU':>10} {'per in-flight/HU':>17} {'(own shm)':>10}")  # fmt: skip
    for name, m in figs["modes"].items():
        say(
            f"  {name:<20} {m['per_hour']:>10.0f} {m['cpu_s_per_study']:>12.2f} {m['first_json_s']:>12.2f} "
            f"{m['peak_rss_mb']:>12.0f} {m['idle_rss_mb']:>8.0f} {m['peak_rss_over_hu']:>8.2f} "
            f"{m['growth_over_hu']:>10.2f} {m['growth_per_inflight_study_over_hu']:>17.2f} "
            f"{m['growth_tree_per_inflight_study_over_hu']:>10.2f}"
        )
    for name, m in figs["modes"].items():
        walls = ", ".join(f"{step} {seconds:.2f}" for step, seconds in m["step_wall_s"].items())
        say(
            f"  {name}: steady {m['steady_per_hour']:.0f}/h, {m['cores_busy']:.2f} cores busy, peak RSS with "
            f"shared memory once {m['peak_rss_shm_once_mb']:.0f} MiB (the daemon's own hand-off files once "
            f"{m['peak_rss_handoff_once_mb']:.0f}), PSS {m['peak_pss_mb']:.0f} MiB, daemon process "
            f"{m['daemon_own_cpu_s_per_study']:.2f} CPU-s/study, torch mapped in {m['torch_processes']} process(es); "
            f"median wall s per step: {walls}"
        )
    for name, ratio in figs.get("rate_vs_pool_off", {}).items():
        verdict = "met" if ratio >= GOAL_RATE else "not met"
        say(f"  studies/hour {name} ÷ pool off: {ratio:.2f} (goal ≥ {GOAL_RATE} on 2 cores: {verdict})")
    for name, ratio in figs.get("rate_vs_baseline", {}).items():
        verdict = "met" if ratio >= GOAL_RATE else "not met"
        say(
            f"  studies/hour {name} ÷ {label(BASELINE)}: {ratio:.2f} (goal ≥ {GOAL_RATE} on 2 cores: {verdict}); "
            f"steady {figs['steady_rate_vs_baseline'][name]:.2f}; CPU-s/study "
            f"{figs['cpu_per_study_vs_baseline'][name]:.2f} of today's"
        )
    if "two_process_ceiling" in figs:
        c = figs["two_process_ceiling"]
        say(
            f"  two independent processes gain ×{c['ceiling']:.2f} on this machine now (bench/ceiling.py; "
            f"before {c['before']}, after {c['after']}): the most a pool of two can reach"
        )


def run(
    spec: StudySpec,
    n: int,
    workers: Sequence[int | str],
    rounds: int,
    out: Path,
    say: Callable[[str], None],
    ceiling_pairs: int = 3,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Studies, runs and figures, the two-process ceiling before and after the runs
    (:mod:`bench.ceiling`): what ``bench/run.py --daemon`` calls."""
    zips = make_studies(spec, n, out, say)
    before = ceiling.measure(ceiling_pairs)
    runs = measure(zips, workers, rounds, say=say)
    after = ceiling.measure(ceiling_pairs)
    bad = [(r["mode"], r["statuses"]) for r in runs if r["complete"] != r["studies"]]
    if bad:
        raise RuntimeError(f"daemon bench: not every study ran its weight-free steps (mode, statuses): {bad}")
    figs = figures(runs, spec.pixel_bytes)
    figs["study"] = f"{spec.slices} slices of {spec.size}² (+ scout, 5 mm series), uncompressed ZIP"
    figs["studies"] = n
    figs["rounds"] = rounds
    figs["two_process_ceiling"] = {
        "ceiling": round(statistics.median([*before, *after]), 3),
        "before": before,
        "after": after,
    }
    return figs, runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="3 studies of 24 slices of 64² (seconds)")
    p.add_argument("--studies", "-k", type=int, help="studies per run (default 20; smoke 3)")
    p.add_argument("--slices", type=int, help="slices per study (default 300; smoke 24)")
    p.add_argument(
        "--workers", type=int, nargs="*", default=list(WORKERS), help="cpu_workers per mode (default 0 1 2)"
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help=f"also issue 18's 'today' (commit {baseline.COMMIT}, its own daemon), first in each round",
    )
    p.add_argument("--rounds", type=int, default=1, help="rounds over the modes (the 2nd reversed)")
    p.add_argument("--json", type=Path, help="write the figures and every run to this file")
    p.add_argument("--out", type=Path, default=OUT, help="cache folder for generated studies")
    args = p.parse_args(argv)
    spec = SMOKE if args.smoke else FULL
    if args.slices:
        spec = StudySpec(**{**spec.__dict__, "slices": args.slices})
    n = args.studies or (3 if args.smoke else 20)

    def say(text: str) -> None:
        print(text, flush=True)

    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    say(f"daemon rate — {date} — {os.cpu_count()} cores, load {[round(v, 2) for v in os.getloadavg()]}")
    modes = [BASELINE] * args.baseline + args.workers
    if not modes:
        p.error("no mode: give --baseline or --workers N …")
    figs, runs = run(spec, n, modes, args.rounds, args.out, say, 1 if args.smoke else 3)
    print_figures(figs, say)
    if args.json:
        document = {"date": date, "cores": os.cpu_count(), "figures": figs, "runs": runs}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
