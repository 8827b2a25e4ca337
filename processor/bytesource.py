"""Byte sources: the bytes of one file of an arrival, however they are stored.

A byte source is a :class:`Member`: a name, a size, and callables that hand over its bytes —
read whole, streamed, or, when they are stored as they are (a STORED ZIP member, a file, bytes
already in memory), read straight from where they lie without inflating anything. Intake builds
members (a ZIP member, a file of a folder, bytes already in memory, see
:mod:`processor.intake.archive`); the DICOM readers (:mod:`processor.dicom`) only read them, and
never need to know where the bytes come from. This module is the kernel both sides share: it
imports nothing of ctwatch but :mod:`processor.deflate` (the CRC-32).

Inputs are read with ordinary reads (``os.pread``, ``read``), never memory-mapped: an input is not
the daemon's own file, and a map of a file that shrinks while it is read stops the process with
SIGBUS, where a read returns short and becomes an error for that arrival.

A :data:`Buffer` is what a reader is handed: ``bytes``, or a ``memoryview`` of bytes already in
memory (a member of a nested ZIP).
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, NoReturn

from processor.deflate import crc32

# a member's bytes after ``out`` (:meth:`Member.read_into`), up to this many, are read in the same call
TAIL_READ_WITH = 64 << 10

Buffer = bytes | memoryview


class ArchiveClosed(ValueError):
    """A member of a study prepared in another process was read after its archive was closed."""


def _archive_closed() -> bytes:
    raise ArchiveClosed("the member's archive was closed when the CPU stage ended; it cannot be read again")


@dataclass(frozen=True)
class Member:
    """One file inside an arrival. ``read()`` returns its bytes (from the ZIP or disk) each call.

    ``opener``, when given, returns a fresh binary stream over the same bytes, so that
    :meth:`read_prefix` reads (or inflates) only the start of a member; without it (members built
    from bytes already in memory) the prefix is a slice of ``read()``. A ZIP member's CRC is only
    checked when its stream is read to the end, i.e. by a prefix that covers the whole member.

    ``span``, when given, returns ``n`` bytes of the member from ``offset`` exactly as they are
    stored (a STORED member's byte range in its ZIP, a file's bytes, a slice of bytes in memory):
    nothing is inflated and nothing is copied twice. ``crc`` is the CRC-32 the ZIP recorded for
    them (None for files on disk). ``into``, when given, reads the stored bytes from ``offset``
    into writable byte views the caller holds, filling each in turn (``span``'s bytes without new
    memory, e.g. straight into a volume's slice, :meth:`read_into`).

    ``name`` is always valid text for logs and JSON (:func:`processor.names.display_name`: bytes that
    do not decode shown as ``\\xNN``); ``raw_name`` is the name's bytes as the ZIP or the
    filesystem holds them (empty for members built from bytes in memory).
    """

    name: str
    size: int
    reader: Callable[[], bytes] = field(repr=False, compare=False)
    opener: Callable[[], IO[bytes]] | None = field(default=None, repr=False, compare=False)
    span: Callable[[int, int], Buffer] | None = field(default=None, repr=False, compare=False)
    crc: int | None = field(default=None, repr=False, compare=False)
    raw_name: bytes = field(default=b"", repr=False, compare=False)
    into: Callable[[int, Sequence[memoryview]], None] | None = field(default=None, repr=False, compare=False)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        """Pickled (a study prepared in a CPU pool process, :mod:`processor.cpupool`) without its
        readers: they read an archive that is closed once the CPU stage returns; a read of the copy
        raises :class:`ArchiveClosed`."""
        return (Member, (self.name, self.size, _archive_closed, None, None, self.crc, self.raw_name))

    @property
    def viewer(self) -> Callable[[], Buffer] | None:
        """All of the member's stored bytes without inflating them and without the CRC-32 check
        (None when they must be inflated)."""
        span = self.span
        if span is None:
            return None
        size = self.size
        return lambda: span(0, size)

    def read(self) -> bytes:
        return self.reader()

    def data(self) -> Buffer:
        """All of the member's bytes, read straight where they are stored; a ZIP member's CRC-32 is checked."""
        if self.span is None:
            return self.reader()
        stored = self.span(0, self.size)
        if self.crc is not None and crc32(stored) != self.crc:
            raise zipfile.BadZipFile(f"Bad CRC-32 for file {self.name!r}")
        return stored

    def read_into(self, n: int, out: memoryview) -> tuple[Buffer, Buffer]:
        """The member's first ``n`` bytes (returned as ``head``), the next ``len(out)`` written into
        ``out``, and the rest (returned): ``(head, rest)``. The head and ``out`` are read in one
        call where the member has ``into``, and the rest with them when it is no longer than
        :data:`TAIL_READ_WITH` (a trailing padding element then costs no second read). A ZIP
        member's CRC-32 is checked over head, ``out`` and the rest, in order, as :meth:`data`
        checks it over the whole (the same error when it does not match). Only for members with a
        ``span``, and ``n + len(out)`` within the member."""
        span = self.span
        if span is None:
            raise ValueError(f"{self.name}: read_into needs a member whose bytes are stored as they are")
        head: Buffer
        rest: Buffer
        after = n + len(out)
        if self.into is not None:
            buffer = memoryview(bytearray(n))
            if 0 < self.size - after <= TAIL_READ_WITH:  # e.g. trailing padding after Pixel Data
                tail = memoryview(bytearray(self.size - after))
                self.into(0, (buffer, out, tail))
                rest = tail
            else:
                self.into(0, (buffer, out))
                rest = span(after, self.size - after) if after < self.size else b""
            head = buffer
        else:
            head = span(0, n)
            out[:] = span(n, len(out))
            rest = span(after, self.size - after) if after < self.size else b""
        if self.crc is not None:
            crc = crc32(out, crc32(head))
            if (crc32(rest, crc) if rest else crc) != self.crc:
                raise zipfile.BadZipFile(f"Bad CRC-32 for file {self.name!r}")
        return head, rest

    def head(self, n: int) -> Buffer:
        """The first ``n`` bytes (all of them when the member is shorter), for reading a header.

        A head that covers the whole member is the member's :meth:`data` (CRC-checked), so a short
        file is verified; a shorter head is read where it lies, or inflated from a stream.
        """
        if self.size <= n:
            return self.data()
        if self.span is not None:
            return self.span(0, n)
        return self.read_prefix(n)

    def open(self) -> IO[bytes]:
        """A binary stream over the member's bytes (close it, or use it in a ``with`` block)."""
        return self.opener() if self.opener is not None else io.BytesIO(self.reader())

    def read_prefix(self, n: int) -> bytes:
        """The first ``n`` bytes (all of them when the member is shorter)."""
        if self.span is not None:
            return bytes(self.data()[:n]) if n >= self.size else bytes(self.span(0, n))
        if self.opener is None:
            return self.reader()[:n]
        with self.opener() as fh:
            return fh.read(n)


def readerless(member: Member) -> Member:
    """``member`` without its readers: its name, size, CRC-32 and raw name, as it is pickled
    (:meth:`Member.__reduce__`); a read of it raises :class:`ArchiveClosed`."""
    return Member(member.name, member.size, _archive_closed, None, None, member.crc, member.raw_name)


def carried(member: Member) -> Member:
    """A copy of ``member`` that holds its bytes and keeps them when pickled: the input of a study
    sent to a Dask worker that does not see the coordinator's files (``executor.dask.inputs:
    bytes``, :mod:`processor.executor_dask`). Read now, whole (a ZIP member's CRC-32 is checked).

    Never raises for a member that cannot be read (a bad CRC-32, a stream cut short, an input that
    changed): the copy then carries the failure, and each of its reads raises the same exception,
    type and message, wherever it is read — the step that reads it on the worker fails in the words
    it would have used here, and the batch's other studies are not touched."""
    try:
        data = bytes(member.data())
    except Exception as exc:  # noqa: BLE001 — raised again by the copy's reads, where a step reads it
        return _unreadable(member.name, member.size, _pickled(exc), member.raw_name)
    return _carried(member.name, data, member.raw_name)


def _pickled(exc: Exception) -> bytes:
    """``exc`` (its type and arguments; no traceback, no cause) as pickled bytes; when it does not
    survive pickling, an :class:`OSError` that names its type and says its message."""
    try:
        blob = pickle.dumps(exc)
        pickle.loads(blob)
    except Exception:  # noqa: BLE001 — an exception type with arguments pickle cannot rebuild
        blob = pickle.dumps(OSError(f"{type(exc).__name__}: {exc}"))
    return blob


def _carried(name: str, data: bytes, raw_name: bytes) -> Member:
    view = memoryview(data)
    return _Carried(
        name,
        len(data),
        lambda: data,
        lambda: io.BytesIO(data),
        lambda offset, n: view[offset : offset + n],
        None,
        raw_name,
    )


@dataclass(frozen=True)
class _Carried(Member):
    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (_carried, (self.name, self.reader(), self.raw_name))


def _unreadable(name: str, size: int, error: bytes, raw_name: bytes) -> Member:
    def fail(*_: object) -> NoReturn:
        raise pickle.loads(error)  # a fresh exception each read

    return _Unreadable(name, size, fail, fail, fail, None, raw_name, error=error)


@dataclass(frozen=True)
class _Unreadable(_Carried):
    """A carried member that could not be read: ``error`` is its read's exception, pickled."""

    error: bytes = field(default=b"", repr=False, compare=False)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (_unreadable, (self.name, self.size, self.error, self.raw_name))
