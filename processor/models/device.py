"""Device and precision choices for model inference, kept in one place.

* ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`` turns a settings value into a
  ``torch.device``. Asking for CUDA on a machine without it is a :class:`ConfigError`;
  there is never a silent fallback to the CPU. A CUDA device comes with TF32 turned off.
* ``PRECISIONS`` names the precisions a model step may run at (``fp32``, ``bf16``, ``fp16``) and
  ``precision_dtype(name)`` gives the autocast dtype (``None`` for fp32: no autocast).
* ``default_autocast_dtype(device)`` is bfloat16 on CUDA and ``None`` (full float32) on CPU: the
  low-precision default of models that have one (the captioner's ``dtype: auto``). CT-CLIP does
  not use it: it runs float32 unless a step opts in (docs/precision.md).
* ``autocast_context(device, dtype)`` returns the matching ``torch.autocast`` context, or a
  no-op context when ``dtype`` is ``None``.
* ``exact_float32(device)`` turns TF32 off for cuBLAS matmuls and cuDNN convolutions when
  ``device`` is CUDA (process-wide torch settings, logged when they change) and returns whether
  TF32 is in use: ``False`` on CUDA, ``None`` on the CPU, where TF32 does not exist. Called where
  a CUDA device is resolved, and by each CT-CLIP step before it runs (which records the answer).
  ``disable_tf32()`` and ``tf32_enabled()`` set and read the flags on any device.
"""

from __future__ import annotations

import contextlib
import logging
import re
from contextlib import AbstractContextManager

import torch

from processor.errors import ConfigError

log = logging.getLogger(__name__)

_CUDA_SPEC = re.compile(r"^cuda(?::(\d+))?$")
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device) -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N`` (or a ``torch.device``) to a usable device.

    Raises ConfigError for an unknown spelling, for CUDA without CUDA, and for a CUDA index
    that does not exist. Resolving a CUDA device turns TF32 off (:func:`exact_float32`), so every
    float32 model of the process runs true float32 from the start, whatever ran first.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device.resolved spec=auto device=%s", device)
        exact_float32(device)
        return device
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.match(text)
    if match is None:
        raise ConfigError(f"device {spec!r} is not understood. Hint: use one of auto, cpu, cuda, cuda:N.")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {spec!r} was requested but CUDA is not available on this machine "
            f"(torch {torch.__version__}, built with CUDA: {torch.version.cuda}). "
            "Hint: set device to cpu (slow but exact) or auto, or install a CUDA build of torch."
        )
    index = int(match.group(1) or 0)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device {spec!r} was requested but only {count} CUDA device(s) exist. "
            f"Hint: use cuda:0 … cuda:{count - 1}."
        )
    device = torch.device("cuda", index)
    exact_float32(device)
    return device


def default_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA, exact float32 on CPU (the captioner's ``auto``; never CT-CLIP's)."""
    return torch.bfloat16 if device.type == "cuda" else None


def precision_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a precision name: fp32 → None (no autocast), bf16, fp16."""
    try:
        return PRECISIONS[name]
    except KeyError:
        raise ConfigError(
            f"precision {name!r} is not known. Fix: use one of {', '.join(PRECISIONS)}."
        ) from None


def precision_name(dtype: torch.dtype | None) -> str:
    """The precision name of an autocast dtype (None → fp32)."""
    return next(name for name, known in PRECISIONS.items() if known == dtype)


def tf32_enabled() -> bool:
    """Whether float32 matmuls (cuBLAS) or convolutions (cuDNN) may run in TF32 (readable on any device)."""
    try:
        return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # torch >= 2.9 when its new per-operator flags were set apart: cannot tell
        return True


def disable_tf32() -> None:
    """True float32 for cuBLAS matmuls and cuDNN convolutions (and RNNs); process-wide.

    TF32 keeps 10 mantissa bits: on Ampere and later it changes CT-CLIP's PEG Conv3d and
    projections by far more than float32 rounding. Fused attention (SDPA) stays on: its float32
    kernel does not read these flags and keeps float32 accuracy (3xTF32 on Ampere and later).
    Logged only when a flag changes, so once per process in practice.
    """
    before = tf32_enabled()
    torch.backends.cuda.matmul.allow_tf32 = False  # = torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    if before:
        log.info("device.tf32 matmul=off cudnn=off reason=float32 models run in true float32")


def exact_float32(device: torch.device) -> bool | None:
    """TF32 off when ``device`` is CUDA; returns whether TF32 is in use (None on the CPU: no TF32)."""
    if device.type != "cuda":
        return None
    disable_tf32()
    return tf32_enabled()


def check_autocast_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """Accept only None, bfloat16 or float16."""
    if dtype is not None and dtype not in AUTOCAST_DTYPES:
        raise ConfigError(
            f"autocast dtype {dtype} is not supported. Hint: use None, torch.bfloat16 or torch.float16."
        )
    return dtype


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager[object]:
    """The autocast context for ``device`` at ``dtype``; a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=check_autocast_dtype(dtype))
