"""Where a ``fit-anomaly`` folder keeps its files, without torch: what a pipeline check, the
weights listing and the status page need to know about an anomaly model that is not loaded."""

from __future__ import annotations

from pathlib import Path

CARD_NAME = "card.json"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"


def weights_file(folder: Path) -> Path:
    """The UNet weights inside an anomaly model folder (the diffusers layout)."""
    return folder / "unet" / "diffusion_pytorch_model.safetensors"
