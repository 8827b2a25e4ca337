"""A ZIP member's bytes, inflated no further than the member says it is long.

The central directory declares each member's size, and the archive's caps (:mod:`.archive`) are
checked against those declared sizes. :mod:`zipfile` inflates a DEFLATE member in one call when
asked for all of it, and a BZIP2 or LZMA member a whole compressed block at a time, before it
checks the size or the CRC-32: a member declared 1 KB whose stream inflates to 1 GB costs 1 GB of
memory. Here a member's compressed bytes (read through :mod:`zipfile`, which checks the local
header and shares the archive's file safely between threads) are inflated at most :data:`CHUNK`
bytes at a time, and never more than one byte past the declared size: one byte too many, a stream
that ends short, a corrupt stream or a CRC-32 that does not match raises
:class:`MemberReadError` — a :class:`zipfile.BadZipFile`, which the readers count as an
unreadable member. The last bytes of a member are handed over only once all of it is verified.
DEFLATE and the CRC-32 are computed by :mod:`processor.deflate` (ISA-L, zlib's semantics).

Whether a member can be read at all (:func:`refusal`) is known from the central directory:
encryption and compression methods other than STORED, DEFLATE, BZIP2 and LZMA are refused before
any member is read.

A :class:`ReadGuard`, when given, sees every chunk before it is handed over (:meth:`ReadGuard.charge`:
the arrival's running budget of bytes, its time budget, a stop request — any of which may end the
read by raising) and every failure (:meth:`ReadGuard.failed`, which may raise a truer error: the
archive shrank while it was read).
"""

from __future__ import annotations

import copy
import io
import zipfile
from typing import IO, Protocol

from processor import deflate

try:
    import bz2
except ImportError:  # pragma: no cover - a Python built without libbz2
    bz2 = None  # type: ignore[assignment]
try:
    import lzma
except ImportError:  # pragma: no cover - a Python built without liblzma
    lzma = None  # type: ignore[assignment]

CHUNK = 1 << 16  # bytes inflated (and compressed bytes read) per step
_LZMA_DICT_MIN = 4096  # liblzma's smallest dictionary
AES_METHOD = 99  # WinZip AES: the real method sits in the member's extra field
SUPPORTED_METHODS = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}
    | ({zipfile.ZIP_BZIP2} if bz2 is not None else set())
    | ({zipfile.ZIP_LZMA} if lzma is not None else set())
)
METHOD_NAMES = {
    1: "Shrink",
    6: "Implode",
    9: "Deflate64",
    10: "PKWARE Implode",
    12: "BZIP2",
    14: "LZMA",
    18: "IBM TERSE",
    19: "IBM LZ77",
    93: "Zstandard",
    95: "XZ",
    96: "JPEG",
    97: "WavPack",
    98: "PPMd",
}
_ENCRYPTED = 0x1  # general purpose flag bit 0
_PATCHED = 0x20  # bit 5: compressed patched data
_STRONG_ENCRYPTION = 0x40  # bit 6: PKWARE strong encryption
_CODEC_ERRORS: tuple[type[Exception], ...] = (*deflate.ERRORS, OSError, EOFError) + (
    (lzma.LZMAError,) if lzma is not None else ()
)
_OPEN_ERRORS = (zipfile.BadZipFile, EOFError, OSError)
_LZMA_SETUP_ERRORS: tuple[type[Exception], ...] = (*_CODEC_ERRORS, ValueError)  # ValueError: bad properties


class MemberReadError(zipfile.BadZipFile):
    """A member's bytes do not match its entry: longer or shorter than declared, a corrupt
    compressed stream, or a CRC-32 mismatch. The message names the member and says why."""


class ReadGuard(Protocol):
    """What watches the reads of one arrival (see the module docstring)."""

    def charge(self, n: int) -> None:
        """``n`` more bytes were read or inflated; raises to stop reading."""

    def failed(self, exc: Exception) -> None:
        """A read failed with ``exc``; raises a truer error when there is one, else returns."""


