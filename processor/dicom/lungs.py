"""Weight-free quantitative lung CT: a classic threshold lung mask inside a body mask, and the
standard density metrics.

Mask (no model; numpy and connected-components-3d, in slabs: :mod:`processor.dicom.components`):

1. body: per slice, the body mask of :mod:`processor.dicom.body` — pixels above
   ``body_threshold_hu`` (−500 HU) on a grid of about ``body_grid_px`` (128) rows and columns,
   opened in-plane so that tissue thinner than ``body_thin_mm`` (8 mm) goes, sized in mm per axis
   from the pixel spacing (without one: ``body_opening_px`` grid pixels, and a note says so), the
   largest in-plane component kept. The body's *interior* in that slice is the convex hull of that
   component (a polygon of 32 directions), so a body cut by the image edge still encloses its lungs;
2. air = voxels below ``threshold_hu`` (−320 HU), 3-D components; pixels below
   ``not_measured_below_hu`` (−1500 HU: the padding outside a circular reconstruction field) are
   not data and count as the edge of the image;
3. an air component open to the in-plane image edge (or to that padding) is outside air unless at
   least ``cut_lung_min_inside`` (10 %) of it lies well inside the body's interior (at least
   ``cut_lung_depth_px`` grid pixels in from the hull's outline) and less than
   ``cut_lung_max_wrapping`` (50 %) of it lies in in-plane parts that reach two opposite image
   edges (air passing around the body: arms down against the torso put the armpits inside the hull of
   torso and arms). The body wraps around a lung cut by the field of view, while outside air lies
   beyond the body's convex outline or around it — whatever its density (the table and partial
   volume lift tight-field outside air to about −930 HU, as dense as emphysematous lung). Such a
   cut lung is kept whole and flagged ``lungs_cut_in_plane``. Air not open to the edge is a
   candidate when at least ``enclosed_min_inside`` (half) of it lies inside the body's interior (a
   table's hollow core goes); it is kept whole, and lung beyond the outline is flagged
   ``lungs_beyond_body_outline`` (never cut away silently);
4. the largest component is kept, and further ones (the other lung when the airways do not join
   them) up to ``max_components`` while each is at least ``min_component_ratio`` of the largest
   and at least ``second_lung_min_z_overlap`` of its slices are slices of the largest (a lung lies
   beside the other; a gastric bubble below one hemithorax does not) — small bowel gas, outside-air
   pockets in body folds and noise go. A mask with one in-plane part in its largest slice is
   flagged ``one_lung``, with a note on any candidate left out;
5. holes are filled slice by slice, so vessels and nodules inside the lungs count as lung.

Metrics: lung volume (mL) — each slice's mask area times its true slab thickness along the slice
normal (interior slab (d[k+1] − d[k−1]) / 2, end slabs the neighbouring step; the median step on a
regular grid) times the pixel area; withheld (``None``, flag ``spacing_unknown``) when the pixel
spacing is unknown; %LAA-950 (share of lung volume below −950 HU) and mean lung density (HU),
each slice weighted by its slab. Missing slices inside the lungs (a step over ``gap_factor`` ×
the median) are flagged ``gap_in_lungs``. The airways are not separated from the lungs (a known,
small bias of the classic method).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from processor.dicom.body import BodySettings, body_polygon, polygon_spans
from processor.dicom.components import SLAB_VOXELS, label_2d, label_in_plane, label_slabs, slab_ranges
from processor.dicom.volume import GAP_FACTOR

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LungSettings:
    threshold_hu: float = -320.0
    laa_threshold_hu: float = -950.0
    body_threshold_hu: float = BodySettings.threshold_hu  # the body mask's settings (processor.dicom.body)
    not_measured_below_hu: float = -1500.0  # padding outside the reconstruction circle (−2000, −3024 …)
    cut_lung_min_inside: float = 0.1  # share well inside the body's hull making edge-open air a cut lung
    cut_lung_depth_px: float = 2.0  # "well inside": this many body-grid pixels in from the hull's outline
    cut_lung_max_wrapping: float = 0.5  # share in slices where it reaches opposite edges: outside air
    enclosed_min_inside: float = 0.5  # air not open to the edge: share inside the body's interior to count
    body_grid_px: int = BodySettings.grid_px
    body_opening_px: int = BodySettings.opening_px
    body_thin_mm: float = BodySettings.thin_mm
    max_components: int = 2
    min_component_ratio: float = 0.1
    second_lung_min_z_overlap: float = 0.5  # share of a further component's slices shared with the largest
    min_volume_ml: float = 500.0
    max_volume_ml: float = 12_000.0
    cut_area_ratio: float = 0.05  # mask area in an end slice, relative to the largest slice, that means "cut"
    gap_factor: float = GAP_FACTOR  # a slice step this many times the median is a gap (Volume.gap_after)

    @property
    def body(self) -> BodySettings:
        return BodySettings(
            self.body_threshold_hu, self.body_grid_px, self.body_opening_px, self.body_thin_mm
        )


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
        return {
            "volume_ml": self.volume_ml,
            "laa950_percent": self.laa950_percent,
            "mean_lung_density_hu": self.mean_lung_density_hu,
            "plausible": self.plausible,
            "flags": list(self.flags),
            "notes": list(self.notes),
            "summary": self.summary,
        }


_CHUNK_VOXELS = 1 << 17  # voxels per step of the label statistics: small enough to stay in cache


def _inside(left: np.ndarray, right: np.ndarray, nx: int) -> np.ndarray:
    cols = np.arange(nx, dtype=left.dtype)
    return (cols >= left[..., None]) & (cols <= right[..., None])


def _next_to(mask: np.ndarray) -> np.ndarray:
    """Pixels with an in-plane 4-neighbour in ``mask``."""
    near = np.zeros(mask.shape, bool)
    near[:, 1:] |= mask[:, :-1]
    near[:, :-1] |= mask[:, 1:]
    near[:, :, 1:] |= mask[:, :, :-1]
    near[:, :, :-1] |= mask[:, :, 1:]
    return near


Slabs = Callable[[int, int], np.ndarray]  # (z0, z1) → a boolean mask of slices [z0, z1)


def _edge_labels(labels: np.ndarray, pad_of: Slabs | None) -> np.ndarray:
    """Component ids open to the in-plane image edge, or next to not-measured padding pixels
    (``pad_of``: the padding of slices [z0, z1), None when there is none)."""
    faces = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
    if pad_of is not None:  # in-plane neighbours: slab by slab, so no whole-volume mask is held
        faces += [labels[z0:z1][_next_to(pad_of(z0, z1))] for z0, z1 in slab_ranges(*_slicing(labels))]
    ids = np.concatenate([np.ravel(face) for face in faces])
    return np.unique(ids[ids > 0])


def _slicing(volume: np.ndarray) -> tuple[int, int]:
    """(slices, voxels a slice) of a (z, y, x) volume, for :func:`slab_ranges`."""
    return volume.shape[0], int(np.prod(volume.shape[1:]))


def _label_stats(
    labels: np.ndarray,
    count: int,
    hull: tuple[np.ndarray, np.ndarray],
    deep: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, ...]:
    """Voxel count of every component (the air is where ``labels`` > 0), its counts inside the body's interior (``hull`` spans) and
    well inside it (``deep`` spans, a subset), and the slices each spans — one pass over whole
    slices, a few at a time, so the temporaries stay in cache. The slice span is per step (a
    superset): ``first`` inclusive, ``last`` exclusive."""
    nz, n, nx = labels.shape[0], count + 1, labels.shape[2]
    step = max(1, _CHUNK_VOXELS // max(1, labels[0].size))
    counts, inside, well = np.zeros(n, np.intp), np.zeros(n, np.intp), np.zeros(n, np.intp)
    first, last = np.full(n, nz), np.zeros(n, np.intp)
    for z in range(0, nz, step):
        lab = labels[z : z + step]
        here_air = lab > 0
        here = np.bincount(lab[here_air], minlength=n)
        counts += here
        within = here_air & _inside(hull[0][z : z + step], hull[1][z : z + step], nx)
        inside += np.bincount(lab[within], minlength=n)
        well += np.bincount(
            lab[within & _inside(deep[0][z : z + step], deep[1][z : z + step], nx)], minlength=n
        )
        seen = here > 0
        first[seen & (first == nz)] = z
        last[seen] = min(z + step, nz)
    return counts, inside, well, first, last


def _wrapping(labels: np.ndarray, ids: np.ndarray, hull: tuple[np.ndarray, np.ndarray]) -> dict[int, int]:
    """Per component of ``ids``, its voxels in in-plane parts that reach two opposite image edges
    (top and bottom, or left and right): air that passes around the body, which a lung cut by the
    field of view never does (two lungs cut on both sides meet in-plane only at the carina). Only
    slices where the component reaches opposite edges and lies partly beyond the body's interior
    are labelled in-plane (a cut lung lies inside it)."""
    nx = labels.shape[2]
    out: dict[int, int] = {}
    for c in (int(c) for c in ids):
        edges = [
            (labels[:, 0, :] == c).any(axis=1),
            (labels[:, -1, :] == c).any(axis=1),
            (labels[:, :, 0] == c).any(axis=1),
            (labels[:, :, -1] == c).any(axis=1),
        ]
        total = 0
        for z in np.flatnonzero((edges[0] & edges[1]) | (edges[2] & edges[3])):
            here = labels[z] == c
            beyond = np.count_nonzero(here & ~_inside(hull[0][z], hull[1][z], nx))
            if beyond <= 0.02 * np.count_nonzero(here):
                continue
            parts, n = label_2d(here)
            reach = [np.zeros(n + 1, bool) for _ in range(4)]
            for hit, face in zip(reach, (parts[0], parts[-1], parts[:, 0], parts[:, -1]), strict=True):
                hit[face] = True
            wraps = (reach[0] & reach[1]) | (reach[2] & reach[3])
            wraps[0] = False
            total += int(np.count_nonzero(wraps[parts]))
        out[c] = total
    return out


def _z_range(labels: np.ndarray, label: int, first: int, last: int, step: int) -> tuple[int, int]:
    """The exact slices [lo, hi) holding ``label``, refined from the chunked superset [first, last)."""
    lo, hi = first, last
    while lo < hi - 1 and lo < first + step and not (labels[lo] == label).any():
        lo += 1
    while hi - 1 > lo and hi > last - step and not (labels[hi - 1] == label).any():
        hi -= 1
    return lo, hi


def _fill_holes_in_plane(slab: np.ndarray, out: np.ndarray) -> None:
    """``out[:] = scipy.ndimage.binary_fill_holes(slab, structure)`` with the in-plane cross as
    structure (``out`` empty on entry), computed on
    the slab's bounding box with a one-voxel empty ring. Outside the box all background reaches the
    image edge, as the ring does, so the result is identical; the background component holding the
    ring corner is what the fill leaves empty in each slice. The structure joins no two slices, so
    any stack of slices may be filled alone."""
    rows = np.flatnonzero(slab.any(axis=(0, 2)))
    if len(rows) == 0:
        return
    cols = np.flatnonzero(slab.any(axis=(0, 1)))
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    box = np.zeros((slab.shape[0], y1 - y0 + 2, x1 - x0 + 2), bool)
    box[:, 1:-1, 1:-1] = slab[:, y0:y1, x0:x1]
    background, _ = label_in_plane(~box)
    out[:, y0:y1, x0:x1] = (background != background[:, :1, :1])[:, 1:-1, 1:-1]


def _members(labels: np.ndarray, lookup: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """``lookup[labels]``: where ``labels`` is one of the few ``chosen`` ids (``lookup`` true there,
    nowhere else). Up to four ids as equality tests against Python ints: two lungs over the bench
    study's 300 slices of 512² in 0.06 CPU-s instead of the table lookup's 0.2 (2-core AMD EPYC);
    more ids, the lookup itself."""
    if len(chosen) == 0 or len(chosen) > 4:
        return lookup[labels]
    ids = [int(c) for c in chosen]  # a NumPy integer scalar makes each comparison several times slower
    out = labels == ids[0]
    for c in ids[1:]:
        out |= labels == c
    return out


def _chosen_mask(
    labels: np.ndarray, lookup: np.ndarray, z_range: tuple[int, int], pad_of: Slabs | None, slab_voxels: int
) -> np.ndarray:
    """The components where ``lookup`` is true, holes filled slice by slice, padding pixels off;
    they lie in slices ``z_range`` [z0, z1). Built a slab at a time: no whole-volume temporary."""
    mask = np.zeros(labels.shape, bool)
    z0, z1 = z_range
    chosen = np.flatnonzero(lookup)
    for a, b in slab_ranges(z1 - z0, _slicing(labels)[1], slab_voxels):
        a, b = z0 + a, z0 + b
        _fill_holes_in_plane(_members(labels[a:b], lookup, chosen), mask[a:b])
        if pad_of is not None:
            mask[a:b] &= ~pad_of(a, b)
    return mask


@dataclass
class LungMask:
    """The lung mask and what its construction found that the numbers' reader must know."""

    mask: np.ndarray
    flags: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def lung_mask(
    hu: np.ndarray, settings: LungSettings | None = None, pixel_mm: tuple[float, float] | None = None
) -> np.ndarray:
    """Boolean (z, y, x) lung mask of a HU volume (see the module docstring for the method)."""
    return segment_lungs(hu, settings, pixel_mm).mask


