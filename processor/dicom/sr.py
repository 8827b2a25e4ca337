"""The study's result as a DICOM Structured Report a PACS files beside the images (:func:`build_sr`).

Template: TID 1500 "Measurement Report" (PS3.16) inside a Comprehensive 3D SR (PS3.3 A.35.13),
built with highdicom's :class:`~highdicom.sr.MeasurementReport` and
:class:`~highdicom.sr.Comprehensive3DSR`: TID 1500 is the template for image-derived numbers and
AI outputs that viewers and archives (and highdicom's reader) understand, and Comprehensive 3D is
the SR class highdicom offers for it.

Content tree (root: "Imaging Measurement Report", TID 1500):

* Procedure reported: (25045-6, LN, "CT unspecified body region"), from CID 100; observer: the
  device ctwatch (TID 1004; its UID is derived from the manufacturer, so it is stable).
* Imaging Measurements, one TID 1501 measurement group each, every group with its algorithm
  (TID 4019 Algorithm Identification: name = the model file, version = the file's full sha256 —
  a version is TEXT, so all 64 hex digits fit —, parameters ``step=<step id>`` and ``kind=…``
  (models) or ``uses=…`` (anomaly, fusion); the lungs: "ctwatch quantify.lungs", its method and
  thresholds):

  - lungs: Volume (SCT 118565006) in ``ml``, %LAA-950 (private ``LAA950``) in ``%``, mean lung
    density (DCM 112031 "Attenuation Coefficient", derivation SCT "Mean") in ``[hnsf'U]``, all
    UCUM, finding site Lung. Only when the ``lungs`` section is ``plausible``: a number the
    product flags as partial or implausible (the Excel notes' "use with care") is never written
    as a measurement; the Qualitative Evaluations say why instead.
  - one group per model in ``models`` (zero-shot, lipro, head …): each finding's probability,
    unit ``1`` ("no units"), the concept name being the finding;
  - anomaly: the diffusion model's score (private ``ANOMALY``), unit ``1``;
  - fusion: the fused probability of pathology (private ``PATHPROB``), ``pathology`` as a
    qualitative evaluation (private ``PATHOLOGY``) coded Yes (SCT 373066001) / No (SCT
    373067005), and the most dangerous finding (private ``MOSTDANGER``) when pathology is 1 and
    one is named.

* Qualitative Evaluations (TID 1500's root container (C0034375, UMLS), which holds CODE and TEXT
  items; highdicom does not build it, so it is appended to the root's content): TEXT items with
  the statement "AI-generated, not a diagnosis", why the analysis failed, why the lung numbers
  are withheld, why there is no decision, and each step that did not run ("not performed", with
  its reason). dciodvfy accepts these TEXT items under a CONTAINER (Comprehensive 3D SR allows
  CONTAINER CONTAINS TEXT).

Only numbers a model produced, for a step the document records as ``done``, are written; null,
absent, NaN and boolean values are left out, never written as 0. A failed study (``processing_status``
``Failure`` or ``error`` set) gives an SR with no Imaging Measurements at all, saying the analysis
could not be performed and why. With no group at all, the Imaging Measurements container is
left out (TID 1500 needs it only without Qualitative Evaluations); highdicom's MeasurementReport
insists on one group, so the empty one built for it is removed again.

Codes: standard ones (DCM, SCT, LN, UCUM, UMLS) where they exist; the rest use the private
coding scheme designator ``99CTWATCH`` (declared in the Coding Scheme Identification Sequence). A
finding has no standard code here (the models' labels are CT-RATE's free-text names, whose exact
SNOMED concept is a site's call): its code value is ``F`` and the first 15 hex digits of the
sha256 of its name (UTF-8), its meaning is the name (cut to 64 characters).

References: the analysed series' instances (``source.instances``, SOP Class + Instance UID only)
go into the Current Requested Procedure Evidence Sequence, through highdicom's ``evidence``
(minimal datasets, no pixel data; see :func:`_evidence`). With no instances (a study that failed before
a series was chosen) the sequence is left out — it is required only when instances are
referenced. The Patient and General Study modules are copied from ``source.header``: every
attribute there appears in the SR unchanged.

Text ctwatch writes (reasons, finding names) is kept as is when the character set of the input
(SpecificCharacterSet, copied unchanged) can encode it, else folded to ASCII ("—" → "-").
"""

from __future__ import annotations

import copy
import hashlib
import math
import unicodedata
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import highdicom.sr as hsr
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.charset import convert_encodings
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from processor.dicom.sendback import SourceStudy

