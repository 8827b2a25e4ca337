"""CTViT, the image encoder of CT-CLIP v2, written from the published description.

Module and parameter names follow the released checkpoints key for key, so that
``load_state_dict(strict=True)`` accepts a ``CT-CLIP_v2.pt`` state dict. Modules that
inference never calls (``to_patch_emb_first_frame``, ``to_pixels*``, the VQ's
``cluster_size``/``initted``, every ``context_norm``) exist only so that those keys load.

Forward path (eval only): patch embedding → spatial transformer with a continuous position
bias → temporal transformer → cosine-similarity vector quantisation that returns the raw
(un-normalised) codebook row. Shapes for the released model: (B, 1, 240, 480, 480) →
(B, 24, 24, 24, 512).

Attention has two numerically equivalent paths, chosen per model with
``CTViT.set_fused_attention``: the plain ``softmax(q·kᵀ·8 + bias)·v`` (default; bit-identical
to the official code on the CPU reference fixtures) and
``torch.nn.functional.scaled_dot_product_attention(scale=8, attn_mask=bias)`` (fused
kernels, used on CUDA; on the fixtures it differs by ≤ 6e-6 in the transformer outputs
and gives identical VQ indices and ≤ 1e-6 in the probabilities).
"""

from __future__ import annotations

import contextlib
import logging
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from processor.models.ctclip_config import CTViTConfig

log = logging.getLogger(__name__)

ATTN_SCALE = 8.0


class GammaLayerNorm(nn.Module):
    """Layer norm with a learned gain ``gamma`` and a fixed all-zero ``beta`` buffer."""

    beta: torch.Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class GEGLU(nn.Module):
    """Split the last axis in two halves (value, gate) and return value · gelu(gate)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = x.chunk(2, dim=-1)
        return F.gelu(gate) * value


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm → Linear(dim, 2·inner) → GEGLU → (dropout slot) → Linear(inner, dim)."""
    inner = int(mult * (2 / 3) * dim)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner * 2, bias=False),
        GEGLU(),
        nn.Identity(),  # dropout slot (0.0 in the released model); keeps index 4 below
        nn.Linear(inner, dim, bias=False),
    )


