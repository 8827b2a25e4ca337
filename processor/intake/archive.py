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
which the scan counts as an unreadable member.

Members are :class:`processor.bytesource.Member` byte sources. Zero copy where the bytes allow it:
a ZIP on disk is memory-mapped, and a member STORED in it (the usual way DICOM is zipped: it
hardly deflates) is a ``memoryview`` of that map; files of a folder are mapped one by one.
:meth:`Member.data` checks a ZIP member's CRC-32 before handing its bytes over, as :mod:`zipfile`
does; :meth:`Member.head` is for headers and checks the CRC only when it covers the whole member.
A mapped file must not shrink while it is read (the OS would stop the process with SIGBUS): the
daemon maps only inputs it has moved into its own ``.ctwatch/work/`` folder (``python run.py
process`` reads its arguments in place), and never files on a network or FUSE filesystem, where
an I/O error would also arrive as SIGBUS instead of an exception — those are read with ordinary
reads (:func:`can_map`).
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import stat
import struct
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from processor.bytesource import Buffer, Member
from processor.errors import IngestError
from processor.intake.inflate import open_member, read_member, refusal
from processor.intake.zipnames import member_raw_name, member_text, open_zip
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


@dataclass(frozen=True)
class Limits:
    max_members: int = 20_000
    max_total_bytes: int = 8 * 2**30
    max_ratio: float = 200.0


@dataclass
class Contents:
    """What an arrival holds: its members, and the entries skipped with a reason each."""

    members: list[Member] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def safe_member_name(name: str) -> str | None:
    """The normalised relative name of a ZIP member, or None when it is unsafe to honour.

    Unsafe: empty, absolute (``/x``, ``\\x``, ``C:x``), containing ``..`` as a component, or NUL.
    """
    if not name or "\x00" in name:
        return None
    unified = name.replace("\\", "/")
    if unified.startswith("/") or (len(unified) >= 2 and unified[1] == ":"):
        return None
    parts = [p for p in PurePosixPath(unified).parts if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts):
        return None
    return "/".join(parts)


def is_zip_bytes(head: bytes) -> bool:
    return head[:4] in (ZIP_MAGIC, EMPTY_ZIP_MAGIC)


def is_zip_path(path: Path) -> bool:
    with path.open("rb") as fh:
        return is_zip_bytes(fh.read(4))


class _Budget:
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
                f"{where}: more than {self.limits.max_members} members; "
                "split the export into smaller ZIPs or raise limits.max_members"
            )
        if self.total > self.limits.max_total_bytes:
            raise IngestError(
                f"{where}: more than {self.limits.max_total_bytes} bytes uncompressed "
                "(a ZIP bomb, or an export too large); raise limits.max_total_bytes if genuine"
            )


def _check_zip(zf: zipfile.ZipFile, label: str, budget: _Budget) -> list[tuple[zipfile.ZipInfo, str]]:
    """Vet every entry of an open ZIP; returns (info, safe name) of the files in it."""
    files = []
    for info in zf.infolist():
        text = member_text(info)
        where = f"{label}: member '{display_text(text)}'"
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


def _zip_reader(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Callable[[], bytes]:
    return lambda: read_member(zf, info, where)


_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then name and extra-field lengths at 26 and 28


def _stored_viewer(
    buffer: Buffer | mmap.mmap | None, info: zipfile.ZipInfo
) -> Callable[[], memoryview] | None:
    """A zero-copy view of a STORED member inside ``buffer`` (the whole ZIP), or None."""
    if buffer is None or info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        return None
    at = info.header_offset
    if at + _LOCAL_HEADER.size > len(buffer):
        return None
    magic, name_len, extra_len = _LOCAL_HEADER.unpack_from(buffer, at)
    start = at + _LOCAL_HEADER.size + name_len + extra_len
    if magic != ZIP_MAGIC or start + info.file_size > len(buffer):
        return None
    return lambda: memoryview(buffer)[start : start + info.file_size]


NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "davfs",
        "virtiofs",
        "ncpfs",
        "coda",
        "ocfs2",
        "beegfs",
    }
)


def filesystem_types(mountinfo: str) -> dict[tuple[int, int], str]:
    """(major, minor) device → filesystem type, from the text of ``/proc/self/mountinfo``."""
    types: dict[tuple[int, int], str] = {}
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if not sep or len(fields) < 3 or ":" not in fields[2] or not after.split():
            continue
        major, _, minor = fields[2].partition(":")
        if major.isdigit() and minor.isdigit():
            types[(int(major), int(minor))] = after.split()[0]
    return types


