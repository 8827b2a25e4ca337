"""Find DICOM among an arrival's members by content, read headers only, group into studies/series.

DICOM is recognised by its ``DICM`` preamble marker, or — for files written without a preamble —
by a header parse that yields the three instance UIDs. ``DICOMDIR``, ``__MACOSX/``, ``.DS_Store``,
other files and corrupt DICOM are skipped and counted by reason.

Only the first :data:`HEADER_PREFIX` bytes of a large member are read (inflated) for its header.
That prefix parse is kept only when it stopped at the ``(7FE0,0010)`` Pixel Data element inside
the prefix — then every element before it was complete, so the header equals the one a read of
the whole member gives; otherwise (longer headers, deflated transfer syntax, no pixel data) the
whole member is read and parsed as before. Where Pixel Data starts is kept for ``ct.volume``.
A ZIP member's CRC is checked only when it is read whole, so a bad CRC past the header surfaces
when the member is decoded.
"""

from __future__ import annotations

import gc
import io
import logging
import re
import threading
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from processor.intake.archive import Member

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}
HEADER_PREFIX = 64 * 1024  # bytes read for a header; CT headers are ~2–10 KB
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian
_PARSE_ERRORS = (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, AttributeError,
                 OverflowError, IndexError, NotImplementedError)
_UNREADABLE = (OSError, RuntimeError, EOFError, zipfile.BadZipFile, zlib.error)  # CRC, truncation, bad inflate


@dataclass
class Instance:
    """One DICOM file: where its bytes are and its header (no pixel data)."""

    member: Member
    header: Dataset
    pixel_offset: int | None = None  # where the (7FE0,0010) element starts in the member's bytes

    @property
    def sop_uid(self) -> str:
        return str(self.header.SOPInstanceUID)


@dataclass
class Series:
    uid: str
    instances: list[Instance] = field(default_factory=list)

    def _first(self, keyword: str, default: object = None) -> object:
        return self.instances[0].header.get(keyword, default) if self.instances else default

    @property
    def modality(self) -> str:
        return str(self._first("Modality", "") or "")

    @property
    def number(self) -> int | None:
        value = self._first("SeriesNumber")
        return int(value) if value not in (None, "") else None

    @property
    def description(self) -> str:
        return str(self._first("SeriesDescription", "") or "")


@dataclass
class Study:
    uid: str
    series: dict[str, Series] = field(default_factory=dict)

    @property
    def first_header(self) -> Dataset:
        return next(iter(self.series.values())).instances[0].header

    @property
    def accession(self) -> str | None:
        value = self.first_header.get("AccessionNumber")
        return str(value) if value else None

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series.values())


@dataclass
class ScanResult:
    studies: list[Study]
    skipped: Counter[str]
    dicom_files: int


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


def read_header(data: bytes) -> Dataset | None:
    """Parse a DICOM header from bytes, or return None when the bytes are not DICOM."""
    return _parse_header(data)[0]


def _parse_header(data: bytes) -> tuple[Dataset | None, int | None]:
    """(header or None when not DICOM, offset of the Pixel Data element in ``data`` or None).

    The offset is given only when the parse stopped right at a ``(7FE0,0010)`` element of ``data``
    itself (not of a deflated dataset, which pydicom inflates into a buffer of its own).
    """
    has_preamble = len(data) >= 132 and data[128:132] == b"DICM"
    fp = io.BytesIO(data)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_preamble)
    except _PARSE_ERRORS as exc:
        if has_preamble:
            raise CorruptDicom(str(exc)) from exc
        return None, None
    at = fp.tell()
    offset = at if data[at:at + 4] == PIXEL_DATA_TAG else None
    return _checked(ds, has_preamble), offset


def _checked(ds: Dataset, has_preamble: bool) -> Dataset | None:
    uids = [str(ds.get(k, "")) for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
    if not all(_UID.match(u) for u in uids):
        if has_preamble:
            raise CorruptDicom("missing SOP/Study/Series Instance UID")
        return None
    return ds


class CorruptDicom(Exception):
    """A file that claims to be DICOM but whose header cannot be read."""


def member_header(member: Member, prefix: int = HEADER_PREFIX) -> tuple[Dataset | None, int | None]:
    """:func:`_parse_header` of a member, reading only its first ``prefix`` bytes when they hold the header."""
    if member.size > prefix:
        head = member.read_prefix(prefix)
        if PIXEL_DATA_TAG in head:  # cheap gate: the header cannot end inside this prefix otherwise
            try:
                header, offset = _parse_header(head)
            except CorruptDicom:
                offset = None  # perhaps only cut short by the prefix: decide on the whole member
            if offset is not None:
                return header, offset
    return _parse_header(member.read())


_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while headers are parsed.

    A header parse allocates ~270 small tracked objects per file (pydicom ``RawDataElement`` tuples,
    tags, datasets) and frees none of them in cycles, so the collector's repeated passes over the
    growing heap were a third of the scan's CPU time. Counted, so that overlapping scans in several
    threads restore the collector's state only when the last one ends.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()


def scan_members(members: Iterable[Member]) -> ScanResult:
    """Read headers of every DICOM member and group them; count what was skipped and why."""
    with _gc_paused():
        return _scan_members(members)


def _scan_members(members: Iterable[Member]) -> ScanResult:
    studies: dict[str, Study] = {}
    skipped: Counter[str] = Counter()
    seen: set[str] = set()
    found = 0
    for member in members:
        reason = _skip_reason_by_name(member.name)
        if reason:
            skipped[reason] += 1
            continue
        try:
            header, pixel_offset = member_header(member)
        except CorruptDicom as exc:
            log.warning("scan.corrupt member=%s reason=%s", member.name, exc)
            skipped["corrupt DICOM"] += 1
            continue
        except _UNREADABLE as exc:
            log.warning("scan.unreadable member=%s reason=%s", member.name, exc)
            skipped["unreadable member (bad CRC or truncated)"] += 1
            continue
        if header is None:
            skipped["not DICOM"] += 1
            continue
        if str(header.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS or \
                getattr(header, "file_meta", None) is not None and \
                str(header.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            skipped["DICOMDIR index"] += 1
            continue
        instance = Instance(member, header, pixel_offset)
        if instance.sop_uid in seen:
            skipped["duplicate instance (same SOPInstanceUID)"] += 1
            continue
        seen.add(instance.sop_uid)
        found += 1
        study = studies.setdefault(str(header.StudyInstanceUID), Study(str(header.StudyInstanceUID)))
        series_uid = str(header.SeriesInstanceUID)
        study.series.setdefault(series_uid, Series(series_uid)).instances.append(instance)
    return ScanResult(list(studies.values()), skipped, found)
