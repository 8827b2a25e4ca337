"""No outside text on the status port, in SQLite, the log or the outbox (issue 15, item 8).

A hostile server on 127.0.0.1 plants a StudyInstanceUID-like string, a patient-like name and a
URL signature in every field it chooses: the reason phrase, the body, headers (ETag and
Last-Modified included), the Content-Disposition file name, redirect targets (with
``user:password@`` and a signed query), part headers and the QIDO-RS listing. The configured
source URLs carry a signed query too. A real daemon polls them, failing and succeeding; nothing
planted may reach ``/status``, ``/metrics``, ``/health``, the HTML page, any text column of any
table of the state database (the ETag excepted: it is an opaque validator sent back to the same
server, see ``processor/state/sources.py``), the log files, the receipts, the result JSON, the
workbook or ``ctwatch status``. Step error texts (which may carry a series description, a file name
or a UID) reach the port only as a category in our words (issue 17).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openpyxl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.redact import (
    CONTENT_TYPES,
    Failure,
    SourceFailure,
    What,
    redact_url,
    reduce_source_error,
)
from processor.state import State
from processor.status import Probes, StatusServer
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, to_bytes, write_zip

UID = "1.2.826.0.1.3680043.99.424242.7777"
NAME = "DOE^JANE"
SIGNATURE = "deadbeefcafef00d4242"
PASSWORD = "hunter2pw"
SIGNED = f"X-Amz-Signature={SIGNATURE}&X-Amz-Credential=AKIA{SIGNATURE}&sig={SIGNATURE}&patient=DOE%5EJANE"
REASON = f"Unauthorized for patient {NAME} study {UID} sig={SIGNATURE}"
BODY = f"<html>{NAME} {UID} X-Amz-Signature={SIGNATURE}</html>".encode()
# What must never show: each is looked for case-insensitively, so DOE_JANE, doe-jane … count too.
NEEDLES = (UID, "JANE", SIGNATURE, "X-Amz", PASSWORD, "AKIA")
PLANTED_ETAG = f'"{NAME}-{SIGNATURE}"'


def leaks(text: str) -> list[str]:
    lower = text.lower()
    return [needle for needle in NEEDLES if needle.lower() in lower]


class HostileSite:
    """One http.server on 127.0.0.1 serving http exports and a DICOMweb root, all of it hostile."""

    def __init__(self, tmp: Path) -> None:
        self.good_zip = write_zip(tmp / "good.zip", make_series(24)).read_bytes()
        self.good_study = make_series(24)
        self.good_uid = str(self.good_study[0].StudyInstanceUID)
        self.bad_answer_uid = "1.2.826.0.1.3680043.99.5"
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up
                    site.route(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="ctwatch-test-hostile"
        )

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    # ------------------------------------------------------------------ answers
    def send(
        self, h: BaseHTTPRequestHandler, code: int, body: bytes, reason: str = REASON, **headers: str
    ) -> None:
        h.send_response(code, reason)
        h.send_header("Content-Length", headers.pop("Content_Length", str(len(body))))
        h.send_header("X-Patient", f"{NAME} {UID}")
        h.send_header("Content-Disposition", f'attachment; filename="{NAME} {UID} sig={SIGNATURE}.zip"')
        h.send_header("WWW-Authenticate", f'Bearer realm="{NAME}", error_description="{UID}"')
        for key, value in headers.items():
            h.send_header(key.replace("_", "-"), value)
        h.end_headers()
        h.wfile.write(body)

    def route(self, h: BaseHTTPRequestHandler) -> None:
        path = urlsplit(h.path).path
        if path == "/exports/latest.zip":  # the one that works: a real ZIP, every header hostile
            self.send(
                h,
                200,
                self.good_zip,
                reason=f"OK {NAME}",
                Content_Type=f'application/zip; name="{NAME}"',
                ETag=PLANTED_ETAG,
                Last_Modified=f"Tue, 04 Mar 2025 09:00:00 GMT {NAME}",
            )
        elif path == "/private/export.zip":
            self.send(h, 401, BODY, Content_Type="text/plain")
        elif path == "/portal/export.zip":  # a login page instead of the file
            self.send(h, 200, BODY, reason=f"OK {NAME}", Content_Type=f"text/html; charset={NAME}")
        elif path == "/moved/export.zip":  # to a signed URL with user:password@, which then fails
            target = f"http://user:{PASSWORD}@127.0.0.1:{self.port}/final/{UID}.zip?{SIGNED}"
            self.send(h, 302, BODY, reason=f"Found {NAME}", Location=target)
        elif path.startswith("/final/"):
            self.send(h, 503, BODY)
        elif path == "/away/export.zip":  # to a host that is not allowed
            self.send(h, 302, BODY, Location=f"http://jane.{UID}.invalid/{NAME}?{SIGNED}")
        elif path == "/huge/export.zip":
            self.send(h, 200, b"PK\x03\x04", Content_Type="application/zip", Content_Length=str(2**40))
        elif path == "/dicom-web/studies":
            self.qido(h)
        elif path == f"/dicom-web/studies/{self.good_uid}":
            self.wado(h)
        elif path == f"/dicom-web/studies/{UID}":
            self.send(h, 401, BODY, Content_Type="text/plain")
        elif path == f"/dicom-web/studies/{self.bad_answer_uid}":
            self.send(h, 200, BODY, reason=f"OK {NAME}", Content_Type=f"text/html; boundary={NAME}")
        else:
            self.send(h, 404, BODY)

    def qido(self, h: BaseHTTPRequestHandler) -> None:
        offset = int(dict(p.split("=", 1) for p in urlsplit(h.path).query.split("&")).get("offset", "0"))

        def study(uid: str, count: int) -> dict[str, Any]:
            return {
                "0020000D": {"vr": "UI", "Value": [uid]},
                "00201208": {"vr": "IS", "Value": [count]},
                "00100010": {"vr": "PN", "Value": [{"Alphabetic": NAME}]},
                "00081190": {"vr": "UR", "Value": [f"http://x/{UID}?{SIGNED}"]},
            }

        items = [
            study(self.good_uid, 24),
            study(UID, 3),
            study(self.bad_answer_uid, 2),
            study(NAME, 1),  # a malformed UID: skipped, and not logged
        ]
        body = json.dumps(items if offset == 0 else []).encode()
        self.send(h, 200, body, reason=f"OK {NAME}", Content_Type="application/dicom+json")

    def wado(self, h: BaseHTTPRequestHandler) -> None:
        boundary = f"{NAME}-{SIGNATURE}".replace("^", "_")
        body = b""
        for ds in self.good_study:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n".encode()
            body += f"Content-Location: /{NAME}/{UID}?{SIGNED}\r\n\r\n".encode() + to_bytes(ds) + b"\r\n"
        body += f"--{boundary}\r\nContent-Type: text/x-{NAME.replace('^', '-')}\r\n\r\n{NAME}\r\n".encode()
        body += f"--{boundary}--\r\n".encode()
        self.send(
            h,
            200,
            body,
            reason=f"OK {NAME}",
            Content_Type=f'multipart/related; type="application/dicom"; boundary="{boundary}"',
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileSite]:
    site = HostileSite(tmp_path / "site")
    site.start()
    try:
        yield site
    finally:
        site.stop()


# ---------------------------------------------------------------------------------------------- helpers
def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        head = "\n".join(f"{k}: {v}" for k, v in response.getheaders())
        return response.status, head + "\n" + response.read().decode("utf-8")
    finally:
        conn.close()


def database_texts(path: Path) -> list[tuple[str, str, str]]:
    """(table, column, value) for every text value of every column of every table."""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        out = []
        tables = [r[0] for r in conn.execute("select name from sqlite_master where type = 'table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f'pragma table_info("{table}")')]
            for row in conn.execute(f'select * from "{table}"'):
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes):
                        value = value.decode("utf-8", "replace")
                    if isinstance(value, str):
                        out.append((table, column, value))
        return out
    finally:
        conn.close()


def workbook_text(path: Path) -> str:
    wb = openpyxl.load_workbook(path, read_only=True)
    try:
        return "\n".join(
            str(cell) for sheet in wb.worksheets for row in sheet.iter_rows(values_only=True) for cell in row
        )
    finally:
        wb.close()


def status_document(port: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


HTTP_SOURCES = ("latest", "private", "portal", "moved", "away", "huge")
TOKEN_HINT = "check the token named in auth.bearer_env and its permissions"


# ---------------------------------------------------------------------------------------------- the daemon
def test_nothing_a_server_chooses_reaches_the_port_the_database_the_log_or_the_outbox(
    tmp_path: Path, hostile: HostileSite
) -> None:
    paths = {
        "latest": "/exports/latest.zip",
        "private": "/private/export.zip",
        "portal": "/portal/export.zip",
        "moved": "/moved/export.zip",
        "away": "/away/export.zip",
        "huge": "/huge/export.zip",
    }
    sources: list[dict[str, Any]] = [
        {"name": name, "kind": "http", "url": f"{hostile.url(path)}?{SIGNED}#{NAME}", "every": "2s"}
        for name, path in paths.items()
    ]
    sources.append({"name": "pacs", "kind": "dicomweb", "url": hostile.url("/dicom-web"), "every": "2s"})
    (tmp_path / "p").mkdir()
    project = Project(
        tmp_path / "p",
        sources=sources,
        fetch={
            "allow_hosts": ["127.0.0.1"],
            "timeout_seconds": 20,  # nothing here hangs: a generous limit only keeps a loaded machine green
            "retries": 1,
            "backoff_seconds": 0.05,
            "max_bytes": "50MiB",
        },
        reports={"debounce_seconds": 0},
    )
    daemon = project.start()
    try:
        port = int(
            wait_for(
                lambda: re.search(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text()),
                60,
                "the status server to listen",
            )[1]  # type: ignore[index]
        )

        def settled() -> bool:
            rows = {r["name"]: r for r in status_document(port)["sources"]}
            return (
                len(rows) == 7
                and all(r["polls"] >= 2 for r in rows.values())
                and len(project.results()) == 2
                and len(project.receipts()) == 2
                and (project.outbox / "reports" / "ctwatch-latest.xlsx").exists()
            )

        wait_for(settled, 180, "two polls of every source, two studies, their receipts and the workbook")
        time.sleep(0.5)  # let the workbook writer finish what the last study started
        port_text = [get(port, path)[1] for path in ("/status", "/metrics", "/health", "/")]
        rows = {r["name"]: r for r in status_document(port)["sources"]}
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, project.log_text()[-3000:]

    # What is served is our words: a category, a status code and the fix.
    origin = f"http://127.0.0.1:{hostile.port}"
    assert {name: rows[name]["url"] for name in paths} == {
        name: origin + path for name, path in paths.items()
    }
    assert rows["pacs"]["url"] == origin + "/dicom-web"
    errors = {name: row["last_error"] for name, row in rows.items()}
    assert rows["latest"]["successes"] >= 1 and rows["latest"]["arrivals"] == 1
    assert errors["private"] == f"download failed: HTTP 401 — {TOKEN_HINT}"
    assert errors["portal"] is not None and errors["portal"].startswith(
        "download failed: not DICOM (Content-Type text/html) — "
    )
    assert errors["moved"] == "download failed: HTTP 503 after a redirect, gave up after 2 attempts"
    assert errors["away"] is not None and errors["away"].startswith("download failed: redirect refused — ")
    assert errors["huge"] == (
        "download failed: too large (1.0 TiB announced, fetch.max_bytes = 50.0 MiB) — "
        "raise fetch.max_bytes if it is genuine"
    )
    assert errors["pacs"] == f"2 studies not fetched, first: retrieve failed: HTTP 401 — {TOKEN_HINT}"
    assert rows["pacs"]["arrivals"] == 1

    # Nothing planted anywhere.
    places: dict[str, str] = {f"port {i}": text for i, text in enumerate(port_text)}
    places["daemon output"] = project.log_text()
    for log_file in (project.state_path.parent).glob("ctwatch.log*"):
        places[log_file.name] = log_file.read_text(errors="replace")
    for path in project.outbox.rglob("*.json"):
        places[str(path.relative_to(project.outbox))] = path.read_text()
    places["workbook"] = workbook_text(project.outbox / "reports" / "ctwatch-latest.xlsx")
    places["ctwatch status"] = project.run("status").stdout
    for table, column, value in database_texts(project.state_path):
        if (table, column) == ("sources", "etag"):
            assert value == PLANTED_ETAG, "the ETag is kept only to be sent back to the same server"
            continue
        places[f"sqlite {table}.{column}"] = value
    found = {place: leaks(text) for place, text in places.items() if leaks(text)}
    assert found == {}, found
    assert any(path.parent.name == "receipts" for path in project.outbox.rglob("*.json"))
    assert (
        len(places["daemon output"]) > 1000
        and "source.poll source=private outcome=error" in (places["daemon output"])
    )
    names = {doc["name"] for doc in project.receipts()}
    assert "latest.zip" in names, "an http arrival is named after the configured URL's path, not the server"
    result_urls = {json.loads(p.read_text())["source"]["url"] for p in project.results()}
    assert result_urls == {origin + "/exports/latest.zip", f"{origin}/dicom-web/studies/{hostile.good_uid}"}


# ---------------------------------------------------------------------------------------------- old rows
def test_rows_an_older_ctwatch_wrote_are_cleaned_and_never_served(tmp_path: Path) -> None:
    db = tmp_path / "state" / "ctwatch.db"
    State(db).close()
    verbatim_url = f"http://user:{PASSWORD}@127.0.0.1:8042/x/export.zip?{SIGNED}#{NAME}"
    verbatim_error = (
        f"WADO-RS retrieve of study {UID}: HTTP 401 {REASON} from {verbatim_url} (after a redirect); "
        "check the token named in auth.bearer_env and its permissions"
    )
    result = {"source": {"kind": "http", "url": verbatim_url}, "study_uid": "1.2.3"}

    def write_old_rows() -> None:
        conn = sqlite3.connect(db)
        try:
            conn.execute(
                "insert or replace into sources (name, kind, url, polls, failures, last_error, last_error_at) "
                "values ('old', 'http', ?, 1, 1, ?, '2025-03-04T10:00:00+00:00')",
                [verbatim_url, verbatim_error],
            )
            conn.execute(
                "insert into arrivals (kind, name, sha256, state, source_name, source_url) "
                "values ('http', 'export.zip', 'ab', 'done', 'old', ?)",
                [verbatim_url],
            )
            arrival = conn.execute("select max(id) from arrivals").fetchone()[0]
            conn.execute(
                "insert into studies (arrival_id, study_uid, result_json) values (?, '1.2.3', ?)",
                [arrival, json.dumps(result)],
            )
            conn.commit()
        finally:
            conn.close()

    # Served reduced even before the migration ran (a row written after it, by whatever means).
    write_old_rows()
    server = StatusServer(
        db, Probes(version="t", device="cpu", pipeline={"name": "p", "version": 1}), "127.0.0.1", 0
    )
    server.start()
    try:
        assert server.port is not None
        served = [get(server.port, path)[1] for path in ("/status", "/metrics", "/")]
        [row] = status_document(server.port)["sources"]
    finally:
        server.stop()
    assert [leaks(text) for text in served] == [[], [], []]
    assert row["url"] == "http://127.0.0.1:8042/x/export.zip"
    assert row["last_error"] == (
        "retrieve failed: HTTP 401 after a redirect — check the token named in auth.bearer_env and its permissions"
    )

    # The migration cleans what an older ctwatch stored.
    conn = sqlite3.connect(db)
    conn.execute("delete from _migrations where name = '0008_redact_sources'")
    conn.commit()
    conn.close()
    State(db).close()
    stored = {f"{t}.{c}": v for t, c, v in database_texts(db) if leaks(v)}
    assert stored == {}, stored
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("select url, last_error from sources").fetchone() == (
            row["url"],
            row["last_error"],
        )
        assert conn.execute("select source_url from arrivals").fetchone() == (row["url"],)
        [(document,)] = conn.execute("select result_json from studies").fetchall()
        assert json.loads(document) == {"source": {"kind": "http", "url": row["url"]}, "study_uid": "1.2.3"}
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------- step errors
STEP_PLANTS = {  # legacy rows (no category): step id → (status, error text with a name, a UID, a path)
    "series": ("failed", f"no eligible series: series 2 ({NAME} CHEST {UID}): 10 slices < 20"),
    "volume": ("not_run", "an earlier step failed"),
    "clip": ("skipped", f"weights not installed: /data/{NAME}/{UID}/CT_VocabFine_v2.pt"),
    "head": ("skipped", "needs ctclip_latent, which an earlier skipped step did not provide"),
    "lungs": ("skipped", f"the pixel spacing of {NAME}.dcm is unknown ({UID})"),
}


def test_step_errors_reach_the_port_as_categories_only(tmp_path: Path) -> None:
    """Step error texts carry what a study carries (series descriptions, file names, UIDs): the port
    serves each step's counts, last failure and reasons as a category in our words, never the text —
    for rows written before categories were stored (the migration files them) and after."""
    from processor.config import load_settings
    from processor.pipeline.spec import load_pipeline
    from processor.pipeline.step import StepEnv
    from processor.status import pipeline_plan
    from processor.steps import default_registry
    from processor.vocab import StepProblem

    (tmp_path / "p").mkdir()
    project = Project(
        tmp_path / "p",
        pipeline_steps=[
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "lungs", "uses": "quantify.lungs"},
            {"id": "fusion", "uses": "fusion.lightgbm"},
        ],
    )
    db = project.state_path
    db.parent.mkdir(parents=True)
    State(db).close()
    conn = sqlite3.connect(db)  # as an older ctwatch left it: no category column, rows with raw texts
    try:
        for (index,) in conn.execute(
            "select name from sqlite_master where type = 'index' and tbl_name = 'step_runs' and sql like '%finished_at%'"
        ).fetchall():
            conn.execute(f'drop index "{index}"')
        conn.execute("alter table step_runs drop column problem")
        conn.execute("delete from _migrations where name = '0012_step_problems'")
        conn.execute(
            "insert into arrivals (kind, name, sha256, state) values ('zip', ?, 'ab', 'done')",
            [f"{NAME}.zip"],
        )
        for step, (status, error) in STEP_PLANTS.items():
            conn.execute(
                "insert into step_runs (arrival_id, study_uid, step_id, uses, status, seconds, error, finished_at) "
                "values (1, ?, ?, 'x', ?, 0.1, ?, '2025-03-04T10:00:00+00:00')",
                [UID, step, status, error],
            )
        conn.commit()
    finally:
        conn.close()
    state = State(db)  # the migration files the old rows
    try:
        filed = {r["step_id"]: r["problem"] for r in state.db.query("select step_id, problem from step_runs")}
        assert filed == {
            "series": "unrecorded",
            "volume": "earlier_failed",
            "clip": "model_missing",
            "head": "needs_skipped",
            "lungs": "withheld",
        }
        arrival = state.register_arrival(
            kind="zip",
            name=f"{NAME}.zip",
            original_path=f"/in/{NAME}.zip",
            current_path=f"/in/{NAME}.zip",
            sha256="cd" * 32,
            size=1,
            pipeline_name="test-ct",
            pipeline_version=1,
        )
        steps = [  # today's runs, as the recorder stores them
            {
                "step_id": "series",
                "uses": "dicom.select_series",
                "status": "done",
                "seconds": 0.1,
                "error": None,
            },
            {
                "step_id": "volume",
                "uses": "ct.volume",
                "status": "failed",
                "seconds": 0.2,
                "error": f"cannot read {NAME}/{UID}.dcm: bad JPEG",
                "problem": StepProblem.STUDY,
            },
            {
                "step_id": "lungs",
                "uses": "quantify.lungs",
                "status": "not_run",
                "seconds": 0.0,
                "error": "an earlier step failed",
                "problem": StepProblem.EARLIER_FAILED,
            },
        ]
        state.record_study(arrival.arrival_id, UID, {"status": "Failure", "error": f"{NAME} {UID}"}, steps)
    finally:
        state.close()

    settings = load_settings(project.config)
    pipeline = load_pipeline(settings.pipeline, default_registry(), StepEnv(settings.root, "cpu"))
    server = StatusServer(
        db,
        Probes(
            version="t",
            device="cpu",
            pipeline={"name": "test-ct", "version": 1},
            plan=lambda: pipeline_plan(pipeline, settings),
        ),
        "127.0.0.1",
        0,
    )
    server.start()
    try:
        assert server.port is not None
        served = {path: get(server.port, path)[1] for path in ("/status", "/metrics", "/")}
        steps_served = {row["step"]: row for row in status_document(server.port)["steps"]}
    finally:
        server.stop()
    assert {path: leaks(text) for path, text in served.items()} == {"/status": [], "/metrics": [], "/": []}
    assert list(steps_served) == [
        "series",
        "volume",
        "lungs",
        "fusion",
    ]  # old ids without runs today: not listed
    assert steps_served["volume"]["today"] == {"done": 0, "skipped": 0, "failed": 1, "not_run": 0}
    assert steps_served["volume"]["last_failure"]["problem"] == "study"
    assert steps_served["series"]["last_failure"]["problem"] == "unrecorded"  # the old row: no newer failure
    assert steps_served["series"]["today"] == {"done": 1, "skipped": 0, "failed": 0, "not_run": 0}
    assert steps_served["fusion"]["today"] == {"done": 0, "skipped": 0, "failed": 0, "not_run": 0}
    assert steps_served["fusion"]["next_study"]["words"] == (
        "model file missing: weights/fusion/model.txt, weights/fusion/card.json"
    )
    assert "could not process the study (its row in the Excel report says why)" in served["/"]
    assert 'ctwatch_step_last_failure_timestamp_seconds{step="volume",problem="study"}' in served["/metrics"]


# ---------------------------------------------------------------------------------------------- pure logic
_secret = st.sampled_from([NAME, UID, SIGNATURE, f"sig={SIGNATURE}", f"X-Amz-Signature={SIGNATURE}"])
_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@given(
    scheme=st.sampled_from(["http", "https", "HTTP"]),
    user=st.sampled_from(["", "user@", f"user:{PASSWORD}@", f":{PASSWORD}@"]),
    host=st.sampled_from(["127.0.0.1", "pacs.example.org", "[::1]"]),
    port=st.sampled_from(["", ":8042", ":99999"]),
    path=st.sampled_from(["", "/", "/dicom-web", "/a/b.zip", "/a%20b/c.zip"]),
    query=st.sampled_from(["", "?", f"?{SIGNED}", f"?x=1&sig={SIGNATURE}"]),
    fragment=st.sampled_from(["", "#", f"#{NAME}"]),
)
def test_redact_url_keeps_scheme_host_port_and_path_only(
    scheme: str, user: str, host: str, port: str, path: str, query: str, fragment: str
) -> None:
    url = f"{scheme}://{user}{host}{port}{path}{query}{fragment}"
    redacted = redact_url(url)
    assert leaks(redacted) == [] and "?" not in redacted and "#" not in redacted and "@" not in redacted
    assert redacted.lower().startswith(f"{scheme.lower()}://") and redacted.endswith(path)
    assert redact_url(redacted) == redacted


@given(before=_text, secret=_secret, after=_text, code=st.integers(100, 599))
def test_any_stored_error_is_reduced_to_our_words(before: str, secret: str, after: str, code: int) -> None:
    for text in (
        f"{before}{secret}{after}",
        f"WADO-RS retrieve of study {UID}: HTTP {code} {secret}{after}",
        f"GET http://h/x?{SIGNED}: ConnectError: {secret} (gave up after 3 attempts)",
        f"download failed: HTTP {code} ({secret}) — {secret}",
        f"poll failed: token not set ({secret}) — {before}",
    ):
        reduced = reduce_source_error(text)
        assert reduced is not None and leaks(reduced) == [], (text, reduced)
        assert reduce_source_error(reduced) == reduced


@given(
    what=st.sampled_from(list(What)),
    failure=st.sampled_from(list(Failure)),
    status=st.one_of(st.none(), st.integers(100, 599)),
    detail=st.one_of(
        st.none(),
        st.sampled_from(
            ["no Content-Type", "fetch.max_bytes = 1.0 GiB", "2.0 KiB announced, fetch.max_bytes = 1 B"]
        ),
        st.sampled_from([f"Content-Type {t}" for t in CONTENT_TYPES]),
        _secret,
    ),
    redirect=st.booleans(),
    attempts=st.one_of(st.none(), st.integers(1, 20)),
    studies=st.one_of(st.none(), st.integers(1, 500)),
)
def test_a_source_failure_reads_back_as_itself(
    what: What,
    failure: Failure,
    status: int | None,
    detail: str | None,
    redirect: bool,
    attempts: int | None,
    studies: int | None,
) -> None:
    built = SourceFailure(what, failure, status, detail, redirect, attempts, studies)
    assert leaks(str(built)) == []
    assert SourceFailure.parse(str(built)) == built
