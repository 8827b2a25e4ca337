"""The field cases on the local executor and on Dask: identical result JSONs, timings aside (issue 19,
"Done when").

``python bench/dask_field_cases.py [--field-cases DIR] [--checkout DIR] [--cases BH-00 BH-05 …]
[--work DIR] [--no-bytes] [--wait S]``

Not part of the test suite, and not runnable from a fresh clone: it reads the handed field cases
(``/work/shared/field-cases``, i.e. ``../shared``: their generators ``BH-xx.py`` and ``runcase.py``'s
``config``, both used by path, never copied here), which a clone does not hold.

For every case, the generator writes the input once (``python BH-xx.py WORK/BH-xx/input``, as
``runcase.py`` does) and the same input then runs in four modes, each on a fresh root of its own
with ``runcase.py``'s scratch config (the checkout's default.yaml and pipeline, device cpu, no
status page, no Excel, a 1 s quiet period):

``process``
    ``python run.py process --config … INPUT…`` — the one-shot command, the local executor
    (exactly what ``runcase.py`` runs);
``daemon``
    ``python run.py --config …`` as a child process, the default (local) executor; the inputs are
    dropped into its inbox (copied beside it, then renamed in), and it is stopped by its PID with
    SIGTERM once every input has its receipt and the outbox stayed unchanged for a moment (BH-05's
    two inputs, a ZIP and a folder with Latin-1 names, each get theirs; the folder after its quiet
    period, 6 s here — no fixed 30 s run as in ``runcase.py``; ``--wait`` caps a run, default 120 s);
``dask``
    the same daemon with ``executor: {dask: {local: {n_workers: 2}}}`` (a LocalCluster inside it,
    inputs read again on the workers by path);
``dask-bytes``
    the same with ``inputs: bytes`` (the coordinator carries the DICOM in the task); ``--no-bytes``
    leaves it out.

Then every result JSON (all ``*.json`` under the outbox but the receipts, by path relative to the
outbox), every receipt (by the arrival's name) and every other file the run wrote (previews…, by
sha256) are compared between modes, with these set aside (:data:`TIMINGS`, :func:`normalise`):

* wall-clock times and durations: ``time_of_processing``, ``finished_at``, ``steps[].seconds``,
  ``source.received_at``, the receipt's ``received_at`` and ``written_at`` (and, written only with
  weights installed or for a late series, ``captioning[].seconds``, ``supersedes.received_at``,
  ``superseded_by.superseded_at``, ``inputs[].received_at``); the report page and its PDF
  (``report.html``, ``report.pdf``: compared by name, and ``report.files[].sha256``), which show
  when the study was analysed and each step's seconds;
* the mode's root folder, which differs by construction: written as ``<ROOT>`` wherever a string
  holds it (the receipt's ``json`` path, missing weights' paths and the skip reasons naming them).

Nothing else is set aside. A difference between ``process`` and ``daemon`` is the daemon's, not
Dask's (e.g. ``source.kind`` ``cli`` / ``inbox``); Dask is held to ``daemon`` key for key, and to
``process`` for every key on which ``daemon`` agrees with ``process``.

Prints one row per case: the receipt outcomes (of ``daemon``), the JSON leaves and other files
compared, the batches Dask workers ran (``dask.done`` in each Dask daemon's log: 0 means the
coordinator alone recorded the case, e.g. a rejected input), then per comparison ``yes`` or
``NO (differing keys)``; below it, runs that failed, receipt outcomes that differ and ERROR lines or
tracebacks in a run's log; then the first differences with both values. Everything, with every
difference, goes to ``WORK/report.json``. Exit status: the number of cases where a Dask mode differs
from ``daemon`` or a run failed. Takes ~8 min on 2 cores (13 cases × 4 runs; a Dask daemon is up
in ~5 s).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent.parent
FIELD_CASES = Path("/work/shared/field-cases")
MODES = ("process", "daemon", "dask", "dask-bytes")
EXECUTORS = {
    "daemon": None,
    "dask": "executor: {dask: {local: {n_workers: 2}}}",
    "dask-bytes": "executor: {dask: {local: {n_workers: 2}, inputs: bytes}}",
}
# (path pattern, why): keys set aside. ``*`` stands for any list index.
TIMINGS = {
    "time_of_processing": "seconds the study took",
    "finished_at": "wall-clock time the result was written",
    "steps[*].seconds": "seconds each step took",
    "source.received_at": "wall-clock time the input arrived",
    "received_at": "receipt: wall-clock time the input arrived",
    "written_at": "receipt: wall-clock time the receipt was written",
    # not written for the field cases as shipped (no weights, no late series); times all the same
    "captioning[*].seconds": "seconds captioning took",
    "supersedes.received_at": "late series: wall-clock time the earlier version arrived",
    "superseded_by.superseded_at": "late series: wall-clock time a new version replaced this one",
    "inputs[*].received_at": "late series: wall-clock time each part arrived",
    "report.files[*].sha256": "the report page shows when the study was analysed and each step's seconds",
}
# Files that show timings (compared by name only): the report page and its PDF.
TIMED_FILES = ("report.html", "report.pdf")
SETTLE_SECONDS = 1.5  # the outbox must stay unchanged this long after the last receipt


def load_runcase(field_cases: Path) -> ModuleType:
    """``runcase.py`` of the field cases, imported by path (its ``config`` writes the scratch config)."""
    spec = importlib.util.spec_from_file_location("field_cases_runcase", field_cases / "runcase.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(runcase: ModuleType, checkout: Path, root: Path, path: Path, executor: str | None) -> None:
    """``runcase.config`` for ``root``, plus the executor line (replacing one if default.yaml has it)."""
    runcase.config(checkout, root, path)
    if executor is None:
        return
    lines = [x for x in path.read_text().splitlines() if not x.startswith("executor:")]
    path.write_text("\n".join([*lines, executor]) + "\n")


def generate(field_cases: Path, case: str, case_dir: Path) -> dict[str, Any]:
    """Run the case's generator as ``runcase.py`` does; its printed expectation (``inputs``…)."""
    gen = subprocess.run(
        [sys.executable, str(field_cases / f"{case}.py"), str(case_dir / "input")],
        capture_output=True,
        text=True,
        check=False,
    )
    if gen.returncode != 0:
        raise RuntimeError(f"{case}: generator failed: {gen.stderr[-2000:]}")
    spec: dict[str, Any] = json.loads(gen.stdout)
    (case_dir / "expect.json").write_text(json.dumps(spec, indent=1))
    return spec


