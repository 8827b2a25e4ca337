"""The per-study report (processor/outputs/studyreport.py): one self-contained HTML page and its PDF.

The document is a real result JSON (tests/fixtures/studyreport/study.json: tiny models, no fusion,
flagged lung numbers) and a variant with the decision filled as ``decision.pathology`` writes it
(fusion probability, pathology 1, a head model with fitted thresholds, the most dangerous finding, an
anomaly step skipped for its missing weights). Previews are written as the render step writes them.
Every number on the page is checked against the document through its ``data-field`` pointer; the
PDF's first page (poppler's ``pdftoppm``) and the page in headless Chromium must show the banner.
Chromium and poppler are skipped when absent, except under CI, where they must be installed.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from processor.dicom.render import png_bytes, window
from processor.outputs.studyreport import NOT_A_DIAGNOSIS, render_html, render_pdf
from tests.conftest import FIXTURES
from tests.dicomgen import chest_phantom

SAMPLE = FIXTURES / "studyreport" / "study.json"
SCRIPT = '<script>alert("x")</script> & more'
BANNER_RED = (0xB0, 0x00, 0x20)  # the banner's border colour


def need(tool: str) -> str:
    """The tool's path; skip without it, unless CI is set (then it must be installed)."""
    found = shutil.which(tool)
    if found:
        return found
    message = f"{tool} is not installed (Debian: chromium, poppler-utils)"
    if os.environ.get("CI"):
        pytest.fail(message + " — CI is set, so this is an error, not a skip", pytrace=False)
    pytest.skip(message)


