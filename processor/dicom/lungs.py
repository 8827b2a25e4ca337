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


def _drop_outside_air(labels: np.ndarray, count: int, hu: np.ndarray, settings: LungSettings) -> np.ndarray:
    """Component ids to keep: not touching the in-plane border, or lung-dense when they do."""
    border = np.zeros(labels.shape, bool)
    border[:, 0, :] = border[:, -1, :] = border[:, :, 0] = border[:, :, -1] = True
    touching = np.unique(labels[border & (labels > 0)])
    ids = np.arange(1, count + 1)
    keep = np.ones(count + 1, bool)
    keep[0] = False
    if len(touching):
        means = ndimage.mean(hu, labels, touching)
        keep[touching] = np.asarray(means) > settings.outside_air_max_hu
    return ids[keep[1:]]


def lung_mask(hu: np.ndarray, settings: LungSettings | None = None) -> np.ndarray:
    """Boolean (z, y, x) lung mask of a HU volume (see the module docstring for the method)."""
    settings = settings or LungSettings()
    air = hu < settings.threshold_hu
    labels, count = ndimage.label(air)
    if count == 0:
        return np.zeros(hu.shape, bool)
    candidates = _drop_outside_air(labels, count, hu, settings)
    if len(candidates) == 0:
        return np.zeros(hu.shape, bool)
    sizes = ndimage.sum_labels(air, labels, candidates)
    order = np.argsort(-sizes, kind="stable")
    largest = sizes[order[0]]
    chosen = [candidates[i] for i in order[: settings.max_components]
              if sizes[i] >= settings.min_component_ratio * largest]
    mask = np.isin(labels, chosen)
    return ndimage.binary_fill_holes(mask, structure=_IN_PLANE)


def lung_metrics(hu: np.ndarray, mask: np.ndarray, spacing_zyx: tuple[float, float, float],
                 settings: LungSettings | None = None) -> LungMetrics:
    """Volume, %LAA-950 and mean lung density inside ``mask``, with plausibility flags."""
    settings = settings or LungSettings()
    voxels = int(mask.sum())
    volume_ml = voxels * float(np.prod(spacing_zyx)) / 1000.0
    if voxels == 0:
        return LungMetrics(0.0, None, None, ["empty_mask"],
                           ["no lung found: the series may not show the chest, or is not in HU"])
    values = hu[mask]
    laa = float(np.count_nonzero(values < settings.laa_threshold_hu)) / voxels * 100.0
    mld = float(values.mean(dtype=np.float64))
    metrics = LungMetrics(round(volume_ml, 1), round(laa, 2), round(mld, 1))
    _flag(metrics, mask, settings)
    return metrics


def _flag(metrics: LungMetrics, mask: np.ndarray, settings: LungSettings) -> None:
    if metrics.volume_ml < settings.min_volume_ml:
        metrics.flags.append("volume_below_min")
        metrics.notes.append(f"lung volume {metrics.volume_ml:.0f} mL is below {settings.min_volume_ml:.0f} mL: "
                             "the series does not cover the lungs or the mask failed")
    if metrics.volume_ml > settings.max_volume_ml:
        metrics.flags.append("volume_above_max")
        metrics.notes.append(f"lung volume {metrics.volume_ml:.0f} mL is above {settings.max_volume_ml:.0f} mL: "
                             "air outside the lungs was probably included")
    areas = mask.sum(axis=(1, 2))
    peak = float(areas.max())
    for end, name in ((0, "first"), (-1, "last")):
        if peak and areas[end] > settings.cut_area_ratio * peak:
            metrics.flags.append(f"lungs_cut_at_{name}_slice")
            metrics.notes.append(f"the lungs continue beyond the {name} slice: the series does not cover "
                                 "the whole lungs, so volume and %LAA are partial")