def refusal(info: zipfile.ZipInfo) -> str | None:
    """Why the member cannot be read, in words that say the fix; None when it can be."""
    if info.flag_bits & (_ENCRYPTED | _STRONG_ENCRYPTION) or info.compress_type == AES_METHOD:
        kind = (
            "AES encryption"
            if info.compress_type == AES_METHOD
            else "PKWARE strong encryption"
            if info.flag_bits & _STRONG_ENCRYPTION
            else "ZipCrypto"
        )
        return (
            f"is encrypted: the ZIP is password-protected ({kind}) and ctwatch cannot read it; "
            "export the study without a password"
        )
    if info.flag_bits & _PATCHED:
        return (
            "is stored as a patch to another file (compressed patched data), which ctwatch cannot "
            "read; re-export the ZIP with standard Deflate compression"
        )
    if info.compress_type not in SUPPORTED_METHODS:
        name = METHOD_NAMES.get(info.compress_type, "an unknown method")
        return (
            f"is compressed with {name} (ZIP method {info.compress_type}), which ctwatch cannot read; "
            "re-export the ZIP with standard Deflate compression (or none)"
        )
    return None


def read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, guard: ReadGuard | None = None
) -> bytes:
    """All of a member's bytes, verified (size and CRC-32); :class:`MemberReadError` otherwise."""
    raw, member = _open(zf, info, where, guard)
    with raw:
        return b"".join(iter(lambda: member.read(CHUNK), b""))


def open_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, guard: ReadGuard | None = None
) -> IO[bytes]:
    """A stream over a member's bytes; its last bytes come only once all are verified (size, CRC-32)."""
    raw, member = _open(zf, info, where, guard)
    return io.BufferedReader(_VerifiedStream(raw, member))


def _open(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, guard: ReadGuard | None
) -> tuple[IO[bytes], _Verified]:
    """The member's compressed stream and its verified reader. A failure to open them (a local
    header or an LZMA header cut short or damaged) is shown to the guard first."""
    try:
        raw = _compressed(zf, info)
    except _OPEN_ERRORS as exc:
        if guard is not None:
            guard.failed(exc)
        raise
    try:
        return raw, _Verified(_inflater(raw, info, where), info, where, guard)
    except BaseException as exc:
        raw.close()
        if guard is not None and isinstance(exc, MemberReadError):
            guard.failed(exc)
        raise


