"""Slice order, and one volume or several decided by geometry.

Frames sort by their position along the slice normal (``ImagePositionPatient · (row × column)``),
never by InstanceNumber. A series that holds several acquisitions is split or merged by what its
groups of frames cover, not by the tags alone (:func:`order_frames`):

* frames are grouped by one key at a time — temporal position, then AcquisitionNumber, then
  acquisition-time pass (:func:`time_clusters`); frames that lack the key take no part in the
  decision, and frames that each carry a value of their own (per-image numbering) count as one
  group;
* groups that cover the *same* z range (at least :data:`OVERLAP_FRACTION` of one group's slices
  inside the other's range) are **phases**; a phase with fewer than :data:`MINOR_PHASE_FRACTION`
  of the largest phase's images is not a phase but a few stray images, left out and counted;
  the first key that yields several real phases splits the series and a rule (:data:`PHASE_RULES`)
  picks one; frames without the key then join the chosen phase only where they sit on its slice
  grid, at a free position;
* groups that tile *adjacent* ranges are **parts** of one scan and are merged, a later part (in
  key order) winning inside its own z range, so that two parts never interleave;
* repeated positions are dropped, one image kept per position.

Pure functions of positions and keys; independent of the input order.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np

from processor.dicom.frames import DUPLICATE_TOLERANCE_MM

PHASE_RULES = ("first", "last", "largest")
# Share of a group's slices inside another group's z range that makes them phases: parts of one
# scan overlap by a few slices at most, two passes over the same anatomy by a good part of them.
OVERLAP_FRACTION = 0.25
MINOR_PHASE_FRACTION = 0.1  # a "phase" this small beside the largest is stray images, not a phase
PHASE_TIME_GAP_S = 10.0  # acquisition times further apart than this are separate passes
GRID_FIT = 0.1  # an unkeyed frame fits a phase's grid within this share of its median step
_DT = re.compile(r"^(\d{4})(\d{2})(\d{2})(\d{2})?(\d{2})?(\d{2})?(\.\d+)?")


@dataclass(frozen=True)
class _Group:
    """Frames sharing one value of a phase key (an AcquisitionNumber, a temporal position...)."""

    key: str
    members: tuple[int, ...]
    d: np.ndarray  # their positions along the normal, ascending
    per_image: bool = False  # gathered from values that each name one image: its z range says little

    @property
    def lo(self) -> float:
        return float(self.d[0])

    @property
    def hi(self) -> float:
        return float(self.d[-1])

    def share_inside(self, other: _Group, tol: float) -> float:
        """Share of this group's positions strictly inside ``other``'s z range (its ends excluded)."""
        lo, hi = other.lo + tol, other.hi - tol
        if hi <= lo:
            return 0.0
        inside = int(np.searchsorted(self.d, hi, "left") - np.searchsorted(self.d, lo, "right"))
        return inside / len(self.d)

    def summary(self) -> dict:
        return {
            "key": self.key or "none",
            "frames": len(self.members),
            "z_range_mm": [round(self.lo, 3), round(self.hi, 3)],
        }


def _natural(key: str) -> tuple:
    """Sort key: numbers by value, then text, then the missing value ''."""
    if key == "":
        return (2, 0.0, "")
    try:
        return (0, float(key), key)
    except ValueError:
        return (1, 0.0, key)


def _group(key: str, members: Sequence[int], d: np.ndarray, per_image: bool = False) -> _Group:
    members = tuple(sorted(members, key=lambda i: d[i]))
    return _Group(key, members, np.sort(d[list(members)]), per_image)


def _groups(values: Sequence[str], d: np.ndarray, candidates: Sequence[int]) -> list[_Group]:
    """Groups of the candidates in key order (frames without a value form the group '', last);
    single-image values beside real groups form one group together (per-image numbering)."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in candidates:
        by_key[values[i]].append(i)
    keys = sorted(by_key, key=_natural)
    singles = [k for k in keys if len(by_key[k]) == 1 and k != ""]
    if len(singles) > 1 and len(singles) < len(keys):
        merged = _group(
            f"{singles[0]}…{singles[-1]} (one value per image)",
            [by_key[k][0] for k in singles],
            d,
            per_image=True,
        )
        rest = [_group(k, by_key[k], d) for k in keys if k not in singles]
        return sorted([*rest, merged], key=lambda g: _natural(g.key.split("…")[0]))
    return [_group(k, by_key[k], d) for k in keys]


