"""Send-back across versions of one study, and a send queue that a failing row does not hold up.

A new version (a late series) names the SR it replaces, goes wherever the earlier version went —
whatever that destination's ``when`` — and the earlier version's sends still waiting are never
made; a version kept out (fewer images, a worse result) sends nothing. No daemon: the recorder's
own path (``build`` + ``executor.process``) and the queue on a real SQLite file.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom

from processor.config import FolderTarget, RetrySettings, load_settings
from processor.daemon import build
from processor.delivery import DeliveryService, Route
from processor.delivery.folder import FolderSender
from processor.state import Outbound
from tests.conftest import Project
from tests.dicomgen import make_series, write_zip
from tests.test_late_series import _document, _parts, _scout, _take

STEPS = [
    {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
    {"id": "volume", "uses": "ct.volume"},
]


def _project(root: Path) -> Project:
    root.mkdir(parents=True, exist_ok=True)
    return Project(
        root,
        STEPS,
        study_report={"make": []},
        destinations=[
            {"name": "all", "folder": {"path": "sent/all"}, "send": ["sr"]},
            {"name": "failures", "folder": {"path": "sent/failures"}, "send": ["sr"], "when": "failures"},
        ],
    )


def _rows(components) -> list[tuple]:
    return [
        (r["arrival_id"], r["destination"], r["state"], r["last_error"])
        for r in components.state.db.query("select * from deliveries order by id")
    ]


def test_a_new_version_replaces_the_earlier_sr_and_reaches_every_destination_of_the_earlier(
    tmp_path: Path,
) -> None:
    project = _project(tmp_path / "ct")
    components = build(load_settings(project.config))
    uid = make_series(1)[0].StudyInstanceUID  # warm the generator; the study comes from _parts
    assert uid
    part1, part2 = _parts(tmp_path / "drops")
    _take(components, part1)  # 20 slices at 2.5 mm: analysed
    (first,) = components.state.studies_for(1)
    first_doc = _document(first["json_path"])
    (first_sr,) = [f for f in first_doc["report"]["files"] if f["kind"] == "sr"]
    assert _rows(components) == [(1, "all", "pending", None)], "a success: not for `when: failures`"
    (first_row,) = components.state.db.query("select id from deliveries")
    components.state.mark_failed(first_row["id"], "copy failed: the share is gone")  # given up

    _take(components, part2)  # the late series: a new version that supersedes the first
    rows = _rows(components)
    assert rows[0][:3] == (1, "all", "superseded") and "arrival 2 analysed the study again" in rows[0][3]
    assert components.state.resend(failed=True) == 0, "resend --failed never sends an old version"
    assert components.state.delivery_summary()["all"]["last_error"] is None, "its note is no error"
    assert rows[1:] == [(2, "all", "pending", None)]
    (second,) = components.state.studies_for(2)
    second_doc = _document(second["json_path"])
    (second_sr,) = [f for f in second_doc["report"]["files"] if f["kind"] == "sr"]
    sr = pydicom.dcmread(Path(second["json_path"]).parent / second_sr["file"])
    (study,) = sr.PredecessorDocumentsSequence
    assert study.StudyInstanceUID == second_doc["study_uid"]
    (series,) = study.ReferencedSeriesSequence
    (item,) = series.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == first_sr["sop_instance_uid"] != second_sr["sop_instance_uid"]
    assert sr.SeriesDescription.endswith("(new version)") and len(sr.SeriesDescription) <= 64
    components.state.close()


def test_a_failed_version_sent_to_failures_is_followed_there_by_its_correction(tmp_path: Path) -> None:
    project = _project(tmp_path / "ct")
    components = build(load_settings(project.config))
    first = make_series(12, series_number=2, description="TOO FEW")  # below min_slices: Failure
    uid = first[0].StudyInstanceUID
    rest = make_series(24, study_uid=uid, series_number=3, description="WHOLE")
    _take(components, write_zip(tmp_path / "drops" / "a.zip", first))
    assert [r[:3] for r in _rows(components)] == [(1, "all", "pending"), (1, "failures", "pending")]
    _take(components, write_zip(tmp_path / "drops" / "b.zip", rest))
    (second,) = components.state.studies_for(2)
    assert _document(second["json_path"])["processing_status"] != "Failure"
    new = [r[:3] for r in _rows(components) if r[0] == 2]
    assert new == [(2, "all", "pending"), (2, "failures", "pending")], "the correction follows the failure"
    components.state.close()


def test_a_kept_out_version_sends_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path / "ct")
    components = build(load_settings(project.config))
    part1, _ = _parts(tmp_path / "drops")
    _take(components, part1)
    part1.unlink()  # the current result's images are gone: a worse version with fewer stays out
    _take(components, _scout(tmp_path))
    assert _document(components.state.studies_for(2)[0]["json_path"])["superseded_by"]
    assert [r[:3] for r in _rows(components)] == [(1, "all", "pending")]
    components.state.close()


class _Flaky:
    """A sender that fails (retry) while ``down`` is set, raises a bug on ``poison`` rows."""

    def __init__(self, outbox: Path) -> None:
        self.down = threading.Event()
        self.inner = FolderSender(FolderTarget(path=outbox.parent / "copies"))

    def send(self, items, outbox: Path) -> None:
        from processor.errors import SendFailed

        if any(i.get("poison") for i in items):
            raise RuntimeError("a library's surprise")
        if self.down.is_set():
            raise SendFailed("connection refused", retry=True)
        self.inner.send(items, outbox)


def test_rows_held_behind_an_outage_go_at_once_when_it_ends_and_a_bug_holds_nothing(tmp_path: Path) -> None:
    project = _project(tmp_path / "ct")
    components = build(load_settings(project.config))
    state, outbox = components.state, project.outbox
    report = outbox / "day" / "study"
    report.mkdir(parents=True)
    (report / "sr.dcm").write_bytes(b"x")
    import hashlib

    item = {"kind": "sr", "path": "day/study/sr.dcm", "sop_instance_uid": None}
    item["sha256"] = hashlib.sha256(b"x").hexdigest()
    sender = _Flaky(outbox)
    clock = [1000.0]
    service = DeliveryService(
        state,
        {"p": Route("p", sender, RetrySettings(first_seconds=60, max_seconds=60, give_up_after=3600))},
        outbox,
        clock=lambda: clock[0],
    )
    ids = state.enqueue(
        [Outbound("p", "study", None, None, (item,)), Outbound("p", "study", None, None, (item,))],
        now=clock[0],
    )
    sender.down.set()
    service.run_pass("p")
    first, second = state.delivery(ids[0]), state.delivery(ids[1])
    assert first.attempts == 1 and second.attempts == 0 and second.next_try_at >= clock[0] + 60
    sender.down.clear()
    clock[0] += 1  # the destination is back before the first row's next try
    third = state.enqueue([Outbound("p", "study", None, None, (item,))], now=clock[0])[0]
    service.run_pass("p")  # the new row goes: the destination is up ...
    service.run_pass("p")  # ... so the rows held behind the failure go too, the failed one included
    assert [state.delivery(i).state for i in (*ids, third)] == ["sent", "sent", "sent"]

    poison = state.enqueue([Outbound("p", "study", None, None, ({**item, "poison": True},))], now=clock[0])[0]
    after = state.enqueue([Outbound("p", "study", None, None, (item,))], now=clock[0])[0]
    service.run_pass("p")
    assert state.delivery(poison).state == "failed" and "resend" in state.delivery(poison).last_error
    assert state.delivery(after).state == "sent", "a bug in one row holds no other"
    state.close()


def test_resend_since_narrows_to_a_destination_and_never_repeats_a_daily_summary(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    from processor.state import State

    state = State(tmp_path / "s.db")
    hook = {"kind": "webhook", "payload": {"event": "daily"}}
    ids = state.enqueue(
        [
            Outbound("pacs", "study", None, "1.2.3", ({"kind": "webhook", "payload": {}},)),
            Outbound("hook", "daily", None, None, (hook,)),
            Outbound("hook", "failure", None, None, ({"kind": "webhook", "payload": {}},)),
        ]
    )
    for i in ids:
        assert state.mark_sent(i)
    since = datetime.now(UTC) - timedelta(minutes=5)
    assert state.resend(since=since, destination="pacs") == 1
    assert [state.delivery(i).state for i in ids] == ["pending", "sent", "sent"]  # type: ignore[union-attr]
    assert state.resend(since=since) == 1, "the failure notice; the daily summary is not sent again"
    assert state.delivery(ids[1]).state == "sent"  # type: ignore[union-attr]
    state.close()


def test_a_destination_failing_with_rows_waiting_ten_minutes_is_named_on_health(tmp_path: Path) -> None:
    from processor.daemon import SEND_FAULT_SECONDS, Daemon

    project = _project(tmp_path / "ct")
    components = build(load_settings(project.config))
    daemon = Daemon(components)
    state = components.state
    long_ago = time.time() - SEND_FAULT_SECONDS - 5
    (row,) = state.enqueue([Outbound("all", "study", None, "1.2.3", ({"kind": "webhook", "payload": {}},))])
    state.db.execute(
        "update deliveries set created_at = ? where id = ?",
        [datetime.fromtimestamp(long_ago, UTC).isoformat(timespec="seconds"), row],
    )
    assert daemon._faults() == [], "waiting, but no send has failed"
    state.mark_retry(
        row, "copy failed: the destination folder cannot be written (read-only)", time.time() + 60
    )
    daemon._send_faults_until = 0.0  # /health reads the queue at most every 10 s: read it now
    (fault,) = daemon._faults()
    assert fault.startswith("send-back to all is failing: copy failed") and "1 waiting" in fault
    state.close()


def test_the_report_and_the_sr_name_files_relative_to_the_installation(tmp_path: Path) -> None:
    """A missing weight file named in a step's reason leaves the server as weights/…, not as the
    server's absolute path (the page and the SR go to people and to the PACS)."""
    import json

    from processor.config import StudyReportSettings
    from processor.outputs.sendback import ObjectMaker
    from tests.test_sendback_objects import load, scanned

    root = tmp_path / "srv" / "ctwatch"
    document = load("result_decided.json")
    skipped = next(s for s in document["steps"] if s["status"] == "skipped")
    skipped["reason"] = f"model file missing: {root}/weights/head/head.pt"
    json_path = tmp_path / "out" / f"{document['study_uid']}.json"
    json_path.parent.mkdir(parents=True)
    maker = ObjectMaker(StudyReportSettings(make=["html", "sr"]), [], tmp_path / "out", root=root)
    built = maker.make(document, json_path, scanned(tmp_path, document), None)
    assert sorted(b.kind for b in built) == ["html", "sr"] and document["report"]["problems"] == []
    for b in built:
        text = b.path.read_bytes().decode("latin-1")
        assert str(root) not in text and "weights/head/head.pt" in text, b.kind
    assert str(root) in json.dumps(document), "the result JSON itself is as recorded"


