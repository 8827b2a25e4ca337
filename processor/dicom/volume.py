"""Pixels of one chosen series → an HU volume with its geometry and a record of what was done.

Conventions
-----------
* ``hu`` holds Hounsfield units shaped ``(z, y, x)`` = (slice k, row j, column i). It is **int16**
  whenever that is exact — every frame's RescaleSlope and RescaleIntercept are whole numbers and
  every rescaled value fits (checked on each frame's stored minimum and maximum) — which is
  nearly every CT; otherwise float32. Never float64. Consumers compute in float32/float64 from it. Slices are sorted by their
  position along the slice normal ``n = row_cosines × column_cosines`` (ascending), so for a
  standard head-first axial series slice 0 is the most inferior (feet-most) slice.
* ``spacing_zyx`` is (median slice step along the normal, PixelSpacing[0] between rows,
  PixelSpacing[1] between columns) in mm.
* ``affine`` is 4×4 and maps homogeneous voxel indices ``(i, j, k, 1)`` — column, row, slice, i.e.
  ``hu[k, j, i]`` — to DICOM patient coordinates (LPS: +x patient left, +y posterior, +z head) in
  mm: ``p = P0 + i·Δcol·row_cosines + j·Δrow·column_cosines + k·step``, where ``step`` is the mean
  position-to-position vector (it leans off the normal when the gantry was tilted).

Decoding: only the chosen frames are read. Uncompressed pixel data becomes a zero-copy
``np.frombuffer`` view (of the memory-mapped ZIP or file, see ``processor.intake.archive``) that
is rescaled straight into the one preallocated volume; for Implicit/Explicit VR Little Endian
files the view starts at the Pixel Data offset the header scan found, so the file is not parsed
again (deflated, unusual layouts and
compressed syntaxes are parsed in full by pydicom); compressed frames (JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE)
go through pydicom's decoders (pylibjpeg + plugins, gdcm when installed) on a small thread pool.
"""

from __future__ import annotations

import io
import logging
import math
import os
import struct
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from processor.dicom.frames import DUPLICATE_TOLERANCE_MM, Frame, frames_of, order_frames, slice_normal
from processor.dicom.scan import PIXEL_DATA_TAG, Instance, Series
from processor.errors import StepError
from processor.intake.archive import Buffer

log = logging.getLogger(__name__)

NATIVE = {ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
_NATIVE_DTYPES = {8: ("u1", "i1"), 16: ("<u2", "<i2"), 32: ("<u4", "<i4")}
_JPEG = "pip install pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_J2K = "pip install pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
INSTALL_HINTS = {
    "1.2.840.10008.1.2.4.50": _JPEG, "1.2.840.10008.1.2.4.51": _JPEG,
    "1.2.840.10008.1.2.4.57": _JPEG, "1.2.840.10008.1.2.4.70": _JPEG,
    "1.2.840.10008.1.2.4.80": "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.81": "pip install pylibjpeg pylibjpeg-libjpeg (or pyjpegls, or python-gdcm)",
    "1.2.840.10008.1.2.4.90": _J2K, "1.2.840.10008.1.2.4.91": _J2K,
    "1.2.840.10008.1.2.4.201": _J2K, "1.2.840.10008.1.2.4.202": _J2K, "1.2.840.10008.1.2.4.203": _J2K,
    "1.2.840.10008.1.2.5": "pip install pylibjpeg pylibjpeg-rle (pydicom's own RLE decoder needs numpy)",
}
UNEVEN_TOLERANCE = 0.02  # relative deviation from the median step that counts as uneven
GAP_FACTOR = 1.5  # a step this many times the median is a gap
TILT_WARN_DEG = 0.5


@dataclass
class Volume:
    """A decoded series: HU voxels, geometry, and provenance (see the module docstring)."""

    hu: np.ndarray
    spacing_zyx: tuple[float, float, float]
    affine: np.ndarray
    positions_mm: np.ndarray  # each slice's position along the normal, ascending
    series_uid: str
    provenance: dict = field(default_factory=dict)

    @property
    def row_cosines(self) -> np.ndarray:
        return self.affine[:3, 0] / self.spacing_zyx[2]

    @property
    def column_cosines(self) -> np.ndarray:
        return self.affine[:3, 1] / self.spacing_zyx[1]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_zyx))