def segment_lungs(
    hu: np.ndarray,
    settings: LungSettings | None = None,
    pixel_mm: tuple[float, float] | None = None,
    *,
    slab_voxels: int = SLAB_VOXELS,
) -> LungMask:
    """The lung mask of a HU volume with its flags and notes. ``pixel_mm`` (row, column spacing)
    sizes the body mask's opening in mm; without it the pixel rule is used (module docstring).
    ``slab_voxels``: the masks and labels are made that many voxels (whole slices) at a time, so
    the working set is the labels (2 bytes a voxel when they fit in uint16) and the lung mask (1)
    beside the volume; the result does not depend on it."""
    settings = settings or LungSettings()

    # the masks are made a slab of slices at a time (the working set stays a fraction of the volume)
    def padding(z0: int, z1: int) -> np.ndarray:
        return hu[z0:z1] < settings.not_measured_below_hu

    pad_of = padding if hu.min() < settings.not_measured_below_hu else None

    def air_of(z0: int, z1: int) -> np.ndarray:
        air = hu[z0:z1] < settings.threshold_hu
        if pad_of is not None:
            air &= ~pad_of(z0, z1)
        return air

    labels, count = label_slabs(air_of, hu.shape, slab_voxels)  # scipy.ndimage.label's, uint16 if they fit
    if count == 0:
        return LungMask(np.zeros(hu.shape, bool))
    reach, f = body_polygon(hu, settings.body, pixel_mm)
    left, right = polygon_spans(reach, hu.shape[1])
    deep = polygon_spans(reach, hu.shape[1], settings.cut_lung_depth_px * f)
    counts, inside, well, first, last = _label_stats(labels, count, (left, right), deep)
    edge_ids = _edge_labels(labels, pad_of)
    open_edge = np.zeros(count + 1, bool)
    open_edge[edge_ids] = True
    # a cut lung: edge-open air that the body wraps — enough of it well inside the body's interior,
    # and not mostly in slices where it passes around the body (arms down, a tight field of view)
    cut = open_edge & (well >= settings.cut_lung_min_inside * counts)
    for c, wrapping in _wrapping(labels, np.flatnonzero(cut), (left, right)).items():
        cut[c] = wrapping < settings.cut_lung_max_wrapping * counts[c]
    # enclosed air lies in the body: most of it inside the interior (a table's hollow core does not);
    # it is kept whole, so a body outline that misses part of a thin chest wall cuts no lung away
    closed = ~open_edge & (inside >= settings.enclosed_min_inside * counts)
    sizes = np.where(cut | closed, counts, 0).astype(np.float64)
    sizes[0] = 0
    candidates = np.flatnonzero(sizes)
    if len(candidates) == 0:
        return LungMask(np.zeros(hu.shape, bool))
    order = candidates[np.argsort(-sizes[candidates], kind="stable")]
    step = max(1, _CHUNK_VOXELS // max(1, labels[0].size))
    ranges = {
        int(c): _z_range(labels, int(c), int(first[c]), int(last[c]), step)
        for c in order[: settings.max_components]
    }
    chosen, rejected = _choose(order, sizes, ranges, settings)
    z0, z1 = min(ranges[c][0] for c in chosen), max(ranges[c][1] for c in chosen)
    lookup = np.zeros(count + 1, bool)
    lookup[chosen] = True
    mask = _chosen_mask(labels, lookup, (z0, z1), pad_of, slab_voxels)
    del labels
    result = LungMask(mask)
    if pixel_mm is None or not all(math.isfinite(float(v)) and float(v) > 0 for v in pixel_mm):
        result.notes.append(
            f"the body mask's opening used the pixel rule ({settings.body_opening_px} grid "
            "pixels), as the pixel spacing is not known"
        )
    _note_outline(result, [c for c in chosen if not open_edge[c]], counts, inside)
    _note_one_lung(result, mask, rejected, sizes, counts)
    return result


def _choose(
    order: np.ndarray, sizes: np.ndarray, ranges: dict[int, tuple[int, int]], settings: LungSettings
) -> tuple[list[int], list[int]]:
    """The largest component, and further ones up to ``max_components`` that are each at least
    ``min_component_ratio`` of it and lie beside it: a lung spans most of the thorax, so at least
    ``second_lung_min_z_overlap`` of a further component's slices must be slices of the largest
    (a gastric bubble below one lung is not the other lung). Returns (chosen, rejected)."""
    largest = int(order[0])
    lo, hi = ranges[largest]
    chosen, rejected = [largest], []
    for c in (int(c) for c in order[1 : settings.max_components]):
        if sizes[c] < settings.min_component_ratio * sizes[largest]:
            break
        c_lo, c_hi = ranges[c]
        overlap = max(0, min(hi, c_hi) - max(lo, c_lo))
        if overlap >= settings.second_lung_min_z_overlap * (c_hi - c_lo):
            chosen.append(c)
        else:
            rejected.append(c)
    return chosen, rejected


def _note_outline(result: LungMask, closed: list[int], counts: np.ndarray, inside: np.ndarray) -> None:
    """Enclosed lung air beyond the body's outline is kept; say so, as the outline was not found whole."""
    total, beyond = int(counts[closed].sum()), int((counts[closed] - inside[closed]).sum())
    if total and beyond > 0.01 * total:
        result.flags.append("lungs_beyond_body_outline")
        result.notes.append(
            f"{100 * beyond / total:.1f} % of the lung air lies beyond the body outline found "
            "in its slices and was kept: the body mask did not find the whole chest wall "
            "(a very thin chest wall, or tissue below −500 HU), so check the lung mask"
        )


def _note_one_lung(
    result: LungMask, mask: np.ndarray, rejected: list[int], sizes: np.ndarray, counts: np.ndarray
) -> None:
    """``one_lung`` when the mask holds a single lung: in its largest slice, one in-plane part."""
    areas = mask.sum(axis=(1, 2))
    peak = int(np.argmax(areas))
    parts, n = label_2d(mask[peak])
    big = np.bincount(parts.ravel())[1:] >= 0.1 * areas[peak] if n else np.zeros(0, bool)
    why = ""
    if rejected:
        share = ", ".join(f"{100 * counts[c] / max(1, int(mask.sum())):.0f} %" for c in rejected)
        why = (
            f"; an air-filled space ({share} of the lung's volume) was left out because it does not "
            "lie beside the lung (its slices are mostly above or below the lung's: gas in the stomach "
            "or bowel, not lung)"
        )
    if int(big.sum()) == 1:
        result.flags.append("one_lung")
        result.notes.append(
            "only one lung was found: if the patient has two, the other is collapsed, filled "
            "or outside the series, and the numbers describe one lung" + why
        )
    elif why:
        result.notes.append(why[2].upper() + why[3:])


def slab_thickness_mm(positions_mm: np.ndarray) -> np.ndarray:
    """Each slice's slab along the normal: (d[k+1] − d[k−1]) / 2 inside, the neighbouring step at
    the ends (so it is the step everywhere on a regular grid and spans half of any gap)."""
    d = np.asarray(positions_mm, np.float64)
    if len(d) < 2:
        raise ValueError("slab thickness needs at least two slice positions")
    edges = np.concatenate([[d[0] - (d[1] - d[0]) / 2], (d[1:] + d[:-1]) / 2, [d[-1] + (d[-1] - d[-2]) / 2]])
    return np.diff(edges)


def lung_metrics(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing_zyx: tuple[float, float, float],
    settings: LungSettings | None = None,
    *,
    positions_mm: np.ndarray | None = None,
    spacing_unknown: str | None = None,
    found: LungMask | None = None,
) -> LungMetrics:
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
    slabs = (
        slab_thickness_mm(positions_mm)
        if positions_mm is not None and nz > 1
        else np.full(nz, float(spacing_zyx[0]))
    )
    areas = mask.sum(axis=(1, 2))
    voxels = int(areas.sum())
    unknown = _unknown_spacing(spacing_zyx, slabs, spacing_unknown)
    if voxels == 0:
        metrics = LungMetrics(
            None if unknown else 0.0,
            None,
            None,
            ["empty_mask"],
            ["no lung was found: the series may not show the chest, or is not in HU"],
        )
        _flag_spacing(metrics, unknown)
        return metrics
    metrics = _measure(hu, mask, slabs, areas, voxels, unknown, spacing_zyx, settings, positions_mm)
    if found is not None:
        metrics.flags += [f for f in found.flags if f not in metrics.flags]
        metrics.notes += found.notes
    return metrics


def _measure(
    hu: np.ndarray,
    mask: np.ndarray,
    slabs: np.ndarray,
    areas: np.ndarray,
    voxels: int,
    unknown: str | None,
    spacing_zyx: tuple[float, float, float],
    settings: LungSettings,
    positions_mm: np.ndarray | None,
) -> LungMetrics:
    box = _bounding_box(mask, areas)
    values = hu[box][mask[box]]  # slice by slice, in the order of the box
    present = np.flatnonzero(areas[box[0]])
    weight = slabs[box[0]][present]
    if np.ptp(weight) <= 1e-9 * weight.max():  # a regular grid: every voxel weighs the same
        laa: float = np.count_nonzero(values < settings.laa_threshold_hu) / voxels * 100.0
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


def _unknown_spacing(
    spacing_zyx: tuple[float, float, float], slabs: np.ndarray, reason: str | None
) -> str | None:
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
        metrics.notes.append(
            f"no lung volume in mL: {unknown} (%LAA-950 and mean lung density need no spacing and are given)"
        )


def _flag(metrics: LungMetrics, areas: np.ndarray, settings: LungSettings) -> None:
    if metrics.volume_ml is not None and metrics.volume_ml < settings.min_volume_ml:
        metrics.flags.append("volume_below_min")
        metrics.notes.append(
            f"lung volume {metrics.volume_ml:.0f} mL is below {settings.min_volume_ml:.0f} "
            "mL: the series does not cover the lungs or the mask failed"
        )
    if metrics.volume_ml is not None and metrics.volume_ml > settings.max_volume_ml:
        metrics.flags.append("volume_above_max")
        metrics.notes.append(
            f"lung volume {metrics.volume_ml:.0f} mL is above {settings.max_volume_ml:.0f} "
            "mL: air outside the lungs was probably included"
        )
    peak = float(areas.max())
    for end, name in ((0, "first"), (-1, "last")):
        if peak and areas[end] > settings.cut_area_ratio * peak:
            metrics.flags.append(f"lungs_cut_at_{name}_slice")
            metrics.notes.append(
                f"the lungs continue beyond the {name} slice: the series does not cover "
                "the whole lungs, so volume and %LAA are partial"
            )


def _flag_in_plane(
    metrics: LungMetrics,
    hu: np.ndarray,
    mask: np.ndarray,
    box: tuple[slice, slice, slice],
    settings: LungSettings,
) -> None:
    """``lungs_cut_in_plane`` when the mask reaches the image edge or the padding outside the
    reconstruction circle: the field of view cuts the lungs."""
    z = box[0]
    rows, cols = (slice(max(0, s.start - 1), s.stop + 1) for s in box[1:])  # with the pixels around it
    edges, cut = [], np.zeros(z.stop - z.start, bool)
    for name, face in (
        ("top", mask[z, 0, :]),
        ("bottom", mask[z, -1, :]),
        ("left", mask[z, :, 0]),
        ("right", mask[z, :, -1]),
    ):
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
        metrics.notes.append(
            f"the lungs reach {_join(where)} on {int(cut.sum())} of {lung_slices} lung "
            "slices: the field of view is narrower than the chest and cuts them off, so the "
            "lung volume and %LAA-950 cover only the part inside the image"
        )


def _flag_gaps(
    metrics: LungMetrics, positions: np.ndarray, areas: np.ndarray, settings: LungSettings
) -> None:
    """``gap_in_lungs`` for each step over ``gap_factor`` × the median step inside the lungs' z extent."""
    steps = np.diff(positions)
    if len(steps) == 0:
        return
    median = float(np.median(steps))
    zs = np.flatnonzero(areas)
    gaps = [int(k) for k in np.flatnonzero(steps > settings.gap_factor * median) if zs[0] <= k < zs[-1]]
    if not gaps:
        return
    described = [
        f"{steps[k]:.1f} mm between slices {k} and {k + 1} (at {positions[k]:.1f} and "
        f"{positions[k + 1]:.1f} mm, about {max(1, round(steps[k] / median) - 1)} slice(s) missing)"
        for k in gaps[:3]
    ]
    more = f" and {len(gaps) - 3} more" if len(gaps) > 3 else ""
    metrics.flags.append("gap_in_lungs")
    metrics.notes.append(
        f"slices are missing inside the lungs: {'; '.join(described)}{more}, where the "
        f"other slices are {median:.2f} mm apart; the lung volume bridges the gap (each "
        "slice counts its true slab) but what lies in it was not imaged"
    )


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
