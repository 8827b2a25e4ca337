"""What runs on a Dask worker (issue 19): the plugin that keeps the pipeline and its models for the
life of the worker, and the task that runs one batch of arrivals through every step.

A worker writes nothing durable. :func:`run_batch` gets a batch the coordinator opened, scanned,
planned and gave result paths to (:mod:`processor.executor_dask`); it runs the CPU steps, the CPU
part of the GPU steps and the GPU steps over it — model-major, like the local executor — with the
files steps write (previews, heat maps, CT-CLIP's input) in a scratch folder of its own inside the
Dask worker's local directory (removed with the batch, and by Dask with a worker that died), and
hands back the batch (its studies' values and the DICOM bytes it carried dropped: what the
recorder reads) with those files' bytes.
The coordinator's recorder writes them, the result JSON, SQLite and the rest, as for the local
executor.

Inputs reach a worker in one of two ways (``executor.dask.inputs``): ``bytes``, the DICOM read by
the coordinator and carried in the task (a member that could not be read carried as its failure,
which the step that reads it reports as it would locally); or ``path``, the arrival's input opened
again on the worker from a shared filesystem (``path_map``) and the coordinator's studies bound to
it, each member checked by its CRC-32 and size (:mod:`processor.dask_inputs`; a study merged from
several arrivals, a late series, is always carried).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin, get_worker

from processor.config import Settings
from processor.dask_batch import PLUGIN, Batch, Done, WorkerNotReady
from processor.dask_inputs import bind_inputs
from processor.errors import ConfigError
from processor.executor import RECORDED_VALUES, Prepared, RanOn
from processor.faults import fault_point
from processor.pipeline.runner import PipelineRunner
from processor.pipeline.spec import Pipeline
from processor.provenance import software_versions

log = logging.getLogger(__name__)


class MemoryContentCache:
    """``get``/``put`` of results computed from content (captions), kept in this worker's memory
    (the daemon's is its SQLite file, which never leaves the coordinator); oldest out first."""

    def __init__(self, capacity: int = 20_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: str) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


SCRATCH_PREFIX = "ctwatch-"  # a Runtime's scratch folder in its worker's local directory


class Runtime:
    """A worker's lasting part: its device, its model cache and the pipelines compiled on it (by
    digest), plus counts for ``status``. Made by :class:`CtwatchPlugin` when the worker starts.

    ``local_directory``: the Dask worker's own folder (``Worker.local_directory``), where the steps'
    files (key-slice previews named by StudyInstanceUID, heat maps) are written before they go back:
    Dask removes it when the worker closes and, at a worker's next start, the folders of workers that
    died (a ``kill -9``, the OOM killer), so no patient's images outlive their worker."""

    def __init__(self, settings: Settings, device: str, name: str, local_directory: str | Path) -> None:
        from processor.models.cache import ModelCache

        m = settings.models
        self.settings = settings
        self.device = device
        self.name = name
        self.models = ModelCache(m.capacity, device, m.gpu_memory_budget_gb, precision=m.precision)
        self.content = MemoryContentCache()
        self.scratch = Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX, dir=local_directory))
        self._pipelines: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self.in_flight = 0
        self.done = 0
        self.failed = 0

    def pipeline(self, digest: str, text: str) -> Pipeline:
        """The coordinator's pipeline (its file's ``text``), compiled once on this worker;
        :class:`WorkerNotReady` when it compiles to another digest or not at all."""
        with self._lock:
            if digest in self._pipelines:
                return self._pipelines[digest]
            from processor.pipeline.step import StepEnv
            from processor.steps import default_registry
            from processor.weights import pinned_sha256

            env = StepEnv(
                root=self.settings.root,
                device=self.device,
                models=self.models,
                content_cache=self.content,
                pinned_sha256=pinned_sha256(self.settings),
            )
            from processor.pipeline.spec import load_pipeline

            try:
                pipeline = load_pipeline(self.settings.pipeline, default_registry(), env, text)
            except ConfigError as exc:
                raise WorkerNotReady(f"Dask worker {self.name} cannot compile the pipeline: {exc}") from exc
            if pipeline.digest != digest:  # pragma: no cover - the same text compiles to the same digest
                raise WorkerNotReady(
                    f"Dask worker {self.name} compiled another pipeline than the coordinator's"
                )
            self._pipelines[digest] = pipeline
            return pipeline

    def stats(self) -> dict[str, Any]:
        """Name, device, models loaded (with how often each was loaded), batches in flight and done."""
        return {
            "name": self.name,
            "device": self.device,
            "models_loaded": [
                {k: m.get(k) for k in ("key", "loads", "hits", "gpu_bytes", "load_seconds")}
                for m in self.models.loaded()
            ],
            "model_loads": self.models.stats().get("loads", 0),
            "in_flight": self.in_flight,
            "done": self.done,
            "failed": self.failed,
            "pid": os.getpid(),
        }

    def close(self) -> None:
        self.models.clear()
        shutil.rmtree(self.scratch, ignore_errors=True)


