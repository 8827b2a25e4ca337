"""Results computed from content (captions), keyed by a hash of image, model, prompt and settings."""

from __future__ import annotations

from processor.state.db import Database
from processor.vocab import utcnow


class ContentRows(Database):
    """The ``content_cache`` table."""

    def content_get(self, key: str) -> str | None:
        """The value stored under ``key`` (e.g. a caption), or None."""
        rows = list(self.db.query("select value from content_cache where key = ?", [key]))
        return rows[0]["value"] if rows else None

    def content_put(self, key: str, value: str) -> None:
        self.db.execute(
            "insert or replace into content_cache (key, value, created_at) values (?, ?, ?)",
            [key, value, utcnow()],
        )


class ContentCacheStore(ContentRows):
    """``get(key)``/``put(key, value)`` that steps use (``StepEnv.content_cache``), from any thread."""

    def get(self, key: str) -> str | None:
        return self.content_get(key)

    def put(self, key: str, value: str) -> None:
        self.content_put(key, value)
