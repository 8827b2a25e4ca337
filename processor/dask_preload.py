"""Make a plain Dask worker a ctwatch worker (issue 19): ``dask worker tcp://host:8786 --resources
GPU=1 --nthreads 1 --memory-limit 0 --preload processor.dask_preload``.

Dask imports this module in the worker process and calls :func:`dask_setup` before the worker
registers with the scheduler, so no batch reaches it before its plugin is in place. The worker's
settings (root, weights, models, device) come from the file named by ``CTWATCH_CONFIG`` (default:
``config/default.yaml`` of this checkout), resolved like the daemon's; its device from the file's
``device`` like the daemon's (:func:`processor.daemon.resolve_device_name`: ``device: cuda`` without
CUDA is a :class:`~processor.errors.ConfigError`, never a silent CPU fallback), or from
``CTWATCH_DEVICE`` when set (``python run.py worker --gpu N`` sets ``cuda:0``).

``python run.py worker`` (:mod:`processor.dask_workercmd`) starts its worker process through this
module too and sets ``CTWATCH_WORKER_COMMAND``: then the worker process leaves SIGTERM and SIGINT
to that command (a terminal's Ctrl-C reaches both), which drains it through :data:`DRAIN_HANDLER`
(:func:`drain`) and then closes it.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_CONFIG = "CTWATCH_CONFIG"
ENV_DEVICE = "CTWATCH_DEVICE"
ENV_COMMAND = "CTWATCH_WORKER_COMMAND"
DRAIN_HANDLER = "ctwatch_drain"  # the worker's RPC: drain(seconds) → what was handed back
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"  # processor.cli.setup_logging's
RESULT_WAIT_SECONDS = 10.0  # after the last batch: how long its result may wait for the coordinator
POLL_SECONDS = 0.1


def own_log_format() -> None:
    """Dask's own log lines in the project's format: ``distributed`` gives its loggers handlers of
    their own (``propagate`` off) when it is imported; their formatter becomes ours."""
    from processor.cli import OneLineFormatter

    fmt = OneLineFormatter(LOG_FORMAT)
    for name in ("distributed", "distributed.client", "distributed.gc", "tornado", "tornado.application"):
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(fmt)


async def dask_setup(worker: Any) -> None:
    """Dask's preload hook: logging, then the ctwatch plugin
    (:class:`~processor.dask_worker.CtwatchPlugin`) with this worker's settings and device.

    A bad config file or a device this machine lacks (:class:`~processor.errors.ConfigError`): the
    reason is logged with its fix and the worker process ends with status 2 — Dask would log a
    failed preload and start the worker anyway, without its plugin. Under a nanny, ``dask worker``
    then exits 1 ("Nanny failed to start"); with ``--no-nanny``, 2."""
    from processor.cli import setup_logging
    from processor.config import default_config_path, load_settings
    from processor.daemon import resolve_device_name
    from processor.dask_worker import CtwatchPlugin
    from processor.errors import ConfigError

    setup_logging(None)
    own_log_format()
    config = Path(os.environ.get(ENV_CONFIG) or default_config_path())
    try:
        settings = load_settings(config)
        logging.getLogger().setLevel(settings.log_level)
        device = os.environ.get(ENV_DEVICE) or resolve_device_name(settings.device)
    except ConfigError as exc:
        log.error("worker.config_error config=%s: %s", config, exc)
        logging.shutdown()
        os._exit(2)
    await worker.plugin_add(plugin=CtwatchPlugin(settings, device), catch_errors=False)
    if os.environ.get(ENV_COMMAND):
        _leave_stopping_to_the_command(worker)
    log.info("worker.plugin_ready name=%s device=%s config=%s", worker.name, device, settings.config_file)


def _leave_stopping_to_the_command(worker: Any) -> None:
    """Under ``run.py worker``: SIGTERM/SIGINT are its to handle (this process ends when its nanny
    tells it, or on its own when the nanny's process is gone); it drains this worker through the
    :data:`DRAIN_HANDLER` RPC."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def ctwatch_drain(seconds: float) -> dict[str, Any]:
        return await drain(worker, seconds)

    worker.handlers[DRAIN_HANDLER] = ctwatch_drain


async def drain(worker: Any, seconds: float) -> dict[str, Any]:
    """Take ``worker`` out of the cluster without losing or charging work; the caller closes it.

    1. The worker takes no new batch: status ``closing_gracefully`` (the scheduler sends it no new
       task; the worker starts none of those queued on it).
    2. The batch running here finishes, for up to ``seconds``.
    3. Its result waits up to :data:`RESULT_WAIT_SECONDS` for the coordinator to fetch it.
    4. The scheduler retires the worker (``retire_workers``, as ``dask``'s own graceful retirement):
       a result still held here is copied to another worker, and the batches queued here (and one
       still running after ``seconds``) go to other workers as if never started — Dask does not
       count a retired worker's tasks towards ``allowed-failures``.

    When no other worker can take a result still held here, Dask refuses the retirement
    (``retired`` False); the worker then closes as a lost one: its batches run again elsewhere and
    count once towards ``allowed-failures``.

    Returns ``{"running": …, "queued": …, "retired": …}``: batches still running after ``seconds``
    and batches queued, both handed back, and whether the retirement went through.
    """
    import asyncio  # here: every ctwatch command imports this module's names (0.08 CPU-s)

    from distributed.core import Status

    log.info(
        "worker.draining name=%s running=%d seconds=%g", worker.name, len(worker.state.executing), seconds
    )
    if worker.status in (Status.running, Status.paused):
        worker.status = Status.closing_gracefully
    deadline = time.monotonic() + seconds
    while worker.state.executing and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    running = len(worker.state.executing)
    queued = len(worker.state.ready) + len(worker.state.constrained)
    deadline = time.monotonic() + RESULT_WAIT_SECONDS
    while worker.data and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
    retired = await worker.scheduler.retire_workers(
        workers=[worker.address], close_workers=False, remove=True, stimulus_id=f"ctwatch-drain-{time.time()}"
    )
    summary = {"running": running, "queued": queued, "retired": worker.address in retired}
    log.info(
        "worker.drained name=%s handed_back_running=%d handed_back_queued=%d retired=%s",
        worker.name,
        running,
        queued,
        summary["retired"],
    )
    return summary