def run_process(runcase: ModuleType, checkout: Path, case_dir: Path, inputs: list[str]) -> dict[str, Any]:
    root = case_dir / "process"
    cfg = case_dir / "process.yaml"
    write_config(runcase, checkout, root, cfg, None)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    started = time.monotonic()
    with open(case_dir / "process.log", "wb") as log:
        rc = subprocess.run(
            [sys.executable, str(checkout / "run.py"), "process", "--config", str(cfg), *inputs],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        ).returncode
    return {"root": root, "rc": rc, "seconds": time.monotonic() - started, "log": case_dir / "process.log"}


def _outbox_state(outbox: Path) -> tuple[int, tuple[tuple[str, int, int], ...]]:
    receipts = outbox / "receipts"
    count = len(list(receipts.glob("*.json"))) if receipts.is_dir() else 0
    files = tuple(
        sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in outbox.rglob("*") if p.is_file())
    )
    return count, files


def run_daemon(
    runcase: ModuleType, checkout: Path, case_dir: Path, mode: str, inputs: list[str], wait: float
) -> dict[str, Any]:
    """Start the daemon, drop ``inputs`` into its inbox, wait for one receipt each (and a quiet
    outbox), stop it by PID with SIGTERM."""
    root = case_dir / mode
    (root / "inbox").mkdir(parents=True)
    staging = root / "staging"
    staging.mkdir()
    cfg = case_dir / f"{mode}.yaml"
    write_config(runcase, checkout, root, cfg, EXECUTORS[mode])
    log_path = case_dir / f"{mode}.log"
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(checkout / "run.py"), "--config", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        timed_out = False
        try:
            for p in inputs:
                src = Path(p)
                dst = staging / src.name
                if src.is_dir():
                    shutil.copytree(src, dst)
                else:
                    shutil.copy2(src, dst)
                os.rename(dst, root / "inbox" / src.name)  # whole at once: no half-copied input
            last, quiet_since = None, time.monotonic()
            while True:
                time.sleep(0.25)
                now = time.monotonic()
                state = _outbox_state(root / "outbox")
                if state != last:
                    last, quiet_since = state, now
                if state[0] >= len(inputs) and now - quiet_since >= SETTLE_SECONDS:
                    break
                if proc.poll() is not None:
                    break
                if now - started > wait:
                    timed_out = True
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    return {
        "root": root,
        "rc": rc,
        "seconds": time.monotonic() - started,
        "timed_out": timed_out,
        "log": log_path,
    }


