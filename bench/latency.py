"""Drop → JSON latency: seconds from the end of a copy into the inbox to the study's result JSON.

One daemon (``python run.py run``: the real watcher, intake, worker and recorder; weight-free
pipeline, reports and status page off) is started and idle before the first copy; each drop is its
own study (the bench study with new UIDs, :func:`relabelled`), dropped only once the one before it
has its JSON, so only the intake's wait and the processing are measured:

* ``zip, close event`` — the ZIP written in 1 MiB chunks and closed on a local disk: taken when its
  writer closes it and its central directory reads (:mod:`processor.intake.closes`);
* ``zip, quiet period`` — the same copy, its file left open by the writer after the last byte: no
  close event, as on a network share (which sends no events at all), so it is taken after
  ``stable_seconds`` of quiet, found by a scan (every ``stable_seconds / 2`` while something is
  pending, at most ``scan_interval_seconds``); closed once taken;
* ``folder, quiet period`` — the ZIP's members written one by one into a folder: taken after
  ``folder_stable_seconds`` of quiet, once every DICOM file in it reads whole.

The copy ends when its last byte is written (``time.time()`` right after); *taken* is when the entry
has left the inbox (polled every 10 ms), *JSON* the result file's modification time.
"""

from __future__ import annotations

import io
import itertools
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import pydicom
import yaml
from pydicom.uid import generate_uid

from bench.engine import WEIGHT_FREE, scratch
from processor.intake.closes import filesystem_type

REPO = Path(__file__).resolve().parent.parent
MODES = ("zip, close event", "zip, quiet period", "folder, quiet period")
CHUNK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Quiet:
    """The intake's settings for the measurement (seconds)."""

    stable: float
    folder: float
    scan: float


DEFAULTS = Quiet(stable=10, folder=60, scan=5)  # ctwatch's defaults (config/default.yaml)
SMOKE_QUIET = Quiet(stable=1, folder=2, scan=0.5)


@dataclass(frozen=True)
class Latency:
    mode: str
    taken_s: float  # copy end → the entry has left the inbox
    json_s: float  # copy end → the result JSON written
    filesystem: str


def measure(zip_path: Path, quiet: Quiet, repeats: int = 1, timeout: float = 600) -> dict[str, list[Latency]]:
    """Each of :data:`MODES` ``repeats`` times (the quiet-period ones once), into one daemon."""
    members = _members(zip_path)
    counts = {mode: repeats if mode == MODES[0] else 1 for mode in MODES}
    out: dict[str, list[Latency]] = {mode: [] for mode in MODES}
    with scratch("ctwatch-latency-") as root, _daemon(root, quiet, timeout) as log:
        inbox, outbox = root / "inbox", root / "outbox"
        fs = filesystem_type(inbox) or "unknown"
        drops = itertools.count(1)
        for mode, count in counts.items():
            for _ in range(count):
                k = next(drops)
                study = relabelled(members)
                seen = set(_results(outbox))
                if mode.startswith("folder"):
                    target = inbox / f"study-{k}"
                    ended, writer = _copy_folder(target, study), None
                else:
                    target = inbox / f"study-{k}.zip"
                    ended, writer = _copy_zip(target, study, close=mode == MODES[0])
                try:
                    _until(lambda t=target: not t.exists(), timeout, f"{target.name} to be taken", log)
                    taken = time.time()
                finally:
                    if writer is not None:
                        writer.close()
                new = _until(
                    lambda s=seen: sorted(set(_results(outbox)) - s), timeout, "its result JSON", log
                )
                out[mode].append(Latency(mode, taken - ended, new[0].stat().st_mtime - ended, fs))
    return out


def relabelled(members: dict[str, bytes]) -> dict[str, bytes]:
    """The members as another study: new Study, Series and SOP Instance UIDs (pixels untouched), so
    that each drop is a new study, never a duplicate of the one before."""
    study, series = generate_uid(), {}
    out = {}
    for name, data in members.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        out[name] = buffer.getvalue()
    return out


@contextmanager
def _daemon(root: Path, quiet: Quiet, timeout: float) -> Iterator[Path]:
    """A daemon on a fresh project under ``root``, started and idle; yields its log file."""
    config = _project(root, quiet)
    log = root / "daemon.log"
    with log.open("a") as out:
        daemon = subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    try:
        _until(lambda: "daemon.started" in log.read_text(), timeout, "the daemon to start", log)
        yield log
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


def _project(root: Path, quiet: Quiet) -> Path:
    (root / "inbox").mkdir()
    (root / "pipeline.yaml").write_text(
        yaml.safe_dump({"name": "bench-latency", "version": 1, "steps": WEIGHT_FREE})
    )
    settings = {
        "root": ".",
        "inbox": {
            "dirs": ["inbox"],
            "stable_seconds": quiet.stable,
            "folder_stable_seconds": quiet.folder,
            "scan_interval_seconds": quiet.scan,
        },
        "outbox": "outbox",
        "state": "state/ctwatch.db",
        "pipeline": "pipeline.yaml",
        "device": "cpu",
        "status": {"enabled": False},
        "reports": {"enabled": False},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings))
    return config


def _members(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist() if not info.is_dir()}


def _copy_zip(target: Path, members: dict[str, bytes], *, close: bool) -> tuple[float, IO[bytes] | None]:
    """Write the members as a ZIP (STORED), in :data:`CHUNK` pieces; the open file when not ``close``."""
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    view = io.BytesIO(packed.getvalue())
    fh = target.open("wb")
    try:
        while chunk := view.read(CHUNK):
            fh.write(chunk)
        fh.flush()
    except BaseException:
        fh.close()
        raise
    if close:
        fh.close()
        return time.time(), None
    return time.time(), fh


def _copy_folder(target: Path, members: dict[str, bytes]) -> float:
    for name, data in members.items():
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return time.time()


def _results(outbox: Path) -> list[Path]:
    return sorted(
        p for p in outbox.glob("*/*.json") if p.parent.name not in ("receipts", "reports") and p.is_file()
    )


def _until(predicate: Callable[[], T], timeout: float, what: str, log: Path) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    tail = log.read_text()[-3000:] if log.exists() else ""
    raise RuntimeError(f"latency bench: timed out after {timeout:.0f} s waiting for {what}\n{tail}")
