"""Series selection: which series of a study to analyse, with a score and a reason for every series.

Facts about each series come from the headers of its *image stack* (:func:`series_facts`): scouts,
non-image objects (RTSTRUCT, SR...), secondary captures and images of a minority orientation,
matrix size or pixel spacing under the same SeriesInstanceUID are set aside first and counted by
reason (:mod:`processor.dicom.stack`). The rules are pure (:func:`evaluate`), so they are
property-tested without any DICOM.

Hard rules (a series failing any is *rejected*, every failing rule is named):
modality (default CT); not a localizer/scout (ImageType LOCALIZER, or 1–3 images); axial
(slice normal within ``axial_tolerance_deg`` of the patient's feet–head axis); one orientation,
one rows × columns and one pixel spacing across the series; at least ``min_slices`` distinct
slice positions.

Ranking of the eligible series, most important first (encoded in one ``score``):
ORIGINAL over DERIVED (MIP/MinIP/MPR/reformat/projection/volume render); slice thickness within
``max_thickness_mm``; thinner slices (0.1 mm steps); a lung kernel (``lung_kernels``); z coverage
(1 mm steps); slice count. An unknown SliceThickness (missing or zero) is ranked by the measured
step between slice positions, and the reason says "unknown" — never treated as the thickest.

``score = 1000·original + 500·within_max_thickness + 4·max(0, 100 − thickness in 0.1 mm)
+ 2·lung_kernel + min(coverage mm, 999)/1000 + min(count, 9999)/10⁷`` — each term outweighs
everything after it, so sorting by score is the lexicographic order above.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from processor.dicom.frames import frames_of, slice_normal
from processor.dicom.scan import Series
from processor.dicom.stack import Stack, image_stack, stack_frames

log = logging.getLogger(__name__)

# Case-insensitive regular expressions matched against the whole kernel value (and each of its
# backslash-separated parts). Sharp "lung" reconstructions by vendor:
DEFAULT_LUNG_KERNELS: tuple[str, ...] = (
    r".*LUNG.*",  # GE LUNG, and any kernel named after the lung
    r"B(6\d|7\d|80)[a-z]?",  # Siemens classic B60f–B80f
    r"I(6\d|7\d|80)[a-z]?",  # Siemens iterative (SAFIRE) I60f–I80f
    r"Br(6\d|[7-9]\d)[a-z]?",  # Siemens ADMIRE-era Br60 and sharper
    r"Bl\d\d[a-z]?",  # Siemens Bl57/Bl64 lung kernels
    r"FC(51|81|86)",  # Canon/Toshiba lung kernels
    r"Y[AB]",  # Philips lung kernels
    r"BONEPLUS",  # GE BONEPLUS, read as a lung kernel
)
DERIVED_MARKERS = {
    "DERIVED",
    "MIP",
    "MINIP",
    "MINIMUM",
    "MPR",
    "REFORMATTED",
    "PROJECTION IMAGE",
    "VOLUME_RENDER",
    "CURVED",
}
DERIVED_WORDS = re.compile(r"\b(MIP|MINIP|MPR|REFORMAT\w*|VRT)\b", re.IGNORECASE)
GEOMETRY_TOLERANCE = 1e-3


@dataclass(frozen=True)
class SelectionRules:
    modality: str = "CT"
    min_slices: int = 20
    axial_tolerance_deg: float = 30.0
    max_thickness_mm: float = 5.0
    lung_kernels: tuple[str, ...] = DEFAULT_LUNG_KERNELS


@dataclass(frozen=True)
class SeriesFacts:
    """What the rules look at, read from one series' headers."""

    uid: str
    number: int | None
    description: str
    modality: str
    image_count: int  # frames with pixels
    slice_count: int  # distinct positions along the normal
    image_type: tuple[str, ...] = ()
    kernel: str = ""
    thickness_mm: float | None = None
    coverage_mm: float = 0.0
    tilt_from_axial_deg: float | None = None  # angle between slice normal and feet–head axis
    orientations: int = 1  # distinct orientations
    matrix_sizes: tuple[tuple[int, int], ...] = ()
    pixel_spacings: tuple[tuple[float, ...], ...] = ()
    measured_step_mm: float | None = None  # median step between distinct positions along the normal
    without_geometry: int = 0  # images without a readable ImagePositionPatient/ImageOrientationPatient
    set_aside: dict[str, int] = field(default_factory=dict)  # instances left out of the stack, by reason

    @property
    def effective_thickness_mm(self) -> float | None:
        """SliceThickness, or the measured step between positions when the thickness is unknown."""
        return self.thickness_mm if self.thickness_mm is not None else self.measured_step_mm

    def thickness_words(self) -> str:
        if self.thickness_mm is not None:
            return f"{self.thickness_mm} mm"
        if self.measured_step_mm is not None:
            return f"unknown (SliceThickness missing; measured step {self.measured_step_mm:g} mm)"
        return "unknown"


