"""http URL sources against a real http.server on 127.0.0.1: conditional GET, caps, redirects, retries."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from processor.config import Settings, load_settings
from processor.daemon import build
from processor.errors import ConfigError
from processor.intake.poller import SourcePoller, SourceThreads
from processor.intake.register import Intake
from processor.state import State
from tests.conftest import Project
from tests.dicomgen import make_series, to_bytes, write_zip

NOW = datetime(2025, 3, 4, 10, 0, tzinfo=UTC)
Route = Callable[[BaseHTTPRequestHandler], None]


class Site:
    """A real HTTP server whose routes the test sets; it records every request it sees."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str], float]] = []
        self.release = threading.Event()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                site.requests.append(
                    (self.path, {k.lower(): v for k, v in self.headers.items()}, time.monotonic())
                )
                route = site.routes.get(self.path)
                try:
                    if route is None:
                        self.send_error(404)
                    else:
                        route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout, refused body): expected in these tests

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = False  # server_close() joins the handler threads
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, name="ctwatch-test-http"
        )

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> list[tuple[str, dict[str, str], float]]:
        return [r for r in self.requests if r[0] == path]

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.thread.join(10)
        self.server.server_close()


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    s.start()
    try:
        yield s
    finally:
        s.stop()


def send(handler: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    """One response; ``Content_Length=""`` sends none (the body then ends when the connection closes)."""
    handler.send_response(status)
    length = headers.pop("Content_Length", str(len(body)))
    if length:
        handler.send_header("Content-Length", length)
    for key, value in headers.items():
        handler.send_header(key.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


class Export:
    """A ZIP a 'modality' keeps replacing, served with an ETag and If-None-Match support."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.version = 0
        self.body = b""
        self.change()

    def change(self) -> None:
        self.version += 1
        self.body = write_zip(self.folder / f"export{self.version}.zip", make_series(24)).read_bytes()

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.body).hexdigest()[:16] + '"'

    def __call__(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("If-None-Match") == self.etag:
            send(handler, 304, ETag=self.etag)
        else:
            send(handler, 200, self.body, Content_Type="application/zip", ETag=self.etag)


def configure(tmp_path: Path, sources: list[dict], **fetch: object) -> tuple[Project, Settings]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    project = Project(
        tmp_path,
        sources=sources,
        fetch={
            "allow_hosts": ["127.0.0.1"],
            "timeout_seconds": 5,
            "retries": 2,
            "backoff_seconds": 0.05,
            **fetch,
        },
    )
    return project, load_settings(project.config)


def poller_for(settings: Settings) -> SourcePoller:
    def make_intake(state: State) -> Intake:
        return Intake(
            state,
            pipeline_name="test-ct",
            pipeline_version=1,
            inbox_dirs=settings.inbox.dirs,
            outbox=settings.outbox,
        )

    return SourcePoller(settings, settings.state, make_intake, rng=random.Random(5))


def source_row(settings: Settings, name: str) -> dict:
    state = State(settings.state)
    try:
        return next(r for r in state.sources() if r["name"] == name)
    finally:
        state.close()


def staging_is_empty(settings: Settings) -> bool:
    staging = settings.inbox.dirs[0] / ".ctwatch" / "fetch"
    return not staging.exists() or not any(p.is_file() for p in staging.rglob("*"))


# ---------------------------------------------------------------------------------------------- tests
def test_conditional_get_turns_each_changed_body_into_one_arrival(tmp_path: Path, site: Site) -> None:
    export = Export(tmp_path / "site")
    site.routes["/exports/latest.zip"] = export
    project, settings = configure(
        tmp_path / "p",
        [{"name": "scanner-export", "kind": "http", "url": site.url("/exports/latest.zip"), "every": "5m"}],
    )
    poller = poller_for(settings)
    assert poller.schedule() == [("scanner-export", 300.0)]

    first = poller.poll("scanner-export", NOW)
    assert first.ok and len(first.arrivals) == 1, first
    again = poller.poll("scanner-export", NOW)
    assert again.ok and again.arrivals == [] and again.detail == "not modified (304)"
    assert site.hits("/exports/latest.zip")[1][1]["if-none-match"] == export.etag
    export.change()
    changed = poller.poll("scanner-export", NOW)
    assert changed.ok and len(changed.arrivals) == 1 and changed.arrivals != first.arrivals

    components = build(settings)
    try:
        state = components.state
        arrival = state.arrival(changed.arrivals[0])
        assert (arrival.kind, arrival.source_name, arrival.name) == ("http", "scanner-export", "latest.zip")
        assert arrival.source_url == site.url("/exports/latest.zip")
        assert arrival.sha256 == hashlib.sha256(export.body).hexdigest()
        assert components.executor(state).process(state.claim(arrival.id)) == "done"
    finally:
        components.state.close()
    [result_path] = project.results()
    source = json.loads(result_path.read_text())["source"]
    assert source["kind"] == "http" and source["source_name"] == "scanner-export"
    assert source["url"] == site.url("/exports/latest.zip")
    assert staging_is_empty(settings)

    row = source_row(settings, "scanner-export")
    assert (row["polls"], row["successes"], row["failures"], row["arrivals"]) == (3, 3, 0, 2)
    status = project.run("status")
    assert status.returncode == 0, status.stderr
    assert "scanner-export  [http, every 300s]" in status.stdout and "arrivals=2" in status.stdout


def test_same_body_without_etag_is_not_taken_twice(tmp_path: Path, site: Site) -> None:
    body = write_zip(tmp_path / "a.zip", make_series(3)).read_bytes()
    site.routes["/plain.zip"] = lambda h: send(h, 200, body, Last_Modified="Tue, 04 Mar 2025 09:00:00 GMT")
    _, settings = configure(
        tmp_path / "p", [{"name": "plain", "kind": "http", "url": site.url("/plain.zip")}]
    )
    poller = poller_for(settings)
    assert len(poller.poll("plain", NOW).arrivals) == 1
    second = poller.poll("plain", NOW)  # this server ignores If-Modified-Since and sends it all again
    assert second.ok and second.arrivals == [] and second.detail.startswith("unchanged body")
    assert site.hits("/plain.zip")[1][1]["if-modified-since"] == "Tue, 04 Mar 2025 09:00:00 GMT"
    assert staging_is_empty(settings)


def test_application_dicom_becomes_a_dcm_arrival_and_html_is_refused(tmp_path: Path, site: Site) -> None:
    dcm = to_bytes(make_series(1)[0])
    site.routes["/scanner/current"] = lambda h: send(h, 200, dcm, Content_Type="application/dicom")
    site.routes["/login"] = lambda h: send(h, 200, b"<html>please log in</html>", Content_Type="text/html")
    _, settings = configure(
        tmp_path / "p",
        [
            {"name": "modality", "kind": "http", "url": site.url("/scanner/current")},
            {"name": "portal", "kind": "http", "url": site.url("/login")},
        ],
    )
    poller = poller_for(settings)
    outcome = poller.poll("modality", NOW)
    state = State(settings.state)
    try:
        assert state.arrival(outcome.arrivals[0]).name == "current.dcm"
    finally:
        state.close()
    refused = poller.poll("portal", NOW)
    assert refused.error == (
        "download failed: not DICOM (Content-Type text/html) — the body is neither a ZIP nor a DICOM "
        "file; point the source at a .zip or .dcm"
    )
    assert source_row(settings, "portal")["last_error"] == refused.error
    assert staging_is_empty(settings)


def test_body_above_the_cap_is_refused_with_a_reason(tmp_path: Path, site: Site) -> None:
    def huge(h: BaseHTTPRequestHandler) -> None:
        send(
            h,
            200,
            b"PK\x03\x04" + b"\0" * 1000,
            Content_Type="application/zip",
            Content_Length=str(4 * 2**30),
        )

    site.routes["/huge.zip"] = huge
    site.routes["/stream.zip"] = lambda h: send(h, 200, b"PK\x03\x04" + b"\0" * 300_000, Content_Length="")
    _, settings = configure(
        tmp_path / "p",
        [
            {"name": "huge", "kind": "http", "url": site.url("/huge.zip")},
            {"name": "stream", "kind": "http", "url": site.url("/stream.zip")},
        ],
        max_bytes="100KiB",
    )
    poller = poller_for(settings)
    outcome = poller.poll("huge", NOW)
    assert not outcome.ok and outcome.arrivals == []
    assert outcome.error == (
        "download failed: too large (4.0 GiB announced, fetch.max_bytes = 100.0 KiB) — "
        "raise fetch.max_bytes if it is genuine"
    )
    assert len(site.hits("/huge.zip")) == 1, "a refusal is not retried"
    assert source_row(settings, "huge")["last_error"] == outcome.error

    streamed = poller.poll("stream", NOW)  # no Content-Length: the cap stops the download itself
    assert not streamed.ok and "too large (fetch.max_bytes = 100.0 KiB)" in (streamed.error or "")
    assert staging_is_empty(settings)


def test_redirects_stay_on_allowed_hosts(tmp_path: Path, site: Site) -> None:
    export = Export(tmp_path / "site")
    site.routes["/exports/latest.zip"] = export
    site.routes["/moved"] = lambda h: send(h, 302, Location=site.url("/exports/latest.zip", host="localhost"))
    site.routes["/hop"] = lambda h: send(h, 302, Location="/exports/latest.zip")
    site.routes["/file"] = lambda h: send(h, 302, Location="file:///etc/passwd")
    _, settings = configure(
        tmp_path / "p",
        [
            {"name": "moved", "kind": "http", "url": site.url("/moved")},
            {"name": "hop", "kind": "http", "url": site.url("/hop")},
            {"name": "file", "kind": "http", "url": site.url("/file")},
        ],
    )
    poller = poller_for(settings)
    moved = poller.poll("moved", NOW)
    assert moved.error is not None and moved.error.startswith("download failed: redirect refused — ")
    assert "add that host to fetch.allow_hosts" in moved.error and "localhost" not in moved.error
    assert site.hits("/exports/latest.zip") == [], "the refused redirect target was never requested"
    assert len(site.hits("/moved")) == 1
    file_redirect = poller.poll("file", NOW)
    assert file_redirect.error == moved.error and "passwd" not in file_redirect.error
    hop = poller.poll("hop", NOW)
    assert hop.ok and len(hop.arrivals) == 1


def test_config_refuses_other_schemes_inline_credentials_and_unlisted_hosts(tmp_path: Path) -> None:
    for url, message in [
        ("file:///etc/passwd", "only http:// and https://"),
        ("ftp://h/x.zip", "ftp scheme"),
        ("http://user:pw@127.0.0.1/x.zip", "credentials must not be written into the URL"),
    ]:
        folder = tmp_path / hashlib.sha256(url.encode()).hexdigest()[:8]
        folder.mkdir()
        project = Project(folder, sources=[{"name": "s", "kind": "http", "url": url}])
        with pytest.raises(ConfigError, match="sources.0.url") as info:
            load_settings(project.config)
        assert message in str(info.value)
    (tmp_path / "unlisted").mkdir()
    project = Project(
        tmp_path / "unlisted",
        sources=[
            {"name": "a", "kind": "http", "url": "https://pacs.example.org/x.zip"},
            {
                "name": "a",
                "kind": "dicomweb",
                "url": "http://127.0.0.1:8042/dicom-web",
                "every": "2m",
                "lookback": "2d",
            },
        ],
    )
    settings = load_settings(project.config)
    assert settings.sources[1].every == 120 and settings.sources[1].lookback == 2 * 86400
    with pytest.raises(ConfigError) as info:
        poller_for(settings)
    assert "add pacs.example.org to fetch.allow_hosts" in str(info.value)
    assert "two sources have this name" in str(info.value)


def test_bearer_token_comes_from_the_environment_and_is_never_kept(
    tmp_path: Path, site: Site, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-3f9a1c77d2-secret"
    export = Export(tmp_path / "site")

    def guarded(h: BaseHTTPRequestHandler) -> None:
        if h.headers.get("Authorization") != f"Bearer {token}":
            send(h, 401, b"unauthorized")
        else:
            export(h)

    site.routes["/secure.zip"] = guarded
    project, settings = configure(
        tmp_path / "p",
        [
            {
                "name": "secure",
                "kind": "http",
                "url": site.url("/secure.zip"),
                "auth": {"bearer_env": "CTWATCH_TEST_TOKEN"},
            }
        ],
    )
    poller = poller_for(settings)
    monkeypatch.delenv("CTWATCH_TEST_TOKEN", raising=False)
    missing = poller.poll("secure", NOW)
    assert not missing.ok and site.requests == []
    assert (missing.error or "").startswith("poll failed: token not set — export the environment variable ")
    assert "source.token_missing env=CTWATCH_TEST_TOKEN" in caplog.text, "the log names the variable"

    monkeypatch.setenv("CTWATCH_TEST_TOKEN", token)
    caplog.set_level(logging.DEBUG)
    assert len(poller.poll("secure", NOW).arrivals) == 1
    status = project.run("status")
    stored = b"".join(p.read_bytes() for p in settings.state.parent.glob("ctwatch.db*"))
    assert token.encode() not in stored
    assert token not in caplog.text and token not in status.stdout + status.stderr
    assert token not in project.config.read_text()


def test_5xx_is_retried_with_backoff_and_4xx_is_not(tmp_path: Path, site: Site) -> None:
    export = Export(tmp_path / "site")
    calls = {"n": 0}

    def flaky(h: BaseHTTPRequestHandler) -> None:
        calls["n"] += 1
        send(h, 503, b"busy") if calls["n"] <= 2 else export(h)

    site.routes["/flaky.zip"] = flaky
    site.routes["/down.zip"] = lambda h: send(h, 500, b"boom")
    _, settings = configure(
        tmp_path / "p",
        [
            {"name": "flaky", "kind": "http", "url": site.url("/flaky.zip")},
            {"name": "down", "kind": "http", "url": site.url("/down.zip")},
            {"name": "gone", "kind": "http", "url": site.url("/gone.zip")},
        ],
        retries=3,
        backoff_seconds=0.1,
    )
    poller = poller_for(settings)

    flaky_outcome = poller.poll("flaky", NOW)
    assert flaky_outcome.ok and len(flaky_outcome.arrivals) == 1 and len(site.hits("/flaky.zip")) == 3

    down = poller.poll("down", NOW)
    times = [t for _, _, t in site.hits("/down.zip")]
    assert len(times) == 4 and "gave up after 4 attempts" in (down.error or "")
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    for k, gap in enumerate(gaps):  # exponential: 0.1·2^k scaled by jitter in [0.5, 1]
        assert gap >= 0.5 * 0.1 * 2**k - 0.01, gaps
    row = source_row(settings, "down")
    assert (row["failures"], row["successes"]) == (1, 0)
    assert row["last_error"] == "download failed: HTTP 500, gave up after 4 attempts"

    gone = poller.poll("gone", NOW)
    assert gone.error == "download failed: HTTP 404 — check the source's url"
    assert len(site.hits("/gone.zip")) == 1


def test_a_timing_out_source_never_stalls_other_sources_or_the_inbox(tmp_path: Path, site: Site) -> None:
    export = Export(tmp_path / "site")
    site.routes["/exports/latest.zip"] = export
    site.routes["/hang.zip"] = lambda h: (site.release.wait(15), send(h, 200, b"late"))
    project, settings = configure(
        tmp_path / "p",
        [
            {"name": "slow", "kind": "http", "url": site.url("/hang.zip")},
            {"name": "healthy", "kind": "http", "url": site.url("/exports/latest.zip")},
        ],
        timeout_seconds=1,
        retries=2,
        backoff_seconds=0.5,
    )
    poller = poller_for(settings)
    components = build(settings)
    outcomes: dict[str, object] = {}
    slow = threading.Thread(
        target=lambda: outcomes.update(slow=(poller.poll("slow", NOW), time.monotonic())),
        name="ctwatch-test-slow-poll",
    )
    slow.start()
    try:
        deadline = time.monotonic() + 10
        while not site.hits("/hang.zip") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert poller.poll("healthy", NOW).arrivals, "another source is polled while one hangs"
        zipped = write_zip(project.inbox / "walk-in.zip", make_series(24))
        state = components.state
        aid = components.intake.accept(zipped)
        assert aid is not None
        assert components.executor(state).process(state.claim(aid)) == "done"
        inbox_done = time.monotonic()
    finally:
        slow.join(30)
        components.state.close()
    outcome, slow_done = outcomes["slow"]  # type: ignore[misc]
    assert inbox_done < slow_done, "the inbox arrival finished while the slow source was still retrying"
    assert outcome.error == "download failed: timed out, gave up after 3 attempts — see fetch.timeout_seconds"
    assert len(site.hits("/hang.zip")) == 3
    row = source_row(settings, "slow")
    assert row["failures"] == 1 and row["last_error"] == outcome.error
    status = project.run("status")
    assert "slow  [http, every 300s]" in status.stdout and "last error" in status.stdout


def test_stop_interrupts_a_backoff_wait(tmp_path: Path, site: Site) -> None:
    site.routes["/down.zip"] = lambda h: send(h, 502, b"bad gateway")
    _, settings = configure(
        tmp_path / "p",
        [{"name": "down", "kind": "http", "url": site.url("/down.zip")}],
        retries=5,
        backoff_seconds=60,
    )
    poller = poller_for(settings)
    result: list = []
    thread = threading.Thread(
        target=lambda: result.append(poller.poll("down", NOW)), name="ctwatch-test-poll"
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not site.hits("/down.zip") and time.monotonic() < deadline:
        time.sleep(0.02)
    started = time.monotonic()
    poller.stop()
    thread.join(10)
    assert not thread.is_alive() and time.monotonic() - started < 5
    assert result[0].detail == "interrupted by shutdown" and len(site.hits("/down.zip")) == 1


def test_source_threads_poll_at_start_then_on_their_interval_and_stop(tmp_path: Path, site: Site) -> None:
    export = Export(tmp_path / "site")
    site.routes["/exports/latest.zip"] = export
    _, settings = configure(
        tmp_path / "p",
        [{"name": "scanner-export", "kind": "http", "url": site.url("/exports/latest.zip"), "every": "1s"}],
    )
    woken: list[int] = []

    def make_intake(state: State) -> Intake:
        return Intake(
            state,
            pipeline_name="test-ct",
            pipeline_version=1,
            inbox_dirs=settings.inbox.dirs,
            outbox=settings.outbox,
        )

    threads = SourceThreads(SourcePoller(settings, settings.state, make_intake, on_arrival=woken.append))
    threads.start()
    try:
        deadline = time.monotonic() + 10
        while len(site.hits("/exports/latest.zip")) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        threads.stop()
        threads.join(10)
    assert not threads.is_alive()
    hits = site.hits("/exports/latest.zip")
    assert len(hits) >= 2 and hits[1][2] - hits[0][2] >= 0.9, "polled at start, then after every: 1s"
    assert len(woken) == 1, "the worker is woken for the one new body; the 304 adds nothing"


def test_running_daemon_polls_a_source_into_a_study_json_and_status(tmp_path: Path, site: Site) -> None:
    export = Export(tmp_path / "served")
    site.routes["/latest.zip"] = export
    project, _ = configure(
        tmp_path / "p",
        [{"name": "scanner-export", "kind": "http", "url": site.url("/latest.zip"), "every": "1s"}],
    )
    daemon = project.start()
    try:
        from tests.conftest import wait_for

        wait_for(lambda: project.results(), 60, "the polled study's JSON")
        wait_for(lambda: len(site.hits("/latest.zip")) >= 2, 30, "a second, conditional poll")
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0, project.log_text()[-3000:]
    doc = json.loads(project.results()[0].read_text())
    assert doc["source"]["kind"] == "http" and doc["source"]["source_name"] == "scanner-export"
    assert doc["source"]["url"] == site.url("/latest.zip")
    assert len(project.results()) == 1, "an unchanged body is never processed again"
    assert any("if-none-match" in headers for _, headers, _ in site.hits("/latest.zip")[1:])
    status = project.run("status")
    assert "scanner-export" in status.stdout


def test_transport_failures_are_recorded_as_categories(tmp_path: Path, site: Site) -> None:
    """TLS to a plain-http server and a closed port: the category and our fix, never the library's words."""
    export = Export(tmp_path / "site")
    site.routes["/exports/latest.zip"] = export
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    _, settings = configure(
        tmp_path / "p",
        [
            {"name": "tls", "kind": "http", "url": f"https://127.0.0.1:{site.port}/exports/latest.zip"},
            {"name": "closed", "kind": "http", "url": f"http://127.0.0.1:{closed_port}/x.zip"},
        ],
        retries=0,
    )
    poller = poller_for(settings)
    assert poller.poll("tls", NOW).error == (
        "download failed: TLS error, gave up after 1 attempt — check the server's certificate and the url's scheme"
    )
    assert poller.poll("closed", NOW).error == (
        "download failed: connection refused, gave up after 1 attempt — "
        "check that the server runs and listens on the url's port"
    )
    assert source_row(settings, "tls")["last_error"].startswith("download failed: TLS error")
