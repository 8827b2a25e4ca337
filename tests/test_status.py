"""The status endpoint against a running daemon: real HTTP on 127.0.0.1, read-only, no PHI."""

from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import openpyxl
import pytest

from tests.conftest import Project, wait_for
from tests.dicomgen import PATIENT_ID, PATIENT_NAME, make_series, write_zip

ACCESSION = "ACC12345"
PHI = (PATIENT_NAME, PATIENT_ID, ACCESSION, "CompressedSamples")
# The dropped file is named after the patient, as people do: the name must not reach the port either.
DROPPED_NAME = f"{PATIENT_NAME} {ACCESSION}.zip"
PATHS = ("/", "/health", "/status", "/metrics")


@dataclass
class Running:
    project: Project
    proc: subprocess.Popen[str]
    port: int
    study_uid: str
    bodies: list[str] = field(default_factory=list)

    def request(self, method: str, path: str, timeout: float = 10) -> tuple[int, dict[str, str], str]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.putrequest(method, path, skip_accept_encoding=True)
            conn.endheaders()
            response = conn.getresponse()
            body = response.read().decode("utf-8")
            headers = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        self.bodies.append(body)
        self.bodies.extend(headers.values())
        return response.status, headers, body

    def get_json(self, path: str) -> dict:
        status, headers, body = self.request("GET", path)
        assert status == 200 and headers["content-type"] == "application/json", (status, body)
        return json.loads(body)


def _port(project: Project) -> int | None:
    match = re.search(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text())
    return int(match.group(1)) if match else None


