"""What objects sent back to the PACS copy from the input study (:class:`SourceStudy`).

An SR, a Secondary Capture or an Encapsulated PDF that ctwatch makes belongs to the input's study:
same Study Instance UID, the Patient and General Study modules copied from the input (PS3.3
C.7.1.1, C.7.2.1, C.7.2.2), new Series and SOP Instance UIDs. The SR also references the series
that was analysed (its evidence, PS3.3 C.17.2.3). This module takes those values from the scanned
study once, while its headers can still be read, into a small picklable value; no pixel data.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.dataset import Dataset

from processor.dicom.scan import Study

__all__ = ["COPIED_KEYWORDS", "SourceStudy"]

# Patient module, General Study module, Patient Study module (the attributes a PACS files on),
# plus the Frame of Reference a Secondary Capture may name. Nothing else leaves the input.
COPIED_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "TypeOfPatientID",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "EthnicGroup",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyDescription",
    "SpecificCharacterSet",
)


@dataclass(frozen=True)
class SourceStudy:
    """The input study as send-back objects need it.

    ``header``: a Dataset holding only :data:`COPIED_KEYWORDS` present in the first instance of the
    analysed series (or of the study when no series was chosen); ``series_uid``: the analysed
    series (None: none was chosen); ``instances``: its (SOPClassUID, SOPInstanceUID) pairs, in
    the order of the scan; ``frame_of_reference_uid``: its FrameOfReferenceUID, when stated;
    ``modality``: its Modality.
    """

    header: Dataset
    series_uid: str | None = None
    instances: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    frame_of_reference_uid: str | None = None
    modality: str = ""

    @property
    def study_uid(self) -> str:
        return str(self.header.StudyInstanceUID)

    @classmethod
    def from_study(cls, study: Study, series_uid: str | None) -> SourceStudy:
        """Copy from ``study`` (its headers must still be readable: call it before the input is closed).

        Raises :class:`processor.dicom.scan.CorruptDicom` when the first header cannot be read.
        """
        series = study.series.get(series_uid) if series_uid else None
        first = (series.instances[0] if series and series.instances else None) or next(
            i for s in study.series.values() for i in s.instances
        )
        full = first.header
        header = copy_keywords(full, COPIED_KEYWORDS)
        header.StudyInstanceUID = study.uid
        instances = (
            tuple((i.facts.sop_class_uid, i.facts.sop_uid) for i in series.instances) if series else ()
        )
        frame = full.get("FrameOfReferenceUID")
        return cls(
            header=header,
            series_uid=series.uid if series else None,
            instances=instances,
            frame_of_reference_uid=str(frame) if frame else None,
            modality=str(full.get("Modality", "") or ""),
        )


def copy_keywords(source: Dataset, keywords: Iterable[str]) -> Dataset:
    """A new Dataset with deep copies of the elements of ``source`` named by ``keywords`` (absent ones skipped)."""
    import copy

    out = Dataset()
    for keyword in keywords:
        if keyword in source:
            element = source.data_element(keyword)
            if element is not None:
                out.add(copy.deepcopy(element))
    return out
