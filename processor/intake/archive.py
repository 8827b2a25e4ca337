"""Safe reading of an arrival — a ZIP, a folder or a single file — as in-memory members.

A ZIP is checked whole before any member is read: a member name that is absolute or climbs out
with ``..``, a symlink, an encrypted member (ZipCrypto or AES), a compression method ctwatch cannot
read (e.g. Deflate64, PPMd), too many members, too many uncompressed bytes or a compression ratio
above the cap refuses the whole archive with an :class:`IngestError` that says which member, why
and the fix. Nothing is extracted to disk. One level of nested ZIP is read.

The caps are checked against the sizes the central directory declares, and a member is never
inflated past its declared size (so never past the total either): :mod:`.inflate` reads it in
chunks and stops at the first byte too many. What is found only while a member is read — that
lie, a stream cut short, a bad CRC-32 — is a :class:`zipfile.BadZipFile` for that member alone,
which the scan counts as an unreadable member. Every chunk read or inflated while the arrival is
opened and scanned is also charged to its :class:`ReadBudget`: the bytes actually read, a member
read twice counting twice, may not pass ``limits.max_total_bytes``, and the budget's check (the
executor's time budget and stop request) runs at every chunk, so no archive holds the reader
longer than one chunk past either.

Inputs are read with ordinary I/O, never memory-mapped: they are not the daemon's own files, and
a writer that still holds one open can truncate it after it was moved into ``work/`` (a mapped
file that shrinks stops the process with SIGBUS). A ZIP is held open for the arrival and a STORED
member (the usual way DICOM is zipped: it hardly deflates) is read with ``os.pread`` of exactly
its byte range; a file of a folder is opened and read when its bytes are wanted. A file that
shrank or changed size since it was opened or listed is an :class:`IngestError` for the arrival
("… shrank while it was read; copy it again"), never a signal. :meth:`Member.data` checks a ZIP
member's CRC-32 before handing its bytes over, as :mod:`zipfile` does.

A folder, a file or a ZIP that the service user cannot read (a sub-folder it cannot list, a file
it cannot open) refuses the whole arrival in plain words, so that a study missing files is never
analysed as if it were complete. An empty file and an HTML page (a login or error page saved
under the study's name) are refused with their own reasons; what other single file that holds no
DICOM is, :func:`.diskfiles.what_file_is` says for the executor's message (a program with a ZIP appended, a
self-extracting archive, is named as one: ctwatch runs no programs).

A ZIP is read only when it ends as a whole ZIP does (:mod:`.zipend`): a copy cut short just after a
member that is itself a ZIP is refused in plain words, never read as that smaller ZIP. In a folder,
a file under a temporary name (a copy's leftover, which the watcher waited on; see
:mod:`.watcher`) and a ZIP (a folder is read as the DICOM files of one drop) are not read: each is
counted under ``skipped`` with its reason (:data:`.diskfiles.TEMPORARY_IN_FOLDER`, :data:`.diskfiles.ZIP_IN_FOLDER`).
"""

from __future__ import annotations

import io
import logging
import os
import stat
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO

from processor.bytesource import Buffer, Member
from processor.errors import IngestError
from processor.intake.bounds import COPY_AGAIN, Budget, Limits, ReadBudget, pread, preadv_into, shrank
from processor.intake.diskfiles import file_member, open_single, read_folder, what_file_is
from processor.intake.inflate import MemberReadError, ReadGuard, open_member, read_member, refusal
from processor.intake.zipend import ZipEndError, ends_in_zip, open_whole_zip
from processor.intake.zipnames import member_raw_name, member_text
from processor.names import display_name, display_text, raw_name

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"
# What zipfile raises for a damaged archive (a bad name encoding is a ValueError; see zipnames).
ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    OSError,
    EOFError,
    ValueError,
    NotImplementedError,
    struct.error,
)
EMPTY_ZIP_MAGIC = b"PK\x05\x06"


class ArrivalKind(StrEnum):
    ZIP = "zip"
    FOLDER = "folder"
    FILE = "file"


@dataclass
class Contents:
    """What an arrival holds: its members, and the entries skipped with a reason each.

    ``what``, for a single file that is not a ZIP, is what its first bytes show it is
    (:func:`.diskfiles.what_file_is`), for a message when it holds no DICOM.
    """

    members: list[Member] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    kind: ArrivalKind = ArrivalKind.FILE
    budget: ReadBudget = field(default_factory=lambda: ReadBudget(Limits.max_total_bytes))
    what: tuple[str, str] | None = None


def safe_member_name(name: str) -> str | None:
    """The normalised relative name of a ZIP member, or None when it is unsafe to honour.

    Unsafe: empty, absolute (``/x``, ``\\x``, ``C:x``), containing ``..`` as a component, or NUL.
    """
    if not name or "\x00" in name:
        return None
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        return None
    parts = [p for p in unified.split("/") if p not in ("", ".")]  # as PurePosixPath(unified).parts
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def is_zip_bytes(head: bytes) -> bool:
    return head[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC)