def _compressed(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> IO[bytes]:
    """The member's compressed bytes as they lie in the archive.

    :mod:`zipfile`'s own reader over a copy of the entry that says STORED (and carries no CRC-32,
    which covers the inflated bytes and is checked here): the local header is still checked, and
    the archive's file handle still shared under its lock.
    """
    raw = copy.copy(info)
    raw.compress_type = zipfile.ZIP_STORED
    raw.file_size = info.compress_size
    del raw.CRC
    return zf.open(raw)


class _Decompressor(Protocol):
    """What :class:`bz2.BZ2Decompressor` and :class:`lzma.LZMADecompressor` offer."""

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    def decompress(self, data: bytes, max_length: int) -> bytes: ...


class _Deflate:
    """A raw DEFLATE decompressor (:func:`processor.deflate.inflater`) with the interface of bz2's
    and lzma's (input it could not use yet is kept here, not handed back). An empty tail asks for
    more input, or ``b""`` once there is none: ISA-L may still hold output back then."""

    def __init__(self) -> None:
        self._z = deflate.inflater()

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def needs_input(self) -> bool:
        return not self._z.unconsumed_tail

    def decompress(self, data: bytes, max_length: int) -> bytes:
        return self._z.decompress(self._z.unconsumed_tail + data, max_length)


class _Inflater:
    """The output of one member's compressed stream, at most ``n`` bytes per :meth:`read`."""

    def __init__(self, raw: IO[bytes], decompressor: _Decompressor | None, where: str) -> None:
        self._raw = raw
        self._d = decompressor
        self._where = where

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (``n`` > 0); b"" once the stream, or its compressed bytes, ended."""
        try:
            if self._d is None:
                return self._raw.read(n)
            while not self._d.eof:
                data = self._raw.read(CHUNK) if self._d.needs_input else b""
                out = self._d.decompress(data, n)
                if out:
                    return out
                if not data and self._d.needs_input:
                    return b""  # the compressed bytes end before the stream does: found short below
            return b""
        except _CODEC_ERRORS as exc:
            raise _corrupt(self._where, exc) from exc


def _corrupt(where: str, exc: Exception) -> MemberReadError:
    return MemberReadError(
        f"{where} cannot be inflated ({type(exc).__name__}: {exc}): the ZIP is "
        "damaged — copy it again from the source"
    )


def _inflater(raw: IO[bytes], info: zipfile.ZipInfo, where: str) -> _Inflater:
    method = info.compress_type
    if method == zipfile.ZIP_STORED:
        return _Inflater(raw, None, where)
    if method == zipfile.ZIP_DEFLATED:
        return _Inflater(raw, _Deflate(), where)
    if method == zipfile.ZIP_BZIP2 and bz2 is not None:
        return _Inflater(raw, bz2.BZ2Decompressor(), where)
    if method == zipfile.ZIP_LZMA and lzma is not None:
        try:
            return _Inflater(raw, _zip_lzma(raw, info.file_size), where)
        except _LZMA_SETUP_ERRORS as exc:
            raise _corrupt(where, exc) from exc
    raise MemberReadError(f"{where}: ZIP method {method} cannot be read")  # refused up front by refusal()


def _zip_lzma(raw: IO[bytes], size: int) -> _Decompressor:
    """The decompressor of an LZMA member, whose stream starts with a version (2 bytes), the size of
    the properties (2 bytes, little endian) and the LZMA1 properties: lc/lp/pb in one byte, then the
    dictionary size (APPNOTE 5.8.8).

    The dictionary, which the decoder allocates whole, is cut to the member's declared size (plus
    the byte that shows a lie): a valid stream never refers further back than its own output, and
    a stream that declares a 4 GiB dictionary for a small member would otherwise get one.
    """
    head = raw.read(4)
    props = raw.read(int.from_bytes(head[2:4], "little")) if len(head) == 4 else b""
    if len(props) != 5:
        raise EOFError("the LZMA properties header is missing or malformed")
    pb, rest = divmod(props[0], 45)
    lp, lc = divmod(rest, 9)
    dict_size = min(int.from_bytes(props[1:5], "little"), max(size + 1, _LZMA_DICT_MIN))
    lzma1 = {"id": lzma.FILTER_LZMA1, "dict_size": dict_size, "lc": lc, "lp": lp, "pb": pb}
    return lzma.LZMADecompressor(lzma.FORMAT_RAW, filters=[lzma1])


class _Verified:
    """A member's bytes as they are inflated, checked against its entry: never one byte more than
    its declared size is inflated, and the bytes that reach that size are handed over only once the
    stream is known to end there and the CRC-32 matches."""

    def __init__(
        self, inflater: _Inflater, info: zipfile.ZipInfo, where: str, guard: ReadGuard | None = None
    ) -> None:
        self._inflater = inflater
        self._info = info
        self._where = where
        self._guard = guard
        self._left = info.file_size
        self._crc = 0
        self._checked = False

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (at most :data:`CHUNK`); b"" at the end; :class:`MemberReadError`
        as soon as the bytes contradict the entry. Each chunk is charged to the guard."""
        try:
            chunk = self._read(n)
        except MemberReadError as exc:
            if self._guard is not None:
                self._guard.failed(exc)
            raise
        if chunk and self._guard is not None:
            self._guard.charge(len(chunk))
        return chunk

    def _read(self, n: int) -> bytes:
        if self._checked or n <= 0:
            return b""
        if self._left == 0:  # an empty member
            self._check_end()
            return b""
        chunk = self._inflater.read(min(n, CHUNK, self._left + 1))  # one byte past the size shows a lie
        if len(chunk) > self._left:
            raise self._too_long()
        if not chunk:
            raise MemberReadError(
                f"{self._where} ends {self._left} bytes short of its declared size of "
                f"{self._info.file_size}: the ZIP is truncated or damaged — copy it again "
                "from the source"
            )
        self._left -= len(chunk)
        self._crc = deflate.crc32(chunk, self._crc)
        if self._left == 0:
            self._check_end()
        return chunk

    def _check_end(self) -> None:
        if self._inflater.read(1):
            raise self._too_long()
        if self._crc != self._info.CRC:
            raise MemberReadError(
                f"{self._where} fails its CRC-32 check (Bad CRC-32): the ZIP is damaged — "
                "copy it again from the source"
            )
        self._checked = True

    def _too_long(self) -> MemberReadError:
        return MemberReadError(
            f"{self._where} inflates past its declared size of {self._info.file_size} "
            "bytes: the ZIP is damaged or built to exhaust memory; it was not read "
            "further — export the study again"
        )


class _VerifiedStream(io.RawIOBase):
    """A raw binary stream over a :class:`_Verified` member; closing it closes the compressed stream."""

    def __init__(self, raw: IO[bytes], member: _Verified) -> None:
        super().__init__()
        self._raw = raw
        self._member = member

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        chunk = self._member.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()
