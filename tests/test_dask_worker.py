"""The Dask worker's side (issue 19, after a hostile review): an unreadable member carried as its
failure (``inputs: bytes``), no input name on the status port when a worker cannot see an input,
no patient images left in scratch by a killed worker, no input bytes carried back in a result, and
a task key of its own for each claim.

Real daemons (``python run.py``) with real LocalClusters of worker processes, real ZIPs of real
DICOM, real HTTP on 127.0.0.1; one in-process LocalCluster runs a real batch for the size of its
result.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import sqlite3
import urllib.error
import urllib.request
import zipfile
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from processor.bytesource import ArchiveClosed, _Carried, carried
from processor.dask_batch import Batch, Done, batch_key
from processor.intake.archive import Limits, open_arrival
from processor.state.arrival import Arrival
from processor.vocab import ArrivalState
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, to_bytes, write_zip
from tests.test_archive import _stored_zip_with_flipped_last_byte
from tests.test_cpu_pool import STEPS, _comparable, _drop, _stop
from tests.test_dask_executor import _dask_project, _started

UID = "1.2.826.0.1.3680043.10.543.{}"
BAD = "DICOM/IMG0005.dcm"


def _corrupt_zip(path: Path, innocent: bool = False) -> Path:
    """A STORED ZIP of 20 slices of 256×256 (128 KiB of pixels each: the scan reads only a header
    prefix of 64 KiB) whose member :data:`BAD` has its last pixel byte flipped (a bad CRC-32); with
    ``innocent``, a second study of 30 sound slices beside it (``OTHER/``)."""
    stored = np.full((20, 256, 256), 24, np.int16)
    datasets = make_series(20, stored=stored, study_uid=UID.format(90))
    entries = [(f"DICOM/IMG{i + 1:04d}.dcm", to_bytes(ds)) for i, ds in enumerate(datasets)]
    if innocent:
        others = make_series(30, study_uid=UID.format(91))
        entries += [(f"OTHER/IMG{i + 1:04d}.dcm", to_bytes(ds)) for i, ds in enumerate(others)]
    path.parent.mkdir(parents=True, exist_ok=True)
    return _stored_zip_with_flipped_last_byte(path, entries, flip=BAD)


# ---------------------------------------------------------------------------------------------- an unreadable member carried
def test_carried_member_that_cannot_be_read_raises_as_the_original(tmp_path: Path) -> None:
    """``carried`` of a member with a bad CRC-32 does not raise: the copy, pickled and unpickled as
    it travels to a worker, raises the original's exception (type and message) at every read."""
    with open_arrival(_corrupt_zip(tmp_path / "crc.zip"), Limits()) as contents:
        members = {m.name: m for m in contents.members}
        with pytest.raises(zipfile.BadZipFile) as original:
            members[BAD].data()
        copy = pickle.loads(pickle.dumps(carried(members[BAD])))
        good = pickle.loads(pickle.dumps(carried(members["DICOM/IMG0001.dcm"])))
        assert bytes(good.data()) == bytes(members["DICOM/IMG0001.dcm"].data())
    assert isinstance(copy, _Carried) and (copy.name, copy.size) == (BAD, members[BAD].size)
    for read in (copy.data, copy.read, lambda: copy.head(copy.size), lambda: copy.head(64), copy.open):
        with pytest.raises(zipfile.BadZipFile) as again:
            read()
        assert type(again.value) is type(original.value) and str(again.value) == str(original.value)


