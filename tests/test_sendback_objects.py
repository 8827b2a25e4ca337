"""The DICOM objects sent back to the PACS: the SR (TID 1500), key images (Secondary Capture) and
the Encapsulated PDF — built from a real scanned study and real result documents, written to
files, validated with dciodvfy (dicom3tools) and read back (highdicom for the SR).

dciodvfy must report no "Error" line; the only warnings accepted are :data:`ACCEPTED_WARNINGS`:

* ``Unrecognized defined term <99CTWATCH> … <Coding Scheme Designator>`` — ctwatch's private
  coding scheme (declared in the Coding Scheme Identification Sequence); dciodvfy only knows the
  standard designators.
* ``Value is zero … <Patient's Weight>`` — the input (pydicom's CT_small.dcm) has PatientWeight 0;
  the patient module is copied unchanged, as it must be.
* ``Retired Person Name form`` — a one-component patient name ("ANONYMOUS") in the input, copied
  unchanged.

Without dciodvfy the tests are skipped — unless ``CI`` is set, where it must be installed
(apt install dicom3tools), as tests/orthanc.py does for Orthanc.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from processor.dicom.keyimages import OUTLINE_RGB, build_encapsulated_pdf, build_key_image
from processor.dicom.render import WINDOWS, window
from processor.dicom.scan import scan_members
from processor.dicom.sendback import SourceStudy
from processor.dicom.sr import DISCLAIMER, SCHEME, build_sr
from processor.intake.archive import Limits, open_arrival
from tests.dicomgen import chest_phantom, make_series, write_zip

FIXTURES = Path(__file__).parent / "fixtures" / "sendback"
ACCEPTED_WARNINGS = (
    "Unrecognized defined term <99CTWATCH> for value 1 of attribute <Coding Scheme Designator>",
    "Value is zero for value 1 of attribute <Patient's Weight>",
    "Retired Person Name form",
)
QUALITATIVE = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
SLICES, SIZE = 24, 64


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's lines for ``path``; fails on any Error and on any warning not accepted."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        message = "dciodvfy (apt install dicom3tools) is not installed"
        if os.environ.get("CI"):
            pytest.fail(message + " — CI is set, so this is an error, not a skip", pytrace=False)
        pytest.skip(message)
    run = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, lines
    unexpected = [
        line for line in lines if line.startswith("Warning") and not any(a in line for a in ACCEPTED_WARNINGS)
    ]
    assert not unexpected, unexpected
    return lines


def load(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def scanned(tmp: Path, document: dict[str, Any], *, chosen: bool = True, **kwargs: Any) -> SourceStudy:
    """A real 24-slice 64×64 series of the document's study, zipped, scanned, as a SourceStudy."""
    hu, _ = chest_phantom((SLICES, SIZE, SIZE))
    stored = (hu + 1024).astype(np.int16)
    series = make_series(
        SLICES, study_uid=document["study_uid"], series_uid=document["series_uid"], stored=stored, **kwargs
    )
    with open_arrival(write_zip(tmp / "in.zip", series), Limits()) as contents:
        study = scan_members(contents.members).studies[0]
        return SourceStudy.from_study(study, document["series_uid"] if chosen else None)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> SourceStudy:
    return scanned(tmp_path_factory.mktemp("study"), load("result_sample.json"))


def write_sr(
    tmp: Path, source: SourceStudy, document: dict[str, Any]
) -> tuple[hd.sr.Comprehensive3DSR, dict]:
    uids = {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    sr = build_sr(source, document, series_number=901, software_versions="ctwatch 1.0", **uids)
    path = tmp / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    return hd.sr.srread(path), uids


def read_back(path: Path, source: SourceStudy, uids: dict[str, str]) -> pydicom.Dataset:
    """The object at ``path``, checked for the input's patient and study attributes and its own UIDs."""
    back = pydicom.dcmread(path)
    for element in source.header:
        assert back[element.tag].value == element.value, element.keyword
    assert (back.StudyInstanceUID, back.SeriesInstanceUID, back.SOPInstanceUID) == (
        source.study_uid,
        uids["series_instance_uid"],
        uids["sop_instance_uid"],
    )
    return back


def groups(sr: hd.sr.Comprehensive3DSR) -> dict[str, Any]:
    return {str(g.tracking_identifier): g for g in sr.content.get_image_measurement_groups()}


def texts(sr: hd.sr.Comprehensive3DSR) -> list[tuple[str, str]]:
    """(concept name meaning, text) of the root's Qualitative Evaluations."""
    container = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"
    ]
    assert len(container) == 1
    return [(i.ConceptNameCodeSequence[0].CodeMeaning, i.TextValue) for i in container[0].ContentSequence]


