"""ct.volume: slice ordering, encodings, enhanced multi-frame, HU rescale, geometry and provenance."""

from __future__ import annotations

import io
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from processor.bytesource import Member
from processor.dicom.frames import slice_normal
from processor.dicom.ordering import order_frames
from processor.dicom.scan import HEADER_PREFIX, Series, scan_members
from processor.dicom.select import SelectionRules, evaluate, series_facts
from processor.dicom.volume import Volume, load_volume
from processor.errors import StepError
from processor.intake.archive import Limits, open_arrival
from tests import dicomgen

REPO = Path(__file__).resolve().parent.parent
SHAPE = (24, 48, 48)


def _series(datasets: list[Dataset]) -> Series:
    blobs = [dicomgen.to_bytes(ds) for ds in datasets]
    members = [Member(f"IM{i:04d}", len(data), lambda data=data: data) for i, data in enumerate(blobs)]
    studies = scan_members(members).studies
    assert len(studies) == 1 and len(studies[0].series) == 1
    return next(iter(studies[0].series.values()))


def _load(datasets: list[Dataset], **kwargs: object) -> Volume:
    return load_volume(_series(datasets), **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def phantom() -> np.ndarray:
    hu, _ = dicomgen.chest_phantom(SHAPE)
    return hu


@pytest.fixture(scope="module")
def classic(phantom: np.ndarray) -> list[Dataset]:
    """Signed stored values (= HU, intercept 0), so every codec must get the sign right."""
    return dicomgen.make_series(SHAPE[0], stored=phantom.astype(np.int16), intercept=0.0, spacing=2.0)


# --- ordering properties ---------------------------------------------------------------------------


def _rotation(ax: float, ay: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    return ry @ rx


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 60),
    ax=st.floats(-0.5, 0.5),
    ay=st.floats(-0.5, 0.5),
    step=st.floats(0.3, 10),
    origin=st.tuples(*[st.floats(-500, 500)] * 3),
    dup=st.lists(st.integers(0, 59), max_size=15),
    drift=st.floats(-0.3, 0.3),
    seed=st.integers(0, 2**32 - 1),
)
def test_order_is_along_the_normal_for_any_shuffle_orientation_and_duplicates(
    n: int,
    ax: float,
    ay: float,
    step: float,
    origin: tuple[float, float, float],
    dup: list[int],
    drift: float,
    seed: int,
) -> None:
    turn = _rotation(ax, ay)  # an oblique but axial orientation
    row, col = turn @ np.array([1.0, 0, 0]), turn @ np.array([0, 1.0, 0])
    normal = slice_normal([*row, *col])
    base = np.asarray(origin)
    # positions along the normal, each also shifted in-plane (tilt-like drift along the column)
    positions = [base + normal * step * k + col * drift * k for k in range(n)]
    copies = [positions[d % n] for d in dup]
    everything = positions + copies
    index = list(range(len(everything)))
    random.Random(seed).shuffle(index)
    shuffled = np.asarray([everything[i] for i in index])
    result = order_frames(shuffled, normal, tiebreak=index)
    d = result.positions_mm
    assert np.all(np.diff(d) > 0)
    assert len(result.order) == n and len(result.dropped) == len(copies)
    np.testing.assert_allclose(d, [(p - base) @ normal + base @ normal for p in positions], atol=1e-6)
    again = order_frames(shuffled[::-1], normal, tiebreak=index[::-1])
    # the same positions whatever the order: relative agreement, and absolute (1e-9 mm) where a
    # position is 0, which rounding leaves as 0.0 one way and -1e-54 the other (hypothesis found it)
    np.testing.assert_allclose(again.positions_mm, d, atol=1e-9)
    assert all(index[i] < n for i in result.order)  # the lowest tiebreak (the original) is kept


