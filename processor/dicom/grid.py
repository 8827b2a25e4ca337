"""Is a volume's slice grid regular? Gaps and uneven steps, judged as the volume step records them.

A step is a *gap* when it is more than ``GAP_FACTOR`` × the median step (missing slices) and the
grid is *uneven* when some step differs from the median by more than ``UNEVEN_TOLERANCE`` of it
(at least 0.01 mm) — the rules of :mod:`processor.dicom.volume`. Consumers that resample in mm
use the true positions on an irregular grid and say so in their own result section
(:meth:`SliceGrid.note`), since a warning at the volume level is not read by everyone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from processor.dicom.volume import GAP_FACTOR, UNEVEN_TOLERANCE


@dataclass(frozen=True)
class SliceGrid:
    """Steps between consecutive slice positions (mm): count of gaps, unevenness, range."""

    gaps: int
    uneven: bool
    median_mm: float | None
    min_mm: float | None
    max_mm: float | None

    @classmethod
    def of(cls, positions_mm: Sequence[float]) -> SliceGrid:
        steps = np.diff(np.asarray(positions_mm, dtype=np.float64))
        if len(steps) == 0:
            return cls(0, False, None, None, None)
        median = float(np.median(steps))
        gaps = int(np.count_nonzero(steps > GAP_FACTOR * median))
        uneven = bool(np.any(np.abs(steps - median) > max(0.01, UNEVEN_TOLERANCE * median)))
        return cls(gaps, uneven, median, float(steps.min()), float(steps.max()))

    @property
    def irregular(self) -> bool:
        return self.gaps > 0 or self.uneven

    def note(self, what: str) -> str:
        """``"<what> irregular slice positions: 2 gap(s), steps 1.25–3.75 mm (median 1.25)"``."""
        return (
            f"{what} irregular slice positions: {self.gaps} gap(s), steps {self.min_mm:.3g}–{self.max_mm:.3g} mm "
            f"(median {self.median_mm:.3g})"
        )

    def as_dict(self) -> dict:
        return {
            "regular": not self.irregular,
            "gaps": self.gaps,
            "uneven": self.uneven,
            "median_step_mm": _round(self.median_mm),
            "min_step_mm": _round(self.min_mm),
            "max_step_mm": _round(self.max_mm),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
