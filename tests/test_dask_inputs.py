"""A Dask worker's inputs by path (``executor.dask.inputs: path``, :mod:`processor.dask_inputs`):
the coordinator's studies bound again to the reopened ZIP by each member's name, size and CRC-32,
never a second scan; a ZIP changed between the coordinator's read and the worker's never gives
other pixels.

Real ZIPs of real DICOM; the end-to-end test runs the real Dask executor on a real LocalCluster of
one worker process, the input changed on disk just before the batch is submitted.
"""

from __future__ import annotations

import io
import json
import pickle
import sqlite3
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from processor.dicom.scan import scan_members
from processor.intake.archive import Limits, open_arrival
from processor.vocab import ArrivalState
from tests.dicomgen import make_series, to_bytes
from tests.test_cpu_pool import STEPS
from tests.test_dask_executor import _dask_project

UID = "1.2.826.0.1.3680043.10.543.{}"
SLICE = "DICOM/IMG0007.dcm"


def _zip(path: Path, study: int, slices: int = 20) -> Path:
    """A STORED ZIP of ``slices`` slices of 256×256 (128 KiB of pixels each: the coordinator's scan
    reads a 64 KiB header prefix, so it never sees the last pixel bytes)."""
    stored = np.full((slices, 256, 256), 24, np.int16)
    datasets = make_series(slices, stored=stored, study_uid=UID.format(study))
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, ds in enumerate(datasets):
            zf.writestr(f"DICOM/IMG{i + 1:04d}.dcm", to_bytes(ds))
    return path


