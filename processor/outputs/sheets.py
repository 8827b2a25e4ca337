"""Sheet layout shared by the workbooks: tables of values, header style, wrapped-text row heights,
print set-up.

Sizes follow the spreadsheet conventions: a column width is in characters of the default font's
digit (Calibri 11: 7 px), a row height in points (one line of the 11 pt default font: 15 pt, as
Excel draws it). Excel and LibreOffice do not grow a row for wrapped text that openpyxl wrote, so
every wrapped cell's row is given the height of its lines here; over-estimating leaves white
space, under-estimating would hide text.

How many lines a text takes is estimated as both programs wrap: word by word, breaking a word
longer than a line, each character as wide as :data:`CHAR_WIDTHS` says — the wider of Calibri as
Excel draws it and DejaVu Sans, the face LibreOffice prints in where neither Calibri nor Carlito is
installed. Measured in LibreOffice's PDF (DejaVu Sans): a column ``W`` wide holds text up to
``W - 0.3`` digit widths per line, lines 12.8 pt apart; Excel's line is 15 pt. The estimate keeps
a small margin (:data:`LINE_MARGIN`) and Excel's line height: in LibreOffice without Calibri or
Carlito, rows keep some white space rather than cut text in Excel.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from openpyxl.styles import Alignment, Font, PatternFill
from openpyxl.worksheet.page import PageMargins
from openpyxl.worksheet.properties import PageSetupProperties
from openpyxl.worksheet.worksheet import Worksheet

LINE_POINTS = 15.0  # one line of the default 11 pt font, as Excel draws it (LibreOffice: 12.8)
MAX_ROW_POINTS = 409.0  # the largest row height Excel accepts
LINE_MARGIN = 0.35  # digit widths of a column's width left unused per line: LibreOffice uses all but 0.3
BOLD = 1.15  # bold text is wider: DejaVu Sans Bold 12.5 %, Calibri Bold about 6 %

# Advance of each character in digit widths (the unit of a column width), the wider of: Calibri 11
# in Excel (XlsxWriter's CHAR_WIDTHS, "taken from Excel", pixels at 96 dpi / 7) and DejaVu Sans
# (advance / advance of "0"), rounded up to 0.05. Other characters: DEFAULT_WIDTH, or WIDE_WIDTH for
# East Asian wide ones.
_WIDTH_GROUPS = {
    0.45: "'",
    0.5: " ",
    0.6: ",.:;Iijl",
    0.75: "!()-J[]frt–°",
    0.8: "`",
    0.9: '"/L\\csz',
    1.0: "$*0123456789?EFSTY_agkvxy{|}•µ",
    1.1: "Z",
    1.15: "BCKPRXbdehnopqu",
    1.3: "ADGHUV",
    1.35: "#+<=>^~≥≤→×",
    1.45: "&NOQ",
    1.6: "%w…",
    1.75: "Mm",
    1.9: "@W—",
}
CHAR_WIDTHS: dict[str, float] = {ch: w for w, chars in _WIDTH_GROUPS.items() for ch in chars}
DEFAULT_WIDTH = 1.2  # an accented letter or a symbol not listed (XlsxWriter's default: 8 px)
WIDE_WIDTH = 2.0  # East Asian wide and full-width characters
HEADER_FILL = "FF1F4E78"
FONT = "Calibri"  # the workbook's default font; a font left unnamed prints in a serif face in LibreOffice


def char_width(ch: str) -> float:
    """One character's advance in digit widths (see :data:`CHAR_WIDTHS`); 0 for a combining mark."""
    width = CHAR_WIDTHS.get(ch)
    if width is not None:
        return width
    if unicodedata.combining(ch):
        return 0.0
    return WIDE_WIDTH if unicodedata.east_asian_width(ch) in ("W", "F") else DEFAULT_WIDTH


def wrapped_lines(text: str, width: float, *, bold: bool = False) -> int:
    """Lines ``text`` takes in a wrapped cell ``width`` characters wide: explicit newlines kept, words
    wrapped at spaces, a word longer than a line broken, as both programs do."""
    scale = BOLD if bold else 1.0
    room = max(width - LINE_MARGIN, 1.0)
    space = char_width(" ") * scale
    total = 0
    for paragraph in str(text).split("\n"):
        lines, used = 1, 0.0
        for word in paragraph.split(" "):
            advances = [char_width(ch) * scale for ch in word]
            need = sum(advances)
            if used and used + space + need <= room:
                used += space + need
                continue
            if used:
                lines, used = lines + 1, 0.0
            for advance in advances:  # a fresh line; a word wider than it breaks where it must
                if used and used + advance > room:
                    lines, used = lines + 1, 0.0
                used += advance
        total += lines
    return total


