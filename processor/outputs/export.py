"""``export``: the stored model outputs of a time window as files a notebook reads.

For each study whose latest arrival finished between ``since`` and ``until`` (local calendar days,
both included), from that arrival:

* ``studies.csv`` — study_uid, accession, patient_key, arrival_id, processed_at, status and the
  three decision fields;
* ``labels_template.csv`` — study_uid, accession and empty ``pathology`` + one empty column per
  finding seen in the features (``zs.`` / ``lipro.`` / ``head.``): fill it in and hand it to
  ``fit-head``, ``fit-fusion`` or ``evaluate`` as ``--labels``;
* ``features.csv`` — study_uid + one column per feature name (an empty cell: not computed, or not
  finite);
* ``features_provenance.csv`` — per feature name, each checkpoint sha256 and software versions its
  values came from, with how many studies;
* ``latents.npz`` — ``study_uid`` (N,), ``ctclip`` (N, D) float32, ``model_sha256`` (N,) (empty
  text: unknown, a row stored before provenance was recorded);
* ``manifest.json`` — what was exported and when, the window, row counts, each file's sha256,
  ctwatch's and the libraries' versions. Written last: a folder without it is incomplete.

With ``--format parquet`` the four tables are ``.parquet`` (latents as a list column) and
``labels_template.csv`` stays CSV; pyarrow must be installed (it is not a dependency). Every file is
written atomically (:mod:`processor.atomic`, the mode ``open()`` would give, 0644 under umask 022).
The PatientID is never exported (it is not stored): ``patient_key`` is its keyed hash, a pseudonym
that groups one patient's studies within this database only.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from processor.atomic import write_bytes_atomic
from processor.errors import ConfigError
from processor.outputs.report import local_midnight_utc
from processor.provenance import software_versions
from processor.state import State
from processor.vocab import utcnow

FORMATS = ("npz", "parquet")
LATENT = "ctclip"
# the feature prefixes that carry per-finding probabilities (processor.steps.ports.KIND_PREFIX)
FINDING_PREFIXES = ("zs", "lipro", "head")
STUDY_COLUMNS = (
    "study_uid",
    "accession",
    "patient_key",
    "arrival_id",
    "processed_at",
    "status",
    "probability_of_pathology",
    "pathology",
    "most_dangerous_pathology_type",
)
PROVENANCE_COLUMNS = ("feature", "model_sha256", "software", "studies")


class ExportError(Exception):
    """The stored data cannot be exported as asked (the message says why and what to do)."""


@dataclass
class Export:
    """What one export wrote: file name → rows, and the manifest document."""

    folder: Path
    rows: dict[str, int] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def window(since: date, until: date | None) -> tuple[str, str]:
    """``[start, end)`` as stored-timestamp strings: local midnight of ``since`` to the midnight
    after ``until`` (no ``until``: no end)."""
    if until is not None and until < since:
        raise ConfigError(
            f"--until {until} is before --since {since}. Fix: give --until on or after --since."
        )
    end = local_midnight_utc(until + timedelta(days=1)) if until is not None else "9999"
    return local_midnight_utc(since), end


def export(
    state: State,
    folder: Path,
    *,
    since: date,
    until: date | None = None,
    fmt: str = "npz",
    now: Callable[[], str] = utcnow,
) -> Export:
    """Write the window's studies, features, latents and labels template into ``folder``."""
    import numpy as np

    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use npz or parquet.")
    if fmt == "parquet":
        _require_pyarrow()
    start, end = window(since, until)
    studies = state.export_studies(start, end)
    features = state.export_features(start, end)
    latents = state.export_latents(LATENT, start, end)
    names = sorted({row["name"] for row in features})
    dims = Counter(int(row["dim"]) for row in latents)
    if len(dims) > 1:
        raise ExportError(
            f"the studies of this window hold {LATENT} latents of {len(dims)} sizes "
            f"({', '.join(f'{n} of {d}' for d, n in sorted(dims.items()))}): they come from different "
            "models and do not stack. Fix: export a window processed with one model (--since/--until)."
        )

    values: dict[str, dict[str, float | None]] = {}
    provenance: Counter[tuple[str, str, str]] = Counter()
    for row in features:
        values.setdefault(row["study_uid"], {})[row["name"]] = row["value"]
        provenance[(row["name"], row["model_sha256"] or "", row["software"] or "")] += 1
    feature_rows = [
        [s["study_uid"], *(values.get(s["study_uid"], {}).get(n) for n in names)] for s in studies
    ]
    provenance_rows = [[n, sha, sw, count] for (n, sha, sw), count in sorted(provenance.items())]
    dim = next(iter(dims), 0)
    matrix = (
        np.stack([np.frombuffer(row["vector"], dtype="<f4") for row in latents]).astype(np.float32)
        if latents
        else np.zeros((0, dim), np.float32)
    )
    latent_uids = [row["study_uid"] for row in latents]
    latent_shas = [row["model_sha256"] or "" for row in latents]
    findings = sorted({n.split(".", 1)[1] for n in names if n.split(".", 1)[0] in FINDING_PREFIXES})

    tables: list[tuple[str, Sequence[str], list[list[Any]]]] = [
        ("studies", STUDY_COLUMNS, [[s[c] for c in STUDY_COLUMNS] for s in studies]),
        ("features", ("study_uid", *names), feature_rows),
        ("features_provenance", PROVENANCE_COLUMNS, provenance_rows),
    ]
    files: dict[str, bytes] = {}
    rows: dict[str, int] = {}
    for name, columns, table in tables:
        file = f"{name}.{'parquet' if fmt == 'parquet' else 'csv'}"
        files[file] = _parquet(columns, table) if fmt == "parquet" else _csv(columns, table)
        rows[file] = len(table)
    labels = [[s["study_uid"], s["accession"], *([""] * (1 + len(findings)))] for s in studies]
    files["labels_template.csv"] = _csv(("study_uid", "accession", "pathology", *findings), labels)
    rows["labels_template.csv"] = len(labels)
    file = "latents.parquet" if fmt == "parquet" else "latents.npz"
    files[file] = (
        _latents_parquet(latent_uids, latent_shas, matrix)
        if fmt == "parquet"
        else _npz(
            study_uid=np.array(latent_uids, dtype=str),
            ctclip=matrix,
            model_sha256=np.array(latent_shas, dtype=str),
        )
    )
    rows[file] = len(latents)

    software = software_versions()
    manifest = {
        "what": "ctwatch export: stored model outputs of each study's latest arrival in the window",
        "exported_at": now(),
        "ctwatch_version": software["ctwatch"],
        "since": since.isoformat(),
        "until": until.isoformat() if until is not None else None,
        "window_utc": {"start": start, "end": None if until is None else end},
        "format": fmt,
        "counts": {
            "studies": len(studies),
            "features": len(names),
            "latents": len(latents),
            "latent_dim": dim,
        },
        "files": {
            name: {"rows": rows[name], "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in files.items()
        },
        "software": software,
        "patient_key": (
            "HMAC-SHA256 of IssuerOfPatientID and PatientID under a secret kept in this ctwatch "
            "database: the same patient has the same key here; the PatientID is not exported"
        ),
        "provenance": "features_provenance and latents' model_sha256: sha256 of the checkpoint file "
        "that produced each value (empty: weight-free, or stored before provenance was recorded)",
    }
    for name, data in files.items():
        write_bytes_atomic(folder / name, data)
    write_bytes_atomic(folder / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return Export(folder, rows, manifest)


def _csv(columns: Sequence[str], rows: list[list[Any]]) -> bytes:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue().encode("utf-8")


def _npz(**arrays: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _require_pyarrow() -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "--format parquet needs pyarrow, which is not installed (it is not a ctwatch "
            "dependency). Fix: pip install pyarrow, or use --format npz."
        ) from exc


def _parquet_bytes(table: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())


def _parquet(columns: Sequence[str], rows: list[list[Any]]) -> bytes:
    import pyarrow as pa

    data = {c: [row[i] for row in rows] for i, c in enumerate(columns)}
    return _parquet_bytes(pa.table(data))


def _latents_parquet(uids: list[str], shas: list[str], matrix: Any) -> bytes:
    import pyarrow as pa

    vectors = (
        pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), pa.float32()), matrix.shape[1])
        if uids
        else pa.array([], pa.list_(pa.float32()))
    )
    return _parquet_bytes(
        pa.table(
            {
                "study_uid": pa.array(uids, pa.string()),
                "model_sha256": pa.array(shas, pa.string()),
                LATENT: vectors,
            }
        )
    )
