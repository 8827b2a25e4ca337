"""Handing a prepared batch from a CPU pool process to the daemon without copying its volumes twice.

A study's CPU stage leaves arrays of hundreds of MB (the HU volume, the lung mask, CT-CLIP's
input). Pickled in-band and sent through the pool's pipe, each would be copied into the pickle,
through the pipe, out of it and into a new array: measured on a 300 × 512² study (238 MB), 0.48 s
to pickle in the pool process and 0.24 s to unpickle in the daemon — the process that should keep
the GPU busy — and twice the arrays' size in the daemon while it unpickles.

So :func:`pack` pickles with protocol 5 (PEP 574, out-of-band buffers): every buffer of at least
:data:`OUT_OF_BAND_BYTES` (numpy's contiguous arrays hand theirs over as
:class:`pickle.PickleBuffer`) is written once into a file in shared memory (``/dev/shm``), the
rest of the batch is pickled as usual (with :class:`multiprocessing.reduction.ForkingPickler`, so
torch tensors still travel as torch shares them). :func:`unpack`, in the daemon, maps that file
copy-on-write, **unlinks it at once**, and unpickles with the mapped buffers: the arrays are views
of the mapping (no copy; writable, a write copies only the page it touches), and the memory goes
back to the system when the last of them is freed. Where shared memory is missing or full (a
container's 64 MB ``/dev/shm``), the batch is pickled in-band, as before — slower, never wrong.

A file left by a process that died between writing it and the daemon mapping it carries the
daemon's PID and its writer's in its name; :func:`remove_stale` removes those of daemons no longer
running (at start) and those of a pool process that died (when the daemon sees it die).
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import pickle
import re
import tempfile
from dataclasses import dataclass, field
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OUT_OF_BAND_BYTES = 1 << 20  # smaller buffers stay in the pickle
ALIGN = 64  # each buffer starts on a cache line (numpy's own allocations are 64-byte aligned)
SHM_DIR = Path("/dev/shm")
PREFIX = "ctwatch-handoff-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\d+)-")  # the daemon's PID, the pool process's PID


@dataclass
class Packed:
    """A pickled object and, when its large buffers travel out of band, the file holding them."""

    payload: bytes
    path: str | None = None
    spans: list[tuple[int, int]] = field(default_factory=list)  # (offset, length) per buffer


class _Pickler(ForkingPickler):
    """ForkingPickler's reducers (torch's among them) with protocol 5 and a buffer callback."""

    def __init__(self, file: io.BytesIO, buffer_callback: Any) -> None:
        pickle.Pickler.__init__(self, file, 5, buffer_callback=buffer_callback)
        self.dispatch_table = self._copyreg_dispatch_table.copy()  # type: ignore[attr-defined]
        self.dispatch_table.update(self._extra_reducers)  # type: ignore[attr-defined]


def pack(obj: Any, daemon_pid: int, folder: Path = SHM_DIR) -> Packed:
    """``obj`` pickled, its large buffers in a file in ``folder`` (in-band when that fails).

    ``daemon_pid``: the PID of the process that will :func:`unpack` it (named in the file, for
    :func:`remove_stale`).
    """
    large: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND_BYTES:
            return True  # in-band
        large.append(buffer)
        return False

    if folder.is_dir() and os.access(folder, os.W_OK):
        data = io.BytesIO()
        _Pickler(data, out_of_band).dump(obj)
        if not large:
            return Packed(data.getvalue())
        try:
            path, spans = _write(large, daemon_pid, folder)
        except OSError as exc:  # shared memory full or too small: in-band below
            log.info("handoff.in_band reason=%s", exc.strerror or exc)
        else:
            return Packed(data.getvalue(), path, spans)
    return Packed(ForkingPickler.dumps(obj, protocol=5).tobytes())


def _write(
    buffers: list[pickle.PickleBuffer], daemon_pid: int, folder: Path
) -> tuple[str, list[tuple[int, int]]]:
    spans = []
    offset = 0
    for buffer in buffers:
        offset = -(-offset // ALIGN) * ALIGN
        length = buffer.raw().nbytes
        spans.append((offset, length))
        offset += length
    fd, path = tempfile.mkstemp(prefix=f"{PREFIX}{daemon_pid}-{os.getpid()}-", dir=folder)
    try:
        os.posix_fallocate(fd, 0, max(offset, 1))  # ENOSPC now, not SIGBUS on a later page
        with os.fdopen(fd, "r+b", closefd=False) as fh:
            for buffer, (start, _) in zip(buffers, spans, strict=True):
                fh.seek(start)
                fh.write(buffer.raw())
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path, spans


def unpack(packed: Packed) -> Any:
    """The object :func:`pack` pickled; its large arrays are views of the mapped file, which is
    unlinked here, before anything else can fail."""
    if packed.path is None:
        return pickle.loads(packed.payload)
    try:
        with open(packed.path, "rb") as fh:
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    finally:
        os.unlink(packed.path)
    view = memoryview(mapped)
    return pickle.loads(packed.payload, buffers=[view[start : start + n] for start, n in packed.spans])


def remove_stale(folder: Path = SHM_DIR, *, writer: int | None = None) -> list[Path]:
    """Remove hand-off files of daemons no longer running (left by a kill at the wrong moment), or,
    with ``writer``, those that pool process (now dead) wrote for this daemon."""
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _NAME.match(name)
        if match is None:
            continue
        if writer is not None:
            if int(match.group(1)) != os.getpid() or int(match.group(2)) != writer:
                continue
        elif _running(int(match.group(1))):
            continue
        path = folder / name
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process with that PID
        return True
    return True
