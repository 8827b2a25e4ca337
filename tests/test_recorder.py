"""The recorder: an arrival's end is recorded before anything moves, and a recorded end is finished
by the replay — in process, without killing anything (the kill -9 cases are in test_fault_points)."""

from __future__ import annotations

import json
from pathlib import Path

from processor.config import load_settings
from processor.daemon import Components, build
from processor.state import State
from processor.vocab import ArrivalState
from tests.conftest import Project
from tests.dicomgen import make_series, write_zip


def _components(project: Project) -> Components:
    return build(load_settings(project.config))


def _crash_three_times(state: State, aid: int) -> None:
    """Claimed, and the process died with it alone in flight, three times (limits.max_attempts 3)."""
    for _ in range(3):
        assert state.claim(aid) is not None
        state.recover_in_flight(max_crashes=3)


def _crashed_into_quarantine(
    project: Project, name: str, series: list | None = None
) -> tuple[Components, int]:
    """A ZIP taken in and then quarantined by crash recovery (:func:`_crash_three_times`)."""
    components = _components(project)
    aid = components.intake.accept(write_zip(project.inbox / name, series or make_series(20)))
    assert aid is not None
    _crash_three_times(components.state, aid)
    return components, aid


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
    components, aid = _crashed_into_quarantine(project, "poison.zip")
    state = components.state
    assert components.recorder().replay() == [aid]
    quarantine = project.inbox / ".ctwatch" / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == ["poison.zip", "poison.zip.error.txt"]
    assert "crashed the worker 3 times" in (quarantine / "poison.zip.error.txt").read_text()
    receipt = json.loads(next((project.outbox / "receipts").glob("*.json")).read_text())
    assert receipt["outcome"] == "rejected" and "crashed the worker 3 times" in receipt["message"]
    state.close()


def test_arrivals_of_one_study_in_flight_together_never_share_a_json(project: Project) -> None:
    components = _components(project)
    series = make_series(20)
    first = components.intake.accept(write_zip(project.inbox / "a.zip", series))
    more = make_series(20, study_uid=series[0].StudyInstanceUID, series_number=3)  # a late series
    second = components.intake.accept(write_zip(project.inbox / "b.zip", more))
    assert first is not None and second is not None
    state, executor = components.state, components.executor()
    a, b = state.claim(first), state.claim(second)
    assert a is not None and b is not None
    # Both CPU stages run before either end is recorded (prefetch does this while the GPU is busy).
    handles = [executor.prepare([a]), executor.prepare([b])]
    reserved = [path for h in handles for item in h.opened for _, path in item.runs]
    assert len(set(reserved)) == 2 and reserved[1].name.endswith(f".a{second}.json"), reserved
    # b was planned before a's result existed: sent back before its GPU stage, uncharged, to run
    # again as a new version of the study with a's images (test_late_series has the rest).
    assert [executor.complete(h)[0] for h in handles] == [ArrivalState.DONE, ArrivalState.PENDING]
    assert state.arrival(second).attempts == 0
    again = state.claim(second)
    assert again is not None and executor.process(again) == ArrivalState.DONE
    paths = [row["json_path"] for aid in (first, second) for row in state.studies_for(aid)]
    assert len(set(paths)) == 2 and paths[1].endswith(f".a{second}.json"), paths
    documents = [json.loads(Path(p).read_text()) for p in paths]
    assert [d["source"]["arrival_id"] for d in documents] == [first, second]
    assert documents[1]["supersedes"]["arrival_id"] == first
    state.close()


def test_a_requeued_quarantined_input_that_now_succeeds_leaves_no_stale_note(project: Project) -> None:
    components, aid = _crashed_into_quarantine(project, "flaky.zip")
    state = components.state
    components.recorder().replay()
    assert _quarantine(project) == ["flaky.zip", "flaky.zip.error.txt"]
    assert not state.arrival(aid).isolate
    assert state.requeue(aid)
    claimed = state.claim(aid)
    assert claimed is not None and components.executor().process(claimed) == ArrivalState.DONE
    assert _quarantine(project) == [], "the note no longer says anything true"
    receipts = list((project.outbox / "receipts").glob("*.json"))
    assert len(receipts) == 1 and json.loads(receipts[0].read_text())["outcome"] == "accepted"
    state.close()


def test_a_quarantined_input_dropped_again_is_a_fresh_attempt_not_a_duplicate(project: Project) -> None:
    series = make_series(20)
    components, aid = _crashed_into_quarantine(project, "x.zip", series)
    state = components.state
    first = state.arrival(aid).current_path  # the same bytes (a ZIP written again can differ in its times)
    assert first is not None
    again_path = project.inbox / "x.zip"
    again_path.write_bytes(Path(first).read_bytes())
    again = components.intake.accept(again_path)
    assert again is not None and again != aid
    row = state.arrival(again)
    assert row.state == "pending" and row.duplicate_of is None and row.retry_of == aid
    state.close()


def test_a_study_uid_too_long_for_a_file_name_gets_a_name_that_fits(project: Project) -> None:
    from processor.outputs.layout import OutboxLayout, is_file_uid

    components = _components(project)
    aid = components.intake.accept(write_zip(project.inbox / "long.zip", make_series(20)))
    assert aid is not None
    arrival = components.state.arrival(aid)
    long_uid = "1.2." + "1234567890." * 24 + "9"
    assert not is_file_uid(long_uid) and is_file_uid("1.2.840.10008.5.1.4.1.1.2")
    path = OutboxLayout(project.outbox).json_path(components.state, arrival, long_uid)
    assert path.name == "invalid-uid.json"
    components.state.close()