def test_phases_split_by_acquisition_and_per_slice_numbers_do_not_shatter_the_stack() -> None:
    normal = np.array([0.0, 0.0, 1.0])
    z = np.arange(10, dtype=float)
    positions = np.array([[0, 0, v] for v in [*z, *z[:8]]])
    result = order_frames(positions, normal, phase_keys={"AcquisitionNumber": ["1"] * 10 + ["2"] * 8})
    phases = result.phases
    assert (phases["split_by"], phases["rule"], phases["chosen"]) == ("AcquisitionNumber", "first", 1)
    assert [(p["keys"], p["frames"], p["z_range_mm"]) for p in phases["phases"]] == [
        (["1"], 10, [0.0, 9.0]),
        (["2"], 8, [0.0, 7.0]),
    ]
    assert len(result.order) == 10 and result.dropped == []
    per_slice = [str(i) for i in range(18)]
    result = order_frames(positions, normal, phase_keys={"AcquisitionNumber": per_slice})
    assert result.phases is None and len(result.order) == 10 and len(result.dropped) == 8


# --- encodings ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", dicomgen.ENCODINGS)
def test_every_lossless_encoding_gives_the_same_hu_bit_for_bit(
    encoding: str, classic: list[Dataset], phantom: np.ndarray
) -> None:
    volume = _load([dicomgen.encode(ds, encoding) for ds in classic])
    assert volume.hu.dtype == np.int16 and volume.hu.shape == SHAPE
    assert np.array_equal(volume.hu, phantom)
    syntax = volume.provenance["transfer_syntaxes"]
    assert len(syntax) == 1
    expected = {
        "native": "1.2.840.10008.1.2.1 ",
        "rle": "1.2.840.10008.1.2.5 ",
        "jpeg-ls": "1.2.840.10008.1.2.4.80 ",
        "jpeg2000": "1.2.840.10008.1.2.4.90 ",
        "jpeg-lossless": "1.2.840.10008.1.2.4.70 ",
    }[encoding]
    assert syntax[0].startswith(expected)
    decoder = volume.provenance["decoder"][0]
    assert decoder == "numpy.frombuffer" if encoding == "native" else decoder.startswith("imagecodecs ")


def test_jpeg_baseline_is_decoded_close_to_the_8bit_original(classic: list[Dataset]) -> None:
    eight = [dicomgen.to_8bit(ds) for ds in classic]
    reference = _load(eight)
    lossy = _load([dicomgen.jpeg_baseline(ds) for ds in eight])
    assert lossy.provenance["transfer_syntaxes"][0].startswith("1.2.840.10008.1.2.4.50 ")
    error = np.abs(lossy.hu - reference.hu)
    assert error.mean() < 16  # two stored steps of 8 HU on average; edges ring more
    assert np.corrcoef(lossy.hu.ravel(), reference.hu.ravel())[0, 1] > 0.99


def test_enhanced_multiframe_equals_classic(classic: list[Dataset], phantom: np.ndarray) -> None:
    reference = _load(classic)
    series = _series([dicomgen.make_enhanced(classic, shuffle_seed=5)])
    facts = series_facts(series)
    assert (facts.image_count, facts.slice_count, facts.kernel, facts.thickness_mm) == (
        24,
        24,
        "STANDARD",
        2.0,
    )
    assert evaluate([facts], SelectionRules())[0].eligible
    enhanced = load_volume(series)
    assert enhanced.provenance["enhanced_multiframe"] and enhanced.provenance["files_read"] == 1
    assert np.array_equal(enhanced.hu, reference.hu) and np.array_equal(enhanced.hu, phantom)
    np.testing.assert_allclose(enhanced.affine, reference.affine)
    assert enhanced.spacing_zyx == reference.spacing_zyx
    compressed = _load([dicomgen.encode(dicomgen.make_enhanced(classic, shuffle_seed=9), "jpeg2000")])
    assert np.array_equal(compressed.hu, phantom)


