"""The body mask of a chest CT: per slice, the patient's body and its interior (convex hull), inside
which ``processor.dicom.lungs`` looks for the lungs.

Method (no model; numpy and connected-components-3d: :mod:`processor.dicom.components`), on a HU
volume (z, y, x):

1. the pixels above ``threshold_hu`` (−500 HU: soft tissue and bone are well above it, air and
   lung well below) are taken on a coarse grid of about ``grid_px`` (128) rows and columns —
   every f-th row and column of the image, the last row and column included, so the image edge is
   sampled;
2. they are opened in-plane so that tissue thinner than about ``thin_mm`` (8 mm) comes off — a
   thin table, cables and noise — and nothing thicker: the structuring element is an ellipse of
   radius ``r = (thin_mm / step − 1) / 2`` coarse pixels per axis (rounded down), where ``step`` is
   that axis's coarse-grid step in mm (grid step × pixel spacing), so the size is the same in mm
   whatever the field of view, matrix or anisotropic pixel; on a coarse grid of 4 mm or more no
   opening is done. A thin chest wall (≥ 10 mm) is never opened away. When the pixel spacing is
   unknown the pixel rule is used instead: a 4-neighbour cross of ``opening_px`` (2) grid pixels
   (removes tissue thinner than about 5 grid pixels — the size in mm is then unknown). Pixels
   beyond the image edge count as body, so a body cut by the edge is not thinned there;
3. in every slice the largest in-plane component is the body (a table apart from the patient goes);
4. the body's *interior* in that slice is the convex hull of that component, as a polygon of 32
   directions (every 11.25°): its reach ``max u·p`` along each direction u, in image pixels. A body
   cut by the image edge still encloses its lungs in its hull.

The interior is handed on as column spans ``left[z, y] ≤ x ≤ right[z, y]`` (int16 image pixel
columns; ``left > right`` where a row holds none of it), optionally moved ``inset`` image pixels
inwards from the hull's outline.

Units: HU for ``threshold_hu``; mm for ``thin_mm``; coarse-grid pixels for ``grid_px`` and
``opening_px`` (the fallback without a pixel spacing); image pixels
(row, column indices of the (y, x) plane) for the polygon, the spans and ``inset``.

Source of the convention: the classic threshold lung segmentation (Hu, Hoffman & Reinhardt,
"Automatic lung segmentation for accurate quantitation of volumetric X-ray CT images", IEEE TMI
20(6), 2001) drops the air around the patient as the background that touches the image border. A
field of view narrower than the chest breaks that rule (the lungs touch the border too, and the
table lifts outside air to lung density), so the body is made explicit here and closed by its
convex hull — this project's rule "air outside the patient is never lung" (README, item 8;
issue 13, tests/test_lungs_fov.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from processor.dicom.components import label_in_plane

_ANGLES = np.arange(32) * (np.pi / 16)  # directions of the hull polygon (every 11.25°)
_UY, _UX = np.cos(_ANGLES).astype(np.float32), np.sin(_ANGLES).astype(np.float32)
_UX[np.abs(_UX) < 1e-6] = 0.0


@dataclass(frozen=True)
class BodySettings:
    threshold_hu: float = -500.0  # body: pixels above this
    grid_px: int = 128  # the body mask works on about this many rows and columns
    opening_px: int = 2  # opening radius in coarse pixels, used only when the pixel spacing is unknown
    thin_mm: float = 8.0  # tissue thinner than about this (mm) is opened away: a thin table, cables


def _grid(n: int, step: int) -> np.ndarray:
    """Every ``step``-th index of ``n``, and the last one (so the image edge is sampled)."""
    idx = np.arange(0, n, step)
    return idx if idx[-1] == n - 1 else np.append(idx, n - 1)


def _shifted_cross(mask: np.ndarray, edge: bool, erode: bool) -> np.ndarray:
    """One in-plane step of erosion (``erode``) or dilation by the 4-neighbour cross; pixels beyond
    the image edge count as ``edge``."""
    out = mask.copy()
    combine = np.logical_and if erode else np.logical_or
    for axis in (1, 2):
        for lo, hi in ((slice(1, None), slice(None, -1)), (slice(None, -1), slice(1, None))):
            to, frm = [slice(None)] * 3, [slice(None)] * 3
            to[axis], frm[axis] = lo, hi
            combine(out[tuple(to)], mask[tuple(frm)], out=out[tuple(to)])
        if erode != edge:  # the row/column at the edge meets the outside
            for i in (0, -1):
                at: list[slice | int] = [slice(None)] * 3
                at[axis] = i
                out[tuple(at)] = edge if not erode else False
    return out


def _opened(mask: np.ndarray, radius: int) -> np.ndarray:
    """In-plane opening by a cross of ``radius`` steps; the image edge counts as inside, so a body
    cut by it is not thinned there."""
    core = mask
    for _ in range(radius):
        core = _shifted_cross(core, edge=True, erode=True)
    for _ in range(radius):
        core = _shifted_cross(core, edge=False, erode=False)
    return core & mask


def _sampled_above(hu: np.ndarray, step: int, threshold: float) -> np.ndarray:
    """``hu[:, rows[:, None], cols] > threshold`` for ``rows, cols = _grid(ny, step), _grid(nx, step)``,
    from strided views (every ``step``-th row and column, then the last ones where the stride
    misses them): twice as fast as the fancy index."""
    nz, ny, nx = hu.shape
    rows, cols = _grid(ny, step), _grid(nx, step)
    out = np.empty((nz, len(rows), len(cols)), bool)
    r, c = len(range(0, ny, step)), len(range(0, nx, step))  # the strided part of each grid
    np.greater(hu[:, ::step, ::step], threshold, out=out[:, :r, :c])
    if r < len(rows):
        np.greater(hu[:, -1:, ::step], threshold, out=out[:, r:, :c])
    if c < len(cols):
        np.greater(hu[:, rows, -1:], threshold, out=out[:, :, c:])
    return out


def opening_radii(step_mm: tuple[float, float], thin_mm: float) -> tuple[int, int]:
    """Opening radius in coarse pixels along rows and columns that removes tissue thinner than
    about ``thin_mm`` and nothing thicker: an opening of radius r keeps what is 2r + 1 pixels thick."""
    return tuple(max(0, int((thin_mm / s - 1) // 2)) for s in step_mm)  # type: ignore[return-value]


def _opened_mm(mask: np.ndarray, radii: tuple[int, int]) -> np.ndarray:
    """In-plane opening by an ellipse of ``radii`` (rows, columns) coarse pixels; the image edge
    counts as inside, as in :func:`_opened`."""
    ry, rx = radii
    if ry == 0 and rx == 0:
        return mask
    dy, dx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disc = (dy / max(ry, 0.5)) ** 2 + (dx / max(rx, 0.5)) ** 2 <= 1
    offsets = [(int(y), int(x)) for y, x in zip(*np.nonzero(disc), strict=True)]
    core = _by_offsets(mask, offsets, (ry, rx), erode=True)
    return _by_offsets(core, offsets, (ry, rx), erode=False) & mask


def _by_offsets(
    mask: np.ndarray, offsets: list[tuple[int, int]], radii: tuple[int, int], erode: bool
) -> np.ndarray:
    """In-plane erosion (``erode``: a pixel stays where every pixel at ``offsets`` from it is set,
    pixels beyond the image edge counting as set) or dilation (a pixel is set where any pixel at
    ``offsets`` from it is, pixels beyond the edge counting as unset) of a (z, y, x) mask by a
    centred, point-symmetric structuring element: ``offsets`` are its set (row, column) positions in
    a (2·ry + 1, 2·rx + 1) window. The values of ``scipy.ndimage.binary_erosion(mask, element[None],
    border_value=1)`` and ``binary_dilation(mask, element[None], border_value=0)`` (dilation uses the
    reflected element, the same one when it is point-symmetric). Written here, a few shifted
    ANDs or ORs on the coarse grid, so that the weight-free pipeline does not import SciPy (see
    :mod:`processor.dicom.components`)."""
    ry, rx = radii
    nz, ny, nx = mask.shape
    padded = np.full((nz, ny + 2 * ry, nx + 2 * rx), erode, bool)
    padded[:, ry : ry + ny, rx : rx + nx] = mask
    out = np.full(mask.shape, erode, bool)
    combine = np.logical_and if erode else np.logical_or
    for y, x in offsets:
        combine(out, padded[:, y : y + ny, x : x + nx], out=out)
    return out


def _largest_per_slice(mask: np.ndarray) -> np.ndarray:
    """The largest in-plane component of ``mask`` in every slice."""
    labels, count = label_in_plane(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    # in-plane components never span slices and are numbered in scan order: slice k holds a range of ids
    top = np.maximum.accumulate(labels.reshape(len(labels), -1).max(axis=1))
    low = np.concatenate([[0], top[:-1]]) + 1
    best = np.array(
        [lo + int(np.argmax(sizes[lo : hi + 1])) if hi >= lo else -1 for lo, hi in zip(low, top, strict=True)]
    )
    return labels == best[:, None, None]


def body_polygon(
    hu: np.ndarray, settings: BodySettings, pixel_mm: tuple[float, float] | None = None
) -> tuple[np.ndarray, int]:
    """The body's convex hull per slice as a polygon: its reach ``max u·p`` along each direction u of
    ``_ANGLES`` (shape (z, directions), −inf in a slice without body), and the coarse grid step.
    ``pixel_mm`` (row, column spacing) sizes the opening in mm; without it the pixel rule is used."""
    nz, ny, nx = hu.shape
    f = max(1, round(max(ny, nx) / settings.grid_px))
    rows, cols = _grid(ny, f), _grid(nx, f)
    dense = _sampled_above(hu, f, settings.threshold_hu)
    if pixel_mm is not None and all(np.isfinite(v) and v > 0 for v in pixel_mm):
        opened = _opened_mm(dense, opening_radii((f * pixel_mm[0], f * pixel_mm[1]), settings.thin_mm))
    else:
        opened = _opened(dense, settings.opening_px)
    body = _largest_per_slice(opened)
    has = np.any(body, axis=2)[..., None]
    left = cols[np.argmax(body, axis=2)].astype(np.float32)[..., None]
    right = cols[len(cols) - 1 - np.argmax(body[:, :, ::-1], axis=2)].astype(np.float32)[..., None]
    y = rows.astype(np.float32)[None, :, None]
    ends = np.maximum(_UY * y + _UX * left, _UY * y + _UX * right)
    return np.where(has, ends, -np.inf).max(axis=1), f


def polygon_spans(reach: np.ndarray, ny: int, inset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Column spans ``left[z, y] ≤ x ≤ right[z, y]`` (int16 pixel columns) of the polygon moved
    ``inset`` pixels inwards, on every row: x ≤ (h − uy·y)/ux where ux > 0, x ≥ … where ux < 0,
    uy·y ≤ h where ux = 0."""
    h = reach[:, None, :] - np.float32(inset)
    yy = np.arange(ny, dtype=np.float32)[None, :, None]
    pos, neg, flat = _UX > 0, _UX < 0, _UX == 0
    right = ((h[..., pos] - _UY[pos] * yy) / _UX[pos]).min(axis=2)
    left = ((h[..., neg] - _UY[neg] * yy) / _UX[neg]).max(axis=2)
    outside = (_UY[flat] * yy > h[..., flat]).any(axis=2)
    left[outside], right[outside] = np.inf, -np.inf
    top = np.iinfo(np.int16).max  # pixel columns as int16: a third of the time of float comparisons
    return (
        np.clip(np.ceil(left - 1e-3), 0, top).astype(np.int16),
        np.clip(np.floor(right + 1e-3), -1, top).astype(np.int16),
    )


def body_spans(
    hu: np.ndarray,
    settings: BodySettings | None = None,
    inset: float = 0.0,
    pixel_mm: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The body's interior per slice and row, as column spans ``left[z, y] ≤ x ≤ right[z, y]``
    (int16, shape (z, y); ``left > right`` where a row holds none of it), moved ``inset``
    pixels inwards. See the module docstring."""
    return polygon_spans(body_polygon(hu, settings or BodySettings(), pixel_mm)[0], hu.shape[1], inset)
