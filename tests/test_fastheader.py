"""The lean header walker reads exactly what pydicom reads, or declines (issue 9, fast ingest).

Every file is read twice: by ``fastheader.walk`` + ``facts_of`` and by pydicom
(``stop_before_pixels``) + ``facts_from_dataset``. Facts and the Pixel Data offset must be equal;
layouts the walker declines must still scan (through pydicom) to the same facts.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from processor.bytesource import Member
from processor.dicom import fastheader
from processor.dicom.fastheader import Declined, Truncated, facts_from_dataset, facts_of, walk
from processor.dicom.scan import read_instance, scan_members
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # odd values on purpose: pydicom warns


def _pydicom_read(data: bytes) -> tuple[fastheader.Facts, int | None]:
    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, stop_before_pixels=True)
    at = fp.tell()
    offset = at if data[at : at + 4] == b"\xe0\x7f\x10\x00" else None
    syntax = str(ds.file_meta.TransferSyntaxUID)
    return facts_from_dataset(ds, transfer_syntax=syntax, implicit=bool(ds.original_encoding[0])), offset


def _both(data: bytes) -> tuple[tuple[fastheader.Facts, int | None], tuple[fastheader.Facts, int | None]]:
    walked = walk(data)
    return (facts_of(walked), walked.pixel_offset), _pydicom_read(data)


def _differences(a: fastheader.Facts, b: fastheader.Facts) -> dict:
    return {
        f.name: (getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(a)
        if getattr(a, f.name) != getattr(b, f.name)
    }


def _member(name: str, data: bytes) -> Member:
    return Member(name, len(data), lambda: data)


def _corpus() -> dict[str, bytes]:
    stored = np.arange(3 * 32 * 32, dtype=np.int16).reshape(3, 32, 32) - 1500
    classic = dicomgen.make_series(3, stored=stored, kernel="B70f\\LUNG", thickness=1.25)
    out = {f"{enc}": dicomgen.to_bytes(dicomgen.encode(classic[0], enc)) for enc in dicomgen.ENCODINGS}
    implicit = copy.deepcopy(classic[1])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out["implicit"] = dicomgen.to_bytes(implicit)
    out["enhanced"] = dicomgen.to_bytes(dicomgen.make_enhanced(classic))
    out["8-bit"] = dicomgen.to_bytes(dicomgen.to_8bit(classic[2]))
    out["scout"] = dicomgen.to_bytes(dicomgen.make_scout(study_uid=classic[0].StudyInstanceUID)[0])
    out["mr"] = dicomgen.to_bytes(dicomgen.make_mr_series(1)[0])
    undefined = copy.deepcopy(classic[0])
    undefined.ReferencedImageSequence = Sequence(
        [
            dicomgen.sequence_item(ReferencedSOPInstanceUID="1.2.3.4"),
            dicomgen.sequence_item(ReferencedSOPInstanceUID="1.2.3.5"),
        ]
    )
    undefined["ReferencedImageSequence"].is_undefined_length = True
    for item in undefined.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = True
    undefined.private_block(0x0029, "CTWATCH NESTED", create=True).add_new(
        0x10, "SQ", [dicomgen.sequence_item(ImagePositionPatient=[9, 9, 9], ImageType=["DERIVED"])]
    )  # wanted tags nested: ignored
    out["undefined-length sequences"] = dicomgen.to_bytes(undefined)
    padded = copy.deepcopy(classic[0])
    padded.ImagePositionPatient = ["-1.5", " 2", "3.25 "]
    padded.ImageType = ["original", "PRIMARY ", "AXIAL"]
    padded.RescaleIntercept = "-1024 "
    padded.AcquisitionNumber = "07"
    padded.TemporalPositionIdentifier = "2"
    out["padded values"] = dicomgen.to_bytes(padded)
    missing = copy.deepcopy(classic[0])
    for keyword in (
        "RescaleSlope",
        "RescaleIntercept",
        "SliceThickness",
        "ConvolutionKernel",
        "InstanceNumber",
    ):
        delattr(missing, keyword)
    missing.PixelSpacing = None
    out["missing values"] = dicomgen.to_bytes(missing)
    return out


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    CORPUS = _corpus()


@pytest.mark.parametrize("kind", sorted(CORPUS))
def test_walker_and_pydicom_agree_on_every_generated_kind(kind: str) -> None:
    mine, theirs = _both(CORPUS[kind])
    assert _differences(mine[0], theirs[0]) == {} and mine[1] == theirs[1]
    facts, offset = mine
    assert offset is not None and facts.sop_uid and facts.rows > 0
    assert facts.enhanced == (kind == "enhanced")


def test_nested_values_never_replace_top_level_ones() -> None:
    facts, _ = _both(CORPUS["undefined-length sequences"])[0]
    assert facts.position == (0.0, 0.0, 0.0) and "DERIVED" not in facts.image_type


def test_padding_and_case_are_read_as_pydicom_reads_them() -> None:
    facts = facts_of(walk(CORPUS["padded values"]))
    assert facts.position == (-1.5, 2.0, 3.25) and facts.intercept == -1024.0
    assert facts.image_type == ("ORIGINAL", "PRIMARY", "AXIAL") and facts.acquisition == "07"
    assert facts.temporal == "2" and facts.kernel == "B70f\\LUNG"


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_layouts_it_cannot_read_exactly_are_declined_and_scanned_by_pydicom(syntax: str) -> None:
    ds = dicomgen.make_series(1)[0]
    ds.file_meta.TransferSyntaxUID = syntax
    if syntax == ExplicitVRBigEndian:
        fresh = Dataset()  # a dataset read from a little-endian file will not be written big endian
        for element in ds:
            if element.keyword != "PixelData":  # pixels are not byte-swapped; the header is what counts
                fresh.add(element)
        fresh.file_meta = ds.file_meta
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, fresh, enforce_file_format=True)
        data = buf.getvalue()
    else:
        data = dicomgen.to_bytes(ds)
    with pytest.raises(Declined):
        walk(data)
    instance = read_instance(_member("x.dcm", data))
    assert instance is not None and instance.facts.sop_uid == ds.SOPInstanceUID
    assert instance.facts == _pydicom_read(data)[0]


def test_files_without_preamble_or_with_odd_values_are_declined() -> None:
    data = CORPUS["native"]
    with pytest.raises(Declined):
        walk(data[132:])  # no preamble: pydicom (force) decides whether it is DICOM at all
    odd = copy.deepcopy(dicomgen.make_series(1)[0])
    odd.ConvolutionKernel = "Bé70"  # non-ASCII in a wanted text value
    odd.SpecificCharacterSet = "ISO_IR 100"
    with pytest.raises(Declined):
        facts_of(walk(dicomgen.to_bytes(odd)))
    assert read_instance(_member("x", dicomgen.to_bytes(odd))).facts.kernel == "Bé70"


def test_a_header_cut_short_is_declined_or_read_without_pixels_never_misread() -> None:
    data = CORPUS["native"]
    full = walk(data)
    outcomes = set()
    for cut in range(0, full.pixel_offset + 4, 7):
        try:
            walked = walk(data[:cut])
        except Declined:  # Truncated included: cut inside an element
            outcomes.add("declined")
            continue
        outcomes.add("read")  # cut between two elements: what was read is right, and no pixels
        assert walked.pixel_offset is None
        assert all(full.values[tag] == value for tag, value in walked.values.items())
    assert outcomes == {"declined", "read"}


def test_a_prefix_without_pixel_data_reads_the_whole_member(tmp_path: Path) -> None:
    ds = dicomgen.make_series(1, stored=np.zeros((1, 300, 300), np.int16))[0]
    ds.private_block(0x0009, "CTWATCH BIG", create=True).add_new(0x10, "OB", bytes(70_000))
    data = dicomgen.to_bytes(ds)
    with pytest.raises(Truncated):  # the prefix ends inside the private element
        walk(data[:65536])
    instance = read_instance(_member("big", data))
    assert instance is not None and instance.pixel_offset is not None and instance.pixel_offset > 65536
    assert instance.facts == _pydicom_read(data)[0]


def test_scan_of_a_zip_keeps_full_headers_for_the_first_file_of_each_series(tmp_path: Path) -> None:
    series = dicomgen.make_series(4)
    path = dicomgen.write_zip(tmp_path / "s.zip", series)
    with open_arrival(path, Limits()) as contents:
        result = scan_members(contents.members)
        only = next(iter(result.studies[0].series.values()))
        assert only.instances[0]._header is not None  # parsed while the ZIP is open
        assert all(i._header is None for i in only.instances[1:])  # the rest on demand only
        assert only.description == "CHEST" and result.studies[0].accession == "ACC12345"
        assert only.instances[2].header.SOPInstanceUID == only.instances[2].sop_uid


def test_an_item_outside_a_sequence_is_left_to_pydicom() -> None:
    """A top-level (FFFE,E000) whose 4-byte length reads 'OB\\0\\0': the walker would take it for a
    length and step over 16975 bytes, pydicom reads a VR and a length of 0, then an InstanceNumber
    the walker never saw (found by a reviewer). The walker declines such a file; its facts are
    pydicom's."""
    ds = dicomgen.make_series(1)[0]
    ds.InstanceNumber = 5
    data = dicomgen.to_bytes(ds)
    at = data.index(b"\x20\x00\x13\x00IS")
    after = at + 8 + struct.unpack_from("<H", data, at + 6)[0]  # the end of the real InstanceNumber
    skipped = struct.unpack("<L", b"OB\0\0")[0]  # what the walker would step over
    body = struct.pack("<L", 0) + struct.pack("<HH2sH", 0x0020, 0x0013, b"IS", 2) + b"77"
    body += struct.pack("<HH2sHL", 0x0009, 0x1002, b"OB", 0, skipped - len(body) - 12)
    body += bytes(skipped - len(body))
    crafted = data[:after] + struct.pack("<HH", 0xFFFE, 0xE000) + b"OB\0\0" + body + data[after:]
    with pytest.raises(Declined, match="outside a sequence"):
        walk(crafted)
    facts, _ = _pydicom_read(crafted)
    assert facts.instance_number == 77
    instance = read_instance(_member("x.dcm", crafted))
    assert instance is not None and instance.facts == facts


