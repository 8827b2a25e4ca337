"""What a Dask task carries (issue 19), both ways, and its key: light enough for the daemon to
import without Dask (:mod:`processor.executor_dask` imports Dask only when it starts)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from processor.executor import Prepared
from processor.intake.archive import Limits

PLUGIN = "ctwatch"


class WorkerNotReady(Exception):
    """The worker cannot run ctwatch batches (no plugin, another pipeline, an input it cannot see):
    the worker's fault, not the input's. The coordinator sends the batch back uncharged."""


class InputChanged(Exception):
    """The input a worker read again holds other images than the coordinator scanned.

    ``arrival_id``: the arrival whose input it is; the others of its batch are not at fault."""

    def __init__(self, message: str, arrival_id: int) -> None:
        super().__init__(message)
        self.arrival_id = arrival_id

    def __reduce__(self) -> tuple[type[InputChanged], tuple[str, int]]:
        # raised on a worker, pickled back to the coordinator: both arguments travel
        return type(self), (str(self), self.arrival_id)


@dataclass
class Batch:
    """One task's argument: a prepared batch and what the worker needs to run it.

    ``inputs``: arrival id → its input's path as the workers see it, for the arrivals whose studies
    travel by path (their members were pickled without bytes); ``limits``: the coordinator's, for
    reading them again."""

    prepared: Prepared
    pipeline_digest: str
    pipeline_text: str
    inputs: dict[int, str] = field(default_factory=dict)
    limits: Limits | None = None


@dataclass
class Done:
    """A task's result: the batch with every step run, the files the steps wrote (result path's
    folder → file name → bytes), and the worker that ran it."""

    prepared: Prepared
    files: dict[str, dict[str, bytes]]
    worker: str
    seconds: float


def batch_key(arrivals: Sequence[Any], digest: str) -> str:
    """The Dask key of a batch: ``ctwatch-batch-`` (so that it never equals an argument) and 32 hex
    digits of a sha256 over the pipeline's digest and, per arrival, its id, input sha256 and where
    it stands in SQLite: ``attempts``, ``crashes`` and ``claimed_at`` (set at each claim, to the
    second). One claim of a batch, one key: a batch in flight is never submitted twice, and a batch
    submitted again after its task was cancelled (a stop, a pause, no worker, a stuck task) gets a
    key of its own — never Dask's old task back, which may still be running on a worker with the
    old batch. (``attempts`` alone would not do: a release gives back the attempt it charged.)"""
    h = hashlib.sha256(digest.encode())
    for arrival in arrivals:
        h.update(
            f"|{arrival.id}:{arrival.sha256 or ''}:{arrival.attempts}:{arrival.crashes}:"
            f"{arrival.claimed_at or ''}".encode()
        )
    return f"ctwatch-batch-{h.hexdigest()[:32]}"


def carries_bytes(study: Any) -> bool:
    """Whether ``study`` travels with its DICOM bytes (:func:`processor.bytesource.carried`, all its
    instances or none) rather than by its input's path."""
    from processor.bytesource import _Carried

    return all(isinstance(i.member, _Carried) for s in study.series.values() for i in s.instances)
