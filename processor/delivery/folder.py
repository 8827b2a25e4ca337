"""Copies of a row's files in a folder: ``<path>/<study folder>/<file>``, each written atomically
(:func:`processor.atomic.write_bytes_atomic`), mode 0644, from the outbox's sha256-checked bytes.

The study folder is the one the files have in the outbox (``<day>/<StudyUID>/`` there: its last
part). A copy sent again after a restart replaces the same file with the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from processor.atomic import write_bytes_atomic
from processor.config import FolderTarget
from processor.delivery.base import read_item
from processor.errors import SendFailed, os_error_words

FILE_MODE = 0o644


class FolderSender:
    """Copies a row's files into ``target.path`` (see the module docstring)."""

    kind = "folder"

    def __init__(self, target: FolderTarget) -> None:
        self.target = target

    def send(self, items: Sequence[Mapping[str, Any]], outbox: Path) -> None:
        copies = [(PurePosixPath(str(item["path"])), read_item(item, outbox)) for item in items]
        for relative, data in copies:
            study = relative.parent.name or "."
            try:
                write_bytes_atomic(self.target.path / study / relative.name, data, mode=FILE_MODE)
            except OSError as exc:
                raise SendFailed(
                    f"copy failed: the destination folder cannot be written ({os_error_words(exc)}) — "
                    "check that it is mounted, writable by ctwatch and has room; tried again with back-off",
                    retry=True,
                ) from exc
