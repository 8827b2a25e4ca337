"""Per-frame geometry of a series, from headers only, and the slice-ordering rules built on it.

A *frame* is one image: a classic CT file holds one, an enhanced multi-frame CT file holds many
(its geometry and rescale live in the shared and per-frame functional groups). Both become the
same :class:`Frame` records, so series selection and volume building never care which it was.

Ordering (:func:`order_frames`) is pure: frames sort by their position along the slice normal
(``ImagePositionPatient · (row × column)``), never by InstanceNumber. Whether a series holding
several acquisitions is one volume or several is decided by geometry: groups of frames (by
temporal position, AcquisitionNumber, or acquisition-time pass) that cover the *same* z range are
phases (one is chosen by a rule); groups that tile *adjacent* ranges are parts of one scan and are
merged, one image kept per position. Repeated positions are then dropped.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


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
    return Frame(
        instance=index, frame=0, position=facts.position, orientation=facts.orientation,
        pixel_spacing=facts.pixel_spacing, thickness=facts.thickness, rows=facts.rows, cols=facts.cols,
        slope=facts.slope, intercept=facts.intercept, instance_number=facts.instance_number,
        temporal=facts.temporal, acquisition=facts.acquisition, image_type=facts.image_type,
        kernel=facts.kernel, imager_pixel_spacing=facts.imager_pixel_spacing,
        acquisition_time=facts.acquisition_time,
    )


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
        frames.append(Frame(
            instance=index, frame=f,
            position=_floats(fg("PlanePositionSequence", "ImagePositionPatient"), 3),
            orientation=_floats(fg("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            pixel_spacing=_floats(fg("PixelMeasuresSequence", "PixelSpacing"), 2),
            thickness=_float(fg("PixelMeasuresSequence", "SliceThickness")),
            rows=int(header.get("Rows", 0) or 0), cols=int(header.get("Columns", 0) or 0),
            slope=slope if slope is not None else _float(header.get("RescaleSlope"), 1.0) or 1.0,
            intercept=intercept if intercept is not None else _float(header.get("RescaleIntercept"), 0.0) or 0.0,
            instance_number=int(_float(header.get("InstanceNumber"), 0) or 0),
            temporal=f"{stack or ''}/{temporal or ''}" if (stack or temporal) else "",
            acquisition=str(header.get("AcquisitionNumber", "") or ""),
            image_type=tuple(str(v).upper() for v in frame_type) if frame_type else image_type,
            kernel=_kernel(fg("CTReconstructionSequence", "ConvolutionKernel")
                           or header.get("ConvolutionKernel")),
            imager_pixel_spacing=_floats(header.get("ImagerPixelSpacing"), 2),
            acquisition_time=str(fg("FrameContentSequence", "FrameAcquisitionDateTime") or "")[8:]
            or str(header.get("AcquisitionTime") or ""),
        ))
    return frames


def frames_of(series: Series) -> list[Frame]:
    """Every frame of the series, in file order, with its geometry and rescale (headers only)."""
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


# --- ordering: one volume or several is decided by geometry ---------------------------------------

PHASE_RULES = ("first", "last", "largest")
OVERLAP_FRACTION = 0.5  # share of a group's slices inside another group's z range that makes them phases
# (parts of one scan overlap by a few slices at most; two passes over the same anatomy by most of them)
PHASE_TIME_GAP_S = 10.0  # acquisition times further apart than this are separate passes


@dataclass(frozen=True)
class _Group:
    """Frames sharing one value of a phase key (an AcquisitionNumber, a temporal position...)."""

    key: str
    members: tuple[int, ...]
    d: np.ndarray  # their positions along the normal, ascending

    @property
    def lo(self) -> float:
        return float(self.d[0])

    @property
    def hi(self) -> float:
        return float(self.d[-1])

    def share_inside(self, other: _Group, tol: float) -> float:
        """Share of this group's positions strictly inside ``other``'s z range (its ends excluded)."""
        lo, hi = other.lo + tol, other.hi - tol
        if hi <= lo:
            return 0.0
        inside = int(np.searchsorted(self.d, hi, "left") - np.searchsorted(self.d, lo, "right"))
        return inside / len(self.d)

    def summary(self) -> dict:
        return {"key": self.key, "frames": len(self.members),
                "z_range_mm": [round(self.lo, 3), round(self.hi, 3)]}


def _natural(key: str) -> tuple:
    """Sort key: missing values first, then numbers by value, then text."""
    if key == "":
        return (0, 0.0, "")
    try:
        return (1, float(key), key)
    except ValueError:
        return (2, 0.0, key)


def _groups(values: Sequence[str], d: np.ndarray, candidates: Sequence[int]) -> list[_Group]:
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in candidates:
        by_key[values[i]].append(i)
    out = []
    for key in sorted(by_key, key=_natural):
        members = tuple(sorted(by_key[key], key=lambda i: d[i]))
        out.append(_Group(key, members, np.sort(d[list(members)])))
    return out


def _conflict(a: _Group, b: _Group, tol: float) -> bool:
    """Two groups are different phases when half or more of one lies inside the other's z range."""
    return max(a.share_inside(b, tol), b.share_inside(a, tol)) >= OVERLAP_FRACTION


