"""Weight-free quantitative lung CT: a classic threshold lung mask and the standard density metrics.

Mask (no model, scipy.ndimage only):

1. air = voxels below ``threshold_hu`` (−320 HU);
2. air components touching the in-plane border of the volume (the air around the patient) are
   removed — the top and bottom slices do not count as border, so lungs (and the trachea) cut by
   the scan range stay. A border-touching component whose mean density is above
   ``outside_air_max_hu`` (−970 HU) looks like lung parenchyma, not room air, and is kept: that
   is what a field of view tighter than the chest (lungs cut at the image edge) looks like;
3. the largest component is kept, and further ones (the other lung when the airways do not join
   them) up to ``max_components`` while each is at least ``min_component_ratio`` of the largest
   — small bowel gas and noise go;
4. holes are filled slice by slice, so vessels and nodules inside the lungs count as lung.

Metrics: lung volume (mL), %LAA-950 (share of mask voxels below −950 HU), mean lung density (HU).
The airways are not separated from the lungs (a known, small bias of the classic method).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LungSettings:
    threshold_hu: float = -320.0
    laa_threshold_hu: float = -950.0
    outside_air_max_hu: float = -970.0
    max_components: int = 2
    min_component_ratio: float = 0.1
    min_volume_ml: float = 500.0
    max_volume_ml: float = 12_000.0
    cut_area_ratio: float = 0.05  # mask area in an end slice, relative to the largest slice, that means "cut"


@dataclass
class LungMetrics:
    volume_ml: float
    laa950_percent: float | None
    mean_lung_density_hu: float | None
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def plausible(self) -> bool:
        return not self.flags

    def as_dict(self) -> dict:
        return {"volume_ml": self.volume_ml, "laa950_percent": self.laa950_percent,
                "mean_lung_density_hu": self.mean_lung_density_hu, "plausible": self.plausible,
                "flags": list(self.flags), "notes": list(self.notes)}


_IN_PLANE = np.zeros((3, 3, 3), bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
_CHUNK_VOXELS = 1 << 17  # voxels per step of the label statistics: small enough to stay in cache


def _border_labels(labels: np.ndarray) -> np.ndarray:
    """Component ids touching the in-plane border of the volume."""
    faces = np.concatenate([labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]], axis=None)
    return np.unique(faces[faces > 0])


def _label_stats(labels: np.ndarray, count: int, air: np.ndarray, hu: np.ndarray,
                 ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Voxel count of every component, the HU sum of components ``ids``, and the slices each spans.

    One pass over whole slices, a few at a time, so the temporaries stay in cache. The sums are
    accumulated in float64 in voxel order, each step's running sum entering its bin first, so they
    are bit for bit those of one ``np.bincount`` over the volume (what ``ndimage.mean`` computes).
    The slice span is per step (a superset): ``first`` inclusive, ``last`` exclusive.
    """
    nz, n = labels.shape[0], count + 1
    step = max(1, _CHUNK_VOXELS // max(1, labels[0].size))
    counts, sums = np.zeros(n, np.intp), np.zeros(len(ids))
    first, last = np.full(n, nz), np.zeros(n, np.intp)
    for z in range(0, nz, step):
        inside = air[z:z + step]
        lab = labels[z:z + step][inside].astype(np.intp)
        here = np.bincount(lab, minlength=n)
        counts += here
        seen = here > 0
        first[seen & (first == nz)] = z
        last[seen] = min(z + step, nz)
        if len(ids):
            sums = np.bincount(np.concatenate([ids, lab]), np.concatenate([sums, hu[z:z + step][inside]]),
                               minlength=n)[ids]
    return counts, sums, first, last


def _fill_holes_in_plane(slab: np.ndarray, z0: int, shape: tuple[int, ...]) -> np.ndarray:
    """``binary_fill_holes(mask, structure=_IN_PLANE)`` of a mask that is ``slab`` from slice ``z0``
    and empty elsewhere, computed on the mask's bounding box with a one-voxel empty ring. Outside
    the box all background reaches the image edge, as the ring does, so the result is identical;
    the background component holding the ring corner is what the fill leaves empty in each slice.
    """
    out = np.zeros(shape, bool)
    rows = np.flatnonzero(slab.any(axis=(0, 2)))
    if len(rows) == 0:
        return out
    cols = np.flatnonzero(slab.any(axis=(0, 1)))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.zeros((slab.shape[0], y1 - y0 + 2, x1 - x0 + 2), bool)
    box[:, 1:-1, 1:-1] = slab[:, y0:y1, x0:x1]
    background, _ = ndimage.label(~box, structure=_IN_PLANE)
    out[z0:z0 + slab.shape[0], y0:y1, x0:x1] = (background != background[:, :1, :1])[:, 1:-1, 1:-1]
    return out


def lung_mask(hu: np.ndarray, settings: LungSettings | None = None) -> np.ndarray:
    """Boolean (z, y, x) lung mask of a HU volume (see the module docstring for the method)."""
    settings = settings or LungSettings()
    air = hu < settings.threshold_hu
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros(hu.shape, bool)
    touching = _border_labels(labels)
    counts, sums, first, last = _label_stats(labels, count, air, hu, touching)
    keep = np.ones(count + 1, bool)
    keep[0] = False
    if len(touching):  # border air is kept only when lung-dense (a tight field of view)
        keep[touching] = sums / counts[touching].astype(np.float64) > settings.outside_air_max_hu
    candidates = np.flatnonzero(keep)
    if len(candidates) == 0:
        return np.zeros(hu.shape, bool)
    sizes = counts[candidates].astype(np.float64)
    order = np.argsort(-sizes, kind="stable")
    largest = sizes[order[0]]
    chosen = [candidates[i] for i in order[: settings.max_components]
              if sizes[i] >= settings.min_component_ratio * largest]
    if not chosen:
        return np.zeros(hu.shape, bool)
    lookup = np.zeros(count + 1, bool)
    lookup[chosen] = True
    z0, z1 = int(first[chosen].min()), int(last[chosen].max())
    return _fill_holes_in_plane(lookup[labels[z0:z1]], z0, hu.shape)


def lung_metrics(hu: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                 settings: LungSettings | None = None) -> LungMetrics:
    """Volume, %LAA-950 and mean lung density inside ``mask``, with plausibility flags."""
    settings = settings or LungSettings()
    areas = mask.sum(axis=(1, 2))
    voxels = int(areas.sum())
    volume_ml = voxels * float(np.prod(spacing_zyx)) / 1000.0
    if voxels == 0:
        return LungMetrics(0.0, None, None, ["empty_mask"],
                           ["no lung found: the series may not show the chest, or is not in HU"])
    box = _bounding_box(mask, areas)
    values = hu[box][mask[box]]  # the same voxels in the same order as hu[mask]
    laa = float(np.count_nonzero(values < settings.laa_threshold_hu)) / voxels * 100.0
    mld = float(values.mean(dtype=np.float64))
    metrics = LungMetrics(round(volume_ml, 1), round(laa, 2), round(mld, 1))
    _flag(metrics, areas, settings)
    return metrics


def _bounding_box(mask: np.ndarray, areas: np.ndarray) -> tuple[slice, slice, slice]:
    """The smallest box holding every voxel of a non-empty ``mask`` (``areas``: its voxels per slice)."""
    zs = np.flatnonzero(areas)
    z = slice(zs[0], zs[-1] + 1)
    rows, cols = np.flatnonzero(mask[z].any(axis=(0, 2))), np.flatnonzero(mask[z].any(axis=(0, 1)))
    return z, slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _flag(metrics: LungMetrics, areas: np.ndarray, settings: LungSettings) -> None:
    if metrics.volume_ml < settings.min_volume_ml:
        metrics.flags.append("volume_below_min")
        metrics.notes.append(f"lung volume {metrics.volume_ml:.0f} mL is below {settings.min_volume_ml:.0f} mL: "
                             "the series does not cover the lungs or the mask failed")
    if metrics.volume_ml > settings.max_volume_ml:
        metrics.flags.append("volume_above_max")
        metrics.notes.append(f"lung volume {metrics.volume_ml:.0f} mL is above {settings.max_volume_ml:.0f} mL: "
                             "air outside the lungs was probably included")
    peak = float(areas.max())
    for end, name in ((0, "first"), (-1, "last")):
        if peak and areas[end] > settings.cut_area_ratio * peak:
            metrics.flags.append(f"lungs_cut_at_{name}_slice")
            metrics.notes.append(f"the lungs continue beyond the {name} slice: the series does not cover "
                                 "the whole lungs, so volume and %LAA are partial")
