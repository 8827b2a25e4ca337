"""Issue 17, items 5 and 6: the urgent lane, and re-drops that behave as the quarantine note says.

Order is asserted from SQLite (``studies.id`` grows in the order results are recorded), never from
timing: the daemon test registers everything while claims are held by the disk guard, and the night
batch test drops the urgent study from inside the batch's first study (a test step), so the batch's
next study has not started when it arrives.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path

import yaml

from processor.config import load_settings
from processor.daemon import build
from processor.pipeline.step import Step, StudyContext
from processor.steps import default_registry
from processor.worker import Worker
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_spine_e2e import _stop, db_rows, validate


def _lines_for(proc, path: Path) -> list[str]:
    """The lines `process` printed for one input (stdout and stderr; log lines left out)."""
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith(f"{path}\t")]


def _receipt(project: Project, arrival_id: int) -> dict:
    return next(r for r in project.receipts() if r["arrival_id"] == arrival_id)


def test_process_redrops_of_inputs_without_a_result_are_fresh_attempts_with_a_line_each(
    project: Project, tmp_path: Path
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("minutes of the meeting, not a study")  # rejected: not DICOM
    short = write_zip(tmp_path / "short.zip", make_series(5))  # its study fails: too few slices
    good = write_zip(tmp_path / "good.zip", make_series(20))
    first = project.run("process", str(junk), str(short), str(good))
    assert first.returncode == 1, first.stderr  # README: 1 when any input was rejected or failed

    again = project.run("process", str(junk), str(short), str(good))
    assert again.returncode == 1, again.stderr
    [junk_line] = _lines_for(again, junk)
    assert "quarantined" in junk_line and "(fresh attempt after arrival 1)" in junk_line
    [short_line] = _lines_for(again, short)
    assert "\tFailure\t" in short_line and "(fresh attempt after arrival 2)" in short_line
    [good_line] = _lines_for(again, good)
    assert "\tSuccess\t" in good_line and "(duplicate of arrival 3)" in good_line

    rejected, retried, duplicate = (_receipt(project, i) for i in (4, 5, 6))
    assert rejected["outcome"] == "rejected" and rejected["retry_of"] == 1
    assert "This was a fresh attempt" in rejected["message"] and "arrival 1" in rejected["message"]
    assert retried["outcome"] == "accepted" and retried["retry_of"] == 2
    assert "fresh attempt" in retried["message"]
    first_result = db_rows(project, "select study_uid, json_path from studies where arrival_id = 3")
    assert duplicate["outcome"] == "duplicate" and duplicate["duplicate_of"] == 3
    assert duplicate["retry_of"] is None and "arrival 3, which produced the result" in duplicate["message"]
    assert [(s["study_uid"], s["json"]) for s in duplicate["studies"]] == first_result
    assert db_rows(project, "select state from arrivals order by id")[3:] == [
        ("quarantined",),
        ("done",),
        ("duplicate",),
    ]

    only_good = project.run("process", str(good))  # a duplicate of a full result: exit 0, one line
    assert only_good.returncode == 0, only_good.stderr
    assert len(_lines_for(only_good, good)) == 1 and "(duplicate of arrival 3)" in only_good.stdout


def _set(project: Project, **changes: object) -> None:
    settings = yaml.safe_load(project.config.read_text())
    settings.update(changes)
    project.config.write_text(yaml.safe_dump(settings))


def _status(project: Project) -> dict:
    ports = re.findall(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text())
    assert ports, project.log_text()
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[-1]}/status", timeout=10) as response:
        return json.loads(response.read())


def test_daemon_urgent_drop_behind_day_arrivals_goes_first_and_a_rejected_redrop_is_retried(
    project: Project, tmp_path: Path
) -> None:
    # Claims held (the disk guard: no volume has an exabyte free) while everything is taken in.
    _set(project, disk={"min_free_gb": 1e9})
    for i in range(3):
        write_zip(project.inbox / f"day{i}.zip", make_series(20, description=f"D{i}"))
    (project.inbox / "notes.txt").write_text("not a study")
    daemon = project.start()
    try:
        urgent_dir = project.inbox / "urgent"
        wait_for(urgent_dir.is_dir, 60, "the urgent folder made at start")
        wait_for(lambda: db_rows(project, "select count(*) from arrivals") == [(4,)], 60, "4 arrivals")
        write_zip(tmp_path / "stat.zip", make_series(20, description="URGENT")).replace(
            urgent_dir / "stat.zip"
        )
        wait_for(lambda: db_rows(project, "select count(*) from arrivals") == [(5,)], 60, "the urgent one")
    finally:
        assert _stop(daemon) == 0, project.log_text()
    assert db_rows(project, "select name from arrivals where priority = 'urgent'") == [("stat.zip",)]

    _set(project, disk={"min_free_gb": 0})
    daemon = project.start()
    try:
        wait_for(lambda: len(project.results()) == 4, 60, "four results")
        order = db_rows(
            project, "select a.name from studies s join arrivals a on a.id = s.arrival_id order by s.id"
        )
        assert order == [("stat.zip",), ("day0.zip",), ("day1.zip",), ("day2.zip",)]
        recent = {a["id"]: a["queue"] for a in _status(project)["recent_arrivals"]}
        assert recent[5] == "urgent" and recent[1] == "day"
        wait_for(lambda: len(project.receipts()) == 5, 60, "notes.txt rejected")
        # The rejected input dropped again, as its quarantine note says: a fresh attempt.
        (project.inbox / "notes.txt").write_text("not a study")
        wait_for(lambda: len(project.receipts()) == 6, 60, "the second receipt of notes.txt")
    finally:
        assert _stop(daemon) == 0, project.log_text()
    receipts = {r["arrival_id"]: r for r in project.receipts()}
    assert receipts[5]["priority"] == "urgent" and receipts[1]["priority"] == "routine"
    urgent_json = next(p for p in project.results() if validate(p)["source"]["name"] == "stat.zip")
    assert validate(urgent_json)["source"]["priority"] == "urgent"
    assert receipts[6]["outcome"] == "rejected" and receipts[6]["retry_of"] == 4
    assert "fresh attempt" in receipts[6]["message"]
    quarantine = sorted(p.name for p in (project.inbox / ".ctwatch" / "quarantine").iterdir())
    assert len([n for n in quarantine if not n.endswith(".error.txt")]) == 2, quarantine


def test_an_urgent_drop_during_a_night_batch_runs_before_the_batch_next_study(tmp_path: Path) -> None:
    """Night batches of 2, model-major, with the prefetcher two batches ahead: the urgent study,
    registered while the first batch runs, is next; the batch taken ahead waits (uncharged)."""
    registry = default_registry()
    dropped: list[int | None] = []

    class DropUrgent(Step):
        uses = "test.drop_urgent"
        summary = "Takes in the urgent ZIP the first time it runs (this test only)."

        def run(self, ctx: StudyContext) -> None:
            if not dropped:
                dropped.append(components.intake.accept(project.inbox / "urgent" / "stat.zip", urgent=True))

    registry.register(DropUrgent)
    steps = [
        {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
        {"id": "drop", "uses": "test.drop_urgent"},
    ]
    project = Project(tmp_path, steps)
    components = build(load_settings(project.config), registry)
    state = components.state
    night = [
        write_zip(project.inbox / "night" / f"n{i}.zip", make_series(20, description=f"N{i}"))
        for i in range(6)
    ]
    write_zip(project.inbox / "urgent" / "stat.zip", make_series(20, description="URGENT"))
    nights = [components.intake.accept(path, night=True) for path in night]
    worker = Worker(state, components.executor(), night_batch=2, max_inflight=2)
    worker.start()
    try:
        wait_for(lambda: len(project.results()) == 7, 120, "seven results")
    finally:
        worker.stop()
        worker.join(60)
    urgent = dropped[0]
    order = [row["arrival_id"] for row in state.db.query("select arrival_id from studies order by id")]
    assert order[:3] == [nights[0], nights[1], urgent], (order, nights, urgent)
    assert sorted(order[3:]) == sorted(nights[2:])
    attempts = {a.id: a.attempts for a in state.arrivals(limit=10)}
    assert set(attempts.values()) == {1}, "a batch put back is not charged an attempt"
    state.close()


def test_an_urgent_copy_of_bytes_waiting_in_the_queue_makes_them_urgent(
    project: Project, tmp_path: Path
) -> None:
    """The same bytes dropped again in the urgent folder while the routine arrival waits: that arrival
    is taken next (its priority in SQLite), and the copy's receipt says so; once it runs, another
    urgent copy's receipt says it is already being processed."""
    components = build(load_settings(project.config))
    state, intake = components.state, components.intake
    study = write_zip(tmp_path / "chest.zip", make_series(20))
    write_zip(project.inbox / "a.zip", make_series(20))
    shutil.copy(study, project.inbox / "chest.zip")
    ahead, waiting = (intake.accept(project.inbox / name) for name in ("a.zip", "chest.zip"))
    assert ahead is not None and waiting is not None
    (project.inbox / "urgent").mkdir(exist_ok=True)
    copies = []
    for k in range(2):
        shutil.copy(study, project.inbox / "urgent" / f"stat{k}.zip")
        copies.append(intake.accept(project.inbox / "urgent" / f"stat{k}.zip", urgent=True))
        if k == 0:
            assert state.arrival(waiting).priority == "urgent"
            head = state.claim_next(allow_night=False)
            assert head is not None and head.id == waiting, "taken before the routine one ahead of it"
    first, second = (_receipt(project, aid) for aid in copies)
    assert first["outcome"] == second["outcome"] == "duplicate" and first["duplicate_of"] == waiting
    assert "it is now urgent" in first["message"]
    assert "already being processed" in second["message"] and "now urgent" not in second["message"]
    state.close()
