"""CT-CLIP architecture config and checkpoint inspection / reading.

``inspect_checkpoint`` reads only tensor *metadata* (``torch.load(map_location="meta")``),
so a v1 checkpoint (whose ``to_visual_latent.weight`` alone is 4 GiB) is recognised and
refused without allocating it.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from processor.errors import WeightsError

log = logging.getLogger(__name__)

V2_FILES = "CT-CLIP_v2.pt, CT_VocabFine_v2.pt or CT_LiPro_v2.pt"
V1_VISUAL_LATENT_SHAPE = (512, 2097152)
LIPRO_PREFIX = "trained_model."
LIPRO_HEAD = "classifier."
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint file holds, from its tensor metadata only."""

    path: Path
    kind: Literal["ctclip", "lipro"]
    n_keys: int


def _load(path: Path, map_location: str) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as exc:
        raise WeightsError(
            f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}). Hint: the file "
            f"is corrupt or incomplete; download {V2_FILES} again and check its size "
            "(CT-CLIP_v2.pt is about 1.77 GB)."
        ) from exc


def inspect_checkpoint(checkpoint: str | Path) -> CheckpointInfo:
    """Validate a checkpoint by its key names and shapes, without reading tensor data."""
    path = Path(checkpoint)
    if not path.is_file():
        raise WeightsError(
            f"checkpoint {path} not found. Hint: place one of {V2_FILES} (CT-RATE release, "
            "Hugging Face dataset ibrahimhamamci/CT-RATE, folder models/) at that path."
        )
    state = _load(path, "meta")
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"checkpoint {path} is not a state_dict. Hint: use {V2_FILES}.")
    lipro = any(str(k).startswith(LIPRO_PREFIX) for k in state) and any(
        str(k).startswith(LIPRO_HEAD) for k in state
    )
    prefix = LIPRO_PREFIX if lipro else ""
    visual = state.get(f"{prefix}to_visual_latent.weight")
    if visual is None:
        raise WeightsError(
            f"checkpoint {path} has no {prefix}to_visual_latent.weight: not a CT-CLIP "
            f"state_dict. Hint: use {V2_FILES}."
        )
    if tuple(visual.shape) == V1_VISUAL_LATENT_SHAPE:
        raise WeightsError(
            f"checkpoint {path} is a CT-CLIP v1 model (to_visual_latent.weight "
            f"{list(visual.shape)}): v1 uses another patch size, prompts and intensity "
            f"normalisation and is not supported. Hint: use the v2 files {V2_FILES}."
        )
    kind: Literal["ctclip", "lipro"] = "lipro" if lipro else "ctclip"
    log.debug("checkpoint.inspected path=%s kind=%s keys=%s", path, kind, len(state))
    return CheckpointInfo(path=path, kind=kind, n_keys=len(state))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The full state dict on the CPU (weights_only)."""
    state = _load(path, "cpu")
    return dict(state)


def split_lipro(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CT-LiPro wrapper state → (CT-CLIP state, classifier state)."""
    core: dict[str, torch.Tensor] = {}
    head: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(LIPRO_PREFIX):
            core[key[len(LIPRO_PREFIX) :]] = value
        elif key.startswith(LIPRO_HEAD):
            head[key[len(LIPRO_HEAD) :]] = value
        else:
            raise WeightsError(f"unexpected key {key!r} in a CT-LiPro checkpoint")
    if set(head) != {"weight", "bias"}:
        raise WeightsError(f"CT-LiPro classifier keys {sorted(head)}; expected bias and weight")
    return core, head