__all__ = ["DISCLAIMER", "SCHEME", "build_sr", "finding_code"]

SCHEME = "99CTWATCH"
DISCLAIMER = (
    "AI-generated, not a diagnosis: these are outputs of ctwatch's image-analysis models, not "
    "checked by a person. A radiologist must read the images."
)
NO_PATHOLOGY = "No significant pathology"  # decision.pathology 0's most_dangerous_pathology_type

ML = hsr.CodedConcept("ml", "UCUM", "milliliter")
PERCENT = hsr.CodedConcept("%", "UCUM", "Percent")
HU = hsr.CodedConcept("[hnsf'U]", "UCUM", "Hounsfield unit")
NO_UNITS = hsr.CodedConcept("1", "UCUM", "no units")
YES, NO = hsr.CodedConcept.from_code(codes.SCT.Yes), hsr.CodedConcept.from_code(codes.SCT.No)

LAA950 = hsr.CodedConcept("LAA950", SCHEME, "Lung volume below -950 HU (%LAA-950)")
PATHPROB = hsr.CodedConcept("PATHPROB", SCHEME, "Probability of pathology")
PATHOLOGY = hsr.CodedConcept("PATHOLOGY", SCHEME, "Pathology")
MOSTDANGER = hsr.CodedConcept("MOSTDANGER", SCHEME, "Most dangerous finding")
ANOMALY = hsr.CodedConcept("ANOMALY", SCHEME, "Anomaly score")
FINDING_PROBS = hsr.CodedConcept("FINDINGPROB", SCHEME, "Probability of each finding")
DISCLAIMER_NAME = hsr.CodedConcept("DISCLAIMER", SCHEME, "Disclaimer")
NOT_PERFORMED = hsr.CodedConcept("NOTPERFORMED", SCHEME, "Not performed")
WITHHELD = hsr.CodedConcept("WITHHELD", SCHEME, "Measurement withheld")
FAILED = hsr.CodedConcept("FAILED", SCHEME, "Analysis could not be performed")
NO_DECISION = hsr.CodedConcept("NODECISION", SCHEME, "No decision on pathology")
QUALITATIVE = hsr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
PROCEDURE = codes.cid100.CTUnspecifiedBodyRegion
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"  # SOP Class UID

LUNGS_USES, ANOMALY_USES, FUSION_USES, DECISION_USES = (
    "quantify.lungs",
    "anomaly.diffusion",
    "fusion.lightgbm",
    "decision.pathology",
)
_ASCII = {"—": "-", "–": "-", "−": "-", "…": "...", "≥": ">=", "≤": "<=", "×": "x", "·": "*", "→": "->"}


def build_sr(
    source: SourceStudy,
    document: Mapping[str, Any],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    instance_number: int = 1,
    manufacturer: str = "ctwatch",
    software_versions: str,
    content_datetime: datetime | None = None,
) -> hsr.Comprehensive3DSR:
    """The Comprehensive 3D SR (TID 1500) of one study's result ``document`` (ctwatch's result JSON).

    Same Study Instance UID as ``source``, the given series and SOP Instance UIDs; ContentDate/Time
    and SeriesDate/Time from ``content_datetime`` (default: now). Pure: reads no file.
    Raises ValueError when ``document`` belongs to another study than ``source``.
    """
    if document.get("study_uid") not in (None, source.study_uid):
        raise ValueError(
            f"the result is for study {document.get('study_uid')}, the source is study {source.study_uid}"
        )
    charset = source.header.get("SpecificCharacterSet")
    text = _Text(charset)
    groups, notes = _content(document, text, sop_instance_uid)
    observer = hsr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hsr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[manufacturer, "ctwatch device observer"]),
            name="ctwatch",
            manufacturer_name=manufacturer,
        ),
    )
    placeholder = not groups  # highdicom wants one group; none stays in the file
    report = hsr.MeasurementReport(
        observation_context=hsr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE,
        imaging_measurements=groups
        or [hsr.MeasurementsAndQualitativeEvaluations(_tracking("none", sop_instance_uid))],
    )
    root = report[0]
    if placeholder:
        root.ContentSequence = [i for i in root.ContentSequence if i.name != codes.DCM.ImagingMeasurements]
    evaluations = hsr.ContainerContentItem(name=QUALITATIVE, relationship_type="CONTAINS")
    evaluations.ContentSequence = hsr.ContentSequence(
        [hsr.TextContentItem(name=n, value=v, relationship_type="CONTAINS") for n, v in notes]
    )
    root.ContentSequence.append(evaluations)

    when = content_datetime or datetime.now()
    sr = hsr.Comprehensive3DSR(
        evidence=_evidence(source, series_instance_uid, sop_instance_uid),
        content=root,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=document.get("processing_status") == "Success",
        software_versions=software_versions,
        series_description="ctwatch AI results - not a diagnosis",
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
        coding_schemes=[
            CodingSchemeIdentificationItem(
                SCHEME, name="ctwatch private codes", responsible_organization=manufacturer
            )
        ],
    )
    _drop_self(sr, series_instance_uid)
    for element in source.header:  # the input's Patient and Study modules, unchanged
        sr[element.tag] = copy.deepcopy(element)
    return sr