def test_paths_are_made_relative_only_where_a_path_starts() -> None:
    from processor.outputs.sendback import _relative_to

    document = {
        "a": "missing: /srv/ct/weights/x.pt",
        "b": "/mnt/srv/ct/z and /srv/ctwatch/y",
        "c": "1.2/k.png",
    }
    assert _relative_to(document, Path("/srv/ct")) == {
        "a": "missing: weights/x.pt",
        "b": "/mnt/srv/ct/z and /srv/ctwatch/y",
        "c": "1.2/k.png",
    }
    assert _relative_to(document, Path("/")) == document, "a root of / leaves every path as it is"


def test_a_replaced_versions_failed_send_is_never_resent_and_the_summary_hides_the_note(
    tmp_path: Path,
) -> None:
    from processor.state import State

    state = State(tmp_path / "s.db")
    item = ({"kind": "webhook", "payload": {}},)
    old, other = state.enqueue(
        [Outbound("pacs", "study", None, "1.2.3", item), Outbound("pacs", "study", None, "9.9", item)]
    )
    state.mark_failed(old, "STOW-RS failed: HTTP 503")
    with state.transaction():  # what State.finish does for a new version of 1.2.3 (arrival ids: none here)
        state.db.execute("update deliveries set arrival_id = null")
    assert state.study_destinations([], "1.2.3") == set()
    state.db.execute(
        "update deliveries set state = 'superseded', last_error = 'not sent: newer' where id = ?", [old]
    )
    assert state.resend(failed=True) == 0
    summary = state.delivery_summary()["pacs"]
    assert summary["superseded"] == 1 and summary["last_error"] != "not sent: newer"
    assert state.mark_sent(other) and state.delivery(other).state == "sent"  # type: ignore[union-attr]
    state.close()


def test_a_last_error_older_than_the_last_send_is_not_shown(tmp_path: Path) -> None:
    from processor.state import State

    state = State(tmp_path / "s.db")
    item = ({"kind": "webhook", "payload": {}},)
    failing, fine = state.enqueue(
        [Outbound("p", "study", None, None, item), Outbound("p", "study", None, None, item)]
    )
    state.mark_retry(failing, "webhook POST failed: cannot connect", time.time() + 60)
    assert state.delivery_summary()["p"]["last_error"] == "webhook POST failed: cannot connect"
    state.db.execute(
        "update deliveries set last_error_at = '2026-01-01T00:00:00+00:00' where id = ?", [failing]
    )
    assert state.mark_sent(fine)
    assert state.delivery_summary()["p"]["last_error"] is None, "the destination answered since"
    state.close()
