"""Versions of a study's result: which one is current, and the link when a newer one replaces it.

A study (StudyInstanceUID) may be analysed more than once: its images came in several arrivals
(late series), or a newer pipeline version analysed it again. Each result is a ``studies`` row of
a ``done`` arrival; the row whose ``superseded_by`` is NULL is the current version, an older one
holds the id of the arrival whose result replaced it (migration 0011). ``inputs`` lists the
arrivals whose images a result was computed from (a JSON list of ids; NULL on rows written before
0011: the arrival itself) and ``series_instances`` what those images were, per series:
``{SeriesInstanceUID: [instances, sha256 of the sorted SOPInstanceUIDs]}``, so a later arrival that
brings nothing new is recognised even when the earlier inputs are no longer on disk; ``sop_digests``
(migration 0013; NULL on older rows) the images themselves, one by one (:func:`sop_digest`), so a
later arrival holding only some of them is too, and a new version that lacks some is known to.

A new version computed without some of the images the current result used (an earlier input no
longer on disk, or changed since) and with a worse ``processing_status`` is recorded but never
current: its ``superseded_by`` names, from the start, the arrival whose result stays current.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from processor.errors import VersionConflict
from processor.state.db import Database
from processor.vocab import utcnow

_CURRENT = (
    "select s.arrival_id, s.study_uid, s.status, s.json_path, s.inputs, s.series_instances, "
    "s.sop_digests, a.name, a.created_at, a.pipeline_name, a.pipeline_version from studies s "
    "join arrivals a on a.id = s.arrival_id "
    "where s.study_uid = ? and s.superseded_by is null and a.state = 'done' and s.arrival_id != ? "
    "order by s.arrival_id"
)

CURRENT_ARRIVALS = (
    "select study_uid, max(arrival_id) as arrival_id from studies "
    "where superseded_by is null group by study_uid"
)
"""SQL: each study's current result (``study_uid, arrival_id``): its ``studies`` row that no other
replaced (``superseded_by`` NULL) — the latest such arrival when there are several (rows written
before migration 0011). What ``export``, ``fit-*`` and ``evaluate`` read; never "the highest
arrival id", which a requeued earlier arrival may hold while its result was superseded."""

SOP_DIGEST_BYTES = 8  # 64 bits: a chance collision among a study's images is about 1e-11


def sop_digest(sop_uid: str) -> bytes:
    """The 8-byte BLAKE2b digest of a SOPInstanceUID, as ``studies.sop_digests`` holds it."""
    return hashlib.blake2b(sop_uid.encode(), digest_size=SOP_DIGEST_BYTES).digest()


def pack_digests(digests: Iterable[bytes]) -> bytes:
    """``studies.sop_digests``: the distinct digests, sorted, concatenated."""
    return b"".join(sorted(set(digests)))


def unpack_digests(blob: bytes) -> frozenset[bytes]:
    return frozenset(blob[i : i + SOP_DIGEST_BYTES] for i in range(0, len(blob), SOP_DIGEST_BYTES))


@dataclass(frozen=True)
class CurrentVersion:
    """The current result of a study (one ``studies`` row) and what it was computed from."""

    arrival_id: int
    study_uid: str
    status: str  # Success | Partial | Failure
    json_path: str | None
    inputs: tuple[int, ...]  # arrivals whose images it used (or sought)
    series_instances: dict[str, tuple[int, str]]  # series UID → (instances, sha256 of SOP UIDs)
    sop_digests: frozenset[bytes] | None  # :func:`sop_digest` of each image it used; None: not recorded
    arrival_name: str
    received_at: str
    pipeline_name: str | None
    pipeline_version: int | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> CurrentVersion:
        series = json.loads(row["series_instances"]) if row["series_instances"] else {}
        return cls(
            arrival_id=int(row["arrival_id"]),
            study_uid=row["study_uid"],
            status=row["status"],
            json_path=row["json_path"],
            inputs=tuple(json.loads(row["inputs"])) if row["inputs"] else (int(row["arrival_id"]),),
            series_instances={uid: (int(n), str(digest)) for uid, (n, digest) in series.items()},
            sop_digests=unpack_digests(row["sop_digests"]) if row["sop_digests"] is not None else None,
            arrival_name=row["name"],
            received_at=row["created_at"],
            pipeline_name=row["pipeline_name"],
            pipeline_version=row["pipeline_version"],
        )


