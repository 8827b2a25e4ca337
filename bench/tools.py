"""ctwatch's ingest (ZIP → HU volume) against what a user would pick instead, on the same ZIP,
side by side in one run (issue 18: ahead of dcm2niix + unzip, ahead of SimpleITK by ≥ 2×).

``python bench/tools.py [--smoke] [--repeat N] [--json FILE]``

Every path is a fresh child process, measured alike (:func:`bench.baseline.run_child`,
``os.wait4``: user + system CPU seconds, peak RSS, wall from the spawn to its exit), so each pays
its own process start, interpreter and imports as a user running it would:

* **ctwatch**: ``python bench/tools.py --one ctwatch ZIP`` → :func:`bench.fast.fast_volume` (the
  ZIP read in place, headers scanned, series selected, the chosen series decoded into an int16
  HU volume; torch is not imported);
* **unzip**: ``unzip -q ZIP -d DIR`` (Info-ZIP), what the three below need first;
* **dcm2niix**: ``dcm2niix -f %j -o OUT DIR``, its defaults otherwise (every series of the study
  converted, uncompressed NIfTI (``-z n``), a BIDS JSON sidecar each), as the issue did;
* **SimpleITK**: ``python bench/tools.py --one simpleitk DIR --series UID`` →
  ``ImageSeriesReader.GetGDCMSeriesFileNames`` (the files of the series, sorted by position) +
  ``ImageSeriesReader.Execute`` → ``GetArrayFromImage`` (GDCM applies the rescale);
* **pydicom**: ``python bench/tools.py --one pydicom DIR --series UID``: every file read fully
  with ``pydicom.dcmread``, the series' slices sorted by ImagePositionPatient along the slice
  normal, ``pixel_array * RescaleSlope + RescaleIntercept`` (float64) stacked.

The tools other than ctwatch are told the series ctwatch chose (they would otherwise need a
selection of their own). The Python children also report the CPU seconds of the work alone
(``time.process_time`` around it; interpreter start and the tool's imports excluded, imports
made inside the read included): ``work_cpu_s``.
One round runs unzip first, then the four in an order that alternates each round; ``N`` rounds.

**Identical voxels**: an extra, untimed pass saves each tool's volume of the chosen series and
compares it with ctwatch's voxel for voxel (HU values, dtype aside). dcm2niix's NIfTI-1 is read
with numpy (a 348-byte header: ``dim``, ``datatype``, ``vox_offset``, ``scl_slope``/``scl_inter``;
nibabel is not a dependency); its rows come out reversed (NIfTI's RAS+ against DICOM's LPS rows),
so each array is compared after the flips of its axes that make it match (reported per tool;
none is allowed to transpose).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

GOAL_DCM2NIIX = 1.0  # issue 18: ctwatch ÷ (dcm2niix + unzip) CPU < 1
GOAL_SITK = 0.5  # issue 18: ctwatch ÷ SimpleITK CPU ≤ 0.5 (ahead by ≥ 2×)
PYTHON_TOOLS = ("ctwatch", "simpleitk", "pydicom")
TOOLS = ("ctwatch", "dcm2niix", "simpleitk", "pydicom")


# ---------------------------------------------------------------------------------------------- children
def one(tool: str, source: Path, series: str | None, save: Path | None, report: Path) -> None:
    """One tool's read in this (child) process; the read's CPU and wall seconds (its imports done
    before the clock) to ``report`` (JSON), the volume to ``save`` (.npy) when given."""
    read = _reader(tool, source, series)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    hu, extra = read()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    extra |= {"shape": list(hu.shape), "dtype": str(hu.dtype)}
    if save is not None:
        np.save(save, hu)
    report.write_text(json.dumps({"work_cpu_s": cpu, "work_wall_s": wall, **extra}), encoding="utf-8")


def _reader(tool: str, source: Path, series: str | None) -> Callable[[], tuple[np.ndarray, dict[str, Any]]]:
    """The tool's read as a callable, its modules imported now."""
    if tool == "ctwatch":
        import processor.gcpause  # noqa: F401  (fast_volume's header scan imports it on first use)
        from bench.fast import fast_volume

        def read_ctwatch() -> tuple[np.ndarray, dict[str, Any]]:
            volume = fast_volume(source)
            return volume.hu, {"series_uid": volume.series_uid}

        return read_ctwatch
    if tool == "simpleitk":
        import SimpleITK as sitk

        def read_simpleitk() -> tuple[np.ndarray, dict[str, Any]]:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(source), series, False, True))
            return sitk.GetArrayFromImage(reader.Execute()), {}

        return read_simpleitk
    if tool == "pydicom":
        import pydicom  # noqa: F401

        return lambda: (_pydicom_volume(source, series), {})
    raise ValueError(f"unknown tool {tool!r}")


