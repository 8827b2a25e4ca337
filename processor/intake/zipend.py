"""Where a ZIP ends: a ZIP is whole only when its end record closes the file.

A ZIP's last bytes are its end of central directory record: 22 bytes, then a comment of up to
65,535 bytes whose length the record gives (PKWARE APPNOTE.TXT 6.3, §4.3.16). A ZIP64 archive puts
its ZIP64 end record and that record's locator just before it (§4.3.14, §4.3.15). The central
directory ends where those records begin, and the record says where it starts and how long it is,
as offsets from the start of the file.

:mod:`zipfile` asks less. ``zipfile._EndRecData`` (CPython 3.11, 3.12) takes the *last* end record
signature in the file's final 64 KiB, wherever it lies; ``ZipFile._RealGetContents`` takes any gap
between where the central directory lies and where the record says it lies for data put in front
of the archive (a self-extracting program) and shifts every member's offset by it. A copy cut short
just after a member that is itself a ZIP (``zip`` stores ``.zip`` members uncompressed, so the inner
ZIP's end record is there byte for byte) then opens as that inner ZIP: a smaller archive, valid,
and wrong. Here:

* :func:`zip_end` finds an end record only where it, with its declared comment, closes the file;
* :attr:`ZipEnd.prepended` is that gap, which must be 0 (:func:`check_whole`);
* :func:`open_whole_zip` opens the archive only when both hold, and when :mod:`zipfile` found the
  central directory where this module did (``ZipFile.start_dir``, the offset ``zipfile`` itself
  appends from; compared only where it exists);
* a file whose first bytes are not a ZIP's but which ends in one is a self-extracting archive
  (:func:`ends_in_zip`: a program with a ZIP appended).

A ZIP64 end record is looked for just before its locator, as :mod:`zipfile` does (a record with
"extensible data" after it is not found, by either, and such an archive is refused as cut short).
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

from processor.intake.zipnames import open_zip

# signature, disk, disk of the central directory, entries here, entries, size, offset, comment length
_END = struct.Struct("<4sHHHHIIH")
_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, offset of the ZIP64 end record, disks
_END64 = struct.Struct("<4sQHHIIQQQQ")  # ..., entries here, entries, central directory size, offset
_END_SIGNATURE = b"PK\x05\x06"
_LOCATOR_SIGNATURE = b"PK\x06\x07"
_END64_SIGNATURE = b"PK\x06\x06"
_CENTRAL_SIGNATURE = b"PK\x01\x02"
_MAX_COMMENT = 0xFFFF

# what is wrong, after the ZIP's name
CUT_SHORT = "is cut short, or has data after its end (its last bytes are not the end of a ZIP)"
JOINED = (
    "is cut short, or joined to other data (its last bytes are the end of another ZIP: one stored "
    "inside it, where the copy stopped, or one added after it)"
)


class ZipEndError(zipfile.BadZipFile):
    """The file does not end as a whole ZIP does. The message says why in plain words, to follow
    the ZIP's name (:data:`CUT_SHORT`, :data:`JOINED`)."""


@dataclass(frozen=True)
class ZipEnd:
    """The end of a ZIP: ``record``, the offset in bytes where the end record (the ZIP64 end record
    when there is one) starts, which is where the central directory must end; ``cd_offset`` and
    ``cd_size``, where the record says the central directory starts and how many bytes it holds."""

    record: int
    cd_offset: int
    cd_size: int

    @property
    def prepended(self) -> int:
        """Bytes between where the central directory lies and where the record says it does: 0 in a
        whole ZIP; more when something stands in front of the archive, less when it is damaged."""
        return self.record - self.cd_size - self.cd_offset


def zip_end(fh: IO[bytes]) -> ZipEnd | None:
    """The end of the ZIP whose end record, with its comment, is the last thing in ``fh``; None when
    no end record closes the file. Reads at most the last 64 KiB and 22 bytes; ``OSError`` from
    the reads."""
    size = fh.seek(0, io.SEEK_END)
    start = max(0, size - _END.size - _MAX_COMMENT)
    fh.seek(start)
    tail = fh.read()
    at = len(tail)
    while (at := tail.rfind(_END_SIGNATURE, 0, at)) >= 0:
        if at + _END.size <= len(tail):
            fields = _END.unpack_from(tail, at)
            if at + _END.size + fields[7] == len(tail):
                return _with_zip64(fh, ZipEnd(start + at, cd_offset=fields[6], cd_size=fields[5]))
    return None


def _with_zip64(fh: IO[bytes], end: ZipEnd) -> ZipEnd:
    """``end`` with the ZIP64 end record's values when its locator stands before the end record."""
    at = end.record - _LOCATOR.size - _END64.size
    if at < 0:
        return end
    fh.seek(at)
    raw = fh.read(_END64.size + _LOCATOR.size)
    if len(raw) < _END64.size + _LOCATOR.size or raw[_END64.size : _END64.size + 4] != _LOCATOR_SIGNATURE:
        return end
    if raw[:4] != _END64_SIGNATURE:
        return ZipEnd(end.record, cd_offset=end.record + 1, cd_size=0)  # a locator without its record
    fields = _END64.unpack_from(raw)
    return ZipEnd(at, cd_offset=fields[9], cd_size=fields[8])


def check_whole(fh: IO[bytes]) -> ZipEnd:
    """The end of the ZIP in ``fh``; :class:`ZipEndError` unless its end record closes the file and
    its central directory lies exactly where the record says (nothing before the archive)."""
    end = zip_end(fh)
    if end is None:
        raise ZipEndError(CUT_SHORT)
    if end.prepended != 0:
        raise ZipEndError(JOINED)
    return end


def ends_in_zip(fh: IO[bytes]) -> bool:
    """Whether ``fh`` ends in a ZIP whose central directory begins where its end record places it,
    counting from the end (a self-extracting archive: a program with a ZIP appended, whether or not
    its offsets were adjusted for the program). ``OSError`` from the reads."""
    end = zip_end(fh)
    if end is None or end.cd_size == 0 or end.cd_size > end.record:
        return False
    fh.seek(end.record - end.cd_size)
    return fh.read(4) == _CENTRAL_SIGNATURE


@contextmanager
def open_whole_zip(source: IO[bytes]) -> Iterator[zipfile.ZipFile]:
    """The ZIP in ``source`` opened for reading (:func:`processor.intake.zipnames.open_zip`), once
    :func:`check_whole` passes. Raises :class:`ZipEndError`, or what :mod:`zipfile` raises for a
    damaged archive; the archive is closed when the block ends."""
    end = check_whole(source)
    with open_zip(source) as zf:
        if getattr(zf, "start_dir", end.cd_offset) != end.cd_offset:
            raise ZipEndError(JOINED)  # zipfile took another end record (one inside the comment)
        yield zf
