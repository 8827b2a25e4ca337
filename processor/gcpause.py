"""Pausing Python's cyclic garbage collector while DICOM headers are parsed (:func:`gc_paused`).

A module of its own, importing nothing of ctwatch, so that a reader of headers (the executor, the
bench's fresh-process ingest) pays for no more than it uses.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_gc_lock = threading.Lock()
_gc_pausers = 0
_gc_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector (process-wide) while DICOM headers are parsed.

    A header parse allocates ~270 small tracked objects per file (pydicom ``RawDataElement`` tuples,
    tags, datasets) and frees none of them in cycles, so the collector's repeated passes over the
    growing heap were a third of the scan's CPU time. Opening a ZIP is alike: a ``ZipInfo``, a
    :class:`processor.bytesource.Member` and its readers per entry, none in a cycle (paused there
    too: 1.5 ms of the bench ZIP's 16). Counted, so that overlapping scans in several
    threads restore the collector's state only when the last one ends. Used by the executor, which
    owns the threads, not by the library code that parses.
    """
    global _gc_pausers, _gc_was_enabled
    with _gc_lock:
        if _gc_pausers == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_pausers += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_pausers -= 1
            if _gc_pausers == 0 and _gc_was_enabled:
                gc.enable()