def _pydicom_volume(folder: Path, series: str | None) -> np.ndarray:
    """Plain pydicom: read every file, keep the series, sort by position, rescale, stack (float64)."""
    import pydicom

    slices = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == series:
            slices.append(ds)
    row, col = np.asarray(slices[0].ImageOrientationPatient, float).reshape(2, 3)
    slices.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, float), np.cross(row, col))))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in slices])


# ---------------------------------------------------------------------------------------------- the parent
def _python_child(
    tool: str, source: Path, series: str | None, work: Path, save: Path | None = None
) -> dict[str, Any]:
    from bench import baseline

    report = work / f"{tool}-report.json"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        tool,
        str(source),
        "--report",
        str(report),
    ]
    argv += ["--series", series] if series else []
    argv += ["--save", str(save)] if save else []
    child = baseline.run_child(argv, env=baseline.child_env(REPO), cwd=work, log=work / f"{tool}.log")
    return child.as_dict() | json.loads(report.read_text(encoding="utf-8"))


def _unzip(zip_path: Path, folder: Path, work: Path) -> dict[str, Any]:
    from bench import baseline

    return baseline.run_child(
        ["unzip", "-q", str(zip_path), "-d", str(folder)], log=work / "unzip.log"
    ).as_dict()


def _dcm2niix(folder: Path, out: Path, work: Path) -> dict[str, Any]:
    from bench import baseline

    out.mkdir()
    argv = ["dcm2niix", "-f", "%j", "-o", str(out), str(folder)]
    return baseline.run_child(argv, log=work / "dcm2niix.log").as_dict() | {
        "files": sorted(p.name for p in out.iterdir())
    }


def available() -> dict[str, bool]:
    """Which of the other tools this machine has (each is skipped when absent)."""
    try:
        import SimpleITK  # noqa: F401

        sitk = True
    except ImportError:
        sitk = False
    return {
        "ctwatch": True,
        "unzip": shutil.which("unzip") is not None,
        "dcm2niix": shutil.which("dcm2niix") is not None and shutil.which("unzip") is not None,
        "simpleitk": sitk and shutil.which("unzip") is not None,
        "pydicom": shutil.which("unzip") is not None,
    }


def read_nifti(path: Path) -> np.ndarray:
    """A NIfTI-1 file's voxels as (z, y, x) with ``scl_slope``/``scl_inter`` applied when set
    (NIfTI-1 standard, nifti1.h: the 348-byte header; little-endian, 3-D, no extensions read).
    Raises ``ValueError`` for anything else."""
    header = path.read_bytes()[:352]
    if int.from_bytes(header[:4], "little") != 348 or header[344:347] != b"n+1":
        raise ValueError(f"{path}: not a little-endian single-file NIfTI-1")
    dim = np.frombuffer(header, "<i2", 8, 40)
    dtypes = {2: "u1", 4: "<i2", 8: "<i4", 16: "<f4", 64: "<f8", 256: "i1", 512: "<u2"}
    code = int(np.frombuffer(header, "<i2", 1, 70)[0])
    vox_offset = int(np.frombuffer(header, "<f4", 1, 108)[0])
    slope, inter = (float(v) for v in np.frombuffer(header, "<f4", 2, 112))
    if dim[0] != 3 or code not in dtypes:
        raise ValueError(f"{path}: {dim[0]}-D or datatype {code}: not read here")
    x, y, z = (int(v) for v in dim[1:4])
    data = np.fromfile(path, dtypes[code], x * y * z, offset=vox_offset).reshape(z, y, x)
    return data * slope + inter if slope not in (0.0, 1.0) or inter != 0.0 else data


