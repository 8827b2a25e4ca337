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
from processor.pipeline.spec import safe_name
from processor.state import utcnow

OUTCOMES = ("accepted", "duplicate", "rejected", "failed")


def write_receipt(outbox: Path, arrival: dict[str, Any], outcome: str, message: str, *,
                  studies: list[dict[str, Any]] | None = None,
                  skipped: dict[str, int] | None = None) -> Path:
    """Write (or replace) the receipt of an arrival; ``message`` is plain words for a person."""
    assert outcome in OUTCOMES, outcome
    name = display_name(arrival["name"])
    path = receipt_path(outbox, arrival["id"], name)
    write_json_atomic(path, {
        "arrival_id": arrival["id"],
        "name": name,
        "name_bytes": arrival.get("name_bytes") or name_bytes_hex(arrival["name"]),
        "kind": arrival["kind"],
        "source_name": arrival.get("source_name"),
        "sha256": arrival["sha256"],
        "size": arrival["size"],
        "outcome": outcome,
        "message": escape_surrogates(message),
        "duplicate_of": arrival.get("duplicate_of"),
        "studies": studies or [],
        "skipped": {escape_surrogates(reason): count for reason, count in (skipped or {}).items()},
        "received_at": arrival["created_at"],
        "written_at": utcnow(),
    })
    return path


def receipt_path(outbox: Path, arrival_id: int | None, name: str) -> Path:
    """Where the receipt of an arrival goes (see the module docstring)."""
    if arrival_id is None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        return outbox / "receipts" / f"unregistered-{stamp}-{safe_name(name)}.json"
    return outbox / "receipts" / f"{arrival_id:06d}-{safe_name(name)}.json"
