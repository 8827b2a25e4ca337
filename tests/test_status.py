"""The status endpoint against a running daemon: real HTTP on 127.0.0.1, read-only, no PHI."""

from __future__ import annotations

import html
import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import openpyxl
import pytest

from processor.config import load_settings
from processor.pipeline.registry import StepRegistry
from processor.pipeline.spec import Pipeline, PipelineSpec, compile_steps, load_pipeline
from processor.pipeline.step import Step, StepEnv, StudyContext
from processor.state import State
from processor.status import Probes, collect_status, metrics_text, pipeline_plan, status_html
from processor.status.plan import Forecast, PipelinePlan, PlannedStep, forecast
from processor.status.words import duration_words, night_words, problem_words
from processor.steps import default_registry
from processor.vocab import Priority, StepProblem
from tests.conftest import REPO, Project, wait_for
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


def _register(state: State, name: str, sha_char: str, pipeline: str, **extra: object) -> int:
    """An arrival of ``name`` (sha256 ``sha_char`` × 64) for pipeline ``pipeline`` v1; its id."""
    return state.register_arrival(
        kind="inbox",
        name=name,
        original_path=f"/in/{name}",
        current_path=f"/in/{name}",
        sha256=sha_char * 64,
        size=1,
        pipeline_name=pipeline,
        pipeline_version=1,
        **extra,  # type: ignore[arg-type]
    ).arrival_id


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
    assert status["queue"] == {"pending_urgent": 0, "pending_day": 0, "pending_night": 0, "running": 0}
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
    [series] = status["steps"]
    assert series["name"] == "series selection" and series["in_pipeline"] is True
    assert series["today"]["done"] >= 1 and series["today"]["failed"] == series["today"]["skipped"] == 0
    assert series["next_study"] == {
        "outcome": "runs",
        "problem": None,
        "words": "ready",
        "missing_files": [],
        "unreadable_files": [],
    }
    assert series["last_failure"] is None and series["today_problems"] == []
    assert status["model_files"] == [] and status["model_files_problem"] is None  # this pipeline reads none
    assert status["pipeline_file_changed"] is False
    assert status["summary"][0].startswith(f"Today: {status['today']['done']} stud")
    assert status["summary"][1] == "Every step of the pipeline (1) is ready to run on the next study."
    assert re.fullmatch(r"\d+ (s|min( \d+ s)?)", status["uptime"]), status["uptime"]
    assert status["today"]["since"].endswith("T00:00:00" + status["now"][19:])  # the server's local midnight
    words = status["night"]["words"]  # closed and opening at 01:00, or open (01:00–06:00) until 06:00
    assert ("opens at 01:00" in words or "open now, until 06:00" in words) and "06:00" in words
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
    assert samples[("ctwatch_step_today", (("status", "done"), ("step", "series")))] >= 1
    assert samples[("ctwatch_step_today", (("status", "skipped"), ("step", "series")))] == 0
    assert samples[("ctwatch_step_ready", (("problem", "none"), ("step", "series")))] == 1
    assert samples[("ctwatch_step_model_files_missing", (("step", "series"),))] == 0
    assert samples[("ctwatch_night_window_next_start_timestamp_seconds", ())] > time.time()