def algorithm(group: Any) -> tuple[str, str, list[str]]:
    """(name, version, parameters) of a group's TID 4019 Algorithm Identification."""

    def values(code: Any) -> list[str]:
        return [item.TextValue for item in hd.sr.utils.find_content_items(group[0], name=code)]

    (name,), (version,) = values(codes.DCM.AlgorithmName), values(codes.DCM.AlgorithmVersion)
    return name, version, values(codes.DCM.AlgorithmParameters)


def probabilities(group: Any) -> dict[str, tuple[float, str]]:
    return {m.name.meaning: (m.value, m.unit.value) for m in group.get_measurements()}


def check_common(sr: Any, source: SourceStudy, uids: dict[str, str]) -> None:
    """Same study and patient as the input, new series and instance, the disclaimer, the evidence."""
    for element in source.header:
        assert sr[element.tag].value == element.value, element.keyword
    assert sr.StudyInstanceUID == source.study_uid
    assert sr.SeriesInstanceUID == uids["series_instance_uid"] != source.series_uid
    assert sr.SOPInstanceUID == uids["sop_instance_uid"]
    assert ("Disclaimer", DISCLAIMER) in texts(sr) and "AI-generated, not a diagnosis" in DISCLAIMER
    assert sr.VerificationFlag == "UNVERIFIED" and sr.PreliminaryFlag == "PRELIMINARY"


