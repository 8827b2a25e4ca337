"""Late series (issue 17): images of a study already analysed from an earlier arrival.

``late_series: new_version`` analyses the study again with the images of every arrival that brought
a part of it (series selection runs on the union) and the new result supersedes the earlier one,
both kept and linked both ways; ``ignore`` processes nothing and the receipt says why and how to
override. The same bytes again, or the same images in other bytes, are duplicates; a kill -9 in
the middle of a new version leaves exactly one. The study comes in two parts: part 1 holds series 2
(20 slices of 2.5 mm), part 2 series 3 (30 slices of 1 mm, the better one) and a 3-image scout.
"""

from __future__ import annotations

import functools
import json
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import openpyxl

from processor.config import load_settings
from processor.daemon import Components, build
from processor.executor import LocalExecutor
from processor.intake.archive import Limits
from processor.outputs.result import load_schema
from processor.outputs.workbook_rows import SUPERSEDED_FILL, WHAT_RAN_HEADER, study_row
from processor.state import State
from processor.vocab import ArrivalState
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_fault_points import Daemons, Input, arrivals, daemons, drop, new_project  # noqa: F401

LATE = "2-late.zip"


@functools.cache
def _study() -> tuple[str, list[Any], list[Any]]:
    """The study's UID, part 1's datasets and part 2's (made once; each test has its own database)."""
    first = make_series(20, series_number=2, spacing=2.5, description="PART ONE")
    uid = first[0].StudyInstanceUID
    late = make_series(30, study_uid=uid, series_number=3, spacing=1.0, description="THIN")
    late += make_series(3, study_uid=uid, series_number=4, description="SCOUT")
    return uid, first, late


def _parts(folder: Path) -> tuple[Path, Path]:
    _, first, late = _study()
    return write_zip(folder / "1-part.zip", first), write_zip(folder / LATE, late)


def _components(project: Project) -> Components:
    return build(load_settings(project.config))


def _take(components: Components, path: Path, executor: LocalExecutor | None = None) -> int:
    """Register ``path`` as ``process`` does (it stays where it is) and run it to its end."""
    aid = components.intake.accept_in_place(path)
    assert aid is not None
    claimed = components.state.claim(aid)
    if claimed is not None:  # None: a duplicate of these bytes, ended at registration
        (executor or components.executor()).process(claimed)
    return aid


def _document(path: str | Path) -> dict[str, Any]:
    document = json.loads(Path(path).read_text())
    jsonschema.validate(document, load_schema())
    return document


def _receipt(project: Project, aid: int) -> dict[str, Any]:
    return next(r for r in project.receipts() if r["arrival_id"] == aid)


