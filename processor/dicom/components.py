"""Face-connected (6-neighbour) components of a 3-D mask, labelled slab by slab so that the
labels take 2 bytes a voxel and the working set stays small.

``scipy.ndimage.label(mask)`` (its default structure) returns int32 labels numbered in raster
order of each component's first voxel; connected-components-3d gives the same array, but its
binary labelling of a whole (z, y, x) volume holds uint32 labels (4 bytes a voxel) and a union-find
table of half a voxel count of uint32 (2 bytes a voxel) at once: 6 bytes a voxel on top of the
mask, three times an int16 HU volume. Here each slab of slices along z is labelled alone by
connected-components-3d (the same raster order inside the slab), its labels stored as uint16 in
the one output array; the components that continue across a slab boundary are joined
(``scipy.sparse.csgraph.connected_components`` over the pairs of labels facing each other across
it), and every component is renumbered by the first slab piece it has, which is the raster order of
its first voxel. The result is the same array as ``scipy.ndimage.label`` — in uint16 when every
slab and the whole have fewer than 65,535 components, else (a volume of many tiny pockets) the
whole volume is labelled again in one piece as int32.
"""

from __future__ import annotations

from collections.abc import Callable

import cc3d
import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

SLAB_VOXELS = 1 << 23  # voxels per slab (32 slices of 512²): 32 MiB of uint32 labels while labelled
_MAX_UINT16 = int(np.iinfo(np.uint16).max)


def slab_ranges(nz: int, slice_voxels: int, slab_voxels: int = SLAB_VOXELS) -> list[tuple[int, int]]:
    """[z0, z1) ranges of whole slices covering ``nz`` slices, about ``slab_voxels`` each."""
    step = max(1, slab_voxels // max(1, slice_voxels))
    return [(z, min(z + step, nz)) for z in range(0, nz, step)]


def label_3d(mask: np.ndarray, slab_voxels: int = SLAB_VOXELS) -> tuple[np.ndarray, int]:
    """Face-connected components of a 3-D boolean ``mask`` (z, y, x): labels numbered in raster order
    of their first voxel, 0 for background, and their count — the values of
    ``scipy.ndimage.label(mask)``, as uint16 when they fit (see the module docstring), else int32."""
    return label_slabs(lambda z0, z1: mask[z0:z1], mask.shape, slab_voxels)


def label_slabs(
    slab_of: Callable[[int, int], np.ndarray],
    shape: tuple[int, ...],
    slab_voxels: int = SLAB_VOXELS,
) -> tuple[np.ndarray, int]:
    """:func:`label_3d` of the mask whose slices ``[z0, z1)`` ``slab_of(z0, z1)`` gives (a boolean
    array of shape (z1 − z0, y, x)), so the whole mask never needs to exist at once."""
    nz, slice_voxels = shape[0], int(np.prod(shape[1:]))
    ranges = slab_ranges(nz, slice_voxels, slab_voxels)
    labels = np.zeros(shape, np.uint16)
    counts = []
    for z0, z1 in ranges:
        local, n = cc3d.connected_components(
            np.ascontiguousarray(slab_of(z0, z1)), connectivity=6, return_N=True, out_dtype=np.uint32
        )
        if n >= _MAX_UINT16:
            return _whole(slab_of, ranges, shape)
        labels[z0:z1] = local
        counts.append(int(n))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    number, count = _join(labels, ranges, offsets)
    if count >= _MAX_UINT16:
        del labels
        return _whole(slab_of, ranges, shape)
    for k, (z0, z1) in enumerate(ranges):
        lut = number[offsets[k] : offsets[k + 1] + 1].astype(np.uint16)
        lut[0] = 0
        if not np.array_equal(lut, np.arange(len(lut))):
            labels[z0:z1] = lut[labels[z0:z1]]
    return labels, count


def _join(labels: np.ndarray, ranges: list[tuple[int, int]], offsets: np.ndarray) -> tuple[np.ndarray, int]:
    """The final number of every provisional label (slab ``k``'s local label ``j`` is ``offsets[k] +
    j``; index 0 unused) and the count of components: slab pieces facing each other across a
    boundary are one component, numbered by its first piece (slab order, then local order: the
    raster order of first voxels)."""
    total = int(offsets[-1])
    pairs = []
    for k in range(1, len(ranges)):
        below, above = labels[ranges[k][0] - 1], labels[ranges[k][0]]
        both = (below > 0) & (above > 0)
        if both.any():
            key = np.unique((below[both].astype(np.int64) << 16) | above[both])
            pairs.append(np.stack([(key >> 16) + offsets[k - 1], (key & 0xFFFF) + offsets[k]]))
    if pairs:
        edges = np.concatenate(pairs, axis=1) - 1  # provisional ids 1..total as nodes 0..total-1
        ones = np.ones(edges.shape[1], np.int8)
        graph = sparse.coo_matrix((ones, (edges[0], edges[1])), shape=(total, total))
        component = csgraph.connected_components(graph, directed=False)[1]
    else:  # nothing continues across a boundary: each piece is a component
        component = np.arange(total)
    _, first = np.unique(component, return_index=True)  # each component's first piece
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(first) + 1)
    return np.concatenate([[0], rank[component]]), len(first)


def _whole(
    slab_of: Callable[[int, int], np.ndarray], ranges: list[tuple[int, int]], shape: tuple[int, ...]
) -> tuple[np.ndarray, int]:
    """Too many components for uint16: the whole mask labelled in one piece, int32 as scipy's."""
    mask = np.empty(shape, bool)
    for z0, z1 in ranges:
        mask[z0:z1] = slab_of(z0, z1)
    labels, count = cc3d.connected_components(
        np.ascontiguousarray(mask), connectivity=6, return_N=True, out_dtype=np.uint32
    )
    return labels.view(np.int32), int(count)