def is_zip_path(path: Path) -> bool:
    with path.open("rb") as fh:
        return is_zip_bytes(fh.read(4))


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths at 26 and 28
_LOCAL_READ = 512  # bytes read after a local header with it: its name, extra field and first bytes
_LEAD = 64  # of a member's first bytes read so, kept for the reads they cover (one pread saved)


class _Input:
    """An input file held open while its arrival is read (a ZIP): read by ``os.pread``."""

    def __init__(self, fh: IO[bytes], label: str, budget: ReadBudget) -> None:
        self.fd = fh.fileno()
        self.size = os.fstat(self.fd).st_size
        self.label = label
        self.budget = budget

    def check_unchanged(self) -> None:
        now = os.fstat(self.fd).st_size
        if now != self.size:
            raise shrank(f"the ZIP {self.label}", self.size, now)

    # ReadGuard (processor.intake.inflate): chunks go to the budget, failures are checked here
    def charge(self, n: int) -> None:
        self.budget.charge(n)

    def failed(self, exc: Exception) -> None:
        self.check_unchanged()

    def spans(
        self, info: zipfile.ZipInfo, where: str
    ) -> tuple[Callable[[int, int], Buffer], Callable[[int, Sequence[memoryview]], None]]:
        """A STORED member's bytes [offset, offset + n), read where they lie in the ZIP: as new
        bytes (``span``), or into a byte view the caller holds (``into``, ``len(out)`` bytes)."""
        start: list[int] = []
        lead: list[bytes] = []  # the member's first bytes, read with its local header
        what = f"the ZIP {self.label}"

        def data_start() -> int:
            if not start:
                header = os.pread(self.fd, _LOCAL_HEADER.size + _LOCAL_READ, info.header_offset)
                if len(header) >= _LOCAL_HEADER.size and header[:4] == ZIP_MAGIC:
                    _, name_len, extra_len = _LOCAL_HEADER.unpack_from(header)
                    skip = _LOCAL_HEADER.size + name_len + extra_len
                    start.append(info.header_offset + skip)
                    lead.append(header[skip : skip + _LEAD])
                else:
                    self.check_unchanged()
                    raise MemberReadError(f"{where} cannot be read: its local header is missing or cut short")
            return start[0]

        def short() -> MemberReadError:
            self.check_unchanged()
            return MemberReadError(
                f"{where} ends past the end of the ZIP: the ZIP is truncated or damaged — "
                "copy it again from the source"
            )

        def read(offset: int, n: int) -> Buffer:
            at = data_start() + offset
            if offset + n <= len(lead[0]):  # e.g. the 4 bytes that tell a nested ZIP: read already
                self.budget.charge(n)
                return lead[0][offset : offset + n]
            data = pread(self.fd, n, at, self.budget, what)
            if len(data) < n:
                raise short()
            return data

        def read_into(offset: int, buffers: Sequence[memoryview]) -> None:
            if preadv_into(self.fd, buffers, data_start() + offset, self.budget, what) < sum(
                map(len, buffers)
            ):
                raise short()

        return read, read_into


class _InMemory:
    """The ReadGuard of a ZIP nested in another, read from bytes in memory: chunks are charged."""

    def __init__(self, budget: ReadBudget) -> None:
        self.budget = budget

    def charge(self, n: int) -> None:
        self.budget.charge(n)

    def failed(self, exc: Exception) -> None:
        """Bytes in memory do not change: the failure stands."""


def _check_zip(zf: zipfile.ZipFile, label: str, budget: Budget) -> list[tuple[zipfile.ZipInfo, str]]:
    """Vet every entry of an open ZIP; returns (info, safe name) of the files in it."""
    files = []
    for info in zf.infolist():
        text = member_text(info)
        where = f"in {label}, member '{display_text(text)}'"
        name = safe_member_name(text)
        if name is None:
            raise IngestError(
                f"{where} has an absolute or '..' path (zip-slip); "
                "the archive was refused — re-export it without such paths"
            )
        if stat.S_ISLNK(info.external_attr >> 16):
            raise IngestError(
                f"{where} is a symbolic link; archives with links are refused — "
                "re-export the study without links"
            )
        if info.is_dir():
            continue
        why = refusal(info)
        if why is not None:
            raise IngestError(f"{where} {why}")
        budget.take(label, info.file_size)
        ratio = info.file_size / max(info.compress_size, 1)
        if info.file_size > 1_000_000 and ratio > budget.limits.max_ratio:
            raise IngestError(
                f"{where} expands {ratio:.0f}x (limit {budget.limits.max_ratio:g}); "
                "refused as a likely ZIP bomb"
            )
        files.append((info, name))
    return files


def _memory_span(
    buffer: bytes, info: zipfile.ZipInfo, budget: ReadBudget
) -> Callable[[int, int], Buffer] | None:
    """A STORED member of a nested ZIP (whose bytes are in memory) as a view of them, or None."""
    at = info.header_offset
    if at + _LOCAL_HEADER.size > len(buffer):
        return None
    magic, name_len, extra_len = _LOCAL_HEADER.unpack_from(buffer, at)
    start = at + _LOCAL_HEADER.size + name_len + extra_len
    if magic != ZIP_MAGIC or start + info.file_size > len(buffer):
        return None

    def view(offset: int, n: int) -> memoryview:
        budget.charge(n)
        return memoryview(buffer)[start + offset : start + offset + n]

    return view


