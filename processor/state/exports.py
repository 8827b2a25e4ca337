"""Read models for ``export``: each study's current result, when it finished in a time window, with
its features and latents and their provenance. Nothing here writes."""

from __future__ import annotations

from typing import Any

from processor.state.db import Database
from processor.state.versions import CURRENT_ARRIVALS

# Each study's current result (never one a later version replaced), when its row finished in
# [start, end) (timestamps compare as text): a study whose current result came later is left out.
_LATEST = (
    "select s.study_uid, s.arrival_id as latest from studies s "
    f"join ({CURRENT_ARRIVALS}) c on c.study_uid = s.study_uid and c.arrival_id = s.arrival_id "
    "where s.finished_at >= ? and s.finished_at < ?"
)


class ExportRows(Database):
    def export_studies(self, start: str, end: str) -> list[dict[str, Any]]:
        """One row per study: its current result, when that finished in ``[start, end)``, ordered by
        study UID."""
        return list(
            self.db.query(
                "select s.study_uid, s.accession, s.patient_key, s.arrival_id, "
                "s.finished_at as processed_at, s.status, s.probability_of_pathology, s.pathology, "
                "s.most_dangerous_pathology_type from studies s "
                f"join ({_LATEST}) m on s.study_uid = m.study_uid and s.arrival_id = m.latest "
                "order by s.study_uid",
                [start, end],
            )
        )

    def export_features(self, start: str, end: str) -> list[dict[str, Any]]:
        """The feature rows (``study_uid, name, value, model_sha256, software``) of those results."""
        return list(
            self.db.query(
                "select f.study_uid, f.name, f.value, f.model_sha256, f.software from features f "
                f"join ({_LATEST}) m on f.study_uid = m.study_uid and f.arrival_id = m.latest "
                "order by f.study_uid, f.name",
                [start, end],
            )
        )

    def export_latents(self, name: str, start: str, end: str) -> list[dict[str, Any]]:
        """The latent rows called ``name`` (``study_uid, dim, vector, model_sha256, software``) of
        those results; ``vector`` is the stored float32 BLOB."""
        return list(
            self.db.query(
                "select l.study_uid, l.dim, l.vector, l.model_sha256, l.software from latents l "
                f"join ({_LATEST}) m on l.study_uid = m.study_uid and l.arrival_id = m.latest "
                "where l.name = ? order by l.study_uid",
                [start, end, name],
            )
        )
