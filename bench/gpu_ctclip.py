"""``bench/gpu_check.py`` sections 2–4: CT-CLIP on the device, and the host-to-device copy.

2. The small reference CT-CLIP (``tests/fixtures/ct_clip``: weights, input and the official
   code's outputs on a CPU) loaded with ``load_ctclip`` onto the device, in float32 (the default:
   TF32 off, SDPA on CUDA) and at the opt-in bf16 autocast; compared with those goldens under the
   tolerances of ``tests/test_ctclip_reference.py`` (float32) and ``docs/precision.md`` (bf16).
3. The full-size CT-CLIP v2 architecture (``CTClipConfig.official()``, 438 M parameters) with
   random weights (a random codebook, so the VQ chooses among real codes) on a realistic input:
   a synthetic 300 × 512² chest (HU, σ 15 noise) through the official preprocessing to
   1 × 1 × 240 × 480 × 480. ``encode_image`` at batch 1/2/4, float32 and bf16 interleaved (CUDA-event
   medians, peak memory, FLOPs counted on the meta device); float32 against bf16 (latent cosine, VQ
   code agreement) and SDPA against the plain attention in float32; which SDPA kernel ran.
4. The 221 MB input copied host → device from pageable and from pinned memory (and back into
   pinned memory), CUDA-event medians; the cost of pinning it.

``--tiny`` runs the same code with the small reference architecture and a 30 × 48² chest.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.gpu_timing import (
    Check,
    SdpaSpy,
    allocated_gb,
    peak_gb,
    reset_peak,
    sdpa_report,
    summary,
    time_calls,
)

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "ct_clip"
SMALL_TARGET_XYZ = (32, 32, 24)
ATOL = 1e-5  # tests/test_ctclip_reference.py: final outputs against the official code, on CPUs
FP32_FAIL = 1e-4  # 10 × that: beyond any summation order of true float32 (TF32 moves them by ~1e-3)
BF16_BOUNDS = {
    "zero_shot_dp": 0.18,
    "lipro_dp": 0.16,
    "vq_flips": 10,
    "latent_cosine": 0.865,
}  # docs/precision.md (CPU)


def ctclip_config(check: Check) -> Any:
    from processor.models.ctclip_config import CTClipConfig, load_config

    return load_config(FIX / "small_config.json") if check.tiny else CTClipConfig.official()


def target_xyz(check: Check) -> tuple[int, int, int]:
    return SMALL_TARGET_XYZ if check.tiny else (480, 480, 240)


def random_ctclip(cfg: Any, device: torch.device, seed: int = 0) -> Any:
    """CT-CLIP of architecture ``cfg`` with random weights, built on ``device``; the codebook is
    random normal (the release's buffer default is zeros, which would make every code the same)."""
    from processor.models.ctclip import CTClip
    from processor.models.ctclip_vocab import build_tokenizer

    torch.manual_seed(seed)
    with torch.device(device):
        model = CTClip(cfg, build_tokenizer(FIX / "vocab.txt"))
    with torch.no_grad():
        model.visual_transformer.vq._codebook.embed.normal_()
    return model


def ctclip_input(check: Check) -> torch.Tensor:
    """(1, Z, X, Y) float32 on the CPU: a synthetic chest (σ 15 HU noise) through the official
    preprocessing; built once per run."""
    if "ctclip_input" not in check.shared:
        from processor.models.ctclip_preprocess import preprocess_volume
        from tests.dicomgen import chest_phantom

        shape = (30, 48, 48) if check.tiny else (300, 512, 512)
        hu, _ = chest_phantom(shape)
        rng = np.random.default_rng(0)
        for k in range(shape[0]):
            hu[k] += rng.normal(0.0, 15.0, hu[k].shape).astype(np.float32)
        began = time.process_time()
        made = preprocess_volume(hu.transpose(2, 1, 0), (0.7, 0.7, 1.0), target_xyz(check))
        check.shared["ctclip_input"] = made
        check.shared["preprocess_cpu_s"] = round(time.process_time() - began, 3)
    tensor: torch.Tensor = check.shared["ctclip_input"]
    return tensor


# ------------------------------------------------------------------------------ 2. the fixture
def _fixture_outputs(check: Check, dtype: torch.dtype | None, volume: torch.Tensor) -> dict[str, np.ndarray]:
    from processor.models.ctclip import load_ctclip

    def load(name: str) -> Any:
        return load_ctclip(
            FIX / name, FIX / "vocab.txt", FIX / "small_config.json", check.device, autocast_dtype=dtype
        )

    model = load("small_ctclip.pt")
    inter = model.image_intermediates(volume)
    out = {
        "probs": model.zero_shot(volume).cpu().numpy(),
        "latent": model.image_latent_from_tokens(inter["tokens"]).cpu().numpy(),
        "vq": inter["vq_indices"].cpu().numpy(),
        "temporal_out": inter["temporal_out"].float().cpu().numpy(),
        "lipro": load("small_lipro.pt").classify(volume).cpu().numpy(),
    }
    return out


def fixture_section(check: Check) -> dict[str, Any]:
    import json

    from processor.models.device import tf32_enabled

    volume = torch.from_numpy(np.load(FIX / "e2e_preprocessed_1x24x32x32_float32.npy"))
    zero_shot = json.loads((FIX / "small_golden_zeroshot.json").read_text(encoding="utf-8"))
    golden = {
        "probs": np.array([[p["prob_present"] for p in zero_shot["per_pathology"]]]),
        "latent": np.load(FIX / "small_golden_image_latent_1x16.npy"),
        "vq": np.load(FIX / "small_golden_vq_indices_1x96.npy"),
        "temporal_out": np.load(FIX / "small_golden_temporal_out_16x6x48.npy"),
        "lipro": np.array(
            [json.loads((FIX / "small_lipro_expected.json").read_text(encoding="utf-8"))["sigmoid_probs"]]
        ),
    }
    result: dict[str, Any] = {"reference": "tests/fixtures/ct_clip: the official code's outputs on a CPU"}
    problems = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        got = _fixture_outputs(check, dtype, volume)
        row: dict[str, Any] = {
            "zero_shot_max_dp": float(np.abs(got["probs"] - golden["probs"]).max()),
            "lipro_max_dp": float(np.abs(got["lipro"] - golden["lipro"]).max()),
            "latent_max_abs_diff": float(np.abs(got["latent"] - golden["latent"]).max()),
            "latent_cosine": float((got["latent"] * golden["latent"]).sum() / np.linalg.norm(got["latent"])),
            "vq_codes_flipped": int((got["vq"] != golden["vq"]).sum()),
            "vq_codes": int(golden["vq"].size),
            "temporal_out_max_abs_diff": float(np.abs(got["temporal_out"] - golden["temporal_out"]).max()),
        }
        if name == "fp32":
            row["matches_reference"] = bool(  # the CPU tests' tolerance
                row["zero_shot_max_dp"] <= ATOL
                and row["lipro_max_dp"] <= ATOL
                and row["latent_max_abs_diff"] <= ATOL
                and row["vq_codes_flipped"] == 0
            )
            worst = max(row["zero_shot_max_dp"], row["lipro_max_dp"], row["latent_max_abs_diff"])
            if row["vq_codes_flipped"] or worst > FP32_FAIL:  # another summation order does not do this
                problems.append(
                    f"float32 on {check.device} is not float32 CT-CLIP (VQ flips or > {FP32_FAIL}): {row}"
                )
        else:
            row["within_docs_cpu_bounds"] = bool(
                row["zero_shot_max_dp"] <= BF16_BOUNDS["zero_shot_dp"]
                and row["lipro_max_dp"] <= BF16_BOUNDS["lipro_dp"]
                and row["vq_codes_flipped"] <= BF16_BOUNDS["vq_flips"]
                and row["latent_cosine"] >= BF16_BOUNDS["latent_cosine"]
            )
            row["docs_cpu_bounds"] = BF16_BOUNDS
        result[name] = row
        check.say(
            f"  fixture {name}: " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "docs_cpu_bounds")
        )
    result["tf32_after_run"] = tf32_enabled() if check.cuda else None
    result["problems"] = problems
    return result


