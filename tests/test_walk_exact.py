"""The header walker's shortcuts read exactly what the element-by-element walk reads (issue 18).

Two shortcuts are checked against the walk they stand in for, on real generated files and on
files damaged at random (bytes changed, inserted, removed, cut short):

* ``fastheader._walk`` steps over the common element with one unpack; the reference is the walker
  as it was before, element by element (copied below): same values, same Pixel Data offset, or
  the same exception class (``Truncated`` / ``Declined``).
* ``alike.Alike`` walks a file against the one walked before it; the reference is the plain walk
  of the same file: same values (in the same order), same offset, same exception class.
"""

from __future__ import annotations

import contextlib
import copy
import random
import struct
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.sequence import Sequence
from pydicom.uid import ImplicitVRLittleEndian

from processor.bytesource import Member
from processor.dicom import alike as alike_module
from processor.dicom import fastheader
from processor.dicom import scan as scan_module
from processor.dicom.alike import Alike
from processor.dicom.fastheader import (
    FLOAT_PIXEL_DATA,
    ITEM,
    ITEM_END,
    PER_FRAME_GROUPS,
    PIXEL_DATA,
    SEQUENCE_END,
    UNDEFINED,
    WANTED,
    Declined,
    Truncated,
    walk,
)
from processor.dicom.scan import read_instance, scan_members
from tests import dicomgen

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_EXPLICIT, _IMPLICIT, _UL = struct.Struct("<HH2sH"), struct.Struct("<HHL"), struct.Struct("<L")


# --- the walk as it was: every element stepped by the general steps ------------------------------------


def _reference_walk(
    view: memoryview, pos: int, end: int, implicit: bool, out: dict[int, bytes] | None, top: bool
) -> int | None:
    while pos < end:
        if pos + 8 > end:
            raise Truncated("element header cut short")
        if implicit:
            group, element, length = _IMPLICIT.unpack_from(view, pos)
            header = 8
        else:
            group, element, vr, length = _EXPLICIT.unpack_from(view, pos)
            if group == 0xFFFE:
                length, header = _UL.unpack_from(view, pos + 4)[0], 8
            elif vr in fastheader._LONG_VRS:
                if pos + 12 > end:
                    raise Truncated("element header cut short")
                length, header = _UL.unpack_from(view, pos + 8)[0], 12
            elif vr in fastheader._SHORT_VRS:
                header = 8
            else:
                raise Declined("unknown VR")
        tag = group << 16 | element
        if top and (tag == PIXEL_DATA or tag in FLOAT_PIXEL_DATA):
            return pos if tag == PIXEL_DATA else None
        if top and group == 0xFFFE:  # an item or delimiter outside a sequence: declined (3958b5f)
            raise Declined("item or delimiter outside a sequence")
        if tag == ITEM_END:
            return pos + 8
        if length == UNDEFINED:
            if out is not None and tag in WANTED:
                if tag != PER_FRAME_GROUPS:
                    raise Declined("undefined length")
                out[tag] = b""
            pos = _reference_skip(view, pos + header, end, implicit or (not implicit and vr == b"UN"))
            continue
        start = pos + header
        pos = start + length
        if pos > end:
            raise Truncated("element value cut short")
        if out is not None and tag in WANTED:
            out[tag] = bytes(view[start:pos])
    if not top:
        raise Truncated("item without its delimiter")
    return None


def _reference_skip(view: memoryview, pos: int, end: int, implicit: bool) -> int:
    while True:
        if pos + 8 > end:
            raise Truncated("sequence cut short")
        group, element, length = _IMPLICIT.unpack_from(view, pos)
        tag = group << 16 | element
        pos += 8
        if tag == SEQUENCE_END:
            return pos
        if tag != ITEM:
            raise Declined("unexpected tag inside a sequence")
        if length == UNDEFINED:
            pos = _reference_walk(view, pos, end, implicit, None, top=False)  # type: ignore[assignment]
        else:
            pos += length
            if pos > end:
                raise Truncated("item cut short")