class Versions(Database):
    """The ``superseded_by`` / ``inputs`` / ``series_instances`` / ``sop_digests`` columns of ``studies``."""

    def current_versions(self, study_uid: str, *, excluding: int) -> list[CurrentVersion]:
        """The current results of ``study_uid`` from arrivals other than ``excluding``, oldest
        first: normally none or one (several only in a database from before migration 0011)."""
        return [CurrentVersion.from_row(dict(row)) for row in self.db.query(_CURRENT, [study_uid, excluding])]

    def known_inputs(self, study_uid: str, *, excluding: int) -> set[int]:
        """Every arrival known to hold images of ``study_uid`` (the ``inputs`` of each of its results
        by a ``done`` arrival other than ``excluding``, current or not)."""
        rows = self.db.query(
            "select s.arrival_id, s.inputs from studies s join arrivals a on a.id = s.arrival_id "
            "where s.study_uid = ? and a.state = 'done' and s.arrival_id != ?",
            [study_uid, excluding],
        )
        return {
            int(i)
            for row in rows
            for i in (json.loads(row["inputs"]) if row["inputs"] else [row["arrival_id"]])
        }

    def supersede(
        self,
        arrival_id: int,
        study_uid: str,
        expected: Sequence[int],
        json_path: str | None,
        *,
        stays_out: bool = False,
    ) -> None:
        """Mark the current results of ``study_uid`` superseded by arrival ``arrival_id``'s, inside the
        caller's transaction (:meth:`processor.state.queue.Queue.finish`).

        ``expected``: the arrivals whose results were current when this one was planned (empty for a
        study seen for the first time). :class:`~processor.errors.VersionConflict` when the current
        ones are not exactly those (another arrival of the study was recorded meanwhile): the
        caller's transaction rolls back. Each superseded row's result document gets
        ``superseded_by: {arrival_id, json, superseded_at, reason: "new_version"}``; the recorder
        rewrites its file from it. ``stays_out``: the new result does not replace them (it lacks
        images they used and came out worse; see the module docstring) — only checked, not marked.
        """
        rows = list(self.db.query(_CURRENT, [study_uid, arrival_id]))
        current = sorted(int(row["arrival_id"]) for row in rows)
        if current != sorted(expected):
            raise VersionConflict(
                f"the results of study …{study_uid[-12:]} changed while arrival {arrival_id} was processed "
                f"(current: arrivals {current}, expected {sorted(expected)})"
            )
        if stays_out:
            return
        pointer = {
            "arrival_id": arrival_id,
            "json": json_path,
            "superseded_at": utcnow(),
            "reason": "new_version",
        }
        for earlier in current:
            row = next(
                iter(
                    self.db.query(
                        "select id, result_json from studies where arrival_id = ? and study_uid = ?",
                        [earlier, study_uid],
                    )
                )
            )
            document = json.loads(row["result_json"]) if row["result_json"] else None
            if isinstance(document, dict):
                document["superseded_by"] = pointer
            self.db.execute(
                "update studies set superseded_by = ?, result_json = ? where id = ?",
                [arrival_id, json.dumps(document) if document is not None else None, row["id"]],
            )

    def superseded_rows(self, arrival_id: int) -> list[dict[str, Any]]:
        """``study_uid, json_path, result_json`` of the results that arrival ``arrival_id``'s replaced."""
        return list(
            self.db.query(
                "select study_uid, json_path, result_json from studies where superseded_by = ? order by id",
                [arrival_id],
            )
        )
