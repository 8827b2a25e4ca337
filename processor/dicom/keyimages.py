"""Key images and the PDF report as DICOM objects a PACS shows beside the study.

* :func:`build_key_image`: a key slice as a Secondary Capture Image (PS3.3 A.8.1, built with
  highdicom's :class:`~highdicom.sc.SCImage`), RGB, with a banner burned in above the image
  ("AI-generated - not for diagnosis", BurnedInAnnotation YES) and, when a lung mask is given, the
  lung outline drawn in yellow. The banner is a strip added *above* the slice, so it hides no
  anatomy; the slice's own pixels are unchanged below it.
* :func:`build_encapsulated_pdf`: the report PDF as an Encapsulated PDF (PS3.3 A.45.1). highdicom
  has no class for this IOD, so it is built here with pydicom, module by module.

Orientation: the slice comes as :mod:`processor.dicom.render` writes it — radiological, viewed
from the feet: columns run towards the patient's left, rows towards posterior. PatientOrientation
(PS3.3 C.7.6.1.1.1: the direction of the rows, then of the columns) is therefore ``["L", "P"]``.
Pixel spacing: render's previews have square pixels of side ``pixel_mm`` when the spacing is
known; PixelSpacing is then ``[pixel_mm, pixel_mm]``, and left out (never guessed) when it is not.

The banner's font is Pillow's built-in scalable font (``ImageFont.load_default(size=…)``, Aileron,
no system font needed). It has no glyph for the em dash (U+2014), so the banner reads
"AI-generated - not for diagnosis"; any other character the font lacks is replaced the same way.

Both objects: same Study Instance UID as the input, the given series and SOP Instance UIDs, the
Patient and General Study modules copied unchanged from ``source.header``.
"""

from __future__ import annotations

import copy
import math
from datetime import datetime

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from processor.dicom.sendback import SourceStudy

__all__ = ["BANNER", "OUTLINE_RGB", "build_encapsulated_pdf", "build_key_image"]

BANNER = "AI-generated — not for diagnosis"
BANNER_RGB = (150, 0, 0)  # dark red strip, white text
OUTLINE_RGB = (255, 255, 0)  # yellow: stands out on grey in any window
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"  # SOP Class UID
_MISSING = "\uffff"  # a noncharacter: no font has it, so its mask is the font's "missing" box


def build_key_image(
    source: SourceStudy,
    image: np.ndarray,
    *,
    pixel_mm: float | None,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    description: str,
    outline: np.ndarray | None = None,
    manufacturer: str = "ctwatch",
) -> Dataset:
    """A Secondary Capture of one key slice with the banner (and the lung outline) burned in.

    ``image``: uint8 (rows, cols), windowed, radiological orientation; ``pixel_mm``: the side of
    its square pixels in mm, or None when unknown; ``outline``: a bool mask of the same shape (the
    lungs), drawn as its 1-pixel boundary; ``description``: ImageComments (which window, level).
    The result has rows + banner height rows. Raises ValueError on a wrong shape or type.
    """
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"a key image must be uint8 (rows, cols); got {image.dtype} {image.shape}")
    if outline is not None and outline.shape != image.shape:
        raise ValueError(f"the outline mask is {outline.shape}, the image {image.shape}: they must match")
    if pixel_mm is not None and not (math.isfinite(pixel_mm) and pixel_mm > 0):
        raise ValueError(f"pixel_mm must be a positive number of mm or None, not {pixel_mm!r}")
    rgb = np.repeat(image[:, :, None], 3, axis=2)
    if outline is not None:
        rgb[_boundary(outline.astype(bool))] = OUTLINE_RGB
    pixels = np.concatenate([_banner(image.shape[1]), rgb], axis=0)
    now = datetime.now()
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=source.study_uid,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_orientation=("L", "P"),
        pixel_spacing=(float(pixel_mm), float(pixel_mm)) if pixel_mm is not None else None,
        series_description="ctwatch key images - AI-generated, not for diagnosis",
        content_date=now.date(),
        content_time=now.time(),
    )
    sc.BurnedInAnnotation = "YES"
    sc.BodyPartExamined = "CHEST"  # unpaired: Laterality (General Series, Type 2C) stays absent
    sc.ImageComments = description
    _copy_header(sc, source)
    return sc


