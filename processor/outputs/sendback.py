"""The objects made for each study beside its JSON, and the send-back rows that go with them.

For each study the recorder calls :meth:`ObjectMaker.make` after the result document is final and
before the one transaction that records it (:meth:`processor.state.State.finish`), so that the
files exist before any row names them, and :meth:`ObjectMaker.outbound` for the rows of the
durable send queue (:mod:`processor.state.deliveries`) that the same transaction inserts.

Files, in the study's folder beside its JSON (``<day>/<StudyUID>/``, where the previews are):

=============== ===============================================================================
``report.html`` the page for people (:func:`processor.outputs.studyreport.render_html`)
``report.pdf``  the same page as PDF (WeasyPrint)
``sr.dcm``      Comprehensive 3D SR, TID 1500 (:func:`processor.dicom.sr.build_sr`)
``key_<n>.dcm`` the lung-window key slices as Secondary Capture (:func:`processor.dicom.keyimages.
                build_key_image`), n = 1.. inferior to superior
``report_pdf.dcm`` the PDF as Encapsulated PDF, made only for a DICOM destination that sends ``pdf``
=============== ===============================================================================

Which are made: ``study_report.make`` plus what each destination ``send`` s. Every object has new
Series and SOP Instance UIDs (fixed in its file, so a send repeated after a crash stores the same
instance again); series numbers :data:`SERIES_NUMBERS`. An object that cannot be made (the input's
header no longer reads, WeasyPrint without Pango) is named in the document's ``report.problems``
and the log; the study's result stands, and a destination that wanted it gets no row for it.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from processor.atomic import write_bytes_atomic
from processor.config import DestinationSettings, StudyReportSettings
from processor.dicom.sendback import SourceStudy
from processor.provenance import software_versions
from processor.redact import quiet_loggers
from processor.state import Arrival, Outbound
from processor.vocab import StudyStatus

log = logging.getLogger(__name__)

__all__ = ["SERIES_NUMBERS", "Built", "ObjectMaker"]

# Series numbers of the objects ctwatch adds to a study (high, to sort after the scanner's series).
SERIES_NUMBERS = {"sr": 9901, "sc": 9902, "pdf": 9903}


@dataclass(frozen=True)
class Built:
    """One file made for a study: its kind (html, pdf, sr, sc, pdf_dicom), where it is, its SOP
    Instance UID (DICOM objects) and sha256."""

    kind: str
    path: Path
    sop_instance_uid: str | None
    sha256: str

    def item(self, outbox: Path) -> dict[str, Any]:
        """The queue item naming this file (path relative to the outbox)."""
        kind = "pdf" if self.kind == "pdf_dicom" else self.kind
        return {
            "kind": kind,
            "path": str(self.path.relative_to(outbox)),
            "sop_instance_uid": self.sop_instance_uid,
            "sha256": self.sha256,
        }


class ObjectMaker:
    """Makes a study's report files and DICOM objects, and the queue rows its destinations want."""

    def __init__(
        self,
        report: StudyReportSettings,
        destinations: Sequence[DestinationSettings],
        outbox: Path,
        *,
        root: Path | None = None,
        now: Callable[[], datetime] = lambda: datetime.now().astimezone(),  # DICOM DA/TM: local time
    ) -> None:
        """``root``: the installation's folder; paths under it (missing weight files named in a
        step's reason) are shown relative to it in the report and the SR, which leave the server."""
        self.root = root
        quiet_loggers("highdicom", "weasyprint", "fontTools")  # per-study INFO chatter (and UIDs)
        self.report = report
        self.destinations = list(destinations)
        self.outbox = outbox
        self.now = now
        wanted = set(report.make)
        for destination in self.destinations:
            wanted |= set(destination.send)
        self.wanted = wanted
        # an Encapsulated PDF only when a DICOM destination sends the PDF
        self.pdf_dicom = any(d.kind != "folder" and "pdf" in d.send for d in self.destinations)

    @property
    def enabled(self) -> bool:
        return bool(self.wanted)

    def make(
        self,
        document: dict[str, Any],
        json_path: Path,
        source: SourceStudy | None,
        source_problem: str | None,
        *,
        predecessors: Sequence[tuple[str, str]] = (),
    ) -> list[Built]:
        """Write the study's files into its folder and add the ``report`` section to ``document``.

        An object that cannot be made is left out, its reason in ``document["report"]["problems"]``;
        an OSError or a SQLite error (the disk, not the study) propagates: the worker sends the batch
        back uncharged and pauses, as for any other write of the finish. ``predecessors``: the
        (SeriesInstanceUID, SOPInstanceUID) of the SRs of earlier versions of the study, which the
        SR names as the documents it replaces (PS3.3 C.17.2, Predecessor Documents Sequence).
        """
        folder = json_path.parent / json_path.stem
        new = bool(document.get("supersedes"))  # a new version of the study's result
        shown = _relative_to(document, self.root)  # what the page, the PDF and the SR say
        built: list[Built] = []
        problems: list[str] = []
        failed = document.get("processing_status") == StudyStatus.FAILURE

        def attempt(what: str, make: Callable[[], list[Built]]) -> None:
            try:
                built.extend(make())
            except (OSError, sqlite3.Error):
                raise  # the world's fault (disk full, a share gone): the batch goes back, uncharged
            except Exception as exc:  # noqa: BLE001 - one object's fault never fails the study
                log.warning("report.object_failed what=%s: %s", what, exc, exc_info=True)
                problems.append(f"the {what} could not be made: {exc}")

        dicom_wanted = self.wanted & {"sr", "sc"} or self.pdf_dicom
        if dicom_wanted and source is None:
            problems.append(f"no DICOM objects were made: {source_problem or 'the input header is unknown'}")
        html = None
        if self.wanted & {"html", "pdf"}:

            def make_html() -> list[Built]:
                nonlocal html
                from processor.outputs.studyreport import render_html

                html = render_html(shown, json_path.parent, institution=self.report.institution or "")
                return [self._write(folder / "report.html", html.encode("utf-8"), "html", None)]

            attempt("HTML report", make_html)
        pdf: bytes | None = None
        if "pdf" in self.wanted and html is not None:

            def make_pdf() -> list[Built]:
                nonlocal pdf
                from processor.outputs.studyreport import render_pdf

                assert html is not None
                pdf = render_pdf(html)
                return [self._write(folder / "report.pdf", pdf, "pdf", None)]

            attempt("PDF report", make_pdf)
        if source is not None:
            if "sr" in self.wanted:
                attempt("structured report", lambda: [self._sr(folder, shown, source, predecessors, new)])
            if "sc" in self.wanted and not failed:
                attempt(
                    "key images", lambda: self._key_images(folder, json_path.parent, document, source, new)
                )
            if self.pdf_dicom and pdf is not None:
                attempt("Encapsulated PDF", lambda: [self._pdf_dicom(folder, pdf or b"", source, new)])
        document["report"] = {
            "files": [
                {
                    "kind": b.kind,
                    "file": str(b.path.relative_to(json_path.parent)),
                    "sop_instance_uid": b.sop_instance_uid,
                    "sha256": b.sha256,
                }
                for b in built
            ],
            "problems": problems,
        }
        return built

    def outbound(
        self,
        arrival: Arrival,
        document: Mapping[str, Any],
        built: Sequence[Built],
        *,
        also: Collection[str] = (),
    ) -> list[Outbound]:
        """The queue rows of the destinations whose ``when`` this study meets, each with the files it
        sends; ``also``: destinations that got an earlier version of the study, which get this one
        whatever its ``when`` (their PACS must not keep the old result uncorrected). None for a
        result that does not become the study's current one (``superseded_by`` set: it has fewer
        images than the current one and came out worse)."""
        if document.get("superseded_by"):
            return []
        failed = document.get("processing_status") == StudyStatus.FAILURE
        rows: list[Outbound] = []
        for destination in self.destinations:
            wanted = destination.name in also
            if not wanted and destination.when == "pathology" and document.get("pathology") != 1:
                continue
            if not wanted and destination.when == "failures" and not failed:
                continue
            items = [b.item(self.outbox) for b in built if _sent_as(b, destination) in destination.send]
            if not items:
                continue
            rows.append(
                Outbound(
                    destination=destination.name,
                    event="study",
                    arrival_id=arrival.id,
                    study_uid=str(document["study_uid"]),
                    items=tuple(items),
                )
            )
        return rows

    # ------------------------------------------------------------------ objects
    def _uids(self) -> tuple[str, str]:
        return str(generate_uid()), str(generate_uid())

    def _software(self) -> str:
        versions = software_versions()
        return f"ctwatch {versions.get('ctwatch', '?')}"

    def _sr(
        self,
        folder: Path,
        document: Mapping[str, Any],
        source: SourceStudy,
        predecessors: Sequence[tuple[str, str]] = (),
        new: bool = False,
    ) -> Built:
        from processor.dicom.sr import build_sr, name_predecessors

        series_uid, sop_uid = self._uids()
        dataset = build_sr(
            source,
            document,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=SERIES_NUMBERS["sr"],
            software_versions=self._software(),
            content_datetime=self.now(),
        )
        name_predecessors(dataset, source.study_uid, predecessors)
        return self._write_dicom(folder / "sr.dcm", dataset, "sr", new)

    def _key_images(
        self,
        folder: Path,
        json_dir: Path,
        document: Mapping[str, Any],
        source: SourceStudy,
        new: bool = False,
    ) -> list[Built]:
        from PIL import Image

        from processor.dicom.keyimages import build_key_image

        slices = [k for k in document.get("key_slices") or [] if k.get("window") == "lung"]
        series_uid = str(generate_uid())
        pixel_mm = _pixel_mm(document)
        out = []

        def read(name: str, sha256: str | None) -> np.ndarray:
            path = json_dir / name
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise ValueError(f"the preview {name} changed after it was written")
            with Image.open(path) as image:
                return np.asarray(image.convert("L"))

        for number, entry in enumerate(slices, start=1):
            pixels = read(entry["file"], entry.get("sha256"))
            mask = entry.get("lung_mask_file")
            outline = read(mask, entry.get("lung_mask_sha256")) > 127 if mask else None
            dataset = build_key_image(
                source,
                pixels,
                outline=outline,
                pixel_mm=pixel_mm,
                series_instance_uid=series_uid,
                sop_instance_uid=str(generate_uid()),
                series_number=SERIES_NUMBERS["sc"],
                instance_number=number,
                description=f"ctwatch key slice {number}, lung window, z {entry.get('z_mm')} mm",
            )
            out.append(self._write_dicom(folder / f"key_{number}.dcm", dataset, "sc", new))
        return out

    def _pdf_dicom(self, folder: Path, pdf: bytes, source: SourceStudy, new: bool = False) -> Built:
        from processor.dicom.keyimages import build_encapsulated_pdf

        series_uid, sop_uid = self._uids()
        dataset = build_encapsulated_pdf(
            source,
            pdf,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            series_number=SERIES_NUMBERS["pdf"],
            instance_number=1,
            title="ctwatch report (AI-generated, not a diagnosis)",
        )
        return self._write_dicom(folder / "report_pdf.dcm", dataset, "pdf_dicom", new)

    # ------------------------------------------------------------------ files
    def _write(self, path: Path, data: bytes, kind: str, sop_uid: str | None) -> Built:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        return Built(kind=kind, path=path, sop_instance_uid=sop_uid, sha256=hashlib.sha256(data).hexdigest())

    def _write_dicom(self, path: Path, dataset: Dataset, kind: str, new: bool = False) -> Built:
        from io import BytesIO

        if new:  # what a PACS user sees in the series list
            dataset.SeriesDescription = _new_version_words(str(dataset.get("SeriesDescription", "")))
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        return self._write(path, buffer.getvalue(), kind, str(dataset.SOPInstanceUID))


