"""A fresh install's workbook on paper: the real chest-ct pipeline without any weights on real
DICOM, the workbook printed to PDF by the real LibreOffice, the pages read back with poppler
(``pdfinfo``, ``pdftotext``). The PDF and a PNG of the Studies page stay in the test's tmp dir."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import yaml

from processor.config import ReportSettings
from processor.outputs.report import Reports
from processor.outputs.sheets import wrapped_lines
from processor.outputs.workbook_rows import PRINTED_COLUMNS
from processor.state import State
from tests import dicomgen
from tests.conftest import REPO, Project

TOOLS = ("soffice", "pdfinfo", "pdftotext", "pdftoppm")
MIN_TEXT_POINTS = 5.0  # printed height of a body word (11 pt at the fitted scale): ~6.6 at 60 %, ~3 at 25 %


def _chest_zips(folder: Path) -> list[Path]:
    """A whole chest (and its scout), a chest whose lungs the scan range cuts, a series too short
    to analyse, and a ZIP without DICOM: what a first day on a fresh install may bring."""
    hu, _ = dicomgen.chest_phantom((40, 64, 64))
    stored = (hu + 1024).astype(np.int16)
    whole = dicomgen.make_series(40, stored=stored, pixel_spacing=5.0, spacing=6.0)
    scout = dicomgen.make_scout(study_uid=whole[0].StudyInstanceUID)
    cut = dicomgen.make_series(30, stored=stored[10:], pixel_spacing=5.0, spacing=8.0)
    short = dicomgen.make_series(12, stored=stored[:12], pixel_spacing=5.0, spacing=8.0)
    zips = [
        dicomgen.write_zip(folder / "whole.zip", whole + scout),
        dicomgen.write_zip(folder / "lungs-cut.zip", cut),
        dicomgen.write_zip(folder / "short.zip", short),
    ]
    with zipfile.ZipFile(folder / "notes.zip", "w") as zf:
        zf.writestr("readme.txt", "not an image")
    return [*zips, folder / "notes.zip"]


def _page_text(pdf: Path, page: int) -> str:
    return subprocess.run(
        ["pdftotext", "-f", str(page), "-l", str(page), "-layout", str(pdf), "-"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_fresh_install_workbook_prints_one_page_wide_and_says_what_ran(tmp_path: Path) -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (LibreOffice and poppler-utils; CI installs them)")
    steps = yaml.safe_load((REPO / "pipelines" / "chest-ct.yaml").read_text())["steps"]
    (tmp_path / "project").mkdir()
    project = Project(tmp_path / "project", pipeline_steps=steps)  # weights/ of the project is empty
    done = project.run("process", *map(str, _chest_zips(tmp_path)))
    assert done.returncode in (0, 1) and len(project.results()) == 3, done.stderr  # 1: a study failed

    state = State(project.state_path, readonly=True)
    try:
        outcome = Reports(state, ReportSettings(dir=project.outbox / "reports")).write_latest(date.today())
    finally:
        state.close()
    assert outcome.path is not None and not outcome.pending

    home, out = tmp_path / "home", tmp_path / "printed"
    home.mkdir()
    convert = subprocess.run(
        [
            "soffice",
            "--headless",
            f"-env:UserInstallation={(tmp_path / 'lo-profile').as_uri()}",
            "--convert-to",
            "pdf",
            "--outdir",
            str(out),
            str(outcome.path),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "HOME": str(home)},
        cwd=tmp_path,
    )
    pdf = out / "ctwatch-latest.pdf"
    assert convert.returncode == 0 and pdf.exists(), convert.stderr
    subprocess.run(
        ["pdftoppm", "-r", "100", "-f", "1", "-l", "1", "-png", str(pdf), str(out / "studies")], check=True
    )

    info = subprocess.run(
        ["pdfinfo", "-f", "1", "-l", "99", str(pdf)], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    pages = int(re.search(r"^Pages:\s+(\d+)", info, re.M).group(1))
    sizes = [(float(w), float(h)) for w, h in re.findall(r"Page\s+\d+ size:\s+([\d.]+) x ([\d.]+) pts", info)]
    assert len(sizes) == pages and 2 <= pages <= 3, info  # Studies: one page; Summary: one or two
    assert all(w > h and round(w) == 842 and round(h) == 595 for w, h in sizes), f"not A4 landscape: {sizes}"

    # Four rows of Studies fit one page, wide and tall: the first and last printed columns are on
    # page 1 and the Summary starts on page 2.
    studies, summary = _page_text(pdf, 1), _page_text(pdf, 2)
    assert "Received" in studies and "Notes" in studies and "How to read" not in studies
    assert "How to read this workbook" in summary
    for name in ("whole.zip", "lungs-cut.zip", "short.zip", "notes.zip"):
        assert name in studies

    words = _words(pdf)
    first = {}  # each word's first (highest) box on the page: the header row's words come first
    for box in sorted(words, key=lambda w: w[1]):
        first.setdefault(box[4], box)
    top = min(y0 for _, y0, _, _, t in words if y0 > 30 and re.fullmatch(r"\d{4}-\d\d-\d\d", t))

    def column(header: str, next_header: str | None) -> list[tuple[float, float, float, float, str]]:
        """The words printed in one column, below the header row, in reading order."""
        x0, x1 = first[header][0] - 1, first[next_header][0] - 1 if next_header else 1e9
        inside = [w for w in words if x0 <= w[0] < x1 and w[1] >= top - 1]
        return sorted(inside, key=lambda w: (round(w[1]), w[0]))

    def text(boxes: list) -> str:
        return " ".join(t for *_, t in boxes)

    what_ran, notes = text(column("What", "Probability")), text(column("Notes", None))
    assert "Ran: series selection, image volume, lung measurements, key images" in what_ran
    assert (
        "AI models not installed: captioning, CT-CLIP zero-shot, CT-LiPro classifier, supervised" in what_ran
    )
    assert "fusion — see `python run.py weights`" in what_ran
    assert "No probability of pathology: needs fusion" in what_ran
    assert "Not analysed: series selection failed — no eligible series" in what_ran
    assert "Not analysed: the file was rejected" in what_ran
    # `process` leaves the files it is given where they are, the rejected one too
    assert "The file was left where it is (it was named on the command line)." in what_ran
    assert "quarantine" not in what_ran
    assert "• Lung numbers — use with care: the lungs continue beyond the first slice" in notes
    assert "lungs_cut" not in notes, "flag codes stay in the JSON"

    # Each Study UID is wrapped inside its own column (nothing spills into Series), and whole.
    uid_column = column("Study", "Series")
    assert all(x1 <= first["Series"][0] for _, _, x1, _, _ in uid_column), "a UID spills into Series"
    joined = "".join(t for *_, t in uid_column)
    for result in project.results():
        assert json.loads(result.read_text())["study_uid"] in joined
    assert not any(re.fullmatch(r"[\d.]{12,}", t) for *_, t in column("Accession", "Study")), (
        "UID digits in the Accession column"
    )

    heights = [y1 - y0 for _, y0, _, y1, t in words if t == "ACC12345"]
    assert len(heights) == 3 and min(heights) >= MIN_TEXT_POINTS, f"printed text too small: {heights} pt"

    # No wrapped cell prints on more lines than its row was given (cut text): each row of the PDF,
    # between the tops of two Received dates, against the estimate the row height came from.
    book = openpyxl.load_workbook(outcome.path)
    cells = list(book["Studies"].iter_rows(min_row=2, max_col=len(PRINTED_COLUMNS), values_only=True))
    book.close()
    tops = sorted(
        y0
        for x0, y0, _, _, t in words
        if y0 >= top - 1 and x0 < first["Source"][0] and re.fullmatch(r"\d{4}-.*", t)
    )
    assert len(tops) == len(cells) == 4
    header_words = [(x0, t) for x0, y0, _, _, t in words if 25 < y0 < top - 1 and len(t) >= 3]
    lefts = [min(x0 for x0, t in header_words if c.header.startswith(t)) - 1 for c in PRINTED_COLUMNS]
    for row, (row_top, bottom) in zip(cells, zip(tops, [*tops[1:], 1e9], strict=True), strict=True):
        for c, col in enumerate(PRINTED_COLUMNS):
            if not (col.wrap and row[c]):
                continue
            right = lefts[c + 1] if c + 1 < len(lefts) else 1e9
            lines = {
                round(y0)
                for x0, y0, _, _, _ in words
                if lefts[c] <= x0 < right and row_top - 1 <= y0 < bottom - 1
            }
            assert len(lines) <= wrapped_lines(str(row[c]), col.width), (col.header, row[c])


def _words(pdf: Path) -> list[tuple[float, float, float, float, str]]:
    """Page 1's words with their boxes (x0, y0, x1, y1 in points from the top left; pdftotext -bbox)."""
    xml = subprocess.run(
        ["pdftotext", "-f", "1", "-l", "1", "-bbox", str(pdf), "-"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [
        (float(x0), float(y0), float(x1), float(y1), html.unescape(text))
        for x0, y0, x1, y1, text in re.findall(
            r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)">([^<]*)</word>', xml
        )
    ]
