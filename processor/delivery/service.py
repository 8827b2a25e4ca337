"""The ``ctwatch-delivery-<name>`` threads: the send-back queue drained, one thread per destination.

Each configured destination and notification (a :class:`Route`: its name, its sender, its retry
settings) gets a thread of its own, so a PACS that is down or slow (a send waits up to its
``timeout_seconds``) never holds up another destination's rows. A thread takes its destination's
due rows oldest first (:meth:`~processor.state.deliveries.Deliveries.due`) and, per row:

* sent → ``sent`` (``delivery.sent``);
* a failure that may pass (:attr:`~processor.errors.SendFailed.retry`) → tried again after
  ``first_seconds * 2**(attempts-1)``, at most ``max_seconds`` (``delivery.retry``); the
  destination's other rows wait behind it (it is down: only its oldest row finds out when it is
  back; once a row is sent, the rows that waited are due at once); still failing ``give_up_after`` seconds after its destination began failing it → ``failed``,
  with the rows that waited as long;
* any other failure → ``failed`` at once (``delivery.failed``); ``python run.py resend`` takes it again.

A thread wakes when the ``wake`` event is set (:meth:`DeliveryService.notify`; the daemon hands in
``Components.outbound_wake``, which the recorder and intake set after queueing rows), when its next
retry is due, and at least every ``poll_seconds`` (rows queued by
another process: ``resend``). A bug or an unexpected error of one send is logged with its traceback
and ends that row ``failed`` (retried, it would hold the destination's other rows behind it); a database error ends the pass, not the thread. Log lines name the row
by id, destination and event only — never a file name or a UID.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from processor.config import RetrySettings, Settings
from processor.delivery.base import Sender
from processor.errors import SendFailed
from processor.faults import fault_point
from processor.state import State
from processor.state.deliveries import Delivery

log = logging.getLogger(__name__)

POLL_SECONDS = 5.0
BATCH = 20


@dataclass(frozen=True)
class Route:
    """Where one destination's rows go: its config ``name``, its sender and its back-off."""

    name: str
    sender: Sender
    retry: RetrySettings


def backoff_seconds(retry: RetrySettings, attempts: int) -> float:
    """Seconds before the next try after ``attempts`` failed sends: ``first_seconds * 2**(attempts-1)``,
    at most ``max_seconds``."""
    return float(min(retry.max_seconds, retry.first_seconds * 2 ** max(attempts - 1, 0)))


def routes_from_settings(settings: Settings) -> dict[str, Route]:
    """One route per ``destinations`` entry (by its kind) and per ``notifications`` entry (webhook)."""
    # each sender's client library is imported only when a destination of its kind is configured
    # (a daemon with none starts without dicomweb-client or pynetdicom; gpu_wheels.sh relies on it)
    allow = settings.fetch.allow_hosts
    routes: dict[str, Route] = {}
    for d in settings.destinations:
        sender: Sender
        if d.dicomweb is not None:
            from processor.delivery.dicomweb import DicomWebSender

            sender = DicomWebSender(d.dicomweb, allow)
        elif d.dimse is not None:
            from processor.delivery.dimse import DimseSender

            sender = DimseSender(d.dimse, allow)
        else:
            from processor.delivery.folder import FolderSender

            assert d.folder is not None
            sender = FolderSender(d.folder)
        routes[d.name] = Route(d.name, sender, d.retry)
    if settings.notifications:
        from processor.delivery.webhook import WebhookSender

        for n in settings.notifications:
            routes[n.name] = Route(n.name, WebhookSender(n, allow), n.retry)
    return routes


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds:.0f} s"


