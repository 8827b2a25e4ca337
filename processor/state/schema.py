"""The schema: ordered migrations, each applied once in its own transaction (``_migrations``)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable

from processor.redact import redact_url, reduce_source_error
from processor.state.sqlitelib import sqlite_utils


def _m1_initial(db: sqlite_utils.Database) -> None:
    db.table("arrivals").create(
        {
            "id": int,
            "kind": str,
            "source_name": str,
            "source_url": str,
            "name": str,
            "original_path": str,
            "current_path": str,
            "sha256": str,
            "size": int,
            "pipeline_name": str,
            "pipeline_version": int,
            "state": str,
            "night": int,
            "attempts": int,
            "error": str,
            "duplicate_of": int,
            "receipt_path": str,
            "created_at": str,
            "claimed_at": str,
            "finished_at": str,
        },
        pk="id",
        not_null={"kind", "name", "sha256", "state"},
        defaults={"attempts": 0, "night": 0},
    )
    db.table("arrivals").create_index(["sha256", "pipeline_name", "pipeline_version"])
    db.table("arrivals").create_index(["state", "night", "id"])
    db.table("studies").create(
        {
            "id": int,
            "arrival_id": int,
            "study_uid": str,
            "series_uid": str,
            "accession": str,
            "status": str,
            "probability_of_pathology": float,
            "pathology": int,
            "most_dangerous_pathology_type": str,
            "error": str,
            "json_path": str,
            "seconds": float,
            "result_json": str,
            "created_at": str,
            "finished_at": str,
        },
        pk="id",
        foreign_keys=[("arrival_id", "arrivals", "id")],
    )
    db.table("studies").create_index(["arrival_id", "study_uid"], unique=True)
    db.table("studies").create_index(["json_path"])
    db.table("step_runs").create(
        {
            "id": int,
            "arrival_id": int,
            "study_uid": str,
            "step_id": str,
            "uses": str,
            "status": str,
            "seconds": float,
            "error": str,
            "finished_at": str,
        },
        pk="id",
        foreign_keys=[("arrival_id", "arrivals", "id")],
    )
    db.table("step_runs").create_index(["arrival_id", "study_uid"])


def _m3_sources(db: sqlite_utils.Database) -> None:
    """URL sources: one row per configured source (poll bookkeeping, HTTP validators), and the
    DICOMweb study versions already fetched. No credential is ever stored here."""
    db.table("sources").create(
        {
            "name": str,
            "kind": str,
            "url": str,
            "polls": int,
            "successes": int,
            "failures": int,
            "arrivals": int,
            "last_poll_at": str,
            "last_success_at": str,
            "last_error": str,
            "last_error_at": str,
            "last_detail": str,
            "etag": str,
            "last_modified": str,
            "last_sha256": str,
        },
        pk="name",
        defaults={"polls": 0, "successes": 0, "failures": 0, "arrivals": 0},
    )
    db.table("source_items").create(
        {
            "id": int,
            "source_name": str,
            "item_key": str,
            "version": str,
            "arrival_id": int,
            "fetched_at": str,
        },
        pk="id",
        not_null={"source_name", "item_key", "version"},
    )
    db.table("source_items").create_index(["source_name", "item_key", "version"], unique=True)


def _m5_features(db: sqlite_utils.Database) -> None:
    """Model outputs per study, so fit commands never re-run a model (issue 8)."""
    db.table("features").create(
        {
            "id": int,
            "arrival_id": int,
            "study_uid": str,
            "accession": str,
            "name": str,
            "value": float,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("arrival_id", "arrivals", "id")],
        not_null={"study_uid", "name"},
    )
    db.table("features").create_index(["arrival_id", "study_uid", "name"], unique=True)
    db.table("features").create_index(["study_uid"])
    db.table("latents").create(
        {
            "id": int,
            "arrival_id": int,
            "study_uid": str,
            "accession": str,
            "name": str,
            "dim": int,
            "vector": bytes,
            "created_at": str,
        },
        pk="id",
        foreign_keys=[("arrival_id", "arrivals", "id")],
        not_null={"study_uid", "name"},
    )
    db.table("latents").create_index(["arrival_id", "study_uid", "name"], unique=True)
    db.table("latents").create_index(["study_uid"])


def _m4_caption_cache(db: sqlite_utils.Database) -> None:
    """Results computed from content (captions): key = hash of image, model, prompt and settings (issue 7)."""
    db.table("content_cache").create(
        {"key": str, "value": str, "created_at": str}, pk="key", not_null={"value"}
    )


def _m6_name_bytes(db: sqlite_utils.Database) -> None:
    """The raw bytes of each arrival's name, in hex (names are bytes; ``name`` is for display)."""
    db.table("arrivals").add_column("name_bytes", str)


