"""Generate real DICOM series for tests, starting from pydicom's CT_small.dcm.

Every dataset is a full copy of CT_small.dcm with new UIDs, positions and (optionally) pixels, so
the files are as real as the sample: same VRs, private tags, transfer syntax and patient fields.
"""

from __future__ import annotations

import copy
import io
import random
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_SMALL = get_testdata_file("CT_small.dcm")
PATIENT_NAME = "CompressedSamples^CT1"
PATIENT_ID = "1CT1"


def base_dataset() -> Dataset:
    return pydicom.dcmread(CT_SMALL)


def make_series(n: int = 24, *, study_uid: str | None = None, series_uid: str | None = None,
                spacing: float = 2.5, thickness: float | None = None,
                orientation: Sequence[float] = (1, 0, 0, 0, 1, 0), origin: Sequence[float] = (0, 0, 0),
                modality: str = "CT", image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
                series_number: int = 2, description: str = "CHEST", kernel: str = "STANDARD",
                stored: np.ndarray | None = None, pixel_spacing: float = 0.66,
                accession: str = "ACC12345", patient_name: str = PATIENT_NAME,
                slope: float = 1.0, intercept: float = -1024.0) -> list[Dataset]:
    """A series of ``n`` slices. ``stored`` (n, rows, cols) int16 replaces the sample pixels."""
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    row = np.asarray(orientation[:3], float)
    col = np.asarray(orientation[3:], float)
    normal = np.cross(row, col)
    frame_uid = generate_uid()
    template = base_dataset()
    datasets = []
    for k in range(n):
        ds = copy.deepcopy(template)
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.ConvolutionKernel = kernel
        ds.AccessionNumber = accession
        ds.PatientName = patient_name
        ds.InstanceNumber = k + 1
        ds.SliceThickness = thickness if thickness is not None else spacing
        ds.SpacingBetweenSlices = spacing
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        position = np.asarray(origin, float) + normal * spacing * k
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position @ normal), 4)
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        if stored is not None:
            _set_pixels(ds, stored[k])
        datasets.append(ds)
    return datasets


def _set_pixels(ds: Dataset, frame: np.ndarray) -> None:
    frame = np.ascontiguousarray(frame, dtype=np.int16)
    ds.Rows, ds.Columns = frame.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = frame.tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write_zip(path: Path, datasets: Iterable[Dataset], *, folder: str = "DICOM",
              shuffle_seed: int | None = None, extension: str = ".dcm",
              extra: dict[str, bytes] | None = None) -> Path:
    """A ZIP of the datasets (names ``folder/IMG0001.dcm``), optionally shuffled, plus extra members."""
    items = [(f"{folder}/IMG{i + 1:04d}{extension}", to_bytes(ds)) for i, ds in enumerate(datasets)]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in items:
            zf.writestr(name, data)
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def write_folder(folder: Path, datasets: Iterable[Dataset], extension: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, ds in enumerate(datasets):
        (folder / f"IM{i + 1:05d}{extension}").write_bytes(to_bytes(ds))
    return folder