def _outcome(fn, *args):  # type: ignore[no-untyped-def]
    out: dict[int, bytes] = {}
    try:
        return fn(*args, out, True), list(out.items())
    except Declined as exc:  # Truncated is a Declined: the class is what the scan acts on
        return type(exc).__name__


def _data_set_start(data: bytes) -> int:
    return 144 + struct.unpack_from("<L", data, 140)[0]


# --- files to walk ------------------------------------------------------------------------------------


def _files() -> dict[str, bytes]:
    stored = np.arange(2 * 16 * 16, dtype=np.int16).reshape(2, 16, 16) - 1500
    classic = dicomgen.make_series(2, stored=stored, kernel="B70f\\LUNG")
    out = {"explicit": dicomgen.to_bytes(classic[0])}
    implicit = copy.deepcopy(classic[1])
    implicit.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out["implicit"] = dicomgen.to_bytes(implicit)
    out["enhanced"] = dicomgen.to_bytes(dicomgen.make_enhanced(classic))
    nested = copy.deepcopy(classic[0])
    nested.ReferencedImageSequence = Sequence([dicomgen.sequence_item(ReferencedSOPInstanceUID="1.2.3.4")])
    nested["ReferencedImageSequence"].is_undefined_length = True
    for item in nested.ReferencedImageSequence:
        item.is_undefined_length_sequence_item = True
    block = nested.private_block(0x0029, "CTWATCH NESTED", create=True)
    block.add_new(0x10, "SQ", [dicomgen.sequence_item(ImagePositionPatient=[9, 9, 9])])
    block.add_new(0x11, "OB", bytes(range(37)) + b"\0")
    out["sequences"] = dicomgen.to_bytes(nested)
    nested.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out["implicit sequences"] = dicomgen.to_bytes(nested)
    return out


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    FILES = _files()


@st.composite
def _damaged(draw: st.DrawFn) -> tuple[str, bytes]:
    """A generated file with a few random edits in its header (and perhaps cut short)."""
    name = draw(st.sampled_from(sorted(FILES)))
    return name, _edited(draw, FILES[name])


def _edited(draw: st.DrawFn, original: bytes) -> bytes:
    data = bytearray(original)
    start, stop = _data_set_start(original), len(data)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(start, min(stop, start + 3000) - 1))
        kind = draw(st.sampled_from(["set", "set", "insert", "delete"]))
        byte = draw(st.sampled_from([0x00, 0xFF, 0xFE, 0xE0, 0x7F, 0x10, 0x4F, 0x42, 0x53, 0x51, 0x55, 0x4E]))
        if kind == "set":
            data[at] = byte
        elif kind == "insert":
            data[at:at] = bytes([byte]) * draw(st.sampled_from([1, 2, 4, 8]))
        else:
            del data[at : at + draw(st.sampled_from([1, 2, 4, 8]))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(start, len(data)))]
    return bytes(data)


# --- the common-element shortcut against the element-by-element walk ------------------------------------


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("cut", [None, 0, 7, 8, 11, 12, 200, 1000, -300])
def test_the_walker_reads_what_the_element_by_element_walk_reads(name: str, cut: int | None) -> None:
    data = FILES[name]
    start = _data_set_start(data)
    end = len(data) if cut is None else (start + cut if cut >= 0 else len(data) + cut)
    view = memoryview(data)[:end]
    implicit = name.startswith("implicit")
    mine = _outcome(fastheader._walk, view, start, end, implicit)
    assert mine == _outcome(_reference_walk, view, start, end, implicit)
    # and with the file's end further on: the walk stops at ``end`` all the same
    whole = memoryview(data)
    assert _outcome(fastheader._walk, whole, start, end, implicit) == _outcome(
        _reference_walk, whole, start, end, implicit
    )


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("element", [0xE000, 0xE00D, 0xE0DD])
def test_an_item_or_delimiter_outside_a_sequence_is_declined_by_both_walks(
    name: str, implicit: bool, element: int
) -> None:
    """The case the fuzzing below found once in CI: the group of the first element made FFFE."""
    data = bytearray(FILES[name])
    start = _data_set_start(data)
    struct.pack_into("<HH", data, start, 0xFFFE, element)
    view = memoryview(bytes(data))
    mine = _outcome(fastheader._walk, view, start, len(data), implicit)
    assert mine == "Declined"
    assert mine == _outcome(_reference_walk, view, start, len(data), implicit)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_damaged(), st.booleans())
