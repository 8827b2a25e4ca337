"""How a file's data set is encoded — decided once, from its bytes, for every reader (issue 13).

The rule: a file's encoding is what its bytes show, checked against what its header declares.
The first element of the data set (after the 128-byte preamble and ``DICM``, and after the file
meta group when there is one) is probed: two uppercase letters that form a DICOM VR at its bytes
4–5 mean Explicit VR, anything else Implicit VR; a first tag group that only reads small when
taken big endian means Explicit VR Big Endian; a deflated body is one that inflates to such an
element. The probe is verified: the next few elements must step in the same encoding. Where the declared TransferSyntaxUID (missing in a bare data set, or in a meta group
without it) says otherwise for these four plain encodings, the bytes win and the file is read
as what it is; for a compressed syntax the declared one names the codec and only the VR
encoding comes from the bytes. A body that shows none of these is refused with that reason.

:func:`decide` is the rule; the lean header walker (``fastheader.walk``), the pydicom reader
:func:`read_file` (the header scan's fallback and the pixel decoder's full parse) and the fast
pixel view all use the one :class:`Encoding` it returns, so the scan and the decoder never
disagree about a file. :func:`plain_cause` turns a reader library's exception into words for a
user (no internal advice such as pydicom's "use force=True").
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from processor.deflate import ERRORS as INFLATE_ERRORS
from processor.deflate import inflater

IMPLICIT_LE, EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
DEFLATED, BIG_ENDIAN = "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"
PLAIN = frozenset({IMPLICIT_LE, EXPLICIT_LE, DEFLATED, BIG_ENDIAN})  # syntaxes the bytes can correct
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
VRS = frozenset(
    {
        b"AE",
        b"AS",
        b"AT",
        b"CS",
        b"DA",
        b"DS",
        b"DT",
        b"FD",
        b"FL",
        b"IS",
        b"LO",
        b"LT",
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"PN",
        b"SH",
        b"SL",
        b"SQ",
        b"SS",
        b"ST",
        b"SV",
        b"TM",
        b"UC",
        b"UI",
        b"UL",
        b"UN",
        b"UR",
        b"US",
        b"UT",
        b"UV",
    }
)
PROBE_BYTES = 6  # bytes of the first element the rule looks at: tag (4) and, when explicit, VR (2)
VERIFY_ELEMENTS = 4  # elements stepped over to verify the probe
_INFLATE_PROBE = 1024  # compressed bytes inflated (to at most this many) to probe a deflated body
_FIX = (
    "re-export the series from the scanner or PACS (or rewrite the file, e.g. with dcmtk "
    "`dcmconv`), then drop it again"
)


class Unreadable(Exception):
    """A file ctwatch refuses to read; the message is the cause in plain words, ``fix`` the remedy."""

    def __init__(self, cause: str, fix: str = _FIX) -> None:
        super().__init__(cause)
        self.fix = fix


@dataclass(frozen=True, slots=True)
class Encoding:
    """How the data set of one file is read, decided by :func:`decide`."""

    transfer_syntax: str  # what the data set and its pixels are read as
    declared: str  # the file meta's TransferSyntaxUID ('' when there is none)
    implicit: bool
    little: bool
    deflated: bool
    start: int  # where the data set starts in the file's bytes


def name(syntax: str) -> str:
    """A transfer syntax in words ('no transfer syntax' when empty)."""
    if not syntax:
        return "no transfer syntax"
    try:
        known = UID(syntax).name
    except (ValueError, AttributeError):  # pragma: no cover - UID accepts any string
        known = ""
    return known if known and known != syntax else syntax


def correction(declared: str, syntax: str, implicit: bool) -> str | None:
    """'declared X, read as Y' when the bytes overrode the header, else None.

    A bare data set (no TransferSyntaxUID) read as Implicit VR Little Endian needs no note: that is
    the convention for such files.
    """
    if declared in PLAIN or not declared:
        if syntax == (declared or IMPLICIT_LE) and implicit == (syntax == IMPLICIT_LE):
            return None
    elif not implicit:
        return None  # a compressed syntax read as it declares
    with_vr = syntax not in PLAIN or (syntax == DEFLATED and implicit)
    read_as = f"{name(syntax)} with {'Implicit' if implicit else 'Explicit'} VR" if with_vr else name(syntax)
    return f"declared {name(declared)}, read as {read_as}"


def _probe(buf: bytes | memoryview, pos: int) -> tuple[bool, bool] | None:
    """(implicit, little) as the element at ``pos`` shows it; None when it is no element."""
    head = bytes(buf[pos : pos + PROBE_BYTES])
    if len(head) < PROBE_BYTES:
        return None
    group_le, group_be = struct.unpack_from("<H", head)[0], struct.unpack_from(">H", head)[0]
    vr = head[4:6]
    if vr in VRS:
        return False, not (group_le >= 0x0400 and group_be < 0x0400)
    if 0x41 <= vr[0] <= 0x5A and 0x41 <= vr[1] <= 0x5A:
        return None  # two capitals that are no VR: neither encoding reads this element
    if group_le > 0x7FE0:
        return None  # no data set starts with such a group
    return True, True


def _verified(buf: bytes | memoryview, pos: int) -> tuple[bool, bool] | None:
    """The probe at ``pos``, when the elements that follow step in that encoding too."""
    probe = _probe(buf, pos)
    return probe if probe is not None and _reads(buf, pos, *probe) else None


ELEMENT_CUT = -1  # element_head's value length when a long-VR header runs past the bytes at hand
# (implicit header, explicit header, 4-byte length) layouts of each byte order: an element's first
# 8 bytes are read in one unpack (tag and 4-byte length, or tag, VR and 2-byte length)
_LITTLE = (struct.Struct("<HHL"), struct.Struct("<HH2sH"), struct.Struct("<L"))
_BIG = (struct.Struct(">HHL"), struct.Struct(">HH2sH"), struct.Struct(">L"))


def element_head(
    buf: bytes | memoryview, pos: int, implicit: bool, little: bool
) -> tuple[int, int, int, int] | None:
    """``(group, element, value length, header length)`` of the data element at ``pos`` in this
    encoding (PS3.5 §7.1: 8-byte headers, 12 for the long VRs), or None when an explicit VR is no VR.
    The caller makes sure 8 bytes are there; a 12-byte header cut by the end of ``buf`` has the value
    length :data:`ELEMENT_CUT`. A value length of 0xFFFFFFFF is undefined (a sequence)."""
    implicit_head, explicit_head, ul = _LITTLE if little else _BIG
    if implicit:
        group, element, length = implicit_head.unpack_from(buf, pos)
        return group, element, length, 8
    group, element, vr, length = explicit_head.unpack_from(buf, pos)
    if vr not in VRS:
        return None
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            return group, element, ELEMENT_CUT, 12
        return group, element, ul.unpack_from(buf, pos + 8)[0], 12
    return group, element, length, 8


def _reads(buf: bytes | memoryview, pos: int, implicit: bool, little: bool) -> bool:
    """Whether the first elements at ``pos`` step as a data set in this encoding: up to
    :data:`VERIFY_ELEMENTS` elements, each with a tag outside the item group, a VR (when explicit),
    and a value that ends inside ``buf``. Bytes that end after at least one whole element (a
    prefix) count as read."""
    end = len(buf)
    for n in range(VERIFY_ELEMENTS):
        if pos + 8 > end:
            return n > 0 or pos == end
        head = element_head(buf, pos, implicit, little)
        if head is None or head[0] == 0xFFFE:
            return False
        length = head[2]
        if length == ELEMENT_CUT:
            return n > 0
        if length == 0xFFFFFFFF:
            return True  # a sequence (or encapsulated pixels): not stepped over here
        pos += head[3] + length
        if pos > end:
            return n > 0
    return True


def _inflated_head(buf: bytes | memoryview, start: int) -> bytes | None:
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        return inflater.decompress(bytes(buf[start : start + _INFLATE_PROBE]), _INFLATE_PROBE)
    except zlib.error:
        return None


def decided_for_good(encoding: Encoding, available: int) -> bool:
    """Whether :func:`decide`'s answer on a file's first ``available`` bytes stands whatever bytes
    follow them. It does unless the file meta declares Deflated and the bytes end inside the
    window :func:`decide` inflates to test that (:data:`_INFLATE_PROBE` bytes from the data set's
    start): a body that inflates to elements only with more of that window would be read as
    deflated there, and as plain on the cut bytes. Its other tests read the data set's first
    elements, which a reader that found Pixel Data inside the same bytes (the header walker, the
    prefix parse) has read whole: there they give what they give on the whole file."""
    return encoding.declared != DEFLATED or available >= encoding.start + _INFLATE_PROBE


def decide(buf: bytes | memoryview, start: int, declared: str) -> Encoding:
    """The encoding of the data set starting at ``start`` (see the module docstring for the rule).

    Raises :class:`Unreadable` when the bytes there are no data set element in any encoding.
    """
    declared = declared.strip("\0 ")
    if start >= len(buf):  # no data set (or a prefix that ends with the file meta): as declared
        implicit = declared in ("", IMPLICIT_LE)
        return Encoding(declared or IMPLICIT_LE, declared, implicit, declared != BIG_ENDIAN, False, start)
    probe = _verified(buf, start)
    if declared == DEFLATED or probe is None:
        inflated = _inflated_head(buf, start)
        found = _verified(inflated, 0) if inflated is not None else None
        if found is not None and found[1]:
            return Encoding(DEFLATED, declared, found[0], True, True, start)
    if probe is None:
        raise Unreadable(
            f"its data set does not start with a DICOM element in any encoding (it declares "
            f"{name(declared)}); the file is damaged or not DICOM"
        )
    implicit, little = probe
    if declared in PLAIN or not declared or not little:
        syntax = (IMPLICIT_LE if implicit else EXPLICIT_LE) if little else BIG_ENDIAN
    else:
        syntax = declared  # a compressed (or private) syntax names the codec; the VR comes from the bytes
    return Encoding(syntax, declared, implicit, little, False, start)


# --- the pydicom reader, told the decided encoding --------------------------------------------------


def _group(buf: bytes | memoryview, pos: int) -> int | None:
    two = bytes(buf[pos : pos + 2])
    return struct.unpack("<H", two)[0] if len(two) == 2 else None


_PIXEL_TAGS = frozenset((0x7FE00010, 0x7FE00008, 0x7FE00009))  # Pixel Data, Float / Double Float Pixel Data


def _stop_at_pixels(tag: BaseTag, vr: str | None, length: int) -> bool:
    # int(tag): BaseTag compares in Python, three calls a tuple; a plain int hashes in C (pydicom
    # asks for every element of every header it parses)
    return int(tag) in _PIXEL_TAGS


def read_file(
    data: bytes | memoryview, *, stop_before_pixels: bool
) -> tuple[FileDataset, Encoding, int | None]:
    """Parse a file with pydicom in the encoding :func:`decide` finds in its bytes.

    Returns the dataset (its ``original_encoding`` is the decided one; its file meta as stored),
    the :class:`Encoding`, and where the Pixel Data element starts in ``data`` (None when the
    parse did not stop there, or the data set was inflated). Files with or without the preamble,
    with or without a file meta group are read alike. Raises :class:`Unreadable`, or pydicom's
    own exceptions on a damaged body (:func:`plain_cause` words them).
    """
    fp = io.BytesIO(data)
    preamble = None
    if bytes(data[128:132]) == b"DICM":
        preamble = bytes(data[:128])
        fp.seek(132)
    file_meta = FileMetaDataset()
    if _group(data, fp.tell()) == 0x0002:
        meta_probe = _probe(data, fp.tell())  # Explicit VR LE by the standard; an implicit one is read so
        meta_implicit = meta_probe is None or meta_probe[0]
        file_meta = FileMetaDataset(
            read_dataset(fp, meta_implicit, True, stop_when=lambda tag, vr, length: tag >> 16 != 0x0002)
        )
    if _group(data, fp.tell()) == 0x0000:  # a command set (always Implicit VR LE): kept, as pydicom does
        command = read_dataset(fp, True, True, stop_when=lambda tag, vr, length: tag >> 16 != 0x0000)
    else:
        command = Dataset()
    declared = str(file_meta.get("TransferSyntaxUID", "") or "")
    encoding = decide(data, fp.tell(), declared)
    source: io.BytesIO = fp
    if encoding.deflated:
        source = io.BytesIO(_inflate_data_set(data[encoding.start :]))
    dataset = read_dataset(
        source, encoding.implicit, encoding.little, stop_when=_stop_at_pixels if stop_before_pixels else None
    )
    dataset.update(command)
    at = source.tell()
    offset = at if source is fp and bytes(data[at : at + 4]) == b"\xe0\x7f\x10\x00" else None
    ds = FileDataset(fp, dataset, preamble, file_meta, encoding.implicit, encoding.little)
    ds.set_original_encoding(encoding.implicit, encoding.little, dataset.original_character_set)
    return ds, encoding, offset


DEFLATED_MAX_RATIO = 200  # as limits.max_ratio's default for ZIP members
DEFLATED_FLOOR_BYTES = 64 * 2**20  # a small data set may inflate this far whatever its ratio
DEFLATED_MAX_BYTES = 2 * 2**30  # and none further


def _inflate_data_set(deflated: bytes | memoryview) -> bytes:
    """A Deflated Explicit VR Little Endian data set (PS3.5 A.5), inflated no further than
    :data:`DEFLATED_MAX_RATIO` times its size (at least :data:`DEFLATED_FLOOR_BYTES`, at most
    :data:`DEFLATED_MAX_BYTES`): the ZIP's caps bound the member, not what a deflated data set
    inside it inflates to — a 1 MB file could otherwise ask for gigabytes of memory."""
    limit = min(DEFLATED_MAX_BYTES, max(DEFLATED_FLOOR_BYTES, DEFLATED_MAX_RATIO * len(deflated)))
    stream = inflater()
    try:
        out = stream.decompress(deflated, limit + 1)
        if len(out) <= limit and not stream.eof:
            out += stream.decompress(b"", limit + 1 - len(out))  # output the inflater held back
    except INFLATE_ERRORS as exc:
        raise Unreadable(f"its deflated data set does not inflate ({exc}): the file is damaged") from exc
    if len(out) > limit:
        raise Unreadable(
            f"its deflated data set inflates past {limit / 2**20:.0f} MB, more than "
            f"{DEFLATED_MAX_RATIO} times its {len(deflated)} bytes: refused as a decompression bomb"
        )
    if not stream.eof:
        raise Unreadable("its deflated data set ends short: the file is cut off or damaged")
    return out


# --- a library's exception in words ------------------------------------------------------------------

_ADVICE = re.compile(
    r"[^.]*\b(?:force\s*=\s*True|force reading|pydicom\.config|config\.settings|"
    r"reading_validation_mode|raise an issue|github\.com)\b[^.]*\.?",
    re.IGNORECASE,
)


# what pydicom raises when it reads a data set, or converts one value of it, that it cannot read
# (a truncated element, IS 'abc', a PatientID stored as FD of 4 bytes, a text stored as a broken SQ…)
VALUE_ERRORS = (
    InvalidDicomError,
    ValueError,
    EOFError,
    KeyError,
    TypeError,
    AttributeError,
    OverflowError,
    IndexError,
    NotImplementedError,
    struct.error,
    BytesLengthException,
    RecursionError,  # a value that is sequences nested hundreds deep, converted when it is read
)
_WRONG_LENGTH = re.compile(r"parse (\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)) according to VR '(\w+)'")


def plain_cause(exc: BaseException) -> str:
    """The message of a reader library's exception, on one line, without the library's own advice.

    pydicom's ``BytesLengthException`` quotes the value it could not read (a patient's name or ID,
    perhaps): only the element and its VR are said."""
    if isinstance(exc, BytesLengthException):
        found = _WRONG_LENGTH.search(str(exc))
        where = f" of {found.group(1)}, VR {found.group(2)}" if found else ""
        return f"the length of a value{where} does not fit its value representation"
    text = " ".join(str(exc).split())
    text = _ADVICE.sub("", text).strip(" .;:")
    return text[:300] if text else f"the reader failed ({type(exc).__name__})"