def normalise(value: Any, root: Path) -> Any:
    """``value`` with the mode's root folder written as ``<ROOT>`` in every string."""
    if isinstance(value, dict):
        return {k: normalise(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, root) for v in value]
    if isinstance(value, str):
        return value.replace(str(root), "<ROOT>")
    return value


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b[0].c": leaf}`` (an empty dict or list is a leaf)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, list) and value:
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def _pattern(key: str) -> str:
    """``steps[3].seconds`` → ``steps[*].seconds``."""
    out, depth = [], 0
    for ch in key:
        if ch == "[":
            depth += 1
            out.append("[*")
        elif ch == "]":
            depth -= 1
            out.append("]")
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def collect(root: Path) -> dict[str, Any]:
    """What a mode wrote: ``result:<path>`` and ``receipt:<name>`` → flattened, normalised JSON
    (timings dropped); ``file:<path>`` → sha256 of every other file in the outbox."""
    outbox = root / "outbox"
    docs: dict[str, Any] = {}
    if not outbox.is_dir():
        return docs
    for p in sorted(outbox.rglob("*")):
        if not p.is_file():
            continue
        rel = os.fsencode(p.relative_to(outbox)).decode("utf-8", "backslashreplace")
        if p.parent == outbox / "receipts" and p.suffix == ".json":
            doc = json.loads(p.read_text())
            key = f"receipt:{doc.get('name')}"
            n = 1
            while key in docs:  # two arrivals of one name: in the order of their receipts
                n += 1
                key = f"receipt:{doc.get('name')}#{n}"
        elif p.suffix == ".json":
            doc = json.loads(p.read_text())
            key = f"result:{rel}"
        else:
            timed = p.name in TIMED_FILES  # compared by name only
            docs[f"file:{rel}"] = "timed" if timed else hashlib.sha256(p.read_bytes()).hexdigest()
            continue
        flat = flatten(normalise(doc, root))
        docs[key] = {k: v for k, v in flat.items() if _pattern(k) not in TIMINGS}
    return docs