def test_damaged_headers_are_walked_as_the_element_by_element_walk_walks_them(
    case: tuple[str, bytes], implicit: bool
) -> None:
    _, data = case
    start = _data_set_start(FILES[case[0]])
    view = memoryview(data)
    assert _outcome(fastheader._walk, view, start, len(data), implicit) == _outcome(
        _reference_walk, view, start, len(data), implicit
    )


# --- walking against the file walked before --------------------------------------------------------------


def _both_walks(earlier: bytes, data: bytes) -> tuple[object, object, Alike]:
    alike = Alike()
    with contextlib.suppress(Declined):  # a damaged earlier file: the walk goes on without it
        walk(earlier, alike)

    def outcome(walker: Alike | None) -> object:
        try:
            walked = walk(data, walker)
        except Declined as exc:
            return type(exc).__name__
        return list(walked.values.items()), walked.pixel_offset, walked.implicit

    return outcome(alike), outcome(None), alike


def test_the_files_of_a_series_are_walked_against_each_other_to_the_same_values() -> None:
    series = [dicomgen.to_bytes(ds) for ds in dicomgen.make_series(8, thickness=1.25)]
    random.Random(4).shuffle(series)
    alike, followed = Alike(), 0
    for data in series:
        against, plain = walk(data, alike), walk(data)
        assert list(against.values.items()) == list(plain.values.items())
        assert against.pixel_offset == plain.pixel_offset
        followed += alike.followed
    assert followed == len(series)  # each after the first was followed to its Pixel Data


@pytest.mark.parametrize("earlier", sorted(FILES))
@pytest.mark.parametrize("name", sorted(FILES))
def test_a_file_of_another_kind_is_walked_to_the_same_values(earlier: str, name: str) -> None:
    against, plain, _ = _both_walks(FILES[earlier], FILES[name])
    assert against == plain


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_damaged(), _damaged())
def test_a_damaged_file_walked_against_another_gives_the_plain_walks_result(
    earlier: tuple[str, bytes], case: tuple[str, bytes]
) -> None:
    against, plain, _ = _both_walks(earlier[1], case[1])
    assert against == plain


