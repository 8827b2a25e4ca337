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


def make_series(
    n: int = 24,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    spacing: float = 2.5,
    thickness: float | None = None,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (0, 0, 0),
    modality: str = "CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    series_number: int = 2,
    description: str = "CHEST",
    kernel: str = "STANDARD",
    stored: np.ndarray | None = None,
    pixel_spacing: float = 0.66,
    accession: str = "ACC12345",
    patient_name: str = PATIENT_NAME,
    slope: float = 1.0,
    intercept: float = -1024.0,
) -> list[Dataset]:
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


def write_zip(
    path: Path,
    datasets: Iterable[Dataset],
    *,
    folder: str = "DICOM",
    shuffle_seed: int | None = None,
    extension: str = ".dcm",
    extra: dict[str, bytes] | None = None,
) -> Path:
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


# --- issue 3: encodings, enhanced multi-frame CT, scouts, MR, phantoms -------------------------

ENCODINGS = ("native", "rle", "jpeg-ls", "jpeg2000", "jpeg-lossless")


def encode(ds: Dataset, encoding: str) -> Dataset:
    """A copy of ``ds`` with its pixels re-encoded losslessly (``native`` keeps them as they are).

    RLE, JPEG-LS and JPEG 2000 use pydicom's encoders (pydicom/pylibjpeg-rle, pyjpegls,
    pylibjpeg-openjpeg); JPEG lossless (process 14, SV1) has no Python encoder, so
    :func:`jpeg_lossless_sv1` writes the codestream here.
    """
    out = copy.deepcopy(ds)
    if encoding == "native":
        return out
    if encoding == "jpeg-lossless":
        frames = out.pixel_array.reshape(-1, int(out.Rows), int(out.Columns))
        _set_encapsulated(out, [jpeg_lossless_sv1(f) for f in frames], pydicom.uid.JPEGLosslessSV1)
        return out
    uid = {
        "rle": pydicom.uid.RLELossless,
        "jpeg-ls": pydicom.uid.JPEGLSLossless,
        "jpeg2000": pydicom.uid.JPEG2000Lossless,
    }[encoding]
    out.compress(uid, generate_instance_uid=False)
    return out


def _set_encapsulated(ds: Dataset, frames: list[bytes], uid: str) -> None:
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = uid


