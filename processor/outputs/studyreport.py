"""The per-study report for people: one self-contained HTML page, and the same page as PDF.

:func:`render_html` turns one stored result document (the study's JSON, see
``result.schema.json``) into a page a radiographer or radiologist reads: "AI-generated — not a
diagnosis" at the top of every page, the study's identifiers (accession, study date when the
document has one, the Study Instance UID — no patient data: the document holds none), the key-slice
previews with their window and position, the lung measurements, every model's per-finding
probabilities with the fused decision, what ran and what did not and why, the warnings, the models'
files and checksums, and the disclaimers (research use, the CT-CLIP weights' licence).

The page needs nothing outside itself: the previews are inlined as ``data:`` URIs from the PNG files
``key_slices[].file`` names (relative to the folder holding the JSON, checked against their
recorded sha256), the CSS is inline, there is no script. Every text from the document is escaped.
Each number shown carries ``data-field`` (its JSON Pointer, RFC 6901, in the document) and
``data-value`` (the document's value, as JSON), so a test — or a reader — can check that the page
shows what the document holds. Lung numbers the lung step flags (``lungs.plausible`` false) are
shown as the Excel report shows them: the number kept, marked "use with care" with the step's notes
in words (:func:`processor.outputs.explain.notes`), and ``data-valid="false"``; never as valid.

:func:`render_pdf` prints that same HTML with WeasyPrint: the PDF holds the same content as the
page (one source, no second layout to keep in step), WeasyPrint follows CSS Paged Media (A4,
``@page`` margins, page numbers, a header line on every page), needs no browser, and is well kept
(BSD licence, regular releases). It draws text with Pango; without it :class:`ReportUnavailable`
says which Debian packages to install.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from processor.errors import CtwatchError
from processor.outputs import reportparts as parts
from processor.outputs.reportparts import NOT_A_DIAGNOSIS, RESEARCH_USE, escape

__all__ = ["NOT_A_DIAGNOSIS", "ReportUnavailable", "render_html", "render_pdf"]

PANGO_PACKAGES = "libpango-1.0-0 libpangoft2-1.0-0"  # Debian: what WeasyPrint loads to draw text


class ReportUnavailable(CtwatchError):
    """The PDF cannot be made on this machine: a system library WeasyPrint needs is missing. The
    message names the Debian packages to install; the HTML report does not need them."""


# ------------------------------------------------------------------------------------------- the page
CSS = """
@page { size: A4; margin: 16mm 13mm 16mm 13mm;
  @top-left { content: "ctwatch study report · AI-generated — not a diagnosis";
    font: bold 8pt "DejaVu Sans", sans-serif; color: #8a1020; }
  @top-right { content: "accession " string(accession); font: 8pt "DejaVu Sans", sans-serif; color: #444; }
  @bottom-right { content: "page " counter(page) " of " counter(pages); font: 8pt "DejaVu Sans", sans-serif;
    color: #555; } }
.running { string-set: accession content(); }
* { box-sizing: border-box; }
html { -webkit-print-color-adjust: exact; }  /* Chromium: print the backgrounds */
body { font-family: "DejaVu Sans", "Liberation Sans", Arial, sans-serif; font-size: 9.5pt; color: #111;
  line-height: 1.35; max-width: 190mm; margin: 0 auto; padding: 4mm; }
h1 { font-size: 15pt; margin: 3mm 0 1mm; }
h2 { font-size: 11.5pt; margin: 5mm 0 2mm; padding-bottom: 1mm; border-bottom: 1px solid #9aa;
  break-after: avoid; }
.banner { border: 2px solid #b00020; background: #fde8ea; color: #7a0016; padding: 2mm 3mm;
  font-weight: bold; font-size: 11pt; }
.banner span { display: block; font-weight: normal; font-size: 8.5pt; margin-top: 1mm; }
.institution { margin: 1mm 0; font-weight: bold; }
table { border-collapse: collapse; margin: 1mm 0 2mm; }
th, td { text-align: left; vertical-align: top; padding: 0.6mm 2mm 0.6mm 0; }
table.kv th, table.ids th { font-weight: normal; color: #444; white-space: nowrap; padding-right: 4mm; }
table.grid { width: 100%; }
table.grid th, table.grid td { border-bottom: 1px solid #dde; padding: 0.8mm 1.5mm; }
table.grid thead th { background: #eef1f6; border-bottom: 1px solid #99a; font-size: 8.5pt; }
tr { break-inside: avoid; }
.uid, .small, code { font-size: 7.5pt; color: #444; }
.uid { word-break: break-all; }
code { font-family: "DejaVu Sans Mono", monospace; }
.num { font-variant-numeric: tabular-nums; }
.care { color: #8a5a00; font-style: italic; }
.flag, .care-words b { color: #8a5a00; }
.care-words { margin: 1mm 0 0; }
.yes { color: #b00020; font-weight: bold; }
.none { color: #777; }
.notice, .error { border-left: 3px solid #b00020; padding: 1mm 2mm; background: #fff4f4; }
.verdict { font-size: 11pt; font-weight: bold; margin: 1mm 0; }
.reason { color: #333; font-size: 8.5pt; }
.figures { display: block; orphans: 1; widows: 1; }  /* a row of images is a line */
figure { display: inline-block; width: 32%; margin: 0 0.5% 2mm 0; vertical-align: top;
  break-inside: avoid; }
figure img { width: 100%; height: auto; display: block; background: #000; }
figcaption { font-size: 8pt; margin-top: 0.8mm; }
.missing { border: 1px dashed #999; padding: 6mm 2mm; font-size: 8pt; color: #555; }
.caption { color: #555; font-style: italic; }
tr.skipped td, tr.not_run td { color: #555; }
tr.failed td { color: #8a1020; }
td.why { font-size: 8pt; overflow-wrap: anywhere; }
table.steps td:nth-child(-n+3) { white-space: nowrap; }
table.findings tbody th { width: 30%; }
footer { break-inside: avoid; }
footer p { font-size: 8pt; color: #333; margin: 1mm 0; }
"""


def render_html(document: Mapping[str, Any], json_dir: Path, *, institution: str = "") -> str:
    """One study's report as one self-contained HTML page (UTF-8 text; no external URL, no script).

    ``document``: the study's result document as stored (``result.schema.json``; every section
    optional but ``study_uid``); ``json_dir``: the folder holding its JSON, which
    ``key_slices[].file`` is relative to (a preview whose file is missing, outside that folder, not
    a PNG or not the recorded sha256 is not shown, and the page says why); ``institution``: a name
    for the page's head (``study_report.institution``), or "" for none. The same document and files
    give the same page (no clock is read).
    """
    accession = document.get("accession")
    title = "ctwatch study report" + (f" — accession {accession}" if accession else "")
    sections = [
        ("Result", parts.decision(document)),
        ("Lung measurements", parts.lungs(document)),
        ("Key images", parts.images(document, json_dir)),
        ("Findings by model", parts.findings(document)),
        ("What ran", parts.steps(document)),
        ("Notes and warnings", parts.notes(document)),
        ("Models and software", parts.provenance(document)),
    ]
    body = "".join(f"<section><h2>{escape(h)}</h2>{content}</section>" for h, content in sections)
    head = parts.identifiers(document, institution) + parts.notices(document)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="banner">{escape(NOT_A_DIAGNOSIS)}<span>{escape(RESEARCH_USE)}</span></header>'
        f"<h1>CT chest — AI analysis</h1>{head}"
        f"{body}<footer><h2>Disclaimers</h2>{parts.disclaimers(document)}</footer></body></html>\n"
    )


def render_pdf(html_text: str) -> bytes:
    """``html_text`` (from :func:`render_html`) printed to PDF by WeasyPrint: A4, the page's own CSS.

    Only ``data:`` URIs are fetched (the page needs nothing else; a stray link fetches nothing).
    Raises :class:`ReportUnavailable` when WeasyPrint cannot load the system libraries it draws
    text with (Pango: Debian ``libpango-1.0-0`` and ``libpangoft2-1.0-0``).
    """
    try:
        import weasyprint
    except OSError as exc:  # cffi's dlopen of Pango, GObject or HarfBuzz failed
        raise ReportUnavailable(
            "the PDF report needs the Pango text library, which WeasyPrint could not load "
            f"({exc}). Fix: install it (Debian/Ubuntu: apt-get install {PANGO_PACKAGES}) and "
            "restart ctwatch; the HTML report is made without it."
        ) from exc
    fetcher = weasyprint.URLFetcher(allowed_protocols=["data"])
    pdf = weasyprint.HTML(string=html_text, base_url=None, url_fetcher=fetcher).write_pdf()
    return bytes(pdf)  # write_pdf without a target returns the document's bytes