def match(reference: np.ndarray, other: np.ndarray) -> str | None:
    """The flips of ``other``'s axes (z, y, x) that make it equal to ``reference`` voxel for voxel
    ("none", or e.g. "y" for rows reversed); None when no flip does."""
    if other.shape != reference.shape:
        return None
    for k in range(4):
        for axes in itertools.combinations(range(3), k):
            if np.array_equal(reference, np.flip(other, axes) if axes else other):
                return "".join("zyx"[a] for a in axes) or "none"
    return None


def verify(zip_path: Path, have: dict[str, bool], say: Callable[[str], None]) -> dict[str, Any]:
    """The untimed pass: ctwatch's volume and series, and each other tool's volume compared with it."""
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
        work = Path(tmp)
        ref = _python_child("ctwatch", zip_path, None, work, work / "ctwatch.npy")
        series = ref["series_uid"]
        reference = np.load(work / "ctwatch.npy")
        out: dict[str, Any] = {"series_uid": series, "shape": ref["shape"], "ctwatch_dtype": ref["dtype"]}
        if not have["unzip"]:
            return out
        _unzip(zip_path, work / "dicom", work)
        volumes: dict[str, Callable[[], np.ndarray]] = {}
        for tool in ("simpleitk", "pydicom"):
            if have[tool]:
                _python_child(tool, work / "dicom", series, work, work / f"{tool}.npy")
                volumes[tool] = lambda tool=tool: np.load(work / f"{tool}.npy")
        if have["dcm2niix"]:
            files = [work / "nifti" / f for f in _dcm2niix(work / "dicom", work / "nifti", work)["files"]]
            chosen = [f for f in files if f.name.startswith(series) and f.suffix == ".nii"]
            out["dcm2niix_files"] = [f.name for f in files]
            if len(chosen) != 1:
                raise RuntimeError(f"dcm2niix: {len(chosen)} NIfTI files for series {series}: {files}")
            volumes["dcm2niix"] = lambda: read_nifti(chosen[0])
        for tool, load in volumes.items():
            volume = load()
            flips = match(reference, volume)
            out[tool] = {"dtype": str(volume.dtype), "identical": flips is not None, "flipped_axes": flips}
            say(
                f"    {tool}: {volume.dtype} {volume.shape}, identical to ctwatch's: {flips is not None} (flips: {flips})"
            )
            del volume
    return out


def measure(
    zip_path: Path, series: str, n: int, have: dict[str, bool], say: Callable[[str], None]
) -> list[dict]:
    """``n`` rounds: unzip, then the tools in an order that alternates each round (ABBA)."""
    rows = []
    tools = [t for t in TOOLS if have[t]]
    for i in range(n):
        with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
            work = Path(tmp)
            row: dict[str, Any] = {"loadavg": round(os.getloadavg()[0], 2)}
            if have["unzip"]:
                row["unzip"] = _unzip(zip_path, work / "dicom", work)
            for tool in tools if i % 2 == 0 else tools[::-1]:
                if tool == "ctwatch":
                    row[tool] = _python_child(tool, zip_path, None, work)
                elif tool == "dcm2niix":
                    row[tool] = _dcm2niix(work / "dicom", work / "nifti", work)
                else:
                    row[tool] = _python_child(tool, work / "dicom", series, work)
            rows.append(row)
        say("    round " + str(i + 1) + ": " + ", ".join(f"{k} {v['cpu_s']:.2f}" for k, v in row.items() if k != "loadavg")
            + f" CPU-s, load {row['loadavg']}")  # fmt: skip
    return rows


