"""The few values read from a series' first header without parsing it whole
(:mod:`processor.dicom.leanheader`, ``Instance.value``) are the values pydicom's full parse of the
same file gives: same type, same value, or the same exception — for any bytes of those elements
(text in other character sets, several values, padding, NULs, numbers that are no numbers), as the
file states their VR or as the dictionary gives it (Implicit VR), under any SpecificCharacterSet."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from processor.bytesource import Member
from processor.dicom.leanheader import KEYWORDS, lean_header
from processor.dicom.scan import scan_members
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen

_TAG = {
    "SpecificCharacterSet": 0x00080005,
    "AccessionNumber": 0x00080050,
    "Modality": 0x00080060,
    "SeriesDescription": 0x0008103E,
    "PatientID": 0x00100020,
    "IssuerOfPatientID": 0x00100021,
    "GantryDetectorTilt": 0x00181120,
    "SeriesNumber": 0x00200011,
}
_VR = {
    "SpecificCharacterSet": "CS",
    "AccessionNumber": "SH",
    "Modality": "CS",
    "SeriesDescription": "LO",
    "PatientID": "LO",
    "IssuerOfPatientID": "LO",
    "GantryDetectorTilt": "DS",
    "SeriesNumber": "IS",
}
_CHARSETS = [
    b"",
    b"ISO_IR 100",
    b"ISO_IR 192",
    b"GB18030",
    b"ISO_IR 13",
    b"\\ISO 2022 IR 87",
    b"ISO 2022 IR 6\\ISO 2022 IR 100",
    b"ISO_IR 144 ",
    b"NOT A CHARSET",
]
_TEXT = st.one_of(
    st.sampled_from(
        [b"", b"CT", b" CHEST ", b"LUNG\\MED", b"ACC\0", b"B\xe9ch", b"\xe6\x97\xa5\xe6\x9c\xac", b"\x1b$B;3\x1b(B"]
    ),
    st.binary(max_size=12),
)
_NUMBER = st.one_of(
    st.sampled_from([b"", b"3", b"  3 ", b"+3", b"-0", b"3.0", b"3.5", b"1e2", b" -1.5E1", b"nan", b"abc", b"1\\2"]),
    st.binary(max_size=8),
)
_VALUE = {k: (_NUMBER if _VR[k] in ("IS", "DS") else _TEXT) for k in _VR if k != "SpecificCharacterSet"}


@st.composite
def _element(draw: st.DrawFn, keyword: str) -> tuple[str, bytes] | None:
    """(VR as the file states it, value bytes), or None for no element."""
    if draw(st.integers(0, 5)) == 0:
        return None
    value = draw(st.sampled_from(_CHARSETS)) if keyword == "SpecificCharacterSet" else draw(_VALUE[keyword])
    vr = draw(st.sampled_from([_VR[keyword]] * 4 + ["UN", "LO", "IS", "OB", "US"]))
    return vr, value


class _Case:
    """A file's bytes; its repr names the drawn elements only (hypothesis prints it)."""

    def __init__(self, data: bytes, drawn: str) -> None:
        self.data, self.drawn = data, drawn

    def __repr__(self) -> str:
        return f"<{self.drawn}>"


@st.composite
def _file(draw: st.DrawFn) -> _Case:
    ds = dicomgen.make_series(1)[0]
    syntax = draw(st.sampled_from([ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
    ds.file_meta.TransferSyntaxUID = syntax
    drawn = []
    for keyword, tag in _TAG.items():
        element = draw(_element(keyword))
        ds._dict.pop(Tag(tag), None)
        if element is not None:
            vr, value = element
            if len(value) % 2:
                value += b" "
            ds._dict[Tag(tag)] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
            drawn.append(f"{keyword} {vr} {value!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            data = dicomgen.to_bytes(ds)
        except Exception:  # noqa: BLE001 — pydicom will not write this one (e.g. its character set)
            reject()
    return _Case(data, f"{syntax.name}: " + "; ".join(drawn))


def _outcome(get: Any) -> tuple[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = get()
        except Exception as exc:  # noqa: BLE001 — the same failure is what is compared
            return "raised", type(exc).__name__
    return type(value).__name__, repr(value)  # repr: a NaN equals itself


def _first_instance(data: bytes):  # type: ignore[no-untyped-def]
    member = Member("x.dcm", len(data), lambda: data)
    result = scan_members([member])
    return next(iter(result.studies[0].series.values())).instances[0]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_file())
def test_values_read_without_the_whole_header_are_pydicoms(case: _Case) -> None:
    data, drawn = case.data, case.drawn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        instance = _first_instance(data)
    # a file the lean walker declines was parsed by pydicom (its header held, no bytes kept)
    assert (instance.header_bytes is None) == (instance._header is not None), drawn
    for keyword in sorted(KEYWORDS):
        lean = _outcome(lambda k=keyword: instance.value(k, "absent"))
        full = _outcome(lambda k=keyword: whole.get(k, "absent"))
        assert lean == full, (keyword, drawn)
    assert instance._header is None or instance._lean is None, drawn


def test_a_layout_the_walker_does_not_step_is_read_from_the_whole_header() -> None:
    """A value of undefined length among the elements asked for: no lean data set; the values
    come from the whole header, parsed then."""
    ds = dicomgen.make_series(1)[0]
    data = dicomgen.to_bytes(ds)
    instance = _first_instance(data)
    head = bytes(instance.header_bytes)
    at = head.index(b"\x08\x00\x3e\x10")  # SeriesDescription, Explicit VR: tag, 'LO', 2-byte length
    assert lean_header(head[:at] + b"\x08\x00\x3e\x10UN\0\0\xff\xff\xff\xff", False) is None
    assert lean_header(head[: at + 3], False) is None  # cut inside an element
    assert instance.value("SeriesDescription") == ds.SeriesDescription


def test_the_values_of_every_series_in_a_scanned_zip_match_the_whole_headers(tmp_path: Path) -> None:
    study = pydicom.uid.generate_uid()
    first = dicomgen.make_series(3, study_uid=study)
    second = dicomgen.make_series(2, study_uid=study)
    for ds in second:
        ds.SeriesNumber, ds.SeriesDescription = 7, "Lungs 1.0 B70f"
    path = dicomgen.write_zip(tmp_path / "s.zip", first + second)
    with open_arrival(path, Limits()) as contents:
        study_read = scan_members(contents.members).studies[0]
    for series in study_read.series.values():
        instance = series.instances[0]
        whole = pydicom.dcmread(io.BytesIO(bytes(instance.header_bytes)))
        assert series.number == whole.SeriesNumber and series.description == whole.SeriesDescription
        assert series.modality == whole.Modality
        assert instance._header is None
    assert study_read.accession == first[0].AccessionNumber and study_read.patient_id == first[0].PatientID


@pytest.mark.parametrize("keyword", sorted(KEYWORDS))
def test_every_keyword_is_one_pydicom_knows(keyword: str) -> None:
    assert Dataset().get(keyword, "absent") == "absent"
    assert keyword in _TAG
