"""``python run.py worker --scheduler tcp://host:8786 [--gpu N]``: one ctwatch GPU worker on a Dask
scheduler (issue 19).

It runs a :class:`distributed.Nanny` — what ``dask worker`` runs too — whose worker process declares
``resources={"GPU": 1}`` (one batch at a time) and, through :mod:`processor.dask_preload`, gets the
ctwatch plugin, which keeps the pipeline and its models loaded for the life of the worker process.
The nanny starts the worker process again when it dies (out of memory, a fault in native code), so
the machine keeps its worker; Dask runs the batch it held again on a worker and, once a batch has
killed more than ``distributed.scheduler.allowed-failures`` workers, fails it with ``KilledWorker``,
which the coordinator quarantines (:mod:`processor.executor_dask`).

``--gpu N`` sets ``CUDA_VISIBLE_DEVICES=N`` before torch is imported; the worker then runs on
``cuda:0``, the one card it sees. Without it the device is the config's ``device``, resolved as the
daemon resolves it. The worker's settings (root, weights, models) come from its own ``--config``.

Stopping: the first SIGTERM or SIGINT drains the worker (:func:`processor.dask_preload.drain`: the
batch running finishes, those queued go back to the scheduler uncharged), closes it and exits 0; a
second one closes it at once and exits 1 (Dask then runs the running batch again elsewhere and
counts the lost worker towards ``allowed-failures``). The worker process ignores both signals: a
terminal's Ctrl-C, which reaches both processes, or systemd's stop, which signals the whole
control group, is handled here once.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from processor.dask_preload import DRAIN_HANDLER, ENV_COMMAND, ENV_CONFIG, ENV_DEVICE, LOG_FORMAT

if TYPE_CHECKING:
    import asyncio

    from processor.config import Settings

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED = 0, 1
STOP_MARGIN_SECONDS = 30.0  # beyond the drain: retiring and closing the worker process


def _scheduler(text: str) -> str:
    if not re.fullmatch(r"(tcp|tls)://[^\s/]+:[0-9]+", text):
        raise argparse.ArgumentTypeError(f"{text!r}: write the scheduler's address as tcp://host:8786")
    return text


def add_worker_parser(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "worker",
        parents=[common],
        help="run one Dask worker for a daemon with executor: {dask: {scheduler: …}} until SIGTERM/SIGINT",
    )
    p.add_argument(
        "--scheduler", type=_scheduler, required=True, metavar="tcp://HOST:PORT", help="the Dask scheduler"
    )
    p.add_argument(
        "--gpu",
        type=int,
        default=None,
        metavar="N",
        help="run on GPU N only (sets CUDA_VISIBLE_DEVICES=N; the device is then cuda:0); "
        "default: the config's device",
    )
    p.add_argument(
        "--name",
        default=None,
        help="the worker's name in status and logs (default: <host>-gpu<N> or <host>-cpu)",
    )
    p.add_argument(
        "--nthreads", type=int, default=1, help="task threads (default 1; a worker runs one batch at a time)"
    )
    p.add_argument(
        "--memory-limit",
        default="0",
        help="Dask's memory limit for the worker process (e.g. 48GB): at 80%% of it the worker "
        "pauses, at 95%% the nanny restarts it. Default 0: none — the models stay resident and count "
        "as used memory (the system's OOM killer still applies)",
    )
    p.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        metavar="N",
        help="threads of numpy's and torch's math libraries in the worker (default: the cores this "
        "command may use, or OMP_NUM_THREADS when set); lower it when one machine runs a worker per card",
    )
    p.add_argument(
        "--drain-seconds",
        type=float,
        default=600.0,
        help="on SIGTERM/SIGINT, how long the running batch may take to finish (default 600)",
    )


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    """Pin the GPU, resolve the device (ConfigError: exit 2), then run the nanny until stopped."""
    if args.gpu is not None:
        if args.gpu < 0:
            from processor.errors import ConfigError

            raise ConfigError(f"--gpu {args.gpu}: give a GPU index as nvidia-smi lists it (0, 1, …)")
        if "torch" in sys.modules:  # pragma: no cover - the CLI imports no torch before this
            raise RuntimeError("CUDA_VISIBLE_DEVICES must be set before torch is imported")
        os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    from processor.config import usable_cores
    from processor.daemon import resolve_device_name

    device = resolve_device_name("cuda:0" if args.gpu is not None else settings.device)
    host = socket.gethostname()
    name = args.name or (
        f"{host}-gpu{args.gpu}" if args.gpu is not None else f"{host}-{device.replace(':', '')}"
    )
    # Dask's log lines in the project's format from the first one, here and in the worker process
    # (which inherits this environment); read when Dask is imported, so before that.
    os.environ.setdefault("DASK_DISTRIBUTED__ADMIN__LOG_FORMAT", LOG_FORMAT)
    env = {ENV_CONFIG: str(settings.config_file), ENV_DEVICE: device, ENV_COMMAND: "1"}
    if args.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    # Dask's nanny sets these to 1 in the worker process: CPU steps and CPU inference on one core
    threads = str(args.cpu_threads) if args.cpu_threads else None
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[variable] = threads or os.environ.get(variable) or str(usable_cores())
    log.info(
        "worker.starting name=%s scheduler=%s device=%s config=%s",
        name,
        args.scheduler,
        device,
        settings.config_file,
    )
    import asyncio  # here: every ctwatch command imports this module for its parser (0.08 CPU-s)

    return asyncio.run(_serve(args, name, env))


async def _serve(args: argparse.Namespace, name: str, env: dict[str, str]) -> int:
    import asyncio

    import dask

    from processor.dask_cluster import QUIET, worker_environ
    from processor.dask_preload import own_log_format

    own_log_format()
    signals: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, signals.put_nowait, signum)
    # as in a LocalCluster worker (MALLOC_TRIM_THRESHOLD_ unset, Dask's periodic work made rarer);
    # the thread counts come from ``env``
    with dask.config.set({**QUIET, "distributed.nanny.pre-spawn-environ": worker_environ(1)}):
        nanny = _nanny(args, name, env)
    stop = asyncio.ensure_future(signals.get())
    start = asyncio.ensure_future(nanny.start())
    await asyncio.wait({stop, start}, return_when=asyncio.FIRST_COMPLETED)
    if not start.done():  # stopped while starting: nothing runs yet, nothing to drain
        start.cancel()
        await nanny.close(reason="ctwatch-stop-while-starting")
        log.info("worker.stopped name=%s (before it started)", name)
        return EXIT_OK
    failed = start.exception()
    if failed is not None:  # e.g. no scheduler at that address (Dask gives up after its connect timeout)
        stop.cancel()
        why = f"{failed} {failed.__cause__}" if failed.__cause__ else str(failed)
        log.error("worker.failed name=%s scheduler=%s: %s", name, args.scheduler, why)
        await nanny.close(reason="ctwatch-start-failed")
        return EXIT_FAILED
    log.info("worker.started name=%s address=%s pid=%s", name, nanny.worker_address, nanny.pid)
    finished = asyncio.ensure_future(nanny.finished())
    await asyncio.wait({stop, finished}, return_when=asyncio.FIRST_COMPLETED)
    if finished.done():  # closed from outside: the scheduler retired it, or shut the cluster down
        stop.cancel()
        log.info("worker.stopped name=%s (closed by the scheduler)", name)
        return EXIT_OK
    return await _stop(nanny, name, stop.result(), signals, args.drain_seconds, finished)


def _nanny(args: argparse.Namespace, name: str, env: dict[str, str]) -> Any:
    from distributed import Nanny

    return Nanny(
        args.scheduler,
        name=name,
        nthreads=args.nthreads,
        resources={"GPU": 1},
        memory_limit=args.memory_limit,
        preload=["processor.dask_preload"],
        env=env,
        dashboard=False,
    )


async def _stop(
    nanny: Any,
    name: str,
    signum: int,
    signals: asyncio.Queue[int],
    drain_seconds: float,
    finished: asyncio.Future[Any],
) -> int:
    """Drain the worker process (:func:`processor.dask_preload.drain`), then close it and the nanny;
    a second signal, or a drain that does not end in time, closes them at once (0 / 1)."""
    import asyncio

    log.info("worker.stopping name=%s signal=%s: draining (a second signal stops it at once)", name, signum)
    drain = asyncio.ensure_future(_drain(nanny, drain_seconds))
    again = asyncio.ensure_future(signals.get())
    await asyncio.wait(
        {drain, again, finished},
        timeout=drain_seconds + STOP_MARGIN_SECONDS,
        return_when=asyncio.FIRST_COMPLETED,
    )
    drained = drain.done() and not drain.cancelled() and drain.exception() is None
    if not drained:
        why = (
            "second signal"
            if again.done()
            else "the worker process ended"
            if finished.done()
            else f"no answer to the drain: {drain.exception()}"
            if drain.done()
            else "drain did not end in time"
        )
        log.warning("worker.stopping_now name=%s reason=%s", name, why)
    for future in (drain, again):
        future.cancel()
    await nanny.close(timeout=10, reason="ctwatch-stop" if drained else "ctwatch-stop-now")
    log.info("worker.stopped name=%s", name)
    return EXIT_OK if drained else EXIT_FAILED


async def _drain(nanny: Any, seconds: float) -> Any:
    async with nanny.rpc(nanny.worker_address) as worker:
        return await getattr(worker, DRAIN_HANDLER)(seconds=seconds)


WORKER_COMMANDS = {"worker": cmd_worker}
