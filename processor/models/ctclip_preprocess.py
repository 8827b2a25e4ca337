"""CT-CLIP v2 input preprocessing and the DICOM → CT-RATE axis mapping.

``preprocess_volume`` reproduces the official inference preprocessing
(``scripts/data_inference_nii.py`` of ibrahimethemhamamci/CT-CLIP) number for number:
HU clip to [-1000, 1000] *before* resampling, float64 trilinear resampling
(align_corners=False) to int()-truncated sizes at (z, x, y) = (1.5, 0.75, 0.75) mm,
/1000, float32, centre crop / pad with -1 to (X, Y, Z) = (480, 480, 240), then
(1, Z, X, Y). ``ctrate_xyz_from_dicom`` turns a DICOM-ordered volume into the (X, Y, Z)
NIfTI array order CT-RATE was stored in; see docs/ctrate-orientation.md.

Irregular slice grids (missing slices, uneven steps): the official code assumes one step. Given
the true slice positions (``positions=(axis, mm)``; :func:`ctrate_slice_positions` maps DICOM's
to the CT-RATE axis they land on), that axis is first interpolated linearly at the target
positions *on the true grid*, the other two then go through the same trilinear call (identity
along the already-resampled axis). The target grid is the one the official code would use for a
regular grid of the same extent: ``size = int(extent / 1.5)``, ``extent = last − first + median
step``, output voxel ``o`` centred at ``first − step/2 + (o + ½)·extent/size`` (clamped to the
first/last slice). On a regular grid this is the official grid, but floats are rounded
differently, so callers keep regular grids on the official path (``positions=None``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

HU_MIN, HU_MAX = -1000.0, 1000.0
TARGET_SPACING_ZXY = (1.5, 0.75, 0.75)
TARGET_SHAPE_XYZ = (480, 480, 240)
PAD_VALUE = -1.0


def resampled_shape(shape_zxy: Sequence[int], spacing_zxy: Sequence[float]) -> tuple[int, int, int]:
    """int()-truncated size after resampling to TARGET_SPACING_ZXY (official rounding)."""
    sizes = []
    for n, cur, tgt in zip(shape_zxy, spacing_zxy, TARGET_SPACING_ZXY, strict=True):
        sizes.append(int(n * (cur / tgt)))
    return sizes[0], sizes[1], sizes[2]


def _check_spacing(spacing: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(v) for v in spacing)
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"voxel spacing {values} mm is not a positive number on every axis; a volume "
            "whose spacing is unknown cannot be resampled to mm"
        )
    return values


def _grid_positions(positions: Sequence[float], step: float) -> tuple[np.ndarray, float]:
    """Positions made ascending (negated when the array runs the other way) and the grid's extent."""
    c = np.asarray(positions, dtype=np.float64)
    if c.ndim != 1 or len(c) < 2:
        raise ValueError(f"need the position of every slice along the axis (at least 2), got {c.shape}")
    if c[-1] < c[0]:
        c = -c
    if not np.all(np.isfinite(c)) or np.any(np.diff(c) <= 0):
        raise ValueError("slice positions must be finite and strictly monotone along the axis")
    return c, float(c[-1] - c[0]) + step


def planned_shape_zxy(
    shape_xyz: Sequence[int],
    spacing_xyz: Sequence[float],
    positions: tuple[int, Sequence[float]] | None = None,
) -> tuple[int, int, int]:
    """(Z, X, Y) size after resampling: :func:`resampled_shape`, or ``int(extent / target)`` on
    the axis whose true positions are given (the same size for a regular grid)."""
    sx, sy, sz = _check_spacing(spacing_xyz)
    size = list(resampled_shape((shape_xyz[2], shape_xyz[0], shape_xyz[1]), (sz, sx, sy)))
    if positions is not None:
        axis, where = positions
        zxy_axis = _ZXY_OF_XYZ[axis]
        _, extent = _grid_positions(where, (sx, sy, sz)[axis])
        size[zxy_axis] = int(extent / TARGET_SPACING_ZXY[zxy_axis])
    return size[0], size[1], size[2]


_ZXY_OF_XYZ = {0: 1, 1: 2, 2: 0}  # axis of the (X, Y, Z) input → axis of the (Z, X, Y) working array


def _resample_on_positions(
    zxy: np.ndarray, axis: int, positions: Sequence[float], step: float, size: int
) -> np.ndarray:
    """Linear interpolation along ``axis`` of ``zxy`` at ``size`` target positions on the true grid."""
    c, extent = _grid_positions(positions, step)
    n = len(c)
    if zxy.shape[axis] != n:
        raise ValueError(f"{n} slice positions for an axis of {zxy.shape[axis]} slices")
    targets = c[0] - step / 2.0 + (np.arange(size, dtype=np.float64) + 0.5) * (extent / size)
    source = np.interp(targets, c, np.arange(n, dtype=np.float64))  # clamped to [0, n - 1]
    lower = np.minimum(np.floor(source).astype(np.intp), n - 1)
    upper = np.minimum(lower + 1, n - 1)
    weight = source - lower
    shape = list(zxy.shape)
    shape[axis] = size
    out = np.empty(shape, dtype=np.float64)
    src, dst = np.moveaxis(zxy, axis, 0), np.moveaxis(out, axis, 0)
    for o in range(size):
        np.multiply(src[lower[o]], 1.0 - weight[o], out=dst[o])
        if weight[o]:
            dst[o] += weight[o] * src[upper[o]]
    return out


