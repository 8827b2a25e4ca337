"""ZIP member names as bytes: what a member is called, and opening ZIPs whose names lie about UTF-8.

A ZIP stores each member name as bytes plus one flag (general purpose bit 11) that says "these
bytes are UTF-8". :mod:`zipfile` decodes flagged names as UTF-8 and every other name as CP437
(the ZIP standard's default, APPNOTE appendix D). The rule here:

* raw bytes: exactly the bytes in the archive (:func:`member_raw_name`);
* text: UTF-8 when flagged; unflagged names that are valid UTF-8 are UTF-8 too (what macOS, Linux
  ``zip`` and most tools write without setting the flag); any other unflagged name is CP437, as
  the standard says (:func:`member_text`). Every byte decodes in CP437, so no name is refused;
  a Shift-JIS or Latin-1 name shows as CP437 characters, its bytes kept.

An archive that flags a name as UTF-8 when its bytes are not UTF-8 makes :class:`zipfile.ZipFile`
raise ``UnicodeDecodeError``; :func:`open_zip` then reads it through a view of the file in which
those names' flags are cleared (the file itself is never changed), so they read as CP437.
"""

from __future__ import annotations

import bisect
import io
import struct
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

UTF8_FLAG = 0x800  # general purpose bit 11: name and comment are UTF-8
_EOCD = struct.Struct("<4s4xHHII")  # signature, (disk numbers), entries here, entries, cd size, cd offset
_EOCD64_LOCATOR = struct.Struct("<4sIQI")  # signature, disk, offset of the zip64 end record, disks
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # ..., entries here, entries, cd size, cd offset
_CENTRAL = struct.Struct("<4s4xH18xHHH")  # signature, flags (at 8), name/extra/comment lengths (at 28)
_CENTRAL_SIZE = 46  # the fixed part of a central directory entry; its name follows
_EOCD_MAX_COMMENT = 0xFFFF


def member_raw_name(info: zipfile.ZipInfo) -> bytes:
    """The member's name exactly as the archive stores it."""
    name = info.orig_filename
    if name.isascii():  # the same bytes in CP437 and UTF-8 (the usual name, encoded fastest)
        return name.encode("ascii")
    if info.flag_bits & UTF8_FLAG:
        return name.encode("utf-8")
    return name.encode("cp437")


def member_text(info: zipfile.ZipInfo) -> str:
    """The member's name as text: UTF-8 when flagged or valid UTF-8, else CP437 (see module doc);
    cut at a NUL, as :mod:`zipfile` cuts ``filename``."""
    text = info.orig_filename
    if text.isascii():  # read alike in every one of those: as it is
        return text.split("\x00", 1)[0] if "\x00" in text else text
    if not info.flag_bits & UTF8_FLAG and _is_utf8(raw := member_raw_name(info)):
        text = raw.decode("utf-8")
    return text.split("\x00", 1)[0]


@contextmanager
def open_zip(source: Path | IO[bytes]) -> Iterator[zipfile.ZipFile]:
    """:class:`zipfile.ZipFile` for reading, also when names flagged UTF-8 are not UTF-8.

    Raises what :mod:`zipfile` raises for a damaged archive (``BadZipFile``, ``OSError``, ...).
    The archive (and a file opened here for ``source``) is closed when the block ends.
    """
    with ExitStack() as stack:
        try:
            zf = zipfile.ZipFile(source)
        except UnicodeDecodeError:
            fh = stack.enter_context(source.open("rb")) if isinstance(source, Path) else source
            fh.seek(0)
            view = _PatchedView(fh, _falsely_flagged_names(fh))
            zf = zipfile.ZipFile(view)
            read_as_cp437 = [info for info in zf.infolist() if not info.flag_bits & UTF8_FLAG]
            view.add(_local_header_flags(fh, read_as_cp437))
        with zf:
            yield zf


def _falsely_flagged_names(fh: IO[bytes]) -> dict[int, int]:
    """Offset → new byte for the flag byte of each central directory entry flagged UTF-8 whose
    name is not UTF-8 (bit 11 cleared). An archive whose directory cannot be found gives none."""
    start, size = _central_directory(fh)
    fh.seek(start)
    data = fh.read(size)
    patches: dict[int, int] = {}
    at = 0
    while at + _CENTRAL_SIZE <= len(data):
        signature, flags, name_len, extra_len, comment_len = _CENTRAL.unpack_from(data, at)
        if signature != b"PK\x01\x02":
            break
        name = data[at + _CENTRAL_SIZE : at + _CENTRAL_SIZE + name_len]
        if flags & UTF8_FLAG and not _is_utf8(name):
            patches[start + at + 9] = data[at + 9] & ~(UTF8_FLAG >> 8)
        at += _CENTRAL_SIZE + name_len + extra_len + comment_len
    return patches


def _local_header_flags(fh: IO[bytes], infos: list[zipfile.ZipInfo]) -> dict[int, int]:
    """Offset → new byte clearing bit 11 in the local header of each member read as CP437."""
    patches: dict[int, int] = {}
    for info in infos:
        fh.seek(info.header_offset + 7)
        high = fh.read(1)
        if high and high[0] & (UTF8_FLAG >> 8):
            patches[info.header_offset + 7] = high[0] & ~(UTF8_FLAG >> 8)
    return patches


def _central_directory(fh: IO[bytes]) -> tuple[int, int]:
    """(offset, size) of the central directory, found back from the end record (0, 0 if none)."""
    end = fh.seek(0, io.SEEK_END)
    tail_start = max(0, end - _EOCD.size - _EOCD_MAX_COMMENT)
    fh.seek(tail_start)
    tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return 0, 0
    _, _, _, cd_size, _ = _EOCD.unpack_from(tail, at)
    record = tail_start + at
    locator = record - _EOCD64_LOCATOR.size
    if locator >= 0:
        fh.seek(locator)
        head = fh.read(_EOCD64_LOCATOR.size)
        if head[:4] == b"PK\x06\x07":
            zip64_at = _zip64_record(fh, locator)
            if zip64_at is not None:
                return zip64_at[0] - zip64_at[1], zip64_at[1]
    return max(0, record - cd_size), cd_size


def _zip64_record(fh: IO[bytes], locator: int) -> tuple[int, int] | None:
    """(where the zip64 end record starts, central directory size) — the record sits just before
    its locator when no data was prepended; None when it is not there."""
    fh.seek(locator - _EOCD64.size)
    record = fh.read(_EOCD64.size)
    if len(record) != _EOCD64.size or record[:4] != b"PK\x06\x06":
        return None
    return locator - _EOCD64.size, _EOCD64.unpack(record)[7]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class _PatchedView(io.RawIOBase):
    """A read-only view of a binary file with single bytes replaced at given offsets."""

    def __init__(self, fh: IO[bytes], patches: dict[int, int]) -> None:
        super().__init__()
        self._fh = fh
        self._offsets: list[int] = []
        self._values: dict[int, int] = {}
        self.add(patches)

    def add(self, patches: dict[int, int]) -> None:
        self._values.update(patches)
        self._offsets = sorted(self._values)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        start = self._fh.tell()
        view = memoryview(buffer).cast("B")
        data = self._fh.read(len(view))
        view[: len(data)] = data
        first = bisect.bisect_left(self._offsets, start)
        for offset in self._offsets[first : bisect.bisect_left(self._offsets, start + len(data))]:
            view[offset - start] = self._values[offset]
        return len(data)