@dataclass
class Verdict:
    facts: SeriesFacts
    problems: list[str] = field(default_factory=list)
    score: float | None = None
    rank: int | None = None
    reason: str | None = None

    @property
    def eligible(self) -> bool:
        return not self.problems

    def row(self) -> dict:
        f = self.facts
        return {
            "series_uid": f.uid,
            "number": f.number,
            "description": f.description,
            "modality": f.modality,
            "kernel": f.kernel,
            "thickness": f.thickness_mm,
            "count": f.image_count,
            "slices": f.slice_count,
            "z_coverage_mm": round(f.coverage_mm, 1),
            "image_type": list(f.image_type),
            "thickness_source": "SliceThickness"
            if f.thickness_mm is not None
            else ("measured step between positions" if f.measured_step_mm is not None else "unknown"),
            "set_aside": dict(f.set_aside),
            "eligible": self.eligible,
            "rank": self.rank,
            "score": self.score,
            "reason": self.reason,
        }


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """``np.allclose(a, b, atol=GEOMETRY_TOLERANCE)`` for short tuples, without numpy's per-call cost."""
    return len(a) == len(b) and all(
        abs(x - y) <= GEOMETRY_TOLERANCE + 1e-5 * abs(y) for x, y in zip(a, b, strict=True)
    )


def _distinct(values: Sequence[tuple[float, ...]]) -> list[tuple[float, ...]]:
    out: list[tuple[float, ...]] = []
    looked_at: set[tuple[float, ...]] = set()  # a value equal to one looked at adds nothing
    for value in values:
        if value in looked_at:
            continue
        looked_at.add(value)
        if not any(_close(value, seen) for seen in out):
            out.append(value)
    return out


def series_facts(series: Series, stack: Stack | None = None) -> SeriesFacts:
    """Read the facts the rules need from the headers of a series' image stack (no pixels).

    Instances that cannot belong to the axial stack are set aside first
    (:func:`processor.dicom.stack.image_stack`) and counted in ``set_aside``.
    """
    stack = stack or image_stack(series)
    frames, frames_aside = stack_frames(frames_of(stack.series))
    orientations = _distinct([f.orientation for f in frames if f.orientation])
    positions = [f.position for f in frames if f.position and f.orientation]
    tilt = None
    distances = np.empty(0)
    if orientations:
        normal = slice_normal(orientations[0])
        tilt = math.degrees(math.acos(min(1.0, abs(float(normal[2])))))
        distances = np.asarray(positions, float).reshape(-1, 3) @ normal
    unique = np.unique(np.round(distances, 2)) if len(distances) else np.empty(0)
    thickness = [f.thickness for f in frames if f.thickness and f.thickness > 0]
    step = float(np.median(np.diff(unique))) if len(unique) > 1 else None
    first = stack.series.instances[0] if stack.series.instances else None
    return SeriesFacts(
        uid=series.uid,
        number=stack.series.number if first else series.number,
        description=stack.series.description if first else series.description,
        modality=stack.modality or (series.modality if not first else ""),
        image_count=len(frames),
        slice_count=len(unique),
        image_type=stack.image_type,
        kernel=next((f.kernel for f in frames if f.kernel), ""),
        thickness_mm=round(float(np.median(thickness)), 3) if thickness else None,
        coverage_mm=float(np.ptp(distances)) if len(distances) else 0.0,
        tilt_from_axial_deg=tilt,
        orientations=len(orientations),
        matrix_sizes=tuple(sorted({(f.rows, f.cols) for f in frames})),
        pixel_spacings=tuple(_distinct([f.pixel_spacing for f in frames if f.pixel_spacing])),
        measured_step_mm=round(step, 3) if step else None,
        without_geometry=sum(1 for f in frames if not (f.position and f.orientation)),
        set_aside=dict(stack.set_aside + frames_aside),
    )


def is_lung_kernel(kernel: str, patterns: Sequence[str]) -> bool:
    parts = [kernel, *kernel.split("\\")]
    return any(re.fullmatch(p, part.strip(), re.IGNORECASE) for p in patterns for part in parts if part)


def derived_evidence(facts: SeriesFacts) -> str | None:
    """Why a series looks DERIVED (MIP, MPR, reformat...), or None when it looks ORIGINAL."""
    marks = [v for v in facts.image_type if v in DERIVED_MARKERS]
    if marks:
        return "ImageType " + "\\".join(facts.image_type)
    found = DERIVED_WORDS.search(facts.description or "")
    return f"description {facts.description!r} names {found.group(1).upper()}" if found else None


