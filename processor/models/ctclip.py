"""CT-CLIP v2 (CT-CLIP_v2 / CT_VocabFine_v2 / CT_LiPro_v2): loading and inference.

An independent implementation that loads the released state dicts unchanged and reproduces
the official numbers. Public API (a contract, used by other parts of ctwatch):

* ``load_ctclip(checkpoint, vocab, config=None, device="cpu") -> CTClip``
* ``CTClip.encode_image`` / ``encode_image_tokens`` / ``image_intermediates``
* ``CTClip.encode_text`` / ``text_cls_hidden`` / ``text_latents`` (cached per prompt)
* ``CTClip.zero_shot(volume, findings=None)`` → (B, n) probability of "present"
* ``CTClip.classify(volume)`` → (B, 18) sigmoid probabilities (CT-LiPro checkpoints only)
* ``preprocess_volume`` and ``ctrate_xyz_from_dicom`` (re-exported from ctclip_preprocess)

Loading: ``torch.load(weights_only=True)``; the legacy key
``text_transformer.embeddings.position_ids`` is dropped, everything else loads strictly.
v1 checkpoints are refused (different architecture, prompts and normalisation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel, BertTokenizer

from processor.errors import ConfigError, WeightsError
from processor.models.ctclip_checkpoint import (
    CheckpointInfo,
    inspect_checkpoint,
    read_state_dict,
    split_lipro,
)
from processor.models.ctclip_config import CTClipConfig, load_config
from processor.models.ctclip_preprocess import ctrate_xyz_from_dicom, preprocess_volume
from processor.models.ctclip_vocab import build_tokenizer
from processor.models.ctvit import CTViT
from processor.models.device import (
    autocast_context,
    check_autocast_dtype,
    precision_name,
    resolve_device,
)

log = logging.getLogger(__name__)

__all__ = [
    "CTRATE_FINDINGS",
    "CTClip",
    "CTClipConfig",
    "CheckpointInfo",
    "ctrate_xyz_from_dicom",
    "inspect_checkpoint",
    "load_ctclip",
    "preprocess_volume",
]

CTRATE_FINDINGS: tuple[str, ...] = (
    "Medical material",
    "Arterial wall calcification",
    "Cardiomegaly",
    "Pericardial effusion",
    "Coronary artery wall calcification",
    "Hiatal hernia",
    "Lymphadenopathy",
    "Emphysema",
    "Atelectasis",
    "Lung nodule",
    "Lung opacity",
    "Pulmonary fibrotic sequela",
    "Pleural effusion",
    "Mosaic attenuation pattern",
    "Peribronchial thickening",
    "Consolidation",
    "Bronchiectasis",
    "Interlobular septal thickening",
)
PRESENT_TEMPLATE = "{} is present."
ABSENT_TEMPLATE = "{} is not present."

Finding = str | tuple[str, str, str]


def _findings_prompts(findings: Sequence[Finding] | None) -> list[tuple[str, str, str]]:
    items = CTRATE_FINDINGS if findings is None else findings
    out = []
    for item in items:
        if isinstance(item, str):
            out.append((item, PRESENT_TEMPLATE.format(item), ABSENT_TEMPLATE.format(item)))
        elif len(item) == 3:
            out.append((str(item[0]), str(item[1]), str(item[2])))
        else:
            raise ValueError(f"finding {item!r} must be a name or (name, present, absent)")
    if not out:
        raise ValueError("findings must not be empty")
    return out


class CTClip(nn.Module):
    """CT-CLIP v2: BERT text tower, CTViT image tower, linear projections to the latent."""

    def __init__(
        self,
        config: CTClipConfig,
        tokenizer: BertTokenizer,
        *,
        lipro_classes: int = 0,
        text_padding: Literal["max_length", "longest"] = "max_length",
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.text_padding = text_padding
        self.device_ = torch.device("cpu")
        self.autocast_dtype: torch.dtype | None = None
        self._text_cache: dict[str, torch.Tensor] = {}
        self.temperature = nn.Parameter(torch.tensor(1.0))
        # transformers 5 types BertConfig as a dataclass without attn_implementation, which
        # PreTrainedConfig still takes from **kwargs at runtime
        bert_cfg = BertConfig(**config.bert, attn_implementation=config.attn_implementation)  # type: ignore[call-arg]
        self.text_transformer = BertModel(bert_cfg, add_pooling_layer=True)
        self.visual_transformer = CTViT(config.ctvit)
        self.to_text_latent = nn.Linear(config.dim_text, config.dim_latent, bias=False)
        self.to_visual_latent = nn.Linear(config.dim_image, config.dim_latent, bias=False)
        # deep copies in the release (unused with extra_latent_projection=False)
        self.to_text_latent_extra = nn.Linear(config.dim_text, config.dim_latent, bias=False)
        self.to_visual_latent_extra = nn.Linear(config.dim_image, config.dim_latent, bias=False)
        self.classifier: nn.Linear | None = None
        if lipro_classes:
            self.classifier = nn.Linear(config.dim_latent, lipro_classes)

    # ----------------------------------------------------------------- runtime set-up
    def place(
        self,
        device: torch.device,
        autocast_dtype: torch.dtype | None,
        fused_attention: bool | None = None,
    ) -> CTClip:
        """Move to ``device``, freeze, eval mode; set autocast dtype and attention kernel.

        ``autocast_dtype=None`` is true float32 (the official inference); on CUDA TF32 is off
        (:func:`exact_float32`, called by :func:`resolve_device`) whatever the dtype, so the parts
        autocast keeps in float32 (the VQ code choice, norms, softmax) stay exact too.
        ``fused_attention=None`` uses SDPA on CUDA and the exact plain attention on CPU.
        """
        self.to(device)
        fused = device.type == "cuda" if fused_attention is None else fused_attention
        self.visual_transformer.set_fused_attention(fused)
        self.eval()
        self.requires_grad_(False)
        self.device_ = device
        self.autocast_dtype = check_autocast_dtype(autocast_dtype)
        self._text_cache.clear()
        self.visual_transformer.spatial_rel_pos_bias.clear_cache()
        return self

    @property
    def device(self) -> torch.device:
        return self.device_

    @property
    def is_lipro(self) -> bool:
        return self.classifier is not None

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        if self.training:
            raise RuntimeError("CTClip must be in eval mode (train mode would update the VQ)")
        with torch.inference_mode(), autocast_context(self.device_, self.autocast_dtype):
            yield

    @contextlib.contextmanager
    def _exact(self) -> Iterator[None]:
        """inference_mode without autocast: for the small float32 heads."""
        with torch.inference_mode():
            yield

    def _as_batch(self, volume: torch.Tensor) -> torch.Tensor:
        if volume.ndim == 4:
            volume = volume.unsqueeze(0)
        return volume.to(self.device_, torch.float32)

    # ----------------------------------------------------------------- image side
    def image_intermediates(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        """All CTViT stages (see CTViT.encode_intermediates) for a (B,1,F,H,W) volume."""
        with self._inference():
            return self.visual_transformer.encode_intermediates(self._as_batch(volume))

    def encode_image_tokens(self, volume: torch.Tensor) -> torch.Tensor:
        """Quantised image tokens (B, t, h, w, d), the official ``enc_image``."""
        with self._inference():
            return self.visual_transformer(self._as_batch(volume))

    def image_latent_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Temporal mean → (h, w, d) flatten → projection → L2 norm, float32."""
        with self._inference():
            pooled = tokens.mean(dim=1).reshape(tokens.shape[0], -1)
            return F.normalize(self.to_visual_latent(pooled).float(), dim=-1)

    def encode_image(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, H, W) float32 volume (or (1, F, H, W)) → (B, dim_latent) unit vectors."""
        return self.image_latent_from_tokens(self.encode_image_tokens(volume))

    # ----------------------------------------------------------------- text side
    def _tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(prompts),
            padding=self.text_padding,
            truncation=True,
            max_length=self.config.max_length,
            return_tensors="pt",
        )
        return {k: enc[k].to(self.device_) for k in ("input_ids", "attention_mask")}

    def text_cls_hidden(self, prompts: Sequence[str]) -> torch.Tensor:
        """BERT last_hidden_state[:, 0] (the CLS token, not the pooler) per prompt."""
        with self._inference():
            out = self.text_transformer(**self._tokenize(prompts))
            return out.last_hidden_state[:, 0].float()

    def encode_text(self, prompts: Sequence[str], chunk: int = 8) -> torch.Tensor:
        """(N, dim_latent) L2-normalised text latents, uncached, in chunks of ``chunk``."""
        parts = []
        for start in range(0, len(prompts), chunk):
            cls = self.text_cls_hidden(prompts[start : start + chunk])
            with self._inference():
                parts.append(F.normalize(self.to_text_latent(cls).float(), dim=-1))
        return torch.cat(parts)

    def text_latents(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text latents with a per-model cache keyed by the prompt string."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
        if missing:
            log.info("ctclip.text_encode prompts=%s cached=%s", len(missing), len(self._text_cache))
            for prompt, latent in zip(missing, self.encode_text(missing), strict=True):
                self._text_cache[prompt] = latent
        return torch.stack([self._text_cache[p] for p in prompts])

    # ----------------------------------------------------------------- heads
    def zero_shot_logits(
        self, volume: torch.Tensor, findings: Sequence[Finding] | None = None
    ) -> torch.Tensor:
        """(B, n, 2) logits [present, absent] = cos · exp(temperature)."""
        items = _findings_prompts(findings)
        present = self.text_latents([p for _, p, _ in items])
        absent = self.text_latents([a for _, _, a in items])
        image = self.encode_image(volume)
        with self._exact():
            scale = self.temperature.float().exp()
            pair = torch.stack((image @ present.t(), image @ absent.t()), dim=-1)
            return pair * scale

    def zero_shot(self, volume: torch.Tensor, findings: Sequence[Finding] | None = None) -> torch.Tensor:
        """(B, n) probability that each finding is present (softmax over the prompt pair).

        ``findings``: names (prompts "{f} is present." / "{f} is not present.") or
        (name, present_prompt, absent_prompt) tuples; default CTRATE_FINDINGS. The image is
        encoded once; text latents are cached per prompt.
        """
        logits = self.zero_shot_logits(volume, findings)
        with self._exact():
            return logits.softmax(dim=-1)[..., 0]

    def classify_logits(self, volume: torch.Tensor) -> torch.Tensor:
        """CT-LiPro logits (B, n_classes): Linear(ReLU(image latent))."""
        if self.classifier is None:
            raise WeightsError(
                "classify() needs a CT-LiPro checkpoint (keys trained_model.* and classifier.*)."
                " Hint: load CT_LiPro_v2.pt, or use zero_shot() with CT-CLIP_v2.pt / "
                "CT_VocabFine_v2.pt."
            )
        latent = self.encode_image(volume)
        with self._exact():
            return self.classifier(F.relu(latent))

    def classify(self, volume: torch.Tensor) -> torch.Tensor:
        """CT-LiPro sigmoid probabilities (B, 18) in CTRATE_FINDINGS order."""
        return torch.sigmoid(self.classify_logits(volume))


def _materialize_buffers(model: nn.Module) -> None:
    """Recreate non-persistent buffers left on the meta device by an assign-load."""
    for module_name, module in model.named_modules():
        for name, buf in list(module._buffers.items()):
            if buf is None or not buf.is_meta:
                continue
            if name == "position_ids":
                value = torch.arange(buf.shape[-1]).expand(buf.shape)
            elif name == "token_type_ids":
                value = torch.zeros(buf.shape, dtype=torch.long)
            else:
                raise RuntimeError(f"buffer {module_name}.{name} was not loaded")
            module._buffers[name] = value


def _build_and_load(
    cfg: CTClipConfig, tokenizer: BertTokenizer, state: dict[str, torch.Tensor], info: CheckpointInfo
) -> CTClip:
    core, head = split_lipro(state) if info.kind == "lipro" else (state, {})
    core.pop("text_transformer.embeddings.position_ids", None)
    classes = int(head["weight"].shape[0]) if head else 0
    with torch.device("meta"):
        model = CTClip(cfg, tokenizer, lipro_classes=classes)
    full = dict(core)
    full.update({f"classifier.{k}": v for k, v in head.items()})
    try:
        model.load_state_dict(full, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsError(
            f"checkpoint {info.path} does not match the CT-CLIP v2 architecture of this "
            f"config: {exc}. Hint: for the small test model pass its config JSON; for the "
            "released files use config=None."
        ) from exc
    _materialize_buffers(model)
    return model


def load_ctclip(
    checkpoint: str | Path,
    vocab: str | Path,
    config: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    autocast_dtype: torch.dtype | None = None,
    text_padding: Literal["max_length", "longest"] = "max_length",
    fused_attention: bool | None = None,
) -> CTClip:
    """Load a released CT-CLIP v2 / VocabFine v2 / LiPro v2 checkpoint, ready for inference.

    ``config=None`` is the official v2 architecture; otherwise a JSON shaped like
    small_config.json. ``autocast_dtype=None`` (the default on every device) is float32 with
    TF32 off, as the official inference; ``torch.bfloat16`` / ``torch.float16`` run the image
    and text towers under autocast, an opt-in whose deviation docs/precision.md measures.
    ``text_padding="longest"`` is faster on CPU and differs from the official max_length
    padding by ~1e-6 in the CLS state. ``fused_attention=None`` = SDPA on CUDA, exact
    plain attention on CPU.
    """
    dev = resolve_device(device)
    if text_padding not in ("max_length", "longest"):
        raise ConfigError(f"text_padding {text_padding!r}: use 'max_length' or 'longest'")
    cfg = load_config(config)
    tokenizer = build_tokenizer(vocab, cfg.bert["vocab_size"])  # checked by content, WeightsError
    info = inspect_checkpoint(checkpoint)
    model = _build_and_load(cfg, tokenizer, read_state_dict(info.path), info)
    model.text_padding = text_padding
    model.place(dev, autocast_dtype, fused_attention)
    log.info(
        "ctclip.loaded path=%s kind=%s device=%s precision=%s",
        info.path,
        info.kind,
        dev,
        precision_name(model.autocast_dtype),
    )
    return model
