"""What every section of ``bench/gpu_check.py`` shares: the run's settings, device timing, peak
memory, and which fused-attention (SDPA) kernel ran.

* Timing on CUDA uses CUDA events recorded around the call on the current stream
  (``torch.cuda.Event(enable_timing=True)``, the event's ``synchronize`` before reading), after
  warm-up calls, so module loading, cuBLAS/cuDNN handle creation and autotuning stay out of the
  numbers; on the CPU, ``time.perf_counter``. Medians are reported (METHOD.md of the device notes).
* Peak memory is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (the
  caching allocator's live tensors, not what ``nvidia-smi`` shows); ``None`` on the CPU.
* :class:`SdpaSpy` is a ``TorchFunctionMode`` that sees every
  ``torch.nn.functional.scaled_dot_product_attention`` call of a forward pass, keeps one call of
  each shape, and :func:`sdpa_report` asks torch's dispatcher which backend it picks for it
  (``torch._fused_sdp_choice``, what ``scaled_dot_product_attention`` itself consults) and tries
  each backend alone (``torch.nn.attention.sdpa_kernel([backend])``): accepted (with its median
  time) or refused (with torch's reason).
"""

from __future__ import annotations

import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


@dataclass
class Check:
    """The run's settings, handed to every section."""

    device: torch.device
    tiny: bool
    out: Path
    say: Callable[[str], None]
    studies: int = 8
    deadline: float = math.inf  # time.monotonic() by which the running section should end
    shared: dict[str, Any] = field(default_factory=dict)  # inputs several sections reuse

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def reps(self, n: int) -> int:
        """Timed repeats: ``n``, or 2 with ``--tiny`` (its figures only show that the code runs)."""
        return min(n, 2) if self.tiny else n


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], check: Check, *, repeats: int = 5, warmup: int = 1) -> list[float]:
    """Seconds of each timed call of ``fn`` (CUDA events on CUDA); stops early at the section's
    deadline, after at least one timed call."""
    for _ in range(warmup):
        fn()
    sync(check.device)
    out: list[float] = []
    for _ in range(check.reps(repeats)):
        if out and check.left() <= 0:
            break
        if check.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000.0)
        else:
            began = time.perf_counter()
            fn()
            out.append(time.perf_counter() - began)
    return out


def wall_calls(fn: Callable[[], object], check: Check, *, repeats: int = 3, warmup: int = 0) -> list[float]:
    """Wall seconds of each call (host clock, device synchronised before and after): for calls
    that do host work between launches, such as ``generate``."""
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(check.reps(repeats)):
        if out and check.left() <= 0:
            break
        sync(check.device)
        began = time.perf_counter()
        fn()
        sync(check.device)
        out.append(time.perf_counter() - began)
    return out


def summary(seconds: list[float], scale: float = 1000.0, unit: str = "ms") -> dict[str, Any]:
    """Median and minimum of timed calls (milliseconds by default) and how many there were."""
    return {
        f"median_{unit}": round(statistics.median(seconds) * scale, 3),
        f"min_{unit}": round(min(seconds) * scale, 3),
        "n": len(seconds),
    }


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak of live CUDA tensors since :func:`reset_peak`, in GB (10⁹ bytes); None on the CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)


def allocated_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return round(torch.cuda.memory_allocated(device) / 1e9, 3)


def free_device_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ SDPA
_BACKENDS = {b.value: name for name, b in SDPBackend.__members__.items()}
_TRIED = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


class SdpaSpy(TorchFunctionMode):
    """Keeps one ``scaled_dot_product_attention`` call per (query shape, mask or not), with its
    tensors as the kernel receives them: cast to the autocast dtype when autocast is on."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[tuple[Any, ...], dict[str, Any]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            key = (tuple(q.shape), mask is not None)
            if key not in self.calls:
                kind = q.device.type
                amp = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None

                def kept(t: torch.Tensor | None) -> torch.Tensor | None:
                    if t is None:
                        return None
                    return (t.to(amp) if amp is not None and t.is_floating_point() else t).clone()

                self.calls[key] = {
                    "q": kept(q),
                    "k": kept(k),
                    "v": kept(v),
                    "mask": kept(mask),
                    "scale": kwargs.get("scale"),
                }
        return func(*args, **kwargs)


def sdpa_report(spy: SdpaSpy, check: Check, label: str) -> list[dict[str, Any]]:
    """For each kept call: shapes, dtype, the backend torch's dispatcher picks, and each backend
    tried alone (accepted with its median time, or refused with torch's reason)."""
    rows = []
    for call in spy.calls.values():
        q, k, v, mask, scale = call["q"], call["k"], call["v"], call["mask"], call["scale"]
        row: dict[str, Any] = {
            "where": label,
            "query_shape": list(q.shape),
            "dtype": str(q.dtype).removeprefix("torch."),
            "mask": None
            if mask is None
            else {"shape": list(mask.shape), "dtype": str(mask.dtype).removeprefix("torch.")},
        }
        try:
            choice = int(torch._fused_sdp_choice(q, k, v, mask, 0.0, False, scale=scale))
            row["dispatcher_picks"] = _BACKENDS.get(choice, str(choice))
        except (AttributeError, RuntimeError, TypeError) as exc:  # a private API: may move
            row["dispatcher_picks"] = f"unknown ({type(exc).__name__}: {exc})"
        row["backends_alone"] = {name: _alone(getattr(SDPBackend, name), call, check) for name in _TRIED}
        rows.append(row)
    return rows


def _alone(backend: Any, call: dict[str, Any], check: Check) -> dict[str, Any]:
    """One kept call under one SDPA backend only: its median time, or torch's reason for refusing."""

    def attend() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(
                call["q"], call["k"], call["v"], attn_mask=call["mask"], scale=call["scale"]
            )

    with warnings.catch_warnings(record=True) as said, torch.inference_mode():
        warnings.simplefilter("always")
        try:
            seconds = time_calls(attend, check, repeats=10, warmup=1)
        except RuntimeError as exc:
            reasons = [str(w.message).split("(Triggered internally")[0].strip() for w in said]
            return {"accepted": False, "reason": "; ".join(reasons) or str(exc)[:300]}
    return {"accepted": True, **summary(seconds, 1e6, "us")}