def figures(rows: list[dict], checks: dict[str, Any]) -> dict[str, Any]:
    """Medians per tool, the sums with unzip, and the ratios against the goals."""
    per: dict[str, dict[str, Any]] = {}
    for tool in [t for t in ("unzip", *TOOLS) if t in rows[0]]:
        keys = ["cpu_s", "user_s", "sys_s", "peak_rss_mb", "wall_s"] + ["work_cpu_s"] * (tool in PYTHON_TOOLS)
        per[tool] = {k: round(statistics.median(r[tool][k] for r in rows), 3) for k in keys}
        per[tool]["runs_cpu_s"] = [round(r[tool]["cpu_s"], 2) for r in rows]
    out: dict[str, Any] = {"tools": per, "n": len(rows), "identical_voxels": checks}
    ours = per["ctwatch"]["cpu_s"]
    if "dcm2niix" in per:
        both = statistics.median(r["unzip"]["cpu_s"] + r["dcm2niix"]["cpu_s"] for r in rows)
        out["dcm2niix_plus_unzip_cpu_s"] = round(both, 3)
        out["ctwatch_vs_dcm2niix_plus_unzip"] = round(ours / both, 3)
        out["ctwatch_vs_dcm2niix_alone"] = round(ours / per["dcm2niix"]["cpu_s"], 3)
        out["dcm2niix_goal_met"] = ours / both < GOAL_DCM2NIIX
    if "simpleitk" in per:
        out["ctwatch_vs_simpleitk"] = round(ours / per["simpleitk"]["cpu_s"], 3)
        with_unzip = statistics.median(r["unzip"]["cpu_s"] + r["simpleitk"]["cpu_s"] for r in rows)
        out["ctwatch_vs_simpleitk_plus_unzip"] = round(ours / with_unzip, 3)
        out["ctwatch_vs_simpleitk_work_only"] = round(
            per["ctwatch"]["work_cpu_s"] / per["simpleitk"]["work_cpu_s"], 3
        )
        out["simpleitk_goal_met"] = ours / per["simpleitk"]["cpu_s"] <= GOAL_SITK
    if "pydicom" in per:
        out["ctwatch_vs_pydicom"] = round(ours / per["pydicom"]["cpu_s"], 3)
    return out


def print_figures(figs: dict[str, Any], say: Callable[[str], None]) -> None:
    say(f"\ningest, ZIP → HU volume of the chosen series, each tool a fresh process (medians of {figs['n']})")
    say(
        f"  {'tool':<10} {'CPU s':>7} {'user':>6} {'sys':>6} {'work CPU s':>11} {'peak RSS MiB':>13} {'wall s':>7}"
    )
    for tool, t in figs["tools"].items():
        work = f"{t['work_cpu_s']:.2f}" if "work_cpu_s" in t else "–"
        say(f"  {tool:<10} {t['cpu_s']:>7.2f} {t['user_s']:>6.2f} {t['sys_s']:>6.2f} {work:>11} "
            f"{t['peak_rss_mb']:>13.0f} {t['wall_s']:>7.2f}")  # fmt: skip
    checks = figs["identical_voxels"]
    same = {t: (c["identical"], c["flipped_axes"]) for t, c in checks.items() if isinstance(c, dict)}
    say(f"  identical voxels to ctwatch's (flipped axes): {same}")
    if "ctwatch_vs_dcm2niix_plus_unzip" in figs:
        verdict = "met" if figs["dcm2niix_goal_met"] else "not met"
        say(f"  ctwatch ÷ (dcm2niix + unzip) CPU: {figs['ctwatch_vs_dcm2niix_plus_unzip']:.3f} (goal < 1: {verdict}); "
            f"÷ dcm2niix alone {figs['ctwatch_vs_dcm2niix_alone']:.3f}")  # fmt: skip
    if "ctwatch_vs_simpleitk" in figs:
        verdict = "met" if figs["simpleitk_goal_met"] else "not met"
        say(f"  ctwatch ÷ SimpleITK CPU: {figs['ctwatch_vs_simpleitk']:.3f} (goal ≤ {GOAL_SITK}: {verdict}); ÷ (SimpleITK "
            f"+ unzip) {figs['ctwatch_vs_simpleitk_plus_unzip']:.3f}; work alone {figs['ctwatch_vs_simpleitk_work_only']:.3f}")  # fmt: skip
    if "ctwatch_vs_pydicom" in figs:
        say(f"  ctwatch ÷ plain pydicom CPU: {figs['ctwatch_vs_pydicom']:.3f}")


