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

Decoding (only the chosen frames, in the encoding the scan decided from the bytes, every failure
one plain ``StepError``) is in :mod:`processor.dicom.decode`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np

from processor.dicom.decode import _decode_as, decode_into, rescale_info
from processor.dicom.frames import DUPLICATE_TOLERANCE_MM, Frame, frames_of, slice_normal
from processor.dicom.ordering import acquisition_seconds, order_frames, time_clusters
from processor.dicom.scan import Series, stated_number
from processor.dicom.stack import image_stack, stack_frames
from processor.errors import StepError

log = logging.getLogger(__name__)

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
    # Why the in-plane pixel spacing is not known (then spacing_zyx[1:] are NaN and every mm-based
    # output — lung mL, model resampling, physical preview aspect — must be withheld with this
    # reason); None when PixelSpacing, or a named fallback, gave it.
    spacing_unknown: str | None = None
    cosines: np.ndarray | None = None  # ImageOrientationPatient: row cosines, then column cosines

    @property
    def gap_after(self) -> list[int]:
        """Slice indices k whose step to slice k + 1 is more than ``GAP_FACTOR`` × the median step
        (missing slices); empty for a regular grid."""
        steps = np.diff(self.positions_mm)
        if len(steps) == 0:
            return []
        median = float(np.median(steps))
        return [int(k) for k in np.flatnonzero(steps > GAP_FACTOR * median)]

    @property
    def row_cosines(self) -> np.ndarray:
        if self.cosines is not None:
            return np.asarray(self.cosines[:3], float)
        return self.affine[:3, 0] / self.spacing_zyx[2]

    @property
    def column_cosines(self) -> np.ndarray:
        if self.cosines is not None:
            return np.asarray(self.cosines[3:6], float)
        return self.affine[:3, 1] / self.spacing_zyx[1]

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_zyx))


def plan_frames(
    series: Series, tol: float = DUPLICATE_TOLERANCE_MM, phase_rule: str = "first"
) -> tuple[list[Frame], np.ndarray, dict]:
    """The frames to decode sorted along the normal, their positions on it (mm), and the provenance.

    ``series`` should be an image stack (:func:`processor.dicom.stack.image_stack`). Phases and
    parts of a scan are decided by geometry (:func:`processor.dicom.frames.order_frames`), trying
    the temporal position, then AcquisitionNumber, then acquisition-time passes; ``phase_rule``
    (``first`` | ``last`` | ``largest``) picks among real phases.
    """
    every = frames_of(series)
    stacked, frames_aside = stack_frames(every)
    frames = [f for f in stacked if f.position is not None and f.orientation is not None]
    if not frames:
        raise StepError(
            f"series {series.number}: no image has ImagePositionPatient/ImageOrientationPatient; "
            "the slices cannot be stacked — export the original axial series"
        )
    orientation = frames[0].orientation
    assert orientation is not None
    if not _same_orientation([f.orientation for f in frames], orientation):
        raise StepError(
            f"series {series.number}: slices have different orientations; "
            "choose a series with one orientation (dicom.select_series rejects such series)"
        )
    if len({(f.rows, f.cols) for f in frames}) > 1:
        raise StepError(f"series {series.number}: slices have different sizes; choose another series")
    zero = sum(1 for f in frames if f.slope == 0)
    if zero:
        raise StepError(
            f"series {series.number}: RescaleSlope is 0 in {zero} image(s), so Hounsfield units "
            "cannot be computed (every pixel would read as the intercept); re-export the series"
        )
    normal = slice_normal(orientation)
    times = time_clusters(
        [acquisition_seconds(f.acquisition_date, f.acquisition_time, f.acquisition_datetime) for f in frames]
    )
    ordering = order_frames(
        np.asarray([f.position for f in frames]),
        normal,
        tiebreak=[f.instance_number * 100_000 + f.frame for f in frames],
        phase_keys={
            "reconstruction": [_reconstruction(f) for f in frames],
            "temporal position": [f.temporal for f in frames],
            "AcquisitionNumber": [f.acquisition for f in frames],
            "acquisition time": times,
        },
        rule=phase_rule,
        tol=tol,
    )
    kept = [frames[i] for i in ordering.order]
    phases = ordering.phases
    if phases is not None:
        for phase in phases["phases"]:
            phase["frames_list"] = [frames[i] for i in phase.pop("members")]
    info: dict = {
        "sorted_by": "ImagePositionPatient · slice normal",
        "normal": [round(float(v), 6) for v in normal],
        "frames_in_series": len(every),
        "frames_without_position": len(stacked) - len(frames),
        "frames_set_aside": dict(frames_aside),
        "frames_used": len(kept),
        "duplicates_dropped": len(ordering.dropped),
        "phases_split": phases,
        "parts_merged": ordering.parts,
        "stray_images": ordering.left_out,
        "rescale_missing": sum(1 for f in kept if not f.rescale_stated),
    }
    if ordering.dropped:
        log.warning("volume.duplicates series=%s dropped=%d", series.number, len(ordering.dropped))
    info.update(_spacing_info(ordering.positions_mm))
    return kept, ordering.positions_mm, info


