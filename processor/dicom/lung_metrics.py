"""Quantitative lung metrics inside a lung mask (:mod:`processor.dicom.lungs`), with plausibility
flags that tell the reader when the numbers must be used with care.

Metrics: lung volume (mL) — each slice's mask area times its true slab thickness along the slice
normal (interior slab (d[k+1] − d[k−1]) / 2, end slabs the neighbouring step; the median step on a
regular grid) times the pixel area; withheld (``None``, flag ``spacing_unknown``) when the pixel
spacing is unknown; %LAA-950 (share of lung volume below −950 HU) and mean lung density (HU),
each slice weighted by its slab. Missing slices inside the lungs (a step over ``gap_factor`` ×
the median) are flagged ``gap_in_lungs``. The airways are not separated from the lungs (a known,
small bias of the classic method).

Flags (each with a note in plain words; a metric with flags is not ``plausible``): ``empty_mask``;
``spacing_unknown`` (volume withheld); ``volume_below_min`` / ``volume_above_max`` (outside
``min_volume_ml`` … ``max_volume_ml``); ``lungs_cut_at_first_slice`` / ``lungs_cut_at_last_slice``
(an end slice holds more than ``cut_area_ratio`` of the largest slice's area); ``lungs_cut_in_plane``
(the mask reaches the image edge or the padding outside the reconstruction circle);
``gap_in_lungs``; and those the mask's construction raised (:class:`processor.dicom.lungs.LungMask`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from processor.dicom.lungs import LungMask, LungSettings, _next_to


@dataclass
class LungMetrics:
    volume_ml: float | None
    laa950_percent: float | None
    mean_lung_density_hu: float | None
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def plausible(self) -> bool:
        return not self.flags

    @property
    def summary(self) -> str:
        if self.plausible:
            return "The lungs were found whole: lung volume, %LAA-950 and mean lung density can be used."
        return "Use the lung numbers with care: " + " ".join(n[0].upper() + n[1:] + "." for n in self.notes)

    def as_dict(self) -> dict:
        return {"volume_ml": self.volume_ml, "laa950_percent": self.laa950_percent,
                "mean_lung_density_hu": self.mean_lung_density_hu, "plausible": self.plausible,
                "flags": list(self.flags), "notes": list(self.notes), "summary": self.summary}


def slab_thickness_mm(positions_mm: np.ndarray) -> np.ndarray:
    """Each slice's slab along the normal: (d[k+1] − d[k−1]) / 2 inside, the neighbouring step at
    the ends (so it is the step everywhere on a regular grid and spans half of any gap)."""
    d = np.asarray(positions_mm, np.float64)
    if len(d) < 2:
        raise ValueError("slab thickness needs at least two slice positions")
    edges = np.concatenate([[d[0] - (d[1] - d[0]) / 2], (d[1:] + d[:-1]) / 2, [d[-1] + (d[-1] - d[-2]) / 2]])
    return np.diff(edges)


def lung_metrics(hu: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                 settings: LungSettings | None = None, *, positions_mm: np.ndarray | None = None,
                 spacing_unknown: str | None = None, found: LungMask | None = None) -> LungMetrics:
    """Volume, %LAA-950 and mean lung density inside ``mask``, with plausibility flags.

    ``positions_mm`` (one per slice, ascending along the normal) gives each slice its true slab
    thickness; without it every slice is ``spacing_zyx[0]`` thick. ``spacing_unknown`` (a reason)
    withholds the volume; so does a spacing that is not a finite positive number. ``found`` (from
    :func:`segment_lungs`) adds what the mask's construction flagged and noted.
    """
    settings = settings or LungSettings()
    nz = mask.shape[0]
    if positions_mm is not None and len(positions_mm) != nz:
        raise ValueError(f"{len(positions_mm)} slice positions for {nz} slices")
    slabs = slab_thickness_mm(positions_mm) if positions_mm is not None and nz > 1 \
        else np.full(nz, float(spacing_zyx[0]))
    areas = mask.sum(axis=(1, 2))
    voxels = int(areas.sum())
    unknown = _unknown_spacing(spacing_zyx, slabs, spacing_unknown)
    if voxels == 0:
        metrics = LungMetrics(None if unknown else 0.0, None, None, ["empty_mask"],
                              ["no lung was found: the series may not show the chest, or is not in HU"])
        _flag_spacing(metrics, unknown)
        return metrics
    metrics = _measure(hu, mask, slabs, areas, voxels, unknown, spacing_zyx, settings, positions_mm)
    if found is not None:
        metrics.flags += [f for f in found.flags if f not in metrics.flags]
        metrics.notes += found.notes
    return metrics


def _measure(hu: np.ndarray, mask: np.ndarray, slabs: np.ndarray, areas: np.ndarray, voxels: int,
             unknown: str | None, spacing_zyx: tuple[float, float, float], settings: LungSettings,
             positions_mm: np.ndarray | None) -> LungMetrics:
    box = _bounding_box(mask, areas)
    values = hu[box][mask[box]]  # slice by slice, in the order of the box
    present = np.flatnonzero(areas[box[0]])
    weight = slabs[box[0]][present]
    if np.ptp(weight) <= 1e-9 * weight.max():  # a regular grid: every voxel weighs the same
        laa = np.count_nonzero(values < settings.laa_threshold_hu) / voxels * 100.0
        mld = float(values.mean(dtype=np.float64))
    else:  # each slice's voxels weigh its slab
        starts = np.concatenate([[0], np.cumsum(areas[box[0]][present])[:-1]])
        low = np.add.reduceat((values < settings.laa_threshold_hu).view(np.uint8), starts, dtype=np.int64)
        total = np.add.reduceat(values, starts, dtype=np.float64)
        lung = float(weight @ areas[box[0]][present])
        laa, mld = float(weight @ low) / lung * 100.0, float(weight @ total) / lung
    pixel_mm2 = float(spacing_zyx[1]) * float(spacing_zyx[2])
    volume_ml = None if unknown else round(float(slabs @ areas) * pixel_mm2 / 1000.0, 1)
    metrics = LungMetrics(volume_ml, round(laa, 2), round(mld, 1))
    _flag_spacing(metrics, unknown)
    _flag(metrics, areas, settings)
    _flag_in_plane(metrics, hu, mask, box, settings)
    if positions_mm is not None:
        _flag_gaps(metrics, np.asarray(positions_mm, np.float64), areas, settings)
    return metrics


def _unknown_spacing(spacing_zyx: tuple[float, float, float], slabs: np.ndarray,
                     reason: str | None) -> str | None:
    """Why the volume cannot be given in mL (the caller's reason first), or None."""
    if reason:
        return reason
    if not all(math.isfinite(float(v)) and float(v) > 0 for v in spacing_zyx[1:]):
        return "the pixel spacing is not known"
    if not (np.all(np.isfinite(slabs)) and np.all(slabs > 0)):
        return "the distance between slices is not known"
    return None


def _bounding_box(mask: np.ndarray, areas: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box holding every voxel of a non-empty ``mask`` (``areas``: its voxels per slice)."""
    zs = np.flatnonzero(areas)
    z = slice(zs[0], zs[-1] + 1)
    rows, cols = np.flatnonzero(mask[z].any(axis=(0, 2))), np.flatnonzero(mask[z].any(axis=(0, 1)))
    return z, slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _flag_spacing(metrics: LungMetrics, unknown: str | None) -> None:
    if unknown:
        metrics.flags.append("spacing_unknown")
        metrics.notes.append(f"no lung volume in mL: {unknown} (%LAA-950 and mean lung density need no "
                             "spacing and are given)")


def _flag(metrics: LungMetrics, areas: np.ndarray, settings: LungSettings) -> None:
    if metrics.volume_ml is not None and metrics.volume_ml < settings.min_volume_ml:
        metrics.flags.append("volume_below_min")
        metrics.notes.append(f"lung volume {metrics.volume_ml:.0f} mL is below {settings.min_volume_ml:.0f} "
                             "mL: the series does not cover the lungs or the mask failed")
    if metrics.volume_ml is not None and metrics.volume_ml > settings.max_volume_ml:
        metrics.flags.append("volume_above_max")
        metrics.notes.append(f"lung volume {metrics.volume_ml:.0f} mL is above {settings.max_volume_ml:.0f} "
                             "mL: air outside the lungs was probably included")
    peak = float(areas.max())
    for end, name in ((0, "first"), (-1, "last")):
        if peak and areas[end] > settings.cut_area_ratio * peak:
            metrics.flags.append(f"lungs_cut_at_{name}_slice")
            metrics.notes.append(f"the lungs continue beyond the {name} slice: the series does not cover "
                                 "the whole lungs, so volume and %LAA are partial")


def _flag_in_plane(metrics: LungMetrics, hu: np.ndarray, mask: np.ndarray,
                   box: tuple[slice, slice, slice], settings: LungSettings) -> None:
    """``lungs_cut_in_plane`` when the mask reaches the image edge or the padding outside the
    reconstruction circle: the field of view cuts the lungs."""
    z = box[0]
    rows, cols = (slice(max(0, s.start - 1), s.stop + 1) for s in box[1:])  # with the pixels around it
    edges, cut = [], np.zeros(z.stop - z.start, bool)
    for name, face in (("top", mask[z, 0, :]), ("bottom", mask[z, -1, :]),
                       ("left", mask[z, :, 0]), ("right", mask[z, :, -1])):
        hit = face.any(axis=1)
        if hit.any():
            edges.append(name)
            cut |= hit
    where = [f"the {_join(edges)} edge{'s' if len(edges) > 1 else ''} of the image"] if edges else []
    near = hu[z, rows, cols]
    if near.min() < settings.not_measured_below_hu:
        pad = near < settings.not_measured_below_hu
        hit = (_next_to(pad) & mask[z, rows, cols]).any(axis=(1, 2))
        if hit.any():
            where.append("the edge of the reconstruction circle (the padding around it)")
            cut |= hit
    if where:
        lung_slices = int(np.count_nonzero(mask[z].any(axis=(1, 2))))
        metrics.flags.append("lungs_cut_in_plane")
        metrics.notes.append(f"the lungs reach {_join(where)} on {int(cut.sum())} of {lung_slices} lung "
                             "slices: the field of view is narrower than the chest and cuts them off, so the "
                             "lung volume and %LAA-950 cover only the part inside the image")


def _flag_gaps(metrics: LungMetrics, positions: np.ndarray, areas: np.ndarray,
               settings: LungSettings) -> None:
    """``gap_in_lungs`` for each step over ``gap_factor`` × the median step inside the lungs' z extent."""
    steps = np.diff(positions)
    if len(steps) == 0:
        return
    median = float(np.median(steps))
    zs = np.flatnonzero(areas)
    gaps = [int(k) for k in np.flatnonzero(steps > settings.gap_factor * median) if zs[0] <= k < zs[-1]]
    if not gaps:
        return
    described = [f"{steps[k]:.1f} mm between slices {k} and {k + 1} (at {positions[k]:.1f} and "
                 f"{positions[k + 1]:.1f} mm, about {max(1, round(steps[k] / median) - 1)} slice(s) missing)"
                 for k in gaps[:3]]
    more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
    metrics.flags.append("gap_in_lungs")
    metrics.notes.append(f"slices are missing inside the lungs: {'; '.join(described)}{more}, where the "
                         f"other slices are {median:.2f} mm apart; the lung volume bridges the gap (each "
                         "slice counts its true slab) but what lies in it was not imaged")


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
