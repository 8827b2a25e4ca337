"""Device and precision choices for model inference, kept in one place.

* ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")`` turns a settings value into a
  ``torch.device``. Asking for CUDA on a machine without it is a :class:`ConfigError`;
  there is never a silent fallback to the CPU.
* ``default_autocast_dtype(device)`` is bfloat16 on CUDA and ``None`` (full float32) on CPU.
* ``autocast_context(device, dtype)`` returns the matching ``torch.autocast`` context, or a
  no-op context when ``dtype`` is ``None``.
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


def resolve_device(spec: str | torch.device) -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N`` (or a ``torch.device``) to a usable device.

    Raises ConfigError for an unknown spelling, for CUDA without CUDA, and for a CUDA index
    that does not exist.
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = str(spec).strip().lower()
    if text == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device.resolved spec=auto device=%s", device)
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
    return torch.device("cuda", index)


def default_autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 autocast on CUDA, exact float32 on CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


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
