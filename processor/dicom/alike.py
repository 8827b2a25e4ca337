"""Walking a file's data set against the one walked before it: the files of a series are alike.

The header walker (:mod:`processor.dicom.fastheader`) steps over every element of a data set,
one Python step each, although consecutive files of a series differ in a handful of them (the
SOP Instance UID, InstanceNumber, ImagePositionPatient, SliceLocation, a few private values).
:class:`Alike` keeps the last data set walked in full (its bytes, where each top-level element
starts, and the wanted values met on the way) and walks the next one against it: the bytes of the
two from an element boundary on are compared in one numpy operation; every whole element before
the first byte that differs is stepped over at once — identical bytes are identical elements,
with identical values, so the walk over them would give the same positions and values — and the
element holding that byte is stepped as the walker steps it. The comparison goes on from there
(at the same distance when the element kept its size, else compared again), until the element
where the earlier walk stopped (Pixel Data), which the walker itself reads. Whatever the walk
against the earlier file cannot step exactly (a special element, too many differences) is left
to the walker from that element on, so the result is always the walker's: the same values, the
same Pixel Data offset, the same exception. Tests compare the two on generated and mutated files.

The files of a series differ from the one walked in full in the same few elements, file after
file. :class:`Alike` remembers which elements the last walk against it stepped one by one, and
the next walk first tries those: the bytes from an element boundary to the next such element are
compared with the earlier file's as ``bytes`` (one copy and one ``memcmp``, no numpy call), and
when they are equal the elements between are stepped over at once, as above. The first run of
bytes that is not equal hands over to the numpy comparison from that element on, so this only
chooses where to look first: an element stepped one by one is stepped as the walker steps it, and
the values, the offset and the exceptions stay the walker's.

A study's series are often interleaved in a ZIP (its members in no particular order), and a file
walked against another series' layout differs from it in many elements: each such file paid a
numpy comparison and a dozen single steps, and the series went on being compared with the wrong
file. :meth:`Alike.use` keeps one layout per key (the scan gives the folder a member lies in:
exports put a series in a folder of its own), so a file is walked against the last one of its
folder. The key only chooses which earlier file to compare with; a wrong one costs time, never a
value.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from processor.dicom.fastheader import (
    _EXPLICIT_NUMBERS,
    _FIRST_SPECIAL_GROUP,
    _HEADER_BY_VR,
    _IMPLICIT,
    _UL,
    _WANTED_GROUPS,
    PER_FRAME_GROUPS,
    UNDEFINED,
    WANTED,
    _walk,
)

MAX_STEPPED = 48  # differing elements stepped one by one before the walker takes the rest
MAX_COMPARED = 12  # byte comparisons (one after each element that changed size) before it does
_RUNS_KEPT = 8  # the runs of this many sets of expected differences are kept for a layout
_FIRST_DIFFERENCES = 64  # differing bytes listed from one comparison (most are after a shift)
_KEYS_KEPT = 64  # layouts kept for this many keys (folders) besides the one in use (~30 KB each)


@dataclass(frozen=True, slots=True)
class Layout:
    """A data set walked in full: its bytes up to Pixel Data, where each top-level element starts
    (the last start is the Pixel Data element), and the wanted values as (tag, value), in element
    order, with the index of the element each was met in."""

    data: np.ndarray  # uint8
    raw: bytes  # the same bytes, compared run by run where the elements that differ are expected
    implicit: bool
    starts: list[int]
    kept: list[tuple[int, bytes]]  # (tag, value)
    kept_at: list[int]  # the element index of each kept value


class Alike:
    """Walks each data set against the last one walked in full (see the module docstring); one per
    scan. After a walk that could not follow the earlier file to its end, the next file is walked
    in full and becomes the one to compare with."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.followed = False  # whether the last walk against the layout reached its end
        self.changed: list[int] = []  # the layout's elements the last walk against it stepped one by one
        self._runs: dict[tuple[int, ...], list[_Run]] = {}  # the layout's runs, by the elements expected
        self._key: object = None
        self._kept: dict[
            object, tuple[Layout | None, bool, list[int], dict[tuple[int, ...], list[_Run]]]
        ] = {}

    def use(self, key: object) -> None:
        """Walk the next files against the layout kept for ``key`` (any hashable; the scan gives a
        member's folder), the one walked last under it. A new key starts with none, so its first
        file is walked in full; once layouts are kept for :data:`_KEYS_KEPT` keys besides the
        current one, a new key goes on with the current key's layout instead (as one layout for
        all did), so that more keys than that, interleaved, do not walk every file in full for a
        layout forgotten before its key comes again. The least recently used is forgotten."""
        if key == self._key:
            return
        self._kept[self._key] = (self.layout, self.followed, self.changed, self._runs)
        state = self._kept.pop(key, None)
        if state is None and len(self._kept) > _KEYS_KEPT:
            state = (self.layout, self.followed, self.changed, dict(self._runs))  # the current one's
        self.layout, self.followed, self.changed, self._runs = (
            (None, False, [], {}) if state is None else state
        )
        self._key = key
        while len(self._kept) > _KEYS_KEPT:
            del self._kept[next(iter(self._kept))]  # the least recently used

    def walk_data_set(
        self, view: memoryview, pos: int, end: int, implicit: bool, out: dict[int, bytes]
    ) -> int | None:
        layout = self.layout
        if layout is not None and self.followed and layout.implicit == implicit:
            expected = tuple(self.changed)
            runs = self._runs.get(expected)
            if runs is None:
                if len(self._runs) >= _RUNS_KEPT:
                    self._runs.clear()
                runs = self._runs[expected] = _runs(layout, expected)
            offset, self.followed, self.changed = _walk_against(view, pos, end, implicit, out, layout, runs)
            return offset
        starts: list[int] = []
        offset = _walk(view, pos, end, implicit, out, top=True, starts=starts)
        if offset is not None and len(starts) > 1:
            self.layout = _layout(view, starts, implicit)
            self.followed, self.changed, self._runs = True, [], {}
        return offset