def test_rescale_is_applied_per_frame_when_it_varies(classic: list[Dataset], phantom: np.ndarray) -> None:
    varied = []
    for k, ds in enumerate(classic):
        ds = dicomgen.encode(ds, "native")
        slope, intercept = (2.0, -1000.0) if k % 2 else (1.0, 0.0)
        stored = ((phantom[k] - intercept) / slope).astype(np.int16)
        ds.PixelData, ds.RescaleSlope, ds.RescaleIntercept = stored.tobytes(), slope, intercept
        varied.append(ds)
    classic_volume = _load(varied)
    enhanced_volume = _load([dicomgen.make_enhanced(varied, shuffle_seed=1)])
    for volume in (classic_volume, enhanced_volume):
        assert volume.provenance["rescale"]["per_frame"] is True
        assert np.array_equal(volume.hu, phantom)


def _raw_series(
    raw: np.ndarray, *, signed: bool, slopes: list[float], intercepts: list[float]
) -> list[Dataset]:
    datasets = dicomgen.make_series(len(raw), stored=np.zeros(raw.shape, np.int16))
    for ds, frame, slope, intercept in zip(datasets, raw, slopes, intercepts, strict=True):
        ds.PixelRepresentation = int(signed)
        ds.PixelData = frame.astype("<i2" if signed else "<u2").tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    return datasets


@pytest.mark.parametrize(
    ("case", "signed", "slope", "intercept", "dtype"),
    [
        ("whole rescale, fits", True, 1.0, -1024.0, np.int16),
        ("whole slope 2", True, 2.0, -1000.0, np.int16),
        ("fractional slope", True, 0.5, -1024.0, np.float32),
        ("fractional intercept", True, 1.0, -1024.5, np.float32),
        ("signed, overflows int16 above", True, 1.0, 1000.0, np.float32),
        ("unsigned 16-bit beyond 32767, shifted back into range", False, 1.0, -32768.0, np.int16),
        ("unsigned 16-bit, does not fit", False, 1.0, 0.0, np.float32),
    ],
)
def test_hu_is_int16_exactly_when_every_value_fits_and_float32_otherwise(
    case: str, signed: bool, slope: float, intercept: float, dtype: type
) -> None:
    rng = np.random.default_rng(3)
    low, high = (-2000, 32000) if signed else (0, 65535)
    raw = rng.integers(low, high, (4, 16, 16), endpoint=True)
    raw[0, 0, 0], raw[1, 0, 0] = low, high  # the extremes are present
    if case == "whole slope 2":
        raw = raw // 4
    volume = _load(_raw_series(raw, signed=signed, slopes=[slope] * 4, intercepts=[intercept] * 4))
    expected = raw.astype(np.float64) * slope + intercept
    assert volume.hu.dtype == dtype and volume.provenance["dtype"] == np.dtype(dtype).name, case
    assert np.array_equal(volume.hu.astype(np.float64), expected.astype(dtype).astype(np.float64)), case
    if dtype == np.int16:
        assert np.array_equal(volume.hu, expected), case  # exact HU


def test_one_frame_that_does_not_fit_makes_the_whole_volume_float32() -> None:
    raw = np.full((4, 8, 8), 100)
    raw[2] = 32000  # + 1000 does not fit int16; found on the third frame
    volume = _load(_raw_series(raw, signed=True, slopes=[1.0] * 4, intercepts=[0.0, 0.0, 1000.0, 0.0]))
    assert volume.hu.dtype == np.float32
    assert volume.hu[2].max() == 33000.0 and volume.hu[0].max() == 100.0


# --- sorting, duplicates, gaps, tilt, geometry -----------------------------------------------------------