with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    SERIES = [dicomgen.to_bytes(ds) for ds in dicomgen.make_series(3, thickness=1.25)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_damaged_file_walked_where_the_series_differed_before_gives_the_plain_walks_result(
    data: st.DataObject,
) -> None:
    """The elements the walk before stepped one by one are tried first: whatever a file has there."""
    alike = Alike()
    walk(SERIES[0], alike)
    walk(SERIES[1], alike)
    assert alike.changed  # the SOP Instance UID, InstanceNumber, ImagePositionPatient, SliceLocation
    damaged = data.draw(_edits_of(SERIES[2]))

    def outcome(walker: Alike | None) -> object:
        try:
            walked = walk(damaged, walker)
        except Declined as exc:
            return type(exc).__name__
        return list(walked.values.items()), walked.pixel_offset, walked.implicit

    assert outcome(alike) == outcome(None)


def _edits_of(original: bytes) -> st.SearchStrategy[bytes]:
    return st.composite(lambda draw: _edited(draw, original))()


def test_a_value_that_changes_length_shifts_the_rest_and_is_still_read_exactly() -> None:
    first, second = dicomgen.make_series(2)
    second.SOPInstanceUID = second.SOPInstanceUID + ".7"  # longer: everything after it moves
    second.ImagePositionPatient = ["-1.5", "2", "300.25"]
    second.AcquisitionNumber = "12345"
    earlier, data = dicomgen.to_bytes(first), dicomgen.to_bytes(second)
    against, plain, alike = _both_walks(earlier, data)
    assert against == plain and alike.followed


def _interleaved_series() -> list[tuple[int, bytes]]:
    """(series index, file) of three series of one study whose headers differ beyond the
    per-file elements (thickness, kernel, description), their files shuffled together."""
    study = "1.2.826.0.1.3680043.8.498.77"
    kinds = [
        {"thickness": 1.25, "kernel": "B70f\\LUNG", "description": "CHEST LUNG"},
        {"thickness": 5.0, "kernel": "B30f", "description": "CHEST SOFT TISSUE", "series_number": 3},
        {"thickness": 2.0, "kernel": "FC52", "description": "THIN", "series_number": 4},
    ]
    files = [
        (k, dicomgen.to_bytes(ds))
        for k, kind in enumerate(kinds)
        for ds in dicomgen.make_series(5, study_uid=study, **kind)  # type: ignore[arg-type]
    ]
    random.Random(7).shuffle(files)
    return files


def test_interleaved_series_walked_against_their_own_folders_layouts_give_the_plain_walks_values() -> None:
    """Each file walked against the last file of its key (the scan's folder) reads the walker's
    values, and steps one by one only the few elements that differ inside a series; walked
    against the last file of any series, the other series' files step many more."""
    files = _interleaved_series()

    def walk_all(key_of: dict[int, object]) -> list[int]:
        alike, stepped = Alike(), []
        seen: set[object] = set()
        for k, data in files:
            alike.use(key_of[k])
            against, plain = walk(data, alike), walk(data)
            assert list(against.values.items()) == list(plain.values.items())
            assert against.pixel_offset == plain.pixel_offset
            if key_of[k] in seen:
                stepped.append(len(alike.changed))
            seen.add(key_of[k])
        return stepped

    own = walk_all({0: "SE02", 1: "SE03", 2: "SE04"})
    shared = walk_all(dict.fromkeys(range(3), ""))  # one folder: the last file of any series
    assert max(own) <= 4  # SOP Instance UID, InstanceNumber, ImagePositionPatient, SliceLocation
    assert max(shared) > max(own)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 12), min_size=15, max_size=15))
def test_any_keys_given_to_the_walk_against_earlier_files_leave_the_values_the_walkers(
    keys: list[int],
) -> None:
    """The key only chooses the file to compare with: keys that mix series, and more keys than
    layouts are kept for (the least recently used forgotten), read the same values."""
    alike = Alike()
    for key, (_, data) in zip(keys, _interleaved_series(), strict=True):
        alike.use(key)
        against, plain = walk(data, alike), walk(data)
        assert list(against.values.items()) == list(plain.values.items())
        assert against.pixel_offset == plain.pixel_offset


def test_the_scan_of_interleaved_series_in_folders_gives_the_facts_of_each_file_read_alone() -> None:
    members = [
        Member(f"EXPORT/SE0{k + 2}/IM{i:04d}", len(b), lambda b=b: b)
        for i, (k, b) in enumerate(_interleaved_series())
    ]
    alone = {m.name: read_instance(m) for m in members}
    result = scan_members(members)
    found = [i for study in result.studies for s in study.series.values() for i in s.instances]
    assert len(found) == len(members) and len(result.studies[0].series) == 3
    for series in result.studies[0].series.values():  # each series is the files of one folder
        assert len({i.member.name.split("/")[1] for i in series.instances}) == 1
    for instance in found:
        single = alone[instance.member.name]
        assert single is not None
        assert instance.facts == single.facts and instance.pixel_offset == single.pixel_offset