# --- random headers -------------------------------------------------------------------------

_ds = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False).map(lambda v: f"{v:.6g}")
_pad = st.sampled_from(["", " ", "  "])
_padded_ds = st.tuples(_pad, _ds, _pad).map("".join).filter(lambda s: len(s) <= 16)
_cs = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ ", min_size=0, max_size=12).map(str.rstrip)
_maybe = st.one_of(st.none(), st.just(""))


class _Case:
    """Bytes of one random file; its repr lists only the drawn elements (hypothesis prints it)."""

    def __init__(self, ds: Dataset, syntax: str) -> None:
        self.data, self.syntax = dicomgen.to_bytes(ds), syntax
        self.text = "\n".join(
            str(e) for e in ds if e.tag.group in (0x0008, 0x0018, 0x0020, 0x0028) or e.tag.is_private
        )

    def __repr__(self) -> str:
        return f"<{self.syntax}\n{self.text}>"


@st.composite
def _header(draw: st.DrawFn) -> _Case:
    ds = dicomgen.make_series(1)[0]
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ds.file_meta.TransferSyntaxUID = syntax
    for keyword, n in (("ImagePositionPatient", 3), ("ImageOrientationPatient", 6), ("PixelSpacing", 2)):
        count = draw(st.sampled_from([n, n, n, 0, n - 1, n + 1]))
        setattr(ds, keyword, [draw(_padded_ds) for _ in range(count)] if count else None)
    for keyword in ("SliceThickness", "RescaleSlope", "RescaleIntercept"):
        setattr(ds, keyword, draw(st.one_of(_maybe, _padded_ds)))
    for keyword in ("InstanceNumber", "AcquisitionNumber", "TemporalPositionIdentifier"):
        value = draw(st.one_of(_maybe, st.integers(-999, 99999).map(str)))
        if value is None and keyword in ds:
            delattr(ds, keyword)
        elif value is not None:
            setattr(ds, keyword, value)
    ds.ImageType = draw(st.lists(_cs, min_size=0, max_size=4)) or None
    ds.ConvolutionKernel = draw(st.one_of(_maybe, st.lists(_cs.filter(bool), min_size=1, max_size=3)))
    for i in range(draw(st.integers(0, 3))):  # private elements and (un)defined-length sequences
        block = ds.private_block(0x0011 + 2 * i, f"CTWATCH {i}", create=True)
        if draw(st.booleans()):
            block.add_new(0x10, "OB", draw(st.binary(max_size=300)))
        else:
            block.add_new(
                0x10,
                "SQ",
                [
                    dicomgen.sequence_item(ImagePositionPatient=[1, 2, 3], SliceThickness="9")
                    for _ in range(draw(st.integers(0, 2)))
                ],
            )
            element = block[0x10]
            element.is_undefined_length = draw(st.booleans())
    return _Case(ds, syntax)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_header())