# ------------------------------------------------------------------------------------- content
def _content(
    document: Mapping[str, Any], text: _Text, uid: str
) -> tuple[list[hsr.MeasurementsAndQualitativeEvaluations], list[tuple[hsr.CodedConcept, str]]]:
    """The measurement groups and the (name, text) notes of the Qualitative Evaluations."""
    notes: list[tuple[hsr.CodedConcept, str]] = [(DISCLAIMER_NAME, DISCLAIMER)]
    if document.get("processing_status") == "Failure" or document.get("error"):
        why = document.get("error") or "no reason was recorded"
        notes.append((FAILED, text(f"The analysis could not be performed: {why}")))
        return [], notes + _not_performed(document, text)
    done = _Done(document.get("steps"))
    groups = []
    lungs = _lungs(_section(document, "lungs"), done, text, uid, notes)
    groups += [lungs] if lungs else []
    models = _section(document, "models")
    for step_id, entry in models.items():
        if isinstance(entry, Mapping) and done(step_id=str(step_id)):
            group = _model_group(str(step_id), entry, text, uid)
            groups += [group] if group else []
    anomaly = _section(document, "anomaly")
    score = _number(anomaly.get("score"))
    if score is not None and done(uses=ANOMALY_USES):
        groups.append(
            hsr.MeasurementsAndQualitativeEvaluations(
                _tracking("anomaly", uid),
                algorithm_id=_algorithm(anomaly, done.step_id(ANOMALY_USES), f"uses={ANOMALY_USES}", text),
                measurements=[hsr.Measurement(ANOMALY, score, NO_UNITS)],
            )
        )
    fusion = _fusion_group(document, done, text, uid, notes)
    groups += [fusion] if fusion else []
    return groups, notes + _not_performed(document, text)


def _lungs(
    lungs: Mapping[str, Any], done: _Done, text: _Text, uid: str, notes: list
) -> hsr.MeasurementsAndQualitativeEvaluations | None:
    if not lungs or not done(uses=LUNGS_USES):
        return None
    if lungs.get("plausible") is not True:
        why = "; ".join(str(n) for n in lungs.get("notes") or []) or ", ".join(
            str(f).replace("_", " ") for f in lungs.get("flags") or []
        )
        notes.append(
            (
                WITHHELD,
                text(
                    "Lung volume, %LAA-950 and mean lung density are not reported: ctwatch flagged them "
                    f"as partial or not plausible ({why or 'no reason recorded'})."
                ),
            )
        )
        return None
    lung = hsr.CodedConcept.from_code(codes.SCT.Lung)
    measurements = [
        hsr.Measurement(name, value, unit, derivation=derivation, finding_sites=[hsr.FindingSite(lung)])
        for name, key, unit, derivation in (
            (codes.SCT.Volume, "volume_ml", ML, None),
            (LAA950, "laa950_percent", PERCENT, None),
            (codes.DCM.AttenuationCoefficient, "mean_lung_density_hu", HU, codes.SCT.Mean),
        )
        if (value := _number(lungs.get(key))) is not None
    ]
    if not measurements:
        return None
    return hsr.MeasurementsAndQualitativeEvaluations(
        _tracking("lungs", uid),
        algorithm_id=hsr.AlgorithmIdentification(
            name="ctwatch quantify.lungs",
            version=str(lungs.get("method") or "threshold"),
            parameters=[
                f"{key}={lungs[key]}"
                for key in ("threshold_hu", "laa_threshold_hu", "body_threshold_hu")
                if lungs.get(key) is not None
            ],
        ),
        finding_sites=[hsr.FindingSite(lung)],
        measurements=measurements,
    )


