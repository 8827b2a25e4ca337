"""The bounds on reading one arrival, and the guarded reads of its bytes that are charged to them.

:class:`Limits` are the caps a user sets (members, uncompressed bytes, compression ratio, seconds);
:class:`Budget` counts the members and declared sizes of an archive (and the ZIPs nested inside it)
against them, and :class:`ReadBudget` the bytes actually read or inflated while the arrival is
opened and scanned. :func:`pread` reads a byte range in chunks, each charged (:func:`pread_into` into memory the caller holds); :func:`cannot_read`
and :func:`shrank` give the plain reasons (and fixes) for an input that cannot be read or changed
size while it was read (:mod:`processor.intake.archive` says why).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from processor.bytesource import Buffer
from processor.errors import IngestError
from processor.names import display_text

READ_CHUNK = 16 << 20  # bytes of a STORED member or a file read (and charged) per call
COPY_AGAIN = "copy it again from the source, then drop it again"


@dataclass(frozen=True)
class Limits:
    max_members: int = 20_000
    max_total_bytes: int = 8 * 2**30
    max_ratio: float = 200.0
    max_seconds_per_arrival: float = 600.0  # applied by the executor (opening and scanning)


class ReadBudget:
    """The running cost of reading one arrival while it is opened and scanned.

    :meth:`charge` counts the bytes actually read or inflated (a member read twice counts twice)
    against ``max_bytes`` and runs ``check`` (which raises to stop the reading: the time budget, a
    stop request). :meth:`settle` ends the count once the scan is over: the steps then read only
    the series they chose, each member no further than its declared size.
    """

    def __init__(self, max_bytes: int, check: Callable[[], None] | None = None) -> None:
        self.max_bytes = max_bytes
        self.check = check
        self.spent = 0
        self.counting = True

    def charge(self, n: int) -> None:
        if not self.counting:
            return
        self.spent += n
        if self.spent > self.max_bytes:
            raise IngestError(
                f"reading its files took more than {self.max_bytes} bytes (read or inflated); the "
                "archive is built to exhaust the reader, or the export is too large — raise "
                "limits.max_total_bytes if it is genuine"
            )
        if self.check is not None:
            self.check()

    def settle(self) -> None:
        self.counting = False


def cannot_read(what: str, exc: OSError) -> IngestError:
    """The plain reason (and fix) for an input, or a part of one, that cannot be opened or listed."""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return IngestError(
            f"cannot read {what}: permission denied — give the service user read access to it, "
            "then drop it again"
        )
    if exc.errno == errno.ENOENT:
        return IngestError(f"cannot read {what}: it was deleted while it was read — {COPY_AGAIN}")
    cause = os.strerror(exc.errno) if exc.errno else display_text(str(exc))
    return IngestError(
        f"cannot read {what}: {cause} — check the disk or share it lies on, then drop it again"
    )


def shrank(what: str, was: int, now: int) -> IngestError:
    verb = "shrank" if now < was else "changed size"
    return IngestError(
        f"{what} {verb} while it was read ({was} bytes, now {now}): something is still writing "
        f"or truncating it — {COPY_AGAIN}"
    )


def pread(fd: int, n: int, offset: int, budget: ReadBudget, what: str) -> Buffer:
    """Up to ``n`` bytes at ``offset`` (fewer only at the end of the file), each chunk charged; an
    I/O error is refused in plain words (:func:`cannot_read`)."""
    if n > READ_CHUNK:
        view = memoryview(bytearray(n))
        return view[: pread_into(fd, view, offset, budget, what)].toreadonly()
    try:
        budget.charge(n)
        return os.pread(fd, n, offset)
    except OSError as exc:
        raise cannot_read(what, exc) from exc


def pread_into(fd: int, out: memoryview, offset: int, budget: ReadBudget, what: str) -> int:
    """:func:`pread` into ``out`` (a writable byte view, e.g. of the volume's slice) instead of
    new memory; returns how many bytes were read (fewer than ``len(out)`` only at the end of the
    file)."""
    n, got = len(out), 0
    try:
        while got < n:
            budget.charge(min(READ_CHUNK, n - got))
            read = os.preadv(fd, [out[got : got + READ_CHUNK]], offset + got)
            if read == 0:
                break
            got += read
    except OSError as exc:
        raise cannot_read(what, exc) from exc
    return got


def preadv_into(fd: int, buffers: Sequence[memoryview], offset: int, budget: ReadBudget, what: str) -> int:
    """:func:`pread_into` into several byte views, filled in turn from ``offset``: one ``preadv``
    where they add up to no more than one chunk (a slice's header and pixels), else one buffer
    after the other; returns how many bytes were read (fewer only at the end of the file)."""
    total = sum(map(len, buffers))
    if total > READ_CHUNK or len(buffers) == 1:
        got = 0
        for out in buffers:
            read = pread_into(fd, out, offset + got, budget, what)
            got += read
            if read < len(out):
                break
        return got
    budget.charge(total)  # the whole request, once
    views, got = list(buffers), 0
    while True:
        try:
            read = os.preadv(fd, views, offset + got)
        except OSError as exc:
            raise cannot_read(what, exc) from exc
        got += read
        if got == total or read == 0:
            return got
        # a short read (a signal, a network file system): on from where it stopped
        while read >= len(views[0]):
            read -= len(views.pop(0))
        views[0] = views[0][read:]


class Budget:
    """Member count and uncompressed bytes, shared by an archive and the ZIPs nested inside it."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.members = 0
        self.total = 0

    def take(self, where: str, size: int) -> None:
        self.members += 1
        self.total += size
        if self.members > self.limits.max_members:
            raise IngestError(
                f"too many files: {where} holds more than {self.limits.max_members} members; "
                "split the export into smaller ZIPs or raise limits.max_members"
            )
        if self.total > self.limits.max_total_bytes:
            raise IngestError(
                f"too large: {where} holds more than {self.limits.max_total_bytes} bytes uncompressed "
                "(a ZIP bomb, or an export too large); raise limits.max_total_bytes if genuine"
            )
