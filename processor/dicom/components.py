"""Face-connected (6-neighbour) components of a 3-D mask, labelled slab by slab so that the
labels take 2 bytes a voxel and the working set stays small.

``scipy.ndimage.label(mask)`` (its default structure) returns int32 labels numbered in raster
order of each component's first voxel; connected-components-3d gives the same array, but its
binary labelling of a whole (z, y, x) volume holds uint32 labels (4 bytes a voxel) and a union-find
table of half a voxel count of uint32 (2 bytes a voxel) at once: 6 bytes a voxel on top of the
mask, three times an int16 HU volume. Here each slab of slices along z is labelled alone by
connected-components-3d (the same raster order inside the slab), its labels stored as uint16 in
the one output array; the components that continue across a slab boundary are joined
(the connected components of the graph whose edges are the pairs of labels facing each other
across it), and every component is renumbered by the first slab piece it has, which is the raster order of
its first voxel. The result is the same array as ``scipy.ndimage.label`` — in uint16 when every
slab and the whole have fewer than 65,535 components, else (a volume of many tiny pockets) the
whole volume is labelled again in one piece as int32.

The in-plane labellings of the lung and body masks (:func:`label_in_plane`, :func:`label_2d`) are
connected-components-3d's too, so the weight-free pipeline never imports SciPy: importing
``scipy.ndimage`` and ``scipy.sparse`` cost every ``process`` call, daemon start and CPU pool
process 0.8 CPU-s (SciPy 1.17 rewrites the docstring of every ndimage function at import; 2-core
AMD EPYC, medians of 7; issue 18: import only what runs). The cross-slab join is a few lines of
numpy for the same reason (:func:`_components_of`). tests/test_lungs.py checks the labellings
against SciPy's value for value (the join through :func:`label_3d`, in slabs of one slice).
"""

from __future__ import annotations

from collections.abc import Callable

import cc3d
import numpy as np

# voxels per slab: 16 slices of 512², 16 MiB of uint32 labels while labelled. Below glibc's largest
# dynamic mmap threshold (32 MiB), so a slab's freed buffers are reused from the heap by the next
# slab; 32 MiB slabs were mapped afresh each time (twice the page faults: a lung mask of 300 slices
# of 512² took 1.65-2.0 CPU-s instead of 1.3-1.6, 2-core AMD EPYC, numpy's huge-page hint off)
SLAB_VOXELS = 1 << 22
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
        root = _components_of(total, edges[0], edges[1])
    else:  # nothing continues across a boundary: each piece is a component
        root = np.arange(total)
    # a component's root is its smallest provisional id, its first piece: numbering the roots in
    # ascending order numbers the components by the raster order of their first voxels
    roots, rank = np.unique(root, return_inverse=True)
    return np.concatenate([[0], rank + 1]), len(roots)


def _components_of(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected components of the undirected graph of nodes 0..n−1 and edges (a[i], b[i]): each
    node's component as its smallest node. Minimum-label propagation with pointer jumping (each
    round every edge pulls both ends down to the smaller root, then each node jumps to its root's
    root), a few rounds for the short chains of slab pieces; the fixed point is reached when no
    edge joins two roots."""
    root = np.arange(n)
    while True:
        ra, rb = root[a], root[b]
        low = np.minimum(ra, rb)
        np.minimum.at(root, ra, low)  # the roots of both ends point at the smaller one
        np.minimum.at(root, rb, low)
        while True:  # pointer jumping: every node to its root's root
            jumped = root[root]
            if np.array_equal(jumped, root):
                break
            root = jumped
        if np.array_equal(root[a], root[b]):
            return root


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


def label_in_plane(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """In-plane 4-connected components of a boolean (z, y, x) ``mask``: no component spans two
    slices; labels (int32, the shape of ``mask``) numbered in raster order of their first voxel,
    and their count — the values of ``scipy.ndimage.label(mask, structure)`` with the 3×3×3
    structure whose middle plane is the 2-D cross. The slices are stacked into one 2-D image with
    an empty row between them, so one connected-components-3d call labels them all in that order."""
    nz, ny, nx = mask.shape
    if mask.size == 0:
        return np.zeros(mask.shape, np.int32), 0
    tall = np.zeros((nz, ny + 1, nx), bool)
    tall[:, :ny] = mask
    labels, count = cc3d.connected_components(
        tall.reshape(nz * (ny + 1), nx), connectivity=4, return_N=True, out_dtype=np.uint32
    )
    return np.ascontiguousarray(labels.reshape(nz, ny + 1, nx)[:, :ny]).view(np.int32), int(count)


def label_2d(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a boolean (y, x) ``mask``: int32 labels in raster order of their
    first pixel and their count, the values of ``scipy.ndimage.label(mask)``."""
    if mask.size == 0:
        return np.zeros(mask.shape, np.int32), 0
    labels, count = (
        cc3d.connected_components(  # as bool: cc3d would label each value of an integer mask apart
            np.ascontiguousarray(mask, dtype=bool), connectivity=4, return_N=True, out_dtype=np.uint32
        )
    )
    return labels.view(np.int32), int(count)
