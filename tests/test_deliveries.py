"""The send-back queue on a real SQLite file: rows written in the one transaction of an arrival's end
(or not at all), retry with back-off and the destination held behind its oldest row, give-up,
resend, restarts; and the DeliveryService driving a real folder destination through an outage."""

from __future__ import annotations

import hashlib
import json
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from processor.config import FolderTarget, RetrySettings
from processor.delivery import DeliveryService, Route, backoff_seconds
from processor.delivery.folder import FolderSender
from processor.state import State
from processor.state.deliveries import Outbound, plain_error
from processor.status import Probes, collect_status, metrics_text, status_html
from processor.vocab import ArrivalState
from tests.conftest import Project
from tests.test_state import _register

UID = "1.2.826.0.1.3680043.99.555.1"
FAST = RetrySettings(first_seconds=1, max_seconds=3, give_up_after=10)


def _arrival(state: State, sha: str = "a" * 64) -> int:
    """An arrival registered (as tests/test_state.py does) and claimed."""
    arrival_id = _register(state, sha)
    assert state.claim(arrival_id) is not None
    return arrival_id


def _file(outbox: Path, name: str = "sr.dcm", data: bytes = b"DICM-ish bytes") -> dict:
    path = outbox / "2024-02-29" / UID / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {
        "kind": "sr",
        "path": f"2024-02-29/{UID}/{name}",
        "sop_instance_uid": "1.2.3.4",
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _row(destination: str, item: dict, arrival_id: int | None = None) -> Outbound:
    return Outbound(destination, "study", arrival_id, UID, (item,))


def _finish(state: State, arrival_id: int, outbound: list[Outbound]) -> None:
    state.finish(
        arrival_id,
        ArrivalState.DONE,
        error=None,
        final_path=None,
        receipt_path="r",
        receipt={},
        outbound=outbound,
    )


def test_rows_are_written_with_the_arrivals_end_or_not_at_all(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    item = _file(tmp_path / "outbox")
    broken = Outbound("pacs", "study", None, UID, ())  # no items: no sender could send it
    arrival = _arrival(state)
    with pytest.raises(ValueError, match="no items"):
        _finish(state, arrival, [_row("pacs", item, arrival), broken])
    assert state.arrival(arrival).state == "running", "the end is not recorded either"
    assert state.due(float("inf")) == []

    _finish(state, arrival, [_row("pacs", item, arrival), _row("archive", item, arrival)])
    assert state.arrival(arrival).state == "done"
    rows = state.due(float("inf"))
    assert [(r.destination, r.arrival_id, r.study_uid, r.state, r.attempts) for r in rows] == [
        ("pacs", arrival, UID, "pending", 0),
        ("archive", arrival, UID, "pending", 0),
    ]
    assert rows[0].items == (item,)
    (daily,) = state.enqueue(
        [Outbound("hook", "daily", None, None, ({"kind": "webhook", "payload": {"n": 1}},))]
    )
    assert state.delivery(daily) is not None and state.delivery(daily).arrival_id is None  # type: ignore[union-attr]
    with pytest.raises(ValueError):
        state.enqueue([Outbound("hook", "weekly", None, None, ({"kind": "webhook", "payload": {}},))])
    state.close()


def test_retry_holds_the_destination_then_fails_resends_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    state = State(path)
    item = _file(tmp_path / "outbox")
    first, second, other = state.enqueue(
        [_row("pacs", item), _row("pacs", item), _row("archive", item)], now=100.0
    )
    assert [r.id for r in state.due(100.0)] == [first, second, other]
    assert state.due(99.0) == [], "nothing is due before it was queued"

    state.mark_retry(first, "STOW-RS failed: connection refused", next_try_at=130.0, now=100.0)
    assert [r.id for r in state.due(129.0)] == [other], "pacs waits behind its oldest row; archive goes on"
    assert [r.id for r in state.due(130.0, destination="pacs")] == [first, second]
    held = state.delivery(second)
    assert held is not None and held.attempts == 0 and held.first_failed_at == 100.0
    assert state.next_try("pacs") == 130.0 and state.next_try("nowhere") is None

    assert state.mark_sent(other) and not state.mark_sent(other)
    state.mark_failed(first, "STOW-RS failed: HTTP 401 — check the token named in bearer_env")
    failed = state.delivery(first)
    assert failed is not None and (failed.state, failed.attempts) == ("failed", 2)
    assert failed.last_error is not None and "HTTP 401" in failed.last_error
    assert state.give_up_waiting("pacs", "not sent: pacs kept failing", failing_since=100.0) == 0, (
        "a row that only waited behind the failures gets a try of its own"
    )
    state.mark_retry(second, "STOW-RS failed: connection refused", next_try_at=200.0, now=150.0)
    assert state.give_up_waiting("pacs", "not sent: pacs kept failing", failing_since=100.0) == 1

    summary = state.delivery_summary(now=datetime.now(UTC).timestamp())
    assert summary["pacs"]["failed"] == 2 and summary["pacs"]["pending"] == 0
    assert summary["pacs"]["last_error"] == "not sent: pacs kept failing"
    assert summary["archive"] == {
        "pending": 0,
        "sent": 1,
        "failed": 0,
        "superseded": 0,
        "oldest_pending_seconds": None,
        "last_error": None,
        "last_error_at": None,
    }
    state.close()

    state = State(path)  # a restart: every row as it was
    assert {r.id: r.state for r in state.recent_deliveries()} == {first: "failed", second: "failed"}
    assert state.resend(failed=True, now=200.0) == 2
    again = state.delivery(first)
    assert again is not None and (again.state, again.attempts, again.first_failed_at) == ("pending", 0, None)
    assert again.next_try_at == 200.0 and again.last_error is not None, (
        "the last error stays until the next send"
    )
    assert state.resend([first, second]) == 0, "pending rows are left as they are"
    assert state.resend([other]) == 1, "a sent row may be sent again by id"
    state.mark_sent(other)
    assert state.resend(since=datetime.now(UTC) + timedelta(minutes=5)) == 0
    assert state.resend(since=datetime.now(UTC) - timedelta(minutes=5)) == 1, "only sent/failed ones"
    summary = state.delivery_summary(now=datetime.now(UTC).timestamp() + 60)
    assert summary["pacs"]["pending"] == 2 and summary["pacs"]["oldest_pending_seconds"] >= 59
    state.close()


def test_errors_are_stored_without_tokens_or_queries() -> None:
    text = plain_error(
        "HTTP 500 from https://user:pw@pacs.example.org/dicom-web/studies?X-Amz-Signature=deadbeef "
        "Authorization: Bearer abcdefghijklmnop\nsecond line"
    )
    assert text == (
        "HTTP 500 from https://pacs.example.org/dicom-web/studies Authorization: Bearer [hidden] second line"
    )
    assert plain_error("x" * 1000) is not None and len(plain_error("x" * 1000) or "") == 400


def test_backoff_doubles_up_to_its_cap() -> None:
    retry = RetrySettings(first_seconds=30, max_seconds=3600, give_up_after=86400)
    assert [backoff_seconds(retry, n) for n in (1, 2, 3, 8, 20)] == [30, 60, 120, 3600, 3600]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_service_retries_an_unwritable_folder_gives_up_and_sends_after_resend(tmp_path: Path) -> None:
    """A real folder destination whose path is blocked by a file (so even root cannot write there):
    retried with back-off (1, 2, 3, 3 s) while a second destination goes on; after give_up_after the
    row and the row waiting behind it end failed; unblocked and resent, both arrive, mode 0644."""
    outbox, blocked, good = tmp_path / "outbox", tmp_path / "blocked", tmp_path / "good"
    blocked.write_text("a file where the folder should be")
    item = _file(outbox)
    state = State(tmp_path / "s.db")
    clock = Clock()
    routes = {
        "archive": Route("archive", FolderSender(FolderTarget(path=blocked / "sub")), FAST),
        "copy": Route("copy", FolderSender(FolderTarget(path=good)), FAST),
    }
    service = DeliveryService(state, routes, outbox, clock=clock, poll_seconds=5)
    first, second, copied = state.enqueue(
        [_row("archive", item), _row("archive", item), _row("copy", item)], now=clock.now
    )
    state.enqueue([_row("gone", item)], now=clock.now)

    assert service.fail_unrouted() == 1
    assert service.run_pass("copy") == 5, "nothing left: look again after poll_seconds"
    assert (good / UID / "sr.dcm").read_bytes() == b"DICM-ish bytes"
    waits = []
    for _ in range(4):
        waits.append(service.run_pass("archive"))
        row = state.delivery(first)
        assert row is not None and row.state == "pending"
        clock.now += waits[-1]
    assert waits == [1, 2, 3, 3]
    assert row.attempts == 4 and row.last_error is not None
    assert row.last_error.startswith(
        "copy failed: the destination folder cannot be written (not a directory)"
    )
    assert state.delivery(second).attempts == 0  # type: ignore[union-attr]
    clock.now += 1  # 10 s since the first failure: give_up_after
    service.run_pass("archive")
    ended = state.delivery(first)
    assert (
        ended is not None
        and ended.state == "failed"
        and "gave up after 5 attempts" in (ended.last_error or "")
    )
    assert state.delivery(second).state == "pending", "it only waited: it gets one try of its own"
    service.run_pass("archive")  # it fails too, and its destination has been failing for 10 s
    waited = state.delivery(second)
    assert waited is not None and waited.state == "failed" and waited.attempts == 1
    summary = state.delivery_summary(clock.now)
    assert (summary["archive"]["failed"], summary["copy"]["sent"], summary["gone"]["failed"]) == (2, 1, 1)
    assert "no longer in the config" in (summary["gone"]["last_error"] or "")

    blocked.unlink()
    assert state.resend([first, second, copied], now=clock.now) == 3
    assert service.run_pass("archive") == 5 and service.run_pass("copy") == 5
    target = blocked / "sub" / UID / "sr.dcm"
    assert target.read_bytes() == b"DICM-ish bytes" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert {r.state for r in (state.delivery(i) for i in (first, second, copied)) if r} == {"sent"}
    state.close()


def test_a_changed_or_missing_file_fails_at_once_without_naming_it(tmp_path: Path) -> None:
    outbox = tmp_path / "outbox"
    changed, missing = _file(outbox, "key_1.dcm"), _file(outbox, "key_2.dcm")
    (outbox / changed["path"]).write_bytes(b"other bytes")
    (outbox / missing["path"]).unlink()
    state = State(tmp_path / "s.db")
    clock = Clock()
    routes = {"copy": Route("copy", FolderSender(FolderTarget(path=tmp_path / "copy")), FAST)}
    service = DeliveryService(state, routes, outbox, clock=clock)
    ids = state.enqueue([_row("copy", changed), _row("copy", missing)], now=clock.now)
    service.run_pass("copy")
    rows = [state.delivery(i) for i in ids]
    assert [(r.state, r.attempts) for r in rows if r] == [("failed", 1), ("failed", 1)]
    errors = [r.last_error or "" for r in rows if r]
    assert "changed after the study was recorded" in errors[0] and "no longer in the outbox" in errors[1]
    assert not any(UID in e or "key_" in e for e in errors)
    assert not (tmp_path / "copy").exists()
    state.close()


def test_status_metrics_and_page_show_the_queue_without_phi(tmp_path: Path) -> None:
    """/status, /metrics and the page name destinations by their config names and count rows; the
    last error is in words, with a planted URL query, token and UID removed."""
    state = State(tmp_path / "s.db")
    item = _file(tmp_path / "outbox")
    waiting, failed = state.enqueue([_row("pacs", item), _row("pacs", item)], now=0.0)
    state.mark_retry(
        waiting,
        f"STOW-RS failed for study {UID} at https://pacs.example.org/x?sig=SECRETSIG Bearer SECRETTOKEN99",
        next_try_at=60.0,
        now=0.0,
    )
    state.mark_failed(
        failed, "C-STORE failed: the DICOM node answered 0xA900 (Data Set Does Not Match SOP Class)"
    )
    state.close()
    reader = State(tmp_path / "s.db", readonly=True)
    probes = Probes(version="t", device="cpu", pipeline={}, destinations=lambda: ["pacs", "hook"])
    status = collect_status(probes, reader)
    assert status["deliveries"]["hook"] == {
        "pending": 0,
        "sent": 0,
        "failed": 0,
        "superseded": 0,
        "oldest_pending_seconds": None,
        "last_error": None,
        "last_error_at": None,
    }
    pacs = status["deliveries"]["pacs"]
    assert (pacs["pending"], pacs["failed"], pacs["sent"]) == (1, 1, 0)
    metrics = metrics_text(status, {})
    assert 'ctwatch_deliveries{destination="pacs",state="pending"} 1' in metrics
    assert 'ctwatch_deliveries{destination="pacs",state="failed"} 1' in metrics
    assert 'ctwatch_deliveries{destination="hook",state="sent"} 0' in metrics
    page = status_html(status)
    assert "Send-back" in page and "resend --failed" in page
    assert "<td>send-back</td><td>pacs: 0 sent, 1 waiting, 1 failed — last error:" in page, "at the top"
    every = json.dumps(status) + metrics + page
    for planted in (UID, "SECRETSIG", "SECRETTOKEN99", "sr.dcm", "2024-02-29"):
        assert planted not in every, planted
    reader.close()


def test_status_lists_the_queue_and_resend_sets_rows_back(tmp_path: Path) -> None:
    project = Project(tmp_path, destinations=[{"name": "copy", "folder": {"path": "copy"}}])
    project.state_path.parent.mkdir(parents=True)
    state = State(project.state_path)
    item = _file(project.outbox)
    waiting, failed = state.enqueue([_row("copy", item), _row("copy", item)])
    state.mark_failed(failed, "copy failed: the destination folder cannot be written (permission denied)")
    state.close()

    shown = project.run("status")
    assert shown.returncode == 0, shown.stderr
    block = shown.stdout[shown.stdout.index("Send-back:") :]
    assert "copy  pending=1 sent=0 failed=1" in block and "(permission denied)" in block
    assert f"{failed:>6}  failed" in block and f"{waiting:>6}  pending" in block

    resent = project.run("resend", str(failed), str(waiting), "999")
    assert resent.returncode == 1 and "resent 1 delivery" in resent.stdout
    assert f"already waiting to be sent (left as they are): {waiting}" in resent.stdout
    assert "no delivery 999" in resent.stderr
    state = State(project.state_path)
    assert {r.state for r in state.due(float("inf"))} == {"pending"} and len(state.due(float("inf"))) == 2
    state.close()
    assert project.run("resend").returncode == 2
    unknown = project.run("resend", "--failed", "--destination", "nosuch")
    assert unknown.returncode == 2 and "no destination or notification named nosuch" in unknown.stderr

    state = State(project.state_path)  # a row of a destination no longer configured is not resent
    (gone,) = state.enqueue([_row("gone", item)])
    state.mark_failed(gone, "the destination gone is no longer in the config")
    state.close()
    orphan = project.run("resend", str(gone))
    assert orphan.returncode == 1 and "not resent: gone is no longer in the config" in orphan.stderr
    assert "resent 0 deliveries" in orphan.stdout
