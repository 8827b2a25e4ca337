"""A dropped folder, or a single file that is not a ZIP, as members read from disk when wanted.

:func:`read_folder` lists every regular file under a folder (a sub-folder that cannot be listed or
a file that cannot be opened refuses the arrival), setting aside, with their reasons, the files
under a temporary name (:data:`TEMPORARY_IN_FOLDER`) and the ZIPs (:data:`ZIP_IN_FOLDER`);
:func:`file_member` reads a file's bytes only when they are wanted and refuses one whose size
changed since it was listed. :func:`open_single` opens a single input and reads its first bytes,
refusing an empty file and an HTML page in plain words; :func:`what_file_is` names what other
file holds no DICOM, for the executor's message.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING

from processor.bytesource import Buffer, Member
from processor.errors import IngestError
from processor.intake.bounds import COPY_AGAIN, Budget, ReadBudget, cannot_read, pread, preadv_into, shrank
from processor.intake.inbox import is_temporary_name
from processor.names import display_name, raw_name

if TYPE_CHECKING:
    from processor.intake.archive import Contents

# files of a dropped folder that are not read, counted under these reasons
TEMPORARY_IN_FOLDER = "temporary-named file left in the folder (.name, ~$name, name.tmp…)"
ZIP_IN_FOLDER = "ZIP inside a folder, not opened (drop each ZIP on its own)"


def file_member(path: Path, name: str, raw: bytes, size: int, budget: ReadBudget) -> Member:
    """A file of a folder (or a single file), opened and read when its bytes are wanted; a file
    whose size is no longer the one it had when listed is refused (it is being written)."""

    def opened() -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as exc:
            raise cannot_read(name, exc) from exc
        try:
            if (now := os.fstat(fd).st_size) != size:
                raise shrank(f"the file {name}", size, now)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def span(offset: int, n: int) -> Buffer:
        fd = opened()
        try:
            data = pread(fd, n, offset, budget, name)
            if len(data) < n:
                raise shrank(f"the file {name}", size, os.fstat(fd).st_size)
            return data
        finally:
            os.close(fd)

    def into(offset: int, buffers: Sequence[memoryview]) -> None:
        fd = opened()
        try:
            if preadv_into(fd, buffers, offset, budget, name) < sum(map(len, buffers)):
                raise shrank(f"the file {name}", size, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    return Member(name, size, lambda: bytes(span(0, size)), None, span, raw_name=raw, into=into)


def _opened_size(path: Path, what: str) -> int | None:
    """The size of a regular file, opened to be sure it can be read; None when it is no longer
    one (replaced by a link, a pipe or a device since it was listed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise cannot_read(what, exc) from exc
    try:
        info = os.fstat(fd)
    finally:
        os.close(fd)
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def read_folder(root: Path, budget: Budget, contents: Contents, label: str) -> None:
    """Every regular file under ``root``: a sub-folder that cannot be listed or a file that cannot
    be opened refuses the arrival (never a study analysed without them). ``label``: its shown name."""
    files: list[Path] = []
    folders = [root]
    while folders:
        folder = folders.pop()
        relative = folder.relative_to(root).as_posix()
        what = label if folder == root else f"'{display_name(relative)}' in {label}"
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
            for entry in entries:
                if entry.is_symlink():
                    contents.skipped["symbolic link"] += 1
                elif entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    files.append(Path(entry.path))
        except OSError as exc:
            raise cannot_read(what, exc) from exc
    for path in sorted(files):
        if is_temporary_name(path.name):  # a copy's leftover: the watcher waited for it to change
            contents.skipped[TEMPORARY_IN_FOLDER] += 1
            continue
        if path.name.lower().endswith(".zip"):
            contents.skipped[ZIP_IN_FOLDER] += 1
            continue
        relative = path.relative_to(root).as_posix()
        size = _opened_size(path, f"'{display_name(relative)}' in {label}")
        if size is None:
            contents.skipped["not a regular file"] += 1
            continue
        budget.take(label, size)
        member = file_member(path, display_name(relative), raw_name(relative), size, contents.budget)
        contents.members.append(member)


def open_single(path: Path, label: str) -> tuple[IO[bytes], bytes]:
    """The input file opened for reading, and its first bytes; a plain refusal when it cannot be
    read, is empty or is an HTML page."""
    try:
        fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb")  # a pipe never blocks it
    except OSError as exc:
        raise cannot_read(label, exc) from exc
    try:
        head = fh.read(1024)
    except OSError as exc:
        fh.close()
        raise cannot_read(label, exc) from exc
    if not head:
        fh.close()
        raise IngestError(
            f"the file {label} is empty (0 bytes): the copy or download did not complete — {COPY_AGAIN}"
        )
    if _is_html(head):
        fh.close()
        raise IngestError(
            f"the file {label} is an HTML page, not DICOM or a ZIP: the download probably returned "
            "a login or error page — sign in and download the study again, or export it from the "
            "PACS as DICOM"
        )
    return fh, head


def _is_html(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return text.startswith((b"<!doctype html", b"<html")) or (text.startswith(b"<") and b"<html" in text)


_REPACK = "ctwatch reads ZIP archives only: re-pack the study as a ZIP (or drop its folder)"
_EXPORT = "export the study as DICOM (a ZIP of DICOM files, a folder of them, or one DICOM file)"
_SIGNATURES: tuple[tuple[bytes, int, str, str], ...] = (
    (b"%PDF", 0, "a PDF document", _EXPORT),
    (b"\x1f\x8b", 0, "a gzip file", _REPACK),
    (b"7z\xbc\xaf\x27\x1c", 0, "a 7-Zip archive", _REPACK),
    (b"Rar!\x1a\x07", 0, "a RAR archive", _REPACK),
    (b"ustar", 257, "a tar archive", _REPACK),
    (b"\x89PNG", 0, "a PNG image", _EXPORT),
    (b"\xff\xd8\xff", 0, "a JPEG image", _EXPORT),
)


def what_file_is(head: bytes) -> tuple[str, str]:
    """(what a file that is neither a ZIP nor DICOM is, by its first bytes; the fix)."""
    for magic, at, what, fix in _SIGNATURES:
        if head[at : at + len(magic)] == magic:
            return what, fix
    text = head.decode("utf-8", "replace").rstrip("\ufffd")  # a character cut at the end of the head
    if all(ch.isprintable() or ch in "\t\r\n\f" for ch in text):
        return "text", _EXPORT
    return "binary data of no kind ctwatch knows", _EXPORT
