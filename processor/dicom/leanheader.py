"""The few values of a series' first header that ctwatch asks for by keyword, converted by pydicom
from a data set of those elements only.

A scan keeps, for the first file of every series, the bytes before its Pixel Data element
(:attr:`processor.dicom.scan.Instance.header_bytes`). The series number, description and modality
(series selection), the accession number, patient ID and its issuer (the study's record) and the
gantry tilt (the volume) are read from them here: the data set's top-level elements are stepped
over by the lean walker (:func:`processor.dicom.fastheader.element_starts`), the elements of
:data:`KEYWORDS` (and SpecificCharacterSet, which decodes their text) are handed to pydicom as the
raw elements a full parse would hold (tag, VR as the file states it or none when implicit,
value bytes), and pydicom converts them on access exactly as it converts them in a full parse.

Parsing a whole CT header takes pydicom ~2 ms (~250 elements); these few take a tenth of that,
and a scan of three series parsed three headers whole (issue 18). The whole header is parsed
from the same bytes when something needs the rest of it (the objects sent back to the PACS).
"""

from __future__ import annotations

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

from processor.dicom.fastheader import UNDEFINED, Declined, element_starts

KEYWORDS = frozenset(
    {
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "AccessionNumber",
        "PatientID",
        "IssuerOfPatientID",
        "GantryDetectorTilt",
    }
)
_TAGS = frozenset(tag_for_keyword(k) for k in KEYWORDS | {"SpecificCharacterSet"})


def lean_header(head: bytes, implicit: bool) -> Dataset | None:
    """A data set of the :data:`KEYWORDS` elements (and SpecificCharacterSet) of ``head`` (a Part 10
    file's bytes up to its Pixel Data element, Little Endian, ``implicit`` VR or not, as the scan
    decided), for ``Dataset.get``; None when the walker does not step over its elements to the end
    (the caller parses the whole header then)."""
    try:
        found = element_starts(head, implicit)
    except Declined:
        return None
    raw: dict[int, RawDataElement] = {}
    view = memoryview(head)
    for tag, at, header, length in found:
        if tag not in _TAGS:
            continue
        if length == UNDEFINED or at + header + length > len(view):
            return None  # no plain value: as the whole header reads it
        vr = None if implicit else bytes(view[at + 4 : at + 6]).decode("ascii")
        raw[tag] = RawDataElement(
            Tag(tag), vr, length, bytes(view[at + header : at + header + length]), at, implicit, True
        )
    return Dataset(raw)