def test_random_headers_read_the_same_by_both_readers(case: _Case) -> None:
    data, syntax = case.data, case.syntax
    mine, theirs = _both(data)
    assert _differences(mine[0], theirs[0]) == {}
    assert mine[1] == theirs[1], (
        mine[1],
        theirs[1],
        len(data),
        data[(theirs[1] or 0) - 24 : (theirs[1] or 0) + 8],
    )
    assert mine[0].transfer_syntax == syntax and mine[0].implicit == (syntax == ImplicitVRLittleEndian)


# --- odd values found in review: never crash the scan, same facts from both readers ------------------


def _patched(tag: int, vr: bytes, old: bytes, new: bytes) -> bytes:
    """A generated file whose element ``tag`` (explicit VR, value ``old``) now holds ``new``."""
    ds = dicomgen.make_series(1)[0]
    ds.add_new(tag, vr.decode(), old.decode())
    data = dicomgen.to_bytes(ds)
    element = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(old)) + old
    assert element in data
    return data.replace(element, element[:6] + struct.pack("<H", len(new)) + new, 1)


@pytest.mark.parametrize("syntax", [b"1.2.840.10008.1.2.99", b"1.2.3.4.5.6.7.8.9.10"])
def test_an_unknown_or_private_transfer_syntax_is_declined_not_a_crash(syntax: bytes) -> None:
    data = CORPUS["native"].replace(b"1.2.840.10008.1.2.1\0", syntax, 1)
    with pytest.raises(Declined):
        walk(data)
    result = scan_members([_member("x.dcm", data)])
    assert result.dicom_files == 1 and result.studies[0].series