def _versions(state_path: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(state_path)
    try:
        return conn.execute(
            "select arrival_id, superseded_by, inputs from studies order by arrival_id"
        ).fetchall()
    finally:
        conn.close()


def _chosen_number(document: dict[str, Any]) -> int:
    selection = document["series_selection"]
    return next(s["number"] for s in selection["series"] if s["series_uid"] == selection["chosen"])


# ---------------------------------------------------------------------------------------- new_version
def test_a_late_series_is_analysed_with_every_part_and_supersedes_the_earlier_result(
    project: Project, tmp_path: Path
) -> None:
    part1, part2 = _parts(tmp_path / "drops")
    assert project.run("process", str(part1)).returncode == 0
    run = project.run("process", str(part2))
    assert run.returncode == 0, run.stderr
    (old_path,) = [p for p in project.results() if not p.name.endswith(".a2.json")]
    new_path = old_path.with_name(old_path.stem + ".a2.json")
    assert str(new_path) in run.stdout

    new = _document(new_path)
    assert _chosen_number(new) == 3, "series selection ran on both parts: the thin series won"
    assert sorted(s["number"] for s in new["series_selection"]["series"]) == [2, 3, 4]
    assert new["dicom"]["instances_in_study"] == 53 and new["dicom"]["instances_in_arrival"] == 33
    assert new["supersedes"]["arrival_id"] == 1 and new["supersedes"]["json"] == str(old_path)
    assert [(i["arrival_id"], i["name"], i["instances"], i["missing"]) for i in new["inputs"]] == [
        (2, LATE, 33, None),
        (1, "1-part.zip", 20, None),
    ]
    old = _document(old_path)
    assert old["superseded_by"]["arrival_id"] == 2 and old["superseded_by"]["json"] == str(new_path)
    assert _chosen_number(old) == 2 and "supersedes" not in old, "the earlier result itself is kept"
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")]
    assert "supersedes that of arrival 1" in _receipt(project, 2)["message"]

    # The workbook keeps both rows: the earlier one grey, saying it was replaced and by which arrival;
    # the Summary counts the study once.
    assert project.run("report").returncode == 0
    book = openpyxl.load_workbook(project.outbox / "reports" / "ctwatch-latest.xlsx")
    sheet = book["Studies"]
    header = [c.value for c in sheet[1]]
    rows = {
        r[header.index("Arrival")]: (r, sheet.cell(row=i, column=1).fill.fgColor.rgb)
        for i, r in enumerate(sheet.iter_rows(min_row=2, values_only=True), start=2)
    }
    (old_row, old_fill), (new_row, new_fill) = rows[1], rows[2]
    assert old_row[header.index("What ran")].startswith("REPLACED by the result of arrival 2")
    assert old_fill == SUPERSEDED_FILL and new_fill != SUPERSEDED_FILL
    assert new_row[header.index("What ran")].startswith(
        "NEW VERSION of this study, replacing the result of arrival 1: analysed with the images of arrivals 1, 2."
    )
    summary = [tuple(v for v in r if v is not None) for r in book["Summary"].iter_rows(values_only=True)]
    statuses = summary[summary.index(("By status",)) + 2 :]
    statuses = dict(r for r in statuses[: next(i for i, r in enumerate(statuses) if not r)])
    assert sum(statuses.values()) == 2 and statuses["Not the current result (not counted above)"] == 1
    book.close()


def test_an_earlier_part_no_longer_on_disk_is_named_in_the_warnings(project: Project, tmp_path: Path) -> None:
    components = _components(project)
    part1, part2 = _parts(tmp_path / "drops")
    _take(components, part1)
    part1.unlink()  # what retention.keep_days (or a person) does to an archived input
    aid = _take(components, part2)
    (row,) = components.state.studies_for(aid)
    document = _document(row["json_path"])
    assert document["supersedes"]["arrival_id"] == 1 and document["dicom"]["instances_in_study"] == 33
    assert document["inputs"][1]["missing"] == "no longer on disk"
    (warning,) = [w for w in document["warnings"] if "arrival 1" in w]
    assert "no longer on disk" in warning and "computed without them" in warning
    assert "could not be used" in _receipt(project, aid)["message"]
    components.state.close()


def test_two_parts_in_flight_together_give_one_version_each_in_turn(project: Project, tmp_path: Path) -> None:
    """Planned in one batch, neither knows the other's result: the first is recorded, the second is
    sent back uncharged by the recorder's transaction and runs again as a new version."""
    components = _components(project)
    state, executor = components.state, components.executor()
    ids = [components.intake.accept_in_place(p) for p in _parts(tmp_path / "drops")]
    batch = [state.claim(aid) for aid in ids if aid is not None]
    assert len(batch) == 2 and all(batch)
    outcomes = executor.complete(executor.prepare(batch))  # type: ignore[arg-type]
    assert outcomes == [ArrivalState.DONE, ArrivalState.PENDING]
    later = state.arrival(ids[1])  # type: ignore[arg-type]
    assert later.state == "pending" and later.attempts == 0 and state.studies_for(later.id) == []
    claimed = state.claim(later.id)
    assert claimed is not None and executor.process(claimed) == ArrivalState.DONE
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")]
    state.close()


# ---------------------------------------------------------------------------------------- nothing new
def test_the_same_bytes_or_the_same_images_in_other_bytes_are_a_duplicate_even_once_the_first_is_gone(
    project: Project, tmp_path: Path
) -> None:
    components = _components(project)
    _, first, _ = _study()
    part1 = write_zip(tmp_path / "a" / "1-part.zip", first)
    _take(components, part1)
    copy = tmp_path / "copy.zip"
    copy.write_bytes(part1.read_bytes())
    exact = components.state.arrival(_take(components, copy))  # the very same bytes, as before
    assert (exact.state, exact.duplicate_of) == ("duplicate", 1)
    assert "The same bytes arrived before as arrival 1" in _receipt(project, exact.id)["message"]
    # c: after the first input was removed (recorded digests); d: then only some of its images
    for k, (folder, images) in enumerate((("b", first), ("c", first), ("d", first[:7]))):
        if folder == "c":
            part1.unlink()
        aid = _take(components, write_zip(tmp_path / folder / "resent.zip", images, shuffle_seed=k + 1))
        row = components.state.arrival(aid)
        assert (row.state, row.duplicate_of, row.error) == ("duplicate", 1, None)
        receipt = _receipt(project, aid)
        assert receipt["outcome"] == "duplicate" and receipt["duplicate_of"] == 1
        assert receipt["studies"][0]["status"] == "unchanged" and "holds nothing new" in receipt["message"]
    assert len(project.results()) == 1 and _versions(project.state_path) == [(1, None, "[1]")]
    components.state.close()


# ---------------------------------------------------------------------------------------- ignore
def test_ignore_leaves_the_earlier_result_says_why_and_requeue_analyses_it_anyway(tmp_path: Path) -> None:
    project = new_project(tmp_path, late_series="ignore")
    uid, _, _ = _study()
    components = _components(project)
    part1, part2 = _parts(tmp_path / "drops")
    _take(components, part1)
    aid = _take(components, part2)
    row = components.state.arrival(aid)
    assert row.state == "ignored" and components.state.studies_for(aid) == []
    receipt = _receipt(project, aid)
    assert receipt["outcome"] == "ignored"
    assert "analysed before from arrival 1 (1-part.zip" in receipt["message"]
    assert f"python run.py requeue {aid}" in receipt["message"]
    (entry,) = receipt["studies"]
    assert entry["status"] == "ignored" and entry["json"] == str(project.results()[0])
    assert len(project.results()) == 1
    status = project.run("status")
    assert (
        f"already analysed from arrival 1 (late_series: ignore); `python run.py requeue {aid}`"
        in status.stdout
    )
    assert uid not in status.stdout, "the status names the earlier arrival by id, nothing identifying"

    assert components.state.requeue(aid)
    claimed = components.state.claim(aid)
    assert claimed is not None and claimed.late_series == "new_version"
    assert components.executor().process(claimed) == ArrivalState.DONE
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")]
    components.state.close()


def test_a_zip_with_a_late_part_and_a_new_study_gives_the_new_result_and_can_be_requeued(
    tmp_path: Path,
) -> None:
    project = new_project(tmp_path, late_series="ignore")
    _, first, late = _study()
    other = make_series(21, description="ANOTHER STUDY")
    components = _components(project)
    _take(components, write_zip(tmp_path / "drops" / "1-part.zip", first))
    aid = _take(components, write_zip(tmp_path / "drops" / "mixed.zip", late + other))
    assert components.state.arrival(aid).state == "done"
    receipt = _receipt(project, aid)
    assert sorted(s["status"] for s in receipt["studies"]) == ["Success", "ignored"]
    assert "1 study processed." in receipt["message"] and f"requeue {aid}" in receipt["message"]
    assert components.state.requeue(aid), "an arrival done with an ignored study may be requeued"
    claimed = components.state.claim(aid)
    assert claimed is not None and components.executor().process(claimed) == ArrivalState.DONE
    rows = {(r[0], r[1]) for r in _versions(project.state_path)}
    assert rows == {(1, aid), (aid, None)} and len(components.state.studies_for(aid)) == 2
    assert all(s["status"] == "Success" for s in _receipt(project, aid)["studies"])
    components.state.close()


# ---------------------------------------------------------------------------------------- kill -9
def _settled(project: Project) -> bool:
    """Two arrivals, each ended, its input placed and its receipt written."""
    rows = arrivals(project)
    return len(rows) == 2 and all(
        r["state"] == "done" and r["placed"] and Path(r["receipt_path"] or "").is_file() for r in rows
    )


def test_kills_in_the_middle_of_a_new_version_leave_exactly_one(
    tmp_path: Path,
    daemons: Callable[[Project], Daemons],  # noqa: F811 — the fixture of test_fault_points
) -> None:
    """Killed before the new version is recorded (its study running), then after (its JSON written,
    the earlier result not yet pointed at it, no receipt, the input not moved): after the restarts
    there is one new version, linked both ways, and each input ended once."""
    project = new_project(tmp_path, reports={"enabled": False})
    part1, part2 = _parts(tmp_path / "made")
    inputs = [Input(p.name, p.read_bytes(), "done", (_study()[0],)) for p in (part1, part2)]
    runs = daemons(project)
    proc = runs.start("study.started~late")
    drop(project, inputs[0])
    wait_for(lambda: [r["state"] for r in arrivals(project)] == ["done"], 60, "part 1 done")
    drop(project, inputs[1])
    assert proc.wait(60) == 137 and "fault.injected point=study.started" in runs.log(), runs.tail()
    runs.crash("study.json_written", "study.json_written~late")
    proc = runs.start()
    wait_for(lambda: runs.broken(proc) or _settled(project), 60, "both arrivals ended and placed")
    assert not runs.broken(proc), runs.tail()
    runs.stop(proc)

    assert [(r["name"], r["state"], r["attempts"]) for r in arrivals(project)] == [
        ("1-part.zip", "done", 1),
        (LATE, "done", 2),
    ]
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")]
    results = project.results()
    assert len(results) == 2, results
    documents = [_document(p) for p in results]
    new = next(d for d in documents if "supersedes" in d)
    old = next(d for d in documents if "superseded_by" in d)
    assert new["source"]["arrival_id"] == 2 and old["source"]["arrival_id"] == 1
    assert old["superseded_by"]["json"] in {str(p) for p in results} and _chosen_number(new) == 3
    assert sorted(r["outcome"] for r in project.receipts()) == ["accepted", "accepted"]
    kept = sorted(p.name for p in (project.inbox / ".ctwatch" / "done").glob("*/*"))
    assert kept == ["1-part.zip", LATE]


# ---------------------------------------------------------------------------------------- earlier parts
def _scout(folder: Path, number: int = 4) -> Path:
    """A late part of the study that cannot be analysed alone: a 3-image series (below min_slices)."""
    uid, _, _ = _study()
    images = make_series(3, study_uid=uid, series_number=number, description="SCOUT")
    return write_zip(folder / f"{number}-scout.zip", images)


def test_a_worse_result_without_images_the_current_one_used_does_not_replace_it(
    project: Project, tmp_path: Path
) -> None:
    components = _components(project)
    part1, _ = _parts(tmp_path / "drops")
    _take(components, part1)
    part1.unlink()  # the images of the current result are no longer on disk
    aid = _take(components, _scout(tmp_path))
    assert _versions(project.state_path) == [(1, None, "[1]"), (2, 1, "[1, 2]")], "arrival 1's stays current"
    (row,) = components.state.studies_for(aid)
    document = _document(row["json_path"])
    assert document["processing_status"] == "Failure" and "supersedes" not in document
    pointer = document["superseded_by"]
    assert pointer["arrival_id"] == 1 and pointer["reason"] == "fewer_images"
    (warning,) = [w for w in document["warnings"] if "stays the study's current one" in w]
    assert "fewer images than the result of arrival 1" in warning and "no longer on disk" in warning
    assert "fewer images than the result of arrival 1" in _receipt(project, aid)["message"]
    assert "superseded_by" not in _document(components.state.studies_for(1)[0]["json_path"])
    what_ran = study_row(dict(row), project.outbox / "reports")[WHAT_RAN_HEADER]
    assert what_ran.startswith("NOT CURRENT: the result of arrival 1 stays this study's current one")
    components.state.close()


def test_an_earlier_input_replaced_since_it_was_analysed_is_left_out(
    project: Project, tmp_path: Path
) -> None:
    components = _components(project)
    _, first, _ = _study()
    part1, part2 = _parts(tmp_path / "drops")
    _take(components, part1)
    write_zip(part1, first[:5])  # other bytes under the same name (its sha256 differs)
    aid = _take(components, part2)
    (row,) = components.state.studies_for(aid)
    document = _document(row["json_path"])
    assert document["inputs"][1]["missing"] == "changed since it was analysed"
    assert document["dicom"]["instances_in_study"] == 33, "none of the replaced file's images was used"
    assert any("arrival 1" in w and "changed since it was analysed" in w for w in document["warnings"])
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")], "as good: it supersedes"
    components.state.close()


class _Ticks:
    """A clock that advances one second each time it is read: reading an input asks it a fixed number
    of times, so a time limit can be set between what one input's read takes and what two take."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return float(self.reads)


def _executor(components: Components, seconds: float, clock: _Ticks) -> LocalExecutor:
    s = components.settings.limits
    limits = Limits(s.max_members, s.max_total_bytes, s.max_ratio, seconds)
    return LocalExecutor(components.pipeline, components.recorder(), limits=limits, clock=clock)


def test_each_earlier_part_is_read_again_within_a_time_limit_of_its_own(
    project: Project, tmp_path: Path
) -> None:
    """limits.max_seconds_per_arrival holds for each input read: an earlier part read within it before
    is read within it again, whatever the new arrival took; one that no longer is fails the arrival,
    naming that part and its own file count, and nothing is recorded for the study."""
    components = _components(project)
    part1, _ = _parts(tmp_path / "drops")
    ticks = _Ticks()
    _take(components, part1, _executor(components, 1e9, ticks))
    reads = ticks.reads  # a read of part 1 sees at most reads - 1 seconds go by
    aid = _take(components, _scout(tmp_path, 4), _executor(components, reads - 0.5, _Ticks()))
    (row,) = components.state.studies_for(aid)
    document = _document(row["json_path"])
    assert [(i["arrival_id"], i["instances"], i["missing"]) for i in document["inputs"]] == [
        (2, 3, None),
        (1, 20, None),
    ]
    assert document["processing_status"] == "Success" and _chosen_number(document) == 2

    aid = _take(components, _scout(tmp_path, 5), _executor(components, reads - 1.5, _Ticks()))
    arrival = components.state.arrival(aid)
    assert arrival.state == "failed" and components.state.studies_for(aid) == []
    assert "arrival 1 (1-part.zip)" in (arrival.error or "") and "its 20 file(s)" in (arrival.error or "")
    assert "requeue" in (arrival.error or "")
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")]
    components.state.close()


def test_an_os_error_reading_an_earlier_part_sends_the_arrival_back_uncharged(
    project: Project, tmp_path: Path
) -> None:
    part1, part2 = _parts(tmp_path / "drops")
    components = _components(project)
    _take(components, part1)
    components.state.close()
    kept = part1.read_bytes()
    part1.unlink()
    with socket.socket(socket.AF_UNIX) as sock:  # opening it to read fails (ENXIO): not the input's fault
        sock.bind(str(part1))
    run = project.run("process", str(part2))
    assert run.returncode == 1
    (line,) = [x for x in (run.stdout + run.stderr).splitlines() if x.startswith(f"{part2}\t")]
    assert "\tpending\t" in line and "could not be read" in line, line
    conn = sqlite3.connect(project.state_path)
    assert conn.execute("select state, attempts from arrivals where id = 2").fetchone() == ("pending", 0)
    conn.close()
    assert _versions(project.state_path) == [(1, None, "[1]")]
    part1.unlink()
    part1.write_bytes(kept)
    again = project.run("process", str(part2))
    assert again.returncode == 0, again.stderr
    assert _versions(project.state_path) == [(1, 2, "[1]"), (2, None, "[1, 2]")]


def test_a_copy_of_a_superseded_arrival_is_a_duplicate_of_the_current_result(
    project: Project, tmp_path: Path
) -> None:
    components = _components(project)
    part1, part2 = _parts(tmp_path / "drops")
    _take(components, part1)
    _take(components, part2)
    copy = tmp_path / "copy.zip"
    copy.write_bytes(part1.read_bytes())
    aid = _take(components, copy)
    row = components.state.arrival(aid)
    assert (row.state, row.duplicate_of) == ("duplicate", 2)
    receipt = _receipt(project, aid)
    (current,) = components.state.studies_for(2)
    assert receipt["duplicate_of"] == 2 and [s["json"] for s in receipt["studies"]] == [current["json_path"]]
    assert "from arrival 2" in receipt["message"] and "holds nothing new" in receipt["message"]
    components.state.close()


# ---------------------------------------------------------------------------------------- readers
def test_fit_evaluate_and_export_read_each_study_s_current_result(tmp_path: Path) -> None:
    """Requeued in the order 3, 2: arrival 3's result superseded arrival 1's, then arrival 2's
    superseded arrival 3's — the current one is arrival 2's, not the highest arrival id. Two current
    rows (a database from before versions were recorded): the latest; features alone: the latest."""
    state = State(tmp_path / "state.db")
    rows = {1: ("1.2.3", 3), 2: ("1.2.3", None), 3: ("1.2.3", 2), 4: ("1.2.4", None), 5: ("1.2.4", None)}
    for aid in range(1, 7):
        state.register_arrival(
            kind="cli",
            name=f"{aid}.zip",
            original_path="x",
            current_path="x",
            sha256=f"{aid:064x}",
            size=1,
            pipeline_name="p",
            pipeline_version=1,
        )
    features = {aid: {"lungs.volume_ml": float(aid)} for aid in range(1, 7)}
    latents = {aid: {"ctclip": np.full(4, aid, dtype=np.float32)} for aid in range(1, 7)}
    with state.transaction():
        for aid, (uid, superseded_by) in rows.items():
            fields = {"status": "Success", "superseded_by": superseded_by}
            state.write_study(aid, uid, fields, [], features[aid], latents[aid])
    state.record_features(6, "1.2.5", None, features[6], latents[6])
    current = {"1.2.3": 2, "1.2.4": 5, "1.2.5": 6}
    assert {r["study_uid"]: r["arrival_id"] for r in state.study_features()} == current
    assert {r["study_uid"]: r["features"]["lungs.volume_ml"] for r in state.study_features()} == {
        uid: float(aid) for uid, aid in current.items()
    }
    assert {r["study_uid"]: int(r["vector"][0]) for r in state.study_latents("ctclip")} == current
    assert {r["study_uid"]: r["arrival_id"] for r in state.latest_study_rows()} == {"1.2.3": 2, "1.2.4": 5}
    window = ("2000-01-01", "9999-12-31")
    exported = state.export_studies(*window)
    assert [(r["study_uid"], r["arrival_id"]) for r in exported] == [("1.2.3", 2), ("1.2.4", 5)]
    assert [r["value"] for r in state.export_features(*window)] == [2.0, 5.0]
    vectors = state.export_latents("ctclip", *window)
    assert [np.frombuffer(r["vector"], dtype="<f4")[0] for r in vectors] == [2, 5]
    state.close()