def test_bytes_inputs_record_a_corrupt_member_as_the_local_executor(tmp_path: Path) -> None:
    """``inputs: bytes``: a study with one member whose CRC-32 fails is recorded as the local
    executor records it (the volume step's plain reason, the same result JSON), and the innocent
    study beside it in the same input (the same batch) is a success — not "internal error:
    BadZipFile" for the whole batch."""
    steps = STEPS[:3]  # series, volume, lungs
    zips = [_corrupt_zip(tmp_path / "zips" / "two.zip", innocent=True)]
    runs, receipts = {}, {}
    for kind in ("dask", "local"):
        if kind == "dask":
            project = _dask_project(tmp_path / kind, steps, n_workers=1, inputs="bytes")
        else:
            (tmp_path / kind).mkdir()
            project = Project(tmp_path / kind, steps, reports={"enabled": False})
        proc = project.start()
        try:
            wait_for(lambda p=project: "daemon.started" in p.log_text(), 90, "the daemon to start")
            _drop(project, zips)
            wait_for(lambda p=project: p.receipts(), 120, "the receipt")
        finally:
            _stop(proc)
        runs[kind] = {p.name: _comparable(p, project.root) for p in project.results()}
        [receipts[kind]] = project.receipts()
    assert "internal error" not in json.dumps(receipts["dask"]), receipts["dask"]
    assert receipts["dask"]["outcome"] == receipts["local"]["outcome"]
    bad, good = (f"{UID.format(k)}.json" for k in (90, 91))
    assert runs["dask"].keys() == runs["local"].keys() == {bad, good}
    volume = next(s for s in runs["local"][bad]["steps"] if s["step_id"] == "volume")
    assert f"cannot read {BAD} (Bad CRC-32" in volume["error"] and "corrupt (bad CRC)" in volume["error"]
    assert runs["local"][good]["processing_status"] == "Success", runs["local"][good]
    assert runs["dask"] == runs["local"]


# ---------------------------------------------------------------------------------------------- no input name on the status port
def _get(url: str) -> str:
    """The body of ``url`` whatever its code (``/health`` answers 503 with its reasons)."""
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def test_an_input_a_worker_cannot_see_is_not_named_on_the_status_port(tmp_path: Path) -> None:
    """``path_map`` to a folder the workers do not have: processing pauses with the reason on
    ``/health`` — the arrival's id and the folder looked under, never the input's name (a patient's)
    — and the arrival goes back to the queue uncharged; the full path is in the worker's log only."""
    share = "/nonexistent-ctwatch-share"
    project = _dask_project(tmp_path / "s", STEPS[:1], n_workers=1, path_map={str(tmp_path / "s"): share})
    zips = [write_zip(tmp_path / "zips" / "DOE_JOHN_19500101.zip", make_series(30, study_uid=UID.format(92)))]
    proc = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips)
        base = _base(project)

        def paused() -> str:
            health = _get(f"{base}/health")
            return health if "cannot see the input of arrival 1" in health else ""

        health = wait_for(paused, 60, "the pause on /health")
        assert "where executor.dask.path_map puts it" in str(health), health
        pages = [str(health), _get(f"{base}/status"), _get(f"{base}/"), _get(f"{base}/metrics")]
        assert not [p for p in pages if "DOE_JOHN" in p or share in p], pages
        assert proc.poll() is None
    finally:
        _stop(proc)
    assert re.search(rf"dask\.input_not_found arrival=1 path={share}/\S*DOE_JOHN", project.log_text())
    with sqlite3.connect(project.state_path) as db:
        row = db.execute("select state, attempts, crashes, isolate from arrivals where id = 1").fetchone()
    assert row == ("pending", 0, 0, 0), row
    assert not project.receipts()


def _base(project: Project) -> str:
    port = re.findall(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text())[-1]
    return f"http://127.0.0.1:{port}"


# ---------------------------------------------------------------------------------------------- no images left in scratch
def test_a_killed_worker_leaves_no_patient_images_in_scratch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kill -9 of the worker while its study's key-slice previews (named by StudyInstanceUID) lie
    in its scratch folder: once the study ran again and the daemon stopped, no ctwatch scratch
    folder and no PNG is left in the daemon's TMPDIR (the workers' local directories are there)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    hold = {"id": "hold", "uses": "util.delay", "with": {"seconds": 3}}
    project = _dask_project(tmp_path / "k", [*STEPS[:4], hold], n_workers=1)
    zips = [write_zip(tmp_path / "zips" / "chest.zip", make_series(30, study_uid=UID.format(93)))]
    monkeypatch.setenv("TMPDIR", str(tmp))
    proc = project.start()
    monkeypatch.delenv("TMPDIR")
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 90, "the daemon to start")
        _drop(project, zips)
        wait_for(lambda: list(tmp.rglob("*.png")), 60, "the previews in the worker's scratch")
        ((_, _, pid),) = _started(project)
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: len(project.receipts()) == 1, 120, "the receipt")
        assert len(_started(project)) == 2  # it ran again, on the restarted worker
    finally:
        _stop(proc)
    assert project.receipts()[0]["outcome"] == "accepted"
    assert not list(tmp.rglob("*.png")), sorted(tmp.rglob("*"))
    assert not list(tmp.rglob("ctwatch-*")), sorted(tmp.rglob("*"))