def check_evidence(sr: Any, source: SourceStudy) -> None:
    (study,) = sr.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert study.StudyInstanceUID == source.study_uid and series.SeriesInstanceUID == source.series_uid
    referenced = [(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in series.ReferencedSOPSequence]
    assert referenced == list(source.instances) and len(referenced) == SLICES


# ------------------------------------------------------------------------------------------ SR
def test_sr_of_the_sample_result(tmp_path: Path, source: SourceStudy) -> None:
    """Models' numbers, the implausible lungs withheld with the reason, no decision explained."""
    document = load("result_sample.json")
    sr, uids = write_sr(tmp_path, source, document)
    check_common(sr, source, uids)
    check_evidence(sr, source)
    found = groups(sr)
    assert set(found) == {"model clip", "model lipro"}  # no lungs, no fusion group
    for step_id in ("clip", "lipro"):
        model = document["models"][step_id]
        assert probabilities(found[f"model {step_id}"]) == {
            name: (p, "1") for name, p in model["probabilities"].items()
        }
        assert all(m.name.scheme_designator == SCHEME for m in found[f"model {step_id}"].get_measurements())
        name, version, parameters = algorithm(found[f"model {step_id}"])
        assert (name, version) == (model["model"], model["sha256"])
        assert f"step={step_id}" in parameters and f"kind={model['kind']}" in parameters
    notes = dict(texts(sr))
    assert "not plausible" in notes["Measurement withheld"]
    assert document["lungs"]["notes"][0] in notes["Measurement withheld"]
    assert "no fusion model, so no decision" in notes["No decision on pathology"]
    assert "..." in notes["No decision on pathology"]  # "…" is not in ISO_IR 100: folded to ASCII
    assert sr.CompletionFlag == "COMPLETE"


@pytest.mark.parametrize("charset", [["", "ISO 2022 IR 87"], "ISO 2022 IR 100", "ISO_IR 192"])
def test_sr_of_an_input_with_a_charset_highdicom_does_not_list(tmp_path: Path, charset: Any) -> None:
    """Legal SpecificCharacterSet forms that highdicom's own check refuses (multi-valued with code
    extensions, a single code-extension term): the SR is made, with the input's value."""
    document = load("result_decided.json")
    header = scanned(tmp_path, document)
    header.header.SpecificCharacterSet = charset
    sr, uids = write_sr(tmp_path, header, document)
    check_common(sr, header, uids)
    assert sr.SpecificCharacterSet == charset


def test_sr_of_a_decided_result(tmp_path: Path, source: SourceStudy) -> None:
    """Lung numbers with UCUM units, fused probability, pathology Yes, most dangerous finding,
    anomaly score, every model's sha256; the skipped head stated as not performed, no number."""
    document = load("result_decided.json")
    sr, uids = write_sr(tmp_path, source, document)
    check_common(sr, source, uids)
    found = groups(sr)
    assert set(found) == {"lungs", "model clip", "model lipro", "anomaly", "fusion"}

    lungs = {
        m.name.meaning: (m.value, m.unit.value, m.unit.scheme_designator)
        for m in found["lungs"].get_measurements()
    }
    assert lungs == {
        "Volume": (document["lungs"]["volume_ml"], "ml", "UCUM"),
        "Lung volume below -950 HU (%LAA-950)": (document["lungs"]["laa950_percent"], "%", "UCUM"),
        "Attenuation Coefficient": (document["lungs"]["mean_lung_density_hu"], "[hnsf'U]", "UCUM"),
    }
    (site,) = found["lungs"].finding_sites
    assert site.value == codes.SCT.Lung

    (score,) = found["anomaly"].get_measurements()
    assert (score.name.meaning, score.value) == ("Anomaly score", document["anomaly"]["score"])
    assert algorithm(found["anomaly"])[:2] == (document["anomaly"]["model"], document["anomaly"]["sha256"])

    fusion = found["fusion"]
    (fused,) = fusion.get_measurements()
    assert (fused.name.meaning, fused.value) == (
        "Probability of pathology",
        document["decision"]["probability_of_pathology"],
    )
    assert fused.value == document["fusion"]["probability"]
    evaluations = {e.name.meaning: e.value for e in fusion.get_qualitative_evaluations()}
    assert evaluations["Pathology"] == codes.SCT.Yes  # SCT 373066001
    assert evaluations["Most dangerous finding"].meaning == "Pleural effusion"
    assert evaluations["Most dangerous finding"].value == probabilities_code(
        found["model lipro"], "Pleural effusion"
    )
    assert algorithm(fusion)[:2] == (document["fusion"]["model"], document["fusion"]["sha256"])

    notes = texts(sr)
    not_performed = [text for name, text in notes if name == "Not performed"]
    assert len(not_performed) == 1 and not_performed[0].startswith(
        "head (ctclip.head): not performed (skipped)"
    )
    assert "weights/head/ holds no head.safetensors" in not_performed[0]
    assert not any(name == "Measurement withheld" for name, _ in notes)
    assert sr.CompletionFlag == "PARTIAL"


def probabilities_code(group: Any, finding: str) -> str:
    return next(m.name.value for m in group.get_measurements() if m.name.meaning == finding)


def test_sr_never_writes_a_number_no_model_made(tmp_path: Path, source: SourceStudy) -> None:
    """A section left by a skipped step, a null, a NaN and a boolean never become numbers (or 0)."""
    document = load("result_decided.json")
    document["models"]["head"] = copy.deepcopy(document["models"]["lipro"])  # stale: its step was skipped
    lipro = document["models"]["lipro"]["probabilities"]
    lipro.update({"Cardiomegaly": None, "Emphysema": math.nan, "Atelectasis": True})
    document["lungs"]["laa950_percent"] = None
    document["decision"].update({"pathology": 0, "most_dangerous_pathology_type": "No significant pathology"})
    sr, _ = write_sr(tmp_path, source, document)
    found = groups(sr)
    assert "model head" not in found
    assert not {"Cardiomegaly", "Emphysema", "Atelectasis"} & set(probabilities(found["model lipro"]))
    assert len(found["model lipro"].get_measurements()) == len(lipro) - 3
    assert {m.name.meaning for m in found["lungs"].get_measurements()} == {
        "Volume",
        "Attenuation Coefficient",
    }
    evaluations = {e.name.meaning: e.value for e in found["fusion"].get_qualitative_evaluations()}
    assert evaluations == {
        "Pathology": codes.SCT.No
    }  # SCT 373067005; "No significant pathology" is no finding


def test_sr_of_a_failed_study(tmp_path: Path) -> None:
    """No measurements, the reason stated; no series chosen, so no evidence; a one-part name copied."""
    document = load("result_sample.json")
    document.update(
        {"processing_status": "Failure", "error": "volume: no slice could be read (all 24 corrupt)"}
    )
    for step in document["steps"][1:]:
        step.update({"status": "not_run", "reason": "an earlier step failed", "problem": "earlier_failed"})
    document["steps"][1].update({"status": "failed", "error": "no slice could be read", "reason": None})
    source = scanned(tmp_path, document, chosen=False, patient_name="ANONYMOUS")
    assert source.instances == () and str(source.header.PatientName) == "ANONYMOUS"
    sr, uids = write_sr(tmp_path, source, document)
    check_common(sr, source, uids)
    assert sr.content.get_image_measurement_groups() == []
    assert not any(item.ConceptNameCodeSequence[0].CodeValue == "126010" for item in sr.ContentSequence)
    assert "CurrentRequestedProcedureEvidenceSequence" not in sr
    notes = texts(sr)
    assert (
        "Analysis could not be performed",
        f"The analysis could not be performed: {document['error']}",
    ) in notes
    assert sum(name == "Not performed" for name, _ in notes) == len(document["steps"]) - 1
    assert sr.CompletionFlag == "PARTIAL"


def test_sr_refuses_another_study(source: SourceStudy) -> None:
    document = load("result_sample.json") | {"study_uid": generate_uid()}
    with pytest.raises(ValueError, match="the result is for study"):
        build_sr(
            source,
            document,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=901,
            software_versions="ctwatch 1.0",
        )


# ---------------------------------------------------------------------------------- key images
def key_slice() -> tuple[np.ndarray, np.ndarray]:
    hu, _ = chest_phantom((SLICES, SIZE, SIZE))
    image = window(hu[SLICES // 2], *WINDOWS["lung"])
    return image, hu[SLICES // 2] < -500


def test_key_image(tmp_path: Path, source: SourceStudy) -> None:
    image, lungs = key_slice()
    uids = {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    sc = build_key_image(
        source,
        image,
        pixel_mm=0.66,
        series_number=902,
        instance_number=3,
        description="lung window W1500 L-600, slice 12",
        outline=lungs & body(lungs),
        **uids,
    )
    path = tmp_path / "key.dcm"
    sc.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    back = read_back(path, source, uids)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and back.BurnedInAnnotation == "YES"
    assert list(back.PatientOrientation) == ["L", "P"]
    assert [float(v) for v in back.PixelSpacing] == [0.66, 0.66]
    assert back.PhotometricInterpretation == "RGB" and back.ImageComments.startswith("lung window")
    pixels = back.pixel_array
    banner = pixels.shape[0] - SIZE
    assert banner > 0 and pixels.shape[1:] == (SIZE, 3)
    below = pixels[banner:]
    edge = np.all(below == OUTLINE_RGB, axis=-1)
    assert edge.any() and not edge[~lungs].any()  # the outline is on the lungs' own pixels
    grey = ~edge
    assert np.array_equal(below[grey][:, 0], image[grey]) and np.array_equal(below[grey][:, 2], image[grey])
    top = pixels[:banner]
    assert (top.min(axis=-1) > 200).any() and (top == (150, 0, 0)).all(axis=-1).any()  # white on red


def body(lungs: np.ndarray) -> np.ndarray:
    """Only the lungs inside the body (the air outside it is below -500 HU too)."""
    rows = np.arange(lungs.shape[0])[:, None]
    cols = np.arange(lungs.shape[1])[None, :]
    return ((rows - SIZE / 2) / (SIZE * 0.42)) ** 2 + ((cols - SIZE / 2) / (SIZE * 0.46)) ** 2 <= 1


def test_key_image_without_spacing_or_outline(tmp_path: Path, source: SourceStudy) -> None:
    image, _ = key_slice()
    sc = build_key_image(
        source,
        image,
        pixel_mm=None,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=902,
        instance_number=1,
        description="lung",
    )
    path = tmp_path / "key.dcm"
    sc.save_as(path, enforce_file_format=True)
    dciodvfy(path)
    back = pydicom.dcmread(path)
    assert "PixelSpacing" not in back  # unknown: never guessed
    assert np.array_equal(back.pixel_array[-SIZE:, :, 1], image)
    with pytest.raises(ValueError, match="must match"):
        build_key_image(
            source,
            image,
            pixel_mm=0.7,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            series_number=902,
            instance_number=1,
            description="lung",
            outline=np.zeros((3, 3), bool),
        )


# --------------------------------------------------------------------------------- encapsulated PDF
def test_encapsulated_pdf(tmp_path: Path, source: SourceStudy) -> None:
    pdf = b"%PDF-1.4\n1 0 obj <</Type /Catalog>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n"  # odd length
    assert len(pdf) % 2
    uids = {"series_instance_uid": generate_uid(), "sop_instance_uid": generate_uid()}
    ds = build_encapsulated_pdf(
        source, pdf, series_number=903, instance_number=1, title="ctwatch study report", **uids
    )
    path = tmp_path / "report_pdf.dcm"
    ds.save_as(path, enforce_file_format=True)
    lines = dciodvfy(path)
    assert "EncapsulatedPDF" in lines
    back = read_back(path, source, uids)
    assert back.MIMETypeOfEncapsulatedDocument == "application/pdf" and back.Modality == "DOC"
    assert back.EncapsulatedDocument[: back.EncapsulatedDocumentLength] == pdf
    assert back.EncapsulatedDocumentLength == len(pdf) and back.DocumentTitle == "ctwatch study report"
    with pytest.raises(ValueError, match="not a PDF"):
        build_encapsulated_pdf(source, b"<html>", series_number=903, instance_number=1, title="x", **uids)