def build_encapsulated_pdf(
    source: SourceStudy,
    pdf: bytes,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int,
    title: str,
    manufacturer: str = "ctwatch",
    software_versions: str | None = None,
) -> Dataset:
    """The Encapsulated PDF IOD (PS3.3 A.45.1) holding ``pdf``, with file meta (Explicit VR LE).

    BurnedInAnnotation is "YES": the report names the study. Raises ValueError when ``pdf`` does
    not start like a PDF ("%PDF-").
    """
    if not pdf.startswith(b"%PDF-"):
        raise ValueError("the report is not a PDF (it does not start with %PDF-)")
    now = datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(ENCAPSULATED_PDF)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    # Patient, General Study and Patient Study modules: Type 2 attributes empty unless the input has them
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
        setattr(ds, keyword, "")
    for keyword in ("StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber"):
        setattr(ds, keyword, "")
    ds.StudyInstanceUID = source.study_uid
    # Encapsulated Document Series module (C.24.1)
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "ctwatch report - AI-generated, not for diagnosis"
    # General Equipment (C.7.5.1) and SC Equipment (C.8.6.1) modules
    ds.Manufacturer = manufacturer
    if software_versions:
        ds.SoftwareVersions = software_versions
    ds.ConversionType = "WSD"  # workstation
    # Encapsulated Document module (C.24.2)
    ds.InstanceNumber = instance_number
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.EncapsulatedDocumentLength = len(pdf)  # before the pad byte OB needs for an even length
    ds.EncapsulatedDocument = pdf + (b"\x00" if len(pdf) % 2 else b"")
    # SOP Common module (C.12.1)
    ds.SOPClassUID = ENCAPSULATED_PDF
    ds.SOPInstanceUID = sop_instance_uid
    _copy_header(ds, source)
    return ds


# --------------------------------------------------------------------------------------- drawing
def _boundary(mask: np.ndarray) -> np.ndarray:
    """The pixels of ``mask`` with a 4-neighbour outside it (outside the image counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _banner(width: int) -> np.ndarray:
    """The banner strip, uint8 (height, width, 3): :data:`BANNER` wrapped to ``width`` pixels."""
    font = ImageFont.load_default(size=max(9, round(width / 32)))
    text = _drawable(font, BANNER)
    lines: list[str] = []
    for word in text.split(" "):
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width - 4:
            lines[-1] = trial
        else:
            lines.append(word)
    step = int(font.getbbox("Agy")[3]) + 2  # a line: ascent to the descenders' bottom, plus a gap
    strip = Image.new("RGB", (width, step * len(lines) + 4), BANNER_RGB)
    draw = ImageDraw.Draw(strip)
    for n, line in enumerate(lines):
        draw.text((2, 2 + n * step), line, fill=(255, 255, 255), font=font)
    return np.asarray(strip, dtype=np.uint8)


def _drawable(font: ImageFont.FreeTypeFont | ImageFont.ImageFont, text: str) -> str:
    """``text`` with each character the font has no glyph for replaced by "-"."""
    missing = font.getmask(_MISSING)
    blank = (missing.size, bytes(missing))

    def has(ch: str) -> bool:
        mask = font.getmask(ch)
        return ch.isascii() or (mask.size, bytes(mask)) != blank

    return "".join(ch if has(ch) else "-" for ch in text)


def _copy_header(ds: Dataset, source: SourceStudy) -> None:
    """The input's Patient and Study attributes into ``ds``, unchanged."""
    for element in source.header:
        ds[element.tag] = copy.deepcopy(element)
