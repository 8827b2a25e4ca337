"""The image stack of a series: the instances that can form one axial volume, and the rest set aside.

A series is judged by its image stack, not by its first file. Scanners, PACS and planning
systems put other objects under the same SeriesInstanceUID: a scout, an RT Structure Set, a
dose-report screen capture, a reformatted image of another orientation. Before the selection rules
run, every instance that cannot belong to the axial stack is set aside, each with one reason (the
first that applies, in this order):

1. ``non-image object (<SOP class>)``: no pixel matrix (Rows/Columns/BitsAllocated), or a SOP
   class that is not an image (RT Structure Set, Structured Report, Presentation State, Key Object
   Selection, encapsulated documents, raw data...);
2. ``secondary capture``: a Secondary Capture SOP class (screenshots, dose reports);
3. ``localizer/scout``: ImageType holds LOCALIZER;
4. ``other modality (<M>)``: Modality differs from the stack's majority;
5. ``other orientation (<plane>)``: ImageOrientationPatient differs from the majority orientation
   (ties: the one closest to axial);
6. ``other matrix size (<rows>x<cols>)``: not the majority Rows × Columns;
7. ``other pixel spacing (<row>\\<col> mm)``: not the majority PixelSpacing.

Majorities count images (frames). What is left is the stack; its modality and ImageType are the
stack's majority and its number and description come from its first file. Pure and idempotent:
the stack of a stack is itself.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
from pydicom.uid import UID

from processor.dicom.frames import Frame, frames_of, slice_normal
from processor.dicom.scan import Instance, Series

SECONDARY_CAPTURE = ("1.2.840.10008.5.1.4.1.1.7",)  # and its multi-frame variants .7.1–.7.4
# SOP classes that hold no image, by UID prefix (PS3.4 Annex B): RT Structure Set, Plan, Treatment
# Records (481.3–.481.9 apart from 481.1 RT Image and 481.2 RT Dose), Structured Reports and Key
# Object Selection (88.x), Presentation States (11.x), raw data and registrations (66, 66.1, 66.3),
# encapsulated documents (104.x).
NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.481.3",
    "1.2.840.10008.5.1.4.1.1.481.4",
    "1.2.840.10008.5.1.4.1.1.481.5",
    "1.2.840.10008.5.1.4.1.1.481.6",
    "1.2.840.10008.5.1.4.1.1.481.7",
    "1.2.840.10008.5.1.4.1.1.481.8",
    "1.2.840.10008.5.1.4.1.1.481.9",
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.66",
    "1.2.840.10008.5.1.4.1.1.104.",
)
ORIENTATION_TOLERANCE = 1e-3  # direction cosines equal to this are one orientation
SPACING_TOLERANCE_MM = 1e-3  # pixel spacings equal to this are one spacing


@dataclass
class Stack:
    """A series reduced to its image stack, with every set-aside instance counted by reason."""

    series: Series  # same SeriesInstanceUID, only the stack's instances (file order kept)
    set_aside: Counter[str] = field(default_factory=Counter)
    set_aside_files: list[tuple[str, str]] = field(default_factory=list)  # (member name, reason)
    modality: str = ""
    image_type: tuple[str, ...] = ()

    @property
    def instances_set_aside(self) -> int:
        return sum(self.set_aside.values())


def _sop_name(uid: str) -> str:
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "no SOP Class UID")


def _object_reason(instance: Instance) -> str | None:
    facts = instance.facts
    sop = facts.sop_class_uid or facts.media_sop_class_uid
    if sop.startswith(NON_IMAGE_PREFIXES) or not (facts.rows and facts.cols and facts.bits_allocated):
        return f"non-image object ({_sop_name(sop)})"
    if any(sop == p or sop.startswith(p + ".") for p in SECONDARY_CAPTURE):
        return "secondary capture"
    if "LOCALIZER" in facts.image_type:
        return "localizer/scout"
    return None


def plane_name(orientation: Sequence[float]) -> str:
    """``axial``, ``coronal``, ``sagittal`` (slice normal within 30° of an axis) or ``oblique``."""
    normal = np.abs(slice_normal(orientation))
    axis = int(np.argmax(normal))
    if normal[axis] < np.cos(np.radians(30)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


class _Clusters:
    """Vectors equal within ``tolerance`` (every component) share the key of the first one seen, so
    float noise never splits a stack, whichever side of a rounding edge it falls on."""

    def __init__(self, tolerance: float) -> None:
        self.tolerance = tolerance
        self.seen: list[tuple[float, ...]] = []
        # value → its key: keys are only ever appended, so an equal value always gets the same one
        self.keys: dict[tuple[float, ...], tuple[float, ...]] = {}

    def key(self, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is None:
            return None
        known_key = self.keys.get(value)
        if known_key is None:
            known_key = self.keys[value] = self._first_close(value)
        return known_key

    def _first_close(self, value: tuple[float, ...]) -> tuple[float, ...]:
        for known in self.seen:
            if (
                len(known) == len(value)
                and max(abs(a - b) for a, b in zip(known, value, strict=True)) <= self.tolerance
            ):
                return known
        self.seen.append(tuple(value))
        return tuple(value)


def _majority(counts: Counter, prefer: Callable[[Hashable], float] | None = None) -> Hashable:
    """The most frequent key; ties go to the highest ``prefer`` score, then to the first seen."""
    order = {key: i for i, key in enumerate(counts)}
    return max(counts, key=lambda k: (counts[k], prefer(k) if prefer else 0.0, -order[k]))


def _axial_score(key: Hashable) -> float:
    # an orientation key of _Clusters: a tuple of six floats, or None
    return abs(float(slice_normal(cast(tuple[float, ...], key))[2])) if key is not None else -1.0


def image_stack(series: Series) -> Stack:
    """Set aside what cannot belong to the series' axial image stack (see the module docstring).

    Computed once for the series' instances (:meth:`Series.memo`: selection and the volume both
    ask). Each call returns its own :class:`Stack`, whose series holds its own list of the stack's
    instances and shares what was computed from them (:meth:`Series.sharing_memo`): the stack's
    frames are computed once too, and a caller that changes its list changes no one else's."""
    held = series.memo("image stack", lambda: _image_stack(series))
    return Stack(
        held.series.sharing_memo(),
        Counter(held.set_aside),
        list(held.set_aside_files),
        held.modality,
        held.image_type,
    )