@dataclass(frozen=True)
class _Target:
    frame: int  # frame index inside the file
    k: int  # slice index in the volume
    slope: float
    intercept: float


def plan_frames(series: Series, tol: float = DUPLICATE_TOLERANCE_MM) -> tuple[list[Frame], np.ndarray, dict]:
    """The frames to decode sorted along the normal, their positions on it (mm), and the provenance."""
    every = frames_of(series)
    frames = [f for f in every if f.position is not None and f.orientation is not None]
    if not frames:
        raise StepError(f"series {series.number}: no image has ImagePositionPatient/ImageOrientationPatient; "
                        "the slices cannot be stacked — export the original axial series")
    orientation = frames[0].orientation
    assert orientation is not None
    if any(not np.allclose(np.asarray(f.orientation, float), orientation, atol=1e-3) for f in frames):
        raise StepError(f"series {series.number}: slices have different orientations; "
                        "choose a series with one orientation (dicom.select_series rejects such series)")
    if len({(f.rows, f.cols) for f in frames}) > 1:
        raise StepError(f"series {series.number}: slices have different sizes; choose another series")
    normal = slice_normal(orientation)
    ordering = order_frames(
        np.asarray([f.position for f in frames]), normal,
        tiebreak=[f.instance_number * 100_000 + f.frame for f in frames],
        phase_keys={"temporal position": [f.temporal for f in frames],
                    "AcquisitionNumber": [f.acquisition for f in frames]}, tol=tol)
    kept = [frames[i] for i in ordering.order]
    info: dict = {"sorted_by": "ImagePositionPatient · slice normal",
                  "normal": [round(float(v), 6) for v in normal],
                  "frames_in_series": len(every), "frames_without_position": len(every) - len(frames),
                  "frames_used": len(kept),
                  "duplicates_dropped": len(ordering.dropped), "phases_split": ordering.phases}
    if ordering.dropped:
        log.warning("volume.duplicates series=%s dropped=%d", series.number, len(ordering.dropped))
    info.update(_spacing_info(ordering.positions_mm))
    return kept, ordering.positions_mm, info


def _spacing_info(d: np.ndarray) -> dict:
    steps = np.diff(d)
    if len(steps) == 0:
        return {"spacing": {"median_mm": None, "min_mm": None, "max_mm": None, "uneven": False, "gaps": []}}
    median = float(np.median(steps))
    uneven = bool(np.any(np.abs(steps - median) > max(0.01, UNEVEN_TOLERANCE * median)))
    gaps = [{"after_slice": int(k), "step_mm": round(float(s), 3)} for k, s in enumerate(steps)
            if s > GAP_FACTOR * median]
    return {"spacing": {"median_mm": round(median, 4), "min_mm": round(float(steps.min()), 4),
                        "max_mm": round(float(steps.max()), 4), "uneven": uneven, "gaps": gaps}}


def geometry(kept: list[Frame], median_step: float | None) -> tuple[np.ndarray, tuple[float, float, float], float]:
    """(affine, spacing_zyx, tilt in degrees) of the sorted frames."""
    orientation = np.asarray(kept[0].orientation, float)
    row, col = orientation[:3], orientation[3:]
    normal = slice_normal(orientation)
    d_row, d_col = kept[0].pixel_spacing or (1.0, 1.0)
    first = np.asarray(kept[0].position, float)
    if len(kept) > 1:
        step = (np.asarray(kept[-1].position, float) - first) / (len(kept) - 1)
        cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
        tilt = math.degrees(math.acos(min(1.0, cos)))
    else:
        step = normal * (kept[0].thickness or 1.0)
        tilt = 0.0
    affine = np.eye(4)
    affine[:3, 0] = row * d_col
    affine[:3, 1] = col * d_row
    affine[:3, 2] = step
    affine[:3, 3] = first
    z = median_step if median_step else float(np.linalg.norm(step))
    return affine, (float(z), float(d_row), float(d_col)), tilt


