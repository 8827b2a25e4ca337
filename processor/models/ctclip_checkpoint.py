"""CT-CLIP architecture config and checkpoint inspection / reading.

``inspect_checkpoint`` reads only tensor *metadata* (``torch.load(map_location="meta")``),
so a v1 checkpoint (whose ``to_visual_latent.weight`` alone is 4 GiB) is recognised and
refused without allocating it.
"""

from __future__ import annotations

import json
import logging
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from processor.errors import ConfigError, WeightsError
from processor.models.ctvit import CTViTConfig

log = logging.getLogger(__name__)

V2_FILES = "CT-CLIP_v2.pt, CT_VocabFine_v2.pt or CT_LiPro_v2.pt"
V1_VISUAL_LATENT_SHAPE = (512, 2097152)
LIPRO_PREFIX = "trained_model."
LIPRO_HEAD = "classifier."
_LOAD_ERRORS = (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, OSError)

OFFICIAL_BERT: dict[str, Any] = {
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.25,
    "attention_probs_dropout_prob": 0.25,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


@dataclass(frozen=True)
class CTClipConfig:
    """Everything needed to build the model; ``official()`` is the released v2 model."""

    bert: dict[str, Any] = field(default_factory=lambda: dict(OFFICIAL_BERT))
    ctvit: CTViTConfig = field(default_factory=CTViTConfig)
    dim_image: int = 294912
    dim_text: int = 768
    dim_latent: int = 512
    max_length: int = 512
    attn_implementation: str = "eager"

    @classmethod
    def official(cls) -> CTClipConfig:
        return cls()

    def validate(self, source: str) -> CTClipConfig:
        side = self.ctvit.image_size // self.ctvit.patch_size
        if self.dim_image != side * side * self.ctvit.dim:
            raise ConfigError(
                f"{source}: ctclip.dim_image={self.dim_image} but the image encoder gives "
                f"{side}*{side}*{self.ctvit.dim}={side * side * self.ctvit.dim}. Hint: set "
                "dim_image to (image_size/patch_size)^2 * dim."
            )
        if self.dim_text != self.bert.get("hidden_size"):
            raise ConfigError(f"{source}: ctclip.dim_text must equal bert hidden_size")
        return self


_UNSUPPORTED_FLAGS = (
    "extra_latent_projection",
    "use_mlm",
    "downsample_image_embeds",
    "use_all_token_embeds",
)


def _config_from_dict(raw: dict[str, Any], source: str) -> CTClipConfig:
    try:
        bert = dict(raw["bert_config"])
        ctvit = CTViTConfig(**raw["ctvit"])
        clip = raw["ctclip"]
        max_length = (
            raw["tokenizer_max_length"] if "tokenizer_max_length" in raw else bert["max_position_embeddings"]
        )
        set_flags = [flag for flag in _UNSUPPORTED_FLAGS if clip.get(flag)]
        if set_flags:
            raise ConfigError(f"{source}: ctclip options {set_flags} are not supported (v2 uses false)")
        cfg = CTClipConfig(
            bert=bert,
            ctvit=ctvit,
            dim_image=int(clip["dim_image"]),
            dim_text=int(clip["dim_text"]),
            dim_latent=int(clip["dim_latent"]),
            max_length=int(max_length),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(
            f"{source}: not a valid CT-CLIP config ({exc!r}). Hint: it needs bert_config, "
            "ctvit and ctclip sections shaped like tests/fixtures/ct_clip/small_config.json."
        ) from exc
    return cfg.validate(source)


def load_config(config: str | Path | None) -> CTClipConfig:
    """``None`` → official v2 architecture; else parse a small_config.json-shaped file."""
    if config is None:
        return CTClipConfig.official()
    path = Path(config)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"model config {path} cannot be read: {exc}. Hint: omit config for the released "
            "v2 models, or point it at a JSON file shaped like small_config.json."
        ) from exc
    return _config_from_dict(raw, str(path))


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