def _image_stack(series: Series) -> Stack:
    frames = frames_of(series)
    by_instance: dict[int, list[Frame]] = {}
    for f in frames:
        by_instance.setdefault(f.instance, []).append(f)
    reasons: dict[int, str] = {}
    for index, instance in enumerate(series.instances):
        reason = _object_reason(instance)
        if reason is None and not by_instance.get(index):
            reason = "non-image object (no frames)"
        if reason is not None:
            reasons[index] = reason
    orientations, spacings = _Clusters(ORIENTATION_TOLERANCE), _Clusters(SPACING_TOLERANCE_MM)
    rules: list[
        tuple[
            Callable[[Instance, list[Frame]], Hashable],
            Callable[[Hashable], str],
            Callable[[Hashable], float] | None,
        ]
    ] = [
        (lambda inst, fs: inst.facts.modality or None, lambda k: f"other modality ({k})", None),
        (
            lambda inst, fs: orientations.key(fs[0].orientation),
            lambda k: (
                f"other orientation ({plane_name(cast(tuple[float, ...], k))})"
                if k is not None
                else "no ImageOrientationPatient (left out)"
            ),
            _axial_score,
        ),
        (
            lambda inst, fs: (fs[0].rows, fs[0].cols),
            lambda k: "other matrix size ({}x{})".format(*cast(tuple[int, int], k)),
            None,
        ),
        (
            lambda inst, fs: spacings.key(fs[0].pixel_spacing),
            lambda k: (
                "other pixel spacing ({} mm)".format("\\".join(f"{v:g}" for v in cast(tuple[float, ...], k)))
                if k
                else "no PixelSpacing (left out)"
            ),
            None,
        ),
    ]
    candidates = [i for i in range(len(series.instances)) if i not in reasons]
    alike = {  # every rule's key is a function of these: one value, no rule sets anything aside
        (
            series.instances[i].facts.modality,
            by_instance[i][0].orientation,
            by_instance[i][0].rows,
            by_instance[i][0].cols,
            by_instance[i][0].pixel_spacing,
        )
        for i in candidates
    }
    for key_of, describe, prefer in rules if len(alike) > 1 else ():
        keys = {
            i: key_of(series.instances[i], by_instance[i])
            for i in range(len(series.instances))
            if i not in reasons
        }
        counts: Counter = Counter()
        for i, key in keys.items():
            counts[key] += len(by_instance[i])
        if len(counts) < 2:
            continue
        keep = _majority(counts, prefer)
        for i, key in keys.items():
            if key != keep:
                reasons[i] = describe(key)
    kept_at = [i for i in range(len(series.instances)) if i not in reasons]
    stack = Stack(Series(series.uid, [series.instances[i] for i in kept_at]))
    stack.series.remember("frames", _renumbered(frames, kept_at, len(series.instances)))
    for i in sorted(reasons):
        stack.set_aside[reasons[i]] += 1
        stack.set_aside_files.append((series.instances[i].member.name, reasons[i]))
    modalities = Counter(inst.facts.modality for inst in stack.series.instances if inst.facts.modality)
    stack.modality = modalities.most_common(1)[0][0] if modalities else ""
    types = Counter(f.image_type for f in frames if f.instance not in reasons and f.image_type)
    stack.image_type = types.most_common(1)[0][0] if types else ()
    return stack


def _renumbered(frames: list[Frame], kept: list[int], files: int) -> list[Frame]:
    """The frames of the files ``kept`` (indices, ascending, of a series of ``files`` files), each
    naming its file by its index among those kept: what :func:`processor.dicom.frames.frames_of`
    gives for the kept files (a frame is a function of its file and that index), without reading
    their headers again."""
    if len(kept) == files:
        return frames
    index = {i: j for j, i in enumerate(kept)}
    return [
        f if f.instance == index[f.instance] else replace(f, instance=index[f.instance])
        for f in frames
        if f.instance in index
    ]


def stack_frames(frames: list[Frame]) -> tuple[list[Frame], Counter[str]]:
    """The frames of the majority orientation (within :data:`ORIENTATION_TOLERANCE`; ties: the most
    axial), and the others counted by reason. Whole files are sorted out by :func:`image_stack`; this
    separates the stacks *inside* a multi-frame file (e.g. an Enhanced CT holding an axial and a
    coronal stack)."""
    clusters = _Clusters(ORIENTATION_TOLERANCE)
    keys = [clusters.key(f.orientation) for f in frames]
    counts: Counter = Counter(k for k in keys if k is not None)
    if len(counts) < 2:
        return frames, Counter()
    keep = _majority(counts, _axial_score)
    aside: Counter[str] = Counter()
    kept = []
    for frame, key in zip(frames, keys, strict=True):
        if key == keep or key is None:
            kept.append(frame)
        else:
            aside[f"other orientation ({plane_name(key)}, frames of a multi-frame image)"] += 1  # type: ignore[arg-type]
    return kept, aside