def _decoder(ts: UID) -> Callable[..., tuple[np.ndarray, dict]]:
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise StepError(f"transfer syntax {ts} ({ts.name}) has no pixel decoder in ctwatch; convert the "
                        "series to an uncompressed syntax first (e.g. `gdcmconv --raw` or dcmtk `dcmdjpeg`)") from exc
    if not decoder.is_available:
        hint = INSTALL_HINTS.get(str(ts), "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg")
        raise StepError(f"cannot decode {ts.name} pixel data: no decoder installed. Fix: {hint}")
    return decoder.as_array


@dataclass(frozen=True)
class PixelFormat:
    """How uncompressed pixels are laid out (Image Pixel module)."""

    bits_allocated: int
    bits_stored: int
    signed: bool
    samples: int
    frames: int
    rows: int
    cols: int

    @classmethod
    def of_instance(cls, instance: Instance) -> PixelFormat | None:
        f = instance.facts
        if f.bits_allocated is None:
            return None
        return cls(f.bits_allocated, f.bits_stored or f.bits_allocated, f.pixel_representation == 1,
                   f.samples_per_pixel, f.number_of_frames, f.rows, f.cols)

    @classmethod
    def of_dataset(cls, ds: Dataset) -> PixelFormat:
        bits = int(ds.BitsAllocated)
        return cls(bits, int(ds.get("BitsStored", bits)), int(ds.get("PixelRepresentation", 0)) == 1,
                   int(ds.get("SamplesPerPixel", 1)), int(ds.get("NumberOfFrames", 1) or 1),
                   int(ds.Rows), int(ds.Columns))


def _native_frames(fmt: PixelFormat | None, pixels: Buffer) -> np.ndarray | None:
    """(frames, rows, cols) zero-copy view of uncompressed ``pixels``, or None for unusual layouts."""
    if fmt is None or fmt.bits_allocated not in _NATIVE_DTYPES or fmt.samples != 1:
        return None
    bits, stored, signed = fmt.bits_allocated, fmt.bits_stored, fmt.signed
    n, rows, cols = fmt.frames, fmt.rows, fmt.cols
    arr = np.frombuffer(pixels, dtype=_NATIVE_DTYPES[bits][signed], count=n * rows * cols)
    arr = arr.reshape(n, rows, cols)
    if stored < bits:
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & ((1 << stored) - 1)
    return arr


class _NeedsFloat(Exception):
    """A rescaled value does not fit int16: decode the series again into float32."""


_INT16 = np.iinfo(np.int16)


def _wrapped(value: int) -> np.int16:
    """``value`` modulo 2¹⁶ as an int16 (arithmetic below wraps; the checked result is exact)."""
    return np.int16(((value + 0x8000) & 0xFFFF) - 0x8000)


