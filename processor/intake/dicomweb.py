"""DICOMweb for URL sources: QIDO-RS study search with paging, and WADO-RS study retrieval to disk.

A retrieved study becomes a folder of ``<sha256>.dcm`` files, one per instance, streamed straight
from the ``multipart/related`` response (never held in memory). Naming each file by its content
makes the folder's content hash independent of the order the server sent the instances in.
"""

from __future__ import annotations

import email.message
import hashlib
import logging
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import IO, Any

import httpx

from processor.intake.fetch import FetchRefused, FetchTransient, check_length, raise_for_status, too_large
from processor.redact import Failure, SourceFailure, What

log = logging.getLogger(__name__)

STUDY_UID, INSTANCE_COUNT, MODALITIES = "0020000D", "00201208", "00080061"
RETRIEVE_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
MAX_PAGES = 1000
MAX_PART_HEADER = 64 * 1024
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


@dataclass(frozen=True)
class StudyRef:
    """One study as QIDO-RS lists it; ``version`` changes when the study grows."""

    uid: str
    instances: int | None

    @property
    def version(self) -> str:
        return f"instances={self.instances if self.instances is not None else '?'}"


def search_studies(
    client: httpx.Client, root: str, query: dict[str, str], since: date | None, *, page_size: int
) -> Iterator[StudyRef]:
    """QIDO-RS ``/studies`` with the configured filters, a StudyDate range and limit/offset paging.

    Some servers filter ``ModalitiesInStudy`` after paging (Orthanc 1.10 answers nothing past the
    first page). So when that filter is set and a page came back full, the studies are listed
    again without it and the modalities are matched here, so that no study is missed.
    """
    params: dict[str, Any] = dict(query)
    if since is not None:
        params["StudyDate"] = f"{since:%Y%m%d}-"
    params["includefield"] = INSTANCE_COUNT
    seen: set[str] = set()
    full_pages = yield from _search(client, root, params, page_size, seen)
    wanted = query.get("ModalitiesInStudy")
    if wanted and full_pages:
        modalities = {m.strip().upper() for m in re.split(r"[\\,]", wanted) if m.strip()}
        unfiltered = {k: v for k, v in params.items() if k != "ModalitiesInStudy"}
        unfiltered["includefield"] = [INSTANCE_COUNT, MODALITIES]
        log.info("source.qido.relist reason=%r", "a full page with ModalitiesInStudy: matched here instead")
        yield from _search(client, root, unfiltered, page_size, seen, modalities)


def _search(
    client: httpx.Client,
    root: str,
    params: dict[str, Any],
    page_size: int,
    seen: set[str],
    modalities: set[str] | None = None,
) -> Generator[StudyRef, None, int]:
    """Page through one QIDO-RS search; returns how many pages came back full. With ``modalities``,
    a study is kept when one of its ModalitiesInStudy is wanted, or when the server did not say."""
    full_pages = 0
    listed: set[str] = set()  # this search's studies: a page with none new means offset is ignored
    for page in range(MAX_PAGES):
        params.update(limit=page_size, offset=page * page_size)
        response = client.get(f"{root}/studies", params=params, headers={"Accept": "application/dicom+json"})
        if response.status_code == 204:
            return full_pages
        raise_for_status(response, What.SEARCH)
        try:
            items = response.json() if response.content.strip() else []
        except ValueError as exc:  # not JSON: the server's text is not kept
            raise FetchTransient(SourceFailure(What.SEARCH, Failure.BAD_ANSWER)) from exc
        if not isinstance(items, list):
            raise FetchRefused(SourceFailure(What.SEARCH, Failure.BAD_ANSWER))
        full_pages += len(items) >= page_size
        fresh = 0
        for item in items:
            ref = _study_ref(item)
            if ref is None or ref.uid in listed:
                continue
            listed.add(ref.uid)
            fresh += 1
            if ref.uid not in seen and _modality_matches(item, modalities):
                seen.add(ref.uid)
                yield ref
        # Only an empty page ends the list: servers that filter some attributes after paging
        # (Orthanc 1.10 with ModalitiesInStudy) send short pages before the end. A page with no
        # new study means the server ignores offset.
        if not items or fresh == 0:
            return full_pages
    return full_pages


def _modality_matches(item: Any, wanted: set[str] | None) -> bool:
    if wanted is None or not isinstance(item, dict):
        return True
    values = (item.get(MODALITIES) or {}).get("Value")
    if not values:
        return True  # the server did not list them: fetch rather than risk missing a study
    return any(str(v).strip().upper() in wanted for v in values)


def _study_ref(item: Any) -> StudyRef | None:
    uid = _first_value(item, STUDY_UID)
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.fullmatch(uid):
        log.warning("source.qido.skipped reason=%r", "missing or malformed StudyInstanceUID")
        return None
    count = _first_value(item, INSTANCE_COUNT)
    try:
        instances = int(count) if count is not None else None
    except (TypeError, ValueError):
        instances = None
    return StudyRef(uid, instances)