class CtwatchPlugin(WorkerPlugin):
    """Keeps a :class:`Runtime` on each worker for its whole life (models stay resident between
    tasks). ``settings``: root, weights and model settings as this worker sees them; ``device``:
    ``cpu``, ``cuda:N``, or ``cuda`` (the worker's index, from its name, picks the card)."""

    name = PLUGIN

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings = settings
        self.device = device
        self.runtime: Runtime | None = None

    def setup(self, worker: Any) -> None:
        logging.getLogger("processor").setLevel(self.settings.log_level)  # records reach the daemon
        _remove_stale_scratch(Path(worker.local_directory))
        self.runtime = Runtime(
            self.settings, _device_for(self.device, worker.name), str(worker.name), worker.local_directory
        )
        log.info("dask.worker_ready name=%s device=%s", worker.name, self.runtime.device)

    def teardown(self, worker: Any) -> None:
        if self.runtime is not None:
            self.runtime.close()


def _remove_stale_scratch(local_directory: Path) -> None:
    """Remove the scratch folders an earlier plugin on this worker left (its teardown did not run)."""
    for folder in local_directory.glob(f"{SCRATCH_PREFIX}*"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)


def _device_for(device: str, worker_name: object) -> str:
    """``cuda`` on a LocalCluster worker named ``0``, ``1``… → that card (modulo the cards seen)."""
    if device != "cuda":
        return device
    import torch

    index = int(str(worker_name)) if str(worker_name).isdigit() else 0
    return f"cuda:{index % max(1, torch.cuda.device_count())}"


def runtime(worker: Any = None) -> Runtime:
    """This worker's :class:`Runtime`; :class:`WorkerNotReady` on a worker without the plugin.
    ``worker``: the :class:`distributed.Worker` (None: the one running this task; ``Client.run``
    functions are not tasks, so they pass the ``dask_worker`` they are given)."""
    worker = worker if worker is not None else get_worker()
    plugin = worker.plugins.get(PLUGIN)
    if not isinstance(plugin, CtwatchPlugin) or plugin.runtime is None:
        raise WorkerNotReady(
            f"Dask worker {worker.name} has no ctwatch plugin: start workers with `python run.py worker` "
            "(or `dask worker --preload processor.dask_preload`)"
        )
    return plugin.runtime


def worker_stats(dask_worker: Any = None) -> dict[str, Any]:
    """For ``Client.run``: this worker's :meth:`Runtime.stats` (an error text when not ready)."""
    try:
        return runtime(dask_worker).stats()
    except WorkerNotReady as exc:
        return {"error": str(exc)}


def run_packed(packed: bytes) -> Done:
    """The task as the coordinator submits it: ``packed`` is its :class:`Batch`, pickled
    (:func:`processor.dask_cluster.pack`), run by :func:`run_batch`."""
    started = time.perf_counter()
    return run_batch(pickle.loads(packed), started)