class DeliveryService:
    """The send-back threads (see the module docstring); a :class:`~processor.lifecycle.Lifecycle`."""

    def __init__(
        self,
        state: State,
        routes: Mapping[str, Route],
        outbox: Path,
        *,
        clock: Callable[[], float] = time.time,
        poll_seconds: float = POLL_SECONDS,
        wake: threading.Event | None = None,
    ) -> None:
        self.state = state
        self.routes = dict(routes)
        self.outbox = Path(outbox)
        self.clock = clock
        self.poll_seconds = poll_seconds
        self._stop = threading.Event()
        # set by notify() (or by whoever holds it: the recorder, intake); every thread waits on it
        self.wake = wake if wake is not None else threading.Event()
        self._threads: dict[str, threading.Thread] = {}

    # ------------------------------------------------------------------ any thread
    def notify(self) -> None:
        """Rows were queued: every destination's thread looks now. (The event is shared: a thread
        still sending when another clears it finds the new rows when it next looks at its queue —
        at once if they were queued before it did, else within ``poll_seconds``.)"""
        self.wake.set()

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        """Start each destination's thread that is not running (the supervisor calls it again when
        one died); rows of a destination no longer configured end ``failed``, saying so."""
        self._stop.clear()
        self.fail_unrouted()
        for name in self.routes:
            thread = self._threads.get(name)
            if thread is None or not thread.is_alive():
                thread = threading.Thread(
                    target=self._loop, args=(name,), name=f"ctwatch-delivery-{name}", daemon=True
                )
                self._threads[name] = thread
                thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.notify()

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads.values():
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0.0))

    def is_alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads.values())

    def running(self) -> bool:
        """Whether any of its threads still runs (after :meth:`stop`: a send under way)."""
        return any(t.is_alive() for t in self._threads.values())

    # ------------------------------------------------------------------ the work
    def fail_unrouted(self) -> int:
        """End ``failed`` the pending rows of destinations not in the config; returns how many."""
        count = 0
        for name in sorted(self.state.waiting_destinations() - set(self.routes)):
            for row in self.state.due(float("inf"), destination=name, limit=10_000):
                self.state.mark_failed(
                    row.id,
                    f"the destination {name} is no longer in the config: add it back, restart ctwatch, "
                    f"then `python run.py resend {row.id}`",
                    attempted=False,
                )
                log.warning(
                    "delivery.failed id=%d destination=%s event=%s reason=not configured",
                    row.id,
                    name,
                    row.event,
                )
                count += 1
        return count

    def run_pass(self, name: str) -> float:
        """Send the destination's due rows until one must wait; returns the seconds until it should
        look again (0: more rows are due now)."""
        route = self.routes[name]
        rows = self.state.due(self.clock(), destination=name, limit=BATCH)
        for row in rows:
            if self._stop.is_set():
                return self.poll_seconds
            if not self._deliver(route, row):
                break
        else:
            if len(rows) == BATCH:
                return 0.0
        next_try = self.state.next_try(name)
        if next_try is None:
            return self.poll_seconds
        return min(max(next_try - self.clock(), 0.0), self.poll_seconds)

    def _loop(self, name: str) -> None:
        while not self._stop.is_set():
            try:
                delay = self.run_pass(name)
            except Exception:  # the database busy or gone: this pass ends, the thread lives
                log.exception("delivery.pass_failed destination=%s", name)
                delay = self.poll_seconds
            if delay > 0 and self.wake.wait(delay):
                self.wake.clear()

    def _deliver(self, route: Route, row: Delivery) -> bool:
        """Send one row and record how it went; False when its destination must wait (retry)."""
        try:
            route.sender.send(row.items, self.outbox)
        except SendFailed as exc:
            failure = exc
        except Exception:  # a bug or a library's surprise: logged once here; never retried on its own
            # (retried, it would hold its destination's other rows behind it until give_up_after)
            log.exception("delivery.error id=%d destination=%s event=%s", row.id, route.name, row.event)
            failure = SendFailed(
                f"internal error while sending (see state/ctwatch.log); once fixed: python run.py resend {row.id}",
                retry=False,
            )
        else:
            fault_point("delivery.sent", route.name)
            self.state.mark_sent(row.id, now=self.clock())
            log.info(
                "delivery.sent id=%d destination=%s event=%s attempts=%d",
                row.id,
                route.name,
                row.event,
                row.attempts + 1,
            )
            return True
        now = self.clock()
        attempts = row.attempts + 1
        if not failure.retry:
            self.state.mark_failed(row.id, failure.reason)
            self._log_failed(route, row, attempts, failure.reason)
            return True
        began = row.first_failed_at if row.first_failed_at is not None else now
        give_up = route.retry.give_up_after
        if now - began >= give_up:
            reason = f"{failure.reason}; gave up after {attempts} attempts over {_span(now - began)}"
            self.state.mark_failed(row.id, reason)
            self._log_failed(route, row, attempts, reason)
            waited = self.state.give_up_waiting(
                route.name,
                f"not sent: {route.name} kept failing for {_span(give_up)} (give_up_after)",
                now - give_up,
            )
            if waited:
                log.warning(
                    "delivery.failed destination=%s rows=%d reason=gave up waiting", route.name, waited
                )
            return False  # the pass's rows are stale now: the next pass reads them again
        delay = backoff_seconds(route.retry, attempts)
        self.state.mark_retry(row.id, failure.reason, now + delay, now=now)
        log.warning(
            "delivery.retry id=%d destination=%s event=%s attempt=%d next_in=%.0fs reason=%r",
            row.id,
            route.name,
            row.event,
            attempts,
            delay,
            failure.reason,
        )
        return False

    @staticmethod
    def _log_failed(route: Route, row: Delivery, attempts: int, reason: str) -> None:
        log.warning(
            "delivery.failed id=%d destination=%s event=%s attempts=%d reason=%r",
            row.id,
            route.name,
            row.event,
            attempts,
            reason,
        )
