"""Whether a dropped ZIP, DICOM file, or every DICOM file of a dropped folder, has been written whole.

A quiet period alone takes a copy that paused for longer than it (a network copy stalls for tens of
seconds) for a finished one. Before a folder or a single DICOM file is taken, each of its DICOM
files must therefore *read*: the header parses (the lean walker of
:mod:`processor.dicom.fastheader`, pydicom for the layouts it declines) and the file holds all of
its Pixel Data — the Pixel Data element's stated length fits in the file, or, for encapsulated
(compressed) pixels, the fragments step to their sequence delimiter. Only the header and the item
headers of encapsulated fragments are read, never the pixels. A ZIP is whole when its central
directory, which a writer puts last, reads and its end record is the file's last bytes, placing the
central directory where it lies (:func:`processor.intake.archive.zip_central_directory_reads`,
:mod:`processor.intake.zipend`): a copy cut short just after a member that is itself a ZIP ends in
that inner ZIP's end record, which does not place the outer directory where it lies.

A file is a DICOM file when its first bytes can begin one (:func:`processor.dicom.scan.looks_like_dicom`:
the ``DICM`` marker, or elements that step); other files (a README, a thumbnail) are not looked at.
An empty file, and one that holds only zero bytes and is shorter than the 128-byte preamble and
``DICM`` marker, count as not yet written: copy tools create a file before they fill it. A file
that cannot be opened is not waited for: the intake refuses the arrival with the reason.

A limit: a writer that first sets a file to its full size (preallocation, as some copy tools and
download managers do) and then fills it in leaves zero bytes where it has not written yet. A DICOM
file whose header is written but whose Pixel Data is still zeros reads as whole by its lengths (and
a file still all zeros, as no DICOM at all): either is taken once its quiet period has passed with
the file unchanged, so a writer that stalls for longer than that hands over a file with a zero
tail, which the study then reads as pixels. A ZIP so written is not whole until its end record is
written, at the very end.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from pydicom.dataelem import RawDataElement
from pydicom.uid import UID

from processor.dicom.encoding import ELEMENT_CUT, Unreadable, element_head, plain_cause, read_file
from processor.dicom.fastheader import PIXEL_DATA, TAGS, Declined, Truncated, walk
from processor.dicom.scan import PARSE_ERRORS, looks_like_dicom
from processor.intake.archive import is_zip_path, zip_central_directory_reads
from processor.intake.inbox import folder_files, is_temporary_name

HEAD_BYTES = 16 * 1024  # read first; CT headers are ~2–10 KB (the whole file when it is not enough)
PREAMBLE = 132  # the 128-byte preamble and "DICM"
_ITEM, _SEQUENCE_END, _UNDEFINED = 0xFFFEE000, 0xFFFEE0DD, 0xFFFFFFFF
_TRAILING = 64  # elements after Pixel Data stepped over at most
_PARSE_ERRORS = (Unreadable, *PARSE_ERRORS)  # what a header it cannot read raises (as processor.dicom.scan)


class Verdict(StrEnum):
    COMPLETE = "complete"  # a DICOM file with its whole header and all of its Pixel Data
    UNFINISHED = "unfinished"  # a DICOM file (or an empty one) cut short: still being written
    OTHER = "other"  # not DICOM, or not readable by ctwatch: nothing to wait for


@dataclass(frozen=True)
class Check:
    verdict: Verdict
    reason: str = ""  # why a file is unfinished, in plain words


def check_file(path: Path) -> Check:
    """Whether ``path`` is a whole DICOM file (see the module docstring). Never raises."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(HEAD_BYTES)
            return _check(fh, head, size)
    except OSError:
        return Check(Verdict.OTHER)


def unfinished_files(folder: Path) -> list[tuple[Path, str]]:
    """The DICOM files under ``folder`` that are not whole yet, each with the reason, in name order.
    Files under a temporary name are not looked at: the reader skips them (the watcher decides how
    long a folder waits on them).

    Raises ``OSError`` (``PermissionError`` naming the part) when the folder cannot be walked whole
    (:func:`processor.intake.inbox.folder_files`)."""
    out = []
    for child, _ in folder_files(folder):
        if is_temporary_name(child.name):
            continue
        result = check_file(child)
        if result.verdict is Verdict.UNFINISHED:
            out.append((child, result.reason))
    return out