def diff(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``doc-key:path`` → (value in a, value in b) for every leaf that differs (``<absent>`` when
    one side lacks it)."""
    out: dict[str, tuple[Any, Any]] = {}
    for doc in sorted(set(a) | set(b)):
        da, db = a.get(doc, "<absent>"), b.get(doc, "<absent>")
        if isinstance(da, dict) and isinstance(db, dict):
            for k in sorted(set(da) | set(db)):
                va, vb = da.get(k, "<absent>"), db.get(k, "<absent>")
                if va != vb:
                    out[f"{doc}:{k}"] = (va, vb)
        elif da != db:
            out[doc] = (
                "<document>" if isinstance(da, dict) else da,
                "<document>" if isinstance(db, dict) else db,
            )
    return out


def short_keys(d: dict[str, Any], limit: int = 4) -> str:
    """``yes``, or ``NO (…)`` with the differing keys as patterns (``steps[*].reason``), a whole
    document or file present on one side only as ``result JSON``, ``receipt`` or ``file <name>``."""
    if not d:
        return "yes"
    pats = set()
    for key in d:
        parts = key.split(":", 2)
        if parts[0] == "file":
            pats.add("file " + Path(parts[1]).name)
        elif len(parts) == 2:
            pats.add({"result": "result JSON", "receipt": "receipt"}.get(parts[0], parts[0]))
        else:
            pats.add(_pattern(parts[2]))
    shown = sorted(pats)
    text = ", ".join(shown[:limit]) + (f", +{len(shown) - limit}" if len(shown) > limit else "")
    return f"NO ({text})"


def compared(docs: dict[str, Any]) -> str:
    """``keys/files``: JSON leaves (results and receipts) and other files a mode wrote."""
    keys = sum(len(v) for v in docs.values() if isinstance(v, dict))
    return f"{keys}/{sum(not isinstance(v, dict) for v in docs.values())}"


def log_faults(path: Path) -> dict[str, int]:
    """ERROR lines and tracebacks in a run's log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return {"errors": text.count(" ERROR "), "tracebacks": text.count("Traceback (most recent call last)")}


def dask_tasks(path: Path) -> int:
    """Batches a Dask worker ran and handed back (``dask.done`` lines in the daemon's log)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return text.count(" dask.done ")


def run_case(
    runcase: ModuleType,
    checkout: Path,
    field_cases: Path,
    case: str,
    work: Path,
    modes: list[str],
    wait: float,
) -> dict[str, Any]:
    case_dir = work / case
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    spec = generate(field_cases, case, case_dir)
    inputs = spec["inputs"]
    runs: dict[str, dict[str, Any]] = {}
    for mode in modes:
        if mode == "process":
            runs[mode] = run_process(runcase, checkout, case_dir, inputs)
        else:
            runs[mode] = run_daemon(runcase, checkout, case_dir, mode, inputs, wait)
        runs[mode]["docs"] = collect(runs[mode]["root"])
        runs[mode]["log_faults"] = log_faults(runs[mode]["log"])
        runs[mode]["dask_tasks"] = dask_tasks(runs[mode]["log"])
        runs[mode]["compared"] = compared(runs[mode]["docs"])
    docs = {m: r["docs"] for m, r in runs.items()}
    outcomes = {
        m: [str(kv.get("outcome")) for doc, kv in sorted(r["docs"].items()) if doc.startswith("receipt:")]
        for m, r in runs.items()
    }
    comparisons: dict[str, dict[str, tuple[Any, Any]]] = {}
    if "process" in docs and "daemon" in docs:
        comparisons["process~daemon"] = diff(docs["process"], docs["daemon"])
    for dask in ("dask", "dask-bytes"):
        if dask not in docs:
            continue
        if "daemon" in docs:
            comparisons[f"daemon~{dask}"] = diff(docs["daemon"], docs[dask])
        if "process" in docs:
            own = diff(docs["process"], docs[dask])
            daemons = comparisons.get("process~daemon", {})
            # keys where the daemon already differs from process are the daemon's, not Dask's
            comparisons[f"process~{dask}"] = {
                k: v for k, v in own.items() if not (k in daemons and daemons[k][1] == v[1])
            }
    failed = [
        m
        for m, r in runs.items()
        if r.get("timed_out") or (m != "process" and r["rc"] not in (0, -signal.SIGTERM)) or not r["docs"]
    ]
    return {
        "case": case,
        "condition": spec.get("condition"),
        "inputs": len(inputs),
        "outcomes": outcomes,
        "runs": {
            m: {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items() if k != "docs"}
            for m, r in runs.items()
        },
        "failed": failed,
        "comparisons": {
            name: {k: [repr(a)[:300], repr(b)[:300]] for k, (a, b) in d.items()}
            for name, d in comparisons.items()
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--field-cases", type=Path, default=FIELD_CASES)
    ap.add_argument(
        "--checkout", type=Path, default=HERE, help="the ctwatch checkout to run (default: this one)"
    )
    ap.add_argument("--cases", nargs="*", help="case ids (default: every BH-xx.py)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a new /tmp/dask-field-cases.*)")
    ap.add_argument("--no-bytes", action="store_true", help="leave out the dask-bytes mode")
    ap.add_argument("--wait", type=float, default=120.0, help="most seconds a daemon run may take")
    a = ap.parse_args()
    field_cases = a.field_cases.resolve()
    runcase = load_runcase(field_cases)
    cases = a.cases or sorted(p.stem for p in field_cases.glob("BH-[0-9][0-9].py"))
    work = (a.work or Path(tempfile.mkdtemp(prefix="dask-field-cases."))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    modes = [m for m in MODES if not (a.no_bytes and m == "dask-bytes")]
    started = time.monotonic()
    report = []
    for case in cases:
        row = run_case(runcase, a.checkout.resolve(), field_cases, case, work, modes, a.wait)
        report.append(row)
        secs = " ".join(f"{m}={row['runs'][m]['seconds']:.0f}s" for m in modes)
        print(f"[{time.monotonic() - started:5.0f}s] {case}: {secs}", file=sys.stderr, flush=True)
    (work / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False))

    names = ["process~daemon", "daemon~dask", "process~dask"] + (
        [] if a.no_bytes else ["daemon~dask-bytes", "process~dask-bytes"]
    )
    print(f"\nset aside as timings: {', '.join(TIMINGS)}; the mode's root written as <ROOT>")
    header = ["case", "receipts", "keys/files", "dask tasks", *names]
    table, notes, bad = [], [], 0
    for row in report:
        comps = row["comparisons"]
        outcomes = ",".join(row["outcomes"].get("daemon") or row["outcomes"].get("process") or ["none"])
        tasks = "/".join(str(row["runs"][m]["dask_tasks"]) for m in modes if m.startswith("dask"))
        table.append(
            [
                row["case"],
                outcomes,
                row["runs"].get("daemon", row["runs"]["process"])["compared"],
                tasks,
                *(short_keys(comps.get(n, {"missing": 1})) for n in names),
            ]
        )
        if row["failed"]:
            notes.append(f"{row['case']}: run failed: {row['failed']}")
        same = {m: row["outcomes"].get(m) for m in modes}
        if len({json.dumps(v) for v in same.values()}) > 1:
            notes.append(f"{row['case']}: receipt outcomes differ: {same}")
        faults = {m: r["log_faults"] for m, r in row["runs"].items() if any(r["log_faults"].values())}
        if faults:
            notes.append(f"{row['case']}: log ERROR lines / tracebacks: {faults}")
        dask_diff = any(comps.get(n) for n in names if n.startswith("daemon~"))
        bad += bool(dask_diff or row["failed"])
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    for r in [header, *table]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for note in notes:
        print("  " + note)
    seen: dict[tuple[str, str], list[Any]] = {}  # (comparison, key pattern) → [cases, example]
    for row in report:
        for name, d in row["comparisons"].items():
            for key, values in d.items():
                pattern = short_keys({key: 1})[4:-1]
                entry = seen.setdefault((name, pattern), [[], (key, values)])
                if row["case"] not in entry[0]:
                    entry[0].append(row["case"])
    for (name, pattern), (cases_, (key, (va, vb))) in sorted(seen.items()):
        print(f"  {name} {pattern}: in {' '.join(cases_)}; e.g. {cases_[0]} {key}: {va} | {vb}")
    print(f"\nreport: {work / 'report.json'}  ({time.monotonic() - started:.0f} s)")
    return bad


if __name__ == "__main__":
    sys.exit(main())
