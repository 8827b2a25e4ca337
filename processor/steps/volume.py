"""Volume step ``ct.volume``: decode only the chosen series into an int16 (or, when not exact, float32) HU volume.

Provides ``values["volume"]`` (:class:`processor.dicom.volume.Volume`) and records its provenance
— transfer syntaxes, decoder, sorting, duplicates dropped, phases split, spacing gaps, gantry tilt,
rescale — in ``result["volume"]``. Irregularities become study warnings, not failures: later
resampling copes with uneven spacing.
"""

from __future__ import annotations

import logging

from pydantic import Field

from processor.dicom.frames import DUPLICATE_TOLERANCE_MM
from processor.dicom.volume import load_volume
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext

log = logging.getLogger(__name__)


class VolumeParams(Params):
    workers: int = Field(4, ge=1, le=64)
    duplicate_tolerance_mm: float = Field(DUPLICATE_TOLERANCE_MM, gt=0, le=1.0)


class CtVolume(Step):
    uses = "ct.volume"
    summary = ("Decode the chosen series (compressed or not, classic or enhanced multi-frame) into an "
               "int16 HU volume (float32 when a rescale is not whole or does not fit) sorted along the "
               "slice normal, with spacing, affine and provenance.")
    Params = VolumeParams
    needs = ("series",)
    provides = ("volume",)

    def run(self, ctx: StudyContext) -> None:
        params: VolumeParams = self.params  # type: ignore[assignment]
        volume = load_volume(ctx.values["series"], workers=params.workers, tol=params.duplicate_tolerance_mm)
        info = volume.provenance
        ctx.values["volume"] = volume
        ctx.result["volume"] = info
        if info["duplicates_dropped"]:
            ctx.warnings.append(f"volume: {info['duplicates_dropped']} slice(s) at an already-used position "
                                "were dropped")
        if info["phases_split"]:
            split = info["phases_split"]
            ctx.warnings.append(f"volume: series holds {split['phases']} phases ({split['split_by']}); "
                                f"kept {split['kept']!r}")
        spacing = info["spacing"]
        if spacing["gaps"] or spacing["uneven"]:
            ctx.warnings.append(f"volume: uneven slice spacing {spacing['min_mm']}–{spacing['max_mm']} mm, "
                                f"{len(spacing['gaps'])} gap(s)")
        if info["tilted"]:
            ctx.warnings.append(f"volume: gantry tilt {info['tilt_degrees']}° (recorded in the affine)")
        log.info("volume.done study=%s shape=%s decoder=%s", ctx.label,
                 "x".join(map(str, info["shape"])), ",".join(info["decoder"]))


def register(registry: StepRegistry) -> None:
    registry.register(CtVolume)