def test_html_page_refreshes_itself_without_external_assets(daemon: Running) -> None:
    status, headers, body = daemon.request("GET", "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta http-equiv="refresh"' in body and "healthy" in body
    assert "Every step of the pipeline (1) is ready to run on the next study." in body
    assert re.search(r"<td>up for</td><td>\d+ (s|min)", body)
    assert re.search(r"<td>night window</td><td>(closed now; opens at 01:00|open now, until 06:00)", body)
    assert "<td>series selection (series)</td>" in body and "{&quot;" not in body and '{"' not in body
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
    # every response this module's daemon gave in this process: its other tests' (those that ran
    # in this xdist worker, at the states they drove it to) and these
    for path in PATHS:
        daemon.request("GET", path)
        daemon.request("HEAD", path)
    assert len(daemon.bodies) > 40, "the responses were recorded (bodies and header values)"
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


# ---------------------------------------------------------------------------------------- words
@pytest.mark.parametrize(
    ("seconds", "words"),
    [
        (None, "unknown"),
        (0.4, "0 s"),
        (59.4, "59 s"),
        (60, "1 min"),
        (61, "1 min 1 s"),
        (3600, "1 h"),
        (3660, "1 h 1 min"),
        (86400, "1 day"),
        (2 * 86400 + 3 * 3600 + 5, "2 days 3 h"),
    ],
)
def test_durations_in_words(seconds: float | None, words: str) -> None:
    assert duration_words(seconds) == words


def test_the_night_window_in_words() -> None:
    cet = timezone(timedelta(hours=1), "CET")
    evening = datetime(2026, 11, 29, 22, 30, tzinfo=cet)
    night = {
        "window": "01:00-06:00",
        "open": False,
        "run_on": False,
        "next_start": "2026-11-30T01:00:00+01:00",
    }
    assert night_words(night, evening, 2) == (
        "closed now; opens at 01:00 (in 2 h 30 min) and closes at 06:00 (server time, CET (UTC+01:00)); "
        "2 inputs from the night folder wait for it. Night-folder inputs not finished by 06:00 wait for "
        "the next night."
    )
    at_three = datetime(2026, 11, 30, 3, 0, tzinfo=cet)
    assert night_words({**night, "open": True, "run_on": True}, at_three, 1) == (
        "open now, until 06:00 (server time, CET (UTC+01:00)); 1 input from the night folder still waiting. "
        "A night batch not finished by 06:00 runs on until it is done."
    )
    assert night_words({"window": "00:00-00:00", "open": True}, evening, 0).startswith("open all day")
    assert night_words({}, evening, 0) == "not configured"


def test_the_next_study_is_forecast_as_the_runner_walks_it() -> None:
    """A step with a missing model file is skipped, and so is one that needs only what it gives; with
    ``on_missing_weights: fail`` the study fails there and the rest is not reached."""
    plan = PipelinePlan(
        "skip",
        (
            PlannedStep("volume", "ct.volume", "cpu", (), ("volume",)),
            PlannedStep(
                "clip", "ctclip.zero_shot", "gpu", ("volume",), ("ctclip_latent",), ("weights/a.pt",)
            ),
            PlannedStep(
                "lipro", "ctclip.classify", "gpu", ("volume",), ("ctclip_latent",), ("weights/b.pt",)
            ),
            PlannedStep("head", "ctclip.head", "cpu", ("ctclip_latent",), ("features",)),
            PlannedStep("decision", "decision.pathology", "cpu"),
        ),
    )
    ahead = forecast(plan)
    assert ahead["volume"] == Forecast("runs") and ahead["decision"] == Forecast("runs")
    assert ahead["clip"] == Forecast(
        "skipped", StepProblem.MODEL_MISSING, "model file missing: weights/a.pt", ("weights/a.pt",)
    )
    assert ahead["head"] == Forecast(
        "skipped", StepProblem.NEEDS_SKIPPED, "needs ctclip_latent from clip or lipro, which are skipped"
    )
    failing = forecast(replace(plan, on_missing_weights="fail"))
    assert failing["clip"].outcome == "fails" and failing["clip"].words.startswith(
        "fails every study: model file"
    )
    assert (
        failing["lipro"]
        == failing["head"]
        == failing["decision"]
        == Forecast("not_run", StepProblem.EARLIER_FAILED, "not reached: step clip fails first")
    )


# ---------------------------------------------------------------------------------------- model files now
def _status(project: Project, plan_of: object, pipeline: dict) -> tuple[dict, str, str]:
    """The /status document, page and metrics of ``project``'s database with that plan, in-process."""
    state = State(project.state_path)
    try:
        probes = Probes("test", "cpu", pipeline, plan=plan_of)  # type: ignore[arg-type]
        doc = collect_status(probes, state)
        return doc, html.unescape(status_html(doc)), metrics_text(doc, state.studies_by_status())
    finally:
        state.close()


def test_unreadable_and_missing_model_files_in_a_weights_folder_outside_the_root(tmp_path: Path) -> None:
    """``{not json`` in the caption model's index: that step is forecast to fail, naming the file, the
    others still run and the headline says so; paths show relative to the configured weights folder
    (never absolute); an urgent input waiting is counted as urgent, not day."""
    models = tmp_path / "models"  # the configured weights folder, outside the installation's root
    blip = models / "caption" / "blip2-opt-2.7b"
    blip.mkdir(parents=True)
    (blip / "model.safetensors.index.json").write_text("{not json")
    clip = {
        "checkpoint": str(models / "ct_clip" / "CT_VocabFine_v2.pt"),
        "vocab": str(models / "ct_clip" / "vocab.txt"),
    }
    (tmp_path / "site").mkdir()
    project = Project(
        tmp_path / "site",
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "slices", "uses": "render.key_slices"},
            {
                "id": "caption",
                "uses": "caption.image_to_text",
                "optional": True,
                "with": {"model": str(blip)},
            },
            {"id": "clip", "uses": "ctclip.zero_shot", "optional": True, "with": clip},
        ],
        weights=str(models),
    )
    settings = load_settings(project.config)
    pipeline = load_pipeline(settings.pipeline, default_registry(), StepEnv(settings.root, "cpu"))
    state = State(project.state_path)
    _register(state, "urgent.zip", "c", "test-ct", priority=Priority.URGENT)
    state.close()
    doc, page, metrics = _status(
        project, lambda: pipeline_plan(pipeline, settings), {"name": "test-ct", "version": 1}
    )

    index = "<weights>/caption/blip2-opt-2.7b/model.safetensors.index.json"
    steps = {s["step"]: s["next_study"] for s in doc["steps"]}
    assert steps["caption"] == {
        "outcome": "fails",
        "problem": "model_unusable",
        "words": f"model file unreadable: {index}",
        "missing_files": [],
        "unreadable_files": [index],
    }
    assert steps["clip"]["outcome"] == "skipped" and steps["clip"]["missing_files"] == [
        "<weights>/ct_clip/CT_VocabFine_v2.pt",
        "<weights>/ct_clip/vocab.txt",
    ]
    assert [steps[s]["outcome"] for s in ("series", "volume", "slices")] == ["runs"] * 3
    assert doc["summary"][1].startswith(
        "2 of 5 steps will not run on the next study — model file could not be loaded"
    )
    assert "captioning; model file missing: CT-CLIP zero-shot. See Model files below." in doc["summary"][1]
    files = {f["file"]: f["status"] for f in doc["model_files"]}
    assert files[index] == "UNREADABLE" and files["<weights>/ct_clip/vocab.txt"] == "missing"
    assert f"fails: model file unreadable: {index}" in page
    assert "2 of 4 missing: install them in the weights folder the config names (`weights:`" in page
    assert "1 cannot be read: copy that model folder again" in page and "under weights/" not in page
    for text in (json.dumps(doc), page, metrics):
        assert str(tmp_path) not in text  # no absolute path leaves the port
    # the urgent lane: in /status, on the page and in /metrics, not counted under day
    assert doc["queue"] == {"pending_urgent": 1, "pending_day": 0, "pending_night": 0, "running": 0}
    assert doc["eta"]["runnable_arrivals"] == 1 and "pending urgent: 1, pending day: 0" in page
    samples = parse_prometheus(metrics)
    assert samples[("ctwatch_queue_depth", (("queue", "urgent"), ("state", "pending")))] == 1
    assert samples[("ctwatch_queue_depth", (("queue", "day"), ("state", "pending")))] == 0


