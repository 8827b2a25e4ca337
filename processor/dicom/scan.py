"""Find DICOM among an arrival's members by content, read headers only, group into studies/series.

DICOM is recognised by its ``DICM`` preamble marker, or — for files written without a preamble —
by a header parse that yields the three instance UIDs. Before anything is parsed, a member's first
bytes must look like the start of a DICOM file (:func:`looks_like_dicom`): zeros, text, HTML,
PDF, images and random bytes are "not DICOM" from their first bytes, never inflated whole nor
parsed. ``DICOMDIR``, ``__MACOSX/``, ``.DS_Store``, other files and corrupt DICOM are skipped and
counted by reason.

Each file's header is read by the lean walker of :mod:`processor.dicom.fastheader` (the values
grouping, selection and decoding need, and where Pixel Data starts); a layout it declines is
parsed by pydicom (``stop_before_pixels``) instead. Both read the data set in the encoding its
bytes show (:mod:`processor.dicom.encoding`; a header that declares another one is logged as
``scan.encoding``), and so does the pixel decoder. The full pydicom header of a file is parsed
on demand (``Instance.header``) and eagerly for the first file of every series, while the
arrival is still open.

Before the data set, a file's first bytes are checked (``DICM``, the elements after it, the file
meta group, the data set's encoding). A file that holds the bytes those checks read in an
earlier file of its folder, but for the values none of them reads (the MediaStorageSOPInstanceUID,
the values of the data set's first elements), gets that file's answers instead
(:class:`Prologues`, :func:`prologue_of`): the files of a series differ there only in such values.

A member's header is read from its first :data:`FIRST_READ` bytes (read where they lie, or
inflated) when it ends there, else from its first :data:`HEADER_PREFIX` bytes, otherwise from the
whole member, each read once. The scan reads fewer first where the files of the member's folder
had shorter headers: the longest of them and :data:`HEADER_MARGIN` bytes more (the files of a
series differ by a few bytes; one whose header is longer is read further as above, once for each
time the folder's longest header grows, whatever order its files come in). A ZIP member's CRC is
checked when it is read whole (members up to :data:`HEADER_PREFIX` always are), so a bad CRC past
the header surfaces when the member is decoded.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence

from processor.bytesource import Buffer, Member
from processor.dicom.alike import Alike
from processor.dicom.encoding import (
    DEFLATED,
    ELEMENT_CUT,
    VALUE_ERRORS,
    VERIFY_ELEMENTS,
    Encoding,
    Unreadable,
    correction,
    decided_for_good,
    element_head,
    plain_cause,
    read_file,
)
from processor.dicom.fastheader import (
    WANTED,
    Declined,
    Facts,
    Prologue,
    Truncated,
    Walked,
    before_data_set,
    facts_from_dataset,
    facts_of,
    walk,
)
from processor.errors import StepError

log = logging.getLogger(__name__)
_T = TypeVar("_T")

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
FIRST_READ = 16 * 1024  # bytes read first for a header; CT headers are ~2–10 KB
HEADER_PREFIX = 64 * 1024  # bytes read for a header that goes past FIRST_READ
HEADER_MARGIN = 1024  # bytes read first past the furthest its folder's files had their Pixel Data
MIN_FIRST_READ = 4096  # never fewer read first: the start checks decide on the first elements
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
# A data set holding SOPInstanceUID (0008,0018), its tags ascending, starts in one of these groups:
# command (0000), file meta (0002), directory (0004), identifying (0008).
_FIRST_GROUPS = frozenset({0x0000, 0x0002, 0x0004, 0x0008})
_START_ELEMENTS = 4  # elements stepped over by looks_like_dicom
_INFLATE_PROBE = 1024  # bytes of a bare deflated data set inflated by looks_like_dicom
# (implicit, little) tried by looks_like_dicom: Explicit VR LE, Implicit VR LE, Explicit VR BE
_ENCODINGS = ((False, True), (True, True), (False, False))
_TAG_LE, _TAG_BE = struct.Struct("<HH"), struct.Struct(">HH")  # an element's (group, element)
PARSE_ERRORS = VALUE_ERRORS  # a header pydicom cannot parse: the file is corrupt DICOM
_UNREADABLE = (
    OSError,
    RuntimeError,
    EOFError,
    zipfile.BadZipFile,
    zlib.error,
)  # CRC, truncation, bad inflate


class Instance:
    """One DICOM file: where its bytes are, its header facts, and (on demand) its full header."""

    __slots__ = ("member", "facts", "pixel_offset", "_header")

    def __init__(
        self, member: Member, facts: Facts, pixel_offset: int | None = None, header: Dataset | None = None
    ) -> None:
        self.member = member
        self.facts = facts
        self.pixel_offset = pixel_offset  # where the (7FE0,0010) element starts in the member's bytes
        self._header = header

    @property
    def sop_uid(self) -> str:
        return self.facts.sop_uid

    def value(self, keyword: str, default: Any = None) -> Any:
        """A value of the file's header, or ``default`` (also when it cannot be read: :func:`header_value`)."""
        return header_value(self.header, keyword, default, self.member.name)

    @property
    def header(self) -> Dataset:
        """The file's whole header as pydicom reads it (no pixel data); parsed once, on first use."""
        if self._header is None:
            try:
                header, _, _ = member_header(self.member)
            except CorruptDicom as exc:
                raise CorruptDicom(f"cannot read the header of {self.member.name}: {exc}") from exc
            except _UNREADABLE as exc:
                raise CorruptDicom(
                    f"cannot read {self.member.name} ({plain_cause(exc)}): the member is "
                    "corrupt or truncated — copy the study again from the source"
                ) from exc
            if header is None:
                raise CorruptDicom(f"the header of {self.member.name} no longer parses")
            self._header = header
        return self._header

    def __repr__(self) -> str:
        return f"Instance({self.member.name!r}, sop_uid={self.sop_uid!r})"


