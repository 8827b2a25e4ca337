"""Uncompressed 16-bit files read straight into the volume's slices give the general path's result.

The general path (``decode._decode_file``) reads the whole member into a buffer, checks its CRC-32
and rescales a view of it; the direct path (``native.read_into_slice``) reads the pixel bytes
into the slice and rescales them there (issue 18). Both are run on the same instances of STORED
ZIPs, folders and nested ZIPs: the HU (dtype and values), the provenance, and the words of every
failure (a bad CRC-32 in the header, the pixels or the bytes after them; a Pixel Data length that
does not match the image) must be the same.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

from processor.bytesource import Member
from processor.dicom import decode, native
from processor.dicom.alike import Alike
from processor.dicom.scan import Series, read_instance, scan_members
from processor.dicom.volume import load_volume
from processor.errors import StepError
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen

SIZE = 24


def _variant(name: str, size: int = SIZE) -> list[Dataset]:
    """Three slices of one kind of uncompressed CT file (see the parametrisation below)."""
    rng = np.random.default_rng(5)
    stored = rng.integers(-2000, 3000, (3, size, size)).astype(np.int16)
    datasets = dicomgen.make_series(3, stored=stored, intercept=-1024.0)
    for ds, frame in zip(datasets, stored, strict=True):
        if name == "implicit":
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif name in ("signed 12 bits", "unsigned 12 bits"):  # garbage above the high bit
            signed = name.startswith("signed")
            ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, int(signed)
            raw = (frame & 0x0FFF) | (rng.integers(0, 16, frame.shape).astype(np.int16) << 12)
            ds.PixelData = raw.astype(np.int16).tobytes()
        elif name == "unsigned 16 bits":
            ds.PixelRepresentation = 0
            ds.PixelData = (frame.astype(np.int32) + 2000).astype(np.uint16).tobytes()
        elif name == "unsigned past int16":  # 65535 − 1024 does not fit int16: the volume is float32
            ds.PixelRepresentation = 0
            ds.PixelData = np.full(frame.shape, 65535, np.uint16).tobytes()
        elif name == "slope 2":
            ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
        elif name == "negative slope":
            ds.RescaleSlope, ds.RescaleIntercept = "-1", "0"
        elif name == "slope 0.5":  # not whole: float32, the general path
            ds.RescaleSlope = "0.5"
        elif name == "no rescale":
            del ds.RescaleSlope, ds.RescaleIntercept
        elif name == "MONOCHROME1":
            ds.PhotometricInterpretation = "MONOCHROME1"
        elif name == "past int16":  # −32768 − 1024 does not fit int16: float32
            ds.PixelData = np.full(frame.shape, -32768, np.int16).tobytes()
        elif name == "edge of int16":  # −31744 − 1024 = −32768 fits
            ds.PixelData = np.full(frame.shape, -31744, np.int16).tobytes()
        elif name == "data after the pixels":
            ds.add_new(0xFFFCFFFC, "OB", bytes(range(10)))  # Data Set Trailing Padding
        elif name == "header past the first read":  # the scan reads 16 KiB, then 64 KiB: found there
            ds.ICCProfile = bytes(20_000)
            ds.add_new(0xFFFCFFFC, "OB", bytes(60_000))  # a member longer than 64 KiB
        elif name == "header past 64 KiB":  # found only in the whole member
            ds.ICCProfile = bytes(70_000)
    return datasets


VARIANTS = [
    "explicit",
    "implicit",
    "signed 12 bits",
    "unsigned 12 bits",
    "unsigned 16 bits",
    "unsigned past int16",
    "slope 2",
    "negative slope",
    "slope 0.5",
    "no rescale",
    "MONOCHROME1",
    "past int16",
    "edge of int16",
    "data after the pixels",
    "header past the first read",
    "header past 64 KiB",
]


def _stored_zip(path: Path, blobs: list[bytes], nested: bool = False) -> Path:
    inner = io.BytesIO()
    with zipfile.ZipFile(inner if nested else path, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, data in enumerate(blobs):
            zf.writestr(f"S/IM{i:04d}", data)
    if nested:
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr("inner.zip", inner.getvalue())
    return path


def _in_memory(blobs: list[bytes]) -> Series:
    members = [Member(f"S/IM{i:04d}", len(b), lambda b=b: b) for i, b in enumerate(blobs)]
    return next(iter(scan_members(members).studies[0].series.values()))


def _same(a: object, b: object) -> None:
    assert type(a) is type(b)
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("where", ["zip", "folder", "nested zip"])
def test_a_volume_read_into_its_slices_equals_the_general_paths(
    tmp_path: Path, name: str, where: str
) -> None:
    blobs = [dicomgen.to_bytes(ds) for ds in _variant(name)]
    reference = load_volume(_in_memory(blobs))  # members without a byte range: the general path
    if where == "folder":
        arrival = tmp_path / "folder"
        arrival.mkdir()
        for i, data in enumerate(blobs):
            (arrival / f"IM{i:04d}").write_bytes(data)
    else:
        arrival = _stored_zip(tmp_path / "s.zip", blobs, nested=where == "nested zip")
    with open_arrival(arrival, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        assert all(i.member.span is not None for i in series.instances)
        volume = load_volume(series)
        hu = np.empty((1, SIZE, SIZE), np.int16)
        assert native.takes(series.instances[0], [0], hu)
        assert not native.takes(series.instances[0], [0], hu.astype(np.float32))  # never into float32
        if name == "slope 0.5":
            assert volume.hu.dtype == np.float32  # not whole: decoded by the general path
        elif name in ("unsigned past int16", "past int16"):  # decoded again, into float32
            with pytest.raises(native.NeedsFloat):
                native.read_into_slice(series.instances[0], hu[0], *_rescale(series))
        else:  # the direct path reads it, it does not hand it on
            assert native.read_into_slice(series.instances[0], hu[0], *_rescale(series))
            assert np.array_equal(hu[0], reference.hu[_slice_of(reference, series)])
    assert volume.hu.dtype == reference.hu.dtype and np.array_equal(volume.hu, reference.hu)
    assert volume.spacing_zyx == reference.spacing_zyx and np.array_equal(volume.affine, reference.affine)
    assert json.dumps(volume.provenance, sort_keys=True, default=str) == json.dumps(
        reference.provenance, sort_keys=True, default=str
    )


def _slice_of(volume: object, series: Series) -> int:
    """The slice of the volume the series' first file became (sorted along the normal)."""
    positions = [i.facts.position[2] for i in series.instances]  # type: ignore[index]
    return sorted(positions).index(positions[0])