def _zip_reader(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, guard: ReadGuard
) -> Callable[[], bytes]:
    return lambda: read_member(zf, info, where, guard)


def _zip_opener(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, guard: ReadGuard
) -> Callable[[], IO[bytes]]:
    return lambda: open_member(zf, info, where, guard)


def _read_zip(
    zf: zipfile.ZipFile,
    label: str,
    budget: Budget,
    contents: Contents,
    stack: ExitStack,
    depth: int,
    source: _Input | bytes,
) -> None:
    guard: ReadGuard = source if isinstance(source, _Input) else _InMemory(contents.budget)
    for info, name in _check_zip(zf, label, budget):
        where = f"in {label}, member '{display_text(name)}'"
        prefix = "" if depth == 0 else label.split("!", 1)[1] + "!"
        span, into = None, None
        if info.compress_type == zipfile.ZIP_STORED and info.compress_size == info.file_size:
            if isinstance(source, _Input):
                span, into = source.spans(info, where)
            else:
                span = _memory_span(source, info, contents.budget)
        member = Member(
            prefix + display_text(name),
            info.file_size,
            _zip_reader(zf, info, where, guard),
            _zip_opener(zf, info, where, guard),
            span,
            info.CRC,
            member_raw_name(info),
            into,
        )
        try:
            head = member.read_prefix(4)
        except zipfile.BadZipFile:
            head = b""  # unreadable: kept as a member, for the scan to count
        if is_zip_bytes(head):
            if depth >= 1:
                contents.skipped["nested ZIP deeper than one level"] += 1
                continue
            try:
                inner_bytes = member.read()
                inner = stack.enter_context(open_whole_zip(io.BytesIO(inner_bytes)))
            except ZIP_ERRORS:
                contents.skipped["corrupt nested ZIP"] += 1
                continue
            _read_zip(inner, f"{label}!{display_text(name)}", budget, contents, stack, depth + 1, inner_bytes)
            continue
        contents.members.append(member)


_SELF_EXTRACTING = (
    "a self-extracting archive (a program with a ZIP inside)",
    "ctwatch does not run programs: export the study as a plain ZIP, or extract it and drop the folder",
)


def _ends_in_zip(fh: IO[bytes]) -> bool:
    """Whether a file that does not begin as a ZIP ends in one (:func:`.zipend.ends_in_zip`)."""
    try:
        return ends_in_zip(fh)
    except OSError:
        return False


@contextmanager
def open_arrival(
    path: Path, limits: Limits, check: Callable[[], None] | None = None, *, name: str | None = None
) -> Iterator[Contents]:
    """Yield the members of a ZIP, a folder or a single file. The ZIP stays open inside the block.

    ``check`` runs at every chunk read until ``contents.budget.settle()`` (see :class:`ReadBudget`).
    ``name``: what the user called the input (reasons name it; default the file's own name, which
    in the work folder carries ctwatch's ``a<id>-`` prefix).
    """
    budget = Budget(limits)
    label = display_name(name if name is not None else path.name)
    contents = Contents(budget=ReadBudget(limits.max_total_bytes, check))
    with ExitStack() as stack:
        if path.is_dir():
            contents.kind = ArrivalKind.FOLDER
            read_folder(path, budget, contents, label)
        else:
            fh, head = open_single(path, label)
            stack.enter_context(fh)
            if is_zip_bytes(head):
                contents.kind = ArrivalKind.ZIP
                source = _Input(fh, label, contents.budget)
                try:
                    zf = stack.enter_context(open_whole_zip(fh))
                except ZipEndError as exc:
                    raise IngestError(f"the ZIP cannot be read: {label} {exc} — {COPY_AGAIN}") from exc
                except ZIP_ERRORS as exc:
                    raise IngestError(
                        f"the ZIP cannot be read ({display_text(str(exc))}): {label} is "
                        "truncated or corrupt — copy it again from the source"
                    ) from exc
                _read_zip(zf, label, budget, contents, stack, depth=0, source=source)
            else:
                size = os.fstat(fh.fileno()).st_size
                budget.take(label, size)
                contents.what = _SELF_EXTRACTING if _ends_in_zip(fh) else what_file_is(head)
                contents.members.append(file_member(path, label, raw_name(path.name), size, contents.budget))
        yield contents


def zip_central_directory_reads(path: Path) -> bool:
    """True when the file's ZIP central directory can be read and ends the file as its end record
    says (:func:`processor.intake.zipend.check_whole`): the copy is complete. ``OSError`` when the
    file cannot be opened."""
    with path.open("rb") as fh:
        try:
            with open_whole_zip(fh) as zf:
                zf.infolist()
            return True
        except ZIP_ERRORS:
            return False
