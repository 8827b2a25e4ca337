"""Anomaly step ``anomaly.diffusion``: reconstruction error of a 2-D diffusion model inside the lungs.

K axial slices evenly inside the lung mask's z-extent (the same choice as the key-slice
previews), in the lung window, cropped to the lungs and resized to the model's size, go through
the model in one batch: noised to ``noise_level`` of ``steps`` DDIM steps and denoised back (see
:mod:`processor.models.diffusion`). The per-slice score is the mean squared error inside the
lung mask; the study score (``aggregate``: max or mean of the slices) goes to
``result["anomaly"]`` and the ``anomaly.score`` feature (in ``result["features"]`` and the
``features`` port). Reconstruction noise is seeded, so the same study gives the same score. With
``heatmap: true`` a PNG per slice (slice | reconstruction | error in red) is written next to the
study JSON. Nothing is resampled in mm here; on an
irregular slice grid (gaps, uneven steps) the levels are still evenly spaced by slice *index*, and
``result["anomaly"]["warnings"]`` says so with the gap count, each slice's true ``z_mm`` listed.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field

from processor.dicom.grid import SliceGrid
from processor.dicom.render import choose_levels, write_atomic
from processor.pipeline.registry import StepRegistry
from processor.pipeline.step import Params, StudyContext
from processor.steps.ensemble import _WeightedStep
from processor.steps.ports import FEATURES, LUNG_MASK, VOLUME, add_features

log = logging.getLogger(__name__)


class AnomalyParams(Params):
    checkpoint: str = Field("weights/anomaly/", description="folder written by `python run.py fit-anomaly`")
    slices: int | None = Field(None, ge=1, le=128, description="K axial slices (default: the model card's)")
    noise_level: float | None = Field(None, gt=0, le=1, description="fraction of the DDIM steps to noise to")
    steps: int | None = Field(None, ge=1, le=1000, description="DDIM steps of the full schedule")
    aggregate: Literal["max", "mean"] = "max"
    seed: int = Field(0, ge=0, description="seed of the reconstruction noise")
    heatmap: bool = False


class AnomalyDiffusion(_WeightedStep):
    uses = "anomaly.diffusion"
    summary = (
        "Diffusion anomaly score (fit-anomaly's UNet + DDIM): K lung-window slices noised and denoised "
        "in one batch; reconstruction error inside the lung mask per slice and per study."
    )
    Params = AnomalyParams
    needs = (VOLUME, LUNG_MASK)
    provides = (FEATURES,)
    device = "gpu"

    def folder(self) -> Path:
        return self.env.path(self.params.checkpoint)  # type: ignore[attr-defined]

    def weight_files(self) -> list[Path]:
        from processor.models.diffusion_files import CARD_NAME, SCHEDULER_CONFIG, weights_file

        folder = self.folder()
        return [weights_file(folder), folder / SCHEDULER_CONFIG, folder / CARD_NAME]

    def output_sha256(self, output: str) -> str | None:
        """The UNet weights' sha256 for the ``anomaly`` features (compile-time binding)."""
        if output != "anomaly":
            return None
        from processor.models.diffusion_files import weights_file

        weights = weights_file(self.folder())
        return self.digest(weights) if weights.is_file() else None

    def run(self, ctx: StudyContext) -> None:
        import torch

        from processor.models.diffusion import load_anomaly_model, prepare_slices, reconstruct, slice_scores

        p: AnomalyParams = self.params  # type: ignore[assignment]
        folder = self.folder()
        model = self.cached(
            ("anomaly.diffusion", str(folder)), lambda: load_anomaly_model(folder, self.env.device)
        )
        card = model.card
        defaults = card.get("defaults", {})
        count = p.slices or int(defaults.get("slices", 16))
        noise_level = p.noise_level or float(defaults.get("noise_level", 0.3))
        steps = p.steps or int(defaults.get("ddim_steps", 50))
        window = (float(card["window"]["width"]), float(card["window"]["level"]))
        volume, mask = ctx.values[VOLUME.name], ctx.values[LUNG_MASK.name]
        levels, how = choose_levels(count, volume.hu.shape[0], mask)
        prepared = prepare_slices(volume.hu, mask, levels, int(card["image_size"]), window)
        device = next(model.unet.parameters()).device
        recon = (
            reconstruct(
                model.unet,
                model.scheduler_config,
                torch.from_numpy(prepared.images).to(device),
                noise_level=noise_level,
                steps=steps,
                seed=p.seed,
            )
            .float()
            .cpu()
            .numpy()
        )
        scores, error = slice_scores(prepared.images, recon, prepared.masks)
        score = float(scores.max() if p.aggregate == "max" else scores.mean())
        rows: list[dict[str, object]] = [
            {
                "slice_index": int(k),
                "z_mm": round(float(volume.positions_mm[k]), 3),
                "score": round(float(s), 6),
                "lung_pixels": int(prepared.masks[i].sum()),
            }
            for i, (k, s) in enumerate(zip(levels, scores, strict=True))
        ]
        if p.heatmap:
            for i, row in enumerate(rows):
                path = ctx.out_dir / f"anomaly_{i + 1}.png"
                write_atomic(
                    path, _heatmap_png(prepared.images[i, 0], recon[i, 0], error[i], prepared.masks[i])
                )
                row["heatmap"] = f"{ctx.out_dir.name}/{path.name}"
        grid = SliceGrid.of(volume.positions_mm)
        weights_sha = self.digest(model.weights_path)  # in the result and with the feature (provenance)
        ctx.result["anomaly"] = {
            "model": "unet/" + model.weights_path.name,
            "sha256": weights_sha,
            "trained": card.get("date"),
            "score": round(score, 6),
            "aggregate": p.aggregate,
            "noise_level": noise_level,
            "ddim_steps": steps,
            "seed": p.seed,
            "image_size": int(card["image_size"]),
            "slice_choice": how,
            "crop_yx": list(prepared.box),
            "slices": rows,
            "warnings": [grid.note("levels chosen by slice index on")] if grid.irregular else [],
        }
        ctx.result.setdefault("features", {})["anomaly.score"] = round(score, 6)
        add_features(ctx, {"anomaly.score": round(score, 6)}, replace=True, model_sha256=weights_sha)
        log.info("anomaly.done study=%s score=%.5f slices=%d", ctx.label, score, len(rows))


def _heatmap_png(image: np.ndarray, recon: np.ndarray, error: np.ndarray, mask: np.ndarray) -> bytes:
    from PIL import Image

    def gray(x: np.ndarray) -> np.ndarray:
        return np.clip((x + 1.0) * 127.5, 0, 255).astype(np.uint8)

    base = gray(image)
    scale = float(error.max()) or 1.0
    heat = np.clip(error / scale, 0.0, 1.0) * mask  # 0..1, only inside the lungs
    dimmed = (base * (1.0 - heat)).astype(np.uint8)
    overlay = np.stack([np.maximum(base, (heat * 255).astype(np.uint8)), dimmed, dimmed], axis=-1)
    panels = [np.stack([base] * 3, -1), np.stack([gray(recon)] * 3, -1), overlay]
    buf = io.BytesIO()
    Image.fromarray(np.concatenate(panels, axis=1)).save(buf, format="PNG")
    return buf.getvalue()


def register(registry: StepRegistry) -> None:
    registry.register(AnomalyDiffusion)