def _rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """HU = stored × slope + intercept, written into ``out`` (an int16 or float32 slice).

    int16: slope and intercept are whole numbers and the frame's extremes, rescaled, fit — so the
    16-bit wrapping arithmetic (done in place, no temporary) gives the exact values; otherwise
    :class:`_NeedsFloat`. float32: converted, scaled and shifted in place.
    """
    if stored.shape != out.shape:
        raise StepError(f"a decoded frame is {stored.shape}, expected {out.shape}; the file's Rows/Columns "
                        "do not match its pixel data — re-export the series")
    if out.dtype == np.float32:
        out[...] = stored
        if slope != 1.0:
            out *= np.float32(slope)
        if intercept != 0.0:
            out += np.float32(intercept)
        return
    if not stored.dtype.isnative:  # big-endian pixel data: values first, then the 16-bit view below
        stored = stored.astype(stored.dtype.newbyteorder("="))
    m, b = int(slope), int(intercept)
    ends = (int(stored.min()) * m + b, int(stored.max()) * m + b) if stored.size else (0, 0)
    if min(ends) < _INT16.min or max(ends) > _INT16.max:
        raise _NeedsFloat
    if stored.dtype.itemsize == 2:
        as16 = stored.view(np.int16)  # uint16 read as int16 is the same value modulo 2¹⁶
        if m == 1:
            np.add(as16, _wrapped(b), out=out)
        else:
            np.multiply(as16, _wrapped(m), out=out)
            out += _wrapped(b)
    else:
        np.copyto(out, stored.astype(np.int64) * m + b, casting="unsafe")


def _located_pixels(instance: Instance, data: Buffer) -> memoryview | None:
    """The value of the Pixel Data element the scan located in ``data``, for little-endian native syntaxes.

    None (parse the file in full instead) unless the element sits where the header parse stopped,
    is encoded as that parse read it (implicit, or explicit OB/OW) and has a defined length.
    """
    facts, at = instance.facts, instance.pixel_offset
    ts = facts.transfer_syntax
    if at is None or ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian) or \
            data[at:at + 4] != PIXEL_DATA_TAG or facts.implicit != (ts == ImplicitVRLittleEndian):
        return None
    if ts == ImplicitVRLittleEndian:
        start = at + 8
    elif data[at + 4:at + 6] in (b"OB", b"OW") and data[at + 6:at + 8] == b"\0\0":
        start = at + 12
    else:
        return None
    if len(data) < start:
        return None
    (length,) = struct.unpack_from("<L", data, start - 4)
    return None if length == 0xFFFFFFFF else memoryview(data)[start:start + length]


def _decode_file(instance: Instance, data: Buffer, targets: list[_Target], hu: np.ndarray) -> tuple[str, str]:
    """Decode the wanted frames of one file into ``hu``; returns (transfer syntax, decoder used)."""
    pixels = _located_pixels(instance, data)
    frames = _native_frames(PixelFormat.of_instance(instance), pixels) if pixels is not None else None
    if frames is not None:
        for t in targets:
            _rescale_into(hu[t.k], frames[t.frame], t.slope, t.intercept)
        return instance.facts.transfer_syntax, "numpy.frombuffer"
    ds = pydicom.dcmread(io.BytesIO(data))
    ts = ds.file_meta.TransferSyntaxUID
    if "PixelData" not in ds:
        raise StepError("an image of the chosen series has no pixel data (float or double pixel data "
                        "is not CT); re-export the series")
    frames = _native_frames(PixelFormat.of_dataset(ds), ds.PixelData) if ts in NATIVE else None
    if frames is not None:
        for t in targets:
            _rescale_into(hu[t.k], frames[t.frame], t.slope, t.intercept)
        return str(ts), "numpy.frombuffer"
    as_array = _decoder(ts)
    for t in targets:
        arr, _ = as_array(ds, index=t.frame, raw=True)
        _rescale_into(hu[t.k], arr, t.slope, t.intercept)
    return str(ts), "pydicom, plugins tried in order: " + ", ".join(get_decoder(ts).available_plugins)