@dataclass
class Content:
    """An inbox entry's content at one signature: the parts not whole yet (each with the reason),
    and whether it is a ZIP or a DICOM file, whose completeness can be told without a quiet period."""

    sig: Hashable
    missing: list[tuple[Path, str]] = field(default_factory=list)
    known: bool = False


class ContentChecks:
    """What of each inbox entry does not read whole yet, remembered per signature (the watcher's
    size and change times), so that an unchanged entry is read once."""

    def __init__(self) -> None:
        self._seen: dict[Path, Content] = {}

    def of(self, path: Path, sig: Hashable) -> Content:
        """The entry's :class:`Content`. A ZIP is whole when its central directory reads; a DICOM
        file, or a folder, when :func:`check_file` finds each of its DICOM files whole. An entry, or
        a part of a folder, that cannot be read has nothing missing: the intake refuses it with the
        reason."""
        known = self._seen.get(path)
        if known is not None and known.sig == sig:
            return known
        content = Content(sig)
        if path.is_dir():
            with contextlib.suppress(OSError):
                content.missing = unfinished_files(path)
        elif _is_zip(path):
            content.known = True
            if not _zip_reads(path):
                content.missing = [
                    (path, "it does not end as a whole ZIP (its central directory is not at its end)")
                ]
        else:
            check = check_file(path)
            content.known = check.verdict is not Verdict.OTHER
            if check.verdict is Verdict.UNFINISHED:
                content.missing = [(path, check.reason)]
        self._seen[path] = content
        return content

    def forget(self, path: Path) -> None:
        self._seen.pop(path, None)

    def known(self) -> set[Path]:
        """The entries whose contents are remembered."""
        return set(self._seen)

    def prune(self, present: set[Path]) -> None:
        for path in [p for p in self._seen if p not in present]:
            del self._seen[path]


def _is_zip(path: Path) -> bool:
    try:
        return is_zip_path(path)
    except OSError:
        return False


def _zip_reads(path: Path) -> bool:
    """Whether a ZIP's central directory reads (the copy is complete); a file that cannot be opened
    is not waited for."""
    try:
        return zip_central_directory_reads(path)
    except OSError:
        return True


def _check(fh: IO[bytes], head: bytes, size: int) -> Check:
    if size == 0:
        return Check(Verdict.UNFINISHED, "it is empty (0 bytes)")
    if size < PREAMBLE and not any(head[:128]):
        return Check(Verdict.UNFINISHED, f"it holds only the first {size} bytes of a DICOM preamble")
    if not looks_like_dicom(head):
        return Check(Verdict.OTHER)
    try:
        try:
            return _walked(fh, head, size)
        except Declined as exc:
            if isinstance(exc, Truncated):
                raise
            return _parsed(fh, head, size)
    except Truncated as exc:
        return Check(Verdict.UNFINISHED, f"its header is cut short ({exc})")
    except _PARSE_ERRORS as exc:
        return Check(Verdict.UNFINISHED, f"it does not parse ({plain_cause(exc)})")


def _whole(fh: IO[bytes], head: bytes, size: int) -> bytes:
    return head if len(head) >= size else head + fh.read()


def _walked(fh: IO[bytes], head: bytes, size: int) -> Check:
    """The lean walker's verdict (``Declined`` for a layout it does not read, ``Truncated`` for a cut one)."""
    try:
        walked = walk(head)
        if walked.pixel_offset is None and len(head) < size:
            raise Truncated("no Pixel Data in the first bytes")
    except Truncated:
        if len(head) >= size:
            raise
        walked = walk(_whole(fh, head, size))
    if walked.pixel_offset is None:
        values = walked.values
        return _without_pixels(values.get(TAGS["SOPClassUID"]) or values.get(TAGS["MediaStorageSOPClassUID"]))
    return _pixels_whole(fh, walked.pixel_offset, size, walked.implicit, little=True)


