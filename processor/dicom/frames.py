"""Per-frame geometry of a series, from headers only, and the slice-ordering rules built on it.

A *frame* is one image: a classic CT file holds one, an enhanced multi-frame CT file holds many
(its geometry and rescale live in the shared and per-frame functional groups). Both become the
same :class:`Frame` records, so series selection and volume building never care which it was.

Ordering them along the slice normal, and deciding phases and parts of a scan by geometry, is
in :mod:`processor.dicom.ordering`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, overload

import numpy as np
from pydicom.dataset import Dataset

from processor.dicom.fastheader import Facts
from processor.dicom.scan import Series

log = logging.getLogger(__name__)

DUPLICATE_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class Frame:
    """One image of a series: which file and frame it is, and its header-level facts."""

    instance: int  # index into Series.instances
    frame: int  # frame index inside that file (0 for single-frame files)
    position: tuple[float, ...] | None  # ImagePositionPatient (x, y, z) mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row cosines, column cosines
    pixel_spacing: tuple[float, ...] | None  # (between rows, between columns) in mm
    thickness: float | None
    rows: int
    cols: int
    slope: float
    intercept: float
    instance_number: int
    temporal: str = ""  # TemporalPositionIndex/Identifier (with StackID for enhanced)
    acquisition: str = ""  # AcquisitionNumber
    image_type: tuple[str, ...] = ()
    kernel: str = ""
    imager_pixel_spacing: tuple[float, ...] | None = None  # (0018,1164): spacing at the detector, mm
    acquisition_time: str = ""  # AcquisitionTime (TM) as stored
    acquisition_date: str = ""  # AcquisitionDate (DA)
    rescale_stated: bool = True  # RescaleSlope and RescaleIntercept stated (else 1 and 0 were assumed)
    acquisition_datetime: str = (
        ""  # AcquisitionDateTime (DT), or an enhanced frame's FrameAcquisitionDateTime
    )


@overload
def _float(value: Any, default: float) -> float: ...
@overload
def _float(value: Any, default: None = None) -> float | None: ...
def _float(value: Any, default: float | None = None) -> float | None:
    """``value`` as a finite float, else ``default``: "NaN" and "inf" are as unreadable as "abc"
    (the classic-file reader's rule, :func:`processor.dicom.fastheader._finite`)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _kernel(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value
    return "\\".join(str(v) for v in value)


def _group(item: Dataset | None, sequence: str, keyword: str) -> Any:
    if item is None or sequence not in item or not item[sequence].value:
        return None
    return item[sequence].value[0].get(keyword)


def _fg(per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    """A functional-group attribute: the per-frame item wins over the shared one."""
    value = _group(per_frame, sequence, keyword)
    return value if value is not None else _group(shared, sequence, keyword)


def classic_frame(index: int, facts: Facts) -> Frame:
    """The one frame of a classic (single-frame) file, from its header facts."""
    return _frame(
        {
            "instance": index,
            "frame": 0,
            "position": facts.position,
            "orientation": facts.orientation,
            "pixel_spacing": facts.pixel_spacing,
            "thickness": facts.thickness,
            "rows": facts.rows,
            "cols": facts.cols,
            "slope": facts.slope,
            "intercept": facts.intercept,
            "instance_number": facts.instance_number,
            "temporal": facts.temporal,
            "acquisition": facts.acquisition,
            "image_type": facts.image_type,
            "kernel": facts.kernel,
            "imager_pixel_spacing": facts.imager_pixel_spacing,
            "acquisition_time": facts.acquisition_time,
            "acquisition_date": facts.acquisition_date,
            "rescale_stated": facts.rescale_stated,
            "acquisition_datetime": facts.acquisition_datetime,
        }
    )


_FRAME_FIELDS = tuple(f.name for f in fields(Frame))


def _frame(values: dict[str, Any]) -> Frame:
    """The :class:`Frame` ``Frame(**values)`` builds (``values``: every field, by name, in field
    order), without the frozen dataclass's ``object.__setattr__`` per field: 1 µs in place of 7,
    for every image of every series (issue 18). ``TypeError`` when a field is missing or unknown."""
    if tuple(values) != _FRAME_FIELDS:
        raise TypeError(f"a Frame needs exactly the fields {_FRAME_FIELDS}, got {tuple(values)}")
    frame = object.__new__(Frame)
    object.__setattr__(frame, "__dict__", values)
    return frame


def _enhanced_frames(index: int, header: Dataset) -> list[Frame]:
    shared_seq = header.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = header.get("PerFrameFunctionalGroupsSequence") or []
    image_type = tuple(str(v).upper() for v in (header.get("ImageType") or ()))
    frames = []
    for f, item in enumerate(per_frame):

        def fg(sequence: str, keyword: str, item: Dataset = item) -> Any:
            return _fg(item, shared, sequence, keyword)

        slope = _float(fg("PixelValueTransformationSequence", "RescaleSlope"), None)
        intercept = _float(fg("PixelValueTransformationSequence", "RescaleIntercept"), None)
        stack = fg("FrameContentSequence", "StackID")
        temporal = fg("FrameContentSequence", "TemporalPositionIndex")
        frame_type = fg("CTImageFrameTypeSequence", "FrameType")
        frames.append(
            Frame(
                instance=index,
                frame=f,
                position=_floats(fg("PlanePositionSequence", "ImagePositionPatient"), 3),
                orientation=_floats(fg("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                pixel_spacing=_floats(fg("PixelMeasuresSequence", "PixelSpacing"), 2),
                thickness=_float(fg("PixelMeasuresSequence", "SliceThickness")),
                rows=int(header.get("Rows", 0) or 0),
                cols=int(header.get("Columns", 0) or 0),
                slope=slope if slope is not None else _float(header.get("RescaleSlope"), 1.0),
                intercept=intercept if intercept is not None else _float(header.get("RescaleIntercept"), 0.0),
                rescale_stated=(slope is not None or _float(header.get("RescaleSlope")) is not None)
                and (intercept is not None or _float(header.get("RescaleIntercept")) is not None),
                instance_number=int(_float(header.get("InstanceNumber"), 0) or 0),
                temporal=f"{stack or ''}/{temporal or ''}" if (stack or temporal) else "",
                acquisition=str(header.get("AcquisitionNumber", "") or ""),
                image_type=tuple(str(v).upper() for v in frame_type) if frame_type else image_type,
                kernel=_kernel(
                    fg("CTReconstructionSequence", "ConvolutionKernel") or header.get("ConvolutionKernel")
                ),
                imager_pixel_spacing=_floats(header.get("ImagerPixelSpacing"), 2),
                acquisition_time=str(header.get("AcquisitionTime") or ""),
                acquisition_date=str(header.get("AcquisitionDate") or ""),
                acquisition_datetime=str(
                    fg("FrameContentSequence", "FrameAcquisitionDateTime")
                    or header.get("AcquisitionDateTime")
                    or ""
                ),
            )
        )
    return frames


def frames_of(series: Series) -> list[Frame]:
    """Every frame of the series, in file order, with its geometry and rescale (headers only).

    Computed once for the series' instances (:meth:`Series.memo`): selection and the volume
    ask for the frames of the same series several times."""
    return list(series.memo("frames", lambda: _frames_of(series)))


def _frames_of(series: Series) -> list[Frame]:
    frames: list[Frame] = []
    for index, instance in enumerate(series.instances):
        if instance.facts.enhanced:
            frames.extend(_enhanced_frames(index, instance.header))
        else:
            frames.append(classic_frame(index, instance.facts))
    return frames


def slice_normal(orientation: Sequence[float] | np.ndarray) -> np.ndarray:
    """Unit normal (row × column) of an ImageOrientationPatient."""
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:6], float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else normal
