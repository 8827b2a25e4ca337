"""C-STORE (DICOM PS3.4 Annex B, Storage Service Class; PS3.7 §9.1.1) to a DICOM node, with pynetdicom.

One association per row, calling AE title ``calling_aet``, called ``called_aet``, requesting exactly
one presentation context per (SOP Class, Transfer Syntax) of the files sent — Comprehensive 3D SR,
Secondary Capture, Encapsulated PDF, as written (Explicit VR Little Endian). Every C-STORE response
status is checked (PS3.4 Table B.2-1): 0x0000 success; the warnings 0xB000 (coercion of data
elements), 0xB007 (data set does not match SOP class) and 0xB006 (elements discarded) are accepted
and logged; anything else fails the row with the status in words. "Refused: out of resources"
(0xA7xx) and resource limitation (0x0213) are retried; other failures are not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from processor.config import DimseTarget
from processor.delivery.base import quiet_loggers, read_dicom, transport_failed
from processor.errors import SendFailed
from processor.redact import Failure

log = logging.getLogger(__name__)

ACTION = "C-STORE"
ACCEPTED_WARNINGS = (0xB000, 0xB007, 0xB006)


def _retryable(status: int) -> bool:
    return 0xA700 <= status <= 0xA7FF or status == 0x0213


def status_words(status: int) -> str:
    """``0xA700 (Refused: Out of Resources)``: the code and pynetdicom's name for it."""
    category, words = STORAGE_SERVICE_CLASS_STATUS.get(status, ("Unknown", "unknown status"))
    return f"0x{status:04X} ({words or category})"


class DimseSender:
    """Stores a row's DICOM files over one association (see the module docstring)."""

    kind = "dimse"

    def __init__(self, target: DimseTarget, allow_hosts: Iterable[str]) -> None:
        self.target = target
        self.allow_hosts = frozenset(allow_hosts)
        quiet_loggers("pynetdicom")  # one INFO line per association and per C-STORE

    def send(self, items: Sequence[Mapping[str, Any]], outbox: Path) -> None:
        t = self.target
        if t.host.lower().strip("[]") not in self.allow_hosts:
            raise SendFailed(
                "the destination's host is not in fetch.allow_hosts: add it there if it is trusted, "
                "restart ctwatch, then `python run.py resend --failed`",
                retry=False,
            )
        datasets = [read_dicom(item, outbox) for item in items]
        ae = AE(ae_title=t.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = t.timeout_seconds
        ae.connection_timeout = t.timeout_seconds
        for sop_class, syntax in sorted({_context(ds) for ds in datasets}):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(t.host, t.port, ae_title=t.called_aet)
        if not assoc.is_established:
            raise _not_associated(assoc, datasets)
        try:
            for ds in datasets:
                self._store(assoc, ds)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc: Any, ds: Dataset) -> None:
        sop_class = UID(ds.SOPClassUID)
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise SendFailed(
                f"{ACTION} failed: the DICOM node does not accept {sop_class.name} objects (no accepted "
                "presentation context); allow that SOP class there, then `python run.py resend <id>`",
                retry=False,
            )
        started = time.monotonic()
        answer = assoc.send_c_store(ds)
        if not answer or "Status" not in answer:
            waited = time.monotonic() - started
            if assoc.is_aborted or waited < 0.9 * self.target.timeout_seconds:
                # the node ended the association without answering (pynetdicom may not have seen
                # the A-ABORT yet): most often a node that does not take stores from this AE title
                raise SendFailed(
                    f"{ACTION} failed: the DICOM node ended the association without answering — check "
                    "that it knows ctwatch's calling_aet and allows it to store; tried again with back-off",
                    retry=True,
                )
            raise transport_failed(ACTION, Failure.TIMEOUT)
        status = int(answer.Status)
        if status == 0x0000:
            return
        if status in ACCEPTED_WARNINGS:
            log.info("delivery.dimse_warning status=%s kind=%s", status_words(status), sop_class.name)
            return
        raise SendFailed(
            f"{ACTION} failed: the DICOM node answered {status_words(status)}"
            + ("; tried again with back-off" if _retryable(status) else "; see the node's log"),
            retry=_retryable(status),
        )


def _context(ds: Dataset) -> tuple[str, str]:
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) or ExplicitVRLittleEndian
    return str(ds.SOPClassUID), str(syntax)


def _not_associated(assoc: Any, datasets: list[Dataset]) -> SendFailed:
    """Why no association: rejected (permanently or for now), no context accepted, or no connection."""
    if assoc.is_rejected:
        primitive = getattr(assoc.acceptor, "primitive", None)
        result = getattr(primitive, "result", None)
        reason = getattr(primitive, "reason_str", None) or "no reason given"
        permanent = result == 0x01
        return SendFailed(
            f"{ACTION} failed: the DICOM node rejected the association ({reason}) — check called_aet, "
            "calling_aet and that the node knows ctwatch's AE title"
            + ("" if permanent else "; tried again with back-off"),
            retry=not permanent,
        )
    if assoc.is_aborted and assoc.rejected_contexts:
        names = sorted({UID(ds.SOPClassUID).name for ds in datasets})
        return SendFailed(
            f"{ACTION} failed: the DICOM node accepts none of the object types sent ({', '.join(names)}); "
            "allow them there, then `python run.py resend <id>`",
            retry=False,
        )
    # pynetdicom does not say why a connection failed (refused, timed out, unreachable)
    return SendFailed(
        f"{ACTION} failed: {Failure.CONNECT} — the DICOM node is down, not listening on that host and "
        "port, or out of reach; tried again with back-off",
        retry=True,
    )
