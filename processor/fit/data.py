"""What the fit commands share: the labels CSV, joining it to stored studies, hashes and cards.

Labels CSV: one row per study, keyed by ``study_uid`` (also accepted: ``StudyInstanceUID``) or
``accession`` (``AccessionNumber``); the other columns are binary labels (0/1; an empty cell is
"unknown" and that study is left out for that label only). When both keys are present the study
UID is used and the accession is the fallback for rows whose UID is empty.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from processor.atomic import write_bytes_atomic
from processor.errors import ConfigError

UID_NAMES = ("study_uid", "studyinstanceuid", "study_instance_uid")
ACCESSION_NAMES = ("accession", "accessionnumber", "accession_number")
OOF_NAME = "oof.csv"  # a fitted model's out-of-fold outputs on its training studies, beside its card


@dataclass
class Labels:
    """A parsed labels CSV: key columns and the binary label columns (NaN = unknown)."""

    path: Path
    uid: list[str | None]
    accession: list[str | None]
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.uid)


def _text(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def read_labels(path: Path, wanted: Sequence[str] | None = None) -> Labels:
    """Read and check a labels CSV; every problem is a ConfigError naming the file and the fix."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ConfigError(
            f"{path}: cannot read the labels CSV ({exc}). Fix: pass a comma-separated file with a header row."
        ) from exc
    lower = {c.strip().lower(): c for c in frame.columns}
    uid_col = next((lower[n] for n in UID_NAMES if n in lower), None)
    acc_col = next((lower[n] for n in ACCESSION_NAMES if n in lower), None)
    if uid_col is None and acc_col is None:
        raise ConfigError(
            f"{path}: no key column. Fix: add a column `study_uid` (StudyInstanceUID) or "
            f"`accession`; the columns are {list(frame.columns)}."
        )
    label_cols = [c for c in frame.columns if c not in (uid_col, acc_col)]
    if wanted is not None:
        missing = [w for w in wanted if w not in label_cols]
        if missing:
            raise ConfigError(
                f"{path}: no column {', '.join(map(repr, missing))}. Fix: check the spelling; "
                f"the label columns are {label_cols}."
            )
        label_cols = list(wanted)
    columns: dict[str, np.ndarray] = {}
    for col in label_cols:
        values = np.full(len(frame), np.nan)
        for i, cell in enumerate(frame[col]):
            text = cell.strip()
            if text == "":
                continue
            if text not in ("0", "1", "0.0", "1.0"):
                raise ConfigError(
                    f"{path}: row {i + 2}, column {col!r} is {cell!r}. Fix: labels are 0 or 1 "
                    "(leave the cell empty when unknown)."
                )
            values[i] = float(text)
        columns[col] = values
    none: list[str | None] = [None] * len(frame)
    uids = [_text(v) for v in frame[uid_col]] if uid_col else none
    accs = [_text(v) for v in frame[acc_col]] if acc_col else list(none)
    for i, (u, a) in enumerate(zip(uids, accs, strict=True)):
        if u is None and a is None:
            raise ConfigError(
                f"{path}: row {i + 2} has neither a study UID nor an accession. Fix: fill one in."
            )
    for name, keys in (("study_uid", uids), ("accession", accs)):
        seen = [k for k in keys if k is not None]
        dupes = sorted({k for k in seen if seen.count(k) > 1})
        if dupes:
            raise ConfigError(f"{path}: {name} {dupes[0]!r} appears more than once. Fix: one row per study.")
    return Labels(path, uids, accs, columns)


@dataclass
class Joined:
    """Label rows matched to stored studies: ``rows[i]`` is the stored study of ``label_index[i]``."""

    rows: list[dict[str, Any]]
    label_index: np.ndarray
    unmatched: list[str]


def join(labels: Labels, studies: Sequence[dict[str, Any]]) -> Joined:
    """Match label rows to stored studies by study UID, else by accession (unique ones only).

    ConfigError when two label rows reach the same study (one by UID, one by accession)."""
    by_uid = {s["study_uid"]: s for s in studies}
    by_acc: dict[str, list[dict[str, Any]]] = {}
    for s in studies:
        if s.get("accession"):
            by_acc.setdefault(s["accession"], []).append(s)
    rows, index, unmatched = [], [], []
    for i, (uid, acc) in enumerate(zip(labels.uid, labels.accession, strict=True)):
        study = by_uid.get(uid) if uid else None
        if study is None and acc and len(by_acc.get(acc, [])) == 1:
            study = by_acc[acc][0]
        if study is None:
            unmatched.append(uid or f"accession {acc}")
            continue
        rows.append(study)
        index.append(i)
    joined = Joined(rows, np.asarray(index, dtype=int), unmatched)
    check_one_row_per_study(labels, joined)
    return joined