def test_a_header_longer_than_the_last_one_of_its_folder_is_read_further_to_the_same_facts() -> None:
    """The scan reads first only a little past where the last file of the folder had its Pixel
    Data: a file whose header goes far past that (a long private value), or ends just inside it,
    is read further and gives the facts read alone; files larger than HEADER_PREFIX, so that the
    first read is not the whole file."""
    stored = np.zeros((4, 192, 192), np.int16)  # 72 KiB of pixels: more than HEADER_PREFIX
    files = dicomgen.make_series(4, stored=stored)
    for ds, extra in zip(files, (0, 5000, 0, 900), strict=True):
        if extra:
            block = ds.private_block(0x0029, "CTWATCH LONG", create=True)
            block.add_new(0x10, "OB", bytes(extra))
    blobs = [dicomgen.to_bytes(ds) for ds in files]
    assert min(map(len, blobs)) > scan_module.HEADER_PREFIX
    members = [Member(f"SE02/IM{i}", len(b), lambda b=b: b) for i, b in enumerate(blobs)]
    alone = {m.name: read_instance(m) for m in members}
    found = [i for study in scan_members(members).studies for s in study.series.values() for i in s.instances]
    assert sorted(i.member.name for i in found) == sorted(alone)
    for instance in found:
        single = alone[instance.member.name]
        assert single is not None
        assert instance.facts == single.facts and instance.pixel_offset == single.pixel_offset
    for blob, first in zip(blobs, (0, 4096, 5000, scan_module.FIRST_READ), strict=True):
        member = Member("IM", len(blob), lambda b=blob: b)
        single, short = read_instance(member), read_instance(member, Alike(), first)
        assert single is not None and short is not None
        assert short.facts == single.facts and short.pixel_offset == single.pixel_offset


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 §7.1.2), its value padded to even length."""
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return struct.pack("<HH2sHL", group, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _declared_deflated_plain_file(meta_pad: int) -> bytes:
    """A file whose meta declares Deflated over a plain Explicit VR data set whose first element
    ((0008,FFAA) UL) also reads as the start of a raw deflate stored block: inflated, the first
    1024 bytes of the data set verify as Implicit VR elements, the first 1000-odd do not (its
    first inflated element is 1011 bytes long). ``meta_pad``: bytes of PrivateInformation that
    move the data set's start."""
    ct, deflated = b"1.2.840.10008.5.1.4.1.1.2", b"1.2.840.10008.1.2.1.99"
    meta = b"".join(
        [
            _element(2, 1, b"OB", b"\0\1"),
            _element(2, 2, b"UI", ct),
            _element(2, 3, b"UI", b"1.2.3.4.5"),
            _element(2, 0x10, b"UI", deflated),
            _element(2, 0x12, b"UI", b"1.2.3"),
            _element(2, 0x100, b"UI", b"1.2.3.9"),
            _element(2, 0x102, b"OB", bytes(meta_pad)),
        ]
    )
    meta = _element(2, 0, b"UL", struct.pack("<L", len(meta))) + meta
    us = [(0x0002, 1), (0x0010, 192), (0x0011, 192), (0x0100, 16), (0x0101, 16), (0x0103, 1)]
    data_set = b"".join(
        [
            _element(8, 0xFFAA, b"UL", b"\0" + struct.pack("<L", 1011) + bytes(35)),
            _element(8, 0x16, b"UI", ct),
            _element(8, 0x18, b"UI", b"1.2.3.4.5"),
            _element(8, 0x60, b"CS", b"CT"),
            _element(0x20, 0xD, b"UI", b"1.2.3.100"),
            _element(0x20, 0xE, b"UI", b"1.2.3.200"),
            _element(0x20, 0x13, b"IS", b"1"),
            _element(0x20, 0x32, b"DS", b"0\\0\\0"),
            _element(0x20, 0x37, b"DS", b"1\\0\\0\\0\\1\\0"),
            *(_element(0x28, e, b"US", struct.pack("<H", v)) for e, v in us[:3]),
            _element(0x28, 0x30, b"DS", b"0.5\\0.5"),
            *(_element(0x28, e, b"US", struct.pack("<H", v)) for e, v in us[3:]),
            _element(0x7FE0, 0x10, b"OW", bytes(192 * 192 * 2)),
        ]
    )
    return bytes(128) + b"DICM" + meta + data_set


