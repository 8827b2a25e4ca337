"""End to end: a study dropped into a running daemon ends up in a real Orthanc with its SR and key
images, by STOW-RS and by C-STORE, through an outage of the destination and a kill -9 of ctwatch.

The SR's lung numbers are checked against the phantom's own truth (voxel counts), not against
ctwatch's JSON alone; every object Orthanc hands back passes dciodvfy.
"""

from __future__ import annotations

import io
import json
import os
import signal
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest

from processor.config import DimseTarget
from processor.delivery.dimse import DimseSender
from processor.errors import SendFailed
from tests import dicomgen
from tests.conftest import Project, stop_child, wait_for
from tests.orthanc import Orthanc
from tests.test_sendback_objects import dciodvfy

PHANTOM_SHAPE = (40, 96, 96)
SLICE_MM, PIXEL_MM = 2.5, 3.5
STEPS = [
    {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
    {"id": "slices", "uses": "render.key_slices", "with": {"count": 3, "windows": ["lung"]}},
]
PHI = {"PatientName": "Doe^Jane^Q", "PatientID": "PID-4417-X", "AccessionNumber": "ACC-998877"}
FAST_RETRY = {"first_seconds": 0.5, "max_seconds": 1}


def _phantom_zip(folder: Path) -> tuple[Path, str, dict]:
    hu, truth = dicomgen.chest_phantom(PHANTOM_SHAPE)
    datasets = dicomgen.make_series(
        PHANTOM_SHAPE[0],
        stored=(hu + 1024).astype(np.int16),
        spacing=SLICE_MM,
        pixel_spacing=PIXEL_MM,
        accession=PHI["AccessionNumber"],
        patient_name=PHI["PatientName"],
    )
    for ds in datasets:
        ds.PatientID = PHI["PatientID"]
    truth["volume_ml"] = truth["lung_voxels"] * SLICE_MM * PIXEL_MM**2 / 1000
    truth["laa950_percent"] = truth["laa_voxels"] / truth["lung_voxels"] * 100
    folder.mkdir(parents=True, exist_ok=True)
    return dicomgen.write_zip(folder / "chest.zip", datasets), str(datasets[0].StudyInstanceUID), truth


def _deliveries(project: Project) -> list[dict]:
    if not project.state_path.exists():
        return []
    conn = sqlite3.connect(project.state_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM deliveries ORDER BY id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _instances(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """Every instance Orthanc holds in the study, read back, by Modality (QIDO-RS, then WADO)."""
    found = orthanc.client.get(f"/dicom-web/studies/{study_uid}/instances")
    if found.status_code == 204 or not found.content:
        return {}
    found.raise_for_status()
    out: dict[str, list[pydicom.Dataset]] = {}
    for row in found.json():
        sop = row["00080018"]["Value"][0]
        ids = orthanc.client.post("/tools/lookup", content=sop).json()
        data = orthanc.client.get(f"/instances/{ids[0]['ID']}/file").content
        ds = pydicom.dcmread(io.BytesIO(data))
        out.setdefault(str(ds.Modality), []).append(ds)
    return out


def _check_sent(project: Project, orthanc: Orthanc, study_uid: str, truth: dict, tmp: Path) -> None:
    """The SR and the three key images are in the study in Orthanc, once each, valid, values intact."""
    held = _instances(orthanc, study_uid)
    assert sorted(held) == ["OT", "SR"] or sorted(held) == ["DOC", "OT", "SR"], sorted(held)
    assert len(held["SR"]) == 1 and len(held["OT"]) == 3
    result = json.loads(project.results()[0].read_text())
    made = {f["sop_instance_uid"] for f in result["report"]["files"] if f["sop_instance_uid"]}
    for modality, datasets in held.items():
        for ds in datasets:
            assert str(ds.SOPInstanceUID) in made
            assert ds.StudyInstanceUID == study_uid
            assert str(ds.PatientName) == PHI["PatientName"] and ds.PatientID == PHI["PatientID"]
            assert ds.AccessionNumber == PHI["AccessionNumber"]
            path = tmp / f"{modality}-{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            dciodvfy(path)  # no Error, no warning but the accepted ones
    import highdicom

    sr = highdicom.sr.Comprehensive3DSR.from_dataset(held["SR"][0])
    numbers = _sr_numbers(sr)
    assert numbers["ml"] == pytest.approx(truth["volume_ml"], rel=0.02)
    assert numbers["%"] == pytest.approx(truth["laa950_percent"], rel=0.02)
    assert numbers["[hnsf'U]"] == pytest.approx(truth["mean_lung_density_hu"], abs=5)
    assert numbers["ml"] == pytest.approx(result["lungs"]["volume_ml"], abs=0.05)
    for sc in held["OT"]:
        assert sc.BurnedInAnnotation == "YES"
        assert [float(v) for v in sc.PixelSpacing] == pytest.approx([PIXEL_MM, PIXEL_MM])


def _sr_numbers(sr: pydicom.Dataset) -> dict[str, float]:
    """UCUM unit → the numeric value of the lung measurements in the SR's content tree."""
    out: dict[str, float] = {}

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "NUM":
                value = item.MeasuredValueSequence[0]
                unit = value.MeasurementUnitsCodeSequence[0].CodeValue
                if unit in ("ml", "mL", "%", "[hnsf'U]") and unit.lower() not in out:
                    out["ml" if unit.lower() == "ml" else unit] = float(value.NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def test_sr_and_key_images_reach_orthanc_by_stow_rs_and_by_c_store(tmp_path: Path) -> None:
    # the C-STORE side knows ctwatch's AE title and takes stores from known modalities only
    only_ctwatch = {
        "DicomAlwaysAllowStore": False,
        "DicomModalities": {"ctwatch": ["CTWATCH", "127.0.0.1", 104]},
    }
    web, dimse = Orthanc(tmp_path / "orthanc-web"), Orthanc(tmp_path / "orthanc-dimse", only_ctwatch)
    proc = None
    try:
        project = Project(
            tmp_path / "ct",
            STEPS,
            destinations=[
                {
                    "name": "pacs-web",
                    "dicomweb": {"url": web.dicomweb},
                    "send": ["sr", "sc", "pdf"],
                    "retry": FAST_RETRY,
                },
                {
                    "name": "pacs-dimse",
                    "dimse": {
                        "host": "127.0.0.1",
                        "port": dimse.dicom_port,
                        "called_aet": "ORTHANC",
                        "calling_aet": "CTWATCH",
                    },
                    "send": ["sr", "sc"],
                    "retry": FAST_RETRY,
                },
            ],
        )
        zip_path, study_uid, truth = _phantom_zip(tmp_path / "drop")
        proc = project.start()
        os.replace(zip_path, project.inbox / "chest.zip")
        rows = wait_for(
            lambda: (
                (r := _deliveries(project)) and all(x["state"] == "sent" for x in r) and len(r) == 2 and r
            ),
            60,
            "both destinations sent",
        )
        assert {r["destination"] for r in rows} == {"pacs-web", "pacs-dimse"}
        _check_sent(project, web, study_uid, truth, tmp_path)
        assert "DOC" in _instances(web, study_uid)  # the Encapsulated PDF, asked of pacs-web only
        _check_sent(project, dimse, study_uid, truth, tmp_path)
        stranger = DimseSender(
            DimseTarget(
                host="127.0.0.1", port=dimse.dicom_port, called_aet="ORTHANC", calling_aet="STRANGER"
            ),
            frozenset({"127.0.0.1"}),
        )
        with pytest.raises(SendFailed, match="check that it knows ctwatch's calling_aet"):
            stranger.send(json.loads(rows[1]["items"])[:1], project.outbox)
    finally:
        if proc is not None:
            stop_child(proc)
        web.stop()
        dimse.stop()


def test_sends_wait_out_an_outage_and_a_kill_9_and_arrive_once(tmp_path: Path) -> None:
    """Orthanc is down when the study is recorded: the sends wait (retries with last_error); ctwatch
    is killed -9 while they wait, and once more right after a send reached Orthanc but before it was
    marked sent; after the restarts every object is in Orthanc exactly once."""
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.stop()
    project = Project(
        tmp_path / "ct",
        STEPS,
        destinations=[
            {"name": "pacs", "dicomweb": {"url": orthanc.dicomweb}, "send": ["sr", "sc"], "retry": FAST_RETRY}
        ],
    )
    zip_path, study_uid, truth = _phantom_zip(tmp_path / "drop")
    proc = project.start()
    try:
        os.replace(zip_path, project.inbox / "chest.zip")
        wait_for(
            lambda: any(r["attempts"] >= 2 and r["last_error"] for r in _deliveries(project)),
            60,
            "a retried send while Orthanc is down",
        )
        (row,) = _deliveries(project)
        assert row["state"] == "pending" and "127.0.0.1" not in row["last_error"].split("://")[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        orthanc.start()
        proc = project.start(env={"CTWATCH_FAULT": "delivery.sent"})
        assert proc.wait(60) == 137  # died after Orthanc stored the objects, before marking them sent
        assert _deliveries(project)[0]["state"] == "pending"
        proc = project.start()
        wait_for(lambda: _deliveries(project)[0]["state"] == "sent", 60, "the send after the restarts")
        _check_sent(project, orthanc, study_uid, truth, tmp_path)
    finally:
        stop_child(proc)
        orthanc.stop()
