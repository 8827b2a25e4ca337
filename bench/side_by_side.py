"""Issue 18's goals that are ratios to other code, measured side by side in one run:
``python bench/run.py --side-by-side`` (or ``--baseline`` / ``--tools`` beside a full run).

* ``process``: this tree's ``python run.py process`` of the ZIP against issue 18's "today"
  (commit bc513e6), ABBA (:mod:`bench.process_cpu`; goal: CPU ≤ 0.5 × today's);
* ingest against unzip + dcm2niix, SimpleITK and plain pydicom (:mod:`bench.tools`; goals:
  ctwatch ÷ (dcm2niix + unzip) < 1, ctwatch ÷ SimpleITK ≤ 0.5);
* the real daemon: today's daemon, then pool off / 1 / 2 processes of this tree on the same
  studies (:mod:`bench.daemon_rate` with its baseline mode; goal: studies/hour ≥ 1.8 × today's
  on 2 cores), the two-process ceiling around them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import daemon_rate, process_cpu, tools
from bench.baseline import COMMIT
from bench.generate import StudySpec


def run(
    zip_path: Path,
    spec: StudySpec,
    n: int,
    *,
    baseline: bool,
    other_tools: bool,
    daemon: int | None,
    daemon_rounds: int,
    out: Path,
    say: Callable[[str], None],
    ceiling_pairs: int = 3,
) -> dict[str, Any]:
    """The sections asked for (``daemon``: studies per run, None = no daemon section; with
    ``baseline`` its first mode is today's daemon); returns their figures and :func:`goals`."""
    figs: dict[str, Any] = {}
    if baseline:
        say(f"[issue 18] `process` of the ZIP, this tree against today ({COMMIT}), ABBA x{n}")
        figs["process"] = process_cpu.run(zip_path, n, say)
    if other_tools:
        say(f"[issue 18] ingest against unzip + dcm2niix, SimpleITK, plain pydicom, x{n}")
        figs["tools"] = tools.run(zip_path, n, say)
    if daemon is not None:
        modes = [daemon_rate.BASELINE] * baseline + list(daemon_rate.WORKERS)
        say(f"[issue 18] the real daemon, {daemon} studies dropped at once: {', '.join(map(daemon_rate.label, modes))}; "
            f"{daemon_rounds} round(s)")  # fmt: skip
        figs["daemon"], figs["daemon_runs"] = daemon_rate.run(
            spec, daemon, modes, daemon_rounds, out, say, ceiling_pairs
        )
    figs["goals"] = goals(figs)
    return figs


def goals(figs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each goal's ratio measured in this run, the goal and whether it is met."""
    out: dict[str, dict[str, Any]] = {}
    if "process" in figs:
        ratio = figs["process"]["cpu_ratio_new_vs_old"]
        out["process_cpu_vs_today"] = _goal(ratio, "≤", process_cpu.GOAL)
    vs_today = figs.get("daemon", {}).get("rate_vs_baseline", {})
    for mode, ratio in vs_today.items():
        key = "daemon_per_hour_vs_today/" + mode
        out[key] = _goal(ratio, "≥", daemon_rate.GOAL_RATE)
    t = figs.get("tools", {})
    if "ctwatch_vs_dcm2niix_plus_unzip" in t:
        out["ingest_vs_dcm2niix_plus_unzip"] = _goal(
            t["ctwatch_vs_dcm2niix_plus_unzip"], "<", tools.GOAL_DCM2NIIX
        )
    if "ctwatch_vs_simpleitk" in t:
        out["ingest_vs_simpleitk"] = _goal(t["ctwatch_vs_simpleitk"], "≤", tools.GOAL_SITK)
    return out


def _goal(ratio: float, sign: str, goal: float) -> dict[str, Any]:
    met = {"≤": ratio <= goal, "<": ratio < goal, "≥": ratio >= goal}[sign]
    return {"ratio": ratio, "goal": f"{sign} {goal}", "met": met}


def print_figures(figs: dict[str, Any], say: Callable[[str], None]) -> None:
    if "process" in figs:
        process_cpu.print_figures(figs["process"], say)
    if "tools" in figs:
        tools.print_figures(figs["tools"], say)
    if "daemon" in figs:
        daemon_rate.print_figures(figs["daemon"], say)
    say("\nissue 18's side-by-side goals, this run")
    for key, g in figs["goals"].items():
        say(f"  {key:<48} {g['ratio']:>7.3f}   goal {g['goal']:<7} {'met' if g['met'] else 'NOT met'}")
