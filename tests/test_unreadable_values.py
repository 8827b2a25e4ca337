"""A value of a header that pydicom cannot convert reads as missing — the series number, the
accession, the patient ID, the gantry tilt — never an internal error of the study, never a batch
lost, and its words never quote the value (found by a reviewer's fuzzing: a PatientID stored as FD
with 4 bytes raised out of ``process_many`` and left every arrival of the batch running)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.errors import BytesLengthException
from pydicom.tag import Tag

from processor.bytesource import Member
from processor.dicom.encoding import plain_cause
from processor.dicom.scan import scan_members
from processor.dicom.volume import _stated_degrees
from tests import dicomgen
from tests.conftest import Project
from tests.test_spine_e2e import db_rows

SECRET = b"QX7Z"  # a patient ID whose 4 bytes do not fit FD: pydicom cannot convert it


def _nested(depth: int) -> bytes:
    """Sequences nested ``depth`` deep, of undefined lengths: pydicom recurses as deep to read them."""
    item, sequence = b"\xfe\xff\x00\xe0\xff\xff\xff\xff", b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"
    item_end, sequence_end = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00", b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    return (item + sequence) * depth + (sequence_end + item_end) * depth


def _with(files: list, tag: int, vr: str, value: bytes) -> list:
    files[0]._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    return files


def _scanned(files: list):  # type: ignore[no-untyped-def]
    members = [
        Member(f"IMG{i}.dcm", len(d), (lambda d=d: d))
        for i, ds in enumerate(files)
        if (d := dicomgen.to_bytes(ds))
    ]
    return scan_members(members).studies[0]


@pytest.mark.filterwarnings("ignore:Invalid value for VR")  # pydicom's own words on IS 'abc'
@pytest.mark.parametrize(
    ("tag", "vr", "value", "number", "patient", "tilt"),
    [
        (0x00200011, "IS", b"abc ", None, "1CT1", 0.0),  # SeriesNumber that is no number
        (0x00200011, "IS", b"1\\2 ", None, "1CT1", 0.0),  # several series numbers: no one number
        (0x00100020, "FD", SECRET, 2, None, 0.0),  # PatientID that pydicom cannot convert
        (0x00181120, "DS", b"abc ", 2, "1CT1", None),  # gantry tilt that is no number
        (0x00181120, "DS", b"nan ", 2, "1CT1", None),  # …or no finite one
        (0x00181120, "DS", b"1\\2 ", 2, "1CT1", None),  # …or several
        (0x00200011, "IS", b"1.5 ", None, "1CT1", 0.0),  # a fractional series number (pydicom holds 1)
        (0x00200011, "DS", b"2.0 ", 2, "1CT1", 0.0),  # …a whole one stored as DS
        (0x00200011, "OB", b"12", None, "1CT1", 0.0),  # bytes are no number
        (0x00181120, "OB", b"12", 2, "1CT1", None),
        (0x00100020, "SQ", _nested(300), 2, None, 0.0),  # pydicom recurses converting it
    ],
    ids=lambda v: v.hex()[:24] if isinstance(v, bytes) else None,
)
def test_a_value_that_cannot_be_read_reads_as_missing(
    tag: int,
    vr: str,
    value: bytes,
    number: int | None,
    patient: str | None,
    tilt: float | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    files = dicomgen.make_series(3)
    files[0].GantryDetectorTilt = "0"
    study = _scanned(_with(files, tag, vr, value))
    series = next(iter(study.series.values()))
    with caplog.at_level(logging.WARNING):
        assert (series.number, study.patient_id, _stated_degrees(series)) == (number, patient, tilt)
    assert series.description == "CHEST" and study.accession == "ACC12345"
    assert SECRET.decode() not in caplog.text


def test_a_text_stored_as_a_broken_sequence_reads_as_missing() -> None:
    """SeriesDescription and PatientID stored as an SQ of defined length whose bytes are no items:
    pydicom raises NotImplementedError when it converts them (a fuzzed case)."""
    # one item holding a sequence delimiter and a PatientID, then a delimiter: what a fuzzed file held
    junk = b"\xfe\xff\x00\xe0\x16\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00\x10\x00 \x00LO\x06\x00HIDDEN"
    junk += b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    files = _with(dicomgen.make_series(3), 0x0008103E, "SQ", junk)
    study = _scanned(_with(files, 0x00100020, "SQ", junk))
    series = next(iter(study.series.values()))
    assert (series.description, study.patient_id, series.number) == ("", None, 2)


def test_a_wrong_length_is_said_without_the_value() -> None:
    exc = BytesLengthException(
        "Expected total bytes to be an even multiple of bytes per value. Instead received b'QX7Z' "
        "with length 4 and struct format 'd' which corresponds to bytes per value of 8. This "
        "occurred while trying to parse (0010,0020) according to VR 'FD'."
    )
    said = plain_cause(exc)
    assert "QX7Z" not in said and "(0010,0020)" in said and "FD" in said


@pytest.mark.parametrize(
    ("vr", "value", "keyed"),
    [
        ("FD", SECRET, False),  # 4 bytes do not fit FD: no patient key
        ("IS", SECRET + b"12", True),  # read as its text; pydicom's own check would have logged it
        ("SQ", _nested(300), False),  # pydicom recurses reading it: no patient key
    ],
    ids=["FD", "IS", "deep-SQ"],
)
def test_a_batch_with_an_unreadable_patient_id_is_processed_to_the_end(
    project: Project, tmp_path: Path, vr: str, value: bytes, keyed: bool
) -> None:
    """The study whose PatientID cannot be read is processed (no patient key); the other study of
    the same ``process`` call too; neither the results nor the log quote the value."""
    bad = dicomgen.write_zip(tmp_path / "bad.zip", _with(dicomgen.make_series(25), 0x00100020, vr, value))
    good = dicomgen.write_zip(tmp_path / "good.zip", dicomgen.make_series(25))
    proc = project.run("process", str(bad), str(good))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    documents = [json.loads(p.read_text()) for p in project.results()]
    assert len(documents) == 2 and all(d["processing_status"] == "Success" for d in documents), documents
    states = sorted(state for (state,) in db_rows(project, "select state from arrivals"))
    assert states == ["done", "done"]
    keys = sorted(bool(key) for (key,) in db_rows(project, "select patient_key from studies"))
    assert keys == sorted([keyed, True]), "no patient key for an ID that cannot be read"
    log = (project.root / "state" / "ctwatch.log").read_text()
    assert keyed or "keyword=PatientID error=" in log
    for text in (log, proc.stdout, proc.stderr, *(json.dumps(d) for d in documents)):
        assert SECRET.decode() not in text