def _conflict(a: _Group, b: _Group, tol: float) -> bool:
    """Two groups are different phases when a good part of one lies inside the other's z range.

    The images of a per-image group need not be one block (parts of a scan can each be a single
    image, at either end), so only its own images inside the other group's range count for it.
    """
    shares = [
        a.share_inside(b, tol) if not b.per_image else 0.0,
        b.share_inside(a, tol) if not a.per_image else 0.0,
    ]
    return max(shares) >= OVERLAP_FRACTION


def _phases(groups: list[_Group], tol: float) -> list[list[_Group]]:
    """Groups (in key order) gathered into phases: a group joins the first phase none of whose groups
    it overlaps; groups that tile adjacent z ranges are parts of one scan and share a phase."""
    if all(len(g.members) == 1 for g in groups):
        return [groups]  # one image per value (per-slice numbering): points never overlap
    phases: list[list[_Group]] = []
    for group in groups:
        for phase in phases:
            if not any(_conflict(group, other, tol) for other in phase):
                phase.append(group)
                break
        else:
            phases.append([group])
    return phases


def choose_phase(sizes: Sequence[int], rule: str) -> int:
    """Index of the phase to keep: ``first`` / ``last`` in key order, or the ``largest`` (first on ties)."""
    if rule == "first":
        return 0
    if rule == "last":
        return len(sizes) - 1
    if rule == "largest":
        return max(range(len(sizes)), key=lambda i: (sizes[i], -i))
    raise ValueError(f"unknown phase rule {rule!r}; use one of {', '.join(PHASE_RULES)}")


@lru_cache(maxsize=4096)
def acquisition_seconds(date: str, time: str, stamp: str) -> float | None:
    """Seconds of an acquisition moment: from AcquisitionDateTime (DT), else AcquisitionDate (DA)
    + AcquisitionTime (TM) as seconds since 1970 (UTC offsets ignored: one scanner, one clock), else
    the time of day alone; None when nothing is stated. Remembered (the images of a pass share
    their values)."""
    text = stamp.strip() or (
        date.strip() + time.strip().replace(":", "") if date.strip() and time.strip() else ""
    )
    match = _DT.match(text)
    if match:
        y, mo, dd, hh, mm, ss, frac = match.groups()
        try:
            moment = datetime(int(y), int(mo), int(dd), int(hh or 0), int(mm or 0), int(ss or 0), tzinfo=UTC)
        except ValueError:
            return None
        return moment.timestamp() + float(frac or 0.0)
    return tm_seconds(time)


