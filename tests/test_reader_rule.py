"""One reader rule (issue 13): the scan, the fast pixel view and the pydicom fallback read a file in
the encoding its bytes show, and every reader failure is one plain-words error naming the file.

Truth from outside: every file here is written by pydicom's own writer from known stored values,
in one encoding, under a header that declares the same, another or none; the HU read back must be
exactly the values written — or the file is refused with its cause. Small frames matter: a Pixel
Data view that starts a few bytes off still finds enough bytes in a small file, so only exact
values catch a misread encoding.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    RLELossless,
)

from processor.bytesource import Member
from processor.dicom import encoding
from processor.dicom.encoding import Unreadable, decide, plain_cause, read_file
from processor.dicom.fastheader import facts_from_dataset, facts_of, walk
from processor.dicom.scan import Series, scan_members
from processor.dicom.volume import Volume, load_volume
from processor.errors import StepError
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen
from tests.dicomgen import BIG, DEFLATED, EXPLICIT, IMPLICIT

DECLARED = {
    "honest": "same",
    "none": None,
    "implicit": ImplicitVRLittleEndian,
    "explicit": ExplicitVRLittleEndian,
    "deflated": DeflatedExplicitVRLittleEndian,
    "big-endian": ExplicitVRBigEndian,
}
BODY_SYNTAX = {
    IMPLICIT: ImplicitVRLittleEndian,
    EXPLICIT: ExplicitVRLittleEndian,
    DEFLATED: DeflatedExplicitVRLittleEndian,
    BIG: ExplicitVRBigEndian,
}
ADVICE = ("force=True", "force reading", "Traceback", "pydicom.config")


def _members(blobs: list[bytes]) -> list[Member]:
    return [Member(f"DICOM/IM{i:04d}.dcm", len(b), lambda b=b: b) for i, b in enumerate(blobs)]


def _series(blobs: list[bytes]) -> Series:
    studies = scan_members(_members(blobs)).studies
    assert len(studies) == 1 and len(studies[0].series) == 1
    return next(iter(studies[0].series.values()))


def _load(blobs: list[bytes]) -> Volume:
    return load_volume(_series(blobs), workers=1)


def _refusal(blobs: list[bytes]) -> str:
    with pytest.raises(StepError) as caught:
        _load(blobs)
    message = str(caught.value)
    assert not any(a in message for a in ADVICE), message
    assert "Fix:" in message, message
    return message


# --- read right: every plain body under every declared plain syntax ------------------------------------


@pytest.mark.parametrize("size", [8, 200])  # 8×8: a shifted view would silently fit; 200×200: it would not
@pytest.mark.parametrize("declared", sorted(DECLARED))
@pytest.mark.parametrize("body", [IMPLICIT, EXPLICIT, DEFLATED, BIG])
def test_the_bytes_decide_the_encoding_whatever_the_header_declares(
    body: str, declared: str, size: int
) -> None:
    datasets, hu = dicomgen.small_series(3, size)
    blobs = [dicomgen.encoded_bytes(ds, body=body, declared=DECLARED[declared]) for ds in datasets]
    series = _series(blobs)
    facts = series.instances[0].facts
    assert facts.transfer_syntax == BODY_SYNTAX[body] and facts.implicit == (body == IMPLICIT)
    volume = load_volume(series, workers=1)
    assert np.array_equal(volume.hu, hu)
    assert volume.provenance["transfer_syntaxes"] == [f"{BODY_SYNTAX[body]} ({BODY_SYNTAX[body].name})"]
    assert volume.provenance["decoder"] == ["numpy.frombuffer"]
    # the fast path stays the fast path: a view where the scan found the pixels, no second parse
    assert all((i.pixel_offset is not None) == (body in (IMPLICIT, EXPLICIT)) for i in series.instances)


@pytest.mark.parametrize("meta", [False, True], ids=["bare", "meta-without-preamble"])
@pytest.mark.parametrize("body", [IMPLICIT, EXPLICIT])
def test_files_without_preamble_read_like_any_series_from_a_zip(
    tmp_path: Path, body: str, meta: bool
) -> None:
    """pydicom #316 / #860: no preamble, no 'DICM', perhaps no file meta at all."""
    datasets, hu = dicomgen.small_series(4, 64)
    path = tmp_path / "bare.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, ds in enumerate(datasets):
            zf.writestr(
                f"IM{i}",
                dicomgen.encoded_bytes(
                    ds, body=body, preamble=False, meta=meta, declared="same" if meta else None
                ),
            )
    with open_arrival(path, Limits()) as contents:
        result = scan_members(contents.members)
        assert result.dicom_files == 4 and not result.skipped
        series = next(iter(result.studies[0].series.values()))
        assert series.instances[0].header.SOPInstanceUID == datasets[0].SOPInstanceUID
        volume = load_volume(series, workers=2)
    assert np.array_equal(volume.hu, hu) and volume.provenance["decoder"] == ["numpy.frombuffer"]