def run(zip_path: Path, n: int, say: Callable[[str], None]) -> dict[str, Any]:
    """The check pass, ``n`` timed rounds and the figures: what ``bench/run.py --tools`` calls."""
    have = available()
    missing = [t for t, ok in have.items() if not ok]
    say(f"  tools on {zip_path.name}: {', '.join(t for t, ok in have.items() if ok)}"
        + (f" (not here, skipped: {', '.join(missing)})" if missing else "") + "; identical voxels first ...")  # fmt: skip
    checks = verify(zip_path, have, say)
    bad = [t for t, c in checks.items() if isinstance(c, dict) and not c["identical"]]
    if bad:
        raise RuntimeError(f"tools bench: {bad} read other voxels than ctwatch: {checks}")
    say(f"  {n} timed rounds ...")
    rows = measure(zip_path, checks["series_uid"], n, have, say)
    figs = figures(rows, checks)
    figs["available"] = have
    figs["versions"] = versions(have)
    figs["rounds"] = rows
    return figs


def versions(have: dict[str, bool]) -> dict[str, str]:
    out = {}
    if have["dcm2niix"]:
        text = subprocess.run(["dcm2niix", "--version"], capture_output=True, text=True).stdout
        out["dcm2niix"] = text.strip().splitlines()[-1] if text.strip() else "?"
    if have["simpleitk"]:
        import SimpleITK

        out["simpleitk"] = SimpleITK.Version_VersionString()
    if have["unzip"]:
        out["unzip"] = subprocess.run(["unzip", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
    import pydicom

    out["pydicom"] = pydicom.__version__
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="the smoke study (24 slices of 64²), N=1")
    p.add_argument("--repeat", "-n", type=int, help="timed rounds (default 3; smoke 1)")
    p.add_argument("--json", type=Path, help="write the figures and every round to this file")
    p.add_argument("--out", type=Path, help="cache folder for generated studies (default bench/out)")
    p.add_argument("--one", choices=PYTHON_TOOLS, help=argparse.SUPPRESS)  # a child: one tool, then exit
    p.add_argument("source", nargs="?", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--series", help=argparse.SUPPRESS)
    p.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        one(args.one, args.source, args.series, args.save, args.report)
        return 0
    from bench.generate import FULL, OUT, SMOKE, ensure_studies

    spec = SMOKE if args.smoke else FULL
    n = args.repeat or (1 if args.smoke else 3)

    def say(text: str) -> None:
        print(text, flush=True)

    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    say(
        f"ingest vs other tools — {date} — {os.cpu_count()} cores, load {[round(v, 2) for v in os.getloadavg()]}"
    )
    zip_path = ensure_studies(spec, ("uncompressed",), args.out or OUT, say)["uncompressed"]
    figs = run(zip_path, n, say)
    print_figures(figs, say)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        document = {"date": date, "cores": os.cpu_count(), "tools": figs}
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
