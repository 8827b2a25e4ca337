"""The per-study result JSON: building it (a superset of the CT-CLIP Inference API) and writing it.

Writes are atomic (:mod:`processor.atomic`), so a reader or a crash never sees half a file. ``result.schema.json`` beside this module is the published schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from processor.atomic import json_default, write_json_atomic

__all__ = ["build_result", "load_schema", "plain_json", "write_json_atomic"]

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")

# Sections that steps add to ctx.result and that appear in the JSON under the same key.
API_FIELDS = (
    "study_uid",
    "series_uid",
    "probability_of_pathology",
    "pathology",
    "most_dangerous_pathology_type",
    "processing_status",
    "time_of_processing",
    "error",
)


def build_result(
    *,
    study_uid: str,
    accession: str | None,
    outcome_status: str,
    error: str | None,
    seconds: float,
    sections: dict[str, Any],
    steps: list[dict[str, Any]],
    source: dict[str, Any],
    pipeline: dict[str, Any],
    device: str,
    dicom: dict[str, Any],
    warnings: list[str],
    finished_at: str,
) -> dict[str, Any]:
    """Assemble the JSON document. Decision fields come only from a step that computed them."""
    decision = sections.get("decision") or {}
    selection = sections.get("series_selection") or {}
    result: dict[str, Any] = {
        "study_uid": study_uid,
        "series_uid": selection.get("chosen"),
        "probability_of_pathology": decision.get("probability_of_pathology"),
        "pathology": decision.get("pathology"),
        "most_dangerous_pathology_type": decision.get("most_dangerous_pathology_type"),
        "processing_status": outcome_status,
        "time_of_processing": round(seconds, 3),
        "error": error,
        "schema_version": SCHEMA_VERSION,
        "accession": accession,
        "finished_at": finished_at,
        "source": source,
        "pipeline": pipeline,
        "device": device,
        "dicom": dicom,
        "steps": steps,
        "warnings": warnings,
    }
    for key, value in sections.items():
        result.setdefault(key, value)
    return result


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def plain_json(document: Any) -> Any:
    """``document`` as plain JSON values (numpy arrays and numbers as lists and numbers, paths as
    text), exactly as :func:`write_json_atomic` would write it; so a document stored in SQLite and
    written again later gives the same file."""
    return json.loads(json.dumps(document, default=json_default))
