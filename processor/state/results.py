"""Study results: the study and step rows, model features and latent vectors, and their readers."""

from __future__ import annotations

import json
from typing import Any

from processor.state.db import Database, storable
from processor.vocab import utcnow


class Results(Database):
    def json_path_owner(self, json_path: str) -> tuple[int, str] | None:
        rows = list(
            self.db.query(
                "select arrival_id, study_uid from studies where json_path = ? limit 1", [json_path]
            )
        )
        return (rows[0]["arrival_id"], rows[0]["study_uid"]) if rows else None

    def write_study(
        self,
        arrival_id: int,
        study_uid: str,
        fields: dict[str, Any],
        steps: list[dict[str, Any]],
        features: dict[str, float] | None = None,
        latents: dict[str, Any] | None = None,
    ) -> None:
        """One study's outcome, step runs, features and latents, inside the caller's transaction.

        A re-run of the same arrival replaces them. ``fields`` may hold ``result`` (the JSON document).
        """
        fields = dict(fields)
        document = fields.pop("result", None)
        fields = {key: storable(value) for key, value in fields.items()}
        row = {
            "arrival_id": arrival_id,
            "study_uid": study_uid,
            "finished_at": utcnow(),
            **fields,
            "result_json": json.dumps(document, default=str) if document is not None else None,
        }
        self.db.execute(
            "delete from step_runs where arrival_id = ? and study_uid = ?", [arrival_id, study_uid]
        )
        existing = list(
            self.db.query(
                "select id, created_at from studies where arrival_id = ? and study_uid = ?",
                [arrival_id, study_uid],
            )
        )
        if existing:
            self.db.table("studies").update(existing[0]["id"], row)
        else:
            self.db.table("studies").insert({**row, "created_at": utcnow()})
        for step in steps:
            self.db.table("step_runs").insert(
                {"arrival_id": arrival_id, "study_uid": study_uid, "finished_at": utcnow(), **step}
            )
        if features is not None or latents is not None:
            self._write_features(arrival_id, study_uid, fields.get("accession"), features or {}, latents)

    def record_study(
        self, arrival_id: int, study_uid: str, fields: dict[str, Any], steps: list[dict[str, Any]]
    ) -> None:
        """Store one study's outcome and its step runs in their own transaction."""
        with self.transaction():
            self.write_study(arrival_id, study_uid, fields, steps)

    def studies_for(self, arrival_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("select * from studies where arrival_id = ? order by id", [arrival_id]))

    def step_runs(self, arrival_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("select * from step_runs where arrival_id = ? order by id", [arrival_id]))

    def record_features(
        self,
        arrival_id: int,
        study_uid: str,
        accession: str | None,
        features: dict[str, float],
        latents: dict[str, Any] | None = None,
    ) -> None:
        """Store one study's model outputs (name → number) and latent vectors (float32 BLOBs).

        A re-run of the same arrival replaces them; non-finite numbers are stored as NULL.
        """
        with self.transaction():
            self._write_features(arrival_id, study_uid, accession, features, latents)

    def _write_features(
        self,
        arrival_id: int,
        study_uid: str,
        accession: str | None,
        features: dict[str, float],
        latents: dict[str, Any] | None,
    ) -> None:
        import numpy as np

        now = utcnow()
        for table in ("features", "latents"):
            self.db.execute(
                f"delete from {table} where arrival_id = ? and study_uid = ?", [arrival_id, study_uid]
            )
        for name, value in sorted(features.items()):
            number = float(value) if value is not None else None
            self.db.table("features").insert(
                {
                    "arrival_id": arrival_id,
                    "study_uid": study_uid,
                    "accession": accession,
                    "name": name,
                    "value": number if number is not None and np.isfinite(number) else None,
                    "created_at": now,
                }
            )
        for name, vector in (latents or {}).items():
            if vector is None:
                continue
            array = np.asarray(vector, dtype="<f4").ravel()
            self.db.table("latents").insert(
                {
                    "arrival_id": arrival_id,
                    "study_uid": study_uid,
                    "accession": accession,
                    "name": name,
                    "dim": int(array.size),
                    "vector": array.tobytes(),
                    "created_at": now,
                }
            )

    def study_features(self) -> list[dict[str, Any]]:
        """Features of every study, from its latest arrival that recorded any.

        One dict per study: ``{"study_uid", "accession", "arrival_id", "features": {name: value}}``
        (NULL values come back as NaN).
        """
        studies: dict[str, dict[str, Any]] = {}
        for row in self.db.query(
            "select f.arrival_id, f.study_uid, f.accession, f.name, f.value from features f "
            "join (select study_uid, max(arrival_id) as latest from features group by study_uid) m "
            "on f.study_uid = m.study_uid and f.arrival_id = m.latest order by f.study_uid, f.name"
        ):
            entry = studies.setdefault(
                row["study_uid"],
                {
                    "study_uid": row["study_uid"],
                    "accession": row["accession"],
                    "arrival_id": row["arrival_id"],
                    "features": {},
                },
            )
            entry["features"][row["name"]] = float("nan") if row["value"] is None else float(row["value"])
        return list(studies.values())

    def study_latents(self, name: str) -> list[dict[str, Any]]:
        """Latent vectors called ``name`` (e.g. ``ctclip``), one per study from its latest arrival.

        One dict per study: ``{"study_uid", "accession", "arrival_id", "vector": float32 array}``.
        """
        import numpy as np

        return [
            {
                "study_uid": row["study_uid"],
                "accession": row["accession"],
                "arrival_id": row["arrival_id"],
                "vector": np.frombuffer(row["vector"], dtype="<f4").astype(np.float32),
            }
            for row in self.db.query(
                "select l.arrival_id, l.study_uid, l.accession, l.vector from latents l "
                "join (select study_uid, max(arrival_id) as latest from latents where name = ? "
                "group by study_uid) m on l.study_uid = m.study_uid and l.arrival_id = m.latest "
                "where l.name = ? order by l.study_uid",
                [name, name],
            )
        ]
