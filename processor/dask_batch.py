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
# What the coordinator's recorder reads of a study's values (processor.executor._finished).
KEPT_VALUES = ("ctclip_latent", "features", "feature_models", "latent_models")


class WorkerNotReady(Exception):
    """The worker cannot run ctwatch batches (no plugin, another pipeline, an input it cannot see):
    the worker's fault, not the input's. The coordinator sends the batch back uncharged."""


class InputChanged(Exception):
    """The input a worker read again holds other images than the coordinator scanned."""


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
    """The Dask key of a batch: from its inputs' sha256 and ids and the pipeline's digest, prefixed
    (``ctwatch-batch-…``) so that it never equals an argument; one batch in flight, one key."""
    h = hashlib.sha256(digest.encode())
    for arrival in arrivals:
        h.update(f"|{arrival.id}:{arrival.sha256 or ''}".encode())
    return f"ctwatch-batch-{h.hexdigest()[:32]}"
