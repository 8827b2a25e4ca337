"""The status page of a fresh install in a real headless Chromium (Debian ``chromium``).

A daemon with the shipped pipeline and no model files takes one good study and one whose only
series is too short (described with the patient's name, as happens). A radiographer opening the page
must see what was analysed, what was not and why: every step with today's counts, the model steps
skipped for their missing files, the failed series selection, the night window in words — and
nothing of the patient. Chromium loads the page once (``--dump-dom``, ``--screenshot``, console
messages on stderr); the check is proved to catch a console error on a page that has one.
The screenshot stays in the test's temp folder as ``status-page.png``.
"""

from __future__ import annotations

import contextlib
import html
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, Project, wait_for
from tests.dicomgen import PATIENT_NAME, chest_phantom, make_series, write_zip

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian `chromium` is not installed (apt-get install chromium); CI installs it"
)
WINDOW = (1400, 1700)
CONSOLE = re.compile(r":CONSOLE[:(]")  # Chromium's log line for a page's console message
DESCRIPTION = f"{PATIENT_NAME} THORAX"  # a series description with the patient's name in it
DROPPED = f"{PATIENT_NAME} 2.zip"


@dataclass
class Loaded:
    dom: str
    console: list[str]
    screenshot: Path

    @property
    def text(self) -> str:
        """The page's visible words, one space between them."""
        body = re.sub(r"<(style|title)>.*?</\1>", " ", self.dom, flags=re.S)
        return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body))).strip()


def load_in_chromium(url: str, folder: Path) -> Loaded:
    """One headless Chromium run on ``url``: the DOM after load, the console messages, a screenshot.

    Chromium is a child in its own process group, stopped by its id (the group) when it has not
    exited within 60 s; a run normally takes a few seconds."""
    assert CHROMIUM is not None
    folder.mkdir(parents=True, exist_ok=True)
    screenshot = folder / "status-page.png"
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--no-first-run",
            f"--user-data-dir={folder / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            f"--window-size={WINDOW[0]},{WINDOW[1]}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"chromium did not finish loading {url} within 60 s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # helpers it left behind, if any
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    return Loaded(out, [line for line in err.splitlines() if CONSOLE.search(line)], screenshot)


# ---------------------------------------------------------------------------------------------- the check
def test_the_console_check_catches_a_script_error(tmp_path: Path) -> None:
    """The negative case: a page with a script error, served on 127.0.0.1, is caught."""
    page = b"<!doctype html><title>x</title><p>before the error</p><script>noSuchFunction()</script>"

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="ctwatch-test-page"
    )
    thread.start()
    try:
        loaded = load_in_chromium(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path)
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()
    assert "before the error" in loaded.text
    assert len(loaded.console) == 1 and "noSuchFunction is not defined" in loaded.console[0], loaded.console


# ---------------------------------------------------------------------------------------------- the page
@pytest.fixture
def fresh_install(tmp_path: Path) -> Iterator[tuple[Project, int]]:
    """A running daemon with the shipped pipeline, no weights, one good and one unusable study."""
    (tmp_path / "site").mkdir()
    project = Project(tmp_path / "site")
    shutil.copy(REPO / "pipelines" / "chest-ct.yaml", project.pipeline)
    hu, _ = chest_phantom((24, 64, 64))
    good = make_series(24, stored=np.round(hu + 1024).astype(np.int16), pixel_spacing=5.0)
    write_zip(tmp_path / "1.zip", good)
    write_zip(tmp_path / "2.zip", make_series(10, description=DESCRIPTION))  # too few slices
    daemon = project.start()
    try:
        port = wait_for(
            lambda: re.search(r"status\.listening url=http://127\.0\.0\.1:(\d+)/", project.log_text()),
            60,
            "the status server to listen",
        )[1]  # type: ignore[index]
        shutil.move(tmp_path / "1.zip", project.inbox / "1.zip")
        shutil.move(tmp_path / "2.zip", project.inbox / DROPPED)
        wait_for(lambda: len(project.results()) == 2, 120, "both study JSONs")
        yield project, int(port)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, project.log_text()[-3000:]


