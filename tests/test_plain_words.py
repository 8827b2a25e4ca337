"""Words people read: quarantine reasons and study errors start with plain words (not a step id, an
exception class or a file name used as a label), a skipped step is not an error, and `requeue` of an
arrival that does not exist says so."""

from __future__ import annotations

import json
import re
import sqlite3
import zipfile

from processor.state.queue import crash_reason
from tests.conftest import Project
from tests.dicomgen import make_series, write_zip

# a plain word first: letters only, capitalised at most (not "ingest:", "ValueError", "slip.zip:")
PLAIN_FIRST_WORD = re.compile(r"^[A-Za-z][a-z]* ")


def _bad_inputs(project: Project) -> dict[str, str]:
    """name → the plain words its reason must start with."""
    root = project.root
    (root / "notes.zip").write_text("minutes of the Tuesday meeting\n")
    (root / "empty.zip").write_bytes(b"")
    (root / "page.zip").write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    good = write_zip(root / "whole.zip", make_series(3))
    (root / "cut.zip").write_bytes(good.read_bytes()[:2000])
    good.unlink()
    with zipfile.ZipFile(root / "slip.zip", "w") as zf:
        zf.writestr("../outside.dcm", b"x")
    with zipfile.ZipFile(root / "photos.zip", "w") as zf:
        zf.writestr("a.txt", "hello")
        zf.writestr("b.jpg", b"\xff\xd8\xff\xe0" + bytes(64))
    return {
        "notes.zip": "no DICOM images found: the file is not a ZIP",
        "empty.zip": "the file empty.zip is empty",
        "page.zip": "the file page.zip is an HTML page",
        "cut.zip": "the ZIP cannot be read",
        "slip.zip": "in slip.zip, member '../outside.dcm' has an absolute or '..' path",
        "photos.zip": "no DICOM images found among 2 file(s)",
    }


def test_reasons_skips_and_requeue_speak_plainly(project: Project) -> None:
    project.write_pipeline(
        [
            {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "clip", "uses": "ctclip.zero_shot"},  # its weights are not installed here
        ]
    )
    starts = _bad_inputs(project)
    write_zip(project.root / "chest.zip", make_series(24, pixel_spacing=4.0))
    write_zip(project.root / "short.zip", make_series(5, pixel_spacing=4.0))
    names = [*starts, "chest.zip", "short.zip"]
    proc = project.run("process", *names)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # bad inputs and a failed study

    with sqlite3.connect(project.state_path) as db:
        rows = {
            name: (aid, state, error)
            for aid, name, state, error in db.execute("select id, name, state, error from arrivals")
        }
    for name, start in starts.items():
        _, state, reason = rows[name]
        assert state == "quarantined" and reason.startswith(start), (name, reason)
        assert PLAIN_FIRST_WORD.match(reason), reason
    assert PLAIN_FIRST_WORD.match(crash_reason(3))

    docs = {json.loads(p.read_text())["source"]["name"]: json.loads(p.read_text()) for p in project.results()}
    # a step skipped for missing weights: Partial, no error anywhere; the reason is in "reason"
    chest = docs["chest.zip"]
    assert chest["processing_status"] == "Partial" and chest["error"] is None
    clip = {s["step_id"]: s for s in chest["steps"]}["clip"]
    assert clip["status"] == "skipped" and clip["error"] is None
    assert clip["reason"].startswith("weights not installed: ") and clip["missing"]
    assert {s["status"]: s["reason"] for s in chest["steps"] if s["status"] == "done"} == {"done": None}
    # a failed study: the error starts with what went wrong and names the step last
    short = docs["short.zip"]
    assert short["processing_status"] == "Failure"
    assert short["error"].startswith("no eligible series: ") and short["error"].endswith("(in step series)")
    steps = {s["step_id"]: s for s in short["steps"]}
    assert steps["series"]["status"] == "failed" and steps["series"]["reason"] is None
    assert steps["series"]["error"].startswith("no eligible series: ")
    for later in ("volume", "clip"):
        assert steps[later]["status"] == "not_run" and steps[later]["error"] is None
        assert steps[later]["reason"] == "an earlier step failed"

    missing = project.run("requeue", "999")
    assert missing.returncode == 1
    assert f"no arrival 999 in {project.state_path}" in missing.stderr
    done = project.run("requeue", str(rows["chest.zip"][0]))
    assert done.returncode == 1 and "(chest.zip) is done, not failed" in done.stderr
    assert "nothing done" in done.stderr
