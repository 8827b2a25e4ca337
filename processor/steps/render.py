"""Preview step ``render.key_slices``: PNGs of N axial levels through the lungs, in CT windows.

Files go to ``ctx.out_dir`` as ``key_<window>_<n>.png`` (n = 1..count, inferior to superior);
the result lists them relative to the folder of the study JSON (``<StudyUID>/key_lung_1.png``)
with window, slice index, position and sha256. The captioning step reads the same images from
``values["key_slices"]``. The choice of levels and windows is deterministic (see
:mod:`processor.dicom.render`) and recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from processor.dicom.render import (
    WINDOWS,
    choose_levels,
    orient,
    png_bytes,
    radiological_orientation,
    window,
    write_atomic,
)
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext

log = logging.getLogger(__name__)

WindowName = Literal["lung", "mediastinal", "bone"]


def _default_windows() -> list[WindowName]:
    return ["lung", "mediastinal"]


@dataclass(frozen=True)
class KeySlice:
    """One rendered preview, as later steps (captioning) receive it."""

    window: str
    number: int  # 1..count, inferior to superior
    slice_index: int  # k in volume.hu[k]
    z_mm: float  # position along the slice normal (ImagePositionPatient · normal)
    path: Path
    image: np.ndarray  # uint8 (rows, cols), radiological orientation
    sha256: str


class KeySliceParams(Params):
    count: int = Field(3, ge=1, le=20)
    windows: list[WindowName] = Field(default_factory=_default_windows, min_length=1)


class RenderKeySlices(Step):
    uses = "render.key_slices"
    summary = ("PNG previews of N axial levels through the lungs in lung (W1500/L-600) and mediastinal "
               "(W350/L40) windows, radiological orientation, written next to the study JSON.")
    Params = KeySliceParams
    needs = ("volume",)
    optional_needs = ("lung_mask",)
    provides = ("key_slices",)

    def run(self, ctx: StudyContext) -> None:
        params: KeySliceParams = self.params  # type: ignore[assignment]
        volume = ctx.values["volume"]
        levels, how = choose_levels(params.count, volume.hu.shape[0], ctx.values.get("lung_mask"))
        turn = radiological_orientation(volume.row_cosines, volume.column_cosines)
        slices: list[KeySlice] = []
        for name in params.windows:
            width, level = WINDOWS[name]
            for number, k in enumerate(levels, start=1):
                image = orient(window(volume.hu[k], width, level), turn)
                path = ctx.out_dir / f"key_{name}_{number}.png"
                digest = write_atomic(path, png_bytes(image))
                slices.append(KeySlice(name, number, k, round(float(volume.positions_mm[k]), 3), path, image,
                                       digest))
        folder = ctx.out_dir.name
        ctx.values["key_slices"] = slices
        ctx.result["key_slices"] = [
            {"file": f"{folder}/{s.path.name}", "window": s.window, "width": WINDOWS[s.window][0],
             "level": WINDOWS[s.window][1], "slice_index": s.slice_index, "z_mm": s.z_mm, "sha256": s.sha256}
            for s in slices]
        ctx.result["key_slices_method"] = {"levels": how, "count": params.count, "windows": list(params.windows),
                                           "orientation": {"convention": "radiological", **turn.as_dict()}}
        log.info("render.done study=%s images=%d levels=%s", ctx.label, len(slices), levels)


def register(registry: StepRegistry) -> None:
    registry.register(RenderKeySlices)