def _m7_recorder(db: sqlite_utils.Database) -> None:
    """Issue 14: crash charging and the recorded end of an arrival (intent before any file moves).

    ``crashes``: deaths of the process while the arrival was the only one in flight; ``isolate``:
    it was in flight with others during a crash, so it runs alone next time. ``final_path``,
    ``placed`` and ``receipt_json``: where the input goes at its final state, whether it is there
    yet, and the receipt to (re)write — replayed at the next start after a crash.
    """
    arrivals = db.table("arrivals")
    arrivals.add_column("crashes", int, not_null_default=0)
    arrivals.add_column("isolate", int, not_null_default=0)
    arrivals.add_column("final_path", str)
    arrivals.add_column("placed", int)
    arrivals.add_column("receipt_json", str)
    db.table("arrivals").create_index(["placed"])


def _m8_redact_sources(db: sqlite_utils.Database) -> None:
    """Issue 15: no outside text from URL sources is kept. Rows an older ctwatch wrote verbatim are
    reduced: source URLs lose credentials, query and fragment (``sources.url``,
    ``arrivals.source_url``, ``source.url`` in ``studies.result_json``), and ``sources.last_error``
    becomes its category and status code (:mod:`processor.redact`)."""
    for row in list(db.query("select name, url, last_error from sources")):
        db.execute(
            "update sources set url = ?, last_error = ? where name = ?",
            [
                None if row["url"] is None else redact_url(row["url"]),
                reduce_source_error(row["last_error"]),
                row["name"],
            ],
        )
    for row in list(db.query("select id, source_url from arrivals where source_url is not null")):
        db.execute(
            "update arrivals set source_url = ? where id = ?", [redact_url(row["source_url"]), row["id"]]
        )
    for row in list(db.query("""select id, result_json from studies where result_json like '%"url"%'""")):
        try:
            document = json.loads(row["result_json"])
            url = document["source"]["url"]
        except (ValueError, TypeError, KeyError):
            continue
        if isinstance(url, str) and redact_url(url) != url:
            document["source"]["url"] = redact_url(url)
            db.execute("update studies set result_json = ? where id = ?", [json.dumps(document), row["id"]])


def _m9_provenance(db: sqlite_utils.Database) -> None:
    """Issue 16: provenance that binds, and the patient pseudonym.

    ``features`` / ``latents`` get ``model_sha256`` (sha256 of the checkpoint file that produced the
    value; NULL for weight-free features such as ``lungs.*`` and for rows an older ctwatch wrote) and
    ``software`` (JSON object: distribution → version). ``studies`` gets ``patient_key``: the
    HMAC-SHA256 of IssuerOfPatientID and PatientID under ``meta.patient_key_secret`` (32 random
    bytes, hex, made here once), so studies group by patient without the ID ever being stored.
    """
    for table in ("features", "latents"):
        db.table(table).add_column("model_sha256", str)
        db.table(table).add_column("software", str)
    db.table("studies").add_column("patient_key", str)
    db.table("studies").create_index(["patient_key"])
    db.table("meta").create({"key": str, "value": str}, pk="key", not_null={"value"})
    db.table("meta").insert({"key": "patient_key_secret", "value": secrets.token_hex(32)})


def _m10_priority(db: sqlite_utils.Database) -> None:
    """Issue 17: the urgent lane and fresh attempts.

    ``priority``: ``routine`` or ``urgent`` (:class:`processor.vocab.Priority`); urgent arrivals
    are claimed first. ``retry_of``: for a copy of bytes whose earlier arrival ended without a
    usable result (rejected, failed, quarantined, or a study that failed), that arrival's id — the
    copy is a fresh attempt, and its receipt says so.
    """
    arrivals = db.table("arrivals")
    arrivals.add_column("priority", str, not_null_default="routine")
    arrivals.add_column("retry_of", int)
    arrivals.create_index(["state", "priority"])


