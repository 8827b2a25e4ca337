"""SQLite state: one :class:`State` object per database, handed around; connections per thread inside.

Only this package writes SQL. Parts: :mod:`~processor.state.schema` (migrations),
:mod:`~processor.state.queue` (arrivals: register, claim, crash recovery, the recorded end),
:mod:`~processor.state.results` (studies, steps, features, latents), :mod:`~processor.state.versions`
(which result of a study is current, and what superseded the others), :mod:`~processor.state.sources`
(URL sources), :mod:`~processor.state.deliveries` (the send-back queue: results to PACS and
folders, webhooks), :mod:`~processor.state.reads` (read models for reports and status),
:mod:`~processor.state.content` (content cache), :mod:`~processor.state.meta` (the ``meta`` table
and the patient pseudonym, :meth:`State.patient_key`), :mod:`~processor.state.exports` (read
models for ``export``), :mod:`~processor.state.upgrade` (an older database's schema brought up to
date, under the state lock, before a command that only reads it). The status server opens its own
with ``readonly=True``.

Names are bytes (:mod:`processor.names`): an arrival's ``name`` is its display name and
``name_bytes`` the raw bytes in hex; path columns are text when valid UTF-8, else a BLOB of the
raw bytes, and come back as the ``str`` that ``os`` functions take.
"""

from __future__ import annotations

from pathlib import Path

from processor.state.arrival import Arrival, Registered
from processor.state.content import ContentCacheStore, ContentRows
from processor.state.deliveries import Deliveries, Delivery, DeliveryState, Outbound
from processor.state.exports import ExportRows
from processor.state.meta import Meta
from processor.state.queue import Queue, crash_reason
from processor.state.reads import ReadModels
from processor.state.results import Results
from processor.state.schema import MIGRATIONS
from processor.state.sources import Sources
from processor.state.versions import CurrentVersion, Versions
from processor.vocab import utcnow

__all__ = [
    "MIGRATIONS",
    "Arrival",
    "ContentCacheStore",
    "CurrentVersion",
    "Delivery",
    "DeliveryState",
    "Outbound",
    "Registered",
    "State",
    "crash_reason",
    "utcnow",
]


class State(Queue, Results, Versions, Sources, Deliveries, ReadModels, ContentRows, Meta, ExportRows):
    """The ctwatch database: every query, from any thread (each thread gets its own connection)."""

    @staticmethod
    def content_cache(path: Path) -> ContentCacheStore:
        """The ``get``/``put`` content cache that steps use (``StepEnv.content_cache``), on this database."""
        return ContentCacheStore(path)