def jpeg_lossless_sv1(frame: np.ndarray, point_transform: int = 0) -> bytes:
    """Encode one 16-bit frame as JPEG lossless, process 14, selection value 1 (left predictor).

    Huffman table: the 17 difference categories get fixed 5-bit codes (valid: no all-ones code).
    Samples are the 16-bit patterns of the stored values, as DICOM stores signed pixels.
    ``point_transform`` Pt > 0 codes the samples divided by 2^Pt (ITU-T T.81 H.1.2.1: the first
    prediction is then 2^(15 − Pt)); a decoder gives them back multiplied by 2^Pt.
    """
    a = (frame.astype(np.int64) & 0xFFFF) >> point_transform
    rows, cols = a.shape
    pred = np.empty_like(a)
    pred[0, 0] = 1 << (15 - point_transform)
    pred[0, 1:] = a[0, :-1]
    pred[1:, 0] = a[:-1, 0]
    pred[1:, 1:] = a[1:, :-1]
    diff = (a - pred) & 0xFFFF
    diff = np.where(diff > 32768, diff - 65536, diff).ravel().tolist()
    acc, nbits, out = 0, 0, bytearray()
    for d in diff:
        ssss = abs(d).bit_length()
        acc = (acc << 5) | ssss
        nbits += 5
        if 0 < ssss < 16:
            acc = (acc << ssss) | ((d if d > 0 else d - 1) & ((1 << ssss) - 1))
            nbits += ssss
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0)
        acc &= (1 << nbits) - 1
    if nbits:
        byte = ((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF
        out += bytes([byte, 0]) if byte == 0xFF else bytes([byte])
    sof = b"\xff\xc3\x00\x0b\x10" + rows.to_bytes(2, "big") + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    dht = b"\xff\xc4\x00\x24\x00" + bytes([0, 0, 0, 0, 17] + [0] * 11) + bytes(range(17))
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x01\x00" + bytes([point_transform])
    return b"\xff\xd8" + sof + dht + sos + bytes(out) + b"\xff\xd9"


def jpeg_baseline(ds: Dataset, quality: int = 95) -> Dataset:
    """A copy of an 8-bit unsigned ``ds`` encoded as JPEG baseline (lossy) with Pillow."""
    from PIL import Image

    out = copy.deepcopy(ds)
    buf = io.BytesIO()
    Image.fromarray(out.pixel_array.astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    _set_encapsulated(out, [buf.getvalue()], pydicom.uid.JPEGBaseline8Bit)
    return out


def to_8bit(ds: Dataset, slope: float = 8.0, intercept: float = -1024.0) -> Dataset:
    """A copy with 8-bit unsigned pixels holding the same HU, coarsely (HU = stored·slope + intercept)."""
    out = copy.deepcopy(ds)
    hu = out.pixel_array * float(out.RescaleSlope) + float(out.RescaleIntercept)
    stored = np.clip(np.rint((hu - intercept) / slope), 0, 255).astype(np.uint8)
    out.BitsAllocated = out.BitsStored = 8
    out.HighBit = 7
    out.PixelRepresentation = 0
    out.RescaleSlope, out.RescaleIntercept = slope, intercept
    out.PixelData = stored.tobytes()
    return out


def make_enhanced(datasets: Sequence[Dataset], *, shuffle_seed: int | None = None) -> Dataset:
    """One Enhanced CT Image (multi-frame) holding the frames of a classic series.

    Geometry and rescale move into functional groups: orientation, pixel measures and kernel are
    shared; position, frame content and (when it varies) rescale are per frame. With
    ``shuffle_seed`` the frames are stored in a shuffled order.
    """
    order = list(range(len(datasets)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    first = datasets[0]
    out = copy.deepcopy(first)
    sop = generate_uid()
    out.SOPClassUID = out.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedCTImageStorage
    out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = sop
    out.ImageType = [*list(first.ImageType)[:3], "NONE"][:4]
    out.NumberOfFrames = len(datasets)
    out.InstanceNumber = 1
    for keyword in (
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "SliceThickness",
        "RescaleSlope",
        "RescaleIntercept",
        "SliceLocation",
        "ConvolutionKernel",
    ):
        if keyword in out:
            delattr(out, keyword)
    rescales = {(float(d.RescaleSlope), float(d.RescaleIntercept)) for d in datasets}
    shared = Dataset()
    shared.PixelMeasuresSequence = [
        sequence_item(PixelSpacing=list(first.PixelSpacing), SliceThickness=first.SliceThickness)
    ]
    shared.PlaneOrientationSequence = [
        sequence_item(ImageOrientationPatient=list(first.ImageOrientationPatient))
    ]
    shared.CTReconstructionSequence = [sequence_item(ConvolutionKernel=first.ConvolutionKernel)]
    if len(rescales) == 1:
        shared.PixelValueTransformationSequence = [_rescale_item(first)]
    out.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for position, k in enumerate(order):
        item = Dataset()
        item.PlanePositionSequence = [
            sequence_item(ImagePositionPatient=list(datasets[k].ImagePositionPatient))
        ]
        item.FrameContentSequence = [sequence_item(StackID="1", InStackPositionNumber=position + 1)]
        if len(rescales) > 1:
            item.PixelValueTransformationSequence = [_rescale_item(datasets[k])]
        per_frame.append(item)
    out.PerFrameFunctionalGroupsSequence = per_frame
    out.PixelData = b"".join(datasets[k].PixelData for k in order)
    return out


def sequence_item(**values: object) -> Dataset:
    """A sequence item (a Dataset) holding the given keyword values."""
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _rescale_item(ds: Dataset) -> Dataset:
    return sequence_item(RescaleSlope=ds.RescaleSlope, RescaleIntercept=ds.RescaleIntercept, RescaleType="HU")


def make_scout(*, study_uid: str, series_number: int = 1) -> list[Dataset]:
    """A one-image localizer (ImageType LOCALIZER, coronal)."""
    return make_series(
        1,
        study_uid=study_uid,
        series_number=series_number,
        description="Topogram",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        orientation=(1, 0, 0, 0, 0, -1),
    )


def make_mr_series(n: int = 24, **kwargs: object) -> list[Dataset]:
    """An MR series (MR Image Storage, modality MR) with CT_small's geometry."""
    datasets = make_series(n, modality="MR", **kwargs)  # type: ignore[arg-type]
    for ds in datasets:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.MRImageStorage
    return datasets


def chest_phantom(
    shape: tuple[int, int, int] = (40, 96, 96), *, laa_top: float = 0.3, left_marker: bool = False
) -> tuple[np.ndarray, dict]:
    """A synthetic chest in HU (z, y, x): air, an elliptic body (40 HU), two lungs (−850 HU) with
    a vessel (40 HU) each; the left lung's top part (above ``laa_top`` of its half-height) is
    emphysema (−980 HU).

    Image columns run to patient left (standard axial orientation), so the left lung is at high x.
    Returns the HU array and the truth: lung voxel count (vessels included), voxels < −950 HU and
    the mean lung density.
    With ``left_marker`` a bright bone-density marker sits in the body wall on the patient's left.
    """
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    hu = np.full(shape, -1000.0, np.float32)
    body = ((y - ny / 2) / (ny * 0.42)) ** 2 + ((x - nx / 2) / (nx * 0.46)) ** 2 <= 1
    hu[np.broadcast_to(body, shape)] = 40.0
    zc, zr = nz / 2, nz * 0.38
    lungs = np.zeros(shape, bool)
    for cx in (nx * 0.30, nx * 0.70):
        lungs |= ((z - zc) / zr) ** 2 + ((y - ny / 2) / (ny * 0.28)) ** 2 + ((x - cx) / (nx * 0.14)) ** 2 <= 1
    hu[lungs] = -850.0
    for cx in (nx * 0.30, nx * 0.70):  # a vessel along z through each lung: a hole in every slice
        vessel = ((y - ny / 2) ** 2 + (x - round(cx)) ** 2 <= 2) & lungs
        hu[vessel] = 40.0
    emphysema = lungs & (x > nx / 2) & (z >= zc + zr * laa_top) & (hu < -800)
    hu[emphysema] = -980.0
    if left_marker:
        hu[:, ny // 2 - 3 : ny // 2 + 3, int(nx * 0.90) : int(nx * 0.93)] = 1500.0
    return hu, {
        "lung_voxels": int(lungs.sum()),
        "laa_voxels": int((hu[lungs] < -950).sum()),
        "mean_lung_density_hu": float(hu[lungs].mean(dtype=np.float64)),
    }


def run_steps(arrival: Path, steps: list[dict], out_root: Path) -> tuple:
    """Run pipeline ``steps`` through the real engine on the first study of an arrival (ZIP/folder).

    Returns ``(ctx, outcome)``; ``ctx.out_dir`` is ``out_root/outbox/<date>/<StudyUID>``.
    """
    from processor.dicom.scan import scan_members
    from processor.intake.archive import Limits, open_arrival
    from processor.pipeline.runner import PipelineRunner
    from processor.pipeline.spec import Pipeline, PipelineSpec, compile_steps
    from processor.pipeline.step import StepEnv, StudyContext
    from processor.steps import default_registry

    spec = PipelineSpec.model_validate({"name": "test", "version": 1, "steps": steps})
    compiled, problems = compile_steps(spec, default_registry(), StepEnv(root=out_root))
    assert not problems, problems
    pipeline = Pipeline("test", 1, "skip", tuple(compiled), out_root / "pipeline.yaml", "test")
    with open_arrival(arrival, Limits()) as contents:
        study = scan_members(contents.members).studies[0]
        ctx = StudyContext(1, study, out_root / "outbox" / "2024-01-01" / study.uid)
        outcome = PipelineRunner(pipeline).run(ctx)
    return ctx, outcome


# --- issue 13: foreign objects under a CT series' UID -----------------------------------------------


def make_rtstruct(*, study_uid: str, series_uid: str) -> Dataset:
    """An RT Structure Set (no pixels) carrying the given Study/Series Instance UIDs."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import RTStructureSetStorage

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.Modality = "RTSTRUCT"
    ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
    ds.StructureSetLabel = "LUNGS"
    ds.SeriesNumber = 2
    return ds


def make_secondary_capture(like: Dataset) -> Dataset:
    """A Secondary Capture image (a screenshot) under ``like``'s study and series UIDs."""
    ds = copy.deepcopy(like)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    del ds.ImagePositionPatient
    del ds.ImageOrientationPatient
    return ds


# --- issue 13 (one reader rule): files whose header and bytes disagree about the encoding ------------

IMPLICIT, EXPLICIT, DEFLATED, BIG = "implicit", "explicit", "deflated", "big-endian"
_SYNTAX_OF = {
    IMPLICIT: pydicom.uid.ImplicitVRLittleEndian,
    EXPLICIT: ExplicitVRLittleEndian,
    DEFLATED: pydicom.uid.DeflatedExplicitVRLittleEndian,
    BIG: pydicom.uid.ExplicitVRBigEndian,
}


def encoded_bytes(
    ds: Dataset, *, body: str, declared: str | None = "same", preamble: bool = True, meta: bool = True
) -> bytes:
    """``ds`` as a file whose data set is encoded as ``body`` (one of IMPLICIT, EXPLICIT, DEFLATED,
    BIG) while its file meta declares ``declared``: "same" (honest), a syntax UID, or None (a meta
    group without TransferSyntaxUID). ``preamble``/``meta`` False leave out the 128-byte preamble
    and ``DICM``, or the whole file meta group (a bare data set). A BIG body gets byte-swapped
    16-bit pixels, as a big-endian writer stores them.
    """
    import zlib

    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    if preamble:
        out.write(b"\0" * 128 + b"DICM")
    if meta:
        file_meta = FileMetaDataset()
        file_meta.FileMetaInformationGroupLength = 0  # written with its true value
        file_meta.FileMetaInformationVersion = b"\0\1"
        file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if declared is not None:
            file_meta.TransferSyntaxUID = _SYNTAX_OF[body] if declared == "same" else declared
        file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
        write_file_meta_info(out, file_meta, enforce_standard=False)
    plain = Dataset()
    for element in ds:  # a fresh data set: pydicom writes it in any encoding asked
        plain.add(copy.deepcopy(element))
    if body == BIG and "PixelData" in plain:
        plain.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
        plain["PixelData"].VR = "OW"
    data = DicomBytesIO()
    data.is_little_endian, data.is_implicit_VR = body != BIG, body == IMPLICIT
    write_dataset(data, plain)
    encoded = data.getvalue()
    if body == DEFLATED:
        packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        encoded = packer.compress(encoded) + packer.flush()
    return out.getvalue() + encoded


def pixel_length_at(data: bytes) -> tuple[int, int]:
    """(where the Pixel Data length field of a little-endian file starts, its value)."""
    import struct

    at = data.rindex(b"\xe0\x7f\x10\x00")
    field = at + 8 if data[at + 4 : at + 6] in (b"OB", b"OW") else at + 4
    return field, struct.unpack_from("<L", data, field)[0]


def with_pixel_length(data: bytes, length: int) -> bytes:
    """``data`` (a little-endian file ending in its Pixel Data) with that element declaring ``length``
    bytes and holding as many: pixels cut off or zero bytes added, and the header saying so."""
    import struct

    field, old = pixel_length_at(data)
    value = data[field + 4 : field + 4 + old]
    value = value[:length] + bytes(max(0, length - len(value)))
    return data[:field] + struct.pack("<L", length) + value


def small_series(n: int = 3, size: int = 8, *, seed: int = 13) -> tuple[list[Dataset], np.ndarray]:
    """``n`` slices of ``size``×``size`` random signed pixels (intercept −1024) and the HU they give.

    Small frames matter: a Pixel Data view that starts a few bytes off still finds enough bytes in
    a small file, so only exact values catch a misread encoding.
    """
    stored = np.random.default_rng(seed).integers(-2000, 3000, (n, size, size)).astype(np.int16)
    return make_series(n, stored=stored, intercept=-1024.0), stored.astype(np.float32) - np.float32(1024.0)
