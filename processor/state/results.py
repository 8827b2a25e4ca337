"""Study results: the study and step rows, model features and latent vectors, and their readers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from processor.state.db import Database, storable
from processor.state.versions import CURRENT_ARRIVALS
from processor.vocab import utcnow


def _current_of(table: str) -> str:
    """SQL: ``study_uid, arrival_id`` of each study's current result (:data:`CURRENT_ARRIVALS`),
    plus, for a study with rows in ``table`` and none in ``studies`` (features recorded alone, with
    :meth:`Results.record_features`), its latest arrival there."""
    return (
        f"{CURRENT_ARRIVALS} union all select t.study_uid, max(t.arrival_id) from {table} t "
        "where not exists (select 1 from studies s where s.study_uid = t.study_uid) group by t.study_uid"
    )


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
        *,
        feature_models: Mapping[str, str | None] | None = None,
        latent_models: Mapping[str, str | None] | None = None,
        software: Mapping[str, str] | None = None,
    ) -> None:
        """One study's outcome, step runs, features and latents, inside the caller's transaction.

        A re-run of the same arrival replaces them. ``fields`` may hold ``result`` (the JSON document)
        and ``patient_key``; the provenance arguments are those of :meth:`record_features`.
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
            self._write_features(
                arrival_id,
                study_uid,
                fields.get("accession"),
                features or {},
                latents,
                feature_models=feature_models,
                latent_models=latent_models,
                software=software,
            )

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
        *,
        feature_models: Mapping[str, str | None] | None = None,
        latent_models: Mapping[str, str | None] | None = None,
        software: Mapping[str, str] | None = None,
    ) -> None:
        """Store one study's model outputs (name → number) and latent vectors (float32 BLOBs).

        A re-run of the same arrival replaces them; non-finite numbers are stored as NULL.
        Provenance, per row: ``feature_models`` / ``latent_models`` (name → sha256 of the checkpoint
        that produced it; absent or None for weight-free features) → ``model_sha256``, and
        ``software`` (distribution → version, :func:`processor.provenance.software_versions`) →
        ``software`` as JSON.
        """
        with self.transaction():
            self._write_features(
                arrival_id,
                study_uid,
                accession,
                features,
                latents,
                feature_models=feature_models,
                latent_models=latent_models,
                software=software,
            )

    def _write_features(
        self,
        arrival_id: int,
        study_uid: str,
        accession: str | None,
        features: dict[str, float],
        latents: dict[str, Any] | None,
        *,
        feature_models: Mapping[str, str | None] | None = None,
        latent_models: Mapping[str, str | None] | None = None,
        software: Mapping[str, str] | None = None,
    ) -> None:
        import numpy as np

        now = utcnow()
        versions = json.dumps(dict(software), sort_keys=True) if software is not None else None
        feature_models, latent_models = feature_models or {}, latent_models or {}
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
                    "model_sha256": feature_models.get(name),
                    "software": versions,
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
                    "model_sha256": latent_models.get(name),
                    "software": versions,
                    "created_at": now,
                }
            )

    def study_features(self) -> list[dict[str, Any]]:
        """Features of every study, from its current result (the arrival whose result no later
        version replaced, see :mod:`processor.state.versions`); none when that result recorded none.

        One dict per study: ``{"study_uid", "accession", "arrival_id", "patient_key", "features":
        {name: value}, "models": {name: sha256 or None}, "software": {distribution: version}}``.
        NULL values come back as NaN; ``patient_key`` is the studies row's of the same arrival (None
        when there is none, or no PatientID); ``models`` None and ``software`` ``{}`` for rows
        written before provenance was recorded (migration 0009).
        """
        studies: dict[str, dict[str, Any]] = {}
        versions = _Versions()
        for row in self.db.query(
            "select f.arrival_id, f.study_uid, f.accession, f.name, f.value, f.model_sha256, "
            "f.software, s.patient_key from features f "
            f"join ({_current_of('features')}) m on f.study_uid = m.study_uid and f.arrival_id = m.arrival_id "
            "left join studies s on s.arrival_id = f.arrival_id and s.study_uid = f.study_uid "
            "order by f.study_uid, f.name"
        ):
            entry = studies.setdefault(
                row["study_uid"],
                {
                    "study_uid": row["study_uid"],
                    "accession": row["accession"],
                    "arrival_id": row["arrival_id"],
                    "patient_key": row["patient_key"],
                    "features": {},
                    "models": {},
                    "software": {},
                },
            )
            entry["features"][row["name"]] = float("nan") if row["value"] is None else float(row["value"])
            entry["models"][row["name"]] = row["model_sha256"]
            if not entry["software"]:
                entry["software"] = versions.of(row["software"])
        return list(studies.values())

    def study_latents(self, name: str) -> list[dict[str, Any]]:
        """Latent vectors called ``name`` (e.g. ``ctclip``), one per study, from its current result
        (as :meth:`study_features`).

        One dict per study: ``{"study_uid", "accession", "arrival_id", "patient_key", "vector":
        float32 array, "model_sha256": sha256 of the checkpoint or None, "software": dict}`` (the
        provenance as in :meth:`study_features`).
        """
        import numpy as np

        versions = _Versions()
        return [
            {
                "study_uid": row["study_uid"],
                "accession": row["accession"],
                "arrival_id": row["arrival_id"],
                "patient_key": row["patient_key"],
                "vector": np.frombuffer(row["vector"], dtype="<f4").astype(np.float32),
                "model_sha256": row["model_sha256"],
                "software": versions.of(row["software"]),
            }
            for row in self.db.query(
                "select l.arrival_id, l.study_uid, l.accession, l.vector, l.model_sha256, l.software, "
                "s.patient_key from latents l "
                f"join ({_current_of('latents')}) m on l.study_uid = m.study_uid and l.arrival_id = m.arrival_id "
                "left join studies s on s.arrival_id = l.arrival_id and s.study_uid = l.study_uid "
                "where l.name = ? order by l.study_uid",
                [name],
            )
        ]

    def latest_study_rows(self) -> list[dict[str, Any]]:
        """Each study's current result (its ``studies`` row that no later version replaced, see
        :data:`~processor.state.versions.CURRENT_ARRIVALS`): study_uid, accession, arrival_id,
        patient_key, status, probability_of_pathology, result_json (for ``evaluate``)."""
        return list(
            self.db.query(
                "select s.study_uid, s.accession, s.arrival_id, s.patient_key, s.status, "
                "s.probability_of_pathology, s.result_json from studies s "
                f"join ({CURRENT_ARRIVALS}) m on s.study_uid = m.study_uid and s.arrival_id = m.arrival_id"
            )
        )

    def step_seconds(self, step_id: str) -> list[float]:
        """Wall seconds of every finished run of pipeline step ``step_id``."""
        return [
            float(r["seconds"])
            for r in self.db.query(
                "select seconds from step_runs where step_id = ? and status = 'done' and seconds is not null",
                [step_id],
            )
        ]


class _Versions:
    """``software`` JSON text → dict, each distinct text parsed once (every row of a run repeats it)."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, str]] = {}

    def of(self, text: str | None) -> dict[str, str]:
        if not text:
            return {}
        if text not in self._seen:
            self._seen[text] = dict(json.loads(text))
        return dict(self._seen[text])
