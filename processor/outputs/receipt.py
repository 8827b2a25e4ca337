"""One receipt per arrival in ``outbox/receipts/``: accepted, duplicate or rejected, and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from processor.outputs.result import write_json_atomic
from processor.pipeline.spec import safe_name
from processor.state import utcnow

OUTCOMES = ("accepted", "duplicate", "rejected", "failed")


def write_receipt(outbox: Path, arrival: dict[str, Any], outcome: str, message: str, *,
                  studies: list[dict[str, Any]] | None = None,
                  skipped: dict[str, int] | None = None) -> Path:
    """Write (or replace) the receipt of an arrival; ``message`` is plain words for a person."""
    assert outcome in OUTCOMES, outcome
    path = outbox / "receipts" / f"{arrival['id']:06d}-{safe_name(arrival['name'])}.json"
    write_json_atomic(path, {
        "arrival_id": arrival["id"],
        "name": arrival["name"],
        "kind": arrival["kind"],
        "source_name": arrival.get("source_name"),
        "sha256": arrival["sha256"],
        "size": arrival["size"],
        "outcome": outcome,
        "message": message,
        "duplicate_of": arrival.get("duplicate_of"),
        "studies": studies or [],
        "skipped": dict(skipped or {}),
        "received_at": arrival["created_at"],
        "written_at": utcnow(),
    })
    return path