@pytest.mark.parametrize(
    ("tag", "value"),
    [(0x00200013, b"1e999 "), (0x00200013, b"nan "), (0x00280008, b"inf "), (0x00281052, b"-inf")],
)
def test_non_finite_numbers_are_read_as_missing_by_both_readers(tag: int, value: bytes) -> None:
    vr = b"DS" if tag == 0x00281052 else b"IS"
    data = _patched(tag, vr, b"1 ", value)
    mine, theirs = _both(data)
    assert _differences(mine[0], theirs[0]) == {} and mine[1] == theirs[1]
    assert scan_members([_member("x.dcm", data)]).dicom_files == 1


def test_a_multi_valued_number_reads_the_same_in_both_readers() -> None:
    data = _patched(0x00200012, b"IS", b"1 ", b"1\\2 ")  # AcquisitionNumber with two values
    mine, theirs = _both(data)
    assert mine[0].acquisition == theirs[0].acquisition == "1\\2"


# --- the shared values of a series converted together: the same facts as converted one by one --------


def _reference_facts_of(walked: fastheader.Walked) -> fastheader.Facts:
    """``facts_of`` as it was: every value converted on its own, in the order it was converted."""
    get, tags = walked.values.get, fastheader.TAGS
    text, number, numbers = fastheader._text_of, fastheader._number_of, fastheader._numbers_of

    def us(keyword: str) -> int | None:
        return fastheader._us(get(tags[keyword]))

    temporal_index = get(tags["TemporalPositionIndex"])
    if tags["TemporalPositionIdentifier"] in walked.values:
        temporal = text(get(tags["TemporalPositionIdentifier"]))
    else:
        temporal = (
            str(struct.unpack_from("<L", temporal_index)[0])
            if temporal_index and len(temporal_index) >= 4
            else ""
        )
    slope, intercept = number(get(tags["RescaleSlope"])), number(get(tags["RescaleIntercept"]))
    frames, instance_number = number(get(tags["NumberOfFrames"])), number(get(tags["InstanceNumber"]))
    return fastheader.Facts(
        sop_uid=text(get(tags["SOPInstanceUID"])),
        study_uid=text(get(tags["StudyInstanceUID"])),
        series_uid=text(get(tags["SeriesInstanceUID"])),
        sop_class_uid=text(get(tags["SOPClassUID"])),
        media_sop_class_uid=text(get(tags["MediaStorageSOPClassUID"])),
        transfer_syntax=walked.transfer_syntax,
        implicit=walked.implicit,
        enhanced=fastheader.PER_FRAME_GROUPS in walked.values,
        rows=us("Rows") or 0,
        cols=us("Columns") or 0,
        bits_allocated=us("BitsAllocated"),
        bits_stored=us("BitsStored"),
        pixel_representation=us("PixelRepresentation") or 0,
        samples_per_pixel=us("SamplesPerPixel") or 1,
        number_of_frames=int((frames if frames is not None else 1) or 1),
        position=numbers(get(tags["ImagePositionPatient"]), 3),
        orientation=numbers(get(tags["ImageOrientationPatient"]), 6),
        pixel_spacing=numbers(get(tags["PixelSpacing"]), 2),
        thickness=number(get(tags["SliceThickness"])),
        slope=slope if slope is not None else 1.0,
        intercept=intercept if intercept is not None else 0.0,
        rescale_stated=slope is not None and intercept is not None,
        instance_number=int((instance_number if instance_number is not None else 0) or 0),
        temporal=temporal,
        acquisition=text(get(tags["AcquisitionNumber"])),
        image_type=fastheader._upper_parts_of(get(tags["ImageType"])),
        kernel=fastheader._joined_parts_of(get(tags["ConvolutionKernel"])),
        modality=text(get(tags["Modality"])),
        acquisition_time=text(get(tags["AcquisitionTime"])),
        acquisition_date=text(get(tags["AcquisitionDate"])),
        acquisition_datetime=text(get(tags["AcquisitionDateTime"])),
        imager_pixel_spacing=numbers(get(tags["ImagerPixelSpacing"]), 2),
        declared_syntax=walked.declared,
    )