def _model_group(
    step_id: str, entry: Mapping[str, Any], text: _Text, uid: str
) -> hsr.MeasurementsAndQualitativeEvaluations | None:
    probabilities = entry.get("probabilities")
    if not isinstance(probabilities, Mapping):
        return None
    measurements = [
        hsr.Measurement(finding_code(str(name), text), value, NO_UNITS)
        for name, p in probabilities.items()
        if (value := _number(p)) is not None
    ]
    if not measurements:
        return None
    return hsr.MeasurementsAndQualitativeEvaluations(
        _tracking(f"model {step_id}", uid),
        finding_type=FINDING_PROBS,
        algorithm_id=_algorithm(entry, step_id, f"kind={entry['kind']}" if entry.get("kind") else "", text),
        measurements=measurements,
    )


def _fusion_group(
    document: Mapping[str, Any], done: _Done, text: _Text, uid: str, notes: list
) -> hsr.MeasurementsAndQualitativeEvaluations | None:
    decision, fusion = _section(document, "decision"), _section(document, "fusion")
    if not decision or not done(uses=DECISION_USES):
        return None
    fused = fusion if fusion and done(uses=FUSION_USES) else {}
    probability = _number(decision.get("probability_of_pathology"))
    if probability is None and fused:
        probability = _number(fused.get("probability"))
    pathology = decision.get("pathology")
    evaluations = []
    if pathology in (0, 1) and not isinstance(pathology, float):
        evaluations.append(hsr.QualitativeEvaluation(PATHOLOGY, YES if pathology == 1 else NO))
        worst = decision.get("most_dangerous_pathology_type")
        if pathology == 1 and isinstance(worst, str) and worst and worst != NO_PATHOLOGY:
            evaluations.append(hsr.QualitativeEvaluation(MOSTDANGER, finding_code(worst, text)))
    elif decision.get("reason"):
        notes.append((NO_DECISION, text(str(decision["reason"]))))
    if probability is None and not evaluations:
        return None
    return hsr.MeasurementsAndQualitativeEvaluations(
        _tracking("fusion", uid),
        algorithm_id=_algorithm(fused, done.step_id(FUSION_USES), f"uses={FUSION_USES}", text)
        if fused
        else None,
        measurements=[hsr.Measurement(PATHPROB, probability, NO_UNITS)] if probability is not None else None,
        qualitative_evaluations=evaluations or None,
    )


def _not_performed(document: Mapping[str, Any], text: _Text) -> list[tuple[hsr.CodedConcept, str]]:
    """A note for each step that did not run to the end, with its reason."""
    out = []
    for step in document.get("steps") or []:
        if not isinstance(step, Mapping) or step.get("status") in (None, "done"):
            continue
        why = step.get("reason") or step.get("error") or step.get("problem") or "no reason recorded"
        out.append(
            (
                NOT_PERFORMED,
                text(f"{step.get('step_id')} ({step.get('uses')}): not performed ({step['status']}): {why}"),
            )
        )
    return out


# ------------------------------------------------------------------------------------- helpers
def finding_code(name: str, text: _Text | None = None) -> hsr.CodedConcept:
    """The private code of a finding: ``F`` + 15 hex digits of sha256(name), meaning = the name."""
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:15].upper()
    meaning = (text or _Text(None))(name).replace("\\", "/")[:64]
    return hsr.CodedConcept(f"F{digest}", SCHEME, meaning)


def _algorithm(entry: Mapping[str, Any], step_id: str, what: str, text: _Text) -> hsr.AlgorithmIdentification:
    """TID 4019: name = the model file, version = its full sha256, parameters ``step=``, ``what``."""
    return hsr.AlgorithmIdentification(
        name=text(str(entry.get("model") or step_id)),
        version=str(entry.get("sha256") or "unknown"),
        parameters=[f"step={step_id}"] + ([what] if what else []),
    )


def _tracking(identifier: str, sop_uid: str) -> hsr.TrackingIdentifier:
    """A tracking identifier whose UID is derived from the SR's own UID (same input, same file)."""
    return hsr.TrackingIdentifier(uid=generate_uid(entropy_srcs=[sop_uid, identifier]), identifier=identifier)