# ---------------------------------------------------------------------------------------------- no DICOM carried back
def test_a_bytes_batch_result_carries_no_dicom_back(tmp_path: Path) -> None:
    """A real batch with ``inputs: bytes`` run by ``run_batch`` on a real (in-process) worker: its
    :class:`Done` pickles to a small fraction of the DICOM it carried there, its members readerless,
    and the coordinator's recorder records it all the same."""
    from distributed import Client, LocalCluster

    from processor.config import load_settings
    from processor.daemon import build
    from processor.dask_batch import PLUGIN
    from processor.dask_worker import CtwatchPlugin, run_batch
    from processor.executor import study_keys

    (tmp_path / "b").mkdir()
    project = Project(tmp_path / "b", STEPS[:4], reports={"enabled": False})
    zip_path = write_zip(tmp_path / "zips" / "chest.zip", make_series(30, study_uid=UID.format(94)))
    settings = load_settings(project.config)
    components = build(settings)
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        resources={"GPU": 1},
        dashboard_address=":0",  # none: Dask's default port, which may be taken
    )
    client = Client(cluster, set_as_default=False)
    try:
        client.register_plugin(CtwatchPlugin(settings, "cpu"), name=PLUGIN)
        local = components.executor(components.state)
        aid = components.intake.accept_in_place(zip_path)
        assert aid is not None
        arrival = components.state.claim(aid)
        assert arrival is not None
        with ExitStack() as stack:
            prepared = local.open_batch([arrival], stack, lambda: False, local.recorder.locate)
            local.attach_paths(prepared, local.reserve_paths(study_keys(prepared)))
            members = [
                i
                for item in prepared.opened
                for s in item.studies
                for r in s.series.values()
                for i in r.instances
            ]
            for instance in members:
                instance.member = carried(instance.member)
            sent = sum(len(pickle.dumps(i.member)) for i in members)
        batch = Batch(prepared, local.pipeline.digest, local.pipeline.text)
        done: Done = client.submit(
            run_batch, pickle.loads(pickle.dumps(batch)), resources={"GPU": 1}
        ).result()
        size = len(pickle.dumps(done))
        back = pickle.loads(pickle.dumps(done))
        assert sent > 30 * 30_000 and size < sent / 5, (size, sent)
        member = next(iter(back.prepared.opened[0].studies[0].series.values())).instances[0].member
        assert not isinstance(member, _Carried)
        with pytest.raises(ArchiveClosed):
            member.data()
        assert local.complete(back.prepared) == [ArrivalState.DONE]
    finally:
        client.close()
        cluster.close()
        components.state.close()
    assert len(project.results()) == 1


# ---------------------------------------------------------------------------------------------- a key per claim
def test_batch_key_differs_for_each_claim_of_the_same_arrivals() -> None:
    """The same arrivals claimed again (after a cancel and a release, which gives the attempt back;
    after a crash) get another key; the same claim, the same key."""
    claimed = "2026-01-01T10:00:00+00:00"
    first = Arrival(
        1, "inbox", "a.zip", "ab" * 32, 10, ArrivalState.RUNNING, "t", attempts=1, claimed_at=claimed
    )
    again = replace(first, claimed_at="2026-01-01T10:00:07+00:00")  # released, claimed again
    crashed = replace(first, crashes=1)
    retried = replace(first, attempts=2)
    keys = {batch_key([a], "digest") for a in (first, again, crashed, retried)}
    assert len(keys) == 4 and all(k.startswith("ctwatch-batch-") for k in keys)
    assert batch_key([first], "digest") == batch_key([replace(first)], "digest")
    assert batch_key([first], "digest") != batch_key([first], "other")