def _layout(view: memoryview, starts: list[int], implicit: bool) -> Layout:
    raw = bytes(view[: starts[-1]])
    data = np.frombuffer(raw, np.uint8)
    kept: list[tuple[int, bytes]] = []
    kept_at: list[int] = []
    for index in range(len(starts) - 1):
        at = starts[index]
        group, element = struct.unpack_from("<HH", raw, at)
        tag = group << 16 | element
        if tag not in WANTED:
            continue
        if implicit:
            header, length = 8, _UL.unpack_from(raw, at + 4)[0]
        elif _HEADER_BY_VR.get(_EXPLICIT_NUMBERS.unpack_from(raw, at)[2]) == 12:
            header, length = 12, _UL.unpack_from(raw, at + 8)[0]
        else:
            header, length = 8, _EXPLICIT_NUMBERS.unpack_from(raw, at)[3]
        kept.append((tag, b"" if length == UNDEFINED else raw[at + header : at + header + length]))
        kept_at.append(index)
    return Layout(data, raw, implicit, starts, kept, kept_at)


class _Run(NamedTuple):
    """A run of the layout's elements ``first``..``k``-1 expected alike, then its element ``k``,
    expected to differ: their bytes in the layout, and the wanted values of the run."""

    first: int
    k: int
    same: bytes  # the run's bytes in the layout
    kept: list[tuple[int, bytes]]  # the wanted values met in the run, as (tag, value)
    element: bytes  # element k's bytes in the layout (b"" for the last, Pixel Data)


def _runs(layout: Layout, expected: tuple[int, ...]) -> list[_Run]:
    """The runs a walk against ``layout`` tries when it expects the elements ``expected``
    (ascending) to differ, Pixel Data last: each run starts after the element before it."""
    raw, starts, kept, kept_at = layout.raw, layout.starts, layout.kept, layout.kept_at
    last = len(starts) - 1
    runs, i = [], 0
    for k in (*expected, last):
        runs.append(
            _Run(
                i,
                k,
                raw[starts[i] : starts[k]],
                kept[bisect_left(kept_at, i) : bisect_left(kept_at, k)],
                raw[starts[k] : starts[k + 1]] if k < last else b"",
            )
        )
        i = k + 1
    return runs