def data_hash(keys: Sequence[str], *arrays: np.ndarray) -> str:
    """sha256 of the training set: study keys in order plus the exact bytes of features and labels."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode() + b"\0")
    for array in arrays:
        digest.update(np.ascontiguousarray(array, dtype="<f8").tobytes())
    return digest.hexdigest()


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def write_card(path: Path, card: dict[str, Any]) -> None:
    write_bytes_atomic(path, (json.dumps(card, indent=2, allow_nan=False) + "\n").encode())


def unmatched_note(joined: Joined, total: int) -> str:
    if not joined.unmatched:
        return f"{total} labelled studies, all found in the database"
    shown = ", ".join(joined.unmatched[:3]) + (" …" if len(joined.unmatched) > 3 else "")
    return (
        f"{total} labelled studies, {len(joined.rows)} found in the database; {len(joined.unmatched)} "
        f"not processed yet (or processed without this model): {shown}"
    )


def study_key(study_uid: str) -> str:
    """A study's key in a card's ``training_keys``: the first 16 hex digits of sha256(StudyInstanceUID)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def patient_tag(patient_key: str | None) -> str | None:
    """A patient's key in a card's ``training_groups``: the first 16 hex digits of
    sha256(patient_key) (the keyed pseudonym hashed once more: a card never carries the pseudonym)."""
    return hashlib.sha256(patient_key.encode()).hexdigest()[:16] if patient_key else None


def training_groups(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ``training_groups`` of a card: the tags of the patients of ``rows`` (those with a key)."""
    return sorted({tag for row in rows if (tag := patient_tag(row.get("patient_key")))})


@dataclass(frozen=True)
class TrainingSet:
    """What a card says its model saw: studies (``training_keys``) and patients
    (``training_groups``; None when the card does not name them, e.g. fit-anomaly run without the
    state database, or a card from an older ctwatch)."""

    keys: frozenset[str] | None
    groups: frozenset[str] | None
    fingerprint: str | None  # of the database secret the patient tags were made under

    @classmethod
    def of(cls, card: dict[str, Any]) -> TrainingSet:
        keys, groups = card.get("training_keys"), card.get("training_groups")
        return cls(
            None if keys is None else frozenset(keys),
            None if groups is None else frozenset(groups),
            card.get("patient_key_fingerprint"),
        )

    def contains(self, row: dict[str, Any]) -> bool:
        """True when the model saw this study, or another study of the same patient: its outputs
        for the patient are in-sample (a model that memorised the patient scores every scan)."""
        if self.keys is not None and study_key(row["study_uid"]) in self.keys:
            return True
        tag = patient_tag(row.get("patient_key"))
        return tag is not None and self.groups is not None and tag in self.groups

    def gaps(self, current_fingerprint: str | None) -> list[str]:
        """Why this training set cannot be checked completely (empty when it can)."""
        out = []
        if self.keys is None:
            out.append("it does not list its training studies (fitted by an older ctwatch)")
        if self.groups is None:
            out.append(
                "it does not name its training patients (fitted by an older ctwatch, or fit-anomaly "
                "run without the state database)"
            )
        elif self.fingerprint and current_fingerprint and self.fingerprint != current_fingerprint:
            out.append("its training patients were named under another state database's secret")
        return out


UNKNOWN_PATIENT = None  # patient_key of a study processed before ctwatch recorded patients
NO_PATIENT_ID = ""  # patient_key of a study whose DICOM has no PatientID


def patient_groups(rows: Sequence[dict[str, Any]], *, allow_unknown: bool = False) -> list[str]:
    """The fold group of each stored study: its patient pseudonym, or the study itself when its
    DICOM has no PatientID (a patient of its own).

    A study processed before ctwatch recorded patients (``patient_key`` NULL) cannot be grouped:
    ConfigError with the fix, unless ``allow_unknown`` (then it too is a patient of its own, and
    :func:`grouping_note` says so).
    """
    unknown = [row["study_uid"] for row in rows if row.get("patient_key") is UNKNOWN_PATIENT]
    if unknown and not allow_unknown:
        raise ConfigError(
            f"{len(unknown)} of {len(rows)} labelled studies were processed before ctwatch recorded "
            f"patients (e.g. {unknown[0]}), so two scans of one patient could land in different "
            "folds and inflate every figure. Fix: process them again (`python run.py process` on "
            "the inputs), or pass --allow-ungrouped to treat each as a patient of its own (the "
            "card says so)."
        )
    return [
        f"patient:{row['patient_key']}" if row.get("patient_key") else f"study:{row['study_uid']}"
        for row in rows
    ]


def grouping_note(groups: Sequence[str], rows: Sequence[dict[str, Any]] | None = None) -> str:
    patients = {g for g in groups if g.startswith("patient:")}
    alone = sum(1 for g in groups if g.startswith("study:"))
    unknown = sum(1 for row in rows or () if row.get("patient_key") is UNKNOWN_PATIENT)
    text = f"folds grouped by patient: {len(groups)} studies of {len(patients) + alone} patients"
    if alone - unknown:
        text += f" ({alone - unknown} studies without a PatientID count as a patient each)"
    if unknown:
        text += (
            f"; NOT grouped: {unknown} studies processed before patients were recorded count as a "
            "patient each (--allow-ungrouped)"
        )
    return text


def check_one_row_per_study(labels: Labels, joined: Joined) -> None:
    """ConfigError when two label rows (one keyed by UID, one by accession) reach the same study."""
    seen: dict[str, int] = {}
    for row, index in zip(joined.rows, joined.label_index, strict=True):
        first = seen.setdefault(row["study_uid"], int(index))
        if first != int(index):
            raise ConfigError(
                f"{labels.path}: rows {first + 2} and {int(index) + 2} are the same study "
                f"{row['study_uid']} (one by study UID, one by accession). Fix: one row per study."
            )
