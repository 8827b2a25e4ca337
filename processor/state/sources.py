"""URL sources: poll bookkeeping, HTTP validators, and the DICOMweb study versions already fetched.

No outside text is kept or handed out here: a URL is stored and read back through
:func:`~processor.redact.redact_url` (no credentials, query or fragment) and an error through
:func:`~processor.redact.reduce_source_error` (ctwatch's category words only) — on write, and again on
read for a row an older ctwatch wrote (migration ``0008_redact_sources`` cleans those too). The ETag
is the one exception: an opaque validator sent back to the same server, never read for display.
"""

from __future__ import annotations

from typing import Any

from processor.redact import redact_optional_url, redact_url, reduce_source_error
from processor.state.db import Database


class Sources(Database):
    def source_poll_started(self, name: str, kind: str, url: str, at: str) -> None:
        """Count a poll of a configured source (the row is created on its first poll)."""
        with self.transaction():
            self.db.execute(
                "insert into sources (name, kind, url) values (?, ?, ?) on conflict(name) "
                "do update set kind = excluded.kind, url = excluded.url",
                [name, kind, redact_url(url)],
            )
            self.db.execute(
                "update sources set polls = polls + 1, last_poll_at = ? where name = ?", [at, name]
            )

    def source_poll_succeeded(self, name: str, at: str, *, arrivals: int, detail: str) -> None:
        self.db.execute(
            "update sources set successes = successes + 1, arrivals = arrivals + ?, "
            "last_success_at = ?, last_detail = ? where name = ?",
            [arrivals, at, detail, name],
        )

    def source_poll_failed(self, name: str, at: str, *, error: str, arrivals: int = 0) -> None:
        self.db.execute(
            "update sources set failures = failures + 1, arrivals = arrivals + ?, "
            "last_error = ?, last_error_at = ?, last_detail = ? where name = ?",
            [arrivals, reduce_source_error(error), at, "error", name],
        )

    def source_validators(self, name: str) -> dict[str, str | None]:
        """The ETag, Last-Modified and body sha256 of the last body taken from an http source."""
        rows = list(
            self.db.query("select etag, last_modified, last_sha256 from sources where name = ?", [name])
        )
        return dict(rows[0]) if rows else {"etag": None, "last_modified": None, "last_sha256": None}

    def set_source_validators(
        self, name: str, *, etag: str | None, last_modified: str | None, sha256: str
    ) -> None:
        self.db.execute(
            "update sources set etag = ?, last_modified = ?, last_sha256 = ? where name = ?",
            [etag, last_modified, sha256, name],
        )

    def source_item_known(self, source_name: str, item_key: str, version: str) -> bool:
        """Whether this version of an item (a DICOMweb study) was fetched from this source already."""
        rows = list(
            self.db.query(
                "select 1 from source_items where source_name = ? and item_key = ? and version = ? limit 1",
                [source_name, item_key, version],
            )
        )
        return bool(rows)

    def record_source_item(
        self, source_name: str, item_key: str, version: str, arrival_id: int | None, at: str
    ) -> None:
        self.db.execute(
            "insert or ignore into source_items (source_name, item_key, version, arrival_id, "
            "fetched_at) values (?, ?, ?, ?, ?)",
            [source_name, item_key, version, arrival_id, at],
        )

    def source_items(self, source_name: str) -> list[dict[str, Any]]:
        return list(
            self.db.query("select * from source_items where source_name = ? order by id", [source_name])
        )

    def sources(self) -> list[dict[str, Any]]:
        """Per-source poll bookkeeping for ``status`` and the status endpoint (holds no credentials)."""
        if not self.db.table("sources").exists():  # a read-only connection to a database not yet migrated
            return []
        rows = list(
            self.db.query(
                "select name, kind, url, polls, successes, failures, arrivals, last_poll_at, last_success_at, "
                "last_error, last_error_at, last_detail from sources order by name"
            )
        )
        for row in rows:  # defence in depth: a row written before URLs and errors were redacted
            row["url"] = redact_optional_url(row["url"])
            row["last_error"] = reduce_source_error(row["last_error"])
        return rows
