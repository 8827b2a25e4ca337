"""The senders against real servers: a real Orthanc by STOW-RS and by C-STORE (found again by QIDO-RS),
an outage of that Orthanc (same ports, same storage) ridden out by the DeliveryService's retries,
and webhooks to an http.server on 127.0.0.1 (2xx sent, 5xx retried, 4xx and redirects failed)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from highdicom.sc import SCImage
from pydicom.uid import generate_uid

from processor.config import DicomWebTarget, DimseTarget, NotificationSettings, RetrySettings
from processor.delivery import DeliveryService, Route
from processor.delivery.dicomweb import DicomWebSender
from processor.delivery.dimse import DimseSender
from processor.delivery.webhook import WebhookSender
from processor.errors import SendFailed
from processor.state import State
from processor.state.deliveries import Outbound
from tests.conftest import wait_for
from tests.dicomgen import make_series
from tests.hookserver import HookServer
from tests.orthanc import Orthanc

ALLOW = frozenset({"127.0.0.1"})
FAST = RetrySettings(first_seconds=0.2, max_seconds=0.5, give_up_after=120)
TOKEN_ENV = "CTWATCH_TEST_PACS_TOKEN"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def study() -> tuple[str, object]:
    source = make_series(1)[0]
    return str(source.StudyInstanceUID), source


def _key_image(outbox: Path, source: object, name: str) -> dict:
    """A real Secondary Capture in the source's study (highdicom), written to the outbox as an item."""
    pixels = np.zeros((16, 16), np.uint8)
    pixels[4:12, 4:12] = 200
    image = SCImage.from_ref_dataset(
        source,  # type: ignore[arg-type]
        pixels,
        "MONOCHROME2",
        8,
        "PATIENT",
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="ctwatch test",
        patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    path = outbox / "2026-11-30" / str(image.StudyInstanceUID) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save_as(path, enforce_file_format=True)
    return {
        "kind": "sc",
        "path": path.relative_to(outbox).as_posix(),
        "sop_instance_uid": str(image.SOPInstanceUID),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def _in_orthanc(orthanc: Orthanc, study_uid: str) -> set[str]:
    """SOP Instance UIDs of the study that Orthanc lists by QIDO-RS."""
    answer = orthanc.client.get(f"/dicom-web/studies/{study_uid}/instances")
    if answer.status_code == 204 or not answer.content:
        return set()
    assert answer.status_code == 200, answer.status_code
    return {row["00080018"]["Value"][0] for row in answer.json()}


def test_stow_rs_and_c_store_reach_orthanc(
    orthanc: Orthanc, study: tuple[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    study_uid, source = study
    outbox = tmp_path / "outbox"
    web_item, dimse_item = _key_image(outbox, source, "key_1.dcm"), _key_image(outbox, source, "key_2.dcm")
    web = DicomWebSender(
        DicomWebTarget(url=orthanc.dicomweb, bearer_env=TOKEN_ENV, timeout_seconds=20), ALLOW
    )

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(SendFailed) as missing:
        web.send([web_item], outbox)
    assert not missing.value.retry and TOKEN_ENV in missing.value.reason and "resend" in missing.value.reason
    refused = DicomWebSender(DicomWebTarget(url=orthanc.dicomweb), frozenset({"pacs.example.org"}))
    with pytest.raises(SendFailed, match="not in fetch.allow_hosts") as outside:
        refused.send([web_item], outbox)
    assert not outside.value.retry
    assert _in_orthanc(orthanc, study_uid) == set(), "nothing was sent by the refused tries"

    monkeypatch.setenv(TOKEN_ENV, "test-token-0123456789")
    web.send([web_item], outbox)
    DimseSender(
        DimseTarget(host="127.0.0.1", port=orthanc.dicom_port, called_aet=orthanc.aet, timeout_seconds=10),
        ALLOW,
    ).send([dimse_item], outbox)
    assert _in_orthanc(orthanc, study_uid) >= {web_item["sop_instance_uid"], dimse_item["sop_instance_uid"]}
    web.send([web_item], outbox)  # sent again (a restart after the send): the PACS keeps one
    held = orthanc.client.get(f"/dicom-web/studies/{study_uid}/instances").json()
    assert [r["00080018"]["Value"][0] for r in held].count(web_item["sop_instance_uid"]) == 1


# pynetdicom 3.0 leaves the socket of a refused connection unclosed (transport.py, connect(): it shuts
# the socket down but never closes it); the collector closes it. Only a ResourceWarning, off by default.
@pytest.mark.filterwarnings("ignore:unclosed <socket.socket:ResourceWarning")
def test_an_outage_is_retried_until_orthanc_is_back(
    orthanc: Orthanc, study: tuple[str, object], tmp_path: Path
) -> None:
    """Orthanc down: both rows stay pending with a retry scheduled and the reason in words; Orthanc
    up again on the same ports and storage: both sent, found by QIDO-RS."""
    study_uid, source = study
    outbox = tmp_path / "outbox"
    items = [_key_image(outbox, source, "key_3.dcm"), _key_image(outbox, source, "key_4.dcm")]
    state = State(tmp_path / "s.db")
    routes = {
        "pacs-web": Route("pacs-web", DicomWebSender(DicomWebTarget(url=orthanc.dicomweb), ALLOW), FAST),
        "pacs-dimse": Route(
            "pacs-dimse",
            DimseSender(
                DimseTarget(host="127.0.0.1", port=orthanc.dicom_port, called_aet=orthanc.aet), ALLOW
            ),
            FAST,
        ),
    }
    service = DeliveryService(state, routes, outbox, poll_seconds=0.5)
    orthanc.stop()
    try:
        ids = state.enqueue(
            [
                Outbound("pacs-web", "study", None, study_uid, (items[0],)),
                Outbound("pacs-dimse", "study", None, study_uid, (items[1],)),
            ]
        )
        service.start()
        rows = wait_for(
            lambda: (
                (found := [state.delivery(i) for i in ids])
                and all(r and r.attempts >= 2 for r in found)
                and found
            ),
            15,
            "two retries of each row while Orthanc is down",
        )
        assert [r.state for r in rows] == ["pending", "pending"]  # type: ignore[union-attr]
        web_error, dimse_error = (r.last_error or "" for r in rows)  # type: ignore[union-attr]
        assert web_error.startswith("STOW-RS failed: connection refused — "), web_error
        assert dimse_error.startswith("C-STORE failed: cannot connect — "), dimse_error
        assert "127.0.0.1" not in web_error + dimse_error and study_uid not in web_error + dimse_error
        summary = state.delivery_summary()
        assert summary["pacs-web"]["pending"] == 1 and summary["pacs-web"]["last_error"] == web_error
    finally:
        orthanc.start()
    try:
        service.notify()
        wait_for(
            lambda: all((r := state.delivery(i)) and r.state == "sent" for i in ids),
            15,
            "both sent after the outage",
        )
    finally:
        service.stop()
        service.join(10)
        state.close()
    assert _in_orthanc(orthanc, study_uid) >= {item["sop_instance_uid"] for item in items}


def test_webhooks_sent_retried_or_failed_by_status(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = HookServer(tmp_path / "hooks", {"/ok": 204, "/boom": 500, "/gone": 404, "/moved": 302})
    monkeypatch.setenv(TOKEN_ENV, "hook-token-0123456789")
    state = State(tmp_path / "s.db")
    routes = {
        name: Route(
            name,
            WebhookSender(
                NotificationSettings(
                    name=name, url=f"http://127.0.0.1:{hooks.port}/{name}", bearer_env=TOKEN_ENV
                ),
                ALLOW,
            ),
            FAST,
        )
        for name in ("ok", "boom", "gone", "moved")
    }
    service = DeliveryService(state, routes, tmp_path / "outbox")
    try:
        ids = state.enqueue(
            [
                Outbound(
                    name,
                    "failure",
                    None,
                    None,
                    ({"kind": "webhook", "payload": {"event": "failure", "n": 1}},),
                )
                for name in routes
            ]
        )
        for name in routes:
            service.run_pass(name)
    finally:
        hooks.close()
    rows = {r.destination: r for r in (state.delivery(i) for i in ids) if r}
    assert {name: (r.state, r.attempts) for name, r in rows.items()} == {
        "ok": ("sent", 1),
        "boom": ("pending", 1),
        "gone": ("failed", 1),
        "moved": ("failed", 1),
    }
    assert (
        rows["boom"].last_error
        == "webhook POST failed: HTTP 500 — the destination is busy or failing; tried again with back-off"
    )
    assert rows["gone"].last_error == "webhook POST failed: HTTP 404 — check the url"
    assert "redirects are refused" in (rows["moved"].last_error or "")
    received = hooks.posts()
    assert [path for path, _, _ in received] == ["/ok", "/boom", "/gone", "/moved"], (
        "the redirect was not followed"
    )
    assert {auth for _, auth, _ in received} == {"Bearer hook-token-0123456789"}
    assert all(json.loads(body) == {"event": "failure", "n": 1} for _, _, body in received)
    state.close()
