"""The supervised head on the CT-CLIP image latent: latent (512,) → one probability per finding.

A linear layer (``hidden: 0``) or a one-hidden-layer MLP (``hidden: N``, GELU, dropout), after a
standardisation whose mean and std (from the training set) are buffers of the module. Saved as a
folder: ``head.pt`` (a plain state dict, loaded with ``weights_only=True``) and ``card.json``
(architecture, findings, per-finding calibration maps and thresholds, CV figures, the CT-CLIP
checkpoint it was trained on, training-set hash, date — written by ``fit-head``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from processor.errors import WeightsError
from processor.models.calibration_map import Calibration

WEIGHTS_NAME = "head.pt"
CARD_NAME = "card.json"


class FindingHead(nn.Module):
    """Standardise, then linear or MLP, to one logit per finding."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, in_dim: int, n_findings: int, hidden: int = 0, dropout: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))
        if hidden > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_findings)
            )
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, n_findings))

    def set_normalisation(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(torch.clamp(std, min=1e-6))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_findings) for latents (B, in_dim)."""
        return self.net((latent - self.mean) / self.std)

    @torch.inference_mode()
    def probabilities(self, latent: torch.Tensor) -> torch.Tensor:
        self.eval()
        return torch.sigmoid(self.forward(latent))


@dataclass
class LoadedHead:
    model: FindingHead
    findings: list[str]
    card: dict[str, Any]
    weights_path: Path

    def probabilities(self, latent: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (n_findings,) for one latent (in_dim,), float32.

        The head's sigmoid output passed through each finding's calibration map from the card
        (:mod:`processor.models.calibration_map`); a card without one (an older fit) is used as is.
        """
        device = next(self.model.parameters()).device
        raw = self.model.probabilities(torch.from_numpy(np.asarray(latent, np.float32))[None].to(device))
        raw_np = raw[0].cpu().numpy().astype(float)
        calibration = self.card.get("calibration") or {}
        return np.array(
            [
                Calibration.from_dict(calibration.get(f)).apply(v)
                for f, v in zip(self.findings, raw_np, strict=True)
            ]
        )


def build_head(in_dim: int, findings: Sequence[str], hidden: int = 0, dropout: float = 0.1) -> FindingHead:
    return FindingHead(in_dim, len(findings), hidden, dropout)


def save_head(folder: Path, model: FindingHead, card: dict[str, Any]) -> Path:
    """Write ``head.pt`` and ``card.json`` into ``folder`` (each via a temp file + ``os.replace``)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS_NAME}.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, folder / WEIGHTS_NAME)
    tmp = folder / f".{CARD_NAME}.tmp"
    tmp.write_text(json.dumps(card, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / CARD_NAME)
    return folder / WEIGHTS_NAME


def load_head(folder: Path, device: str | torch.device = "cpu") -> LoadedHead:
    """Load a head folder written by ``fit-head``; WeightsError when a file is missing or inconsistent."""
    card_path, weights_path = folder / CARD_NAME, folder / WEIGHTS_NAME
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        arch = card["architecture"]
        findings = list(card["findings"])
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        for entry in (card.get("calibration") or {}).values():
            Calibration.from_dict(entry)  # an unknown method is refused here, not per study
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise WeightsError(
            f"{folder}: not a head written by `python run.py fit-head` ({exc}). "
            "Fix: run fit-head again or point the step at the right folder."
        ) from exc
    model = build_head(
        int(arch["in_dim"]), findings, int(arch.get("hidden", 0)), float(arch.get("dropout", 0.1))
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"{weights_path}: does not match its card.json ({exc}). Fix: keep head.pt and "
            "card.json from the same fit-head run together."
        ) from exc
    model.to(device).eval()
    return LoadedHead(model, findings, card, weights_path)
