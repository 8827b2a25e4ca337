"""The durable queue in a real SQLite file."""

from __future__ import annotations

from pathlib import Path

from processor.state import State
from processor.vocab import ArrivalState


def _register(state: State, sha: str = "a" * 64, version: int = 1) -> int:
    return state.register_arrival(
        kind="inbox",
        name="x.zip",
        original_path="/in/x.zip",
        current_path="/in/x.zip",
        sha256=sha,
        size=1,
        pipeline_name="p",
        pipeline_version=version,
    ).arrival_id


def test_same_bytes_same_pipeline_is_duplicate(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    first = _register(state)
    second = state.register_arrival(
        kind="inbox",
        name="y.zip",
        original_path="/in/y.zip",
        current_path="/in/y.zip",
        sha256="a" * 64,
        size=1,
        pipeline_name="p",
        pipeline_version=1,
    )
    assert second.duplicate_of == first
    assert state.arrival(second.arrival_id).state == "duplicate"
    bumped = _register(state, version=2)
    assert state.arrival(bumped).state == "pending"  # a new pipeline version reprocesses


def test_failed_original_does_not_make_a_duplicate(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    first = _register(state)
    state.claim_next(allow_night=True)
    state.finish_arrival(first, "failed", error="boom")
    again = _register(state)
    assert state.arrival(again).state == "pending" and state.arrival(again).retry_of == first


def test_crash_recovery_charges_the_arrival_alone_and_quarantines_it_at_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    state = State(path)
    aid = _register(state)
    for attempt in (1, 2):
        claimed = state.claim_next(allow_night=True)
        assert claimed.id == aid and claimed.attempts == attempt
        state.close()
        state = State(path)  # "restart"
        state.recover_in_flight(max_crashes=3)
        row = state.arrival(aid)
        assert (row.state, row.crashes, row.isolate) == ("pending", attempt, False)
    state.claim_next(allow_night=True)
    state.recover_in_flight(max_crashes=3)
    row = state.arrival(aid)
    assert row.state == "quarantined" and row.crashes == 3 and not row.placed
    assert "crashed the worker 3 times" in (row.error or "") and "requeue" in (row.error or "")
    assert [a.id for a, _ in state.unplaced()] == [aid], (
        "its move and receipt are left to the recorder's replay"
    )
    state.mark_placed(aid, None)
    assert state.requeue(aid) and state.arrival(aid).state == "pending"


def test_crash_with_several_in_flight_charges_none_and_isolates_the_running(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    first, second, waiting = (_register(state, sha=f"{i}" * 64) for i in range(3))
    assert state.claim(first) is not None and state.claim(second) is not None
    assert state.prepare(waiting) is not None  # in the prefetch queue, not started
    state.recover_in_flight(max_crashes=1)
    rows = {aid: state.arrival(aid) for aid in (first, second, waiting)}
    assert all(r.state == "pending" and r.crashes == 0 for r in rows.values())
    assert (rows[first].isolate, rows[second].isolate, rows[waiting].isolate) == (True, True, False)
    assert state.peek_next(None).id == first


def test_day_queue_first_and_night_gate(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    night = state.register_arrival(
        kind="night",
        name="n",
        original_path="n",
        current_path="n",
        sha256="n" * 64,
        size=1,
        pipeline_name="p",
        pipeline_version=1,
        night=True,
    ).arrival_id
    day = _register(state, sha="d" * 64)
    assert state.claim_next(allow_night=False).id == day
    assert state.claim_next(allow_night=False) is None
    assert state.claim_next(allow_night=True).id == night


def test_readonly_connection_cannot_write(tmp_path: Path) -> None:
    import sqlite3

    import pytest

    State(tmp_path / "s.db").close()
    ro = State(tmp_path / "s.db", readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        ro.db.execute("delete from arrivals")


def test_crash_while_another_end_was_being_placed_charges_nobody(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    finishing, running = _register(state, sha="1" * 64), _register(state, sha="2" * 64)
    assert state.claim(finishing) is not None and state.claim(running) is not None
    state.finish(finishing, ArrivalState.DONE, error=None, final_path=None, receipt_path="r", receipt={})
    state.recover_in_flight(max_crashes=1)  # the process died while the first was being placed
    row = state.arrival(running)
    assert (row.state, row.crashes, row.isolate) == ("pending", 0, True)


def test_an_old_end_stuck_unplaced_does_not_switch_off_the_crash_cap(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    stuck, poison = _register(state, sha="1" * 64), _register(state, sha="2" * 64)
    assert state.claim(stuck) is not None
    state.finish(stuck, ArrivalState.DONE, error=None, final_path=None, receipt_path="r", receipt={})
    state.update_arrival(stuck, finished_at="2000-01-01T00:00:00+00:00")  # stuck long ago (an OS error)
    for _ in range(2):
        assert state.claim(poison) is not None
        state.recover_in_flight(max_crashes=2)
    assert state.arrival(poison).state == "quarantined"