def run_batch(batch: Batch, started: float | None = None) -> Done:
    """Every step over ``batch`` on this worker (see the module docstring); ``started``: the
    task's start (``perf_counter``), for :attr:`Done.seconds`."""
    started = time.perf_counter() if started is None else started
    rt = runtime()
    pipeline = rt.pipeline(batch.pipeline_digest, batch.pipeline_text)
    prepared = batch.prepared
    log.info(
        "dask.batch_started arrivals=%s worker=%s pid=%s",
        [item.id for item in prepared.arrivals],
        rt.name,
        os.getpid(),
    )
    rt.in_flight += 1
    try:
        with ExitStack() as stack:
            bind_inputs(prepared, batch, stack)
            scratch = Path(tempfile.mkdtemp(prefix="batch-", dir=rt.scratch))
            stack.callback(shutil.rmtree, scratch, True)
            homes = _redirect(prepared, scratch)
            _run_steps(PipelineRunner(pipeline), prepared)
            prepared.ran_on = RanOn(rt.device, software_versions())
            files = _collect(prepared, homes)
        rt.done += 1
    except BaseException:
        rt.failed += 1
        raise
    finally:
        rt.in_flight -= 1
    _slim(prepared)
    return Done(prepared, files, rt.name, time.perf_counter() - started)


def _redirect(prepared: Prepared, scratch: Path) -> dict[Path, Path]:
    """Point each study's file folder into ``scratch`` under the same name (results name their
    files ``<folder name>/<file>``); scratch folder → the coordinator's folder."""
    homes: dict[Path, Path] = {}
    for n, run in enumerate(prepared.runs):
        here = scratch / str(n) / run.ctx.out_dir.name
        here.parent.mkdir(parents=True)
        homes[here] = run.ctx.out_dir
        run.ctx.out_dir = here
    return homes


def _run_steps(runner: PipelineRunner, prepared: Prepared) -> None:
    """The CPU steps, the CPU part of the GPU steps and the GPU steps over the batch, as the local
    executor runs them (:meth:`~processor.executor.LocalExecutor.run_cpu_steps`, ``complete``); a
    bug outside any step fails the batch (``prepared.crash``)."""
    try:
        for item in prepared.opened:
            fault_point("study.started", item.arrival.name)
        gpu = runner.gpu_stage_start()
        runner.advance(prepared.runs, 0, gpu)
        runner.prepare_gpu_steps(prepared.runs)
        runner.advance(prepared.runs, gpu, len(runner.pipeline.steps))
    except Exception as exc:  # noqa: BLE001 — recorded by the coordinator for the whole batch
        log.exception("batch.crashed arrivals=%s", [item.arrival.id for item in prepared.opened])
        prepared.crash = f"internal error: {type(exc).__name__}: {exc}"
    prepared.gpu_done = True


def _collect(prepared: Prepared, homes: dict[Path, Path]) -> dict[str, dict[str, bytes]]:
    """The files steps wrote, by the coordinator's folder, and each study's folder put back."""
    files: dict[str, dict[str, bytes]] = {}
    for run in prepared.runs:
        here = run.ctx.out_dir
        home = homes[here]
        if here.is_dir():
            written = {p.name: p.read_bytes() for p in sorted(here.iterdir()) if p.is_file()}
            if written:
                files[str(home)] = written
        run.ctx.out_dir = home
    return files


def _slim(prepared: Prepared) -> None:
    """Drop what the recorder does not read before the batch goes back over the network: the
    studies' values (volumes, masks, decoded pixels) but :data:`~processor.executor.RECORDED_VALUES`, and the DICOM bytes
    their instances carried (``inputs: bytes``): each member becomes a readerless copy (its name,
    size and CRC-32, :func:`~processor.bytesource.readerless`); the parsed headers stay."""
    from processor.bytesource import readerless

    for run in prepared.runs:
        run.ctx.values = {k: v for k, v in run.ctx.values.items() if k in RECORDED_VALUES}
    studies = [s for item in prepared.opened for s in item.studies] + [r.ctx.study for r in prepared.runs]
    for study in studies:
        for series in study.series.values():
            _keep_first_header(series.instances)
            for instance in series.instances:
                instance.member = readerless(instance.member)


def _keep_first_header(instances: list[Any]) -> None:
    """Parse the first instance's header while its bytes are here: the coordinator copies the
    patient and study modules from it into the objects sent back to the PACS
    (:class:`processor.dicom.sendback.SourceStudy`). One that cannot be read is left as it is (the
    coordinator then says so)."""
    if instances:
        with contextlib.suppress(Exception):  # reported where it is needed, by the coordinator
            _ = instances[0].header