def _read_outcome(member: Member, first: int = scan_module.FIRST_READ) -> object:
    try:
        instance = read_instance(member, Alike(), first)
    except scan_module.CorruptDicom as exc:
        return f"CorruptDicom: {exc}"
    return None if instance is None else (instance.facts, instance.pixel_offset)


@pytest.mark.parametrize("meta_pad", [3200, 64518])
def test_a_declared_deflated_body_is_decided_on_the_whole_inflate_window_whatever_the_first_read(
    meta_pad: int,
) -> None:
    """Read on a prefix that ends inside the 1024 bytes the encoding rule inflates, the data set
    above reads as plain; on the whole window (and the whole file), as deflated, which does not
    inflate. Every read decides as the whole file does: the walker's first reads of 4–16 KiB
    (data set at 3.5 KB) and pydicom's 64 KiB prefix (data set at 64,800, Pixel Data inside it)."""
    data = _declared_deflated_plain_file(meta_pad)
    meta_end = 144 + struct.unpack_from("<L", data, 140)[0]
    member = Member("SE1/IM1", len(data), lambda: data)
    whole = Member("SE1/IM1", len(data), lambda: data)
    assert len(data) > scan_module.HEADER_PREFIX
    with pytest.raises(Truncated):
        walk(data[: meta_end + 1000])  # the window cut: more bytes could decide otherwise
    expected = _read_outcome(whole, len(data))
    assert isinstance(expected, str) and expected.startswith("CorruptDicom: its deflated data set")
    for first in (4096, 4500, 6000, scan_module.FIRST_READ):
        assert _read_outcome(member, first) == expected
    short_header = dicomgen.to_bytes(dicomgen.make_series(1, stored=np.zeros((1, 192, 192), np.int16))[0])
    members = [Member("SE1/IM0", len(short_header), lambda: short_header), member]
    result = scan_members(members)  # the folder's first header is short: the second is read from 4 KiB
    assert result.skipped["corrupt DICOM"] == 1
    assert [i.member.name for s in result.studies for se in s.series.values() for i in se.instances] == [
        "SE1/IM0"
    ]


def test_a_folder_whose_headers_alternate_in_length_is_read_further_once() -> None:
    """The first read is the longest header of the folder so far and 1 KiB: files whose headers
    alternate between 6 and 11 KB are read past their first read once, not every other file."""
    stored = np.zeros((12, 192, 192), np.int16)
    files = dicomgen.make_series(12, stored=stored)
    for ds in files[1::2]:
        block = ds.private_block(0x0029, "CTWATCH LONG", create=True)
        block.add_new(0x10, "OB", bytes(5000))
    blobs = [dicomgen.to_bytes(ds) for ds in files]
    reads: list[int] = []

    def member(i: int, blob: bytes) -> Member:
        def span(offset: int, n: int) -> bytes:
            reads.append(n)
            return blob[offset : offset + n]

        return Member(f"DICOM/IM{i:02d}", len(blob), lambda: blob, span=span)

    members = [member(i, b) for i, b in enumerate(blobs)]
    result = scan_members(members)
    assert sum(len(s.instances) for s in result.studies[0].series.values()) == len(blobs)
    further = [n for n in reads if n == scan_module.HEADER_PREFIX]
    # the first long header, and the full header parse of the series' first file (its first 64 KiB)
    assert len(further) == 2, reads


