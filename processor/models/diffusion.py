"""The 2-D denoising-diffusion anomaly detector: network, slice preparation, reconstruction, loading.

* Network: a diffusers ``UNet2DModel`` (1 channel in/out, no attention) trained to predict noise
  (DDPM objective, linear betas, 1000 training timesteps); inference uses ``DDIMScheduler`` with
  the same betas and ``eta = 0``, so a reconstruction is deterministic given the noise seed.
* Slices: lung window (W1500/L−600) mapped to [−1, 1], cropped to the square bounding box of the
  lung mask on the chosen slices (8 % margin; whole slice when the mask is empty), resized to
  ``image_size`` with area averaging; the mask is resized the same way and kept where > 0.5.
* Reconstruction: noise to ``noise_level`` of the way along ``steps`` DDIM steps (0.3 of 50: start
  at the 15th-last timestep, t = 280 of 1000), then denoise back to t = 0. Anomalies — what the
  model never saw in normal lungs — come back changed; the squared error inside the lung mask,
  averaged per slice, is that slice's score.
* Saved as a folder: ``unet/`` and ``scheduler/`` (``save_pretrained`` / ``from_pretrained``) and
  ``card.json`` (image size, window, defaults, training record) written by ``fit-anomaly``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from processor.errors import WeightsError
from processor.models.diffusion_files import CARD_NAME, weights_file

log = logging.getLogger(__name__)

LUNG_WINDOW = (1500.0, -600.0)  # width, level in HU
CROP_MARGIN = 0.08


def build_unet(
    image_size: int = 64, channels: Sequence[int] = (32, 64, 64), layers_per_block: int = 1
) -> Any:
    """A small noise-prediction UNet for ``image_size``² single-channel slices."""
    from diffusers import UNet2DModel

    if image_size % (2 ** (len(channels) - 1)):
        raise ValueError(
            f"image_size {image_size} must be divisible by {2 ** (len(channels) - 1)} "
            f"for {len(channels)} resolution levels"
        )
    groups = min(8, *channels)
    return UNet2DModel(
        sample_size=image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        add_attention=False,
        norm_num_groups=groups,
    )


def build_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear") -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule)


@dataclass(frozen=True)
class Prepared:
    images: np.ndarray  # (K, 1, S, S) float32 in [-1, 1]
    masks: np.ndarray  # (K, S, S) bool
    box: tuple[int, int, int, int]  # y0, y1, x0, x1 of the crop in the original slice


def lung_box(mask: np.ndarray, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Square crop (y0, y1, x0, x1) around the union of ``mask`` (K, H, W), clipped to ``shape``."""
    h, w = shape
    if not mask.any():
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        return y0, y0 + side, x0, x0 + side
    ys, xs = np.flatnonzero(mask.any(axis=(0, 2))), np.flatnonzero(mask.any(axis=(0, 1)))
    cy, cx = (ys[0] + ys[-1] + 1) / 2, (xs[0] + xs[-1] + 1) / 2
    side = max(ys[-1] - ys[0] + 1, xs[-1] - xs[0] + 1)
    side = int(min(round(side * (1 + 2 * CROP_MARGIN)), h, w))
    y0 = int(min(max(round(cy - side / 2), 0), h - side))
    x0 = int(min(max(round(cx - side / 2), 0), w - side))
    return y0, y0 + side, x0, x0 + side


def prepare_slices(
    hu: np.ndarray,
    mask: np.ndarray | None,
    indices: Sequence[int],
    size: int,
    window: tuple[float, float] = LUNG_WINDOW,
) -> Prepared:
    """Axial slices ``indices`` of a (z, y, x) HU volume as model input (see the module docstring)."""
    idx = list(indices)
    slices = hu[idx].astype(np.float32)
    lung = mask[idx] if mask is not None else np.zeros(slices.shape, bool)
    box = lung_box(lung, slices.shape[1:])
    y0, y1, x0, x1 = box
    width, level = window
    scaled = np.clip((slices[:, y0:y1, x0:x1] - (level - width / 2)) / width, 0.0, 1.0) * 2.0 - 1.0
    images = F.interpolate(
        torch.from_numpy(np.ascontiguousarray(scaled))[:, None], size=(size, size), mode="area"
    )
    masks = (
        F.interpolate(
            torch.from_numpy(lung[:, y0:y1, x0:x1].astype(np.float32))[:, None],
            size=(size, size),
            mode="area",
        )[:, 0]
        > 0.5
    )
    return Prepared(images.numpy().astype(np.float32), masks.numpy(), box)


@torch.inference_mode()
def reconstruct(
    unet: Any,
    scheduler_config: Any,
    images: torch.Tensor,
    *,
    noise_level: float = 0.3,
    steps: int = 50,
    seed: int = 0,
) -> torch.Tensor:
    """Noise ``images`` (B, 1, S, S) to ``noise_level`` of ``steps`` DDIM steps and denoise back."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    n = max(1, min(steps, round(noise_level * steps)))
    timesteps = scheduler.timesteps[-n:]
    generator = torch.Generator(device="cpu").manual_seed(seed)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    x = scheduler.add_noise(images, noise, timesteps[:1].to(images.device))
    for t in timesteps:
        eps = unet(x, t.to(images.device)).sample
        x = scheduler.step(eps, t, x, eta=0.0).prev_sample
    return x


def slice_scores(images: np.ndarray, recon: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice mean squared error inside the mask (whole slice when its mask is empty); error maps."""
    error = (images[:, 0] - recon[:, 0]) ** 2
    scores = np.empty(error.shape[0])
    for k in range(error.shape[0]):
        inside = masks[k] if masks[k].any() else np.ones_like(masks[k])
        scores[k] = float(error[k][inside].mean())
    return scores, error


@dataclass
class LoadedAnomaly:
    unet: Any
    scheduler_config: Any
    card: dict[str, Any]
    weights_path: Path


def save_anomaly_model(folder: Path, unet: Any, scheduler: Any, card: dict[str, Any]) -> None:
    """Write ``unet/``, ``scheduler/`` (save_pretrained) and ``card.json`` (last, temp file + rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(folder / "unet")
    scheduler.save_pretrained(folder / "scheduler")
    tmp = folder / f".{CARD_NAME}.tmp"
    tmp.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CARD_NAME)


def load_anomaly_model(folder: Path, device: str | torch.device = "cpu") -> LoadedAnomaly:
    """Load a folder written by ``fit-anomaly``; WeightsError when it is incomplete."""
    from diffusers import DDPMScheduler, UNet2DModel

    try:
        card = json.loads((folder / CARD_NAME).read_text(encoding="utf-8"))
        unet = UNet2DModel.from_pretrained(folder / "unet", low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError, KeyError) as exc:
        raise WeightsError(
            f"{folder}: not an anomaly model written by `python run.py fit-anomaly` ({exc}). "
            "Fix: run fit-anomaly, or point the step at the folder holding unet/, scheduler/ and "
            "card.json."
        ) from exc
    unet.to(device).eval()
    return LoadedAnomaly(unet, scheduler.config, card, weights_file(folder))
