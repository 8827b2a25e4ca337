"""Command line: ``run`` (the daemon, default), ``process``, ``status``, ``requeue``, ``resend``, ``check-config``, ``steps``, ``report``, ``weights``, ``export``, ``worker`` (a Dask worker).

Exit codes: 0 fine, 1 some input was rejected or failed, 2 bad configuration or pipeline.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import signal
import sys
import traceback
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from processor.config import Settings, default_config_path, load_settings
from processor.dask_workercmd import WORKER_COMMANDS, add_worker_parser
from processor.errors import ConfigError, WeightsError
from processor.fit.commands import FIT_COMMANDS, add_fit_parsers
from processor.hugepages import huge_pages_off_by_default
from processor.names import display_name, display_text

if TYPE_CHECKING:
    from processor.executor import LocalExecutor
    from processor.intake.register import Intake
    from processor.state import Arrival, State

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        type=Path,
        default=None,
        help="settings YAML (default: config/default.yaml of this checkout)",
    )
    parser = argparse.ArgumentParser(
        prog="ctwatch", parents=[common], description="Chest-CT DICOM inbox → per-study results."
    )
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", parents=[common], help="run the daemon until SIGTERM/SIGINT (default)")
    p = sub.add_parser("process", parents=[common], help="process ZIPs, folders or DICOM files once")
    p.add_argument("paths", nargs="+", type=Path)
    sub.add_parser("status", parents=[common], help="counts by state and the last 10 arrivals")
    p = sub.add_parser(
        "requeue",
        parents=[common],
        help="put a failed or quarantined arrival back in the queue (an ignored late series: analyse it "
        "as a new version of its study)",
    )
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("arrival_id", nargs="?", type=int)
    group.add_argument("--failed", action="store_true", help="requeue every failed arrival")
    p = sub.add_parser(
        "resend",
        parents=[common],
        help="send results or notifications again (rows of the send-back queue; works while the daemon runs)",
    )
    p.add_argument("ids", nargs="*", type=int, metavar="ID", help="delivery ids, as `status` lists them")
    p.add_argument("--failed", action="store_true", help="every failed delivery")
    p.add_argument(
        "--since",
        type=_moment,
        default=None,
        metavar="YYYY-MM-DD[THH:MM]",
        help="every sent or failed delivery queued since then (local time), e.g. after a PACS lost data "
        "(daily summaries are not sent again)",
    )
    p.add_argument(
        "--destination",
        default=None,
        metavar="NAME",
        help="with --failed or --since: only this destination's",
    )
    sub.add_parser("check-config", parents=[common], help="validate settings and pipeline, then exit")
    sub.add_parser("steps", parents=[common], help="list the registered pipeline steps and their parameters")
    p = sub.add_parser(
        "report", parents=[common], help="rebuild the Excel workbooks in reports.dir from the database"
    )
    p.add_argument(
        "--since",
        type=_date,
        default=None,
        metavar="YYYY-MM-DD",
        help="first day to rebuild (default: the first day with a finished study)",
    )
    p = sub.add_parser(
        "weights", parents=[common], help="list the model files the pipeline needs and their status"
    )
    p.add_argument("--verify", action="store_true", help="also compare sha256 checksums (reads every file)")
    p = sub.add_parser(
        "export",
        parents=[common],
        help="write stored features, latents (with provenance) and labels-ready study keys for a notebook",
    )
    p.add_argument(
        "--since", type=_date, required=True, metavar="YYYY-MM-DD", help="first day (studies processed since)"
    )
    p.add_argument(
        "--until", type=_date, default=None, metavar="YYYY-MM-DD", help="last day, included (default: no end)"
    )
    p.add_argument("--to", type=Path, required=True, metavar="DIR", help="folder to write into (created)")
    p.add_argument(
        "--format",
        choices=("npz", "parquet"),
        default="npz",
        help="npz: CSV tables + latents.npz (default); parquet: .parquet tables (needs pyarrow)",
    )
    add_fit_parsers(sub, common)
    add_worker_parser(sub, common)
    return parser


class OneLineFormatter(logging.Formatter):
    """One log line per record whatever its arguments hold: a name with a newline, a control
    character or bytes that are not UTF-8 is escaped (``\\n``, ``\\x1b``, ``\\xfc``), never split
    across lines or refused by the log file. A traceback, when there is one, follows as usual."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 — logging's name
        return display_text(super().formatMessage(record))

    def formatException(self, ei: Any) -> str:  # noqa: N802 — logging's name
        """The traceback as usual, but each exception's message escaped to one line: a message
        quoting a name with a newline (an OSError's file name) cannot forge a log line."""
        top = traceback.TracebackException(*ei)
        pending: list[traceback.TracebackException | None] = [top]
        seen: set[int] = set()
        while pending:
            te = pending.pop()
            if te is None or id(te) in seen:
                continue
            seen.add(id(te))
            message = getattr(te, "_str", None)  # what format_exception_only prints
            if isinstance(message, str):
                setattr(te, "_str", display_text(message))  # noqa: B010 — a private field, on purpose
            pending += [te.__cause__, te.__context__, *(getattr(te, "exceptions", None) or [])]
        return "".join(top.format()).rstrip("\n")