def _same_orientation(orientations: list, first: tuple[float, ...]) -> bool:
    """Whether every orientation is ``np.allclose`` to ``first`` (atol 1e-3): one comparison of
    the stacked six-vectors, element by element as ``np.allclose`` compares each pair."""
    if all(len(o) == 6 for o in orientations) and len(first) == 6:
        return bool(np.isclose(np.asarray(orientations, float), np.asarray(first, float), atol=1e-3).all())
    return all(np.allclose(np.asarray(o, float), first, atol=1e-3) for o in orientations)


def _reconstruction(frame: Frame) -> str:
    """ConvolutionKernel and ImageType of a frame: two reconstructions (or energies) of one scan under
    one SeriesInstanceUID differ here, and are phases of the same anatomy, never one stack."""
    return f"{frame.kernel or 'no kernel'} / {chr(92).join(frame.image_type) or 'no ImageType'}"


def _spacing_info(d: np.ndarray) -> dict:
    steps = np.diff(d)
    if len(steps) == 0:
        return {"spacing": {"median_mm": None, "min_mm": None, "max_mm": None, "uneven": False, "gaps": []}}
    median = float(np.median(steps))
    uneven = bool(np.any(np.abs(steps - median) > max(0.01, UNEVEN_TOLERANCE * median)))
    gaps = [
        {"after_slice": int(k), "step_mm": round(float(s), 3)}
        for k, s in enumerate(steps)
        if s > GAP_FACTOR * median
    ]
    return {
        "spacing": {
            "median_mm": round(median, 4),
            "min_mm": round(float(steps.min()), 4),
            "max_mm": round(float(steps.max()), 4),
            "uneven": uneven,
            "gaps": gaps,
        }
    }


def _valid(spacing: tuple[float, ...] | None) -> tuple[float, float] | None:
    return (
        (spacing[0], spacing[1]) if spacing is not None and len(spacing) == 2 and min(spacing) > 0 else None
    )


def in_plane_spacing(kept: list[Frame]) -> tuple[tuple[float, float], str, str | None]:
    """((row spacing, column spacing) mm, source, reason when unknown) — never an invented constant.

    PixelSpacing (0028,0030) of the first kept frame (the stack has one); when it is missing or
    zero, ImagerPixelSpacing (0018,1164) as a named fallback (PS3.3 C.8.11.4: the spacing at the
    detector, which a CT reconstruction normally equals) with a warning; otherwise unknown: NaN
    with the reason.
    """
    pixel = _valid(kept[0].pixel_spacing)
    if pixel is not None:
        return pixel, "PixelSpacing", None
    imager = _valid(kept[0].imager_pixel_spacing)
    what = "missing" if kept[0].pixel_spacing is None else "zero or negative"
    if imager is not None:
        return imager, f"ImagerPixelSpacing (fallback: PixelSpacing {what})", None
    return (
        (math.nan, math.nan),
        "unknown",
        (
            f"pixel spacing unknown: PixelSpacing (0028,0030) is {what} and there is no ImagerPixelSpacing; "
            "mm-based outputs (lung volume in mL, model resampling) are withheld — export the series with "
            "PixelSpacing"
        ),
    )


def geometry(
    kept: list[Frame], median_step: float | None, pixel_spacing: tuple[float, float] | None = None
) -> tuple[np.ndarray, tuple[float, float, float], float]:
    """(affine, spacing_zyx, tilt in degrees) of the sorted frames; unknown spacings are NaN."""
    orientation = np.asarray(kept[0].orientation, float)
    row, col = orientation[:3], orientation[3:]
    normal = slice_normal(orientation)
    d_row, d_col = pixel_spacing if pixel_spacing is not None else in_plane_spacing(kept)[0]
    first = np.asarray(kept[0].position, float)
    if len(kept) > 1:
        step = (np.asarray(kept[-1].position, float) - first) / (len(kept) - 1)
        cos = abs(float(step @ normal)) / max(float(np.linalg.norm(step)), 1e-12)
        tilt = math.degrees(math.acos(min(1.0, cos)))
    else:  # one slice: its extent is SliceThickness when stated, otherwise unknown
        step = normal * (kept[0].thickness if kept[0].thickness and kept[0].thickness > 0 else math.nan)
        tilt = 0.0
    affine = np.eye(4)
    affine[:3, 0] = row * d_col
    affine[:3, 1] = col * d_row
    affine[:3, 2] = step
    affine[:3, 3] = first
    z = median_step if median_step else float(np.linalg.norm(step))
    return affine, (float(z), float(d_row), float(d_col)), tilt