@dataclass
class Series:
    uid: str
    instances: list[Instance] = field(default_factory=list)
    _memo: dict[str, tuple[tuple[Instance, ...], Any]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def memo(self, key: str, compute: Callable[[], _T]) -> _T:
        """``compute()`` once for the series' instances: what a pure function of them returned
        (its frames, its image stack) is remembered while the series holds the same instance
        objects in the same order, and computed again once the list changed. Not pickled."""
        held = self._memo.get(key)
        instances = self.instances
        if held is not None and len(held[0]) == len(instances) and all(map(operator.is_, held[0], instances)):
            return held[1]  # type: ignore[no-any-return]
        value = compute()
        self._memo[key] = (tuple(instances), value)
        return value

    def remember(self, key: str, value: Any) -> None:
        """Hold ``value`` as what :meth:`memo` computes for ``key`` from the series' instances as they
        are now: for a caller that derived it from what was computed for another series (the
        frames of an image stack from its series' frames)."""
        self._memo[key] = (tuple(self.instances), value)

    def sharing_memo(self) -> Series:
        """A series of the same instances in a list of its own, sharing this one's :meth:`memo`
        (each entry is checked against the instances it was computed from, so a list changed on
        either side is computed again, never answered from the other's)."""
        twin = Series(self.uid, list(self.instances))
        twin._memo = self._memo
        return twin

    def __getstate__(self) -> dict[str, Any]:
        return {"uid": self.uid, "instances": self.instances}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.uid, self.instances, self._memo = state["uid"], state["instances"], {}

    def _first(self, keyword: str, default: object = None) -> Any:
        """The header value of the first instance (any DICOM value type), or ``default`` (also when
        it cannot be read: :func:`header_value`)."""
        return self.instances[0].value(keyword, default) if self.instances else default

    @property
    def modality(self) -> str:
        return _text(self._first("Modality")) or ""

    @property
    def number(self) -> int | None:
        """SeriesNumber of the first header; None when it is absent or not one whole number."""
        return whole_number(self._first("SeriesNumber"))

    @property
    def description(self) -> str:
        return _text(self._first("SeriesDescription")) or ""


@dataclass
class Study:
    uid: str
    series: dict[str, Series] = field(default_factory=dict)

    @property
    def accession(self) -> str | None:
        return _text(self._first_value("AccessionNumber"))

    def _first_value(self, keyword: str) -> Any:
        """A value of the header of the study's first file (:meth:`Instance.value`)."""
        return next(iter(self.series.values())).instances[0].value(keyword)

    @property
    def patient_id(self) -> str | None:
        """PatientID (0010,0020) of the first header. Never store or log it: the state keeps only
        its keyed hash (``State.patient_key``)."""
        return _text(self._first_value("PatientID"))

    @property
    def issuer_of_patient_id(self) -> str | None:
        """IssuerOfPatientID (0010,0021) of the first header: the namespace of the PatientID."""
        return _text(self._first_value("IssuerOfPatientID"))

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series.values())


