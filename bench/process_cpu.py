"""``python run.py process`` of one ZIP, today's code against issue 18's "today" (commit bc513e6),
side by side in one run (issue 18: ``process`` of the weight-free pipeline ≤ 0.5 × today's CPU).

``python bench/process_cpu.py [--smoke] [--repeat N] [--json FILE]``

Each call is the whole CLI in a child process (``python <tree>/run.py process --config <cfg> <zip>``,
``PYTHONPATH=<tree>``) on a fresh throw-away project (new state database, outbox and log in a
temporary folder): the tree's own ``config/default.yaml`` with its paths changed
(:func:`bench.baseline.project_config`; device as that file says, ``auto`` in both), its shipped
``pipelines/chest-ct.yaml`` and no weights installed, so series selection, HU volume, lung
metrics, key-slice previews and the decision run and the model steps are recorded as skipped.
The two trees alternate ABBA (old, new, new, old, …), ``N`` calls each.

Per call (:func:`bench.baseline.run_child`, ``os.wait4``): CPU = the child's user + system seconds,
its peak RSS (``ru_maxrss``), its wall seconds. Figures: medians per tree and the ratios new ÷ old;
the result JSONs of both trees must agree on the series chosen and the lung metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import baseline  # noqa: E402
from bench.generate import FULL, OUT, SMOKE, ensure_studies  # noqa: E402

GOAL = 0.5  # issue 18: new ÷ today's CPU seconds of a `process` call
OLD, NEW = f"today ({baseline.COMMIT})", "this tree"
LUNG_FIGURES = ("volume_ml", "laa950_percent", "mean_lung_density_hu", "plausible")


def process_once(tree: Path, zip_path: Path) -> dict[str, Any]:
    """One ``process`` call of ``tree`` in a fresh project; its :class:`bench.baseline.Child` figures
    and what its result JSON says (status, series, lung metrics)."""
    with tempfile.TemporaryDirectory(prefix="bench-process-") as tmp:
        root = Path(tmp)
        config = baseline.project_config(tree, root)
        child = baseline.run_child(
            [sys.executable, str(tree / "run.py"), "process", "--config", str(config), str(zip_path)],
            env=baseline.child_env(tree), cwd=root, log=root / "process.log",
        )  # fmt: skip
        results = [
            p for p in (root / "outbox").glob("*/*.json") if p.parent.name not in ("receipts", "reports")
        ]
        if len(results) != 1:
            raise RuntimeError(f"{tree}: {len(results)} result JSONs, expected 1")
        doc = json.loads(results[0].read_text(encoding="utf-8"))
    lungs = doc.get("lungs") or {}
    return {
        **child.as_dict(),
        "status": doc["processing_status"],
        "series_uid": doc["series_uid"],
        "lungs": {k: lungs[k] for k in LUNG_FIGURES if k in lungs},
    }


def measure(
    old_tree: Path, new_tree: Path, zip_path: Path, n: int, say: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """``n`` calls per tree, ABBA (the first of each pair alternates), one pair at a time."""
    trees = {OLD: old_tree, NEW: new_tree}
    runs: dict[str, list[dict[str, Any]]] = {OLD: [], NEW: []}
    for i in range(n):
        for name in (OLD, NEW) if i % 2 == 0 else (NEW, OLD):
            run = process_once(trees[name], zip_path) | {"loadavg": round(os.getloadavg()[0], 2)}
            runs[name].append(run)
            say(
                f"    {name:<18} {run['cpu_s']:6.2f} CPU-s ({run['user_s']:.2f} user + {run['sys_s']:.2f} sys), "
                f"peak RSS {run['peak_rss_mb']:5.0f} MiB, wall {run['wall_s']:5.2f} s, load {run['loadavg']:.2f}"
            )
    return runs


def figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians per tree, new ÷ old ratios, and whether both trees' results agree."""

    def med(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in runs[name]), 3)

    per = {
        name: {key: med(name, key) for key in ("cpu_s", "user_s", "sys_s", "peak_rss_mb", "wall_s")}
        | {"runs_cpu_s": [round(r["cpu_s"], 2) for r in runs[name]], "n": len(runs[name])}
        for name in runs
    }
    old, new = runs[OLD][0], runs[NEW][0]
    shared = set(old["lungs"]) & set(new["lungs"])
    same = (
        old["series_uid"] == new["series_uid"]
        and bool(shared)
        and all(r["lungs"] == runs[name][0]["lungs"] for name in runs for r in runs[name])
        and all(old["lungs"][k] == new["lungs"][k] for k in shared)
    )
    ratio = per[NEW]["cpu_s"] / per[OLD]["cpu_s"]
    return {
        "trees": per,
        "cpu_ratio_new_vs_old": round(ratio, 3),
        "goal": f"≤ {GOAL}",
        "met": ratio <= GOAL,
        "wall_ratio_new_vs_old": round(per[NEW]["wall_s"] / per[OLD]["wall_s"], 3),
        "peak_rss_ratio_new_vs_old": round(per[NEW]["peak_rss_mb"] / per[OLD]["peak_rss_mb"], 3),
        "statuses": {name: sorted({r["status"] for r in runs[name]}) for name in runs},
        "same_series_and_lung_metrics": same,
        "lungs": {name: runs[name][0]["lungs"] for name in runs},
    }


