"""Quantitative CT step ``quantify.lungs``: weight-free lung mask, lung volume, %LAA-950, mean lung density.

The method is in :mod:`processor.dicom.lungs`: the lung mask is taken inside a body mask (air
outside the patient is never lung, however dense a tight field of view makes it), and the volume
integrates each slice's true slab thickness. An implausible or partial result (too small or large,
lungs cut by the scan range or by the field of view, slices missing inside the lungs, empty) is
not a failure: the ``lungs`` section carries ``plausible: false``, the flags, the notes and a
summary in plain words, and the study gets a warning. With an unknown pixel spacing the volume is
``null`` (flag ``spacing_unknown``); %LAA-950 and mean lung density need no spacing and stay.
"""

from __future__ import annotations

import logging

from pydantic import Field

from processor.dicom.lungs import LungSettings, lung_metrics, segment_lungs
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext
from processor.steps.ports import FEATURES, LUNG_FEATURES, LUNG_MASK, VOLUME, add_features

log = logging.getLogger(__name__)


class LungParams(Params):
    threshold_hu: float = Field(-320.0, ge=-1000, le=0)
    laa_threshold_hu: float = Field(-950.0, ge=-1100, le=-500)
    max_components: int = Field(2, ge=1, le=10)
    min_component_ratio: float = Field(0.1, ge=0, le=1)
    min_volume_ml: float = Field(500.0, ge=0)
    max_volume_ml: float = Field(12_000.0, gt=0)

    def settings(self) -> LungSettings:
        return LungSettings(**self.model_dump())


class QuantifyLungs(Step):
    uses = "quantify.lungs"
    summary = (
        "Weight-free lung quantification: threshold lung mask (−320 HU) inside a body mask (outside "
        "air never counts, lungs cut by the field of view are kept and flagged), largest components, "
        "holes filled; lung volume mL over each slice's true slab, %LAA-950, mean lung density, "
        "plausibility flags with notes in plain words."
    )
    Params = LungParams
    needs = (VOLUME,)
    provides = (LUNG_MASK, FEATURES)

    def run(self, ctx: StudyContext) -> None:
        params: LungParams = self.params  # type: ignore[assignment]
        settings = params.settings()
        volume = ctx.values[VOLUME.name]
        pixel_mm = None if volume.spacing_unknown else (volume.spacing_zyx[1], volume.spacing_zyx[2])
        found = segment_lungs(volume.hu, settings, pixel_mm)
        mask = found.mask
        metrics = lung_metrics(
            volume.hu,
            mask,
            volume.spacing_zyx,
            settings,
            positions_mm=volume.positions_mm,
            spacing_unknown=volume.spacing_unknown,
            found=found,
        )
        numbers = metrics.as_dict()
        ctx.values[LUNG_MASK.name] = mask
        add_features(ctx, {f"lungs.{key}": numbers.get(key) for key in LUNG_FEATURES})
        ctx.result["lungs"] = {
            **numbers,
            "method": "threshold",
            "threshold_hu": settings.threshold_hu,
            "laa_threshold_hu": settings.laa_threshold_hu,
            "body_mask": True,
            "body_threshold_hu": settings.body_threshold_hu,
            "body_thin_mm": settings.body_thin_mm if pixel_mm else None,
            "volume_integration": "slab thickness of each slice from its position",
        }
        if not metrics.plausible:
            ctx.warnings.append(
                "lungs: lung numbers partial or not plausible ("
                + ", ".join(metrics.flags)
                + "): "
                + "; ".join(metrics.notes)
            )
        log.info(
            "lungs.done study=%s volume_ml=%s laa950=%s mld=%s plausible=%s flags=%s",
            ctx.label,
            metrics.volume_ml,
            metrics.laa950_percent,
            metrics.mean_lung_density_hu,
            metrics.plausible,
            ",".join(metrics.flags) or "-",
        )


def register(registry: StepRegistry) -> None:
    registry.register(QuantifyLungs)