def test_many_interleaved_folders_keep_their_own_layouts() -> None:
    """Twenty series in twenty folders, their files shuffled together: each file after the first
    of its folder is walked against the layout its folder's first file left (none forgotten and
    walked in full again)."""
    study = "1.2.826.0.1.3680043.8.498.78"
    files = [
        (k, dicomgen.to_bytes(ds))
        for k in range(20)
        for ds in dicomgen.make_series(
            3, study_uid=study, series_number=k + 2, description=f"SERIES {k}" * (k + 1)
        )
    ]
    random.Random(11).shuffle(files)
    alike = Alike()
    layouts: dict[int, object] = {}
    for k, data in files:
        alike.use(f"SE{k:02d}")
        against, plain = walk(data, alike), walk(data)
        assert list(against.values.items()) == list(plain.values.items())
        assert alike.layout is layouts.setdefault(k, alike.layout)


def test_more_interleaved_folders_than_layouts_kept_go_on_with_the_current_layout() -> None:
    """Past the layouts kept, a new folder's files are walked against the layout in use (as one
    layout for all did) instead of in full each time its layout was forgotten: no more layouts
    are built than folders kept and one, and the values are the walker's."""
    study = "1.2.826.0.1.3680043.8.498.79"
    folders = alike_module._KEYS_KEPT + 6
    files = [
        (k, dicomgen.to_bytes(ds))
        for k in range(folders)
        for ds in dicomgen.make_series(2, study_uid=study, series_number=k + 2)
    ]
    random.Random(12).shuffle(files)
    alike, built = Alike(), []  # the layouts themselves: an id could be reused once one is freed
    for k, data in files:
        alike.use(k)
        against, plain = walk(data, alike), walk(data)
        assert list(against.values.items()) == list(plain.values.items())
        assert against.pixel_offset == plain.pixel_offset
        if not any(layout is alike.layout for layout in built):
            built.append(alike.layout)
    assert len(built) <= alike_module._KEYS_KEPT + 1


def test_the_scan_gives_the_same_facts_as_reading_each_file_alone() -> None:
    datasets = dicomgen.make_series(6) + dicomgen.make_series(3, series_number=3, thickness=5.0)
    blobs = [dicomgen.to_bytes(ds) for ds in datasets]
    blobs.insert(4, FILES["implicit"])
    blobs.insert(2, FILES["enhanced"])
    members = [Member(f"IM{i}", len(b), lambda b=b: b) for i, b in enumerate(blobs)]
    alone = {m.name: read_instance(m) for m in members}
    for study in scan_members(members).studies:
        for series in study.series.values():
            for instance in series.instances:
                single = alone[instance.member.name]
                assert single is not None
                assert instance.facts == single.facts and instance.pixel_offset == single.pixel_offset


# --- the checks before the data set, answered by an earlier file's prologue ---------------------------------


def _instance_outcome(member: Member, *args: object) -> object:
    """What ``read_instance`` gives: the facts and Pixel Data offset, None, or the exception's class
    and words."""
    try:
        instance = read_instance(member, *args)  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 — compared, class and words
        return type(exc).__name__, str(exc)
    return None if instance is None else (instance.facts, instance.pixel_offset)


def _free_ranges(data: bytes) -> list[tuple[int, int]]:
    """The byte ranges of ``data``'s prologue that a later file may hold otherwise (the gaps
    between its ``same`` ranges)."""
    known = scan_module.prologue_of(data)
    assert known is not None
    gaps, at = [], 0
    for start, stop, _ in known.same:
        if start > at:
            gaps.append((at, start))
        at = stop
    return gaps


@st.composite
def _prologue_edited(draw: st.DrawFn) -> tuple[str, bytes]:
    """A generated file edited at random in its first bytes (preamble, file meta group, the data
    set's first elements): often inside the values a prologue leaves free, else anywhere there."""
    name = draw(st.sampled_from(sorted(FILES)))
    original = FILES[name]
    data = bytearray(original)
    free = _free_ranges(original)
    reach = min(len(data), _data_set_start(original) + 400)
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.booleans()):
            start, stop = draw(st.sampled_from(free))
            at = draw(st.integers(start, stop - 1))
        else:
            at = draw(st.integers(0, reach - 1))
        kind = draw(st.sampled_from(["set", "set", "set", "insert", "delete"]))
        byte = draw(st.sampled_from([0x00, 0x02, 0x20, 0x31, 0x2E, 0xFF, 0xFE, 0xE0, 0x55, 0x49, 0x53, 0x51]))
        if kind == "set":
            data[at] = byte
        elif kind == "insert":
            data[at:at] = bytes([byte]) * draw(st.sampled_from([1, 2, 4]))
        else:
            del data[at : at + draw(st.sampled_from([1, 2, 4]))]
    if draw(st.integers(0, 5)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return name, bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(FILES)), _prologue_edited())
