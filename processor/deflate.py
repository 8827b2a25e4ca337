"""CRC-32 and raw DEFLATE inflation at hardware speed: Intel's ISA-L through python-isal.

A ZIP member's CRC-32 (APPNOTE 4.4.7: the polynomial of ITU-T V.42, zlib's ``crc32``) and its
DEFLATE stream (RFC 1951 raw, no zlib or gzip wrapper: ``wbits`` −15; also a DICOM Deflated
Explicit VR Little Endian data set, PS3.5 A.5) are computed by :mod:`isal.isal_zlib`, which
copies :mod:`zlib`'s functions and decompression object: the same checksums and the same bytes,
at about 3.5× zlib's speed for the CRC-32 and 2× for inflation (``bench/run.py``, the deflated
study: CPU ratios 0.29 and 0.46). Both let other threads run while they work. The ZIP member
reader, the CRC-32 check of members read where they lie and the deflated data set's inflation
use this module; the 1 KiB probes that ask whether a bare body is deflated still call zlib. It
imports nothing of ctwatch.

Without python-isal (a dependency; a platform with no wheel may lack it) :mod:`zlib` does the
same work, slower, and one warning at import says so: nothing else changes.

One difference between the two decompression objects is known (python-isal issue #248): ISA-L
may take in all the input it is given and still hold output back, so an empty
``unconsumed_tail`` does not mean that it has no more bytes to give; a further call, with new
input or with ``b""``, gives them. A caller that reads on until ``eof`` or a size it knows, and
feeds ``b""`` once its input has ended, gets the same bytes from both. A stream cut short gives
its last byte or so one call later (or not at all) with ISA-L, and a corrupt stream may be found
corrupt a few bytes earlier; both are refused either way. Errors of either library are
:data:`ERRORS`.
"""

from __future__ import annotations

import logging
import zlib
from importlib import metadata
from types import ModuleType
from typing import Protocol, cast

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

_impl: ModuleType
try:
    from isal import isal_zlib as _isal
except ImportError:
    _impl = zlib
    BACKEND = f"zlib {zlib.ZLIB_RUNTIME_VERSION}"
    ERRORS: tuple[type[Exception], ...] = (zlib.error,)
    log.warning(
        "deflate.fallback backend=%s reason=%r",
        BACKEND,
        "python-isal is not installed: ZIP members are inflated and CRC-checked with zlib, "
        "2-3x slower; install it with: pip install 'isal>=1.9.1'",
    )
else:
    _impl = _isal
    BACKEND = f"ISA-L (python-isal {metadata.version('isal')})"
    ERRORS = (zlib.error, cast(type[Exception], _isal.error))  # its stub says an instance: it is a class


class Inflater(Protocol):
    """A raw DEFLATE decompression object (:func:`zlib.decompressobj` with ``wbits`` −15)."""

    @property
    def eof(self) -> bool: ...

    @property
    def unconsumed_tail(self) -> bytes: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: Buffer, max_length: int = 0) -> bytes: ...


def crc32(data: Buffer, value: int = 0) -> int:
    """The CRC-32 of ``data`` (a contiguous buffer), continued from ``value``; as :func:`zlib.crc32`."""
    crc: int = _impl.crc32(data, value)
    return crc


def inflater() -> Inflater:
    """A fresh decompression object for a raw DEFLATE stream (no header, no trailer)."""
    obj: Inflater = _impl.decompressobj(-zlib.MAX_WBITS)
    return obj


def inflate(data: Buffer) -> bytes:
    """All of a complete raw DEFLATE stream, inflated in one piece in memory (bytes after the stream's
    end are ignored); raises one of :data:`ERRORS` when the stream is corrupt or ends short."""
    out: bytes = _impl.decompress(data, -zlib.MAX_WBITS)
    return out
