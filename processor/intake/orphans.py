"""Inputs in an inbox's work folder that no arrival row knows: registered again at start.

An input is in ``<inbox>/.ctwatch/work/`` only while an arrival is being processed. When the state
database was deleted or replaced while the daemon ran (or restored from an older backup), the
inputs taken in since are there with no row: nothing would ever process them. At start-up, before
the watcher and the worker run, each such entry is registered as a new arrival where it lies (no
move), under the name it was dropped with (the work folder's ``a<id>-`` prefix removed). The worker
then processes it as any other; the same bytes already processed under this pipeline end as a
duplicate, finished by the recorder's replay.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

from processor.errors import os_error_words
from processor.intake.inbox import InboxLayout, is_temporary_name, sha256_of, work_name
from processor.names import display_name
from processor.state import State

log = logging.getLogger(__name__)

_WORK_PREFIX = re.compile(r"^a[0-9]+-")


def known_work_paths(state: State) -> set[str]:
    """Every path an arrival row names (where it is, where it goes) and its work-folder name."""
    known: set[str] = set()
    for row in state.path_rows():
        known.update(str(row[column]) for column in ("current_path", "final_path") if row[column])
        if row["original_path"]:
            for layout in _layouts_of(Path(str(row["original_path"]))):
                known.add(str(layout.work / work_name(int(str(row["id"])), str(row["name"]))))
    return known


def _layouts_of(original: Path) -> list[InboxLayout]:
    """The layouts an input dropped at ``original`` may use (its folder, and the folder above for a
    night folder inside an inbox)."""
    return [InboxLayout(original.parent), InboxLayout(original.parent.parent)]


def adopt_orphans(
    state: State,
    inbox_dirs: Iterable[Path],
    *,
    pipeline_name: str,
    pipeline_version: int,
) -> list[int]:
    """Register every entry of each inbox's work folder that no arrival row knows. Returns the ids.

    An entry that cannot be read is registered as refused (quarantined with the reason), so it
    still gets a receipt from the recorder's replay and is never silently left.
    """
    known = known_work_paths(state)
    adopted: list[int] = []
    for inbox in inbox_dirs:
        work = InboxLayout(Path(inbox)).work
        try:
            entries = sorted(work.iterdir()) if work.is_dir() else []
        except OSError as exc:
            log.error("orphans.unlistable folder=%s error=%s", work, exc.strerror)
            continue
        for path in entries:
            if str(path) in known or is_temporary_name(path.name):
                continue
            adopted.append(_adopt(state, Path(inbox), path, pipeline_name, pipeline_version))
    return adopted


def _adopt(state: State, inbox: Path, path: Path, pipeline_name: str, pipeline_version: int) -> int:
    name = _WORK_PREFIX.sub("", path.name) or path.name
    refused = None
    sha256, size = "", 0
    try:
        sha256, size = sha256_of(path)
    except OSError as exc:
        refused = (
            f"The input could not be taken in again after the state database was lost: it cannot be "
            f"read ({os_error_words(exc)}). Copy it into the inbox again once "
            "the cause is fixed."
        )
    registered = state.register_arrival(
        kind="inbox",
        name=name,
        original_path=str(inbox / name),
        current_path=str(path),
        sha256=sha256,
        size=size,
        pipeline_name=pipeline_name,
        pipeline_version=pipeline_version,
        refused=refused,
    )
    log.warning(
        "arrival.adopted arrival=%s name=%s: found in the work folder with no arrival row (the state "
        "database was deleted or replaced); registered again%s",
        registered.arrival_id,
        display_name(name),
        f" as {registered.duplicate_of and 'a duplicate'}" if registered.duplicate_of else "",
    )
    return registered.arrival_id
