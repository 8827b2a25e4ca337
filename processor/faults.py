"""Named crash points for fault-injection tests: ``CTWATCH_FAULT`` makes the process die there.

Production code calls :func:`fault_point` at every moment between claiming an arrival and its
final state where a crash (kill -9, OOM kill, power loss) could leave something half done. With
the variable unset — always, outside tests — the call is one dictionary lookup and returns.

``CTWATCH_FAULT`` holds one rule: ``<point>`` (die at the first hit), ``<point>@<n>`` (die at the
n-th hit in this process), or ``<point>~<text>`` (die whenever the point is hit for a subject
whose name contains ``text``: a "poison" input that crashes the worker every time it is tried);
a rule ending ``!hang`` hangs there instead of dying (a study that never ends: the stuck-task drills).
Dying is ``os._exit(137)`` — what the kernel's OOM killer or ``kill -9`` leaves: no ``finally``
blocks, no atexit, no flushed buffers other than the one line written to stderr first.
"""

from __future__ import annotations

import os
import sys
import threading
import time

ENV = "CTWATCH_FAULT"

POINTS: tuple[str, ...] = (
    # intake
    "intake.registered",  # inbox file recorded as an arrival, not yet moved into work/
    "url.registered",  # downloaded body recorded as an arrival, still in the staging folder
    # worker
    "arrival.claimed",  # arrival marked running
    "prefetch.prepared",  # CPU stage of a prefetched arrival done, GPU stage not started
    "study.started",  # first step of a study about to run (subject: the arrival's name)
    "arrival.recorded",  # final state, rows, result documents and intended placement committed; no file yet
    "study.json_written",  # a study's result JSON written from the recorded document
    "arrival.receipt_written",  # receipt written, input not yet moved
    "arrival.moved",  # input moved to done/ or quarantine/, placement not yet marked complete
    "quarantine.note_before",  # input in quarantine/, its .error.txt not yet written
    "quarantine.note_written",  # .error.txt written, receipt not yet
    "excel.writing",  # workbook temp file written, not yet renamed over the old one
    # send-back
    "delivery.sent",  # a destination took the objects (or the webhook), the row not yet marked sent
)

_hits: dict[str, int] = {}
_lock = threading.Lock()


def fault_point(point: str, subject: str | None = None) -> None:
    """Die here when ``CTWATCH_FAULT`` names this point (see the module docstring); else return.

    ``subject``: what is being worked on (an arrival's display name), for ``<point>~<text>`` rules.
    ``ValueError`` for a point not in :data:`POINTS` (a typo would silently never fire).
    """
    rule = os.environ.get(ENV)
    if not rule:
        return
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}")
    rule, hang = rule.removesuffix("!hang"), rule.endswith("!hang")
    name, _, text = rule.partition("~")
    name, _, nth = name.partition("@")
    if name != point:
        return
    if text and (subject is None or text not in subject):
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        hit = _hits[point]
    if nth and hit != int(nth):
        return
    sys.stderr.write(f"fault.injected point={point} subject={subject!r} pid={os.getpid()} hang={hang}\n")
    sys.stderr.flush()
    while hang:
        time.sleep(1)
    os._exit(137)