# ------------------------------------------------------------------------------ 3. full size
def count_flops(cfg: Any, frames_hw: tuple[int, int, int]) -> int:
    """FLOPs of one ``encode_image`` (batch 1), counted on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from processor.models.ctclip import CTClip
    from processor.models.ctclip_vocab import build_tokenizer

    with torch.device("meta"):
        model = CTClip(cfg, build_tokenizer(FIX / "vocab.txt"))
    model.place(torch.device("meta"), None)
    with FlopCounterMode(display=False) as counter:
        model.encode_image(torch.empty(1, 1, *frames_hw, device="meta"))
    return int(counter.get_total_flops())


def _agreement(model: Any, x: torch.Tensor, a: tuple[Any, bool | None], b: tuple[Any, bool | None]) -> dict:
    """Latent cosine and VQ code agreement between two settings (autocast dtype, fused attention)."""
    outs = []
    for dtype, fused in (a, b):
        model.place(x.device, dtype, fused)
        inter = model.image_intermediates(x)
        outs.append((model.image_latent_from_tokens(inter["tokens"]), inter["vq_indices"]))
    (la, ia), (lb, ib) = outs
    return {
        "latent_cosine_min": round(float((la * lb).sum(-1).min()), 6),
        "latent_max_abs_diff": float((la - lb).abs().max()),
        "vq_agreement": round(float((ia == ib).float().mean()), 6),
        "vq_codes": int(ia.numel()),
    }


def full_ctclip_section(check: Check) -> dict[str, Any]:
    cfg = ctclip_config(check)
    x1 = ctclip_input(check)
    frames_hw = tuple(x1.shape[1:])
    try:
        flops: int | None = count_flops(cfg, frames_hw)  # type: ignore[arg-type]
    except (RuntimeError, TypeError, NotImplementedError) as exc:  # an auxiliary figure: report, go on
        check.say(f"  FLOPs not counted: {type(exc).__name__}: {exc}")
        flops = None
    model = random_ctclip(cfg, check.device)
    params = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {
        "architecture": "small reference (tiny)" if check.tiny else "CT-CLIP v2 official, random weights",
        "parameters": params,
        "input_shape": [1, 1, *frames_hw],
        "preprocess_cpu_s": check.shared.get("preprocess_cpu_s"),
        "gflop_per_study": None if flops is None else round(flops / 1e9, 3),
        "weights_gb_allocated": allocated_gb(check.device),
    }
    x1 = x1.to(check.device)
    runs: dict[str, Any] = {}
    for batch in (1, 2, 4):
        x = x1.unsqueeze(0).repeat(batch, 1, 1, 1, 1)
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            if check.left() <= 0:
                runs[f"{name}_batch{batch}"] = {"skipped": "the section's time budget ran out"}
                continue
            model.place(check.device, dtype)
            before = allocated_gb(check.device)
            reset_peak(check.device)

            def encode(x: torch.Tensor = x) -> torch.Tensor:
                return model.encode_image(x)  # type: ignore[no-any-return]

            seconds = time_calls(encode, check, repeats=5, warmup=2)
            row = summary(seconds)
            row["per_study_ms"] = round(row["median_ms"] / batch, 3)
            row["tflops"] = (
                None if flops is None else round(flops * batch / (row["median_ms"] / 1000) / 1e12, 2)
            )
            row["peak_gb"] = peak_gb(check.device)
            row["activation_peak_gb"] = (
                None if before is None or row["peak_gb"] is None else round(row["peak_gb"] - before, 3)
            )
            runs[f"{name}_batch{batch}"] = row
            check.say(f"  encode_image {name} batch {batch}: {row}")
        del x
    result["encode_image"] = runs
    for batch in (1, 2, 4):
        a, b = runs.get(f"fp32_batch{batch}", {}), runs.get(f"bf16_batch{batch}", {})
        if "median_ms" in a and "median_ms" in b:
            result.setdefault("bf16_speedup", {})[f"batch{batch}"] = round(a["median_ms"] / b["median_ms"], 3)
    x = x1.unsqueeze(0)
    result["fp32_vs_bf16"] = _agreement(model, x, (None, None), (torch.bfloat16, None))
    result["sdpa_vs_plain_fp32"] = _agreement(model, x, (None, True), (None, False))
    check.say(f"  fp32 vs bf16: {result['fp32_vs_bf16']}; SDPA vs plain: {result['sdpa_vs_plain_fp32']}")
    sdpa = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.place(check.device, dtype, fused_attention=True)
        with SdpaSpy() as spy:
            model.encode_image(x)
        sdpa += sdpa_report(spy, check, name)
    result["sdpa"] = sdpa
    for row in sdpa:
        check.say(
            f"  SDPA {row['where']} q{row['query_shape']} mask={row['mask'] is not None}: dispatcher picks {row['dispatcher_picks']}"
        )
    result["fused_attention_default"] = check.cuda  # place(): SDPA on CUDA, plain attention on the CPU
    return result


# ------------------------------------------------------------------------------ 4. copies
def copy_section(check: Check) -> dict[str, Any]:
    x = ctclip_input(check).contiguous()
    nbytes = x.numel() * x.element_size()
    result: dict[str, Any] = {"bytes": nbytes, "shape": list(x.shape)}

    def rate(seconds: list[float]) -> dict[str, Any]:
        row = summary(seconds)
        row["gb_per_s"] = round(nbytes / (row["median_ms"] / 1000) / 1e9, 2)
        return row

    dst = torch.empty_like(x, device=check.device)
    result["pageable_to_device"] = rate(
        time_calls(lambda: dst.copy_(x, non_blocking=True), check, repeats=10)
    )
    if not check.cuda:
        result["pinned"] = None
        result["note"] = "pinned memory needs CUDA: on the CPU the 'device' copy is a host memcpy"
        return result
    began = time.perf_counter()
    pinned = x.pin_memory()
    result["pin_memory_ms"] = round((time.perf_counter() - began) * 1000, 3)
    result["pinned_to_device"] = rate(
        time_calls(lambda: dst.copy_(pinned, non_blocking=True), check, repeats=10)
    )
    result["device_to_pinned"] = rate(
        time_calls(lambda: pinned.copy_(dst, non_blocking=True), check, repeats=10)
    )
    result["pinned_vs_pageable_speedup"] = round(
        result["pageable_to_device"]["median_ms"] / result["pinned_to_device"]["median_ms"], 3
    )
    return result