def _rewritten(path: Path, name: str = SLICE) -> None:
    """Replace ``path`` by a new ZIP of the same members, ``name``'s last pixel byte changed (a
    new, valid CRC-32): the same SOP Instance UIDs, other pixels."""
    with zipfile.ZipFile(path) as zf:
        entries = [(info.filename, zf.read(info)) for info in zf.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for member, data in entries:
            zf.writestr(member, data[:-1] + bytes([data[-1] ^ 0x01]) if member == name else data)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def _flipped_in_place(path: Path, name: str = SLICE) -> None:
    """Flip ``name``'s last pixel byte where it lies in ``path``: the central directory, and the
    CRC-32 it records, unchanged."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(name)
    blob = path.read_bytes()
    end = blob.index(data) + len(data) - 1
    with path.open("r+b") as fh:
        fh.seek(end)
        fh.write(bytes([blob[end] ^ 0x01]))


def _travelled(path: Path) -> list[Any]:
    """The studies the coordinator scans in ``path``, as a worker receives them (pickled: each
    member its name, size and CRC-32, no reader)."""
    with open_arrival(path, Limits()) as contents:
        studies = scan_members(contents.members).studies
        return pickle.loads(pickle.dumps(studies))


def test_rebind_binds_every_member_by_name_size_and_crc(tmp_path: Path) -> None:
    """The same ZIP: every instance bound to the reopened ZIP's member, whose bytes are the file's;
    a ZIP rewritten with one slice's pixels changed (a valid CRC-32, the same SOP Instance UIDs) or
    a member gone: that member named and nothing bound."""
    from processor.dask_inputs import rebind

    path = _zip(tmp_path / "a.zip", 1)
    studies = _travelled(path)
    instances = [i for s in studies for r in s.series.values() for i in r.instances]
    assert len(instances) == 20
    with open_arrival(path, Limits()) as contents, zipfile.ZipFile(path) as zf:
        assert rebind(studies, contents.members) == []
        assert all(bytes(i.member.data()) == zf.read(i.member.name) for i in instances)

    changed = _travelled(path)
    _rewritten(path)
    with open_arrival(path, Limits()) as contents:
        assert rebind(changed, contents.members) == [SLICE]
        members = [i.member for s in changed for r in s.series.values() for i in r.instances]
        assert all(m.span is None for m in members)  # nothing bound: still the readerless copies

    with zipfile.ZipFile(path) as zf:
        kept = [(info.filename, zf.read(info)) for info in zf.infolist() if info.filename != SLICE]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for member, data in kept:
            zf.writestr(member, data)
    with open_arrival(path, Limits()) as contents:
        assert rebind(_travelled(tmp_path / "a.zip") + changed, contents.members) == [SLICE]


def test_a_zip_changed_between_the_coordinator_and_the_worker_gives_no_other_pixels(tmp_path: Path) -> None:
    """The real Dask executor, one LocalCluster worker, inputs by path; each input changed on disk
    after the coordinator read it, just before its batch is submitted. Unchanged: done. Rewritten
    with one slice's pixels changed (the same SOP Instance UIDs, which a second scan would have let
    through): the arrival fails with a plain reason and no result is written. A pixel byte flipped
    in place under an unchanged central directory: the volume step fails on that slice's CRC-32."""
    from processor.config import load_settings
    from processor.daemon import build
    from processor.dask_cluster import DaskCluster
    from processor.executor_dask import DaskExecutor

    changes = {
        "unchanged": lambda p: None,
        "rewritten": _rewritten,
        "flipped": _flipped_in_place,
        "bystander": lambda p: None,  # batched with the next one, as night arrivals are
        "rewritten_beside": _rewritten,
    }
    zips = {kind: _zip(tmp_path / "zips" / f"{kind}.zip", 10 + n) for n, kind in enumerate(changes)}
    by_path = {str(p.resolve()): kind for kind, p in zips.items()}

    class ChangingCluster(DaskCluster):
        """Changes the batch's input on disk, then submits the batch."""

        def submit(self, batch: Any, key: str, packed: bytes | None = None) -> Any:
            for where in batch.inputs.values():
                changes[by_path[where]](Path(where))
            return super().submit(batch, key, packed)

    project = _dask_project(tmp_path / "p", STEPS[:3], n_workers=1)
    settings = load_settings(project.config)
    components = build(settings)
    dask = settings.executor.dask
    assert dask is not None and dask.inputs == "path"
    cluster = ChangingCluster(settings, dask, components.device)
    finals: dict[str, ArrivalState] = {}
    ids: dict[str, int] = {}
    with ExitStack() as stack:
        stack.callback(components.state.close)
        cluster.start()
        stack.callback(cluster.close)
        executor = DaskExecutor(components.executor(components.state), cluster, settings.limits.max_attempts)
        for kind, path in zips.items():
            aid = components.intake.accept_in_place(path)
            assert aid is not None
            ids[kind] = aid
        for kind in ("unchanged", "rewritten", "flipped"):
            claimed = components.state.claim(ids[kind])
            assert claimed is not None
            [finals[kind]] = executor.complete(executor.prepare([claimed]))
        # one batch of two: only the second's input changes; the first is not failed for it
        pair = [components.state.claim(ids["bystander"]), components.state.claim(ids["rewritten_beside"])]
        assert None not in pair
        finals["bystander"], finals["rewritten_beside"] = executor.complete(executor.prepare(pair))
        with sqlite3.connect(project.state_path) as db:
            bystander = db.execute(
                "select state, attempts, error from arrivals where id = ?", [ids["bystander"]]
            ).fetchone()
        again = components.state.claim(ids["bystander"])
        assert again is not None
        [finals["bystander_again"]] = executor.complete(executor.prepare([again]))
    with sqlite3.connect(project.state_path) as db:
        errors = dict(db.execute("select id, error from arrivals").fetchall())
    results = {p.stem: json.loads(p.read_text()) for p in project.results()}

    assert finals["unchanged"] == ArrivalState.DONE, errors
    assert results[UID.format(10)]["processing_status"] == "Success"

    assert finals["rewritten"] == ArrivalState.FAILED, errors
    assert (
        f"the input of arrival {ids['rewritten']} changed after the coordinator read it"
        in errors[ids["rewritten"]]
    )
    assert "1 of its DICOM files are gone or differ" in errors[ids["rewritten"]]
    assert UID.format(11) not in results

    volume = next(s for s in results[UID.format(12)]["steps"] if s["step_id"] == "volume")
    assert f"cannot read {SLICE} (Bad CRC-32" in volume["error"], volume

    assert finals["rewritten_beside"] == ArrivalState.FAILED
    assert f"arrival {ids['rewritten_beside']} changed" in errors[ids["rewritten_beside"]]
    assert finals["bystander"] == ArrivalState.PENDING and bystander == ("pending", 0, None), bystander
    assert finals["bystander_again"] == ArrivalState.DONE and UID.format(13) in results