def _crop_pad_slices(
    shape: Sequence[int], target: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Centre crop (start = max((n - t)//2, 0)), then centre pad: (source, destination) slices.

    Same placement as cropping and then ``F.pad(..., ((t - n)//2, rest))`` per axis.
    """
    src: list[slice] = []
    dst: list[slice] = []
    for n, t in zip(shape, target, strict=True):
        start = max((n - t) // 2, 0)
        kept = min(start + t, n) - start
        before = (t - kept) // 2
        src.append(slice(start, start + kept))
        dst.append(slice(before, before + kept))
    return tuple(src), tuple(dst)


def _zxy_float64(hu_xyz: np.ndarray, *, clip: bool, slope: float, intercept: float) -> np.ndarray:
    """One permuted pass from (X, Y, Z) to a contiguous float64 (Z, X, Y) array.

    Without slope/intercept the clip runs in the source dtype (int16/float32) while the
    values are written out: the cast to float64 is exact and the bounds are exactly
    representable, so clip-then-cast equals the official cast-then-clip bit for bit.
    ``slope * v + intercept`` is rounded in float64, as the official code does.
    """
    zxy = hu_xyz.transpose(2, 0, 1)  # a view; ``out`` below is the only copy
    out = np.empty(zxy.shape, dtype=np.float64)
    if slope == 1.0 and intercept == 0.0:
        if clip:
            np.clip(zxy, HU_MIN, HU_MAX, out=out)
        else:
            np.copyto(out, zxy, casting="unsafe")
        return out
    if slope != 1.0:
        np.multiply(zxy, slope, out=out, dtype=np.float64, casting="unsafe")
    else:
        np.copyto(out, zxy, casting="unsafe")
    if intercept != 0.0:
        out += intercept
    if clip:
        np.clip(out, HU_MIN, HU_MAX, out=out)
    return out


def preprocess_volume(
    hu_xyz: np.ndarray,
    spacing_xyz: Sequence[float],
    target_xyz: Sequence[int] = TARGET_SHAPE_XYZ,
    *,
    clip_after_resample: bool = False,
    slope: float = 1.0,
    intercept: float = 0.0,
    positions: tuple[int, Sequence[float]] | None = None,
) -> torch.Tensor:
    """Official CT-CLIP v2 inference preprocessing → (1, Z, X, Y) float32 in [-1, 1].

    Args:
        hu_xyz: volume in CT-RATE NIfTI order (X, Y, Z), in HU (or stored values, with
            ``slope``/``intercept`` applied here as ``slope * v + intercept``). Any strides
            (e.g. the view ``ctrate_xyz_from_dicom`` returns); it is read once, never written.
        spacing_xyz: voxel size (x, y, z) in mm. The official code uses the x spacing for
            both in-plane axes; here each axis uses its own (identical when x == y).
        target_xyz: output size (X, Y, Z); (480, 480, 240) for the released models.
        clip_after_resample: reproduce the v2 *training* loader, which clips after
            resampling (default False = inference path).
        positions: ``(axis, mm)`` — the true position of every index along that axis of
            ``hu_xyz`` (in array order, either direction) for an irregular slice grid; that axis
            is then resampled on those positions, ``spacing_xyz[axis]`` (the median step) only
            sets the half-step margin at each end. None (default): the official uniform grid.
    """
    src = np.asarray(hu_xyz)
    if src.ndim != 3:
        raise ValueError(f"expected a 3-D (X, Y, Z) volume, got shape {src.shape}")
    shape_zxy = (src.shape[2], src.shape[0], src.shape[1])
    size = planned_shape_zxy(src.shape, spacing_xyz, positions)
    if min(size) < 1:
        raise ValueError(f"volume {shape_zxy} at {spacing_xyz} mm resamples to {size}")
    array = _zxy_float64(src, clip=not clip_after_resample, slope=slope, intercept=intercept)
    if positions is not None:
        axis, where = positions
        zxy_axis = _ZXY_OF_XYZ[axis]
        array = _resample_on_positions(array, zxy_axis, where, float(spacing_xyz[axis]), size[zxy_axis])
    zxy = torch.from_numpy(array)
    del array
    resampled = F.interpolate(zxy[None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
    del zxy
    tx, ty, tz = (int(t) for t in target_xyz)
    # Crop first (every later step is element-wise), then /1000 in float64 rounded to
    # float32 as it is written into the PAD_VALUE-filled output: one pass, no F.pad copy.
    src_slices, dst_slices = _crop_pad_slices(size, (tz, tx, ty))
    kept = resampled.numpy()[src_slices]
    if clip_after_resample:
        np.clip(kept, HU_MIN, HU_MAX, out=kept)
    out = np.full((1, tz, tx, ty), PAD_VALUE, dtype=np.float32)
    np.divide(kept, 1000.0, out=out[0][dst_slices], casting="same_kind")
    log.debug("preprocess.done resampled_zxy=%s output_zxy=%s", size, out.shape[1:])
    return torch.from_numpy(out)


def _axis_plan(direction: np.ndarray) -> tuple[list[int], list[bool]]:
    """For LPS world axes (L, P, S), which array axis points along each, and whether flipped.

    ``direction[:, a]`` is the LPS direction in which array axis ``a`` increases.
    """
    unit = direction / np.linalg.norm(direction, axis=0, keepdims=True)
    order: list[int] = []
    flips: list[bool] = []
    for world in range(3):
        candidates = [a for a in range(3) if a not in order]
        axis = max(candidates, key=lambda a: abs(unit[world, a]))
        order.append(axis)
        flips.append(bool(unit[world, axis] < 0))
    cosines = [abs(unit[w, a]) for w, a in enumerate(order)]
    if min(cosines) < 0.99:
        log.warning(
            "orientation.oblique min_cosine=%.4f: axes mapped to the nearest patient axis without resampling",
            min(cosines),
        )
    return order, flips


def ctrate_xyz_from_dicom(
    hu_zyx: np.ndarray,
    spacing_zyx: Sequence[float],
    affine_or_direction: np.ndarray,
) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Reorder a DICOM-ordered volume into CT-RATE's NIfTI (X, Y, Z) array order.

    Input: ``hu_zyx[k, row, col]`` (slice k along the slice normal, then DICOM row, column)
    with ``spacing_zyx = (slice step, row spacing, column spacing)`` in mm, and a 4x4 LPS
    affine (or its 3x3 direction part) whose columns are the directions in which the
    column index, the row index and the slice index increase (DICOM
    ImageOrientationPatient[0:3], ImageOrientationPatient[3:6], slice step).

    Output: array indexed (X, Y, Z) with X increasing toward patient Left, Y toward
    Posterior and Z toward Superior (nibabel axis codes "LPS"), and spacing (x, y, z).
    After the official (Z, X, Y) transpose the model therefore sees (S, L, P) — the
    orientation CT-CLIP was trained on, according to F. Pérez-García's analysis in
    CT-CLIP issue #41 (comment 2657932457), restated in TorchIO issue #1282 (2025-04-09):
    "they trained with SLP+ images". For a standard head-first-supine axial series
    (IOP 1\\0\\0\\0\\1\\0) this is ``hu_zyx.transpose(2, 1, 0)`` with the slice axis
    flipped when slices are stored superior → inferior. Oblique series are mapped to the
    nearest patient axes without resampling (a warning is logged). Remaining uncertainty:
    see docs/ctrate-orientation.md.

    The returned array is a *view* of ``hu_zyx`` (transposed, possibly negative strides),
    not a copy: ``preprocess_volume`` makes its single permuted float64 copy from it, so a
    contiguous copy here would only be thrown away. It shares memory with ``hu_zyx``: do
    not write to either while the other is in use, and call ``np.ascontiguousarray`` if
    you need contiguous memory (e.g. ``torch.from_numpy``).
    """
    vol = np.asarray(hu_zyx)
    if vol.ndim != 3:
        raise ValueError(f"expected a 3-D [slice, row, col] volume, got shape {vol.shape}")
    matrix = np.asarray(affine_or_direction, dtype=np.float64)
    if matrix.shape not in {(4, 4), (3, 3)}:
        raise ValueError(f"expected a 4x4 affine or 3x3 direction matrix, got {matrix.shape}")
    direction = matrix[:3, :3]
    if np.any(np.linalg.norm(direction, axis=0) == 0):
        raise ValueError("affine has a zero-length axis direction")
    # array axes of hu_zyx are (slice, row, col) = affine columns (2, 1, 0)
    array_dirs = direction[:, [2, 1, 0]]
    order, flips = _axis_plan(array_dirs)
    out = np.transpose(vol, order)
    for axis, flip in enumerate(flips):
        if flip:
            out = np.flip(out, axis=axis)
    spacing = tuple(float(spacing_zyx[a]) for a in order)
    log.debug("orientation.mapped order=%s flips=%s", order, flips)
    return out, (spacing[0], spacing[1], spacing[2])


def ctrate_slice_positions(
    positions_mm: Sequence[float], affine_or_direction: np.ndarray
) -> tuple[int, np.ndarray]:
    """Where DICOM's slice axis lands in :func:`ctrate_xyz_from_dicom`'s (X, Y, Z) output: that
    axis and the slice positions (mm, along the normal) in the output's array order — the
    ``positions`` argument of :func:`preprocess_volume` for an irregular slice grid."""
    matrix = np.asarray(affine_or_direction, dtype=np.float64)
    order, flips = _axis_plan(matrix[:3, :3][:, [2, 1, 0]])
    axis = order.index(0)  # array axis 0 of hu_zyx is the slice axis
    where = np.asarray(positions_mm, dtype=np.float64)
    return axis, (where[::-1].copy() if flips[axis] else where.copy())
