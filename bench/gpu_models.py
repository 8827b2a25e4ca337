"""``bench/gpu_check.py`` sections 5–6: the captioner and the diffusion anomaly model on the device.

5. A captioner of BLIP-2 OPT-2.7B's shape (ViT-g/14 vision tower, 32-query Q-Former, OPT with
   2560 hidden, 32 layers, 10240 feed-forward, 50304 token embeddings: 3.74 B parameters) with
   random weights, built from its config directly on the device at the captioner's default dtype
   (``dtype: auto``: bf16 on CUDA, float32 on the CPU). A small byte-level BPE tokenizer stands in
   for OPT's (ids it lacks decode to nothing; the cost is in the model). It runs through ctwatch's
   own :class:`processor.models.captioner.Captioner` (processor, image-token guard, one padded
   ``generate`` per call, decode) on 512² key-slice images, for 6 images (one study's key slices)
   and 16 (the step's default ``batch_size``); exactly 40 new tokens each (``min_new_tokens`` =
   ``max_new_tokens``; counted by a hook on the output projection, one call per new token).
   Wall-clock medians with the device synchronised, since ``generate`` does host work per token.
6. The anomaly model's UNet (``build_unet`` at fit-anomaly's defaults: 64², channels 32/64/64,
   random weights) scoring 16 lung-window slices of a synthetic chest: ``reconstruct`` (DDIM,
   noise level 0.3 of 50 steps: 15 UNet forwards on a batch of 16) and ``slice_scores``;
   CUDA-event medians.

``--tiny``: the tiny BLIP-2 of ``tests/tinyvlm.py`` (32² images, 4 queries) and a 32² UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_timing import Check, peak_gb, reset_peak, summary, time_calls, wall_calls

NEW_TOKENS = 40
OPT_2_7B = {
    "model_type": "opt",
    "vocab_size": 50304,  # Salesforce/blip2-opt-2.7b: OPT's 50272 + <image>, padded to a multiple of 64
    "hidden_size": 2560,
    "num_hidden_layers": 32,
    "ffn_dim": 10240,
    "num_attention_heads": 32,
    "word_embed_proj_dim": 2560,
    "max_position_embeddings": 2048,
}


def caption_dtype(check: Check) -> torch.dtype | None:
    """The captioner's ``dtype: auto`` (docs/precision.md): bf16 on CUDA, float32 (None) on the CPU."""
    from processor.models.device import default_autocast_dtype

    return default_autocast_dtype(check.device)


