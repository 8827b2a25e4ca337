"""A Dask worker's inputs by path (issue 19, ``executor.dask.inputs: path``): the studies the
coordinator scanned, bound again to the arrival's input as the worker sees it.

The coordinator opened and scanned the input, and its studies reach the worker with their parsed
facts and first headers but without readers (each member pickled as its name, size and CRC-32,
:func:`processor.bytesource.readerless`). The worker reopens the input (:func:`bind_inputs`):

* **a ZIP**: each instance's member is bound to the member of the same name, raw name, size and
  CRC-32 in the reopened ZIP's central directory (:func:`rebind`); nothing is scanned again. A
  member that is gone or differs fails its arrival (:class:`InputChanged`; the other arrivals of
  the batch go back to the queue uncharged), never a rescan that would analyse other pixels under
  the same SOP Instance UIDs. The pixel data a step reads is checked against that CRC-32 as it is
  read (:meth:`processor.bytesource.Member.data`, ``read_into``), so a ZIP changed in place under
  an unchanged central directory fails the step that reads it ("Bad CRC-32"), as it does on the
  coordinator; a header read alone (its first 64 KiB) is not checked, there as on the coordinator.
* **a folder or a single file** (no CRC-32 to check): its headers are scanned again and each study
  must hold the same SOP Instance UIDs as the coordinator's.

A study merged from several arrivals (a late series) always travels with its bytes and is left
alone here.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from processor.bytesource import Member
from processor.dask_batch import Batch, InputChanged, WorkerNotReady, carries_bytes
from processor.dicom.scan import Study
from processor.errors import IngestError
from processor.executor import Prepared
from processor.executor_read import SLOW_INPUT, open_input, scan_opened
from processor.intake.archive import ArrivalKind
from processor.intake.late_series import sop_digests

log = logging.getLogger(__name__)


def bind_inputs(prepared: Prepared, batch: Batch, stack: ExitStack) -> None:
    """Give the studies that travelled by path their readers (see the module docstring): the
    inputs stay open while ``stack`` is. :class:`WorkerNotReady` when this worker cannot see an
    input (the worker's fault: the batch goes back uncharged), :class:`InputChanged` when it holds
    other images than the coordinator read (its arrival fails with that reason)."""
    if not batch.inputs:
        return
    assert batch.limits is not None
    for item in prepared.opened:
        where = batch.inputs.get(item.arrival.id)
        if where is None:
            continue
        path = Path(where)
        if not path.exists():
            # the path names the input (often the patient): the worker's log only, never the reason
            # that reaches /health and the status page
            log.warning("dask.input_not_found arrival=%s path=%s", item.arrival.id, where)
            raise WorkerNotReady(
                f"a Dask worker cannot see the input of arrival {item.arrival.id} where "
                "executor.dask.path_map puts it (the path is in that worker's log): check "
                "executor.dask.path_map, or use executor.dask.inputs: bytes"
            )
        aid = item.arrival.id
        studies = [study for study in item.studies if not carries_bytes(study)]
        try:
            contents = open_input(
                path, item.arrival.name, stack, lambda: False, SLOW_INPUT, batch.limits, time.monotonic
            )
            if contents.kind == ArrivalKind.ZIP:
                unbound = rebind(studies, contents.members)
                contents.budget.settle()
                if unbound:
                    # member names may name the patient: the worker's log only
                    log.warning("dask.input_changed arrival=%s members=%s", aid, unbound[:5])
                    raise InputChanged(
                        f"the input of arrival {aid} changed after the coordinator read it: "
                        f"{len(unbound)} of its DICOM files are gone or differ (CRC-32 or size) on the "
                        "Dask worker. Nothing was analysed; find what rewrote the file in ctwatch's "
                        f"work folder, then run `python run.py requeue {aid}`",
                        aid,
                    )
                continue
            scan = scan_opened(contents)
        except IngestError as exc:
            raise InputChanged(
                f"the input of arrival {aid} no longer reads on the worker: {exc}", aid
            ) from exc
        _rescanned(item, scan.studies)


def rebind(studies: list[Study], members: list[Member]) -> list[str]:
    """Bind each instance of ``studies`` (readerless members) to the member of ``members`` with the
    same name, raw name, size and CRC-32; the names of those without one (nothing is bound then).
    A member without a CRC-32 (a file on disk) is never bound."""
    found = {(m.name, m.raw_name, m.size, m.crc): m for m in members if m.crc is not None}
    pairs = []
    unbound: list[str] = []
    for study in studies:
        for series in study.series.values():
            for instance in series.instances:
                old = instance.member
                again = (
                    found.get((old.name, old.raw_name, old.size, old.crc)) if old.crc is not None else None
                )
                if again is None:
                    unbound.append(old.name)
                else:
                    pairs.append((instance, again))
    if not unbound:
        for instance, member in pairs:
            instance.member = member
    return unbound


def _rescanned(item: Any, scanned: list[Study]) -> None:
    """Replace each study of ``item`` (a :class:`~processor.executor.Prepared` arrival) that
    travelled by path by the study of the same UID in the worker's scan of a folder or a file,
    checked to hold the same SOP Instance UIDs (:class:`InputChanged` otherwise)."""
    found = {study.uid: study for study in scanned}
    for index, study in enumerate(item.studies):
        if carries_bytes(study):
            continue
        again = found.get(study.uid)
        if again is None or sop_digests(again) != sop_digests(study):
            raise InputChanged(
                f"the input of arrival {item.arrival.id} holds other images on the worker than on "
                "the coordinator",
                item.arrival.id,
            )
        item.studies[index] = again
        for run, _ in item.runs:
            if run.ctx.study is study:
                run.ctx.study = again
