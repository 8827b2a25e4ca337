"""One receipt per arrival in ``outbox/receipts/``: accepted, duplicate or rejected, and why.

``name`` is the input's display name (valid text; bytes that are not UTF-8 shown as ``\\xNN``)
and ``name_bytes`` its raw bytes in hex, so the exact name can always be recovered
(``bytes.fromhex(receipt["name_bytes"])``). The file is ``<arrival id>-<safe name>.json``; an input
the database refused to record has no id and is named ``unregistered-<UTC time>-<safe name>.json``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from processor.names import display_name, escape_surrogates, name_bytes_hex
from processor.outputs.result import write_json_atomic
from processor.safename import safe_name
from processor.state import Arrival
from processor.vocab import ReceiptOutcome, utcnow

OUTCOMES = tuple(ReceiptOutcome)


def receipt_document(
    arrival: Arrival,
    outcome: str,
    message: str,
    *,
    studies: list[dict[str, Any]] | None = None,
    skipped: dict[str, int] | None = None,
    registered: bool = True,
) -> dict[str, Any]:
    """The receipt of an arrival as a JSON document; ``message`` is plain words for a person.

    ``registered=False``: an input the database refused to record (``arrival_id`` null).
    """
    outcome = ReceiptOutcome(outcome)
    name = display_name(arrival.name)
    return {
        "arrival_id": arrival.id if registered else None,
        "name": name,
        "name_bytes": arrival.name_bytes or name_bytes_hex(arrival.name),
        "kind": arrival.kind,
        "source_name": arrival.source_name,
        "sha256": arrival.sha256 or None,
        "size": arrival.size,
        "outcome": str(outcome),
        "message": escape_surrogates(message),
        "duplicate_of": arrival.duplicate_of,
        "studies": studies or [],
        "skipped": {escape_surrogates(reason): count for reason, count in (skipped or {}).items()},
        "received_at": arrival.created_at,
        "written_at": utcnow(),
    }


def write_receipt_document(outbox: Path, document: dict[str, Any]) -> Path:
    """Write (or replace, atomically) a receipt document at its place in ``outbox/receipts``."""
    path = receipt_path(outbox, document["arrival_id"], document["name"])
    write_json_atomic(path, document)
    return path


def write_receipt(
    outbox: Path,
    arrival: Arrival,
    outcome: str,
    message: str,
    *,
    studies: list[dict[str, Any]] | None = None,
    skipped: dict[str, int] | None = None,
    registered: bool = True,
) -> Path:
    """Write (or replace) the receipt of an arrival; ``message`` is plain words for a person."""
    return write_receipt_document(
        outbox,
        receipt_document(arrival, outcome, message, studies=studies, skipped=skipped, registered=registered),
    )


def duplicate_message(original: int | None, pipeline_name: str | None, pipeline_version: int | None) -> str:
    return (
        f"The same bytes arrived before as arrival {original} and were not processed again "
        f"for pipeline {pipeline_name} v{pipeline_version}."
    )


def receipt_path(outbox: Path, arrival_id: int | None, name: str) -> Path:
    """Where the receipt of an arrival goes (see the module docstring)."""
    if arrival_id is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return outbox / "receipts" / f"unregistered-{stamp}-{safe_name(name)}.json"
    return outbox / "receipts" / f"{arrival_id:06d}-{safe_name(name)}.json"