def tm_seconds(value: str) -> float | None:
    """A DICOM TM value (``HHMMSS.FFFFFF``, or the old ``HH:MM:SS``) in seconds after midnight."""
    text = value.strip().replace(":", "")
    if len(text) < 2 or not text[:2].isdigit():
        return None
    try:
        hours = int(text[:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        secs = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return hours * 3600 + minutes * 60 + secs


def time_clusters(seconds: Sequence[float | None], gap_s: float = PHASE_TIME_GAP_S) -> list[str]:
    """Label each frame's acquisition moment with its pass: moments closer than ``gap_s`` (after
    sorting) belong to one pass, labelled by the pass's first moment (sortable text); none → ''."""
    known = sorted((t, i) for i, t in enumerate(seconds) if t is not None)
    labels = [""] * len(seconds)
    previous = None
    label = ""
    for t, i in known:
        if previous is None or t - previous > gap_s:
            label = _pass_label(t)  # a new pass starts here
        previous = t
        labels[i] = label
    return labels


def _pass_label(start: float) -> str:
    """A pass's first moment as sortable text: date and time, or the time of day alone."""
    if start >= 2 * 86400:  # a date and time
        return datetime.fromtimestamp(start, UTC).strftime("%Y-%m-%d %H:%M:%S.") + f"{start % 1:.1f}"[2:]
    hours, rest = divmod(start, 3600)
    return f"{int(hours):02d}:{int(rest // 60):02d}:{rest % 60:04.1f}"


@dataclass
class Ordering:
    """The result of :func:`order_frames`: kept frame indices sorted along the normal, and what was done."""

    order: list[int]
    positions_mm: np.ndarray  # distance along the normal of each kept frame, ascending
    dropped: list[int] = field(
        default_factory=list
    )  # repeated positions removed (one image kept per position)
    phases: dict | None = None  # how a multi-phase series was split, when it was
    parts: dict | None = None  # how a scan in several acquisitions was merged, when it was
    replaced: list[int] = field(default_factory=list)  # frames of an earlier part inside a later part's range
    left_out: dict | None = None  # stray images (too few for a phase) and unkeyed images off the grid


def _merge_parts(parts: list[_Group], d: np.ndarray, tol: float) -> tuple[list[int], list[int], list[int]]:
    """One stack from parts of a scan (key order): a later part wins inside its own z range, so two
    parts never interleave. Returns (kept, duplicates, replaced): frames of earlier parts at a later
    part's exact positions, and at other positions inside its range."""
    kept: list[int] = []
    duplicates: list[int] = []
    replaced: list[int] = []
    for part in parts:
        stay = []
        for i in kept:
            if part.lo - tol <= d[i] <= part.hi + tol:
                j = int(np.searchsorted(part.d, d[i]))
                near = any(abs(part.d[x] - d[i]) < tol for x in (j - 1, j) if 0 <= x < len(part.d))
                if near:
                    duplicates.append(i)
                elif part.per_image:  # scattered single images claim their own positions only
                    stay.append(i)
                else:
                    replaced.append(i)
            else:
                stay.append(i)
        kept = stay + list(part.members)
    return kept, duplicates, replaced


def _on_grid(
    unkeyed: list[int], members: list[int], d: np.ndarray, tol: float
) -> tuple[list[int], list[int]]:
    """Unkeyed frames that sit on the slice grid of ``members`` at a free position, and the others."""
    grid = np.unique(np.round(d[members] / tol) * tol)
    if len(grid) < 2:
        return [], unkeyed
    step = float(np.median(np.diff(grid)))
    fit: list[int] = []
    off: list[int] = []
    for i in unkeyed:
        k = (d[i] - grid[0]) / step
        near_grid = abs(k - round(k)) * step <= GRID_FIT * step
        occupied = np.min(np.abs(grid - d[i])) < tol
        (fit if near_grid and not occupied else off).append(i)
    return fit, off


def _split(
    values: Sequence[str], d: np.ndarray, candidates: list[int], tol: float
) -> tuple[list[list[_Group]], list[_Group]]:
    """The real phases of one key, and the groups of stray images (phases too small to be one)."""
    groups = _groups(values, d, candidates)
    if len(groups) < 2:
        return [groups] if groups else [], []
    phases = _phases(groups, tol)
    sizes = [sum(len(g.members) for g in phase) for phase in phases]
    floor = MINOR_PHASE_FRACTION * max(sizes)
    real = [p for p, n in zip(phases, sizes, strict=True) if n >= floor]
    stray = [g for p, n in zip(phases, sizes, strict=True) if n < floor for g in p]
    return real, stray


def order_frames(
    positions: np.ndarray,
    normal: np.ndarray,
    *,
    tiebreak: Sequence[int] | None = None,
    phase_keys: dict[str, Sequence[str]] | None = None,
    rule: str = "first",
    tol: float = DUPLICATE_TOLERANCE_MM,
) -> Ordering:
    """Sort frames along ``normal``; decide phases or parts by geometry; keep one frame per position.

    ``positions`` is (n, 3) ImagePositionPatient in mm. ``phase_keys`` maps a tag name to each
    frame's value ('' when the frame lacks it), tried in order (see the module docstring).
    ``rule`` (:data:`PHASE_RULES`, in key order) picks among real phases. ``tiebreak`` (e.g.
    InstanceNumber) decides which of several frames at one position of one group is kept (the
    lowest). Consecutive kept frames always belong to one phase.
    """
    positions = np.asarray(positions, float).reshape(-1, 3)
    d = positions @ np.asarray(normal, float)
    candidates = list(range(len(d)))
    phases_info = parts_info = left_out = None
    parts: list[_Group] | None = None
    for name, values in (phase_keys or {}).items():
        real, stray = _split(values, d, candidates, tol)
        if not real:
            continue
        sizes = [sum(len(g.members) for g in phase) for phase in real]
        chosen = choose_phase(sizes, rule) if len(real) > 1 else 0
        members = [i for g in real[chosen] for i in g.members]
        if stray:  # stray images fill free positions of the kept grid; the others are left out
            fit, off = _on_grid([i for g in stray for i in g.members], members, d, tol)
            left_out = {
                "by": name,
                "groups": [g.summary() for g in stray][:20],
                "frames": len(off),
                "filled_free_positions": len(fit),
                "reason": f"too few images for a phase (under {MINOR_PHASE_FRACTION:.0%} of the main "
                "acquisition) inside its z range",
            }
            dropped = set(off)
            candidates = [i for i in candidates if i not in dropped]
        if len(real) == 1:
            if len(real[0]) > 1 and parts is None:
                parts = real[0]
                parts_info = {
                    "merged_by": name,
                    "parts": [g.summary() for g in parts][:20],
                    "part_count": len(parts),
                }
            continue
        phases_info = {
            "split_by": name,
            "rule": rule,
            "chosen": chosen + 1,
            "phases": [
                {
                    "number": k + 1,
                    "keys": [g.key or "none" for g in phase][:20],
                    "frames": sizes[k],
                    "z_range_mm": [round(min(g.lo for g in phase), 3), round(max(g.hi for g in phase), 3)],
                    "members": [i for g in phase for i in g.members],
                }
                for k, phase in enumerate(real)
            ],
        }
        parts = real[chosen] if len(real[chosen]) > 1 else None
        parts_info = (
            {"merged_by": name, "parts": [g.summary() for g in parts][:20], "part_count": len(parts)}
            if parts
            else None
        )
        in_phases = {j for p in real for g in p for j in g.members}
        filled = [i for i in candidates if i not in in_phases]
        candidates = members + filled
        break
    return _finish(d, candidates, parts, tiebreak, tol, phases_info, parts_info, left_out)


def _finish(
    d: np.ndarray,
    candidates: list[int],
    parts: list[_Group] | None,
    tiebreak: Sequence[int] | None,
    tol: float,
    phases_info: dict | None,
    parts_info: dict | None,
    left_out: dict | None,
) -> Ordering:
    duplicates: list[int] = []
    replaced: list[int] = []
    if parts is not None:
        in_parts = {i for g in parts for i in g.members}
        extra = [i for i in candidates if i not in in_parts]
        merged, duplicates, replaced = _merge_parts(parts, d, tol)
        candidates = merged + extra
    ties = np.asarray(tiebreak if tiebreak is not None else np.zeros(len(d)), float)
    cand = np.asarray(candidates, int)
    sorted_idx = cand[np.lexsort((ties[cand], np.round(d[cand] / tol)))] if len(cand) else cand
    order: list[int] = []
    for i in sorted_idx.tolist():
        if order and abs(d[i] - d[order[-1]]) < tol:
            duplicates.append(i)
        else:
            order.append(i)
    if parts_info is not None:
        parts_info.update(
            {
                "repeated_positions_dropped": len(duplicates),
                "replaced_by_later_part": len(replaced),
                "kept_at_repeats": "the later acquisition (key order)",
            }
        )
    return Ordering(
        order,
        d[order] if order else np.empty(0),
        sorted(duplicates),
        phases_info,
        parts_info,
        sorted(replaced),
        left_out,
    )