@dataclass
class ScanResult:
    studies: list[Study]
    skipped: Counter[str]
    dicom_files: int


def header_value(header: Dataset, keyword: str, default: Any = None, name: str = "") -> Any:
    """``header.get(keyword, default)``; ``default`` also when pydicom cannot convert the value it
    holds (:data:`VALUE_ERRORS`: an IS that is no number, a value whose length does not fit its VR),
    logged with the file's ``name``: one unreadable value of a header reads as missing (as
    :func:`processor.dicom.fastheader.facts_from_dataset` reads the values of the facts), never a
    failure of the study or of the batch it came in."""
    try:
        return header.get(keyword, default)
    except VALUE_ERRORS as exc:
        # the exception's type only: its words may quote the value (a patient's ID)
        log.warning(
            "header.unreadable_value member=%s keyword=%s error=%s", name, keyword, type(exc).__name__
        )
        return default


_NO_TEXT = (bytes, bytearray, PydicomSequence, Dataset)  # values of a VR that holds no text


def whole_number(value: Any) -> int | None:
    """A header value as the whole number it states (an IS '2.0' is 2); None when it is absent,
    empty, fractional (IS '1.5', which pydicom holds as 1), not finite, several values, or no
    number as its VR says (bytes of an OB)."""
    number = stated_number(value)
    return int(number) if number is not None and number.is_integer() else None


def stated_number(value: Any) -> float | None:
    """A header value as the finite number it states, read from the text it was stored as where
    pydicom kept that (``original_string`` of IS and DS); None when it is absent, empty, several
    values, not finite or no number as its VR says (bytes of an OB)."""
    if value is None or isinstance(value, _NO_TEXT):
        return None
    try:
        number = float(getattr(value, "original_string", value))
    except VALUE_ERRORS:  # empty, several values (1\2), a text that is no number
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str | None:
    """A text attribute's value as text (several values as pydicom shows them); None when it is
    absent or empty, or is no text (bytes of an odd VR, a sequence: none of it is shown or hashed)."""
    if not value or isinstance(value, _NO_TEXT):
        return None
    try:
        return str(value)
    except VALUE_ERRORS:
        return None


def _skip_reason_by_name(name: str) -> str | None:
    parts = name.split("/")
    base = parts[-1].lower()
    if "__MACOSX" in parts or base.startswith("._"):
        return "macOS metadata (__MACOSX)"
    if base in _JUNK_NAMES:
        return f"system file ({parts[-1]})"
    if base == "dicomdir":
        return "DICOMDIR index"
    return None


Parsed = tuple[Dataset | None, int | None, Encoding | None]


def _parse_header(data: Buffer) -> Parsed:
    """(header or None when not DICOM, offset of the Pixel Data element in ``data`` or None, encoding).

    Read by pydicom in the encoding the bytes show (``processor.dicom.encoding``: the same rule as
    the lean walker's and the pixel decoder's), with or without preamble and file meta group. The
    offset is given only when the parse stopped right at a ``(7FE0,0010)`` element of ``data``
    itself (not of a deflated dataset, which is inflated into a buffer of its own).
    """
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    try:
        ds, encoding, offset = read_file(data, stop_before_pixels=True)
    except Unreadable as exc:
        if has_preamble:
            raise CorruptDicom(str(exc)) from exc
        return None, None, None
    except PARSE_ERRORS as exc:
        if has_preamble:
            raise CorruptDicom(plain_cause(exc)) from exc
        return None, None, None
    header = _checked(ds, has_preamble)
    return (header, offset, encoding) if header is not None else (None, None, None)


