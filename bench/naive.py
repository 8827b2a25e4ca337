"""The naive reference path the benchmark compares ctwatch against (what the replaced system did).

ZIP → extract every member to a temporary folder on disk (``zipfile.extractall``) → read every
file fully with ``pydicom.dcmread`` (pixels included) → keep the CT series with the most images →
sort by InstanceNumber → ``pixel_array.astype(float64) * slope + intercept`` per slice, stacked
into a float64 (z, y, x) volume. The CT-CLIP input is then made by the same
``ctrate_xyz_from_dicom`` + ``preprocess_volume`` ctwatch uses, so the two paths differ only in
how the HU volume is obtained.
"""

from __future__ import annotations

import tempfile
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.errors import InvalidDicomError

from bench.timing import Clock
from processor.models.ctclip_preprocess import TARGET_SHAPE_XYZ, ctrate_xyz_from_dicom, preprocess_volume


@dataclass
class NaiveVolume:
    hu: np.ndarray  # float64 (z, y, x), slices in InstanceNumber order
    spacing_zyx: tuple[float, float, float]
    affine: np.ndarray
    files_read: int


def naive_volume(zip_path: Path) -> NaiveVolume:
    with tempfile.TemporaryDirectory(prefix="ctwatch-naive-") as tmp:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        series: dict[str, list[pydicom.Dataset]] = defaultdict(list)
        files = 0
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                continue
            files += 1
            if ds.get("Modality") == "CT" and "PixelData" in ds:
                series[str(ds.SeriesInstanceUID)].append(ds)
        chosen = max(series.values(), key=len)
        chosen.sort(key=lambda ds: int(ds.InstanceNumber))
        hu = np.stack(
            [
                ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                for ds in chosen
            ]
        )
    spacing, affine = _geometry(chosen)
    return NaiveVolume(hu, spacing, affine, files)


def _geometry(datasets: list[pydicom.Dataset]) -> tuple[tuple[float, float, float], np.ndarray]:
    """Spacing (z, y, x) and the 4×4 LPS affine from the headers, as a plain script would do it."""
    orientation = np.asarray(datasets[0].ImageOrientationPatient, float)
    row, col = orientation[:3], orientation[3:]
    normal = np.cross(row, col)
    positions = np.asarray([ds.ImagePositionPatient for ds in datasets], float)
    d_row, d_col = (float(v) for v in datasets[0].PixelSpacing)
    dz = abs(float(np.median(np.diff(positions @ normal)))) if len(datasets) > 1 else 1.0
    affine = np.eye(4)
    affine[:3, 0] = row * d_col
    affine[:3, 1] = col * d_row
    affine[:3, 2] = (positions[-1] - positions[0]) / max(len(datasets) - 1, 1)
    affine[:3, 3] = positions[0]
    return (dz, d_row, d_col), affine


@dataclass
class NaiveRun:
    tensor: torch.Tensor
    volume: NaiveVolume
    ingest: tuple[float, float]  # (wall, cpu) ZIP → float64 HU volume
    preprocess: tuple[float, float]  # (wall, cpu) HU volume → CT-CLIP tensor


def naive_tensor(zip_path: Path, target_xyz: tuple[int, int, int] = TARGET_SHAPE_XYZ) -> NaiveRun:
    """ZIP → CT-CLIP input tensor (1, Z, X, Y) the naive way, with the split at the HU volume."""
    clock = Clock()
    volume = naive_volume(zip_path)
    ingest = clock.lap()
    hu_xyz, spacing_xyz = ctrate_xyz_from_dicom(volume.hu, volume.spacing_zyx, volume.affine)
    tensor = preprocess_volume(hu_xyz, spacing_xyz, target_xyz)
    return NaiveRun(tensor, volume, ingest, clock.lap())