def _walk_against(
    view: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    out: dict[int, bytes],
    layout: Layout,
    runs: list[_Run],
) -> tuple[int | None, bool, list[int]]:
    """(where Pixel Data starts, as the walker finds it; whether the earlier file was followed to
    its end; the layout's elements stepped one by one). Raises what the walker raises.

    ``runs``: :func:`_runs` of the elements the walk before this one stepped one by one, tried
    first (each run's bytes compared with the layout's as ``bytes``)."""
    last = len(layout.starts) - 1
    i = 0
    changed: list[int] = []
    for first, k, same, kept, element in runs:
        # the bytes of elements first..k-1 as the earlier file's: the same elements, stepped at once
        size = len(same)
        if pos + size > end or view[pos : pos + size].tobytes() != same:
            i = first
            break
        out.update(kept)
        pos += size
        if k == last:
            return _walk(view, pos, end, implicit, out, top=True), True, changed
        step = _step(view, pos, end, implicit, out)
        if step is None:
            return _walk(view, pos, end, implicit, out, top=True), False, changed
        if step != len(element) or view[pos : pos + step].tobytes() != element:
            changed.append(k)  # it differs in this file too: expected in the next one
        pos, i = pos + step, k + 1
    return _compare_and_walk(view, pos, end, implicit, out, layout, i, changed)


def _compare_and_walk(
    view: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    out: dict[int, bytes],
    layout: Layout,
    i: int,
    changed: list[int],
) -> tuple[int | None, bool, list[int]]:
    """:func:`_walk_against` from the layout's element ``i`` (at ``pos`` in this file) on, where
    the elements that differ are found by numpy comparisons of the bytes."""
    here = np.frombuffer(view, np.uint8)
    there, starts, kept, kept_at = layout.data, layout.starts, layout.kept, layout.kept_at
    last = len(starts) - 1
    stepped, compared = len(changed), 0
    while i < last:
        if compared == MAX_COMPARED:
            return _walk(view, pos, end, implicit, out, top=True), False, changed
        compared += 1
        base_here, base_there = pos, starts[i]
        length = min(starts[last] - base_there, end - base_here)
        unequal = here[base_here : base_here + length] != there[base_there : base_there + length]
        found = unequal.nonzero()[0]
        differ: list[int] = found[:_FIRST_DIFFERENCES].tolist()  # offsets from the bases
        shift = base_here - base_there
        while True:
            # the first byte that differs (or where this file's bytes end) from element i on
            j = bisect_left(differ, starts[i] - base_there)
            if j == len(differ) and len(found) > len(differ):
                break  # past the differences listed: compare again from here
            first = base_there + (differ[j] if j < len(differ) else length)
            k = bisect_right(starts, first, i, last + 1) - 1  # the element holding it
            out.update(kept[bisect_left(kept_at, i) : bisect_left(kept_at, k)])
            pos, i = starts[k] + shift, k
            if i == last or stepped == MAX_STEPPED:
                return _walk(view, pos, end, implicit, out, top=True), i == last, changed
            size = _step(view, pos, end, implicit, out)
            if size is None:
                return _walk(view, pos, end, implicit, out, top=True), False, changed
            stepped += 1
            changed.append(k)
            pos, i = pos + size, i + 1
            if size != starts[i] - starts[i - 1]:
                break  # the rest lies at another distance: compare again
    return _walk(view, pos, end, implicit, out, top=True), True, changed


def _step(view: memoryview, pos: int, end: int, implicit: bool, out: dict[int, bytes]) -> int | None:
    """The size of the element at ``pos`` when it is a common one (as the walker's first branch
    reads it, a wanted value of defined length kept), else None: the walker reads it."""
    if pos + 12 > end:
        return None
    if implicit:
        group, element, length = _IMPLICIT.unpack_from(view, pos)
        header = 8
    else:
        group, element, code, length = _EXPLICIT_NUMBERS.unpack_from(view, pos)
        found = _HEADER_BY_VR.get(code)
        if found is None:
            return None
        header = found
        if header == 12:
            length = _UL.unpack_from(view, pos + 8)[0]
    if group >= _FIRST_SPECIAL_GROUP or length == UNDEFINED or pos + header + length > end:
        return None
    tag = group << 16 | element
    if group in _WANTED_GROUPS and tag in WANTED:
        if tag == PER_FRAME_GROUPS or header == 12:
            return None
        out[tag] = bytes(view[pos + header : pos + header + length])
    return header + length