def _db(project: Project, sql: str) -> list[tuple]:
    conn = sqlite3.connect(project.state_path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    root = tmp_path_factory.mktemp("status")
    project = Project(root, reports={"debounce_seconds": 0})
    series = make_series(20, accession=ACCESSION)
    write_zip(project.inbox / DROPPED_NAME, series)
    proc = project.start()
    try:
        port = wait_for(lambda: _port(project), 60, "the status server to listen")
        wait_for(lambda: len(project.results()) == 1, 60, "the first result")
        yield Running(project, proc, int(port), series[0].StudyInstanceUID)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


# ---------------------------------------------------------------------------------------- endpoints
def test_health_is_ct_clip_compatible(daemon: Running) -> None:
    assert daemon.get_json("/health") == {"status": "healthy"}


def test_status_document(daemon: Running) -> None:
    wait_for(lambda: daemon.get_json("/status")["recent_arrivals"][0]["state"] == "done", 30, "done arrival")
    status = daemon.get_json("/status?verbose=1")
    assert status["status"] == "healthy" and status["reasons"] == []
    assert status["version"] and status["uptime_seconds"] >= 0 and status["device"] == "cpu"
    assert status["gpu_memory"] is None
    assert status["pipeline"]["name"] == "test-ct" and status["pipeline"]["version"] == 1
    assert status["queue"] == {"pending_day": 0, "pending_night": 0, "running": 0}
    assert status["today"]["done"] >= 1 and status["today"]["failed"] == 0
    assert status["today"]["by_outcome"]["Success"] == status["today"]["done"]
    first = status["recent_arrivals"][-1]
    assert first["id"] == 1 and first["studies"] == 1 and first["queue"] == "day"
    assert set(first) == {
        "id",
        "state",
        "queue",
        "attempts",
        "received_at",
        "claimed_at",
        "finished_at",
        "studies",
    }
    assert [s["step"] for s in status["steps"]] == ["series"] and status["steps"][0]["mean_seconds"] >= 0
    assert status["models_loaded"] == []
    assert status["disk"]["ok"] is True and {v["volume"] for v in status["disk"]["volumes"]} == {
        "outbox",
        "work",
    }
    assert status["night"]["window"] == "01:00-06:00" and status["night"]["run_on"] is False
    assert {j["id"] for j in status["next_jobs"]} == {"report-rollover", "night-window-start", "rescan"}
    assert status["eta"]["runnable_arrivals"] == 0 and status["eta"]["seconds"] == 0
    assert status["worker"]["alive"] is True


def parse_prometheus(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A strict reader of the text exposition format 0.0.4 (what Prometheus itself accepts)."""
    assert text.endswith("\n")
    name_re = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
    sample_re = re.compile(rf"^({name_re})(?:\{{(.*)\}})? (\S+)$")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
    types: dict[str, str] = {}
    helps: set[str] = set()
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    finished: set[str] = set()
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name = line.split(" ", 3)[2]
            assert re.fullmatch(name_re, name) and name not in helps, line
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"second TYPE line for {name}"
            types[name] = kind
            if current:
                finished.add(current)
            current = name
            continue
        assert not line.startswith("#") and line.strip() == line and line, repr(line)
        match = sample_re.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels_text, value = match.groups()
        assert name == current and name not in finished, f"{name}: samples must follow their TYPE line"
        labels: list[tuple[str, str]] = []
        if labels_text:
            pos = 0
            while pos < len(labels_text):
                lm = label_re.match(labels_text, pos)
                assert lm, f"bad labels in {line!r}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
                if pos < len(labels_text):
                    assert labels_text[pos] == ",", line
                    pos += 1
        assert len({k for k, _ in labels}) == len(labels), f"repeated label in {line!r}"
        key = (name, tuple(sorted(labels)))
        assert key not in samples, f"duplicate series {line!r}"
        samples[key] = float(value) if value not in ("+Inf", "-Inf", "NaN") else float(value.replace("+", ""))
    return samples


def test_metrics_are_prometheus_text(daemon: Running) -> None:
    status, headers, body = daemon.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(body)
    assert samples[("ctwatch_up", ())] == 1
    assert samples[("ctwatch_studies_total", (("status", "Success"),))] >= 1
    assert samples[("ctwatch_queue_depth", (("queue", "day"), ("state", "pending")))] == 0
    assert samples[("ctwatch_step_runs_total", (("step", "series"),))] >= 1
    assert samples[("ctwatch_disk_ok", ())] == 1 and samples[("ctwatch_worker_alive", ())] == 1
    assert samples[("ctwatch_disk_free_bytes", (("volume", "outbox"),))] > 0
    assert ("ctwatch_uptime_seconds", ()) in samples and ("ctwatch_night_window_open", ()) in samples


def test_html_page_refreshes_itself_without_external_assets(daemon: Running) -> None:
    status, headers, body = daemon.request("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta http-equiv="refresh"' in body and "healthy" in body
    assert "default-src 'none'" in headers["content-security-policy"]
    assert not re.search(r"(src|href)\s*=", body, re.I) and "<script" not in body.lower()
    assert "http://" not in body and "https://" not in body


def test_read_only_methods_and_unknown_paths(daemon: Running) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND"):
        for path in (*PATHS, "/nowhere"):
            status, headers, _ = daemon.request(method, path)
            assert status == 405, (method, path, status)
            assert headers["allow"] == "GET"
    for path in (
        "/nowhere",
        "/state/ctwatch.db",
        "/../../config.yaml",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/health/",
        "/status.json",
        "/outbox/reports/ctwatch-latest.xlsx",
        "//etc/passwd",
    ):
        status, headers, body = daemon.request("GET", path)
        assert status == 404, (path, status)
        assert headers["content-type"] == "application/json" and "root:" not in body


def test_slow_client_does_not_stall_the_worker_or_other_clients(daemon: Running, tmp_path: Path) -> None:
    slow = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    try:
        slow.sendall(b"GET /sta")  # ... and never finishes the request line
        later = write_zip(tmp_path / "later.zip", make_series(21, accession=ACCESSION))
        later.replace(daemon.project.inbox / "later.zip")
        started = time.monotonic()
        assert daemon.get_json("/health") == {"status": "healthy"}
        assert time.monotonic() - started < 3
        wait_for(lambda: len(daemon.project.results()) == 2, 60, "the worker to carry on")
        assert slow.recv(1024) == b"", "the server drops a client that never finishes its request"
    finally:
        slow.close()


def test_daemon_writes_the_workbook(daemon: Running) -> None:
    latest = daemon.project.outbox / "reports" / "ctwatch-latest.xlsx"

    def uids() -> set[str]:
        if not latest.exists():
            return set()
        wb = openpyxl.load_workbook(latest, read_only=True)
        try:
            rows = list(wb["Studies"].iter_rows(values_only=True))
            column = rows[0].index("Study UID") if rows else 0
            return {row[column] for row in rows[1:]}
        finally:
            wb.close()

    wait_for(lambda: daemon.study_uid in uids(), 60, "the study in ctwatch-latest.xlsx")


def test_no_phi_in_any_response(daemon: Running) -> None:
    for path in PATHS:
        daemon.request("GET", path)
    assert len(daemon.bodies) > 50
    everything = "\n".join(daemon.bodies)
    for secret in PHI:
        assert secret.lower() not in everything.lower(), f"{secret!r} leaked through the status port"
    assert DROPPED_NAME not in everything and daemon.study_uid not in everything


def test_sigterm_stops_cleanly(daemon: Running) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=60) == 0, daemon.project.log_text()[-3000:]
    assert _db(daemon.project, "select count(*) from arrivals where state = 'running'") == [(0,)]
    log = daemon.project.log_text()
    assert "daemon.stopped" in log and "Traceback" not in log
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", daemon.port), timeout=2).close()