def row_points(lines: int) -> float:
    return min(MAX_ROW_POINTS, LINE_POINTS * max(1, lines))


def set_up_printing(
    ws: Worksheet,
    *,
    title: str,
    print_area: str | None = None,
    title_rows: str | None = None,
    grid: bool = True,
) -> None:
    """A4 landscape, one page wide and as many pages tall as needed, narrow margins, ``title`` in
    the page header and "page N of M" in the footer; ``title_rows`` (e.g. ``"1:1"``) repeat on
    every page; ``print_area`` (e.g. ``"A1:O20"``) limits what prints; ``grid`` prints cell lines."""
    ws.page_setup.orientation = "landscape"
    ws.page_setup.paperSize = ws.PAPERSIZE_A4
    ws.page_setup.fitToWidth = 1
    ws.page_setup.fitToHeight = 0  # 0: as many pages tall as the rows need
    if ws.sheet_properties.pageSetUpPr is None:
        ws.sheet_properties.pageSetUpPr = PageSetupProperties()
    ws.sheet_properties.pageSetUpPr.fitToPage = True
    ws.page_margins = PageMargins(left=0.25, right=0.25, top=0.55, bottom=0.5, header=0.25, footer=0.2)
    ws.print_options.gridLines = grid
    ws.oddHeader.left.text = title.replace("&", "&&")  # & starts a header code
    ws.oddHeader.left.size = 9
    ws.oddFooter.right.text = "page &P of &N"
    ws.oddFooter.right.size = 9
    if title_rows:
        ws.print_title_rows = title_rows
    if print_area:
        ws.print_area = print_area


def cell_value(value: Any) -> Any:
    """``value`` as a cell holds it: None and NaN leave the cell empty, infinity is the text "inf" or
    "-inf" (as pandas' ``to_excel`` wrote them, which the workbooks used before; Excel has neither).
    In text, each control character a worksheet cannot hold (XML 1.0 allows none of U+0000-U+001F
    but tab, newline and carriage return; openpyxl's ``ILLEGAL_CHARACTERS_RE``) is shown as ``\\xNN``,
    as :func:`processor.names.display_name` shows names: openpyxl refuses the whole workbook for one
    such character (a DICOM description with a stray control byte)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return ILLEGAL_CHARACTERS_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", value)
    return value


def write_table(ws: Worksheet, top: int, headers: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> int:
    """``headers`` in row ``top`` (1-based), then one row of cells per mapping in ``rows``, the value
    under each header (:func:`cell_value`; a missing key leaves the cell empty; text is always text —
    openpyxl would store a string that starts with "=" as a formula). Values only: styles,
    number formats and widths are the caller's. Returns how many rows were written below the headers."""
    for col, header in enumerate(headers, start=1):
        ws.cell(row=top, column=col, value=header)
    written = 0
    for written, row in enumerate(rows, start=1):
        for col, header in enumerate(headers, start=1):
            value = cell_value(row.get(header))
            if value is not None:
                cell = ws.cell(row=top + written, column=col, value=value)
                if isinstance(value, str) and cell.data_type == "f":
                    cell.data_type = "s"  # text from outside ("=…" in a file name): never a formula
    return written


def style_header(ws: Worksheet, row: int, widths: Sequence[float]) -> None:
    """Bold white on blue, wrapped, the row as tall as its longest header needs."""
    lines = 1
    for col, width in enumerate(widths, start=1):
        cell = ws.cell(row=row, column=col)
        cell.font = Font(name=FONT, bold=True, color="FFFFFFFF")
        cell.fill = PatternFill("solid", fgColor=HEADER_FILL)
        cell.alignment = Alignment(vertical="center", wrap_text=True)
        lines = max(lines, wrapped_lines(str(cell.value or ""), width, bold=True))
    ws.row_dimensions[row].height = row_points(lines)
