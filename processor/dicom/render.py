"""Key-slice previews: deterministic choice of axial levels, CT windowing, radiological orientation, PNG.

* Levels: ``count`` slices evenly inside the lungs' z extent (from the lung mask; the whole
  volume when there is none): slice ``lo + round((hi − lo)·n/(count + 1))`` for n = 1..count.
* Windows: ``lung`` W1500/L−600, ``mediastinal`` W350/L40 (``bone`` W2000/L500 also known).
  ``uint8 = clip(round((HU − (L − W/2)) / W · 255), 0, 255)``, in float32.
* Orientation: radiological — viewed from the feet, patient left on the image right, anterior at
  the top. The image's columns are made to run towards patient left (+x in LPS) and its rows
  towards posterior (+y), by transposing and flipping according to the volume's direction cosines.
* PNG: Pillow, 8-bit grayscale, no timestamps, so identical input gives identical bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from processor.atomic import write_bytes_atomic

log = logging.getLogger(__name__)

WINDOWS: dict[str, tuple[float, float]] = {  # name -> (width, level) in HU
    "lung": (1500.0, -600.0),
    "mediastinal": (350.0, 40.0),
    "bone": (2000.0, 500.0),
}


@dataclass(frozen=True)
class Orientation:
    """How a stored slice is turned into a radiological view."""

    transpose: bool
    flip_lr: bool
    flip_ud: bool

    def as_dict(self) -> dict:
        return {"transposed": self.transpose, "flipped_left_right": self.flip_lr,
                "flipped_up_down": self.flip_ud}


def radiological_orientation(row_cosines: Sequence[float], column_cosines: Sequence[float]) -> Orientation:
    """Transpose/flips that make image columns run to patient left and rows to posterior."""
    row = np.asarray(row_cosines, float)
    col = np.asarray(column_cosines, float)
    transpose = abs(row[1]) > abs(row[0])  # stored columns run mostly anterior–posterior
    across, down = (col, row) if transpose else (row, col)
    return Orientation(bool(transpose), bool(across[0] < 0), bool(down[1] < 0))


def orient(image: np.ndarray, how: Orientation) -> np.ndarray:
    out = image.T if how.transpose else image
    if how.flip_lr:
        out = out[:, ::-1]
    if how.flip_ud:
        out = out[::-1, :]
    return np.ascontiguousarray(out)


def window(hu: np.ndarray, width: float, level: float) -> np.ndarray:
    """HU → uint8 with the given window (float32 arithmetic, round half to even)."""
    low = np.float32(level - width / 2.0)
    scaled = (hu.astype(np.float32, copy=False) - low) * np.float32(255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def choose_levels(count: int, depth: int, mask: np.ndarray | None = None) -> tuple[list[int], str]:
    """``count`` slice indices evenly inside the lung z-extent; and how the extent was found."""
    lo, hi, how = 0, depth - 1, "whole volume (no lung mask)"
    if mask is not None:
        present = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))
        if len(present):
            lo, hi, how = int(present[0]), int(present[-1]), "lung mask z-extent"
        else:
            how = "whole volume (lung mask empty)"
    return [lo + round((hi - lo) * n / (count + 1)) for n in range(1, count + 1)], how


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` atomically; return its sha256."""
    write_bytes_atomic(path, data)
    return hashlib.sha256(data).hexdigest()