def test_sorted_by_position_not_instance_number_with_duplicates_dropped(
    classic: list[Dataset], phantom: np.ndarray, tmp_path: Path
) -> None:
    datasets = [dicomgen.encode(ds, "native") for ds in classic]
    for k, ds in enumerate(datasets):
        ds.InstanceNumber = len(datasets) - k  # reversed numbering must not matter
    twin = dicomgen.encode(datasets[5], "native")
    twin.SOPInstanceUID = twin.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    twin.InstanceNumber = 999
    path = dicomgen.write_zip(tmp_path / "s.zip", [*datasets, twin], shuffle_seed=3)
    steps = [{"id": "series", "uses": "dicom.select_series"}, {"id": "volume", "uses": "ct.volume"}]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success"
    volume = ctx.values["volume"]
    assert np.array_equal(volume.hu, phantom)
    info = ctx.result["volume"]
    assert info["duplicates_dropped"] == 1 and info["sorted_by"].startswith("ImagePositionPatient")
    assert info["shape"] == list(SHAPE) and info["spacing_zyx"] == [2.0, 0.66, 0.66]
    assert info["spacing"]["uneven"] is False and info["tilt_degrees"] == 0.0
    assert any("dropped" in w for w in ctx.warnings)


def test_gaps_are_detected_and_recorded(classic: list[Dataset]) -> None:
    kept = [ds for k, ds in enumerate(classic) if k not in (10, 11)]
    volume = _load(kept)
    spacing = volume.provenance["spacing"]
    assert spacing["uneven"] is True and spacing["gaps"] == [{"after_slice": 9, "step_mm": 6.0}]
    assert volume.hu.shape[0] == SHAPE[0] - 2


def test_gantry_tilt_is_detected_and_in_the_affine() -> None:
    tilt = math.radians(12)
    orientation = (1, 0, 0, 0, math.cos(tilt), -math.sin(tilt))
    datasets = dicomgen.make_series(22, orientation=orientation)
    for k, ds in enumerate(datasets):  # the table moves along z; the image plane leans by the tilt
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
    volume = _load(datasets)
    assert volume.provenance["tilt_degrees"] == pytest.approx(12, abs=0.01) and volume.provenance["tilted"]
    np.testing.assert_allclose(volume.affine[:3, 2], [0, 0, 2.5], atol=1e-6)


def test_affine_maps_column_row_slice_indices_to_patient_mm() -> None:
    datasets = dicomgen.make_series(20, origin=(-100, -120, 40), spacing=1.5, pixel_spacing=0.7)
    volume = _load(datasets)
    expected = np.array([-100 + 0.7 * 3, -120 + 0.7 * 5, 40 + 1.5 * 7, 1])
    np.testing.assert_allclose(volume.affine @ [3, 5, 7, 1], expected, atol=1e-6)
    np.testing.assert_allclose(volume.positions_mm, 40 + 1.5 * np.arange(20), atol=1e-6)
    assert volume.spacing_zyx == (1.5, 0.7, 0.7)


def test_series_without_geometry_fails_with_a_fix() -> None:
    datasets = dicomgen.make_series(20)
    for ds in datasets:
        del ds.ImagePositionPatient
    with pytest.raises(StepError, match="cannot be stacked"):
        _load(datasets)


