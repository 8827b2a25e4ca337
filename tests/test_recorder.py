"""The recorder: an arrival's end is recorded before anything moves, and a recorded end is finished
by the replay — in process, without killing anything (the kill -9 cases are in test_fault_points)."""

from __future__ import annotations

import json

from processor.config import load_settings
from processor.daemon import Components, build
from processor.vocab import ArrivalState
from tests.conftest import Project
from tests.dicomgen import make_series, write_zip


def _components(project: Project) -> Components:
    return build(load_settings(project.config))


def _quarantine(project: Project) -> list[str]:
    return sorted(p.name for p in (project.inbox / ".ctwatch" / "quarantine").iterdir())


def test_a_requeued_input_rejected_again_stays_where_it_is_with_one_note(project: Project) -> None:
    components = _components(project)
    path = project.inbox / "notes.zip"
    path.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty ZIP: no DICOM in it
    aid = components.intake.accept(path)
    assert aid is not None
    executor = components.executor()
    claimed = components.state.claim(aid)
    assert claimed is not None and executor.process(claimed) == ArrivalState.QUARANTINED
    assert _quarantine(project) == ["notes.zip", "notes.zip.error.txt"]
    assert components.state.requeue(aid)
    again = components.state.claim(aid)
    assert again is not None and executor.process(again) == ArrivalState.QUARANTINED
    assert _quarantine(project) == ["notes.zip", "notes.zip.error.txt"], "not renamed, no second note"
    row = components.state.arrival(aid)
    assert row.placed and row.current_path == str(project.inbox / ".ctwatch" / "quarantine" / "notes.zip")
    assert "no DICOM images found" in (row.error or "")
    components.state.close()


def test_an_end_recorded_but_not_placed_is_finished_by_the_replay(project: Project) -> None:
    components = _components(project)
    aid = components.intake.accept(write_zip(project.inbox / "study.zip", make_series(20)))
    assert aid is not None
    state = components.state
    recorder = components.recorder()
    arrival = state.claim(aid)
    assert arrival is not None
    # What a crash right after the transaction leaves: the end recorded, the input still in work/.
    receipt = {"arrival_id": aid, "name": "study.zip", "outcome": "accepted", "message": "1 study processed."}
    dest = project.inbox / ".ctwatch" / "done" / "2030-01-01" / "study.zip"
    state.finish(
        aid, ArrivalState.DONE, error=None, final_path=str(dest), receipt_path="unused", receipt=receipt
    )
    assert [a.id for a, _ in state.unplaced()] == [aid]
    assert aid not in {a.id for a in state.arrivals(state="pending")}
    assert recorder.replay() == [aid]
    row = state.arrival(aid)
    assert row.placed and row.current_path == str(dest) and dest.exists()
    assert not list((project.inbox / ".ctwatch" / "work").iterdir())
    written = json.loads(next((project.outbox / "receipts").glob("*.json")).read_text())
    assert written == receipt, "the receipt recorded in the transaction, not a new one"
    assert recorder.replay() == [], "nothing left to finish: the replay is idempotent"
    state.close()


def test_crash_quarantine_from_recovery_gets_its_place_note_and_receipt(project: Project) -> None:
    components = _components(project)
    aid = components.intake.accept(write_zip(project.inbox / "poison.zip", make_series(20)))
    assert aid is not None
    state = components.state
    for _ in range(3):  # claimed, and the process died with it alone in flight, three times
        assert state.claim(aid) is not None
        state.recover_in_flight(max_crashes=3)
    assert components.recorder().replay() == [aid]
    quarantine = project.inbox / ".ctwatch" / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == ["poison.zip", "poison.zip.error.txt"]
    assert "crashed the worker 3 times" in (quarantine / "poison.zip.error.txt").read_text()
    receipt = json.loads(next((project.outbox / "receipts").glob("*.json")).read_text())
    assert receipt["outcome"] == "rejected" and "crashed the worker 3 times" in receipt["message"]
    state.close()
