"""CT-CLIP's architecture as data, without torch: the image encoder's and the whole model's
configuration (the released v2 model by default) and the reader of a ``small_config.json``-shaped
file. Checking a pipeline reads these; only building or loading a model needs torch
(:mod:`processor.models.ctclip_checkpoint`, :mod:`processor.models.ctvit`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from processor.errors import ConfigError


@dataclass(frozen=True)
class CTViTConfig:
    """Architecture of the image encoder; defaults are the released v2 model."""

    dim: int = 512
    codebook_size: int = 8192
    image_size: int = 480
    patch_size: int = 20
    temporal_patch_size: int = 10
    spatial_depth: int = 4
    temporal_depth: int = 4
    dim_head: int = 32
    heads: int = 8
    channels: int = 1
    ff_mult: int = 4


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