def test_missing_decoder_names_the_package_to_install(tmp_path: Path, classic: list[Dataset]) -> None:
    """In a fresh interpreter where pylibjpeg, pylibjpeg-libjpeg and imagecodecs cannot be imported,
    JPEG lossless names the package to install."""
    folder = dicomgen.write_folder(
        tmp_path / "jpegll", [dicomgen.encode(ds, "jpeg-lossless") for ds in classic]
    )
    script = (
        "import sys; sys.modules['pylibjpeg'] = sys.modules['libjpeg'] = sys.modules['imagecodecs'] = None\n"
        "from pathlib import Path\n"
        "from processor.dicom.scan import scan_members\n"
        "from processor.dicom.volume import load_volume\n"
        "from processor.errors import StepError\n"
        "from processor.intake.archive import Limits, open_arrival\n"
        f"with open_arrival(Path({str(folder)!r}), Limits()) as c:\n"
        "    series = next(iter(scan_members(c.members).studies[0].series.values()))\n"
        "    try:\n"
        "        load_volume(series)\n"
        "    except StepError as exc:\n"
        "        print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "no decoder installed" in done.stdout and "pip install pylibjpeg pylibjpeg-libjpeg" in done.stdout


# --- native pixels read where the header scan found them ----------------------------------------------


def _native_study(
    tmp_path: Path, syntax: str, bits_stored: int, private_bytes: int = 0
) -> tuple[Path, np.ndarray]:
    """A ZIP of 256×256 slices (larger than the scan's header prefix) and the HU they must give."""
    rng = np.random.default_rng(7)
    low, high = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    values = rng.integers(low, high, (4, 256, 256), endpoint=True).astype(np.int16)
    raw = values
    if bits_stored < 16:  # garbage above the high bit, which decoding must ignore
        noise = rng.integers(0, 1 << (16 - bits_stored), values.shape).astype(np.int16) << bits_stored
        raw = (values & ((1 << bits_stored) - 1)) | noise
    datasets = dicomgen.make_series(4, stored=values, intercept=-1024.0)
    for ds, frame in zip(datasets, raw, strict=True):
        ds.BitsStored, ds.HighBit, ds.PixelData = bits_stored, bits_stored - 1, frame.tobytes()
        ds.file_meta.TransferSyntaxUID = syntax
        if private_bytes:
            ds.private_block(0x0009, "CTWATCH TEST", create=True).add_new(0x10, "OB", bytes(private_bytes))
    path = dicomgen.write_zip(tmp_path / "native.zip", datasets)
    return path, values.astype(np.float32) + np.float32(-1024.0)


@pytest.mark.parametrize("bits_stored", [16, 12])
@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
)
def test_native_pixels_are_read_at_the_offset_the_scan_found(
    tmp_path: Path, syntax: str, bits_stored: int
) -> None:
    path, expected = _native_study(tmp_path, syntax, bits_stored)
    with open_arrival(path, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        offsets = [i.pixel_offset for i in series.instances]
        # deflated datasets are inflated by pydicom: no offset in the member's bytes, parsed in full
        assert all((o is None) == (syntax == DeflatedExplicitVRLittleEndian) for o in offsets)
        assert all(o is None or o < HEADER_PREFIX for o in offsets)
        volume = load_volume(series)
    assert np.array_equal(volume.hu, expected)
    assert volume.provenance["decoder"] == ["numpy.frombuffer"]


def test_header_longer_than_the_prefix_is_read_whole(tmp_path: Path) -> None:
    path, expected = _native_study(tmp_path, ExplicitVRLittleEndian, 16, private_bytes=HEADER_PREFIX + 4096)
    with open_arrival(path, Limits()) as contents:
        series = next(iter(scan_members(contents.members).studies[0].series.values()))
        assert len(series.instances) == 4
        assert all(i.pixel_offset is not None and i.pixel_offset > HEADER_PREFIX for i in series.instances)
        volume = load_volume(series)
    assert np.array_equal(volume.hu, expected)


def test_big_endian_pixels_give_the_same_int16_hu() -> None:
    stored = (np.arange(3 * 16 * 16, dtype=np.int16).reshape(3, 16, 16) * 7 - 1500).astype(np.int16)
    datasets = []
    for k, ds in enumerate(dicomgen.make_series(3, stored=stored)):
        fresh = Dataset()  # read from a little-endian file, pydicom would refuse to write it big endian
        for element in ds:
            if element.keyword != "PixelData":
                fresh.add(element)
        fresh.PixelData = stored[k].astype(">i2").tobytes()
        fresh["PixelData"].VR = "OW"
        fresh.file_meta = ds.file_meta
        fresh.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        datasets.append(fresh)
    blobs = []
    for ds in datasets:
        buf = io.BytesIO()
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        blobs.append(buf.getvalue())
    members = [Member(f"IM{i}", len(b), lambda b=b: b) for i, b in enumerate(blobs)]
    volume = load_volume(next(iter(scan_members(members).studies[0].series.values())), workers=1)
    assert volume.hu.dtype == np.int16
    assert np.array_equal(volume.hu, stored.astype(np.int32) - 1024)