def test_a_file_checked_against_an_earlier_files_prologue_reads_as_it_reads_alone(
    earlier: str, case: tuple[str, bytes]
) -> None:
    """The scan skips the checks before the data set (DICM, elements after it, the file meta
    group, the encoding) for a file that holds the bytes they read in the earlier file of its
    folder: files edited there at random read exactly as each does alone — the same facts and
    offset, not DICOM, or the same exception in the same words."""
    prologues, alike = scan_module.Prologues(), Alike()
    first = Member("S/first", len(FILES[earlier]), lambda: FILES[earlier])
    for _ in range(scan_module._LEARN_FROM):  # learnt from the folder's third file
        assert read_instance(first, alike, scan_module.FIRST_READ, prologues) is not None
    assert prologues.known, "an undamaged file is learnt from"
    _, data = case
    member = Member("S/edited", len(data), lambda: data)
    assert _instance_outcome(member, alike, scan_module.FIRST_READ, prologues) == _instance_outcome(member)


def test_a_series_whose_uids_change_length_is_checked_against_its_prologues() -> None:
    """The files of a series whose SOP Instance UIDs end in 1-, 3- and 5-digit numbers: the file
    meta group's length moves with them, one prologue is learnt for each length, and every other
    file is checked against one; each file's facts are those it has read alone."""
    datasets = dicomgen.make_series(12)
    suffixes = [
        7,
        113,
        24680,
        8,
        250,
        13579,
        9,
        999,
        11111,
        3,
        140,
        22222,
    ]  # 1, 3, 5 digits: 30, 32, 34 bytes
    for ds, suffix in zip(datasets, suffixes, strict=True):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{suffix}"
    blobs = [dicomgen.to_bytes(ds) for ds in datasets]
    members = [Member(f"S/IM{i}", len(b), lambda b=b: b) for i, b in enumerate(blobs)]
    prologues, alike = scan_module.Prologues(), Alike()
    for member in members:
        assert _instance_outcome(member, alike, scan_module.FIRST_READ, prologues) == _instance_outcome(
            member
        )
    # learnt from the 3rd, 4th and 5th files (one of each UID length); the 7 after them match
    assert len(prologues.known) == 3 and prologues.matched == 7


def test_folders_of_one_or_two_files_and_large_file_meta_groups_learn_nothing() -> None:
    """Learning costs about what a match saves: a folder is learnt from from its third file on,
    and a prologue longer than 2 KiB (a large private element in the file meta group) is not kept."""
    blobs = [dicomgen.to_bytes(ds) for ds in dicomgen.make_series(4)]
    prologues, alike = scan_module.Prologues(), Alike()
    for i, data in enumerate(blobs[:2]):
        assert read_instance(Member(f"S/IM{i}", len(data), lambda d=data: d), alike, 4096, prologues)
    assert not prologues.known
    read_instance(Member("S/IM2", len(blobs[2]), lambda: blobs[2]), alike, 4096, prologues)
    assert len(prologues.known) == 1
    ds = dicomgen.make_series(1)[0]
    ds.file_meta.PrivateInformationCreatorUID = "1.2.3"
    ds.file_meta.PrivateInformation = bytes(4000)
    assert scan_module.prologue_of(dicomgen.to_bytes(ds)) is None
    assert scan_module.prologue_of(blobs[3]) is not None
