"""Webhook notifications end to end: real arrivals through the real recorder and intake, the real
send queue and webhook sender, POSTed to an http.server on 127.0.0.1 — and no patient data in them.

The inputs carry planted identifiers (patient name and ID, accession, Study Instance UIDs, the ZIP's
name, a ZIP member's name in a reason); the raw JSON each notification received is searched for
every one of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

from processor.config import Settings, load_settings
from processor.daemon import Daemon, build
from processor.delivery import DeliveryService, routes_from_settings
from processor.outputs.notify import PAYLOAD_KEYS, PHI_KEYS, enqueue_daily, study_outbound
from processor.state import State
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.hookserver import HookServer

PATIENT_NAME = "Doe^John"
PATIENT_ID = "PID24680Z"
ACCESSION = "ACC55501"
ZIP_NAME = "Doe_John_12345.zip"
MEMBER_FOLDER = "Doe_John_MRN98765"
BAD_MEMBER = "Roe_Jane_MRN777"  # named in the zip-slip refusal's reason
LABEL = "ctwatch radiology test"


@dataclass
class World:
    """What the module's one run left: the settings, the state, the ids and the planted values."""

    settings: Settings
    state: State
    components: Any
    hooks: HookServer
    ids: dict[str, int]
    study_uids: dict[str, str]
    sent: dict[str, list[bytes]] = field(default_factory=dict)


def _notifications(port: int) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}"
    return [
        {"name": "plain", "url": f"{url}/plain", "on": ["failure", "pathology", "daily"], "label": LABEL},
        {"name": "full", "url": f"{url}/full", "on": ["failure", "pathology"], "include_phi": True},
    ]