def _rounded(value: float, digits: int = 4) -> float | None:
    return None if not math.isfinite(value) else round(value, digits)


def _body_hu(image: np.ndarray) -> float | None:
    """Mean HU of the body (pixels above −500 HU) in one slice; None when there is none."""
    body = image[image > -500]
    return round(float(body.mean(dtype=np.float64)), 1) if body.size else None


def _describe_phases(
    series: Series, phases: dict, hu: np.ndarray, workers: int, imagecodecs: bool = True
) -> None:
    """Each phase's mean body HU on its middle slice (the chosen one from the volume already decoded)."""
    for phase in phases["phases"]:
        frames = sorted(phase.pop("frames_list"), key=lambda f: f.instance_number)
        if phase["number"] == phases["chosen"]:
            phase["mean_body_hu"] = _body_hu(hu[len(hu) // 2])
            continue
        middle = frames[len(frames) // 2]
        image, _ = _decode_as(series, [middle], 1, np.float32, imagecodecs=imagecodecs)
        phase["mean_body_hu"] = _body_hu(image[0])


def _stated_degrees(series: Series) -> float | None:
    """GantryDetectorTilt (0018,1120) of the series' first header, degrees; None when absent or not
    one finite number (as stated: the tilt the volume uses is measured from the positions)."""
    return stated_number(series.instances[0].value("GantryDetectorTilt"))


def load_volume(
    series: Series,
    *,
    workers: int = 4,
    tol: float = DUPLICATE_TOLERANCE_MM,
    phase_rule: str = "first",
    imagecodecs: bool = True,
) -> Volume:
    """Decode the series' image stack into a :class:`Volume` (HU int16 or float32, spacing, affine, provenance).

    ``imagecodecs=False`` decodes compressed frames with pydicom's decoders only (the reference the
    imagecodecs path is tested against, :mod:`processor.dicom.codecs`).

    Instances that cannot belong to the axial stack are set aside first (counted in
    ``provenance["set_aside"]``); see :func:`plan_frames` for phases and parts.
    """
    stack = image_stack(series)
    series = stack.series
    if not series.instances:
        raise StepError(
            "no image stack: every instance of the series was set aside ("
            + ", ".join(f"{r}: {n}" for r, n in sorted(stack.set_aside.items()))
            + ")"
        )
    kept, positions, info = plan_frames(series, tol, phase_rule)
    pixel, source, unknown = in_plane_spacing(kept)
    affine, spacing, tilt = geometry(kept, info["spacing"]["median_mm"], pixel)
    hu, decode_info = decode_into(series, kept, workers, imagecodecs=imagecodecs)
    if info["phases_split"]:
        _describe_phases(series, info["phases_split"], hu, workers, imagecodecs)
    first = series.instances[kept[0].instance]
    gantry = _stated_degrees(series)
    info.update(decode_info)
    info.update(rescale_info(kept))
    info.update(
        {
            "set_aside": {**stack.set_aside, **info["frames_set_aside"]},
            "shape": list(hu.shape),
            "dtype": str(hu.dtype),
            "spacing_zyx": [_rounded(v) for v in spacing],
            "in_plane_spacing": {
                "source": source,
                "row_mm": _rounded(pixel[0]),
                "column_mm": _rounded(pixel[1]),
                "unknown_reason": unknown,
            },
            "tilt_degrees": round(tilt, 2),
            "tilted": tilt > TILT_WARN_DEG,
            "gantry_detector_tilt": gantry,
            "enhanced_multiframe": first.facts.enhanced,
            "affine": [[_rounded(float(v), 6) for v in row] for row in affine],
        }
    )
    log.info(
        "volume.loaded series=%s shape=%s spacing=%s tilt=%.2f duplicates=%d",
        series.number,
        "x".join(map(str, hu.shape)),
        info["spacing_zyx"],
        tilt,
        info["duplicates_dropped"],
    )
    orientation = np.asarray(kept[0].orientation, float)
    return Volume(
        hu, spacing, affine, positions, series.uid, info, spacing_unknown=unknown, cosines=orientation
    )
