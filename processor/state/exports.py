"""Read models for ``export``: each study's latest arrival in a time window, with its features and
latents and their provenance. Nothing here writes."""

from __future__ import annotations

from typing import Any

from processor.state.db import Database

# Each study's latest arrival among the study rows finished in [start, end) (timestamps compare as text).
_LATEST = (
    "select study_uid, max(arrival_id) as latest from studies "
    "where finished_at >= ? and finished_at < ? group by study_uid"
)


class ExportRows(Database):
    def export_studies(self, start: str, end: str) -> list[dict[str, Any]]:
        """One row per study: its latest arrival finished in ``[start, end)``, ordered by study UID."""
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
        """The feature rows (``study_uid, name, value, model_sha256, software``) of those arrivals."""
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
        those arrivals; ``vector`` is the stored float32 BLOB."""
        return list(
            self.db.query(
                "select l.study_uid, l.dim, l.vector, l.model_sha256, l.software from latents l "
                f"join ({_LATEST}) m on l.study_uid = m.study_uid and l.arrival_id = m.latest "
                "where l.name = ? order by l.study_uid",
                [start, end, name],
            )
        )
