"""Reading an arrival's input, and the earlier parts of its studies, for the executor.

:func:`scan_input` opens one input (:func:`processor.intake.archive.open_arrival`) and scans its
DICOM headers within a time limit of its own, stopping at a stop request; :func:`read_earlier`
reads again the input of an earlier arrival that brought a part of the same study (a late series,
:mod:`processor.intake.late_series`) once its sha256 is checked, telling a fault of the world
(:class:`EarlierPartFault`, the arrival goes back to the queue) from an input that no longer reads
(:class:`EarlierPartUnreadable`). :func:`gc_paused` pauses the garbage collector while an input is
opened and its headers are parsed, and :func:`no_dicom_message` says what an input held when it held no DICOM.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from processor.dicom.scan import ScanResult, Study, scan_members
from processor.errors import Deferred, IngestError
from processor.gcpause import gc_paused
from processor.intake.archive import ArrivalKind, Contents, Limits, open_arrival
from processor.intake.diskfiles import ZIP_IN_FOLDER
from processor.intake.inbox import sha256_of
from processor.outputs.recorder import StudyRecorder
from processor.outputs.versions import CHANGED, GONE
from processor.state import Arrival

log = logging.getLogger(__name__)

StopCheck = Callable[[], bool]


class Stopped(Exception):
    """A stop was requested while an arrival was read: it is released, to be read again later."""


class EarlierPartFault(OSError):
    """An OS error (EIO, ESTALE, EMFILE…) while an earlier part of a study was read again: not the
    input's fault, so :meth:`processor.executor.LocalExecutor.prepare` lets it through and the caller sends the arrival
    back to the queue uncharged, as for other faults of the world (the worker: ``WORLD_ERRORS``)."""

    def __init__(self, cause: OSError) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause))


class EarlierPartUnreadable(Exception):
    """An earlier part of a study is on disk, unchanged, and cannot be read now for a reason that is
    not an OS error (e.g. it no longer reads within the time limit): the arrival fails with this
    reason, and nothing is recorded for its studies."""


def scan_input(
    path: Path,
    name: str,
    stack: ExitStack,
    should_stop: StopCheck,
    slow: str,
    limits: Limits,
    clock: Callable[[], float],
) -> tuple[Contents, ScanResult]:
    """Open one input (open while ``stack`` is) and scan its headers, within a time limit of its
    own, ``limits.max_seconds_per_arrival`` (else :class:`IngestError`: "reading its N file(s)
    took longer than … — ``slow``")."""
    contents = open_input(path, name, stack, should_stop, slow, limits, clock)
    return contents, scan_opened(contents)


def scan_opened(contents: Contents) -> ScanResult:
    """The headers of an input :func:`open_input` opened, scanned (collector paused), its reads'
    budget then settled."""
    with gc_paused():
        scan = scan_members(contents.members)
    contents.budget.settle()
    return scan


def open_input(
    path: Path,
    name: str,
    stack: ExitStack,
    should_stop: StopCheck,
    slow: str,
    limits: Limits,
    clock: Callable[[], float],
) -> Contents:
    """Open one input (open while ``stack`` is) as :func:`scan_input` does, its headers not yet
    scanned: its reads are charged to ``contents.budget`` (time limit, stop request, bytes) until
    the caller settles it."""
    limit, started = limits.max_seconds_per_arrival, clock()
    files: list[int] = []  # how many files it holds, once known

    def check() -> None:
        if should_stop():
            raise Stopped
        if clock() - started > limit:
            held = f"its {files[0]} file(s)" if files else "it"
            raise IngestError(
                f"reading {held} took longer than limits.max_seconds_per_arrival ({limit:g} s), {slow}"
            )

    with gc_paused():  # a ZIP's central directory: thousands of small objects, none in cycles
        contents = stack.enter_context(open_arrival(path, limits, check, name=name))
    files.append(len(contents.members))
    check()
    return contents


def read_earlier(
    recorder: StudyRecorder,
    arrival: Arrival,
    earlier: Arrival,
    stack: ExitStack,
    should_stop: StopCheck,
    limits: Limits,
    clock: Callable[[], float],
) -> list[Study] | str:
    """The studies in an earlier arrival's input, read again once it is in its final place (open
    while ``stack`` is); :data:`GONE` when it is no longer where the recorder finds it,
    :data:`CHANGED` when its sha256 is not the one recorded. :class:`EarlierPartFault` on an OS
    error, :class:`EarlierPartUnreadable` when it cannot be read otherwise."""
    path = recorder.locate(recorder.wait_placed(earlier.id))
    if path is None:
        return GONE
    try:
        if earlier.sha256 and sha256_of(path, should_stop)[0] != earlier.sha256:
            log.warning("late_series.part_changed arrival=%s earlier=%s", arrival.id, earlier.id)
            return CHANGED
        return scan_input(path, earlier.name, stack, should_stop, SLOW_PART, limits, clock)[1].studies
    except Deferred as exc:  # a stop while hashing
        raise Stopped from exc
    except FileNotFoundError:  # removed between the look and the read
        return GONE
    except OSError as exc:
        raise EarlierPartFault(exc) from exc
    except IngestError as exc:
        cause = exc.__cause__
        if isinstance(cause, FileNotFoundError):
            return GONE
        if isinstance(cause, OSError):
            raise EarlierPartFault(cause) from exc
        raise EarlierPartUnreadable(
            f"arrival {earlier.id} ({earlier.name}), which brought an earlier part of a study in this "
            f"input, could not be read again: {exc}. Nothing was analysed, so that study's current "
            f"result stays as it was; once that is fixed, run `python run.py requeue {arrival.id}`"
        ) from exc


SLOW_INPUT = (
    "so it was not analysed: it holds too much that is slow to read (e.g. thousands of files that are "
    "not DICOM) — remove what is not DICOM or split the export into smaller ZIPs, or raise "
    "limits.max_seconds_per_arrival if it is genuine"
)
SLOW_PART = (
    "the time each earlier input read again is given: its disk may be slow now, or the limit was "
    "lowered since it was analysed — raise limits.max_seconds_per_arrival if it is genuine"
)


def no_dicom_message(contents: Contents, skipped: Counter[str]) -> str:
    if contents.kind == ArrivalKind.FILE and contents.what is not None and set(skipped) == {"not DICOM"}:
        what, fix = contents.what
        return f"no DICOM images found: the file is not a ZIP, it is {what} — {fix}"
    zips = skipped[ZIP_IN_FOLDER]
    if contents.kind == ArrivalKind.FOLDER and zips and set(skipped) <= {ZIP_IN_FOLDER, "not DICOM"}:
        return (
            f"no DICOM images found: the folder holds {zips} ZIP file(s) and no DICOM files. "
            "A folder is read as the DICOM files of one drop, so the ZIPs inside are not opened — "
            "drop each ZIP on its own (or give them one by one to `python run.py process`)"
        )
    detail = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "it is empty"
    return (
        f"no DICOM images found among {len(contents.members) + sum(contents.skipped.values())} "
        f"file(s) ({detail}); "
        "export the study as DICOM files"
    )
