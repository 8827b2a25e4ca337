"""Preview step ``render.key_slices``: PNGs of N axial levels through the lungs, in CT windows.

Files go to ``ctx.out_dir`` as ``key_<window>_<n>.png`` (n = 1..count, inferior to superior), and
with a lung mask ``key_lungs_<n>.png`` (the mask at that level in the same pixel grid, 0 / 255: the
outline on the key images sent to a PACS, :mod:`processor.dicom.keyimages`);
the result lists them relative to the folder of the study JSON (``<StudyUID>/key_lung_1.png``)
with window, slice index, position and sha256. The captioning step reads the same images from
``values["key_slices"]``. The choice of levels and windows is deterministic (see
:mod:`processor.dicom.render`) and recorded.

Each preview has square physical pixels: a slice whose displayed rows and columns are spaced
differently is resampled (HU, linear, before windowing) to the finer spacing, so a 2.0 × 3.0 mm
grid keeps the body's true shape; ``key_slices_method.pixels`` records the output pixel size in
mm and whether the slice was resampled. An unknown pixel spacing (``volume.spacing_unknown``) is
never guessed: the preview is written pixel for pixel and ``pixels.method`` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from processor.dicom.render import (
    WINDOWS,
    Orientation,
    PixelGrid,
    choose_levels,
    orient,
    png_bytes,
    radiological_orientation,
    to_square_pixels,
    window,
    write_atomic,
)
from processor.errors import StepError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, Step, StudyContext
from processor.steps.ports import KEY_SLICES, LUNG_MASK, VOLUME

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
    image: np.ndarray  # uint8 (rows, cols), radiological orientation, square physical pixels when known
    sha256: str
    pixel_mm: float | None = None  # side of one (square) image pixel; None when the spacing is unknown


class KeySliceParams(Params):
    count: int = Field(3, ge=1, le=20)
    windows: list[WindowName] = Field(default_factory=_default_windows, min_length=1)


class RenderKeySlices(Step):
    uses = "render.key_slices"
    summary = (
        "PNG previews of N axial levels through the lungs in lung (W1500/L-600) and mediastinal "
        "(W350/L40) windows, radiological orientation, square physical pixels (the coarser axis resampled "
        "to the finer spacing), written next to the study JSON."
    )
    Params = KeySliceParams
    needs = (VOLUME,)
    optional_needs = (LUNG_MASK,)
    provides = (KEY_SLICES,)

    def run(self, ctx: StudyContext) -> None:
        params: KeySliceParams = self.params  # type: ignore[assignment]
        volume = ctx.values["volume"]
        levels, how = choose_levels(params.count, volume.hu.shape[0], ctx.values.get("lung_mask"))
        turn = _orientation(volume)
        _, d_row, d_col = volume.spacing_zyx
        grid = PixelGrid.of(float(d_row), float(d_col), turn, volume.spacing_unknown)
        # orient and resample each level's HU once; every window is then exact on the square grid
        shown = {k: to_square_pixels(orient(volume.hu[k], turn), grid) for k in levels}
        masks = self._write_masks(ctx, levels, turn, grid)
        slices: list[KeySlice] = []
        for name in params.windows:
            width, level = WINDOWS[name]
            for number, k in enumerate(levels, start=1):
                image = window(shown[k], width, level)
                path = ctx.out_dir / f"key_{name}_{number}.png"
                digest = write_atomic(path, png_bytes(image))
                slices.append(
                    KeySlice(
                        name,
                        number,
                        k,
                        round(float(volume.positions_mm[k]), 3),
                        path,
                        image,
                        digest,
                        grid.pixel_mm,
                    )
                )
        folder = ctx.out_dir.name
        ctx.values["key_slices"] = slices
        ctx.result["key_slices"] = [
            {
                "file": f"{folder}/{s.path.name}",
                "window": s.window,
                "width": WINDOWS[s.window][0],
                "level": WINDOWS[s.window][1],
                "slice_index": s.slice_index,
                "z_mm": s.z_mm,
                "sha256": s.sha256,
                **masks.get(s.number, {}),
            }
            for s in slices
        ]
        ctx.result["key_slices_method"] = {
            "levels": how,
            "count": params.count,
            "windows": list(params.windows),
            "orientation": {"convention": "radiological", **turn.as_dict()},
            "pixels": grid.as_dict(*_displayed_shape(volume.hu.shape, turn)),
        }
        if grid.unknown is not None:
            log.warning(
                "render.unscaled study=%s reason=%r: previews shown pixel for pixel", ctx.label, grid.unknown
            )
        log.info(
            "render.done study=%s images=%d levels=%s pixel_mm=%s",
            ctx.label,
            len(slices),
            levels,
            grid.pixel_mm,
        )

    @staticmethod
    def _write_masks(
        ctx: StudyContext, levels: list[int], turn: Orientation, grid: PixelGrid
    ) -> dict[int, dict[str, str]]:
        """The lung mask of each level as ``key_lungs_<n>.png`` (0 / 255, the previews' pixel grid:
        same turn, resampled linearly and cut at one half), for outlines on the key images; the
        entries' ``lung_mask_file`` / ``lung_mask_sha256``. Nothing without a lung mask."""
        mask = ctx.values.get("lung_mask")
        if mask is None:
            return {}
        out: dict[int, dict[str, str]] = {}
        for number, k in enumerate(levels, start=1):
            shown = to_square_pixels(orient(mask[k].astype(np.float32), turn), grid)
            image = np.where(shown >= 0.5, 255, 0).astype(np.uint8)
            path = ctx.out_dir / f"key_lungs_{number}.png"
            digest = write_atomic(path, png_bytes(image))
            out[number] = {"lung_mask_file": f"{ctx.out_dir.name}/{path.name}", "lung_mask_sha256": digest}
        return out


def _displayed_shape(shape_zyx: tuple[int, ...], turn: Orientation) -> tuple[int, int]:
    """(rows, cols) of a slice after the radiological turn, before any resampling."""
    rows, cols = shape_zyx[1], shape_zyx[2]
    return (cols, rows) if turn.transpose else (rows, cols)


def _orientation(volume: Any) -> Orientation:
    """The radiological turn from the volume's in-plane direction cosines (ImageOrientationPatient).

    Only their directions matter, so when the cosines are not at hand the affine's columns (cosines
    × spacing) serve as well — unless the spacing is unknown and they are NaN.
    """
    row, col = np.asarray(volume.row_cosines, np.float64), np.asarray(volume.column_cosines, np.float64)
    if not (np.all(np.isfinite(row)) and np.all(np.isfinite(col))):
        affine = np.asarray(volume.affine, dtype=np.float64)
        row, col = affine[:3, 0], affine[:3, 1]
    if not (np.all(np.isfinite(row)) and np.all(np.isfinite(col))) or not (row.any() and col.any()):
        raise StepError(
            "the volume has no in-plane directions (ImageOrientationPatient), so the radiological "
            "orientation of the previews cannot be decided; re-export the series with its geometry"
        )
    return radiological_orientation(row.tolist(), col.tolist())


def register(registry: StepRegistry) -> None:
    registry.register(RenderKeySlices)