def _planted(series: list) -> list:
    for ds in series:
        ds.PatientID = PATIENT_ID
    return series


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("notify")
    hooks = HookServer(root.parent / f"{root.name}-hooks")
    project = Project(
        root,
        [{"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}}],
        notifications=_notifications(hooks.port),
        study_report={"make": []},
    )
    components = build(load_settings(project.config))
    state = components.state
    try:
        analysed = _planted(make_series(24, accession=ACCESSION, patient_name=PATIENT_NAME))
        too_short = _planted(make_series(5, accession=ACCESSION, patient_name=PATIENT_NAME))  # study fails
        doe = write_zip(root / ZIP_NAME, analysed + too_short, folder=MEMBER_FOLDER)
        roe = write_zip(root / "Roe_Jane_777.zip", analysed[:1], folder=f"../{BAD_MEMBER}")  # zip-slip
        fifo = project.inbox / "Poe_Edgar_4242.zip"  # neither a file nor a folder: refused at intake
        os.mkfifo(fifo)
        ids = {
            "doe": components.intake.accept_in_place(doe),
            "roe": components.intake.accept_in_place(roe),
            "poe": components.intake.accept(fifo),
        }
        executor = components.executor(state)
        for key in ("doe", "roe"):
            executor.process_many([state.claim(ids[key])])
        study_uids = {"analysed": analysed[0].StudyInstanceUID, "failed": too_short[0].StudyInstanceUID}
        # pathology: 1 needs the fusion and decision models; the recorded document of the analysed
        # study with the decision's fields as they would be (the rest is the real document)
        row = next(r for r in state.studies_for(ids["doe"]) if r["study_uid"] == study_uids["analysed"])
        document = json.loads(row["result_json"]) | {
            "pathology": 1,
            "probability_of_pathology": 0.91,
            "most_dangerous_pathology_type": "Lung nodule",
        }
        settings = components.settings
        state.enqueue(study_outbound(settings.notifications, state.arrival(ids["doe"]), [document]))
        service = DeliveryService(state, routes_from_settings(settings), settings.outbox)
        for name in ("plain", "full"):
            service.run_pass(name)
        sent = {path: hooks.received(path) for path in ("/plain", "/full")}
        yield World(settings, state, components, hooks, ids, study_uids, sent)
    finally:
        state.close()
        hooks.close()


def _phi(world: World) -> list[str]:
    return [
        "Doe",
        "John",
        PATIENT_ID,
        ACCESSION,
        "Roe_Jane",
        "Poe_Edgar",
        MEMBER_FOLDER,
        BAD_MEMBER,
        "IMG0001",
        *world.study_uids.values(),
    ]


def _leaks(body: bytes, planted: list[str]) -> list[str]:
    text = body.decode()
    return [value for value in planted if value in text]


def test_failures_and_pathology_are_posted_without_patient_data(world: World) -> None:
    bodies = world.sent["/plain"]
    payloads = [json.loads(b) for b in bodies]
    assert all(_leaks(b, _phi(world)) == [] for b in bodies), [_leaks(b, _phi(world)) for b in bodies]
    assert all(set(p) <= PAYLOAD_KEYS for p in payloads)
    assert all(p["ctwatch"] == LABEL and p["time"].endswith("+00:00") for p in payloads)
    got = sorted(
        (
            p["event"],
            p["arrival_id"],
            p.get("state"),
            p.get("processing_status"),
            p.get("reason_kind"),
            p.get("step"),
        )
        for p in payloads
    )
    ids = world.ids
    assert got == sorted(
        [
            ("failure", ids["doe"], None, "Failure", "study", "dicom.select_series"),  # the 5-slice study
            ("failure", ids["roe"], "quarantined", None, "rejected", None),  # refused by the worker
            ("failure", ids["poe"], "quarantined", None, "not_taken_in", None),  # refused at intake
            ("pathology", ids["doe"], None, "Success", None, None),
        ]
    )  # once each; the analysed study without pathology made none
    pathology = next(p for p in payloads if p["event"] == "pathology")
    assert (pathology["pathology"], pathology["probability_of_pathology"]) == (1, 0.91)
    assert pathology["most_dangerous_pathology_type"] == "Lung nodule"
    assert world.state.delivery_summary()["plain"]["sent"] == 4


def test_include_phi_adds_the_study_uid_file_name_and_reason_but_never_the_patient(world: World) -> None:
    bodies = world.sent["/full"]
    payloads = {(p["event"], p["arrival_id"]): p for p in map(json.loads, bodies)}
    assert len(bodies) == len(payloads) == 4
    assert all(set(p) <= PAYLOAD_KEYS | PHI_KEYS for p in payloads.values())
    ids = world.ids
    failed_study = payloads[("failure", ids["doe"])]
    assert failed_study["study_uid"] == world.study_uids["failed"]
    assert failed_study["accession"] == ACCESSION
    assert failed_study["name"] == ZIP_NAME
    assert "min_slices" in failed_study["reason"]
    assert BAD_MEMBER in payloads[("failure", ids["roe"])]["reason"]
    assert payloads[("failure", ids["poe"])]["name"] == "Poe_Edgar_4242.zip"
    assert payloads[("pathology", ids["doe"])]["study_uid"] == world.study_uids["analysed"]
    assert all(_leaks(b, [PATIENT_ID, PATIENT_NAME]) == [] for b in bodies)  # (the file name has "John")
    assert set(_leaks(b"".join(bodies), _phi(world))) >= {ACCESSION, BAD_MEMBER, *world.study_uids.values()}


def test_daily_summary_counts_the_day_once(world: World) -> None:
    state, settings = world.state, world.settings
    finished = {datetime.fromisoformat(a.finished_at or "").astimezone().date() for a in state.arrivals()}
    if len(finished) != 1:
        pytest.skip("the module's arrivals finished on both sides of midnight")
    day = finished.pop()
    waiting = world.components.intake.accept_in_place(write_zip(state.path.parent / "wait.zip", []))
    now = datetime.combine(day + timedelta(days=1), time(7, 0)).astimezone()  # the next morning

    rows = enqueue_daily(state, settings.notifications, now)
    assert [(r.destination, r.event) for r in rows] == [("plain", "daily")]  # "full" is not on daily
    payload = rows[0].items[0]["payload"]
    assert payload["day"] == day.isoformat()
    created = datetime.fromisoformat(state.arrival(waiting).created_at)
    assert payload["counts"] == {
        "arrivals": {"done": 1, "failed": 0, "quarantined": 2, "duplicate": 0, "ignored": 0},
        "studies": {"Success": 1, "Partial": 0, "Failure": 1},
        "pathology": 0,  # the recorded results have none (the pathology event above was made aside)
        "failures": 3,
        "deliveries": {
            "full": {"pending": 0, "sent": 4, "failed": 0},
            "plain": {"pending": 0, "sent": 4, "failed": 0},
        },
        "waiting": 1,
        "oldest_waiting_seconds": int((now - created).total_seconds()),
    }
    # a second firing that day, a later one, and a restart (a new State on the file) queue nothing
    assert enqueue_daily(state, settings.notifications, now) == []
    assert enqueue_daily(state, settings.notifications, now + timedelta(hours=5)) == []
    again = State(state.path)
    try:
        assert enqueue_daily(again, settings.notifications, now) == []
    finally:
        again.close()
    # the next day's is new; sent, it carries no patient data either
    assert len(enqueue_daily(state, settings.notifications, now + timedelta(days=1))) == 1
    DeliveryService(state, routes_from_settings(settings), settings.outbox).run_pass("plain")
    dailies = [b for b in world.hooks.received("/plain") if json.loads(b)["event"] == "daily"]
    days = sorted(json.loads(b)["day"] for b in dailies)  # (the next test's summary of yesterday aside)
    assert [d for d in days if d >= day.isoformat()] == [
        day.isoformat(),
        (day + timedelta(days=1)).isoformat(),
    ]
    assert all(_leaks(b, _phi(world)) == [] for b in dailies)
    assert all(set(json.loads(b)) <= PAYLOAD_KEYS for b in dailies)


def test_the_daemon_schedules_each_daily_summary_at_its_time(world: World) -> None:
    daemon = Daemon(world.components)
    daemon.housekeeping.start()
    daemon.scheduler.start()
    try:
        jobs = {j["id"]: j["next_run"] for j in daemon.scheduler.next_jobs()}
        assert jobs["daily-summary-plain"][11:19] == "07:00:00" and "daily-summary-full" not in jobs
        yesterday = (date.today() - timedelta(days=1)).isoformat()
        assert not world.state.daily_queued("plain", yesterday)
        daemon.scheduler.run_now("daily-summary-plain")
        wait_for(
            lambda: world.state.daily_queued("plain", yesterday), 30, "the fired job to queue its summary"
        )
    finally:
        daemon.scheduler.shutdown()
        daemon.housekeeping.stop()
        daemon.housekeeping.join(10)


def test_an_input_the_crash_cap_sets_aside_is_a_failure_notification(tmp_path: Path) -> None:
    project = Project(tmp_path, notifications=_notifications(9), study_report={"make": []})
    components = build(load_settings(project.config))
    state = components.state
    aid = components.intake.accept(write_zip(project.inbox / ZIP_NAME, make_series(20)))
    assert aid is not None
    for _ in range(2):  # the process died with it alone in flight; the third death is at the start below
        assert state.claim(aid) is not None
        state.recover_in_flight(max_crashes=3)
    assert state.claim(aid) is not None
    Daemon(components).recover()
    rows = state.due(float("inf"))
    assert state.arrival(aid).state == "quarantined"
    assert [(r.destination, r.event, r.arrival_id) for r in rows] == [
        ("plain", "failure", aid),
        ("full", "failure", aid),
    ]
    plain = rows[0].items[0]["payload"]
    assert (plain["state"], plain["reason_kind"]) == ("quarantined", "set_aside")
    assert "Doe" not in json.dumps(plain) and ZIP_NAME in json.dumps(rows[1].items[0]["payload"])
    state.close()