def _phases(groups: list[_Group], tol: float) -> list[list[_Group]]:
    """Groups (in key order) gathered into phases: a group joins the first phase none of whose groups
    it overlaps; groups that tile adjacent z ranges are parts of one scan and share a phase."""
    if all(len(g.members) == 1 for g in groups):
        return [groups]  # one image per value (per-slice numbering): points never overlap
    phases: list[list[_Group]] = []
    for group in groups:
        for phase in phases:
            if not any(_conflict(group, other, tol) for other in phase):
                phase.append(group)
                break
        else:
            phases.append([group])
    return phases


def choose_phase(sizes: Sequence[int], rule: str) -> int:
    """Index of the phase to keep: ``first`` / ``last`` in key order, or the ``largest`` (first on ties)."""
    if rule == "first":
        return 0
    if rule == "last":
        return len(sizes) - 1
    if rule == "largest":
        return max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    raise ValueError(f"unknown phase rule {rule!r}; use one of {', '.join(PHASE_RULES)}")


def time_clusters(seconds: Sequence[float | None], gap_s: float = PHASE_TIME_GAP_S) -> list[str]:
    """Label each frame's acquisition time with its pass: times closer than ``gap_s`` (after sorting)
    belong to one pass, labelled by the pass's first time (``HH:MM:SS.s``, sortable); no time → ''."""
    known = sorted((t, i) for i, t in enumerate(seconds) if t is not None)
    labels = [""] * len(seconds)
    start = previous = None
    for t, i in known:
        if previous is None or t - previous > gap_s:
            start = t
        previous = t
        assert start is not None
        hours, rest = divmod(start, 3600)
        labels[i] = f"{int(hours):02d}:{int(rest // 60):02d}:{rest % 60:04.1f}"
    return labels