def study(folder: Path, document: dict[str, Any]) -> tuple[dict[str, Any], Path]:
    """The document's previews written under ``folder`` (the JSON's folder) with their sha256."""
    hu, _ = chest_phantom((24, 96, 96))
    for entry in document["key_slices"]:
        data = png_bytes(window(hu[entry["slice_index"]], entry["width"], entry["level"]))
        path = folder / entry["file"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entry["sha256"] = hashlib.sha256(data).hexdigest()
    (folder / f"{document['study_uid']}.json").write_text(json.dumps(document), encoding="utf-8")
    return document, folder


def sample() -> dict[str, Any]:
    return json.loads(SAMPLE.read_text(encoding="utf-8"))


def decided(*, anomaly: bool = False) -> dict[str, Any]:
    """The sample with the decision filled, shaped as processor/steps/ensemble.py writes it."""
    doc = copy.deepcopy(sample())
    names = list(doc["models"]["lipro"]["probabilities"])
    head = {name: round(0.05 + 0.9 * i / len(names), 6) for i, name in enumerate(names)}
    head.update({"Pleural effusion": 0.731, "Emphysema": 0.812, "Consolidation": 0.2})
    thresholds = {"Pleural effusion": 0.35, "Emphysema": 0.5, "Consolidation": 0.6}
    doc["models"]["head"] = {
        "kind": "ctclip_head",
        "model": "head/head.pt",
        "sha256": "ab" * 32,
        "trained": "2026-10-01",
        "training_set_hash": "cd" * 32,
        "thresholds": thresholds,
        "probabilities": head,
    }
    doc["fusion"] = {
        "model": "model.txt",
        "sha256": "ef" * 32,
        "trained": "2026-10-02",
        "probability": 0.812345,
        "raw_probability": 0.79,
        "calibration": "isotonic",
        "threshold": 0.42,
        "threshold_source": "youden",
        "features_used": 55,
        "features_missing": ["anomaly.score"],
        "contributions": {
            "units": "log-odds of raw_probability (SHAP, LightGBM pred_contrib)",
            "bias": -0.2,
            "by_model": {"clip": 0.104, "head": 1.25, "lipro": -0.31},
            "by_feature": {},
        },
        "finding_thresholds": {},
        "finding_threshold_features": {},
    }
    findings = {}
    for name in names:
        if name in thresholds:
            p, t = head[name], thresholds[name]
            findings[name] = {
                "probability": p,
                "source": f"head.{name}",
                "threshold": t,
                "threshold_from": "model card",
                "positive": p >= t,
            }
        else:
            findings[name] = {**doc["decision"]["findings"][name]}
    doc["decision"].update(
        probability_of_pathology=0.812345,
        pathology=1,
        most_dangerous_pathology_type="Pleural effusion",
        threshold=0.42,
        reason="15 finding(s) have no fitted threshold (Arterial wall calcification, Atelectasis, "
        "Bronchiectasis …), so their threshold and positive are null",
        findings_above_threshold=["Pleural effusion", "Emphysema"],
        findings=findings,
    )
    for key in ("probability_of_pathology", "pathology", "most_dangerous_pathology_type"):
        doc[key] = doc["decision"][key]
    missing = "weights/anomaly/unet/diffusion_pytorch_model.safetensors"
    steps = doc["steps"][:-1]  # the decision goes last
    steps.append(_step("head", "ctclip.head", "done"))
    if anomaly:
        steps.append(_step("anomaly", "anomaly.diffusion", "done"))
        doc["anomaly"] = {
            "model": "unet/diffusion_pytorch_model.safetensors",
            "sha256": "12" * 32,
            "trained": "2026-09-30",
            "score": 0.012345,
            "aggregate": "max",
            "warnings": [],
        }
    else:
        steps.append(
            _step(
                "anomaly",
                "anomaly.diffusion",
                "skipped",
                reason=f"weights not installed: {missing}",
                missing=[missing],
                problem="model_missing",
            )
        )
        doc["processing_status"] = "Partial"
    steps += [_step("fusion", "fusion.lightgbm", "done"), doc["steps"][-1]]
    doc["steps"] = steps
    doc["lungs"].update(
        volume_ml=4520.3,
        laa950_percent=3.26,
        mean_lung_density_hu=-842.4,
        plausible=True,
        flags=[],
        notes=[],
        summary="The lungs were found whole: lung volume, %LAA-950 and mean lung density can be used.",
    )
    doc["warnings"] = [SCRIPT]
    return doc


def _step(step_id: str, uses: str, status: str, **extra: Any) -> dict[str, Any]:
    record = {
        "step_id": step_id,
        "uses": uses,
        "status": status,
        "seconds": 0.25,
        "error": None,
        "missing": [],
        "problem": None,
        "reason": None,
    }
    return {**record, **extra}


class Page(HTMLParser):
    """The page as parsed: each tagged number (field, value, shown text, valid), images, links, text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.numbers: list[dict[str, Any]] = []
        self.sources: list[str] = []
        self.links: list[str] = []
        self.tags: set[str] = set()
        self.words: list[str] = []
        self._open: dict[str, Any] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        self.sources += [found["src"]] if "src" in found else []
        self.links += [found["href"]] if "href" in found else []
        if "data-field" in found:
            self._open = {
                "field": found["data-field"],
                "value": json.loads(found["data-value"]),
                "valid": found.get("data-valid") != "false",
                "shown": "",
            }
            self.numbers.append(self._open)

    def handle_endtag(self, tag: str) -> None:
        if tag == "span":
            self._open = None

    def handle_data(self, data: str) -> None:
        self.words.append(data)
        if self._open is not None:
            self._open["shown"] += data

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.words).split())

    def fields(self) -> dict[str, dict[str, Any]]:
        return {n["field"]: n for n in self.numbers}


def resolve(document: Any, pointer: str) -> Any:
    """RFC 6901, as the page writes it."""
    for key in pointer.split("/")[1:]:
        key = key.replace("~1", "/").replace("~0", "~")
        document = document[int(key)] if isinstance(document, list) else document[key]
    return document


def render(tmp_path: Path, document: dict[str, Any]) -> tuple[str, Page]:
    doc, folder = study(tmp_path, document)
    text = render_html(doc, folder, institution="St <Elsewhere> & Co")
    return text, Page(text)


VARIANTS = {"sample": sample, "decided": decided, "anomaly": lambda: decided(anomaly=True)}


# ------------------------------------------------------------------------------------------------ HTML
def test_the_page_needs_nothing_outside_itself(tmp_path: Path) -> None:
    doc = sample()
    text, page = render(tmp_path, doc)
    assert "script" not in page.tags and "link" not in page.tags
    assert not re.search(r"""(?:src|href|url)\s*[=(]\s*["']?\s*(?:https?:)?//""", text, re.I)
    assert len(page.sources) == len(doc["key_slices"]) == 6
    for src, entry in zip(page.sources, doc["key_slices"], strict=True):
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    assert NOT_A_DIAGNOSIS in page.text and "ACC12345" in page.text and doc["study_uid"] in page.text
    assert "St <Elsewhere> & Co" in page.text  # the institution, escaped


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_number_shown_is_the_documents(tmp_path: Path, variant: str) -> None:
    doc = VARIANTS[variant]()
    _, page = render(tmp_path, doc)
    assert page.numbers
    for n in page.numbers:
        assert n["value"] == resolve(doc, n["field"]), n
        shown = n["shown"].replace(",", "").replace("+", "")
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        assert abs(float(shown) - n["value"]) <= 0.5 * 10**-decimals + 1e-9, n
    fields = page.fields()
    expected = [
        f"/models/{sid}/probabilities/{name}"
        for sid, m in doc["models"].items()
        for name in m["probabilities"]
    ]
    expected += ["/lungs/volume_ml", "/lungs/laa950_percent", "/lungs/mean_lung_density_hu"]
    if doc["pathology"] is not None:
        expected += ["/probability_of_pathology", "/pathology", "/decision/threshold"]
        expected += [f"/decision/findings/{name}/threshold" for name in doc["models"]["head"]["thresholds"]]
        assert "Most dangerous finding Pleural effusion" in page.text
        assert "Pathology suspected" in page.text
    else:
        assert "No AI decision for this study" in page.text and "no fusion model" in page.text
    if "anomaly" in doc:
        expected.append("/anomaly/score")
    assert sorted(set(expected) - set(fields)) == []


def test_flagged_lung_numbers_are_not_shown_as_valid(tmp_path: Path) -> None:
    doc = sample()
    assert doc["lungs"]["plausible"] is False
    text, page = render(tmp_path, doc)
    lungs = [n for n in page.numbers if n["field"].startswith("/lungs/")]
    assert len(lungs) == 3 and not any(n["valid"] for n in lungs)
    for row in re.findall(r"<tr><th>(?:Lung volume|%LAA-950|Mean lung density)</th>.*?</tr>", text):
        assert "use with care" in row
    for note in doc["lungs"]["notes"]:
        assert note in page.text
    whole = decided()
    _, page = render(tmp_path / "whole", whole)
    lungs = [n for n in page.numbers if n["field"].startswith("/lungs/")]
    assert len(lungs) == 3 and all(n["valid"] for n in lungs)
    assert "use with care" not in page.text


def test_what_did_not_run_is_listed_with_its_reason(tmp_path: Path) -> None:
    text, page = render(tmp_path, decided())
    row = re.search(r'<tr class="skipped"><td>anomaly detector</td>.*?</tr>', text)
    assert row is not None
    assert (
        "model not installed" in row.group() and "weights not installed: weights/anomaly/unet/" in row.group()
    )
    assert "AI models not installed: anomaly detector" in page.text  # explain.what_ran's summary
    assert "Partial" in page.text


def test_text_from_the_document_is_escaped(tmp_path: Path) -> None:
    doc = decided()
    doc["models"]["head"]["probabilities"]['<img src=x onerror="y">'] = 0.5
    text, page = render(tmp_path, doc)
    assert "<script" not in text and "<img src=x" not in text
    assert SCRIPT in page.text and '<img src=x onerror="y">' in page.text


def test_a_preview_that_is_missing_changed_or_outside_is_not_shown(tmp_path: Path) -> None:
    doc, folder = study(tmp_path / "study", sample())
    slices = doc["key_slices"]
    (folder / slices[0]["file"]).unlink()
    (folder / slices[1]["file"]).write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    (tmp_path / "outside.png").write_bytes((folder / slices[2]["file"]).read_bytes())
    slices[2]["file"] = "../outside.png"
    page = Page(render_html(doc, folder))
    assert len(page.sources) == 3
    assert "Image not shown: its file could not be read (No such file or directory)" in page.text
    assert "Image not shown: its file changed after the study was analysed" in page.text
    assert "Image not shown: its file lies outside the study's folder" in page.text


def test_a_failed_study_says_why_and_shows_no_numbers_it_lacks(tmp_path: Path) -> None:
    """A study that failed early: no lungs, previews, models or decision sections (all optional)."""
    error = "could not read the volume: no pixel data (in step volume)"
    doc = {
        "study_uid": "1.2.3",
        "processing_status": "Failure",
        "error": error,
        "pathology": None,
        "steps": [
            _step("series", "dicom.select_series", "done"),
            _step(
                "volume",
                "ct.volume",
                "failed",
                error="could not read the volume: no pixel data",
                problem="study",
            ),
            _step(
                "lungs",
                "quantify.lungs",
                "not_run",
                reason="an earlier step failed",
                problem="earlier_failed",
            ),
        ],
    }
    page = Page(render_html(doc, tmp_path))
    assert f"Not analysed: {error}" in page.text
    assert "image volume failed 0.25 could not read the volume: no pixel data" in page.text
    assert "lung measurements did not run 0.25 an earlier step failed" in page.text
    assert "No lung measurements" in page.text and "No AI decision for this study" in page.text
    assert {n["field"] for n in page.numbers} == {"/steps/0/seconds", "/steps/1/seconds", "/steps/2/seconds"}


# ------------------------------------------------------------------------------------------------ looks
def not_blank(png: Path) -> np.ndarray:
    """The image as RGB; it must show more than a flat page, and the red banner."""
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    assert rgb.std() > 20, f"{png} looks blank"
    red = (np.abs(rgb - np.array(BANNER_RED)).sum(axis=2) < 60).sum()
    assert red > 200, f"{png}: no red banner ({red} pixels)"
    return rgb


def test_the_pdf_prints_the_same_report(tmp_path: Path) -> None:
    pdftoppm, pdftotext = need("pdftoppm"), need("pdftotext")
    text, _ = render(tmp_path, decided())
    pdf = render_pdf(text)
    assert pdf.startswith(b"%PDF-")
    (tmp_path / "report.pdf").write_bytes(pdf)
    subprocess.run(
        [
            pdftoppm,
            "-f",
            "1",
            "-l",
            "1",
            "-r",
            "60",
            "-png",
            "-singlefile",
            tmp_path / "report.pdf",
            tmp_path / "page",
        ],
        check=True,
        timeout=60,
    )
    rgb = not_blank(tmp_path / "page.png")
    assert rgb.shape[0] > rgb.shape[1]  # A4 portrait
    words = subprocess.run(
        [pdftotext, "-layout", tmp_path / "report.pdf", "-"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    for expected in (
        NOT_A_DIAGNOSIS,
        "ACC12345",
        "Pleural effusion",
        "0.812",
        "model not installed",
        "page 1 of",
    ):
        assert expected in " ".join(words.split()), expected


def test_chromium_shows_the_page(tmp_path: Path) -> None:
    need("chromium")
    from tests.test_status_browser import load_in_chromium

    text, _ = render(tmp_path / "study", decided())
    page = tmp_path / "report.html"
    page.write_text(text, encoding="utf-8")
    loaded = load_in_chromium(page.as_uri(), tmp_path / "chromium")
    assert loaded.console == []
    assert NOT_A_DIAGNOSIS in loaded.text and "Pathology suspected" in loaded.text
    not_blank(loaded.screenshot)
