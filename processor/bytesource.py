"""Byte sources: the bytes of one file of an arrival, however they are stored.

A byte source is a :class:`Member`: a name, a size, and callables that hand over its bytes —
read whole, streamed, or viewed without a copy (a ``memoryview`` of a memory map). Intake builds
members (a ZIP member, a file of a folder, bytes already in memory, see
:mod:`processor.intake.archive`); the DICOM readers (:mod:`processor.dicom`) only read them, and
never need to know where the bytes come from. This module is the kernel both sides share: it
imports nothing of ctwatch.

A :data:`Buffer` is what a reader is handed: ``bytes`` or a zero-copy ``memoryview``.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

Buffer = bytes | memoryview


@dataclass(frozen=True)
class Member:
    """One file inside an arrival. ``read()`` returns its bytes (from the ZIP or disk) each call.

    ``opener``, when given, returns a fresh binary stream over the same bytes, so that
    :meth:`read_prefix` reads (or inflates) only the start of a member; without it (members built
    from bytes already in memory) the prefix is a slice of ``read()``. A ZIP member's CRC is only
    checked when its stream is read to the end, i.e. by a prefix that covers the whole member.

    ``viewer``, when given, returns the member's bytes without copying them (a ``memoryview`` of a
    memory map); ``crc`` is the CRC-32 the ZIP recorded for them (None for files on disk).

    ``name`` is always valid text for logs and JSON (:func:`processor.names.display_name`: bytes that
    do not decode shown as ``\\xNN``); ``raw_name`` is the name's bytes as the ZIP or the
    filesystem holds them (empty for members built from bytes in memory).
    """

    name: str
    size: int
    reader: Callable[[], bytes] = field(repr=False, compare=False)
    opener: Callable[[], IO[bytes]] | None = field(default=None, repr=False, compare=False)
    viewer: Callable[[], memoryview] | None = field(default=None, repr=False, compare=False)
    crc: int | None = field(default=None, repr=False, compare=False)
    raw_name: bytes = field(default=b"", repr=False, compare=False)

    def read(self) -> bytes:
        return self.reader()

    def data(self) -> Buffer:
        """All of the member's bytes, zero-copy where possible; a ZIP member's CRC-32 is checked."""
        if self.viewer is None:
            return self.reader()
        view = self.viewer()
        if self.crc is not None and zlib.crc32(view) != self.crc:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {self.name!r}")
        return view

    def head(self, n: int) -> Buffer:
        """At least the first ``n`` bytes (all of them when the member is shorter), for reading a header.

        Zero-copy members give their whole view unchecked (a header parse reads only what it
        needs); a head that covers the whole member is CRC-checked, so a short file is verified.
        """
        if self.viewer is not None:
            return self.data() if self.size <= n else self.viewer()
        return self.read_prefix(n)

    def open(self) -> IO[bytes]:
        """A binary stream over the member's bytes (close it, or use it in a ``with`` block)."""
        return self.opener() if self.opener is not None else io.BytesIO(self.reader())

    def read_prefix(self, n: int) -> bytes:
        """The first ``n`` bytes (all of them when the member is shorter)."""
        if self.opener is None:
            return self.reader()[:n]
        with self.opener() as fh:
            return fh.read(n)