def setup_logging(settings: Settings | None, level: str = "INFO") -> None:
    root = logging.getLogger()
    if root.handlers:  # configured already (tests, or a second call)
        return
    fmt = OneLineFormatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(fmt)
    root.addHandler(handler)
    if settings is not None:
        settings.state.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.handlers.RotatingFileHandler(
            settings.state.parent / "ctwatch.log",
            maxBytes=20 * 2**20,
            backupCount=5,
            encoding="utf-8",
            errors="backslashreplace",
        )  # a traceback may still quote raw bytes of a name
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    huge_pages_off_by_default()  # before numpy allocates anything: see processor.hugepages
    args = _parser().parse_args(argv)
    command = args.command or "run"
    config_path = args.config or default_config_path()
    try:
        settings = load_settings(config_path)
        if command in ("run", "process"):  # one process per state, before anything is touched
            from processor.instance import InstanceLock

            args.instance_lock = InstanceLock(settings.state)
            args.instance_lock.acquire("daemon" if command == "run" else "process command")
        setup_logging(settings if command in ("run", "process") else None, settings.log_level)
        return COMMANDS[command](settings, args)
    except ConfigError as exc:
        print(f"ctwatch: configuration error\n{exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WeightsError as exc:
        print(f"ctwatch: weights error\n{exc}", file=sys.stderr)
        return EXIT_CONFIG


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from processor.daemon import Daemon, build, log_paths

    components = build(settings)
    log_paths(settings, components.pipeline, components.device)
    daemon = Daemon(components, lock=args.instance_lock)
    signals_seen = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Only set a flag: the main loop logs, drains and exits. A second signal exits at once;
        # SQLite transactions and atomic JSON writes keep state consistent, and a ``running``
        # row goes back to ``pending`` at the next start.
        signals_seen.append(signum)
        if len(signals_seen) > 1:
            import os

            os._exit(EXIT_FAILED)
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return daemon.run_until_stopped()


def cmd_process(settings: Settings, args: argparse.Namespace) -> int:
    """Each input in turn; one that fails in any way gets its line and the batch goes on.

    Paths are printed as display names (bytes that are not UTF-8 as ``\\xNN``).
    """
    from processor.daemon import build, log_paths

    lock = args.instance_lock  # taken in main(): exit 2 while a daemon or another `process` runs
    components = build(settings)
    log_paths(settings, components.pipeline, components.device)
    executor = components.executor(components.state)
    state = components.state
    capped: dict[str, Arrival] = {}  # inputs the crash cap just quarantined: reported, not tried again
    for row in state.recover_in_flight(settings.limits.max_attempts):  # what a killed run left
        log.warning("arrival.recovered arrival=%s state=%s crashes=%s", row.id, row.state, row.crashes)
        if row.state == "quarantined" and row.current_path:
            capped[row.current_path] = row
    executor.recorder.replay()
    code = EXIT_OK
    for path in args.paths:
        try:
            ok = _process_one(path, components.intake, state, executor, capped)
        except Exception as exc:  # noqa: BLE001 — one bad input never stops the batch; logged once here
            log.exception("process.input_failed path=%s", display_name(path))
            reason = display_text(f"internal error: {type(exc).__name__}: {exc}")
            print(f"{display_name(path)}\tfailed\t{reason}", file=sys.stderr)
            ok = False
        code = code if ok else EXIT_FAILED
    state.close()
    lock.release()
    return code


def _process_one(
    path: Path,
    intake: Intake,
    state: State,
    executor: LocalExecutor,
    capped: dict[str, Arrival] | None = None,
) -> bool:
    """Register and run one input, printing its lines; False when it was rejected or failed.

    ``capped``: inputs (by path) that crashed the process ``limits.max_attempts`` times in earlier
    runs and were just quarantined by the recovery: reported, not run again in this one.
    """
    from processor.intake.inbox import sha256_of

    shown = display_name(path)
    if not path.exists():
        print(f"{shown}: not found", file=sys.stderr)
        return False
    stopped = (capped or {}).get(str(path.resolve()))
    if stopped is not None:
        print(f"{shown}\tquarantined\t{display_text(stopped.error or '')}", file=sys.stderr)
        return False
    if path.is_file():  # a killed run left these bytes pending: finish that arrival, no second row
        pipeline = executor.pipeline
        candidates = state.unfinished_copies(path.stat().st_size, pipeline.name, pipeline.version)
        try:
            sha256 = sha256_of(path)[0] if candidates else None
        except OSError:  # unreadable: accept_in_place below refuses it with the plain reason
            candidates, sha256 = [], None
        for pending in candidates:
            if pending.sha256 == sha256:
                return _run_arrival(shown, pending.id, state, executor)
    aid = intake.accept_in_place(path)
    if aid is None:
        print(f"{shown}\trejected\tnot recorded; see the receipt in outbox/receipts", file=sys.stderr)
        return False
    arrival = state.arrival(aid)
    if arrival.state == "duplicate":  # only of an arrival with a full result (see register_arrival)
        studies = state.studies_for(arrival.duplicate_of or 0)
        for study in studies:
            print(
                f"{shown}\t{study['study_uid']}\t{study['status']}\t{study['json_path']}\t"
                f"(duplicate of arrival {arrival.duplicate_of})"
            )
        if not studies:  # never expected; still one line for the input
            print(f"{shown}\tduplicate\t(duplicate of arrival {arrival.duplicate_of})")
        return True
    if arrival.state == "quarantined":
        print(
            f"{shown}\tquarantined\t{display_text(arrival.error or '')}{_retry_note(arrival)}",
            file=sys.stderr,
        )
        return False
    return _run_arrival(shown, aid, state, executor)


def _run_arrival(shown: str, aid: int, state: State, executor: LocalExecutor) -> bool:
    claimed = state.claim(aid)
    if claimed is None:
        print(f"{shown}: arrival {aid} was taken by a running daemon; see `status`", file=sys.stderr)
        return True
    from processor.errors import os_error_words
    from processor.executor_read import EarlierPartFault

    try:
        final = executor.process_many([claimed])[0]
    except EarlierPartFault as exc:  # not the input's fault: back to the queue, uncharged
        executor.recorder.release(claimed)
        state.release(aid)
        print(
            f"{shown}\tpending\tan earlier part of its study could not be read ({os_error_words(exc)}); "
            "it stays in the queue, uncharged: process it again once the disk answers",
            file=sys.stderr,
        )
        return False
    if final in ("duplicate", "ignored"):  # a late series with nothing new in it, or not analysed
        row = state.arrival(aid)
        why = f"duplicate of arrival {row.duplicate_of}: nothing new in it" if row.duplicate_of else row.error
        print(f"{shown}\t{final}\t{display_text(why or '')}")
        return True
    ok = final == "done"
    retry = _retry_note(claimed)
    for study in state.studies_for(aid):
        kept = study["superseded_by"]  # a version that lacks images of the current one and came out worse
        note = f"\t(not current: the result of arrival {kept} stays the study's current one)" if kept else ""
        print(f"{shown}\t{study['study_uid']}\t{study['status']}\t{study['json_path']}{retry}{note}")
        ok = ok and study["status"] != "Failure"
    if final != "done":
        print(f"{shown}\t{final}\t{display_text(state.arrival(aid).error or '')}{retry}", file=sys.stderr)
    return ok


def _retry_note(arrival: Arrival) -> str:
    """``\t(fresh attempt after arrival N)`` for bytes whose earlier arrival gave no full result."""
    return f"\t(fresh attempt after arrival {arrival.retry_of})" if arrival.retry_of is not None else ""


def _state_for_reading(settings: Settings, what: str) -> State:
    """A read-only :class:`State` on the configured database, its schema first brought up to date
    (:func:`processor.state.upgrade.bring_up_to_date`: under the state lock, never while another
    ctwatch holds it; ``ConfigError`` with the fix when it cannot be)."""
    from processor.state import State
    from processor.state.upgrade import bring_up_to_date

    bring_up_to_date(settings.state, what)
    return State(settings.state, readonly=True)


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from processor.state import State

    if not settings.state.exists():
        print(f"no state yet at {settings.state}: the daemon has not run with this config")
        return EXIT_OK
    try:
        state = _state_for_reading(settings, "status")
    except ConfigError as exc:  # an older ctwatch runs on it: show what can be shown, and why not more
        print(f"note: {exc}", file=sys.stderr)
        state = State(settings.state, readonly=True)
    _print_executor(settings)
    counts = state.counts_by_state()
    print("arrivals by state: " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"))
    print(f"{'id':>6}  {'state':<11} {'attempts':>8}  {'received':<25} name / reason")
    for row in state.arrivals(limit=10):
        reason = f"  — {row.error}" if row.error else ""
        lane = " [urgent]" if row.priority == "urgent" else ""
        print(
            f"{row.id:>6}  {row.state:<11} {row.attempts:>8}  {row.created_at:<25} {row.name}{lane}{reason}"
        )
    _print_sources(settings, state.sources())
    _print_deliveries(settings, state)
    state.close()
    return EXIT_OK


def _print_executor(settings: Settings) -> None:
    """The executor from the settings; Dask workers live only in the running daemon, not in the
    database this command reads, so it says where to see them."""
    from processor.status.cluster import executor_words

    print(f"executor: {executor_words(settings.executor.dask)}")
    if settings.executor.dask is not None:
        where = (
            "the running daemon lists them (name, device, models loaded, in flight, done) at /status "
            "and on its status page"
            if settings.status.enabled
            else "set status.enabled: true to see them (name, device, models loaded, in flight, done)"
        )
        print(f"Dask workers: {where}")


def _print_sources(settings: Settings, rows: list[dict]) -> None:
    """One line per configured URL source (and any still in the state), then its last error if any."""
    by_name = {row["name"]: row for row in rows}
    every = {s.name: s.every for s in settings.sources}
    names = [s.name for s in settings.sources] + sorted(set(by_name) - set(every))
    if not names:
        return
    print("sources:")
    for name in names:
        row = by_name.get(name, {})
        kind = row.get("kind") or next((s.kind for s in settings.sources if s.name == name), "?")
        interval = f"every {every[name]:g}s" if name in every else "not configured any more"
        print(
            f"  {name}  [{kind}, {interval}]  last poll {row.get('last_poll_at') or 'never'}  "
            f"last success {row.get('last_success_at') or 'never'}  polls={row.get('polls', 0)} "
            f"ok={row.get('successes', 0)} failed={row.get('failures', 0)} arrivals={row.get('arrivals', 0)}"
            + (
                f"  ({row['last_detail']})"
                if row.get("last_detail") and row["last_detail"] != "error"
                else ""
            )
        )
        if row.get("last_error"):
            recovered = (row.get("last_success_at") or "") > (row.get("last_error_at") or "")
            print(
                f"      last error {row['last_error_at']}{' (recovered since)' if recovered else ''}: "
                f"{row['last_error']}"
            )


def _print_deliveries(settings: Settings, state: State) -> None:
    """The "Send-back" block: per destination its counts, oldest waiting and last error; then the
    failed and waiting deliveries by id (what `resend` takes)."""
    from processor.status.words import duration_words

    configured = [d.name for d in settings.destinations] + [n.name for n in settings.notifications]
    summary = state.delivery_summary()
    names = configured + sorted(set(summary) - set(configured))
    if not names:
        return
    print("Send-back:")
    for name in names:
        d = summary.get(name, {})
        oldest = d.get("oldest_pending_seconds")
        note = "" if name in configured else "  (not configured any more)"
        print(
            f"  {name}  pending={d.get('pending', 0)} sent={d.get('sent', 0)} failed={d.get('failed', 0)}"
            + (f" superseded={d['superseded']}" if d.get("superseded") else "")
            + (f"  oldest pending {duration_words(oldest)}" if oldest is not None else "")
            + note
        )
        if d.get("last_error"):
            print(f"      last error {d['last_error_at']}: {d['last_error']}")
    rows = state.recent_deliveries(10)
    if rows:
        print(
            f"  {'id':>6}  {'state':<8} {'attempts':>8}  {'destination':<16} {'event':<10} {'arrival':>7}  last error"
        )
        for r in rows:
            print(
                f"  {r.id:>6}  {r.state:<8} {r.attempts:>8}  {r.destination:<16} {r.event:<10} "
                f"{r.arrival_id if r.arrival_id is not None else '—':>7}  {r.last_error or ''}"
            )
        print("  send again: python run.py resend ID [ID ...] | --failed | --since YYYY-MM-DD[THH:MM]")


def cmd_requeue(settings: Settings, args: argparse.Namespace) -> int:
    from processor.state import State

    if not settings.state.exists():  # never create a database just to find nothing in it
        if args.failed:
            print(f"requeued 0 failed arrival(s): no state database yet at {settings.state}")
            return EXIT_OK
        print(
            f"no arrival {args.arrival_id} in {settings.state}: that database does not exist yet "
            "(the daemon has not run with this config)",
            file=sys.stderr,
        )
        return EXIT_FAILED
    state = State(settings.state, timeout=settings.limits.database_busy_seconds)
    try:
        if args.failed:
            print(f"requeued {state.requeue_failed()} failed arrival(s)")
            return EXIT_OK
        return _requeue_one(state, settings.state, args.arrival_id)
    finally:
        state.close()


def _requeue_one(state: State, where: Path, arrival_id: int) -> int:
    """Requeue one failed, quarantined or ignored arrival; say plainly why not otherwise (exit 1)."""
    from processor.state.sqlitelib import NotFoundError

    try:
        arrival = state.arrival(arrival_id)
    except NotFoundError:
        print(
            f"no arrival {arrival_id} in {where}; `python run.py status` lists the latest arrivals",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if state.requeue(arrival_id):
        again = " (it is analysed as a new version of its study)" if arrival.state == "ignored" else ""
        print(f"arrival {arrival_id} ({arrival.name}): requeued{again}")
        return EXIT_OK
    if arrival.state in ("failed", "quarantined", "ignored"):  # its end is recorded, not yet moved
        why = f"is {arrival.state} but its input is still being moved; try again in a minute"
    else:
        why = f"is {arrival.state}, not failed, quarantined or ignored; nothing done"
    print(f"arrival {arrival_id} ({arrival.name}) {why}", file=sys.stderr)
    return EXIT_FAILED


def cmd_resend(settings: Settings, args: argparse.Namespace) -> int:
    """Set deliveries back to pending (attempts 0, next try now); the daemon's send-back threads
    take them within seconds. Exactly one of IDs, ``--failed`` or ``--since``."""
    from processor.state import DeliveryState, State

    if sum((bool(args.ids), args.failed, args.since is not None)) != 1:
        print(
            "resend takes delivery ids, or --failed, or --since YYYY-MM-DD[THH:MM] (one of them)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if not settings.state.exists():  # never create a database just to find nothing in it
        print(f"resent 0 deliveries: no state database yet at {settings.state}")
        return EXIT_OK if not args.ids else EXIT_FAILED
    configured = [d.name for d in settings.destinations] + [n.name for n in settings.notifications]
    if args.destination is not None and args.ids:
        print("--destination goes with --failed or --since, not with delivery ids", file=sys.stderr)
        return EXIT_CONFIG
    if args.destination is not None and args.destination not in configured:
        print(
            f"no destination or notification named {args.destination} in {settings.config_file or 'the config'}"
            f" (configured: {', '.join(configured) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    state = State(settings.state, timeout=settings.limits.database_busy_seconds)
    try:
        found = {i: state.delivery(i) for i in args.ids}
        unknown = [i for i, row in found.items() if row is None]
        waiting = [i for i, row in found.items() if row is not None and row.state == DeliveryState.PENDING]
        orphans = sorted({row.destination for row in found.values() if row is not None} - set(configured))
        count = state.resend(
            args.ids, failed=args.failed, since=args.since, destination=args.destination, among=configured
        )
    finally:
        state.close()
    if orphans:
        print(
            f"not resent: {', '.join(orphans)} is no longer in the config (add it back, restart ctwatch, "
            "then resend)",
            file=sys.stderr,
        )
    done = f"resent {count} deliver{'y' if count == 1 else 'ies'}"
    print(
        f"{done}: pending again; the daemon sends them within seconds (or when it next starts)"
        if count
        else f"{done}: none matched (only sent or failed deliveries are sent again)"
    )
    if waiting:
        print(f"already waiting to be sent (left as they are): {', '.join(map(str, waiting))}")
    if unknown:
        print(
            f"no delivery {', '.join(map(str, unknown))} in {settings.state}; `python run.py status` lists them",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return EXIT_FAILED if orphans else EXIT_OK


def cmd_check_config(settings: Settings, args: argparse.Namespace) -> int:
    from processor.daemon import resolve_device_name
    from processor.intake.poller import check_sources
    from processor.pipeline.spec import load_pipeline
    from processor.pipeline.step import StepEnv
    from processor.pipeline.weightfiles import weight_files_now
    from processor.steps import default_registry
    from processor.weights import pinned_sha256

    check_sources(settings)
    device = resolve_device_name(settings.device)
    env = StepEnv(settings.root, device, pinned_sha256=pinned_sha256(settings))
    pipeline = load_pipeline(settings.pipeline, default_registry(), env)
    print(f"config {settings.config_file}: OK (root {settings.root}, device {device})")
    print(f"pipeline {pipeline.name} v{pipeline.version}: OK, {len(pipeline.steps)} steps")
    for compiled in pipeline.steps:  # a model that cannot load is not a config error: the step fails
        why = weight_files_now(compiled.step).why
        if why is not None:
            effect = "the study is Partial" if compiled.spec.optional else "the study fails"
            print(f"warning: step {compiled.id} will fail on every study ({effect}): {why}")
    return EXIT_OK


def cmd_steps(settings: Settings, args: argparse.Namespace) -> int:
    from processor.steps import default_registry

    for name, cls in default_registry().items():
        print(f"{name}  [{cls.device}] — {cls.summary}")
        optional = f" (optional: {', '.join(map(str, cls.optional_needs))})" if cls.optional_needs else ""
        print(
            f"    needs: {', '.join(map(str, cls.needs)) or '-'}{optional}; "
            f"provides: {', '.join(map(str, cls.provides)) or '-'}"
        )
        for field, info in cls.Params.model_fields.items():
            value = "(required)" if info.is_required() else repr(info.get_default(call_default_factory=True))
            print(f"    with.{field} = {value}  {info.description or ''}".rstrip())
    return EXIT_OK


def cmd_weights(settings: Settings, args: argparse.Namespace) -> int:
    from processor.weights import exit_code, format_table, weight_table

    table = weight_table(settings, verify=args.verify)
    print(format_table(table.rows, settings, args.verify, table.on_missing_weights))
    return exit_code(table.rows)


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date; write YYYY-MM-DD, e.g. 2025-01-31"
        ) from exc


def _moment(text: str) -> datetime:
    """``YYYY-MM-DD`` or ``YYYY-MM-DDTHH:MM`` in the server's local time, as an aware datetime."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a date or time; write YYYY-MM-DD or YYYY-MM-DDTHH:MM, e.g. 2025-01-31T08:00"
        ) from exc
    return moment if moment.tzinfo is not None else moment.astimezone()


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from processor.outputs.report import Reports

    if not settings.state.exists():
        print(f"no state yet at {settings.state}: nothing to report")
        return EXIT_OK
    state = _state_for_reading(settings, "report")
    try:
        outcomes = Reports(state, settings.reports).rebuild(args.since, date.today())
    finally:
        state.close()
    code = EXIT_OK
    for outcome in outcomes:
        if outcome.pending:
            code = EXIT_FAILED
            where = f"wrote {outcome.path}" if outcome.path else "nothing written"
            print(
                f"{outcome.target}: {outcome.reason}; {where}. Close the file and run this again.",
                file=sys.stderr,
            )
        else:
            print(outcome.path)
    return code


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from processor.outputs.export import ExportError, export

    if not settings.state.exists():
        print(f"no state yet at {settings.state}: nothing to export", file=sys.stderr)
        return EXIT_FAILED
    state = _state_for_reading(settings, "export")
    try:
        done = export(state, args.to, since=args.since, until=args.until, fmt=args.format)
    except ExportError as exc:
        print(f"ctwatch: export refused\n{exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        state.close()
    for name, rows in done.rows.items():
        print(f"{done.folder / name}\t{rows} row(s)")
    print(done.folder / "manifest.json")
    return EXIT_OK


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "run": cmd_run,
    "process": cmd_process,
    "status": cmd_status,
    "requeue": cmd_requeue,
    "resend": cmd_resend,
    "check-config": cmd_check_config,
    "steps": cmd_steps,
    "report": cmd_report,
    "weights": cmd_weights,
    "export": cmd_export,
    **FIT_COMMANDS,
    **WORKER_COMMANDS,
}