def _sent_as(built: Built, destination: DestinationSettings) -> str | None:
    """The ``send`` word under which ``destination`` takes ``built`` (None: it never does)."""
    if built.kind == "pdf_dicom":
        return "pdf" if destination.kind != "folder" else None
    if built.kind == "pdf":
        return "pdf" if destination.kind == "folder" else None
    return built.kind


def _pixel_mm(document: Mapping[str, Any]) -> float | None:
    """The side of one (square) preview pixel in mm, as the render step recorded it; None when unknown."""
    pixels = ((document.get("key_slices_method") or {}).get("pixels")) or {}
    value = pixels.get("output_pixel_mm")
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _new_version_words(description: str) -> str:
    """A series description marked as a new version of the study's result, within LO's 64 characters."""
    mark = " (new version)"
    return description[: 64 - len(mark)].rstrip() + mark


def _relative_to(document: dict[str, Any], root: Path | None) -> dict[str, Any]:
    """``document`` with ``<root>/`` dropped where a path starts in its texts (``weights/caption/…``,
    not the server's absolute path); the same document when ``root`` is None or the file system's
    root (which would leave nothing to show)."""
    if root is None or str(root).rstrip("/") == "":
        return document
    import json
    import re

    prefix = json.dumps(str(root).rstrip("/") + "/")[1:-1]  # as it appears inside a JSON string
    # only where a path starts: not inside another path (/mnt/srv/ct/… for a root /srv/ct)
    start = re.compile(r"(?<![\w/.~-])" + re.escape(prefix))
    return dict(json.loads(start.sub("", json.dumps(document))))