def tm_seconds(value: str) -> float | None:
    """A DICOM TM value (``HHMMSS.FFFFFF``, or the old ``HH:MM:SS``) in seconds after midnight."""
    text = value.strip().replace(":", "")
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        hours = int(text[:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        secs = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + secs


@dataclass
class Ordering:
    """The result of :func:`order_frames`: kept frame indices sorted along the normal, and what was done."""

    order: list[int]
    positions_mm: np.ndarray  # distance along the normal of each kept frame, ascending
    dropped: list[int] = field(default_factory=list)  # repeated positions removed (one image kept per position)
    phases: dict | None = None  # how a multi-phase series was split, when it was
    parts: dict | None = None  # how a scan in several acquisitions was merged, when it was
    replaced: list[int] = field(default_factory=list)  # frames of an earlier part inside a later part's range


def _merge_parts(parts: list[_Group], d: np.ndarray, tol: float) -> tuple[list[int], list[int], list[int]]:
    """One stack from parts of a scan (key order): a later part wins inside its own z range, so two
    parts never interleave. Returns (kept, duplicates, replaced): frames of earlier parts at a later
    part's exact positions, and at other positions inside its range."""
    kept: list[int] = []
    duplicates: list[int] = []
    replaced: list[int] = []
    for part in parts:
        stay = []
        for i in kept:
            if part.lo - tol <= d[i] <= part.hi + tol:
                j = int(np.searchsorted(part.d, d[i]))
                near = any(abs(part.d[x] - d[i]) < tol for x in (j - 1, j) if 0 <= x < len(part.d))
                (duplicates if near else replaced).append(i)
            else:
                stay.append(i)
        kept = stay + list(part.members)
    return kept, duplicates, replaced


def order_frames(positions: np.ndarray, normal: np.ndarray, *, tiebreak: Sequence[int] | None = None,
                 phase_keys: dict[str, Sequence[str]] | None = None, rule: str = "first",
                 tol: float = DUPLICATE_TOLERANCE_MM) -> Ordering:
    """Sort frames along ``normal``; decide phases or parts by geometry; keep one frame per position.

    ``positions`` is (n, 3) ImagePositionPatient in mm. ``phase_keys`` maps a tag name to each
    frame's value, tried in order. Frames that share a value form a group; groups that mostly lie
    inside each other's z range (at least :data:`OVERLAP_FRACTION`) are *phases* of the same anatomy
    — the first key that yields several phases splits the series, and ``rule`` (:data:`PHASE_RULES`,
    in key order) picks one; groups that tile adjacent z ranges are *parts* of one scan and are
    merged, a later part (in key order) winning inside its own z range. ``tiebreak`` (e.g.
    InstanceNumber) decides which of several frames at one position of one group is kept (the
    lowest). Independent of the input order; consecutive kept frames always belong to one phase.
    """
    positions = np.asarray(positions, float).reshape(-1, 3)
    d = positions @ np.asarray(normal, float)
    candidates = list(range(len(d)))
    phases_info = parts_info = None
    parts: list[_Group] | None = None
    for name, values in (phase_keys or {}).items():
        groups = _groups(values, d, candidates)
        if len(groups) < 2:
            continue
        phases = _phases(groups, tol)
        if len(phases) == 1:
            parts = parts or groups
            parts_info = parts_info or {"merged_by": name, "parts": [g.summary() for g in groups]}
            continue
        sizes = [sum(len(g.members) for g in phase) for phase in phases]
        chosen = choose_phase(sizes, rule)
        phases_info = {"split_by": name, "rule": rule, "chosen": chosen + 1, "phases": [
            {"number": k + 1, "keys": [g.key for g in phase], "frames": sizes[k],
             "z_range_mm": [round(min(g.lo for g in phase), 3), round(max(g.hi for g in phase), 3)],
             "members": [i for g in phase for i in g.members]} for k, phase in enumerate(phases)]}
        parts = phases[chosen] if len(phases[chosen]) > 1 else None
        parts_info = {"merged_by": name, "parts": [g.summary() for g in parts]} if parts else None
        candidates = [i for g in phases[chosen] for i in g.members]
        break
    duplicates: list[int] = []
    replaced: list[int] = []
    if parts is not None:
        candidates, duplicates, replaced = _merge_parts(parts, d, tol)
    ties = np.asarray(tiebreak if tiebreak is not None else np.zeros(len(d)), float)
    cand = np.asarray(candidates, int)
    sorted_idx = cand[np.lexsort((ties[cand], np.round(d[cand] / tol)))] if len(cand) else cand
    order: list[int] = []
    for i in sorted_idx.tolist():
        if order and abs(d[i] - d[order[-1]]) < tol:
            duplicates.append(i)
        else:
            order.append(i)
    if parts_info is not None:
        parts_info.update({"repeated_positions_dropped": len([i for i in duplicates if i not in order]),
                           "replaced_by_later_part": len(replaced),
                           "kept_at_repeats": "the later acquisition (key order)"})
    return Ordering(order, d[order] if order else np.empty(0), sorted(duplicates), phases_info, parts_info,
                    sorted(replaced))