class PEG(nn.Module):
    """Position generator: causal depthwise 3-D convolution over a (b, t, h, w, d) view.

    The token tensor is reshaped *literally* to ``video_shape + (d,)``. In the temporal
    stage the memory layout is (b h w) t, so this reinterprets it as b t h w; the released
    weights were trained with exactly this behaviour, so it is reproduced on purpose.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dsconv = nn.Conv3d(dim, dim, 3, groups=dim)

    def forward(self, x: torch.Tensor, video_shape: tuple[int, int, int, int]) -> torch.Tensor:
        orig_shape = x.shape
        grid = x.reshape(*video_shape, orig_shape[-1]).permute(0, 4, 1, 2, 3)
        grid = F.pad(grid, (1, 1, 1, 1, 2, 0))
        grid = self.dsconv(grid)
        return grid.permute(0, 2, 3, 4, 1).reshape(orig_shape)


class Attention(nn.Module):
    """Multi-head self-attention with cosine-normalised q/k and a fixed logit scale of 8.

    The query comes from the layer-normed input, key and value from the raw input.
    """

    def __init__(self, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.null_kv = nn.Parameter(torch.empty(heads, 0, dim_head))  # zero null k/v pairs
        self.q_scale = nn.Parameter(torch.ones(dim_head))
        self.k_scale = nn.Parameter(torch.ones(dim_head))
        self.norm = GammaLayerNorm(dim)
        self.context_norm = GammaLayerNorm(dim)  # unused: no cross-attention context
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)
        self.fused = False

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None = None) -> torch.Tensor:
        q = self._split_heads(self.to_q(self.norm(x)))
        k, v = (self._split_heads(t) for t in self.to_kv(x).chunk(2, dim=-1))
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        if self.fused:
            mask = None if attn_bias is None else attn_bias.to(q.dtype)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=ATTN_SCALE)
        else:
            sim = (q @ k.transpose(-2, -1)) * ATTN_SCALE
            if attn_bias is not None:
                sim = sim + attn_bias
            out = sim.softmax(dim=-1) @ v
        b, _, n, _ = out.shape
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Transformer(nn.Module):
    """Pre-norm blocks of [PEG, self-attention, (no cross-attention), feed-forward].

    ``layers.i`` is a ModuleList whose slot 2 is ``None`` (the absent cross-attention), so
    parameter names match the released checkpoints (``layers.i.0``, ``.1``, ``.3``).
    """

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, ff_mult: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PEG(dim),
                    Attention(dim, dim_head, heads),
                    None,  # type: ignore[list-item]  # torch's stubs say Module; a None slot works at runtime
                    feed_forward(dim, ff_mult),
                ]
            )
            for _ in range(depth)
        )
        self.norm_out = GammaLayerNorm(dim)

    def forward(
        self,
        x: torch.Tensor,
        video_shape: tuple[int, int, int, int],
        attn_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        for block in self.layers:
            peg, attn, _cross, ff = cast(nn.ModuleList, block)
            x = peg(x, video_shape) + x
            x = attn(x, attn_bias) + x
            x = ff(x) + x
        return self.norm_out(x)


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias from an MLP over log-scaled 2-D relative positions.

    The bias depends only on (h, w) and the weights, so under ``torch.no_grad`` /
    ``torch.inference_mode`` it is cached per (h, w, device, autocast dtype). Loading a
    state dict clears the cache.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.net = nn.ModuleList(
            [
                nn.Sequential(nn.Linear(2, dim), nn.LeakyReLU(0.1)),
                nn.Sequential(nn.Linear(dim, dim), nn.LeakyReLU(0.1)),
                nn.Linear(dim, heads),
            ]
        )
        self._cache: dict[tuple[object, ...], torch.Tensor] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[arg-type]

    def _compute(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        rows, cols = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        grid = torch.stack((rows, cols), dim=-1).reshape(-1, 2)
        rel = (grid[:, None, :] - grid[None, :, :]).to(torch.float32)
        rel = torch.sign(rel) * torch.log(rel.abs() + 1)
        for layer in self.net:
            rel = layer(rel)
        return rel.permute(2, 0, 1)

    def forward(self, h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
        if device is None:
            device = cast(nn.Linear, self.net[2]).weight.device
        if torch.is_grad_enabled() or self.training:
            return self._compute(h, w, device)
        amp = None
        if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
            amp = torch.get_autocast_dtype(device.type)
        key = (h, w, str(device), amp, torch.is_inference_mode_enabled())
        cached = self._cache.get(key)
        if cached is None:
            cached = self._compute(h, w, device)
            self._cache[key] = cached
            log.debug("ctvit.bias_cached h=%s w=%s device=%s amp=%s", h, w, device, amp)
        return cached


class Patchify(nn.Module):
    """(b, c, t·pt, h·p1, w·p2) → (b, t, h, w, c·pt·p1·p2), p2 fastest."""

    def __init__(self, patch: int, temporal_patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.temporal_patch = temporal_patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, f, hh, ww = x.shape
        p, pt = self.patch, self.temporal_patch
        x = x.reshape(b, c, f // pt, pt, hh // p, p, ww // p, p)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, f // pt, hh // p, ww // p, c * pt * p * p)


class _Codebook(nn.Module):
    initted: torch.Tensor
    cluster_size: torch.Tensor
    embed: torch.Tensor

    def __init__(self, codebook_size: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("initted", torch.ones(1))
        self.register_buffer("cluster_size", torch.zeros(1, codebook_size))
        self.register_buffer("embed", torch.zeros(1, codebook_size, dim))


class CosineVQ(nn.Module):
    """Nearest codebook row by cosine similarity; returns the raw row and its index."""

    def __init__(self, dim: int, codebook_size: int) -> None:
        super().__init__()
        self._codebook = _Codebook(codebook_size, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embed = self._codebook.embed[0]
        device_type = x.device.type
        amp_off = (
            torch.autocast(device_type=device_type, enabled=False)
            if torch.amp.is_autocast_available(device_type)
            else contextlib.nullcontext()
        )
        with amp_off:  # the code choice is made in float32 even under autocast
            sim = F.normalize(x.float(), dim=-1) @ F.normalize(embed.float(), dim=-1).t()
        indices = sim.argmax(dim=-1)
        return embed[indices], indices


class CTViT(nn.Module):
    """Factorised spatial/temporal ViT encoder with a cosine VQ bottleneck (encoder only)."""

    def __init__(self, cfg: CTViTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or CTViTConfig()
        self.cfg = cfg
        frame_patch = cfg.channels * cfg.patch_size**2
        patch_dim = frame_patch * cfg.temporal_patch_size
        self.spatial_rel_pos_bias = ContinuousPositionBias(cfg.dim, cfg.heads)
        self.to_patch_emb_first_frame = nn.Sequential(  # unused at inference
            nn.Identity(),
            nn.LayerNorm(frame_patch),
            nn.Linear(frame_patch, cfg.dim),
            nn.LayerNorm(cfg.dim),
        )
        self.to_patch_emb = nn.Sequential(
            Patchify(cfg.patch_size, cfg.temporal_patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, cfg.dim),
            nn.LayerNorm(cfg.dim),
        )
        block = dict(dim=cfg.dim, dim_head=cfg.dim_head, heads=cfg.heads, ff_mult=cfg.ff_mult)
        self.enc_spatial_transformer = Transformer(depth=cfg.spatial_depth, **block)
        self.enc_temporal_transformer = Transformer(depth=cfg.temporal_depth, **block)
        self.vq = CosineVQ(cfg.dim, cfg.codebook_size)
        self.to_pixels_first_frame = nn.Sequential(nn.Linear(cfg.dim, frame_patch))  # unused
        self.to_pixels = nn.Sequential(nn.Linear(cfg.dim, patch_dim))  # unused

    def set_fused_attention(self, fused: bool) -> None:
        """Use SDPA (True) or the exact plain-matmul attention (False) in every layer."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = fused

    @property
    def grid_hw(self) -> tuple[int, int]:
        side = self.cfg.image_size // self.cfg.patch_size
        return side, side

    def check_input(self, video: torch.Tensor) -> None:
        """Raise ValueError unless video is (B, channels, F, image_size, image_size)."""
        cfg = self.cfg
        if video.ndim != 5 or video.shape[1] != cfg.channels:
            raise ValueError(f"CTViT expects (B, {cfg.channels}, F, H, W), got {tuple(video.shape)}")
        if tuple(video.shape[-2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(
                f"CTViT expects H = W = {cfg.image_size}, got {tuple(video.shape[-2:])}; "
                "preprocess the volume with preprocess_volume() first"
            )
        if video.shape[2] % cfg.temporal_patch_size:
            raise ValueError(f"frame count {video.shape[2]} is not a multiple of {cfg.temporal_patch_size}")

    def encode_intermediates(self, video: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every stage of the encoder, in the official layouts.

        Keys: ``patch_emb`` (b,t,h,w,d); ``spatial_out`` ((b t),(h w),d);
        ``temporal_out`` ((b h w),t,d); ``vq_indices`` (b, t·h·w); ``tokens`` (b,t,h,w,d).
        """
        self.check_input(video)
        tokens = self.to_patch_emb(video)
        b, t, h, w, d = tokens.shape
        video_shape = (b, t, h, w)
        bias = self.spatial_rel_pos_bias(h, w, device=tokens.device)
        spatial = self.enc_spatial_transformer(tokens.reshape(b * t, h * w, d), video_shape, attn_bias=bias)
        temporal_in = spatial.reshape(b, t, h, w, d).permute(0, 2, 3, 1, 4).reshape(-1, t, d)
        temporal = self.enc_temporal_transformer(temporal_in, video_shape)
        encoded = temporal.reshape(b, h, w, t, d).permute(0, 3, 1, 2, 4).reshape(b, -1, d)
        quantized, indices = self.vq(encoded)
        return {
            "patch_emb": tokens,
            "spatial_out": spatial,
            "temporal_out": temporal,
            "vq_indices": indices,
            "tokens": quantized.reshape(b, t, h, w, d),
        }

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, F, H, W) → quantised tokens (B, t, h, w, d)."""
        return self.encode_intermediates(video)["tokens"]