def test_a_compressed_syntax_keeps_its_codec_and_takes_the_vr_from_the_bytes() -> None:
    datasets, hu = dicomgen.small_series(3, 16)
    rle = [dicomgen.encode(ds, "rle") for ds in datasets]
    volume = _load([dicomgen.encoded_bytes(ds, body=IMPLICIT, declared=RLELossless) for ds in rle])
    assert np.array_equal(volume.hu, hu) and volume.provenance["transfer_syntaxes"][0].startswith(RLELossless)


def test_raw_pixels_under_a_compressed_syntax_are_read_as_raw() -> None:
    """Encapsulated pixels always have an undefined length: a defined one holds raw pixels."""
    datasets, hu = dicomgen.small_series(3, 16)
    volume = _load([dicomgen.encoded_bytes(ds, body=EXPLICIT, declared=JPEGLSLossless) for ds in datasets])
    assert np.array_equal(volume.hu, hu) and volume.provenance["decoder"] == ["numpy.frombuffer"]


# --- one rule: the lean walker and the pydicom reader decide alike --------------------------------------


@pytest.mark.parametrize("declared", sorted(DECLARED))
@pytest.mark.parametrize("body", [IMPLICIT, EXPLICIT])
def test_walker_and_pydicom_reader_give_the_same_facts_and_offset(body: str, declared: str) -> None:
    datasets, _ = dicomgen.small_series(1, 8)
    data = dicomgen.encoded_bytes(datasets[0], body=body, declared=DECLARED[declared])
    walked = walk(data)
    ds, found, offset = read_file(data, stop_before_pixels=True)
    theirs = facts_from_dataset(ds, transfer_syntax=found.transfer_syntax, implicit=found.implicit)
    assert facts_of(walked) == theirs and walked.pixel_offset == offset is not None
    assert ds.original_encoding == (body == IMPLICIT, True)
    assert theirs.declared_syntax == (
        ""
        if DECLARED[declared] is None
        else BODY_SYNTAX[body]
        if declared == "honest"
        else DECLARED[declared]
    )


def test_the_scan_logs_a_corrected_encoding_once(caplog: pytest.LogCaptureFixture) -> None:
    datasets, _ = dicomgen.small_series(3, 8)
    blobs = [dicomgen.encoded_bytes(ds, body=EXPLICIT, declared=ImplicitVRLittleEndian) for ds in datasets]
    with caplog.at_level(logging.WARNING, logger="processor.dicom.scan"):
        scan_members(_members(blobs))
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scan.encoding")]
    assert notes == [
        "scan.encoding files=3 read='declared Implicit VR Little Endian, read as Explicit VR Little Endian'"
    ]


def test_decide_refuses_bytes_that_are_no_element_in_any_encoding() -> None:
    with pytest.raises(Unreadable, match="does not start with a DICOM element"):
        decide(b"ZZZZZZZZ" * 8, 0, ExplicitVRLittleEndian)
    assert decide(b"", 0, "").transfer_syntax == ImplicitVRLittleEndian  # an empty data set: the convention
    assert encoding.correction("", ImplicitVRLittleEndian, True) is None  # a bare data set is no surprise


# --- refused with the cause: pixel data that is not what the header says --------------------------------


@pytest.mark.parametrize("body", [IMPLICIT, EXPLICIT])
@pytest.mark.parametrize("change", [-2, +64])
def test_a_wrong_pixel_data_length_is_refused_in_plain_words(body: str, change: int) -> None:
    datasets, _ = dicomgen.small_series(3, 8)
    blobs = [dicomgen.encoded_bytes(ds, body=body) for ds in datasets]
    _, length = dicomgen.pixel_length_at(blobs[1])
    blobs[1] = dicomgen.with_pixel_length(blobs[1], length + change)
    message = _refusal(blobs)
    assert message.startswith("cannot read DICOM/IM0001.dcm: its Pixel Data holds")
    assert f"8 × 8 × 1 × 2 = {length} bytes" in message