def _parsed(fh: IO[bytes], head: bytes, size: int) -> Check:
    """pydicom's verdict for a layout the walker declines (big endian, deflated, no preamble): the
    whole file is parsed with values kept raw, and every element of defined length must end inside
    the file. A deflated data set cut short does not inflate (``Unreadable``)."""
    ds, encoding, _ = read_file(_whole(fh, head, size), stop_before_pixels=False)
    if not encoding.deflated:
        for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts every element
            element = ds.get_item(tag)
            if not isinstance(element, RawDataElement) or element.length == _UNDEFINED:
                continue
            if element.value_tell + element.length > size:
                return Check(Verdict.UNFINISHED, f"it ends inside its element {tag}")
    element = ds.get_item(PIXEL_DATA)
    if element is None:
        return _without_pixels(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID"))
    if isinstance(element, RawDataElement) and element.length == _UNDEFINED and not encoding.deflated:
        end = _items_end(fh, element.value_tell, size, encoding.little)
        if end < 0:
            return Check(Verdict.UNFINISHED, "it ends inside its encapsulated Pixel Data")
    return Check(Verdict.COMPLETE)


def _without_pixels(sop_class: object) -> Check:
    """A header read to its end without Pixel Data: whole unless it is an image's (PS3.4 storage SOP
    classes named "… Image Storage" carry Pixel Data) or names no SOP class (cut before it)."""
    text = sop_class.decode("ascii", "replace") if isinstance(sop_class, bytes) else str(sop_class or "")
    text = text.rstrip("\0 ")
    if not text:
        return Check(Verdict.UNFINISHED, "its header ends before its SOP Class UID")
    if "Image Storage" in UID(text).name:
        return Check(Verdict.UNFINISHED, f"it is a {UID(text).name} object without its Pixel Data")
    return Check(Verdict.COMPLETE)


def _pixels_whole(fh: IO[bytes], at: int, size: int, implicit: bool, little: bool) -> Check:
    """Whether the Pixel Data element starting at ``at``, and any element after it, ends inside the
    file (PS3.5 §7.1 element layout, §A.4 encapsulated fragments)."""
    head = _pread(fh, at, 12)
    parsed = element_head(head, 0, implicit, little) if len(head) >= 8 else None
    if parsed is None:
        if len(head) < 8:
            return Check(Verdict.UNFINISHED, "it ends inside its Pixel Data element")
        return Check(Verdict.COMPLETE)  # not laid out as a Pixel Data element: the decoder says why
    length, header = parsed[2], parsed[3]
    if length == ELEMENT_CUT:
        return Check(Verdict.UNFINISHED, "it ends inside its Pixel Data element")
    start = at + header
    if length == _UNDEFINED:
        end = _items_end(fh, start, size, little)
        if end < 0:
            return Check(Verdict.UNFINISHED, "it ends inside its encapsulated Pixel Data")
    elif start + length > size:
        return Check(
            Verdict.UNFINISHED, f"it ends {size - start} bytes into its Pixel Data of {length} bytes"
        )
    else:
        end = start + length
    if not _elements_end(fh, end, size, implicit, little):
        return Check(Verdict.UNFINISHED, "it ends inside an element after its Pixel Data")
    return Check(Verdict.COMPLETE)


def _items_end(fh: IO[bytes], pos: int, size: int, little: bool) -> int:
    """Where the items of encapsulated Pixel Data from ``pos`` end (after the sequence delimiter), or
    -1 when the file ends first. Something else than an item or the delimiter (a damaged file, which
    the decoder names) ends the walk there."""
    item = struct.Struct(("<" if little else ">") + "HHL")
    while True:
        raw = _pread(fh, pos, 8)
        if len(raw) < 8:
            return -1
        group, element, length = item.unpack(raw)
        tag = group << 16 | element
        if tag != _ITEM:
            return pos + 8 if tag == _SEQUENCE_END else pos
        pos += 8 + length
        if pos > size:
            return -1


def _elements_end(fh: IO[bytes], pos: int, size: int, implicit: bool, little: bool) -> bool:
    """Whether the elements after Pixel Data (trailing padding, private tags) step to the file's end.
    A sequence or an element that does not read there is left to the decoder."""
    for _ in range(_TRAILING):
        if pos == size:
            return True
        raw = _pread(fh, pos, 12)
        if len(raw) < 8:
            return False
        parsed = element_head(raw, 0, implicit, little)
        if parsed is None or parsed[2] == _UNDEFINED:
            return True
        if parsed[2] == ELEMENT_CUT:
            return False
        pos += parsed[3] + parsed[2]
    return pos <= size


def _pread(fh: IO[bytes], offset: int, n: int) -> bytes:
    return os.pread(fh.fileno(), n, offset)