def can_map(path: Path) -> bool:
    """Whether ``path`` is on a local filesystem, safe to memory-map (True where it cannot be told)."""
    try:
        device = path.stat().st_dev
        mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    return mappable_type(filesystem_types(mountinfo).get((os.major(device), os.minor(device))))


def mappable_type(kind: str | None) -> bool:
    """False for network and FUSE filesystems (an I/O error there would arrive as SIGBUS)."""
    return kind is None or not (kind in NETWORK_FILESYSTEMS or kind.startswith("fuse"))


def _mapped(path: Path) -> mmap.mmap | None:
    """A read-only memory map of a file (None when empty or the platform refuses)."""
    try:
        with path.open("rb") as fh:
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None


def _zip_opener(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> Callable[[], IO[bytes]]:
    return lambda: open_member(zf, info, where)


def _read_zip(
    zf: zipfile.ZipFile,
    label: str,
    budget: _Budget,
    contents: Contents,
    stack: ExitStack,
    depth: int,
    buffer: Buffer | mmap.mmap | None = None,
) -> None:
    for info, name in _check_zip(zf, label, budget):
        where = f"{label}: member '{display_text(name)}'"
        prefix = "" if depth == 0 else label.split("!", 1)[1] + "!"
        member = Member(
            prefix + display_text(name),
            info.file_size,
            _zip_reader(zf, info, where),
            _zip_opener(zf, info, where),
            _stored_viewer(buffer, info),
            info.CRC,
            member_raw_name(info),
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
                inner = stack.enter_context(open_zip(io.BytesIO(inner_bytes)))
            except ZIP_ERRORS:
                contents.skipped["corrupt nested ZIP"] += 1
                continue
            _read_zip(inner, f"{label}!{display_text(name)}", budget, contents, stack, depth + 1, inner_bytes)
            continue
        contents.members.append(member)


def _file_reader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _file_opener(path: Path) -> Callable[[], IO[bytes]]:
    return lambda: path.open("rb")


def _file_viewer(path: Path, mappable: bool) -> Callable[[], memoryview] | None:
    """A zero-copy view of a whole file (read into memory when it cannot be mapped, e.g. empty);
    None on a filesystem that must not be mapped."""
    if not mappable:
        return None

    def view() -> memoryview:
        mapped = _mapped(path)
        return memoryview(mapped if mapped is not None else path.read_bytes())

    return view


def _read_folder(root: Path, budget: _Budget, contents: Contents, mappable: bool) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            contents.skipped["symbolic link"] += 1
            continue
        if not path.is_file():
            continue
        size = path.stat().st_size
        budget.take(display_name(root), size)
        relative = path.relative_to(root).as_posix()
        contents.members.append(
            Member(
                display_name(relative),
                size,
                _file_reader(path),
                _file_opener(path),
                _file_viewer(path, mappable),
                raw_name=raw_name(relative),
            )
        )


@contextmanager
def open_arrival(path: Path, limits: Limits) -> Iterator[Contents]:
    """Yield the members of a ZIP, a folder or a single file. ZIP handles stay open inside the block."""
    budget = _Budget(limits)
    contents = Contents()
    with ExitStack() as stack:
        mappable = can_map(path)
        if path.is_dir():
            _read_folder(path, budget, contents, mappable)
        elif is_zip_path(path):
            label = display_name(path.name)
            try:
                zf = stack.enter_context(open_zip(path))
            except ZIP_ERRORS as exc:
                raise IngestError(
                    f"{label}: the ZIP cannot be read ({display_text(str(exc))}); it is "
                    "truncated or corrupt — copy it again from the source"
                ) from exc
            mapped = _mapped(path) if mappable else None
            if mapped is not None:
                stack.callback(_close_map, mapped)
            _read_zip(zf, label, budget, contents, stack, depth=0, buffer=mapped)
        else:
            size = path.stat().st_size
            budget.take(display_name(path.name), size)
            contents.members.append(
                Member(
                    display_name(path.name),
                    size,
                    _file_reader(path),
                    _file_opener(path),
                    _file_viewer(path, mappable),
                    raw_name=raw_name(path.name),
                )
            )
        yield contents


def _close_map(mapped: mmap.mmap) -> None:
    """Close a ZIP's map at the end of its block; while views of it live on, the collector closes it."""
    try:
        mapped.close()
    except BufferError:
        log.debug("archive.map_in_use: closed when its last view is released")


def zip_central_directory_reads(path: Path) -> bool:
    """True when the file's ZIP central directory can be read (the copy is complete)."""
    try:
        with open_zip(path) as zf:
            zf.infolist()
        return True
    except ZIP_ERRORS:
        return False