@pytest.mark.parametrize("body", [IMPLICIT, EXPLICIT, DEFLATED, BIG])
def test_an_image_size_that_disagrees_with_the_pixel_data_is_refused(body: str) -> None:
    datasets, _ = dicomgen.small_series(3, 8)
    for ds in datasets:
        ds.Rows = 9  # the pixels hold 8 rows
    message = _refusal([dicomgen.encoded_bytes(ds, body=body) for ds in datasets])
    assert message.startswith("cannot read DICOM/IM0000.dcm: its Pixel Data holds 128 bytes")
    assert "9 × 8 × 1 × 2 = 144 bytes" in message


@pytest.mark.parametrize("where", ["pixels", "element header"])
@pytest.mark.parametrize("kind", ["implicit", "explicit", "big-endian", "bare"])
def test_a_truncated_pixel_element_is_refused_as_truncated(kind: str, where: str) -> None:
    datasets, _ = dicomgen.small_series(3, 64)
    body = {"implicit": IMPLICIT, "explicit": EXPLICIT, "big-endian": BIG, "bare": IMPLICIT}[kind]
    blobs = [
        dicomgen.encoded_bytes(
            ds,
            body=body,
            preamble=kind != "bare",
            meta=kind != "bare",
            declared=None if kind == "bare" else "same",
        )
        for ds in datasets
    ]
    tag = b"\x7f\xe0\x00\x10" if body == BIG else b"\xe0\x7f\x10\x00"
    at = blobs[2].rindex(tag)
    blobs[2] = blobs[2][: at + (6 if where == "element header" else 100)]
    message = _refusal(blobs)
    assert message.startswith("cannot read DICOM/IM0002.dcm: the file ends") and "truncated" in message


@pytest.mark.parametrize("declared", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_compressed_pixels_under_an_uncompressed_syntax_are_refused(declared: str) -> None:
    datasets, _ = dicomgen.small_series(3, 16)
    body = IMPLICIT if declared == ImplicitVRLittleEndian else EXPLICIT
    blobs = [
        dicomgen.encoded_bytes(dicomgen.encode(ds, "rle"), body=body, declared=declared) for ds in datasets
    ]
    assert "encapsulated (compressed)" in _refusal(blobs)


def test_plain_cause_drops_the_library_advice() -> None:
    from pydicom.errors import InvalidDicomError

    exc = InvalidDicomError(
        "File is missing DICOM File Meta Information header or the 'DICM' prefix is "
        "missing from the header. Use force=True to force reading."
    )
    assert plain_cause(exc) == (
        "File is missing DICOM File Meta Information header or the 'DICM' prefix is missing from the header"
    )
    assert plain_cause(ValueError("")) == "the reader failed (ValueError)"


# --- the user's view: `run.py process` -----------------------------------------------------------------


def test_process_reads_mislabelled_files_and_refuses_a_truncated_one_without_traceback(
    project, tmp_path
) -> None:
    project.write_pipeline(
        [
            {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 3}},
            {"id": "volume", "uses": "ct.volume"},
        ]
    )
    datasets, _ = dicomgen.small_series(4, 8)
    lying = tmp_path / "lying.zip"  # header: Implicit VR; body: Explicit VR (small frames)
    bare = tmp_path / "bare.zip"
    cut = tmp_path / "cut.zip"
    with zipfile.ZipFile(lying, "w") as zf:
        for i, ds in enumerate(datasets):
            zf.writestr(f"IM{i}", dicomgen.encoded_bytes(ds, body=EXPLICIT, declared=ImplicitVRLittleEndian))
    with zipfile.ZipFile(bare, "w") as zf:
        for i, ds in enumerate(dicomgen.small_series(4, 8, seed=5)[0]):
            zf.writestr(
                f"IM{i}", dicomgen.encoded_bytes(ds, body=IMPLICIT, preamble=False, meta=False, declared=None)
            )
    with zipfile.ZipFile(cut, "w") as zf:
        for i, ds in enumerate(dicomgen.small_series(4, 8, seed=6)[0]):
            data = dicomgen.encoded_bytes(ds, body=EXPLICIT)
            zf.writestr(f"IM{i}", data[: data.rindex(b"\xe0\x7f\x10\x00") + 40] if i == 2 else data)
    run = project.run("process", str(lying), str(bare), str(cut))
    output = run.stdout + run.stderr
    assert not any(a in output for a in ADVICE), output[-3000:]
    rows = {Path(line.split("\t")[0]).name: line.split("\t") for line in run.stdout.strip().splitlines()}
    assert rows["lying.zip"][2] == "Success" and rows["bare.zip"][2] == "Success", output[-3000:]
    assert rows["cut.zip"][2] == "Failure"
    error = json.loads(Path(rows["cut.zip"][3]).read_text())["error"]
    assert "cannot read IM2: the file ends" in error and "truncated" in error and "Fix:" in error
    assert "scan.encoding files=4" in run.stderr