def _checked(ds: Dataset, has_preamble: bool) -> Dataset | None:
    uids = [str(ds.get(k, "")) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    if not all(_UID.match(u) for u in uids):
        if has_preamble:
            raise CorruptDicom("missing SOP/Study/Series Instance UID")
        return None
    return ds


class CorruptDicom(StepError):
    """A file that claims to be DICOM but whose header cannot be read (during a step: the study fails
    with this message, the daemon lives)."""


def looks_like_dicom(head: Buffer) -> bool:
    """Whether a member's first bytes can begin a DICOM file — decided without parsing it.

    A Part 10 file has the 128-byte preamble and ``DICM`` (what follows is checked by
    :func:`read_instance`). A file written without them (pydicom #316, #860) starts with an
    element of group 0000, 0002, 0004 or 0008 (see :data:`_FIRST_GROUPS`), and its first elements
    step, their tags ascending, in Explicit VR or Implicit VR Little Endian, or Explicit VR Big
    Endian; a file meta group (Explicit VR Little Endian by the standard) that steps so is enough,
    whatever encoding its data set has. A bare deflated data set is one whose first bytes inflate
    to such elements.
    """
    return _start_verdict(head) is not False


def _start_verdict(head: Buffer) -> bool | None:
    """:func:`looks_like_dicom`, None where ``head`` ended before its first elements did (they step
    as far as they go): a longer head decides, or the whole member's end (then it is DICOM)."""
    if len(head) >= 132 and bytes(head[128:132]) == b"DICM":
        return True
    return _starts(head)


def _starts(buf: Buffer) -> bool | None:
    """Whether ``buf`` starts with DICOM elements (see :func:`looks_like_dicom`); None where ``buf``
    ended before the elements of every encoding they step in did."""
    verdicts = []
    for implicit, little in _ENCODINGS:
        verdict = _steps(buf, implicit, little)
        if verdict:
            return True
        verdicts.append(verdict)
    if None in verdicts:
        return None
    try:
        inflated = zlib.decompressobj(-zlib.MAX_WBITS).decompress(bytes(buf[:_INFLATE_PROBE]), _INFLATE_PROBE)
    except zlib.error:
        return False
    return any(_steps(inflated, implicit, True) is not False for implicit in (False, True))


def _steps(buf: Buffer, implicit: bool, little: bool) -> bool | None:
    """Whether the first :data:`_START_ELEMENTS` elements of ``buf`` step in this encoding. A
    sequence of undefined length or the end of a file meta group ends the walk (True); None where
    ``buf`` ended first (a value or header longer than ``buf``, a prefix): what was read decides."""
    end, pos, last = len(buf), 0, -1
    unpack_tag = _TAG_LE.unpack_from if little else _TAG_BE.unpack_from
    for n in range(_START_ELEMENTS):
        if pos + 8 > end:
            return None if n > 0 else False
        group, element = unpack_tag(buf, pos)
        if n > 0 and last >> 16 == 0x0002 and group != 0x0002:
            return True  # past a file meta group: the data set may have another encoding
        tag = group << 16 | element
        if tag <= last or group == 0xFFFE or (n == 0 and group not in _FIRST_GROUPS):
            return False
        head = element_head(buf, pos, implicit, little)
        if head is None:
            return False
        length, header = head[2], head[3]
        if length == ELEMENT_CUT:
            return None  # a header cut by the prefix's end: what was read decides
        if length == 0xFFFFFFFF:
            return True  # a sequence of undefined length
        pos, last = pos + header + length, tag
    return True


class _Bytes:
    """A member's first :data:`FIRST_READ` bytes (``head``), its first :data:`HEADER_PREFIX` bytes
    and all of them, as far as each is needed — each read (or inflated) at most once.

    The first read is small because the scan reads every file's head and CT headers are small: the
    bench study's 361 heads are 6 MB read in place of 23 MB (issue 18)."""

    def __init__(self, member: Member, first: int = FIRST_READ) -> None:
        self.member = member
        # a member no longer than HEADER_PREFIX is read whole (and so CRC-checked) as before
        self.head = member.head(HEADER_PREFIX if member.size <= HEADER_PREFIX else first)
        self._prefix: Buffer | None = self.head if len(self.head) >= member.size else None
        self._whole: Buffer | None = self._prefix

    def prefix(self) -> Buffer:
        """The first :data:`HEADER_PREFIX` bytes (all of them when the member is shorter)."""
        if self._prefix is None:
            self._prefix = self.member.head(HEADER_PREFIX)
            if len(self._prefix) >= self.member.size:
                self._whole = self._prefix
        return self._prefix

    def whole(self) -> Buffer:
        if self._whole is None:
            self._whole = self.member.data()
        return self._whole


def member_header(member: Member, prefix: int = HEADER_PREFIX, read: _Bytes | None = None) -> Parsed:
    """:func:`_parse_header` of a member, reading only its first ``prefix`` bytes when they hold the header."""
    if member.size > prefix:
        head = bytes(member.head(prefix)[:prefix] if read is None else read.prefix()[:prefix])
        if PIXEL_DATA_TAG in head:  # cheap gate: the header cannot end inside this prefix otherwise
            try:
                parsed = _parse_header(head)
            except CorruptDicom:
                parsed = (
                    None,
                    None,
                    None,
                )  # perhaps only cut short by the prefix: decide on the whole member
            if parsed[1] is not None and parsed[2] is not None and decided_for_good(parsed[2], len(head)):
                return parsed  # else decided on the whole member: more bytes could read otherwise
    return _parse_header(member.data() if read is None else read.whole())


@lru_cache(maxsize=1024)
def _is_uid(text: str) -> bool:
    """Whether ``text`` is a UID (:data:`_UID`); remembered, as a series' files share theirs."""
    return _UID.match(text) is not None


def _walked(
    read: _Bytes, alike: Alike | None = None, known: Prologue | None = None
) -> tuple[Facts, int | None, Prologue | None] | None:
    """Facts, Pixel Data offset and what the checks before the data set found (a
    :class:`.fastheader.Prologue`) by the lean walker, or None when it declines the layout."""
    try:
        walked = _walk_growing(read, alike, known)
        if walked is None:
            return None
        facts = facts_of(walked)
    except Declined:
        return None
    if not (_UID.match(facts.sop_uid) and _is_uid(facts.study_uid) and _is_uid(facts.series_uid)):
        return None  # pydicom decides what such a file is
    return facts, walked.pixel_offset, walked.prologue


def _walk_growing(read: _Bytes, alike: Alike | None, known: Prologue | None = None) -> Walked | None:
    """:func:`walk` of the member's head, else of its first :data:`HEADER_PREFIX` bytes, else of all
    of it: the first that holds the Pixel Data element (or is the whole member). None when the
    whole member is cut short; :class:`Declined` as ``walk`` raises it."""
    size, walked_bytes = read.member.size, 0
    for get in (lambda: read.head, read.prefix, read.whole):
        head = get()
        if len(head) <= walked_bytes:
            continue  # no longer than the bytes already walked
        walked_bytes = len(head)
        try:
            walked = walk(head, alike, known)  # a longer read begins with the bytes ``known`` matched
        except Truncated:
            if len(head) >= size:
                return None
            continue
        except Declined:
            if head is read.head and len(head) < size:
                continue  # its first elements may go past the head: decided on more bytes
            raise
        if walked.pixel_offset is not None or len(head) >= size:
            return walked
    return None


_UI = b"UI"
# a folder's files are learnt from from its third on: a folder of one or two files never matches
_LEARN_FROM = 3
_RELEARN = 4  # files of a folder that did not match a prologue, more than did, before none is learnt
_PROLOGUES_KEPT = 4  # prologues kept for a folder
# folders whose prologues are kept (the least recently met forgotten first), as Alike's layouts
_FOLDERS_KEPT = 64
_NEED_MAX = 2048  # bytes a prologue may cover (a file meta group and four elements: ~300–600 in CT)


def prologue_of(head: Buffer, found: Prologue | None = None, explicit: bool = False) -> Prologue | None:
    """The :class:`Prologue` of a Part 10 file whose header the lean walker read from ``head``, or
    None when its first bytes are not laid out so that a later file can be checked against them.
    ``found``: what :func:`.fastheader.before_data_set` found in these bytes (or in more of the
    same file), when the walk has it; else it is found again. ``explicit``: the caller found the
    elements after ``DICM`` to step in Explicit VR Little Endian (:func:`_steps`); else it is
    found here.

    Before a file's data set, the scan and the walker check its first bytes: that ``DICM`` is there
    and DICOM elements follow it (:func:`_starts`), the file meta group (:func:`.fastheader.before_data_set`)
    and the data set's encoding (:func:`.encoding.decide`). Each of those reads element headers,
    the group length, the wanted file meta values and the transfer syntax; none reads the value
    of an unwanted UI element of the file meta group (e.g. MediaStorageSOPInstanceUID, which
    differs from file to file of a series) nor the values of the data set's first elements, which
    :func:`.encoding.decide` steps over. ``same`` is every other byte before ``need``: a file
    that holds the same there gets the same answers from every one of those checks, as long as the
    file meta elements stepped in Explicit VR Little Endian (:func:`_starts` tries that first and
    stops there), the transfer syntax is not Deflated (whose check inflates values) and the file
    is at least ``need`` bytes long (every check then reads bytes that are there in both)."""
    view = memoryview(head)
    end = len(view)
    try:
        if end < 144 or not (explicit or _steps(view[132:], False, True) is True):
            return None
        if found is None:
            found = before_data_set(view, [])
    except (Declined, struct.error):
        return None
    if found.declared.strip("\0 ") == DEFLATED or not found.meta_starts:  # as decide strips it
        return None
    free: list[tuple[int, int]] = []
    pos = 144
    for at in found.meta_starts:  # the file meta elements, stepped as the walker stepped them
        head_of = element_head(view, at, False, True) if at == pos and at + 8 <= end else None
        if head_of is None or head_of[2] in (ELEMENT_CUT, 0xFFFFFFFF):
            return None
        group, element, length, header = head_of
        if bytes(view[at + 4 : at + 6]) == _UI and group << 16 | element not in WANTED:
            free.append((at + header, at + header + length))
        pos = at + header + length
    if pos != found.meta_end:
        return None
    for _ in range(VERIFY_ELEMENTS):  # the data set's first elements, stepped as decide steps them
        if pos + 8 > end:
            return None
        head_of = element_head(view, pos, found.implicit, True)
        if head_of is None or head_of[0] == 0xFFFE or head_of[2] == ELEMENT_CUT:
            return None
        length, header = head_of[2], head_of[3]
        if length == 0xFFFFFFFF:  # decide stops at a sequence, its header read
            pos += header
            break
        free.append((pos + header, pos + header + length))
        pos += header + length
        if pos > end:
            return None
    if pos > _NEED_MAX:
        return None  # e.g. a large private element in the file meta group: not kept in memory
    same, at = [], 0
    for start, stop in free:
        if start > at:
            same.append((at, start, bytes(view[at:start])))
        at = stop
    if pos > at:
        same.append((at, pos, bytes(view[at:pos])))
    return Prologue(
        found.meta,
        found.meta_end,
        found.transfer_syntax,
        found.implicit,
        found.declared,
        pos,
        tuple(same),
        (),
    )


class Prologues:
    """The prologues (:class:`Prologue`) learnt from the files of one folder of an arrival (the
    files of a series lie in one): a file that holds the ``same`` bytes as one of them is checked
    against it instead of in full (:func:`read_instance`). They are kept by the file meta group's
    length (the bytes 140–143), which moves with the length of the MediaStorageSOPInstanceUID: a
    series' UIDs often end in numbers of one, two and three digits (and several for one length,
    the latest learnt tried first: two layouts in turn both match). A file checked in full is
    learnt from, from the folder's :data:`_LEARN_FROM` th file on (learning costs about what a
    match saves: a folder of one or two files would only pay), until :data:`_RELEARN` more files
    did not match (or could not be learnt from) than matched, or more than :data:`_RELEARN` were
    learnt beyond one for every two matches — layouts that never repeat, or repeat once: no more
    is spent on them; no more than :data:`_PROLOGUES_KEPT` are kept, each of at most
    :data:`_NEED_MAX` bytes."""

    __slots__ = ("kept", "known", "learnt", "matched", "missed", "seen")

    def __init__(self) -> None:
        self.known: dict[bytes, list[Prologue]] = {}  # meta group length → the latest learnt first
        self.matched = 0
        self.missed = 0
        self.seen = 0
        self.kept = 0
        self.learnt = 0

    def matching(self, head: Buffer) -> Prologue | None:
        self.seen += 1
        if not self.known:
            return None
        for known in self.known.get(bytes(head[140:144]), ()):
            if len(head) >= known.need and all(bytes(head[a:b]) == raw for a, b, raw in known.same):
                self.matched += 1
                return known
        self.missed += 1
        return None

    def learn(self, head: Buffer, found: Prologue | None = None) -> None:
        """Learn the prologue of a file the walker read in full, whose elements after ``DICM``
        step in Explicit VR Little Endian (:func:`prologue_of`; ``found``: what its walk found
        before the data set)."""
        if (
            self.seen < _LEARN_FROM
            or self.missed > self.matched + _RELEARN
            or self.learnt > self.matched // 2 + _RELEARN  # learnt layouts must be met again
        ):
            return
        self.learnt += 1
        learnt = prologue_of(head, found, explicit=True)
        if learnt is None:
            self.missed += 1
            return
        if self.kept >= _PROLOGUES_KEPT:
            self.known.clear()
            self.kept = 0
        self.known.setdefault(bytes(head[140:144]), []).insert(0, learnt)
        self.kept += 1


def _decided(read: _Bytes, verdict: Callable[[Buffer], bool | None]) -> bool | None:
    """``verdict`` of the member's head; where the head ended before it decided, of its first
    :data:`HEADER_PREFIX` bytes (what the scan read first before it read 16 KiB first)."""
    outcome = verdict(read.head)
    if outcome is None and len(read.head) < read.member.size:
        outcome = verdict(read.prefix())
    return outcome


def read_instance(
    member: Member, alike: Alike | None = None, first: int = FIRST_READ, prologues: Prologues | None = None
) -> Instance | None:
    """The member as an :class:`Instance`, or None when it is not DICOM (:class:`CorruptDicom` when broken).

    ``alike``: the scan's memory of the file walked before (:mod:`processor.dicom.alike`), to
    walk this one against; ``first``: how many bytes to read first (at least :data:`MIN_FIRST_READ`,
    at most :data:`FIRST_READ` is useful; more are read where the header goes on); ``prologues``:
    the :class:`Prologues` of the member's folder. The same result whatever any of them is."""
    read = _Bytes(member, max(first, MIN_FIRST_READ))
    known = prologues.matching(read.head) if prologues is not None else None
    explicit = False  # whether the elements after DICM step in Explicit VR Little Endian
    if known is None:  # else its bytes answer these checks as the file ``known`` came from did
        if _decided(read, _start_verdict) is False:
            return None
        if len(read.head) >= 132 and bytes(read.head[128:132]) == b"DICM":
            # _starts tries Explicit VR Little Endian first, and a True there is its answer
            explicit = _steps(memoryview(read.head)[132:], False, True) is True
            if not explicit and _decided(read, lambda head: _starts(memoryview(head)[132:])) is False:
                raise CorruptDicom("no DICOM element follows its 'DICM' marker")
    fast = _walked(read, alike, known)
    if fast is not None:
        if explicit and prologues is not None:
            prologues.learn(read.head, fast[2])
        return Instance(member, fast[0], fast[1])
    header, offset, encoding = member_header(member, read=read)
    if header is None or encoding is None:
        return None
    facts = facts_from_dataset(header, transfer_syntax=encoding.transfer_syntax, implicit=encoding.implicit)
    return Instance(member, facts, offset, header)


def scan_members(members: Iterable[Member]) -> ScanResult:
    """Read headers of every DICOM member and group them; count what was skipped and why.

    Callers that scan many files wrap this in :func:`processor.executor_read.gc_paused` (the executor
    does): pausing the collector is a process-wide decision, not this library's.
    """
    return _scan_members(members)


def _scan_members(members: Iterable[Member]) -> ScanResult:
    studies: dict[str, Study] = {}
    skipped: Counter[str] = Counter()
    corrected: Counter[str] = Counter()  # 'declared X, read as Y' → files
    seen: set[str] = set()
    found = 0
    alike = Alike()
    header_ends: dict[str, int] = {}  # folder → the furthest its files' Pixel Data element started
    prologues: dict[str, Prologues] = {}  # folder → what its files' first bytes were found to hold
    folder_prologues, last_folder = Prologues(), None
    for member in members:
        reason = _skip_reason_by_name(member.name)
        if reason:
            skipped[reason] += 1
            continue
        folder = member.name.rpartition("/")[0]
        alike.use(folder)  # walked against the last file of its folder
        if folder != last_folder:  # the most recently met folder last; the least first, forgotten
            folder_prologues = prologues.pop(folder) if folder in prologues else Prologues()
            prologues[folder], last_folder = folder_prologues, folder
            if len(prologues) > _FOLDERS_KEPT:
                del prologues[next(iter(prologues))]
        first = min(FIRST_READ, header_ends.get(folder, FIRST_READ) + HEADER_MARGIN)
        try:
            instance = read_instance(member, alike, first, folder_prologues)
        except CorruptDicom as exc:
            log.warning("scan.corrupt member=%s reason=%s", member.name, exc)
            skipped["corrupt DICOM"] += 1
            continue
        except _UNREADABLE as exc:
            log.warning("scan.unreadable member=%s reason=%s", member.name, exc)
            skipped["unreadable member (bad CRC or truncated)"] += 1
            continue
        if instance is None:
            skipped["not DICOM"] += 1
            continue
        facts = instance.facts
        if DICOMDIR_SOP_CLASS in (facts.media_sop_class_uid, facts.sop_class_uid):
            skipped["DICOMDIR index"] += 1
            continue
        if instance.sop_uid in seen:
            skipped["duplicate instance (same SOPInstanceUID)"] += 1
            continue
        seen.add(instance.sop_uid)
        found += 1
        if instance.pixel_offset is not None and instance.pixel_offset > header_ends.get(folder, 0):
            header_ends[folder] = instance.pixel_offset
        note = correction(facts.declared_syntax, facts.transfer_syntax, facts.implicit)
        if note:
            corrected[note] += 1
        study = studies.get(facts.study_uid)
        if study is None:
            study = studies[facts.study_uid] = Study(facts.study_uid)
        series = study.series.get(facts.series_uid)
        if series is None:  # built once a series, not once a file (as setdefault's default was)
            series = study.series[facts.series_uid] = Series(facts.series_uid)
        series.instances.append(instance)
    for note, files in corrected.items():
        log.warning("scan.encoding files=%d read=%r", files, note)
    for study in studies.values():
        for series in study.series.values():
            found -= _parse_first_header(series, skipped)
        study.series = {uid: s for uid, s in study.series.items() if s.instances}
    return ScanResult([s for s in studies.values() if s.series], skipped, found)


def _parse_first_header(series: Series, skipped: Counter[str]) -> int:
    """Parse the full header of the series' first file now, while the arrival is open (series
    number, description, modality and the study's accession are read from it). A file whose full
    parse fails is dropped as corrupt; returns how many were dropped."""
    dropped = 0
    while series.instances:
        instance = series.instances[0]
        try:
            instance.header  # noqa: B018 - parsed and kept
            return dropped
        except (CorruptDicom, *_UNREADABLE) as exc:
            log.warning("scan.corrupt member=%s reason=%s", instance.member.name, exc)
            skipped["corrupt DICOM"] += 1
            series.instances.pop(0)
            dropped += 1
    return dropped