def _first_value(item: Any, tag: str) -> Any:
    if not isinstance(item, dict):
        return None
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def retrieve_study(client: httpx.Client, root: str, uid: str, folder: Path, max_bytes: int) -> int:
    """WADO-RS retrieve of a whole study into ``folder``; returns the number of instances written."""
    what = What.RETRIEVE
    with client.stream("GET", f"{root}/studies/{uid}", headers={"Accept": RETRIEVE_ACCEPT}) as response:
        raise_for_status(response, what)
        check_length(response, max_bytes, what)
        boundary = multipart_boundary(response.headers.get("content-type", ""), what)
        splitter = MultipartSplitter(boundary, folder, max_bytes, what)
        for chunk in response.iter_bytes(1 << 20):
            splitter.feed(chunk)
        return splitter.finish()


def multipart_boundary(content_type: str, what: What) -> bytes:
    message = email.message.Message()
    message["content-type"] = content_type
    boundary = message.get_param("boundary")
    if message.get_content_type() != "multipart/related" or not isinstance(boundary, str) or not boundary:
        raise FetchRefused(SourceFailure(what, Failure.BAD_ANSWER))
    return boundary.encode("latin-1")


class MultipartSplitter:
    """A streaming ``multipart/related`` parser that writes each DICOM part to its own file.

    Bytes are fed as they arrive; at most one delimiter's length is kept back between chunks, so
    memory stays small whatever the study size. Parts that are not ``application/dicom`` are skipped.
    """

    def __init__(self, boundary: bytes, folder: Path, max_bytes: int, what: What = What.RETRIEVE) -> None:
        self.first = b"--" + boundary
        self.delimiter = b"\r\n--" + boundary
        self.folder = folder
        self.max_bytes = max_bytes
        self.what = what
        self.buffer = bytearray()
        self.phase = "preamble"
        self.total = 0
        self.written = 0
        self.skipped = 0
        self._fh: IO[bytes] | None = None
        self._digest: Any = None
        self._tmp: Path | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self.max_bytes:
            self._abort()
            raise too_large(self.what, self.max_bytes)
        self.buffer += chunk
        while self._step():
            pass

    def finish(self) -> int:
        if self.phase != "done":
            self._abort()
            raise FetchTransient(SourceFailure(self.what, Failure.LOST))  # ended before its closing boundary
        return self.written

    # ------------------------------------------------------------------ state machine
    def _step(self) -> bool:
        """Consume what the buffer allows; True when another step may make progress."""
        buf = self.buffer
        if self.phase == "preamble":
            at = buf.find(self.first)
            if at < 0:
                del buf[: max(0, len(buf) - len(self.first) + 1)]
                return False
            del buf[: at + len(self.first)]
            self.phase = "after-delimiter"
            return True
        if self.phase == "after-delimiter":
            if len(buf) < 2:
                return False
            if buf[:2] == b"--":
                self.phase = "done"
                buf.clear()
                return False
            end = buf.find(b"\r\n")
            if end < 0:
                if len(buf) > 1024:
                    raise FetchRefused(SourceFailure(self.what, Failure.BAD_ANSWER))  # delimiter line
                return False
            if buf[:end].strip(b" \t"):
                raise FetchRefused(SourceFailure(self.what, Failure.BAD_ANSWER))  # delimiter line
            del buf[: end + 2]
            self.phase = "headers"
            return True
        if self.phase == "headers":
            if buf[:2] == b"\r\n":
                headers, consumed = b"", 2
            else:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_PART_HEADER:
                        raise FetchRefused(SourceFailure(self.what, Failure.BAD_ANSWER))  # header too long
                    return False
                headers, consumed = bytes(buf[:end]), end + 4
            del buf[:consumed]
            self._open_part(headers)
            self.phase = "body"
            return True
        if self.phase == "body":
            at = buf.find(self.delimiter)
            if at < 0:
                keep = len(self.delimiter) - 1
                if len(buf) > keep:
                    self._write(bytes(buf[: len(buf) - keep]))
                    del buf[: len(buf) - keep]
                return False
            self._write(bytes(buf[:at]))
            del buf[: at + len(self.delimiter)]
            self._close_part()
            self.phase = "after-delimiter"
            return True
        buf.clear()  # epilogue after the closing delimiter is ignored
        return False

    def _open_part(self, raw_headers: bytes) -> None:
        message = email.message.Message()
        for line in raw_headers.decode("latin-1").split("\r\n"):
            if ":" in line:
                key, value = line.split(":", 1)
                message[key.strip()] = value.strip()
        content_type = message.get_content_type() if message["content-type"] else "application/dicom"
        if content_type != "application/dicom":
            self.skipped += 1
            log.info("source.wado.part_skipped reason=%r", "not application/dicom")
            self._fh = None
            return
        self._tmp = self.folder / f".part-{self.written + self.skipped:06d}.tmp"
        self._fh = self._tmp.open("wb")
        self._digest = hashlib.sha256()

    def _write(self, data: bytes) -> None:
        if self._fh is not None and data:
            self._fh.write(data)
            self._digest.update(data)

    def _close_part(self) -> None:
        if self._fh is None:
            return
        self._fh.close()
        self._fh = None
        assert self._tmp is not None
        final = self.folder / f"{self._digest.hexdigest()}.dcm"
        if final.exists():  # the same instance sent twice
            self._tmp.unlink()
        else:
            self._tmp.rename(final)
            self.written += 1
        self._tmp = None

    def _abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
