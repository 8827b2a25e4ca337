"""A lean reader of the few header values that grouping, selection and decoding need.

Why it exists: a CT study is hundreds of files of ~250 header elements each, and pydicom builds an
element object for every one of them (~0.6 ms per file here) although ctwatch looks at about
thirty. :func:`walk` steps over the elements of a little-endian dataset by their lengths, keeps
the raw bytes of the :data:`WANTED` tags and stops at Pixel Data (≈ 5× cheaper); the values are
then converted by :func:`facts_of`. It reads only the layouts it can read exactly — a Part 10
file with a preamble whose data set is Explicit or Implicit VR Little Endian (also under an
encapsulated syntax), elements of defined length and sequences of defined or undefined length —
and declines anything else with :class:`Declined`, so that the caller parses the file with
pydicom instead (``processor.dicom.scan``). Which VR encoding the data set has is decided from
its bytes by :func:`processor.dicom.encoding.decide`, the rule every reader of ctwatch uses.
Tests check that both readers give the same facts and frames on every kind of file the suite
generates and on random headers.

The full pydicom header of a file stays available (``Instance.header``) for everything else.
A scan walks each data set against the one walked before it (:mod:`processor.dicom.alike`,
through ``walk``'s ``walker``): the same values, in fewer Python steps.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, fields
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Protocol, overload

from pydicom.uid import UID

from processor.dicom.encoding import PLAIN, PROBE_BYTES, VALUE_ERRORS, Unreadable, decide, decided_for_good

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

PIXEL_DATA = 0x7FE00010
FLOAT_PIXEL_DATA = (0x7FE00008, 0x7FE00009)
PER_FRAME_GROUPS = 0x52009230
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

# keyword → tag of every value the fast path reads (file meta and top-level dataset)
TAGS: dict[str, int] = {
    "MediaStorageSOPClassUID": 0x00020002,
    "TransferSyntaxUID": 0x00020010,
    "ImageType": 0x00080008,
    "SOPClassUID": 0x00080016,
    "SOPInstanceUID": 0x00080018,
    "AcquisitionDate": 0x00080022,
    "AcquisitionDateTime": 0x0008002A,
    "AcquisitionTime": 0x00080032,
    "Modality": 0x00080060,
    "ImagerPixelSpacing": 0x00181164,
    "SliceThickness": 0x00180050,
    "ConvolutionKernel": 0x00181210,
    "StudyInstanceUID": 0x0020000D,
    "SeriesInstanceUID": 0x0020000E,
    "AcquisitionNumber": 0x00200012,
    "InstanceNumber": 0x00200013,
    "ImagePositionPatient": 0x00200032,
    "ImageOrientationPatient": 0x00200037,
    "TemporalPositionIdentifier": 0x00200100,
    "TemporalPositionIndex": 0x00209128,
    "SamplesPerPixel": 0x00280002,
    "NumberOfFrames": 0x00280008,
    "Rows": 0x00280010,
    "Columns": 0x00280011,
    "PixelSpacing": 0x00280030,
    "BitsAllocated": 0x00280100,
    "BitsStored": 0x00280101,
    "PixelRepresentation": 0x00280103,
    "RescaleIntercept": 0x00281052,
    "RescaleSlope": 0x00281053,
}
WANTED = frozenset(TAGS.values()) | {PER_FRAME_GROUPS}
# the tags facts_of reads, by name
_MEDIA_SOP_CLASS_UID = TAGS["MediaStorageSOPClassUID"]
_IMAGE_TYPE = TAGS["ImageType"]
_SOP_CLASS_UID = TAGS["SOPClassUID"]
_SOP_INSTANCE_UID = TAGS["SOPInstanceUID"]
_ACQUISITION_DATE = TAGS["AcquisitionDate"]
_ACQUISITION_DATETIME = TAGS["AcquisitionDateTime"]
_ACQUISITION_TIME = TAGS["AcquisitionTime"]
_MODALITY = TAGS["Modality"]
_IMAGER_PIXEL_SPACING = TAGS["ImagerPixelSpacing"]
_THICKNESS = TAGS["SliceThickness"]
_KERNEL = TAGS["ConvolutionKernel"]
_STUDY_UID = TAGS["StudyInstanceUID"]
_SERIES_UID = TAGS["SeriesInstanceUID"]
_ACQUISITION_NUMBER = TAGS["AcquisitionNumber"]
_INSTANCE_NUMBER = TAGS["InstanceNumber"]
_POSITION = TAGS["ImagePositionPatient"]
_ORIENTATION = TAGS["ImageOrientationPatient"]
_TEMPORAL_IDENTIFIER = TAGS["TemporalPositionIdentifier"]
_TEMPORAL_INDEX = TAGS["TemporalPositionIndex"]
_SAMPLES_PER_PIXEL = TAGS["SamplesPerPixel"]
_FRAMES = TAGS["NumberOfFrames"]
_ROWS = TAGS["Rows"]
_COLUMNS = TAGS["Columns"]
_PIXEL_SPACING = TAGS["PixelSpacing"]
_BITS_ALLOCATED = TAGS["BitsAllocated"]
_BITS_STORED = TAGS["BitsStored"]
_PIXEL_REPRESENTATION = TAGS["PixelRepresentation"]
_INTERCEPT = TAGS["RescaleIntercept"]
_SLOPE = TAGS["RescaleSlope"]
_BINARY = {"SamplesPerPixel", "Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation"}  # US

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FD",
        b"FL",
        b"IS",
        b"LO",
        b"LT",
        b"PN",
        b"SH",
        b"SL",
        b"SS",
        b"ST",
        b"TM",
        b"UI",
        b"UL",
        b"US",
    }
)
_EXPLICIT = struct.Struct("<HH2sH")
_IMPLICIT = struct.Struct("<HHL")
_UL = struct.Struct("<L")
_US = struct.Struct("<H")
# The common element, stepped over with the fewest Python operations (see _walk): its VR read as
# a number, the element header's size by VR, and the groups that hold a wanted value.
_EXPLICIT_NUMBERS = struct.Struct("<HHHH")
_HEADER_BY_VR = {_US.unpack(vr)[0]: 12 for vr in _LONG_VRS} | {_US.unpack(vr)[0]: 8 for vr in _SHORT_VRS}
_WANTED_GROUPS = frozenset(tag >> 16 for tag in WANTED)
_FIRST_SPECIAL_GROUP = 0x7FE0  # pixel data, and the item and delimiter group FFFE, lie at and above it


class Declined(Exception):
    """The walker does not read this layout exactly; parse the file with pydicom."""


class Truncated(Declined):
    """The bytes end inside the header (a prefix too short, or a truncated file)."""


@dataclass(frozen=True, slots=True)
class Walked:
    values: dict[int, bytes]  # tag → raw value bytes (little endian)
    transfer_syntax: str
    implicit: bool
    pixel_offset: int | None  # where the (7FE0,0010) element starts; None when there is none
    declared: str = ""  # the TransferSyntaxUID as the file meta states it ('' when absent)
    prologue: Prologue | None = None  # what the checks before the data set found (or were told)


class DataSetWalker(Protocol):
    """Walks a data set as :func:`_walk` does at the top level, perhaps faster (e.g.
    :class:`processor.dicom.alike.Alike`, against the file walked before)."""

    def walk_data_set(
        self, view: memoryview, pos: int, end: int, implicit: bool, out: dict[int, bytes]
    ) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Prologue:
    """What :func:`walk` found in a file's bytes before its data set, kept to walk the next files of
    its series without finding it again (:func:`processor.dicom.scan.prologue_of` builds one and
    says when a file's bytes hold the same).

    ``same``: (start, end, bytes) — the bytes a file must hold where the checks before the data set
    read them: everything before ``need`` but the values of the file meta group's unwanted UI
    elements and of the data set's first elements. ``need``: how many bytes those checks read (a
    file shorter than that is checked in full)."""

    meta: dict[int, bytes]  # the wanted file meta values
    meta_end: int  # where the data set starts
    transfer_syntax: str
    implicit: bool
    declared: str
    need: int
    same: tuple[tuple[int, int, bytes], ...]
    meta_starts: tuple[int, ...] = ()  # where each file meta element starts, as the walker stepped them


def walk(
    buf: bytes | memoryview, walker: DataSetWalker | None = None, known: Prologue | None = None
) -> Walked:
    """The raw values of :data:`WANTED` in a Part 10 file's bytes (or a prefix of them).

    ``walker`` walks the data set instead of :func:`_walk` (the same values and offset, or the same
    exception). ``known``: the :class:`Prologue` of an earlier file whose bytes this file holds
    where the checks before the data set read (the caller compared them): those checks would
    answer alike, so the file meta values, the data set's start and its encoding are taken from it
    instead of :func:`before_data_set`."""
    view = memoryview(buf)
    end = len(view)
    if known is None:
        known = before_data_set(view, [])
    values = dict(known.meta)
    if walker is None:
        offset = _walk(view, known.meta_end, end, known.implicit, values, top=True)
    else:
        offset = walker.walk_data_set(view, known.meta_end, end, known.implicit, values)
    return Walked(values, known.transfer_syntax, known.implicit, offset, known.declared, known)


def before_data_set(view: memoryview, starts: list[int] | None = None) -> Prologue:
    """The checks :func:`walk` makes before the data set, and what they find: a :class:`Prologue`
    (``need`` 0, ``same`` empty). Raises :class:`Declined` (:class:`Truncated` where more bytes
    could tell). ``starts``, when given, gets where each file meta element starts (and the
    prologue's ``meta_starts`` holds them)."""
    end = len(view)
    if end < 144 or view[128:132] != b"DICM":
        raise Declined("no DICOM preamble")
    group, element, vr, length = _EXPLICIT.unpack_from(view, 132)
    if (group, element, vr) != (0x0002, 0x0000, b"UL") or length != 4:
        raise Declined("file meta information has no group length")
    meta_end = 144 + _UL.unpack_from(view, 140)[0]
    if meta_end > end:
        raise Truncated("file meta information cut short")
    values: dict[int, bytes] = {}
    if _walk(view, 144, meta_end, False, values, top=True, starts=starts) is not None or any(
        tag >> 16 != 0x0002 for tag in values
    ):
        raise Declined("file meta information holds more than group 0002")
    if meta_end + 2 <= end and _US.unpack_from(view, meta_end)[0] == 0x0002:
        raise Declined("file meta group length does not cover group 0002")
    declared = values.get(TAGS["TransferSyntaxUID"], b"").rstrip(b"\0 ").decode("ascii", "replace")
    if 0 < end - meta_end < PROBE_BYTES:
        raise Truncated("data set cut short")
    try:
        encoding = decide(view, meta_end, declared)  # the one rule: what the bytes show, not only the header
    except Unreadable as exc:
        raise Declined(str(exc)) from exc
    if not decided_for_good(encoding, end):
        raise Truncated("data set cut short inside the bytes that tell whether it is deflated")
    syntax = encoding.transfer_syntax
    if encoding.deflated or not encoding.little:
        raise Declined(f"transfer syntax {syntax}")
    if syntax not in PLAIN:
        try:
            known = UID(syntax).is_little_endian
        except (ValueError, AttributeError):  # not a transfer syntax pydicom knows (e.g. a private one)
            known = False
        if not known:
            raise Declined(f"transfer syntax {syntax}")
    return Prologue(values, meta_end, syntax, encoding.implicit, declared, 0, (), tuple(starts or ()))


def _walk(
    view: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    out: dict[int, bytes] | None,
    top: bool,
    starts: list[int] | None = None,
) -> int | None:
    """Step over elements in [pos, end). At the top level returns where Pixel Data starts (or None
    at the end); inside an item of undefined length returns the position after its delimiter.

    Most elements are neither wanted nor special (a sequence or value of undefined length, an
    item or delimiter, pixel data, an unknown VR): each of those costs one unpack and a few
    comparisons (``struct.error`` at the end of ``view`` is the element header cut short). Every
    other element is read by the general steps below, element by element as before. ``starts``,
    when given, gets where each element of this level starts (the last one where the walk stopped).
    """
    if end < len(view):
        view = view[:end]  # a header read past ``end`` then fails as one cut short
    try:
        return _walk_elements(view, pos, end, implicit, out, top, starts)
    except struct.error as exc:
        raise Truncated("element header cut short") from exc


def _walk_elements(
    view: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    out: dict[int, bytes] | None,
    top: bool,
    starts: list[int] | None = None,
) -> int | None:
    unpack_explicit, unpack_implicit, unpack_ul = (
        _EXPLICIT.unpack_from,
        _IMPLICIT.unpack_from,
        _UL.unpack_from,
    )
    unpack_numbers, header_by_vr = _EXPLICIT_NUMBERS.unpack_from, _HEADER_BY_VR.get
    wanted_groups = _WANTED_GROUPS if out is not None else frozenset()
    special, wanted, long_vrs, short_vrs = _FIRST_SPECIAL_GROUP, WANTED, _LONG_VRS, _SHORT_VRS
    while pos < end:
        if starts is not None:
            starts.append(pos)
        # the common element: one unpack, a few comparisons; a wanted one of defined length is kept
        if implicit:
            group, element, length = unpack_implicit(view, pos)
            if group < special and length != UNDEFINED:
                if group in wanted_groups and (tag := group << 16 | element) in wanted:
                    out[tag] = bytes(view[pos + 8 : pos + 8 + length])  # type: ignore[index]
                pos += 8 + length
                continue
        else:
            group, element, code, length = unpack_numbers(view, pos)
            if group < special:
                header = header_by_vr(code)
                if header == 8:
                    if group in wanted_groups and (tag := group << 16 | element) in wanted:
                        out[tag] = bytes(view[pos + 8 : pos + 8 + length])  # type: ignore[index]
                    pos += 8 + length
                    continue
                if header == 12 and not (group in wanted_groups and group << 16 | element in wanted):
                    length = unpack_ul(view, pos + 8)[0]
                    if length != UNDEFINED:
                        pos += 12 + length
                        continue
        # the general steps
        if pos + 8 > end:
            raise Truncated("element header cut short")
        if implicit:
            group, element, length = unpack_implicit(view, pos)
            header = 8
        else:
            group, element, vr, length = unpack_explicit(view, pos)
            if group == 0xFFFE:  # item delimiter inside an item: tag + 4-byte length, no VR
                length, header = unpack_ul(view, pos + 4)[0], 8
            elif vr in long_vrs:
                if pos + 12 > end:
                    raise Truncated("element header cut short")
                length, header = unpack_ul(view, pos + 8)[0], 12
            elif vr in short_vrs:
                header = 8
            else:
                raise Declined(f"unknown VR {bytes(vr)!r} at byte {pos}")
        tag = group << 16 | element
        if top and (tag == PIXEL_DATA or tag in FLOAT_PIXEL_DATA):
            return pos if tag == PIXEL_DATA else None
        if top and group == 0xFFFE:
            # pydicom reads an item or delimiter here as an element with a VR (Explicit VR): where
            # its bytes go on, the two would read different values (one of them hidden)
            raise Declined(f"item or delimiter ({tag:08X}) outside a sequence")
        if tag == ITEM_END:
            return pos + 8
        if length == UNDEFINED:
            if out is not None and tag in WANTED:
                if tag != PER_FRAME_GROUPS:
                    raise Declined(f"element {tag:08X} has an undefined length")
                out[tag] = b""
            # an explicit UN of undefined length holds a sequence encoded implicitly (PS3.5 6.2.2)
            pos = _skip_sequence(view, pos + header, end, implicit or (not implicit and vr == b"UN"))
            continue
        start = pos + header
        pos = start + length
        if pos > end:
            raise Truncated("element value cut short")
        if out is not None and tag in WANTED:
            out[tag] = bytes(view[start:pos])
    if pos > end:
        raise Truncated("element value cut short")
    if not top:
        raise Truncated("item without its delimiter")
    return None


def _skip_sequence(view: memoryview, pos: int, end: int, implicit: bool) -> int:
    """Position after the delimiter of an undefined-length sequence (or encapsulated fragments)."""
    while True:
        if pos + 8 > end:
            raise Truncated("sequence cut short")
        group, element, length = _IMPLICIT.unpack_from(view, pos)
        tag = group << 16 | element
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise Declined(f"unexpected tag {tag:08X} inside a sequence")
        if length == UNDEFINED:
            pos = _walk(view, pos, end, implicit, None, top=False)  # type: ignore[assignment]
        else:
            pos += length
            if pos > end:
                raise Truncated("item cut short")


@dataclass(frozen=True, slots=True)
class Facts:
    """Header values a file contributes to grouping, selection and decoding (converted as pydicom does)."""

    sop_uid: str
    study_uid: str
    series_uid: str
    sop_class_uid: str
    media_sop_class_uid: str
    transfer_syntax: str
    implicit: bool
    enhanced: bool  # has a PerFrameFunctionalGroupsSequence: frames come from the full header
    rows: int
    cols: int
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int
    samples_per_pixel: int
    number_of_frames: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    thickness: float | None
    slope: float
    intercept: float
    instance_number: int
    temporal: str
    acquisition: str
    image_type: tuple[str, ...]
    kernel: str
    modality: str = ""
    acquisition_time: str = ""  # AcquisitionTime (TM) as stored, padding stripped
    acquisition_date: str = ""  # AcquisitionDate (DA)
    rescale_stated: bool = True  # RescaleSlope and RescaleIntercept both present (else 1 and 0 were assumed)
    acquisition_datetime: str = ""  # AcquisitionDateTime (DT)
    imager_pixel_spacing: tuple[float, ...] | None = None  # (0018,1164), at the detector
    # TransferSyntaxUID as the file meta states it ('' when absent); ``transfer_syntax`` and
    # ``implicit`` are what the bytes are read as (processor.dicom.encoding decides)
    declared_syntax: str = ""


def _text(raw: bytes | None) -> str | None:
    """A text value as pydicom reads it for these VRs (ASCII, trailing/leading padding stripped)."""
    if raw is None:
        return None
    if not raw.isascii():
        raise Declined("non-ASCII text in a wanted element")
    return raw.decode("ascii").strip("\0 ")


def _parts(raw: bytes | None) -> list[str] | None:
    text = _text(raw)
    return None if text is None or text == "" else [p.strip("\0 ") for p in text.split("\\")]


def _finite(value: object) -> float:
    number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


@overload
def _float(raw: bytes | None, default: float) -> float: ...
@overload
def _float(raw: bytes | None, default: None = None) -> float | None: ...
def _float(raw: bytes | None, default: float | None = None) -> float | None:
    parts = _parts(raw)
    if parts is None or len(parts) != 1:
        return default
    try:
        return _finite(parts[0])
    except ValueError:
        return default


def _floats(raw: bytes | None, n: int) -> tuple[float, ...] | None:
    parts = _parts(raw)
    if parts is None or len(parts) != n:
        return None
    try:
        return tuple(_finite(p) for p in parts)
    except ValueError:
        return None


def _us(raw: bytes | None) -> int | None:
    if raw is None or len(raw) == 0:
        return None
    if len(raw) != 2:
        raise Declined("a US value that is not 2 bytes long")
    return _US.unpack_from(raw)[0]


# The conversions of facts_of, remembered: most values repeat in every file of a series (the
# study and series UIDs, orientation, spacing, sizes, rescale), so each is converted once.
# Pure functions of bytes; a value that raises (non-ASCII text) is not remembered.
_MEMO = 4096


@lru_cache(maxsize=_MEMO)
def _text_of(raw: bytes | None) -> str:
    return _text(raw) or ""


@lru_cache(maxsize=_MEMO)
def _number_of(raw: bytes | None) -> float | None:
    return _float(raw)


@lru_cache(maxsize=_MEMO)
def _numbers_of(raw: bytes | None, n: int) -> tuple[float, ...] | None:
    return _floats(raw, n)


@lru_cache(maxsize=_MEMO)
def _upper_parts_of(raw: bytes | None) -> tuple[str, ...]:
    return tuple(p.upper() for p in (_parts(raw) or ()))


@lru_cache(maxsize=_MEMO)
def _joined_parts_of(raw: bytes | None) -> str:
    return "\\".join(_parts(raw) or ())


# The values that every file of a series shares, read in this order and converted together: one
# memo lookup a file instead of one a value. A value that does not convert (``Declined``) is not
# remembered, and raises for every file that holds it.
_SHARED = (
    _STUDY_UID,
    _SERIES_UID,
    _SOP_CLASS_UID,
    _MEDIA_SOP_CLASS_UID,
    _ROWS,
    _COLUMNS,
    _BITS_ALLOCATED,
    _BITS_STORED,
    _PIXEL_REPRESENTATION,
    _SAMPLES_PER_PIXEL,
    _FRAMES,
    _ORIENTATION,
    _PIXEL_SPACING,
    _THICKNESS,
    _SLOPE,
    _INTERCEPT,
    _IMAGE_TYPE,
    _KERNEL,
    _MODALITY,
    _ACQUISITION_DATE,
    _ACQUISITION_DATETIME,
    _IMAGER_PIXEL_SPACING,
)


@lru_cache(maxsize=_MEMO)
def _shared_of(raw: tuple[bytes | None, ...]) -> dict[str, Any]:
    """The :class:`Facts` fields converted from the raw values of :data:`_SHARED` (in its order)."""
    (
        study,
        series,
        sop_class,
        media_sop_class,
        rows,
        cols,
        bits_allocated,
        bits_stored,
        pixel_representation,
        samples_per_pixel,
        frames,
        orientation,
        pixel_spacing,
        thickness,
        slope,
        intercept,
        image_type,
        kernel,
        modality,
        date,
        datetime,
        imager_pixel_spacing,
    ) = raw
    text, number, numbers = _text_of, _number_of, _numbers_of
    slope_value, intercept_value, frames_value = number(slope), number(intercept), number(frames)
    return {
        "study_uid": text(study),
        "series_uid": text(series),
        "sop_class_uid": text(sop_class),
        "media_sop_class_uid": text(media_sop_class),
        "rows": _us(rows) or 0,
        "cols": _us(cols) or 0,
        "bits_allocated": _us(bits_allocated),
        "bits_stored": _us(bits_stored),
        "pixel_representation": _us(pixel_representation) or 0,
        "samples_per_pixel": _us(samples_per_pixel) or 1,
        "number_of_frames": int((frames_value if frames_value is not None else 1) or 1),
        "orientation": numbers(orientation, 6),
        "pixel_spacing": numbers(pixel_spacing, 2),
        "thickness": number(thickness),
        "slope": slope_value
        if slope_value is not None
        else 1.0,  # a stated 0 stays 0: the volume step refuses it
        "intercept": intercept_value if intercept_value is not None else 0.0,
        "rescale_stated": slope_value is not None and intercept_value is not None,
        "image_type": _upper_parts_of(image_type),
        "kernel": _joined_parts_of(kernel),
        "modality": text(modality),
        "acquisition_date": text(date),
        "acquisition_datetime": text(datetime),
        "imager_pixel_spacing": numbers(imager_pixel_spacing, 2),
    }


def facts_of(walked: Walked) -> Facts:
    """Convert the walked raw values (little endian) into :class:`Facts`."""
    values = walked.values
    get = values.get
    text = _text_of
    shared = _shared_of(tuple(map(get, _SHARED)))
    temporal_index = get(_TEMPORAL_INDEX)
    if _TEMPORAL_IDENTIFIER in values:
        temporal = text(get(_TEMPORAL_IDENTIFIER))
    else:
        temporal = (
            str(_UL.unpack_from(temporal_index)[0]) if temporal_index and len(temporal_index) >= 4 else ""
        )
    instance_number = _number_of(get(_INSTANCE_NUMBER))
    return _facts(
        {
            **shared,
            "sop_uid": text(get(_SOP_INSTANCE_UID)),
            "transfer_syntax": walked.transfer_syntax,
            "implicit": walked.implicit,
            "enhanced": PER_FRAME_GROUPS in values,
            "position": _numbers_of(get(_POSITION), 3),
            "instance_number": int((instance_number if instance_number is not None else 0) or 0),
            "temporal": temporal,
            "acquisition": text(get(_ACQUISITION_NUMBER)),
            "acquisition_time": text(get(_ACQUISITION_TIME)),
            "declared_syntax": walked.declared,
        }
    )


_FACT_SETTERS = tuple((f.name, getattr(Facts, f.name).__set__) for f in fields(Facts))


def _facts(values: dict[str, Any]) -> Facts:
    """The :class:`Facts` ``Facts(**values)`` builds (``values``: every field, by name), set
    through the slots' own setters instead of the frozen dataclass's ``object.__setattr__`` by
    name: a third of the time, for every file of every arrival (issue 18). ``TypeError`` when a
    field is missing or unknown."""
    if len(values) != len(_FACT_SETTERS):
        raise TypeError(f"Facts needs exactly the fields {[n for n, _ in _FACT_SETTERS]}, got {list(values)}")
    facts = object.__new__(Facts)
    try:
        for name, setter in _FACT_SETTERS:
            setter(facts, values[name])
    except KeyError as exc:
        raise TypeError(f"Facts needs the field {exc}") from None
    return facts


def facts_from_dataset(ds: Dataset, *, transfer_syntax: str, implicit: bool) -> Facts:
    """The same :class:`Facts` from a header pydicom parsed (the fallback for declined layouts)."""

    def get(keyword: str, default: object = None) -> Any:
        """The converted value; an unconvertible one (e.g. IS '1e999') reads as missing."""
        try:
            return ds.get(keyword, default)
        except VALUE_ERRORS:
            return default

    def text(keyword: str) -> str:
        value = get(keyword)
        if value is None:
            return ""
        if isinstance(value, str | int | float):
            return str(value).strip("\0 ")
        return "\\".join(multi(keyword))  # several values, joined as they are stored

    @overload
    def number(keyword: str, default: float) -> float: ...
    @overload
    def number(keyword: str, default: None = None) -> float | None: ...
    def number(keyword: str, default: float | None = None) -> float | None:
        try:
            return _finite(get(keyword))
        except (TypeError, ValueError):
            return default

    def numbers(keyword: str, n: int) -> tuple[float, ...] | None:
        try:
            out = tuple(_finite(x) for x in get(keyword))
        except (TypeError, ValueError):
            return None
        return out if len(out) == n else None

    def multi(keyword: str) -> list[str]:
        value = get(keyword)
        if value is None or value == "":
            return []
        values = [value] if isinstance(value, str) else value
        return [str(x).strip("\0 ") for x in values]  # each value's padding is insignificant

    def integer(keyword: str) -> int | None:
        try:
            return int(get(keyword))
        except (TypeError, ValueError, OverflowError):
            return None

    file_meta = getattr(ds, "file_meta", None)
    temporal = get("TemporalPositionIdentifier", get("TemporalPositionIndex", ""))
    return Facts(
        sop_uid=text("SOPInstanceUID"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        media_sop_class_uid=str(file_meta.get("MediaStorageSOPClassUID", ""))
        if file_meta is not None
        else "",
        transfer_syntax=transfer_syntax,
        implicit=implicit,
        enhanced="PerFrameFunctionalGroupsSequence" in ds,
        rows=integer("Rows") or 0,
        cols=integer("Columns") or 0,
        bits_allocated=integer("BitsAllocated"),
        bits_stored=integer("BitsStored"),
        pixel_representation=integer("PixelRepresentation") or 0,
        samples_per_pixel=integer("SamplesPerPixel") or 1,
        number_of_frames=int(number("NumberOfFrames", 1) or 1),
        position=numbers("ImagePositionPatient", 3),
        orientation=numbers("ImageOrientationPatient", 6),
        pixel_spacing=numbers("PixelSpacing", 2),
        thickness=number("SliceThickness"),
        slope=number("RescaleSlope", 1.0),
        intercept=number("RescaleIntercept", 0.0),
        rescale_stated=number("RescaleSlope") is not None and number("RescaleIntercept") is not None,
        instance_number=int(number("InstanceNumber", 0) or 0),
        temporal="" if temporal is None else str(temporal).strip("\0 "),
        acquisition=text("AcquisitionNumber"),
        image_type=tuple(p.upper() for p in multi("ImageType")),
        kernel="\\".join(multi("ConvolutionKernel")),
        modality=text("Modality"),
        acquisition_time=text("AcquisitionTime"),
        acquisition_date=text("AcquisitionDate"),
        acquisition_datetime=text("AcquisitionDateTime"),
        imager_pixel_spacing=numbers("ImagerPixelSpacing", 2),
        declared_syntax=str(file_meta.get("TransferSyntaxUID", "") or "").strip("\0 ")
        if file_meta is not None
        else "",
    )