def _facts_or_declined(convert, walked: fastheader.Walked) -> object:  # type: ignore[no-untyped-def]
    try:
        return convert(walked)
    except Declined as exc:
        return type(exc).__name__


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)  # CI time: fuzzed offline
@given(_header(), st.sampled_from([None, b"CT\xe9", b"\x01\x00\x02", b"", b"1\\2"]))
def test_the_shared_values_converted_together_give_the_facts_converted_one_by_one(
    case: _Case, odd: bytes | None
) -> None:
    walked = walk(case.data)
    if odd is not None:  # an odd raw value in a shared element (text, US, number): declined alike
        tag = [fastheader.TAGS["Modality"], fastheader.TAGS["Rows"], fastheader.TAGS["RescaleSlope"]][
            len(odd) % 3
        ]
        walked = dataclasses.replace(walked, values={**walked.values, tag: odd})
    for _ in range(2):  # converted afresh, then remembered (a value that raised never is)
        assert _facts_or_declined(facts_of, walked) == _facts_or_declined(_reference_facts_of, walked)


@pytest.mark.parametrize("kind", ["implicit", "padded values", "missing values"])
def test_facts_and_frames_built_fast_are_the_dataclasses_own(kind: str) -> None:
    """``facts_of`` and ``classic_frame`` build their frozen records without the dataclass's
    ``__init__`` (issue 18): equal, equally hashed and as frozen as what the constructor builds,
    and a record missing a field or holding an unknown one is refused."""
    from processor.dicom import frames

    facts = facts_of(walk(CORPUS[kind]))
    values = {f.name: getattr(facts, f.name) for f in dataclasses.fields(facts)}
    built = fastheader.Facts(**values)
    assert facts == built and hash(facts) == hash(built) and repr(facts) == repr(built)
    frame = frames.classic_frame(4, facts)
    fields = {f.name: getattr(frame, f.name) for f in dataclasses.fields(frame)}
    assert frame == frames.Frame(**fields) and hash(frame) == hash(frames.Frame(**fields))
    assert frame.instance == 4 and frame.position == facts.position and frame.kernel == facts.kernel
    for record in (facts, frame):
        with pytest.raises(dataclasses.FrozenInstanceError):
            record.rows = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        fastheader._facts({k: v for k, v in values.items() if k != "kernel"})
    with pytest.raises(TypeError):
        fastheader._facts({**{k: v for k, v in values.items() if k != "kernel"}, "colour": 1})
    with pytest.raises(TypeError):
        frames._frame({**fields, "colour": 1})