def _evidence(source: SourceStudy, series_uid: str, sop_uid: str) -> list[Dataset]:
    """Minimal datasets for highdicom's ``evidence``: first the SR itself, carrying the patient and
    study (highdicom copies them from the first item, by its SOP Class's IOD, which must be one it
    knows — an input's SOP Class need not be), then the analysed instances. :func:`_drop_self`
    takes the SR out of the evidence again."""
    first = copy.deepcopy(source.header)
    first.SOPClassUID, first.SOPInstanceUID = COMPREHENSIVE_3D_SR, sop_uid
    first.StudyInstanceUID, first.SeriesInstanceUID = source.study_uid, series_uid
    # highdicom reads these by attribute: absent ones are Type 2, so empty. Names are blanked (it
    # warns on one-component names such as "ANONYMOUS"); the header is copied unchanged afterwards.
    first.PatientName = first.ReferringPhysicianName = ""
    # highdicom checks the first item's SpecificCharacterSet against its own list, which refuses
    # legal forms (multi-valued "\\ISO 2022 IR 87", "ISO_IR 6"): the header's own is copied after
    if "SpecificCharacterSet" in first:
        del first.SpecificCharacterSet
    for keyword in (
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "AccessionNumber",
        "StudyID",
        "StudyDate",
        "StudyTime",
    ):
        if keyword not in first:
            setattr(first, keyword, "")
    out = [first]
    for sop_class, instance in source.instances:
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, instance
        ds.StudyInstanceUID, ds.SeriesInstanceUID = source.study_uid, str(source.series_uid)
        out.append(ds)
    return out


def _drop_self(sr: Dataset, series_uid: str) -> None:
    """Remove the SR's own series from its Current Requested Procedure Evidence (and the sequence
    when nothing else is left: it is required only when instances are referenced)."""
    studies = []
    for study in sr.get("CurrentRequestedProcedureEvidenceSequence") or []:
        study.ReferencedSeriesSequence = [
            s for s in study.ReferencedSeriesSequence if s.SeriesInstanceUID != series_uid
        ]
        studies += [study] if study.ReferencedSeriesSequence else []
    if studies:
        sr.CurrentRequestedProcedureEvidenceSequence = studies
    elif "CurrentRequestedProcedureEvidenceSequence" in sr:
        del sr.CurrentRequestedProcedureEvidenceSequence


def _section(document: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = document.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float | None:
    """A finite number as float; None, booleans, NaN, infinities and text → None (never 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class _Done:
    """Whether the document's ``steps`` record a step (by id or by ``uses``) as done; a step the
    list does not name counts as done (a document from before the list, or a section without one)."""

    def __init__(self, steps: Any) -> None:
        self.steps = [s for s in steps or [] if isinstance(s, Mapping)]

    def __call__(self, *, step_id: str | None = None, uses: str | None = None) -> bool:
        matched = [
            s
            for s in self.steps
            if (step_id and s.get("step_id") == step_id) or (uses and s.get("uses") == uses)
        ]
        return all(s.get("status") == "done" for s in matched)

    def step_id(self, uses: str) -> str:
        """The id of the (first) step that ``uses`` a step type; the type itself when none does."""
        return next((str(s.get("step_id")) for s in self.steps if s.get("uses") == uses), uses)


class _Text:
    """Text as the SR's character set can hold it: unchanged when encodable, else folded to ASCII."""

    def __init__(self, charset: Any) -> None:
        values = [charset] if isinstance(charset, str) else list(charset or [])
        self.codec: str | None = None
        if len(values) == 1 and values[0]:
            try:
                self.codec = convert_encodings(values)[0]
            except LookupError:
                self.codec = None

    def __call__(self, value: str) -> str:
        if value.isascii():
            return value
        if self.codec:
            try:
                value.encode(self.codec)
                return value
            except (LookupError, UnicodeError):
                pass
        folded = "".join(_ASCII.get(ch, ch) for ch in value)
        folded = "".join(ch for ch in unicodedata.normalize("NFKD", folded) if not unicodedata.combining(ch))
        return folded.encode("ascii", "replace").decode("ascii")


def name_predecessors(sr: Dataset, study_uid: str, predecessors: Sequence[tuple[str, str]]) -> None:
    """Name in ``sr`` the SRs it replaces (earlier versions of the study's result): the Predecessor
    Documents Sequence of the SR Document General Module (PS3.3 C.17.2, Type 1C: present when the
    document replaces others), one Hierarchical SOP Instance Reference per ``(SeriesInstanceUID,
    SOPInstanceUID)`` of a Comprehensive 3D SR in ``study_uid``. Nothing when there are none."""
    if not predecessors:
        return
    by_series: dict[str, list[str]] = {}
    for series_uid, sop_uid in predecessors:
        by_series.setdefault(series_uid, []).append(sop_uid)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = []
    for series_uid, sops in by_series.items():
        series = Dataset()
        series.SeriesInstanceUID = series_uid
        series.ReferencedSOPSequence = []
        for sop_uid in sops:
            item = Dataset()
            item.ReferencedSOPClassUID = COMPREHENSIVE_3D_SR
            item.ReferencedSOPInstanceUID = sop_uid
            series.ReferencedSOPSequence.append(item)
        study.ReferencedSeriesSequence.append(series)
    sr.PredecessorDocumentsSequence = [study]
