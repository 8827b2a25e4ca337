"""One receipt per arrival in ``outbox/receipts/``: accepted, duplicate, rejected or failed, and why.

``priority`` is the arrival's lane (``routine`` or ``urgent``). A fresh attempt — bytes whose
earlier arrival gave no result — carries ``retry_of`` (that arrival's id) and says so in its
message; a duplicate carries ``duplicate_of`` and lists the earlier arrival's studies.

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
from processor.vocab import ArrivalState, Priority, ReceiptOutcome, utcnow

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
    if arrival.retry_of is not None and outcome != ReceiptOutcome.DUPLICATE:
        message = message.rstrip()
        message = f"{message}{'' if message.endswith('.') else '.'} {retry_message(arrival.retry_of)}"
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
        "priority": str(arrival.priority),
        "duplicate_of": arrival.duplicate_of,
        "retry_of": arrival.retry_of,
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


def duplicate_message(
    original: int | None,
    pipeline_name: str | None,
    pipeline_version: int | None,
    original_state: str | None = None,
    *,
    promoted: bool = False,
) -> str:
    """Why a copy was not processed: which earlier arrival gave (or is giving) the result.
    ``promoted``: the copy was urgent and made the waiting arrival urgent."""
    state = ArrivalState(original_state) if original_state is not None else None
    if state is not None and not state.final:
        if state == ArrivalState.RUNNING:
            where = "which is already being processed"
        else:
            lane = ": it is now urgent, so it is taken before routine work" if promoted else ""
            where = f"which is waiting in the queue{lane}"
        where += (
            f"; they were not processed again for pipeline {pipeline_name} v{pipeline_version}. "
            f"Arrival {original}'s receipt will say how it ended"
        )
    else:
        where = (
            f"which produced the result(s) listed under studies; they were not processed again "
            f"for pipeline {pipeline_name} v{pipeline_version}"
        )
    return f"The same bytes arrived before as arrival {original}, {where}."


def duplicate_receipt(
    arrival: Arrival, original: Arrival, study_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The receipt of a duplicate: the earlier arrival ``original`` and its studies (rows of
    ``State.studies_for``: study UID, status, result JSON, ``superseded_by``). An urgent copy of an
    arrival still waiting made it urgent (:meth:`processor.state.queue.Queue.register_arrival`)."""
    promoted = arrival.priority == Priority.URGENT and original.state in (
        ArrivalState.PENDING,
        ArrivalState.PREPARED,
    )
    message = duplicate_message(
        original.id, arrival.pipeline_name, arrival.pipeline_version, original.state, promoted=promoted
    )
    for row in study_rows:  # replaced since (late series): say which result is the study's now
        if row.get("superseded_by") is not None:
            message += (
                f" Its result of study {row['study_uid']} is no longer the study's current one: read "
                f"that of arrival {row['superseded_by']}."
            )
    return receipt_document(
        arrival,
        ReceiptOutcome.DUPLICATE,
        message,
        studies=[
            {"study_uid": row["study_uid"], "status": row["status"], "json": row["json_path"]}
            for row in study_rows
            if row["json_path"]
        ],
    )


def retry_message(earlier: int) -> str:
    return (
        f"This was a fresh attempt: the same bytes arrived before as arrival {earlier}, "
        "which ended without a full result (its receipt says why)."
    )


def receipt_path(outbox: Path, arrival_id: int | None, name: str) -> Path:
    """Where the receipt of an arrival goes (see the module docstring)."""
    if arrival_id is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return outbox / "receipts" / f"unregistered-{stamp}-{safe_name(name)}.json"
    return outbox / "receipts" / f"{arrival_id:06d}-{safe_name(name)}.json"
