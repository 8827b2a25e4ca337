"""Pixels of one chosen series → a float32 HU volume with its geometry and a record of what was done.

Conventions
-----------
* ``hu`` is float32, shaped ``(z, y, x)`` = (slice k, row j, column i). Slices are sorted by their
  position along the slice normal ``n = row_cosines × column_cosines`` (ascending), so for a
  standard head-first axial series slice 0 is the most inferior (feet-most) slice.
* ``spacing_zyx`` is (median slice step along the normal, PixelSpacing[0] between rows,
  PixelSpacing[1] between columns) in mm.
* ``affine`` is 4×4 and maps homogeneous voxel indices ``(i, j, k, 1)`` — column, row, slice, i.e.
  ``hu[k, j, i]`` — to DICOM patient coordinates (LPS: +x patient left, +y posterior, +z head) in
  mm: ``p = P0 + i·Δcol·row_cosines + j·Δrow·column_cosines + k·step``, where ``step`` is the mean
  position-to-position vector (it leans off the normal when the gantry was tilted).

Decoding: only the chosen frames are read. Uncompressed pixel data becomes a zero-copy
``np.frombuffer`` view that is rescaled straight into the one preallocated float32 volume
(never float64); for Implicit/Explicit VR Little Endian files the view starts at the Pixel Data
offset the header scan found, so the file is not parsed again (deflated, unusual layouts and
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


def _native_frames(ds: Dataset, pixels: bytes | memoryview) -> np.ndarray | None:
    """(frames, rows, cols) zero-copy view of uncompressed ``pixels``, or None for unusual layouts."""
    bits, stored = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits not in _NATIVE_DTYPES or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    n, rows, cols = int(ds.get("NumberOfFrames", 1) or 1), int(ds.Rows), int(ds.Columns)
    arr = np.frombuffer(pixels, dtype=_NATIVE_DTYPES[bits][signed], count=n * rows * cols)
    arr = arr.reshape(n, rows, cols)
    if stored < bits:
        shift = bits - stored
        arr = (arr << shift) >> shift if signed else arr & ((1 << stored) - 1)
    return arr


def _rescale_into(out: np.ndarray, stored: np.ndarray, slope: float, intercept: float) -> None:
    """HU = stored × slope + intercept, computed in float32 inside ``out``."""
    if stored.shape != out.shape:
        raise StepError(f"a decoded frame is {stored.shape}, expected {out.shape}; the file's Rows/Columns "
                        "do not match its pixel data — re-export the series")
    out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)


def _located_pixels(instance: Instance, data: bytes) -> memoryview | None:
    """The value of the Pixel Data element the scan located in ``data``, for little-endian native syntaxes.

    None (parse the file in full instead) unless the element sits where the header parse stopped,
    is encoded as that parse read it (implicit, or explicit OB/OW) and has a defined length.
    """
    header, at = instance.header, instance.pixel_offset
    file_meta = getattr(header, "file_meta", None)
    ts = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if at is None or ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian) or \
            data[at:at + 4] != PIXEL_DATA_TAG or header.original_encoding != (ts.is_implicit_VR, True):
        return None
    if ts.is_implicit_VR:
        start = at + 8
    elif data[at + 4:at + 6] in (b"OB", b"OW") and data[at + 6:at + 8] == b"\0\0":
        start = at + 12
    else:
        return None
    if len(data) < start:
        return None
    (length,) = struct.unpack_from("<L", data, start - 4)
    return None if length == 0xFFFFFFFF else memoryview(data)[start:start + length]


def _decode_file(instance: Instance, data: bytes, targets: list[_Target], hu: np.ndarray) -> tuple[str, str]:
    """Decode the wanted frames of one file into ``hu``; returns (transfer syntax, decoder used)."""
    pixels = _located_pixels(instance, data)
    frames = _native_frames(instance.header, pixels) if pixels is not None else None
    if frames is not None:
        for t in targets:
            _rescale_into(hu[t.k], frames[t.frame], t.slope, t.intercept)
        return str(instance.header.file_meta.TransferSyntaxUID), "numpy.frombuffer"
    ds = pydicom.dcmread(io.BytesIO(data))
    ts = ds.file_meta.TransferSyntaxUID
    if "PixelData" not in ds:
        raise StepError("an image of the chosen series has no pixel data (float or double pixel data "
                        "is not CT); re-export the series")
    frames = _native_frames(ds, ds.PixelData) if ts in NATIVE else None
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
        return _decode_file(instance, instance.member.read(), targets, hu)
    except StepError:
        raise
    except (OSError, zipfile.BadZipFile, zlib.error) as exc:
        raise StepError(f"cannot read {instance.member.name} ({exc}): the member is corrupt (bad CRC) or "
                        "truncated — copy the study again from the source") from exc
    except (ValueError, RuntimeError, AttributeError, KeyError, EOFError) as exc:
        raise StepError(f"cannot decode {instance.member.name}: {exc}. Fix: check the file with "
                        "`dcmdump`/`gdcminfo`; a missing codec names the package to install") from exc


def decode_into(series: Series, kept: list[Frame], workers: int = 4) -> tuple[np.ndarray, dict]:
    """Decode the kept frames into one preallocated float32 (z, y, x) array."""
    hu = np.empty((len(kept), kept[0].rows, kept[0].cols), dtype=np.float32)
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
    """Decode the series into a :class:`Volume` (HU float32, spacing, affine, provenance)."""
    kept, positions, info = plan_frames(series, tol)
    affine, spacing, tilt = geometry(kept, info["spacing"]["median_mm"])
    hu, decode_info = decode_into(series, kept, workers)
    header = series.instances[kept[0].instance].header
    gantry = header.get("GantryDetectorTilt")
    info.update(decode_info)
    info.update(_rescale_info(kept))
    info.update({"shape": list(hu.shape), "dtype": "float32", "spacing_zyx": [round(v, 4) for v in spacing],
                 "tilt_degrees": round(tilt, 2), "tilted": tilt > TILT_WARN_DEG,
                 "gantry_detector_tilt": float(gantry) if gantry not in (None, "") else None,
                 "enhanced_multiframe": "PerFrameFunctionalGroupsSequence" in header,
                 "affine": [[round(float(v), 6) for v in row] for row in affine]})
    log.info("volume.loaded series=%s shape=%s spacing=%s tilt=%.2f duplicates=%d", series.number,
             "x".join(map(str, hu.shape)), info["spacing_zyx"], tilt, info["duplicates_dropped"])
    return Volume(hu, spacing, affine, positions, series.uid, info)