def print_figures(figs: dict[str, Any], say: Callable[[str], None]) -> None:
    say("\n`python run.py process` of one ZIP, whole CLI in a fresh project, weight-free (medians)")
    say(
        f"  {'tree':<18} {'CPU s':>7} {'user':>6} {'sys':>6} {'peak RSS MiB':>13} {'wall s':>7}  runs (CPU s)"
    )
    for name, t in figs["trees"].items():
        say(
            f"  {name:<18} {t['cpu_s']:>7.2f} {t['user_s']:>6.2f} {t['sys_s']:>6.2f} {t['peak_rss_mb']:>13.0f} "
            f"{t['wall_s']:>7.2f}  {t['runs_cpu_s']}"
        )
    verdict = "met" if figs["met"] else "not met"
    say(
        f"  CPU new ÷ today: {figs['cpu_ratio_new_vs_old']:.3f} (goal {figs['goal']}: {verdict}); wall "
        f"{figs['wall_ratio_new_vs_old']:.3f}; peak RSS {figs['peak_rss_ratio_new_vs_old']:.3f}; same series and "
        f"lung metrics: {figs['same_series_and_lung_metrics']}"
    )


def run(zip_path: Path, n: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The baseline worktree (made if missing), the ABBA calls and the figures: what
    ``bench/run.py --baseline`` calls."""
    old_tree = baseline.ensure()
    say(f"  `process` of {zip_path.name}: {OLD} ({old_tree}) and {NEW}, ABBA, {n} each ...")
    runs = measure(old_tree, REPO, zip_path, n, say)
    figs = figures(runs)
    figs["zip"] = str(zip_path)
    figs["runs"] = runs
    return figs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the smoke study (24 slices of 64²), N=1")
    p.add_argument("--repeat", "-n", type=int, help="calls per tree (default 4; smoke 1)")
    p.add_argument("--json", type=Path, help="write the figures and every call to this file")
    p.add_argument("--out", type=Path, default=OUT, help="cache folder for generated studies")
    args = p.parse_args(argv)
    spec = SMOKE if args.smoke else FULL
    n = args.repeat or (1 if args.smoke else 4)

    def say(text: str) -> None:
        print(text, flush=True)

    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    say(f"process CPU — {date} — {os.cpu_count()} cores, load {[round(v, 2) for v in os.getloadavg()]}")
    zip_path = ensure_studies(spec, ("uncompressed",), args.out, say)["uncompressed"]
    figs = run(zip_path, n, say)
    print_figures(figs, say)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"date": date, "cores": os.cpu_count(), "process": figs}
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
