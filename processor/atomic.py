"""Atomic file writes: a temp file in the same folder (``.<name>.*.tmp``), fsync, ``os.replace``.

A reader never sees half a file, and a crash leaves at most a ``.*.tmp`` file that the daemon
removes at the next start. Used by every writer of results, previews, latents and model cards.

The finished file gets the mode an ordinary ``open()`` would give it (0666 less the process umask,
e.g. 0644 under umask 022), not the 0600 of ``tempfile.mkstemp``: outputs are for other accounts
on the shared folder too.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    """The mode a newly created file gets from ``open()``: 0666 less the umask."""
    return 0o666 & ~umask()


def write_bytes_atomic(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` atomically; ``mode``: the file's permission bits (default: what
    ``open()`` would give, :func:`file_mode`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, file_mode() if mode is None else mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, document: Any) -> None:
    text = json.dumps(document, indent=2, default=json_default) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def json_default(value: Any) -> Any:
    """What ``json.dumps`` writes for values it does not know: arrays and numpy numbers as lists and
    numbers (``tolist``), paths as text."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