def blip2_opt(check: Check, dtype: torch.dtype | None, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor): BLIP-2 OPT-2.7B's shape (tiny: tests/tinyvlm's), random weights, on the device."""
    from tokenizers import processors
    from transformers import (  # type: ignore[attr-defined]
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        GPT2TokenizerFast,
    )
    from transformers.models.blip import BlipImageProcessorPil

    from tests.tinyvlm import _VISION, byte_level_bpe

    vocab, merges = byte_level_bpe(["<pad>", "</s>", "<unk>"])
    tokenizer = GPT2TokenizerFast(
        vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(  # OPT: BOS first
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", tokenizer.bos_token_id)]
    )
    queries, side = (4, 32) if check.tiny else (32, 224)
    processor = Blip2Processor(
        image_processor=BlipImageProcessorPil(size={"height": side, "width": side}),
        tokenizer=tokenizer,
        num_query_tokens=queries,
    )  # adds <image> to the tokenizer
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if check.tiny:
        small = {"hidden_size": 32, "num_attention_heads": 2, "num_hidden_layers": 1}
        vision: dict[str, Any] = dict(_VISION)
        qformer: dict[str, Any] = {**small, "intermediate_size": 37, "encoder_hidden_size": 32}
        text: dict[str, Any] = {
            **small,
            "model_type": "opt",
            "vocab_size": len(tokenizer),
            "ffn_dim": 37,
            "word_embed_proj_dim": 32,
            "max_position_embeddings": 128,
        }
    else:
        vision, qformer, text = {}, {}, dict(OPT_2_7B)  # Blip2's defaults are ViT-g/14 and its Q-Former
    config = Blip2Config(
        vision_config=vision,
        qformer_config={**qformer, "vocab_size": len(tokenizer)} if check.tiny else qformer,
        text_config={**text, **ids},
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    with torch.device(check.device):
        model = Blip2ForConditionalGeneration._from_config(config, dtype=dtype or torch.float32)
    model.generation_config.min_new_tokens = NEW_TOKENS  # random weights must not stop early
    return model.eval(), processor


def key_images(check: Check, count: int) -> list[np.ndarray]:
    """``count`` uint8 axial slices of a synthetic chest in the lung window (W1500/L−600), 512²
    (tiny: 64²), as render.key_slices hands them to the captioner."""
    from tests.dicomgen import chest_phantom

    side = 64 if check.tiny else 512
    hu, _ = chest_phantom((count + 8, side, side))
    rng = np.random.default_rng(1)
    images = []
    for k in range(4, 4 + count):
        noisy = hu[k] + rng.normal(0.0, 15.0, hu[k].shape)
        images.append((np.clip((noisy + 1350.0) / 1500.0, 0.0, 1.0) * 255).astype(np.uint8))
    return images


def captioner_section(check: Check) -> dict[str, Any]:
    from processor.models import captioner as cap
    from processor.models.image_tokens import blip2_problems

    @dataclass(frozen=True)
    class ExactTokens(cap.Generation):
        def kwargs(self) -> dict[str, Any]:
            return {**super().kwargs(), "min_new_tokens": self.max_new_tokens}

    dtype = caption_dtype(check)
    model, processor = blip2_opt(check, dtype)
    processor.tokenizer.padding_side = "left"  # as load_captioner sets it for decoder-only models
    info = cap.ModelInfo(
        Path("(built in memory)"), "blip-2", "Blip2ForConditionalGeneration", "blip-2", "opt"
    )
    captioner = cap.Captioner(info, model, processor, check.device, dtype)
    calls = [0]
    model.get_output_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    generation = ExactTokens(NEW_TOKENS, 1)
    images = key_images(check, 16)
    result: dict[str, Any] = {
        "shape": "tests/tinyvlm BLIP-2 (tiny)" if check.tiny else "BLIP-2 OPT-2.7B, random weights",
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(dtype or torch.float32).removeprefix("torch."),
        "image_side_px": int(images[0].shape[0]),
        "folder_problems": blip2_problems(processor, model.config),  # the daemon's check: must be []
    }
    captioner.caption(images[:6], None, generation)  # warm-up: cuBLAS handles, allocator
    for count in (6, 16):
        calls[0] = 0
        reset_peak(check.device)

        def caption(n: int = count) -> list[str]:
            return captioner.caption(images[:n], None, generation)

        seconds = wall_calls(caption, check, repeats=3)
        row = summary(seconds, 1.0, "s")
        row["new_tokens_per_call"] = calls[0] / len(seconds)
        row["per_image_s"] = round(row["median_s"] / count, 4)
        row["ms_per_new_token"] = round(row["median_s"] / max(row["new_tokens_per_call"], 1) * 1000, 3)
        row["peak_gb"] = peak_gb(check.device)
        result[f"images_{count}"] = row
        check.say(f"  caption {count} images: {row}")
    result["problems"] = [
        f"{count} images: {result[f'images_{count}']['new_tokens_per_call']} new tokens per call, not {NEW_TOKENS}"
        for count in (6, 16)
        if result[f"images_{count}"]["new_tokens_per_call"] != NEW_TOKENS
    ] + [f"the daemon would refuse this folder: {p}" for p in result["folder_problems"]]
    return result


# ------------------------------------------------------------------------------ 6. diffusion
def unet_shape(check: Check) -> tuple[int, tuple[int, ...]]:
    """(image size, channels): fit-anomaly's defaults, or a tiny UNet."""
    return (32, (8, 16)) if check.tiny else (64, (32, 64, 64))


def diffusion_section(check: Check) -> dict[str, Any]:
    from processor.dicom.render import choose_levels
    from processor.models.diffusion import (
        build_scheduler,
        build_unet,
        prepare_slices,
        reconstruct,
        slice_scores,
    )
    from tests.dicomgen import chest_phantom

    size, channels = unet_shape(check)
    torch.manual_seed(0)
    unet = build_unet(size, channels).to(check.device).eval()
    scheduler = build_scheduler()
    hu, _ = chest_phantom((24, 64, 64) if check.tiny else (48, 256, 256))
    mask = (hu > -990) & (hu < -500)  # the phantom's lungs: −850 HU and −980 HU emphysema; air is −1000
    levels, _ = choose_levels(16, hu.shape[0], mask)
    prepared = prepare_slices(hu, mask, levels, size)
    images = torch.from_numpy(prepared.images).to(check.device)
    noise_level, steps = 0.3, 50

    outputs: list[torch.Tensor] = []

    def score() -> None:
        outputs[:] = [
            *outputs[-1:],
            reconstruct(unet, scheduler.config, images, noise_level=noise_level, steps=steps, seed=0),
        ]

    reset_peak(check.device)
    seconds = time_calls(score, check, repeats=5, warmup=1)
    first, second = (out.float().cpu().numpy() for out in outputs)  # the last two runs: same seed
    scores, _ = slice_scores(prepared.images, first, prepared.masks)
    forwards = max(1, min(steps, round(noise_level * steps)))
    row = summary(seconds)
    return {
        "parameters": sum(p.numel() for p in unet.parameters()),
        "image_size": size,
        "slices": int(images.shape[0]),
        "unet_forwards": forwards,
        "study": row,
        "ms_per_forward": round(row["median_ms"] / forwards, 3),
        "peak_gb": peak_gb(check.device),
        "scores_finite": bool(np.isfinite(scores).all()),
        "repeat_max_abs_diff": float(np.abs(first - second).max()),
        "problems": [] if np.isfinite(scores).all() else ["non-finite slice scores"],
    }
