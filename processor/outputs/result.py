"""The per-study result JSON: building it (a superset of the CT-CLIP Inference API) and writing it.

Writes are atomic (temp file in the same folder, fsync, ``os.replace``), so a reader or a crash
never sees half a file. ``result.schema.json`` beside this module is the published schema.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "1.0"
SCHEMA_PATH = Path(__file__).with_name("result.schema.json")

# Sections that steps add to ctx.result and that appear in the JSON under the same key.
API_FIELDS = ("study_uid", "series_uid", "probability_of_pathology", "pathology",
              "most_dangerous_pathology_type", "processing_status", "time_of_processing", "error")


def build_result(*, study_uid: str, accession: str | None, outcome_status: str, error: str | None,
                 seconds: float, sections: dict[str, Any], steps: list[dict[str, Any]],
                 source: dict[str, Any], pipeline: dict[str, Any], device: str,
                 dicom: dict[str, Any], warnings: list[str], finished_at: str) -> dict[str, Any]:
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


def write_json_atomic(path: Path, document: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(document, fh, indent=2, sort_keys=False, default=_default)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