def _read_and_decode(series: Series, index: int, targets: list[_Target], hu: np.ndarray) -> tuple[str, str]:
    instance = series.instances[index]
    try:
        return _decode_file(instance, instance.member.data(), targets, hu)
    except (StepError, _NeedsFloat):
        raise
    except (OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise StepError(f"cannot read {instance.member.name} ({exc}): the member is corrupt (bad CRC) or "
                        "truncated — copy the study again from the source") from exc
    except (ValueError, RuntimeError, AttributeError, KeyError, EOFError) as exc:
        raise StepError(f"cannot decode {instance.member.name}: {exc}. Fix: check the file with "
                        "`dcmdump`/`gdcminfo`; a missing codec names the package to install") from exc


def _exact_in_int16(kept: list[Frame]) -> bool:
    return all(float(f.slope).is_integer() and float(f.intercept).is_integer() and
               abs(f.slope) <= _INT16.max and abs(f.intercept) <= 1 << 20 for f in kept)


def decode_into(series: Series, kept: list[Frame], workers: int = 4) -> tuple[np.ndarray, dict]:
    """Decode the kept frames into one preallocated (z, y, x) int16 array, or float32 when int16 is not exact."""
    if _exact_in_int16(kept):
        try:
            return _decode_as(series, kept, workers, np.int16)
        except _NeedsFloat:
            log.info("volume.float32 series=%s: a rescaled value does not fit int16", series.number)
    return _decode_as(series, kept, workers, np.float32)


def _decode_as(series: Series, kept: list[Frame], workers: int, dtype: type) -> tuple[np.ndarray, dict]:
    hu = np.empty((len(kept), kept[0].rows, kept[0].cols), dtype=dtype)
    by_file: dict[int, list[_Target]] = defaultdict(list)
    for k, f in enumerate(kept):
        by_file[f.instance].append(_Target(f.frame, k, f.slope, f.intercept))
    jobs = list(by_file.items())
    workers = min(workers, os.cpu_count() or 1)
    if workers <= 1 or len(jobs) == 1:
        results = [_read_and_decode(series, i, targets, hu) for i, targets in jobs]
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ctwatch-decode") as pool:
            results = list(pool.map(lambda job: _read_and_decode(series, job[0], job[1], hu), jobs))
    syntaxes = sorted({ts for ts, _ in results})
    decoders = sorted({dec for _, dec in results})
    return hu, {"transfer_syntaxes": [f"{ts} ({UID(ts).name})" for ts in syntaxes], "decoder": decoders,
                "files_read": len(jobs)}


def _rescale_info(kept: list[Frame]) -> dict:
    pairs = {(f.slope, f.intercept) for f in kept}
    if len(pairs) == 1:
        slope, intercept = pairs.pop()
        return {"rescale": {"per_frame": False, "slope": slope, "intercept": intercept}}
    return {"rescale": {"per_frame": True, "slopes": sorted({p[0] for p in pairs}),
                        "intercepts": sorted({p[1] for p in pairs})}}


def load_volume(series: Series, *, workers: int = 4, tol: float = DUPLICATE_TOLERANCE_MM) -> Volume:
    """Decode the series into a :class:`Volume` (HU int16 or float32, spacing, affine, provenance)."""
    kept, positions, info = plan_frames(series, tol)
    affine, spacing, tilt = geometry(kept, info["spacing"]["median_mm"])
    hu, decode_info = decode_into(series, kept, workers)
    first = series.instances[kept[0].instance]
    gantry = series.instances[0].header.get("GantryDetectorTilt")
    info.update(decode_info)
    info.update(_rescale_info(kept))
    info.update({"shape": list(hu.shape), "dtype": str(hu.dtype), "spacing_zyx": [round(v, 4) for v in spacing],
                 "tilt_degrees": round(tilt, 2), "tilted": tilt > TILT_WARN_DEG,
                 "gantry_detector_tilt": float(gantry) if gantry not in (None, "") else None,
                 "enhanced_multiframe": first.facts.enhanced,
                 "affine": [[round(float(v), 6) for v in row] for row in affine]})
    log.info("volume.loaded series=%s shape=%s spacing=%s tilt=%.2f duplicates=%d", series.number,
             "x".join(map(str, hu.shape)), info["spacing_zyx"], tilt, info["duplicates_dropped"])
    return Volume(hu, spacing, affine, positions, series.uid, info)
