"""Volume step ``ct.volume``: decode only the chosen series into an int16 (or, when not exact, float32) HU volume.

Provides ``values["volume"]`` (:class:`processor.dicom.volume.Volume`) and records its provenance
— transfer syntaxes, decoder, sorting, duplicates dropped, phases split, spacing gaps, gantry tilt,
rescale, phases and parts, in-plane spacing source — in ``result["volume"]``. Irregularities
become study warnings in plain words, not failures; the lung and model steps carry their own
consequences (gaps, unknown spacing) in their sections.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from processor.dicom.frames import DUPLICATE_TOLERANCE_MM
from processor.dicom.volume import load_volume
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext
from processor.steps.ports import SERIES, VOLUME

log = logging.getLogger(__name__)


class VolumeParams(Params):
    workers: int = Field(4, ge=1, le=64)
    duplicate_tolerance_mm: float = Field(DUPLICATE_TOLERANCE_MM, gt=0, le=1.0)
    phase: Literal["first", "last", "largest"] = Field(
        "first",
        description="which phase of a multi-phase series to analyse: the first or last in "
        "temporal position / AcquisitionNumber / acquisition-time order (first: usually the non-contrast "
        "pass, which lung densitometry calls for), or the one with the most images",
    )


def volume_warnings(info: dict, unknown: str | None) -> list[str]:
    """Plain-words study warnings for everything the volume step did that changes what is analysed."""
    out = []
    phases = info.get("phases_split")
    if phases:
        chosen = phases["phases"][phases["chosen"] - 1]
        others = "; ".join(
            f"phase {p['number']} ({phases['split_by']} {'/'.join(p['keys'])}): {p['frames']} images, "
            f"z {p['z_range_mm'][0]:g} to {p['z_range_mm'][1]:g} mm, body {p.get('mean_body_hu')} HU"
            for p in phases["phases"]
        )
        out.append(
            f"volume: the series holds {len(phases['phases'])} phases of the same anatomy "
            f"(split by {phases['split_by']}); phase {chosen['number']} was analysed "
            f"(rule phase: {phases['rule']}). {others}"
        )
    parts = info.get("parts_merged")
    if parts:
        keys = [p["key"] for p in parts["parts"]]
        shown = ", ".join(keys[:6]) + (
            f", … ({parts['part_count']} in all)" if parts["part_count"] > 6 else ""
        )
        out.append(
            f"volume: the series is one scan in {parts['part_count']} acquisitions "
            f"({parts['merged_by']} {shown}) covering adjacent ranges; merged into one volume"
        )
    stray = info.get("stray_images")
    if stray:
        out.append(
            f"volume: {stray['frames'] + stray['filled_free_positions']} stray image(s) "
            f"({stray['by']} "
            + ", ".join(g["key"] for g in stray["groups"][:6])
            + f") {stray['reason']}: {stray['frames']} left out, {stray['filled_free_positions']} "
            "filled free positions of the slice grid"
        )
    if info["duplicates_dropped"]:
        out.append(
            f"volume: {info['duplicates_dropped']} image(s) at an already-used position were dropped "
            "(one image kept per position: between acquisitions the later one, otherwise the lowest "
            "InstanceNumber)"
        )
    if parts and parts.get("replaced_by_later_part"):
        out.append(
            f"volume: {parts['replaced_by_later_part']} image(s) of an earlier acquisition inside a "
            "later acquisition's range were left out, so the two never interleave"
        )
    if info.get("rescale_missing"):
        out.append(
            f"volume: RescaleSlope/RescaleIntercept missing in {info['rescale_missing']} image(s): their "
            "stored values were taken as HU (slope 1, intercept 0) — check the lung density"
        )
    if info.get("frames_without_position"):
        out.append(
            f"volume: {info['frames_without_position']} image(s) without ImagePositionPatient/"
            "ImageOrientationPatient were left out"
        )
    spacing = info["spacing"]
    if spacing["gaps"] or spacing["uneven"]:
        out.append(
            f"volume: uneven slice spacing {spacing['min_mm']}–{spacing['max_mm']} mm, "
            f"{len(spacing['gaps'])} gap(s)"
            + (
                " at slice(s) " + ", ".join(str(g["after_slice"]) for g in spacing["gaps"][:10])
                if spacing["gaps"]
                else ""
            )
        )
    source = info["in_plane_spacing"]["source"]
    if unknown:
        out.append("volume: " + unknown)
    elif source != "PixelSpacing":
        out.append(
            f"volume: pixel spacing taken from {source}: "
            f"{info['in_plane_spacing']['row_mm']} × {info['in_plane_spacing']['column_mm']} mm"
        )
    if info["tilted"]:
        out.append(f"volume: gantry tilt {info['tilt_degrees']}° (recorded in the affine)")
    return out


class CtVolume(Step):
    uses = "ct.volume"
    summary = (
        "Decode the chosen series' image stack (compressed or not, classic or enhanced multi-frame) "
        "into an int16 HU volume (float32 when a rescale is not whole or does not fit) sorted along "
        "the slice normal; phases and parts of a scan decided by geometry; spacing, affine, provenance."
    )
    Params = VolumeParams
    needs = (SERIES,)
    provides = (VOLUME,)

    def run(self, ctx: StudyContext) -> None:
        params: VolumeParams = self.params  # type: ignore[assignment]
        volume = load_volume(
            ctx.values["series"],
            workers=params.workers,
            tol=params.duplicate_tolerance_mm,
            phase_rule=params.phase,
        )
        info = volume.provenance
        ctx.values["volume"] = volume
        ctx.result["volume"] = info
        ctx.warnings.extend(volume_warnings(info, volume.spacing_unknown))
        log.info(
            "volume.done study=%s shape=%s decoder=%s",
            ctx.label,
            "x".join(map(str, info["shape"])),
            ",".join(info["decoder"]),
        )


def register(registry: StepRegistry) -> None:
    registry.register(CtVolume)