def _m11_late_series(db: sqlite_utils.Database) -> None:
    """Issue 17: late series — a study analysed again when more of its images arrive.

    ``studies``: ``superseded_by`` (the arrival whose result replaced this one; NULL: the current
    version), ``inputs`` (JSON list of the arrivals whose images the result used; NULL on older
    rows: the arrival itself) and ``series_instances`` (JSON ``{series UID: [instances, sha256 of
    the sorted SOPInstanceUIDs]}``), see :mod:`processor.state.versions`. ``arrivals.late_series``:
    ``ignore`` when a study of the arrival was not analysed under that setting, ``new_version``
    once ``requeue`` sent it back to be analysed anyway; NULL otherwise (the setting decides).
    """
    studies = db.table("studies")
    studies.add_column("superseded_by", int)
    studies.add_column("inputs", str)
    studies.add_column("series_instances", str)
    studies.create_index(["study_uid"])
    db.table("arrivals").add_column("late_series", str)


def _m12_step_problems(db: sqlite_utils.Database) -> None:
    """Issue 17: why a step gave no result, as a closed category (:class:`processor.vocab.StepProblem`).

    ``step_runs.problem`` is set by the runner from now on; older rows get it from the runner's own
    words (the weights, earlier-step and skip texts), and a failure it cannot tell apart becomes
    ``unrecorded``. Indexes serve the status page: today's runs, and the last failure of each step.
    """
    db.table("step_runs").add_column("problem", str)
    for problem, where in (
        ("earlier_failed", "status = 'not_run'"),
        ("model_missing", "status in ('skipped', 'failed') and error like 'weights not installed%'"),
        (
            "needs_skipped",
            "status = 'skipped' and error like 'needs %which an earlier skipped step did not provide'",
        ),
        ("withheld", "status = 'skipped'"),
        ("internal", "status = 'failed' and error like 'TypeError: provided %'"),
        ("unrecorded", "status = 'failed'"),
    ):
        db.execute(f"update step_runs set problem = ? where problem is null and {where}", [problem])
    db.table("step_runs").create_index(["finished_at"])
    db.table("step_runs").create_index(["status", "step_id", "finished_at"])


def _m13_sop_digests(db: sqlite_utils.Database) -> None:
    """Issue 17 (late series): ``studies.sop_digests``, the images a result used, one by one — the
    sorted 8-byte BLAKE2b digests of their SOPInstanceUIDs, concatenated (a BLOB; NULL on older
    rows), see :mod:`processor.state.versions`. A later arrival holding only some of them is then
    known to bring nothing new, and a new version that lacks some of them is known to, even once
    the earlier inputs are no longer on disk."""
    db.table("studies").add_column("sop_digests", bytes)


def _m14_deliveries(db: sqlite_utils.Database) -> None:
    """Issue 20 (send-back): ``deliveries``, the durable queue of what goes out — DICOM objects to a
    PACS, files to a folder, webhook notifications — one row per destination and event
    (:mod:`processor.state.deliveries`). ``items``: JSON list of what to send (outbox-relative
    paths with their sha256, or one webhook payload); ``state``: ``pending`` → ``sent`` | ``failed``;
    ``next_try_at`` and ``first_failed_at``: Unix seconds (REAL); ``last_error``: ctwatch's words,
    never a token or a URL's query."""
    db.table("deliveries").create(
        {
            "id": int,
            "destination": str,
            "event": str,
            "arrival_id": int,
            "study_uid": str,
            "items": str,
            "state": str,
            "attempts": int,
            "next_try_at": float,
            "first_failed_at": float,
            "last_error": str,
            "last_error_at": str,
            "created_at": str,
            "sent_at": str,
        },
        pk="id",
        not_null={"destination", "event", "items", "state", "next_try_at", "created_at"},
        defaults={"attempts": 0, "state": "pending"},
        foreign_keys=[("arrival_id", "arrivals", "id")],
    )
    db.table("deliveries").create_index(["destination", "state", "next_try_at"])
    db.table("deliveries").create_index(["state", "created_at"])
    db.table("deliveries").create_index(["arrival_id"])
    db.table("deliveries").create_index(["destination", "last_error_at"])  # each one's latest error


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("0001_initial", _m1_initial),
    ("0003_sources", _m3_sources),
    ("0004_caption_cache", _m4_caption_cache),
    ("0005_features", _m5_features),
    ("0006_name_bytes", _m6_name_bytes),
    ("0007_recorder", _m7_recorder),
    ("0008_redact_sources", _m8_redact_sources),
    ("0009_provenance", _m9_provenance),
    ("0010_priority", _m10_priority),
    ("0011_late_series", _m11_late_series),
    ("0012_step_problems", _m12_step_problems),
    ("0013_sop_digests", _m13_sop_digests),
    ("0014_deliveries", _m14_deliveries),
]