def hard_problems(facts: SeriesFacts, rules: SelectionRules) -> list[str]:
    """Every hard rule the series fails, in plain words."""
    problems = []
    if facts.image_count == 0 and facts.set_aside:
        return [
            "no image stack: every instance was set aside ("
            + ", ".join(f"{reason}: {n}" for reason, n in sorted(facts.set_aside.items()))
            + ")"
        ]
    if facts.modality.upper() != rules.modality.upper():
        problems.append(f"modality {facts.modality or '?'} is not {rules.modality}")
    if "LOCALIZER" in facts.image_type:
        problems.append("localizer/scout (ImageType LOCALIZER)")
    elif 1 <= facts.image_count <= 3:
        problems.append(f"localizer/scout ({facts.image_count} image(s))")
    if facts.orientations == 0 or facts.tilt_from_axial_deg is None:
        problems.append("no ImageOrientationPatient: orientation unknown")
    elif facts.orientations > 1:
        problems.append(f"{facts.orientations} different orientations in one series")
    elif facts.tilt_from_axial_deg > rules.axial_tolerance_deg:
        problems.append(
            f"not axial: slice normal {facts.tilt_from_axial_deg:.0f}° from the feet–head axis "
            f"(axial_tolerance_deg={rules.axial_tolerance_deg:g})"
        )
    if len(facts.matrix_sizes) > 1:
        problems.append("mixed image sizes " + ", ".join(f"{r}x{c}" for r, c in facts.matrix_sizes))
    if len(facts.pixel_spacings) > 1:
        problems.append(f"{len(facts.pixel_spacings)} different pixel spacings")
    if facts.slice_count < rules.min_slices:
        missing = (
            f" ({facts.without_geometry} image(s) without a readable ImagePositionPatient/"
            "ImageOrientationPatient)"
            if facts.without_geometry
            else ""
        )
        problems.append(
            f"{facts.slice_count} usable slice positions{missing}, fewer than min_slices={rules.min_slices}"
        )
    return problems


def score(facts: SeriesFacts, rules: SelectionRules) -> float:
    """The ranking as one number (see the module docstring for the formula)."""
    known = facts.effective_thickness_mm
    thickness = known if known is not None else math.inf
    tenths = round(thickness * 10) if math.isfinite(thickness) else 100
    value = (
        1000 * (derived_evidence(facts) is None)
        + 500 * (thickness <= rules.max_thickness_mm)
        + 4 * max(0, 100 - tenths)
        + 2 * is_lung_kernel(facts.kernel, rules.lung_kernels)
        + min(round(facts.coverage_mm), 999) / 1000
        + min(facts.image_count, 9999) / 1e7
    )
    return round(value, 7)


def _outranked_reason(loser: SeriesFacts, winner: SeriesFacts, rules: SelectionRules) -> str:
    who = f"out-ranked by series {winner.number}"
    loser_derived, winner_derived = derived_evidence(loser), derived_evidence(winner)
    if loser_derived and not winner_derived:
        return f"{who}: DERIVED ({loser_derived}) vs ORIGINAL"
    lt, wt = loser.effective_thickness_mm, winner.effective_thickness_mm
    if lt is None or wt is None or round(lt * 10) != round(wt * 10):
        over = (
            f", above max_thickness_mm={rules.max_thickness_mm:g}"
            if lt and lt > rules.max_thickness_mm
            else ""
        )
        return f"{who}: thicker slices ({loser.thickness_words()} vs {winner.thickness_words()}{over})"
    if is_lung_kernel(winner.kernel, rules.lung_kernels) and not is_lung_kernel(
        loser.kernel, rules.lung_kernels
    ):
        return f"{who}: kernel {loser.kernel or '?'} is not a lung kernel (chosen: {winner.kernel})"
    if round(loser.coverage_mm) != round(winner.coverage_mm):
        return f"{who}: less z coverage ({loser.coverage_mm:.0f} mm vs {winner.coverage_mm:.0f} mm)"
    return f"{who}: fewer or equal slices ({loser.image_count} vs {winner.image_count}), lower series number wins ties"


def evaluate(facts: Sequence[SeriesFacts], rules: SelectionRules) -> list[Verdict]:
    """Judge every series; the returned list is in ranking order (chosen first, rejected last)."""
    verdicts = [Verdict(f, hard_problems(f, rules)) for f in facts]
    eligible = [v for v in verdicts if v.eligible]
    for v in eligible:
        v.score = score(v.facts, rules)
    eligible.sort(
        key=lambda v: (
            -(v.score or 0.0),
            v.facts.number if v.facts.number is not None else 1 << 30,
            v.facts.uid,
        )
    )
    for rank, v in enumerate(eligible, start=1):
        v.rank = rank
        v.reason = "chosen" if rank == 1 else _outranked_reason(v.facts, eligible[0].facts, rules)
    rejected = [v for v in verdicts if not v.eligible]
    for v in rejected:
        v.reason = "rejected: " + "; ".join(v.problems)
    rejected.sort(key=lambda v: (v.facts.number if v.facts.number is not None else 1 << 30, v.facts.uid))
    return eligible + rejected