def get(port: int, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200, path
        return response.read().decode("utf-8")
    finally:
        conn.close()


def test_a_fresh_install_says_what_was_analysed_what_was_not_and_why(
    fresh_install: tuple[Project, int], tmp_path: Path
) -> None:
    project, port = fresh_install
    status = json.loads(get(port, "/status"))
    loaded = load_in_chromium(f"http://127.0.0.1:{port}/", tmp_path / "chromium")

    assert loaded.console == [], loaded.console
    text = loaded.text
    # What was analysed, what was not, and why — first, in words.
    assert "Today: 2 studies processed — 0 with every step, 1 partly (some steps skipped), 1 failed" in text
    assert (
        "6 of 11 steps will not run on the next study — model file missing: captioning, CT-CLIP zero-shot, "
        "CT-LiPro classifier, supervised head, anomaly detector, fusion. See Model files below."
    ) in text
    # Every step, with today's done / skipped / failed / not run, the next study and the last failure.
    rows = {row["step"]: row for row in status["steps"]}
    assert list(rows) == [
        "series",
        "volume",
        "lungs",
        "slices",
        "caption",
        "clip",
        "lipro",
        "head",
        "anomaly",
        "fusion",
        "decision",
    ]
    assert rows["series"]["today"] == {"done": 1, "skipped": 0, "failed": 1, "not_run": 0}
    assert rows["series"]["last_failure"]["problem"] == "study"
    assert rows["lungs"]["today"] == {"done": 1, "skipped": 0, "failed": 0, "not_run": 1}
    assert rows["clip"]["today"] == {"done": 0, "skipped": 1, "failed": 0, "not_run": 1}
    assert [p["problem"] for p in rows["clip"]["today_problems"]] == ["earlier_failed", "model_missing"]
    assert rows["clip"]["next_study"]["missing_files"] == [
        "weights/ct_clip/CT_VocabFine_v2.pt",
        "weights/ct_clip/vocab.txt",
    ]
    assert rows["decision"]["next_study"]["outcome"] == "runs"
    assert "series selection (series) 1 0 1 0 1× could not process the study" in text
    assert "CT-CLIP zero-shot (clip) 0 1 0 1 1× an earlier step failed; 1× model file missing" in text
    assert (
        "skipped: model file missing: weights/ct_clip/CT_VocabFine_v2.pt, weights/ct_clip/vocab.txt" in text
    )
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d — could not process the study", text)
    # The model files by step, the night window and the uptime in words.
    assert "clip, lipro weights/ct_clip/vocab.txt MISSING" in text
    files = {f["file"]: f for f in status["model_files"]}
    assert all(not f["installed"] for f in files.values())
    assert files["weights/ct_clip/vocab.txt"]["steps"] == ["clip", "lipro"]
    assert {"weights/ct_clip/CT_VocabFine_v2.pt", "weights/fusion/model.txt", "weights/head/head.pt"} <= set(
        files
    )
    assert re.search(
        r"night window (closed now; opens at 01:00 \(in [^)]+\) and closes at 06:00|open now, until 06:00)",
        text,
    )
    assert re.search(r"up for \d+ (s|min)", text)
    assert "executor local (the pipeline runs in this daemon)" in text and "Dask" not in text
    assert 'ctwatch_executor_info{executor="local",cluster="none"} 1' in get(port, "/metrics")
    # Nothing of the patient, in the page or the machine-readable twins.
    everything = "\n".join([loaded.dom, json.dumps(status), get(port, "/metrics")])
    uids = [json.loads(path.read_text())["study_uid"] for path in project.results()]
    for secret in (PATIENT_NAME, "CompressedSamples", DESCRIPTION, DROPPED, "THORAX", *uids):
        assert secret.lower() not in everything.lower(), secret
    # The screenshot is the page as a person sees it (kept in the temp folder as status-page.png).
    with Image.open(loaded.screenshot) as image:
        assert image.size == WINDOW
        assert len(np.unique(np.asarray(image.convert("L")))) > 20  # drawn text and colours, not a blank page