class Model(Step):
    uses = "test.model"
    summary = "reads weights/m.bin"

    def weight_files(self) -> list[Path]:
        return [self.env.root / "weights" / "m.bin"]

    def run(self, ctx: StudyContext) -> None:
        ctx.result["model"] = True


class Plain(Step):
    uses = "test.plain"
    summary = "needs no model"

    def run(self, ctx: StudyContext) -> None:
        ctx.result["plain"] = True


def test_a_model_that_failed_is_forecast_to_fail_until_its_files_change(tmp_path: Path) -> None:
    """The last run of a step failed with ``model_unusable`` and its file has not changed since: the
    forecast says it will fail (not "runs"), and so does the headline; once the file is replaced it
    says "runs" again. The headline words today's Partial study (an optional step failed) and the
    input that failed before any result from those facts."""
    project = Project(tmp_path)
    (tmp_path / "weights").mkdir()
    model = tmp_path / "weights" / "m.bin"
    model.write_bytes(b"corrupt")
    registry = StepRegistry()
    registry.register(Model)
    registry.register(Plain)
    spec = PipelineSpec.model_validate(
        {
            "name": "t",
            "version": 1,
            "steps": [
                {"id": "model", "uses": "test.model", "optional": True},
                {"id": "plain", "uses": "test.plain"},
            ],
        }
    )
    compiled, problems = compile_steps(spec, registry, StepEnv(tmp_path))
    assert not problems
    pipeline = Pipeline("t", 1, "skip", tuple(compiled), project.pipeline, "x")
    settings = load_settings(project.config)
    failed_at = datetime.now(UTC) + timedelta(seconds=2)  # after the file was written (ISO seconds)
    stamp = failed_at.isoformat(timespec="seconds")
    state = State(project.state_path)
    try:
        arrival = _register(state, "a.zip", "d", "t")
        state.db.execute("update arrivals set state = 'done', finished_at = ? where id = ?", [stamp, arrival])
        state.db.table("studies").insert(
            {"arrival_id": arrival, "study_uid": "1.2.3", "status": "Partial", "finished_at": stamp}
        )
        for step_id, uses, status, problem in (
            ("model", "test.model", "failed", "model_unusable"),
            ("plain", "test.plain", "done", None),
        ):
            state.db.table("step_runs").insert(
                {
                    "arrival_id": arrival,
                    "study_uid": "1.2.3",
                    "step_id": step_id,
                    "uses": uses,
                    "status": status,
                    "seconds": 0.1,
                    "error": "cannot load weights/m.bin" if problem else None,
                    "problem": problem,
                    "finished_at": stamp,
                }
            )
        crashed = _register(state, "b.zip", "e", "t")
        state.db.execute(
            "update arrivals set state = 'failed', finished_at = ? where id = ?", [stamp, crashed]
        )
    finally:
        state.close()
    plan_now = lambda: pipeline_plan(pipeline, settings)  # noqa: E731 — the daemon's probe, as it is
    doc, page, _ = _status(project, plan_now, {"name": "t", "version": 1})
    ahead = {s["step"]: s["next_study"] for s in doc["steps"]}
    assert ahead["model"]["outcome"] == "fails" and ahead["model"]["problem"] == "model_unusable"
    assert ahead["model"]["words"] == "will fail: model file unusable (failed today: 1)"
    assert ahead["plain"]["outcome"] == "runs"
    assert doc["summary"] == [
        "Today: 1 study processed — 0 with every step, 1 partly (some steps failed), 0 failed; 1 input "
        "failed before any result (ctwatch crashed on it or an internal error; the Excel report says which).",
        "1 of 2 steps will not run on the next study — model file could not be loaded (corrupt, incomplete "
        "or the wrong kind) — check it with `python run.py weights --verify`: model.",
    ]
    assert "will fail: model file unusable (failed today: 1)" in page and "ready to run" not in page
    # another pipeline version's runs say nothing about this one
    other, _, _ = _status(project, plan_now, {"name": "t", "version": 2})
    assert {s["step"]: s["next_study"]["outcome"] for s in other["steps"]} == {
        "model": "runs",
        "plain": "runs",
    }
    # a new copy of the file: nothing known says it fails now
    later = failed_at.timestamp() + 60
    os.utime(model, (later, later))
    doc, _, _ = _status(project, plan_now, {"name": "t", "version": 1})
    assert doc["summary"][1] == "Every step of the pipeline (2) is ready to run on the next study."
    assert problem_words(StepProblem.UNRECORDED) == (
        "failed (recorded by an older ctwatch; its reason is in the Excel report)"
    )


def test_today_starts_at_local_midnight_on_a_daylight_saving_day() -> None:
    """29 March 2026 in Berlin: the clocks go from +01:00 to +02:00 at 02:00, so at noon "today"
    began at 00:00+01:00 (23:00 UTC the day before), not at 00:00+02:00. Run with TZ=Europe/Berlin in
    a child, as the server's own zone."""
    code = (
        "from datetime import datetime\n"
        "from processor.status.document import local_midnight\n"
        "now = datetime(2026, 3, 29, 12, 0).astimezone()\n"
        "print(now.isoformat(), local_midnight(now).isoformat())\n"
    )
    env = {**os.environ, "TZ": "Europe/Berlin", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2026-03-29T12:00:00+02:00", "2026-03-29T00:00:00+01:00"]