def _rescale(series: Series) -> tuple[float, float]:
    facts = series.instances[0].facts
    return facts.slope, facts.intercept


def _outcome(series: Series, into_slice: bool) -> object:
    """The general or the direct path on the series' first file: its HU slice, or its failure."""
    f = series.instances[0].facts
    hu = np.zeros((1, f.rows, f.cols), np.int16)
    targets = [decode._Target(0, 0, f.slope, f.intercept)]
    try:
        decode._read_and_decode(series, 0, targets, hu, into_slice=into_slice)
    except (StepError, native.NeedsFloat) as exc:
        return f"{type(exc).__name__}: {exc}"
    return hu


def _flip(blobs: list[bytes], at: int) -> bytes:
    """The ZIP of ``blobs`` with one byte of the first member's data flipped (its CRC no longer
    matches); ``at`` counts from the member's start (negative: from its end)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for i, data in enumerate(blobs):
            zf.writestr(f"S/IM{i:04d}", data)
    raw = bytearray(buf.getvalue())
    start = raw.index(blobs[0][:200])
    raw[start + (at if at >= 0 else len(blobs[0]) + at)] ^= 0x01
    return bytes(raw)


@pytest.mark.parametrize("at", [200, -100, -3])  # in the header, in the pixels, after them
def test_a_bad_crc_anywhere_in_the_member_fails_in_the_same_words(tmp_path: Path, at: int) -> None:
    big = 192  # 72 KiB of pixels: more than the scan's header prefix, so only the decode reads them
    blobs = [dicomgen.to_bytes(ds) for ds in _variant("data after the pixels", big)]
    path = tmp_path / "crc.zip"
    path.write_bytes(_flip(blobs, at))
    with open_arrival(path, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        direct, general = _outcome(series, True), _outcome(series, False)
    assert isinstance(direct, str) and direct == general
    assert "bad CRC" in direct and series.instances[0].member.name in direct


@pytest.mark.parametrize("change", ["longer", "shorter", "encapsulated"])
def test_a_pixel_data_element_that_does_not_match_fails_in_the_same_words(
    tmp_path: Path, change: str
) -> None:
    datasets = _variant("explicit")
    blobs = [dicomgen.to_bytes(ds) for ds in datasets]
    expected = SIZE * SIZE * 2
    if change == "encapsulated":
        field, _ = dicomgen.pixel_length_at(blobs[0])
        blobs[0] = blobs[0][:field] + b"\xff\xff\xff\xff" + blobs[0][field + 4 :]
    else:
        blobs[0] = dicomgen.with_pixel_length(blobs[0], expected + (8 if change == "longer" else -8))
    with open_arrival(_stored_zip(tmp_path / "s.zip", blobs), Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        direct, general = _outcome(series, True), _outcome(series, False)
    assert isinstance(direct, str) and direct == general


def test_a_file_whose_bytes_changed_since_the_scan_is_decoded_by_the_general_path(tmp_path: Path) -> None:
    """The scan recorded where Pixel Data starts; bytes that no longer show it there are handed on."""
    datasets = _variant("explicit")
    blobs = [dicomgen.to_bytes(ds) for ds in datasets]
    with open_arrival(_stored_zip(tmp_path / "s.zip", blobs), Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        instance = series.instances[0]
        instance.pixel_offset = (instance.pixel_offset or 0) - 2  # as if it moved
        hu = np.zeros((1, SIZE, SIZE), np.int16)
        # handed on (what it read into the slice is written over by the general path, compared below)
        assert not native.read_into_slice(instance, hu[0], instance.facts.slope, instance.facts.intercept)
        direct, general = _outcome(series, True), _outcome(series, False)
    _same(direct, general)
    if isinstance(direct, np.ndarray):
        assert np.array_equal(direct, general)  # type: ignore[arg-type]
    else:
        assert direct == general


@pytest.mark.parametrize("general", [1, 2])
def test_the_first_failure_in_slice_order_is_the_one_reported(tmp_path: Path, general: int) -> None:
    """Files read in place (on this thread, first) and files decoded by the general path fail in
    slice order, as when every file went through the pool: slices 1 and 2 are damaged, one of them
    an 8-bit file (the general path), and the failure names slice 1's file."""
    big = 320  # even 8-bit, more than the scan's header prefix: the damage is found by the decode
    datasets = _variant("explicit", big)
    datasets[general] = dicomgen.to_8bit(datasets[general])
    path = _stored_zip(tmp_path / "mixed.zip", [dicomgen.to_bytes(ds) for ds in datasets])
    damaged = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist()[1:]:  # a bad CRC in the last bytes of slices 1 and 2
            start = info.header_offset + 30 + len(info.filename) + len(info.extra)
            damaged[start + info.file_size - 5] ^= 0x01
    path.write_bytes(bytes(damaged))
    with open_arrival(path, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        hu = np.empty((1, big, big), np.int16)
        by_name = {i.member.name: i for i in series.instances}
        assert native.takes(by_name[f"S/IM{3 - general:04d}"], [0], hu)
        assert not native.takes(by_name[f"S/IM{general:04d}"], [0], hu)
        with pytest.raises(StepError, match="bad CRC") as failure:
            load_volume(series)
    assert "S/IM0001" in str(failure.value) and "S/IM0002" not in str(failure.value)


def _element(group: int, element: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element."""
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HHL", group, element, len(value)) + value


def test_first_elements_longer_than_the_first_read_are_judged_on_more_bytes() -> None:
    """Review of the 16 KiB first read: a bare file whose 3rd element is 20 KB and whose 4th tag
    goes backwards is not DICOM (as when 64 KiB were read first), and a file whose first element
    is 17 KB is read by the lean walker, as before, not handed to pydicom."""
    uids = _element(0x0008, 0x0016, b"1.2.840.10008.5.1.4.1.1.2") + _element(0x0008, 0x0018, b"1.2.3.4")
    rest = _element(0x0020, 0x000D, b"1.2.3") + _element(0x0020, 0x000E, b"1.2.3.5")
    backwards = uids + _element(0x0009, 0x1000, bytes(20_000)) + _element(0x0008, 0x0020, b"20200101")
    backwards += rest + _element(0x7FE0, 0x0010, bytes(70_000))
    members = [Member("bare", len(backwards), lambda: backwards, span=lambda o, n: backwards[o : o + n])]
    result = scan_members(members)
    assert result.dicom_files == 0 and result.skipped == {"not DICOM": 1}
    ds = _variant("explicit")[0]
    ds.add_new(0x00080001, "OB", bytes(17_000))  # the data set's first element ends past 16 KiB
    ds.add_new(0xFFFCFFFC, "OB", bytes(70_000))  # a member longer than 64 KiB
    data = dicomgen.to_bytes(ds)
    for cut in (len(data), 65_537):  # whole, and cut short past 64 KiB (its pixels are whole)
        part = data[:cut]
        member = Member("long", cut, lambda part=part: part, span=lambda o, n, part=part: part[o : o + n])
        instance = read_instance(member, Alike())
        assert instance is not None and instance.pixel_offset == data.index(b"\xe0\x7f\x10\x00")
        assert instance._header is None, "read by the lean walker, not by pydicom"
