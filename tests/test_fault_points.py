"""Fault injection (issue 14): kill the daemon at every named crash point, restart it, and check that
every input still ends exactly once — the right outcome and reason, its bytes kept, one result JSON
per study, one receipt per arrival, a sound database and no temp file left behind.

A case runs the daemon with ``CTWATCH_FAULT=<point>`` until it dies there (exit 137, its log naming
the point; a point no run reaches within the bound fails the case, so
:data:`processor.faults.POINTS` stays honest), then runs it again without the variable until the
queue drains, stops it with SIGTERM and checks the invariants in :func:`check_outcome`. Pipelines
are weight-free (series selection only) and series small (20 slices), so a case takes seconds.

Beside the cases: a poison input that crashes the worker every time it runs (quarantined after
``limits.max_attempts`` crashes, its neighbours unharmed), a URL body caught in its staging folder,
and a soak that SIGKILLs the daemon at random moments while a burst goes through.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import re
import signal
import sqlite3
import subprocess
import tempfile
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from processor.faults import ENV, POINTS
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_sources_http import Site, send

NO_DICOM = "no DICOM images found"  # a file that is not a ZIP (nor DICOM) named notes.zip
CUT = "the ZIP cannot be read"  # a ZIP cut off half way
SLIP = "zip-slip"  # a ZIP with a member named ../../outside.dcm
POISON = "crashed the worker 3 times"
STALE = ("no longer at", "moved or deleted outside ctwatch")  # a crash's trace, never a real reason
ACTIVE = ("pending", "running")
RECEIPT_OUTCOME = {
    "done": "accepted",
    "quarantined": "rejected",
    "duplicate": "duplicate",
    "failed": "failed",
}
TEMP_NAME = re.compile(r"^\..+\.tmp(\.[A-Za-z0-9]+)?$")  # .<name>.XXXX.tmp, and .<stem>.XXXX.tmp.xlsx
EXTRA_JSON = re.compile(r"\.a\d+(-\d+)?\.json$")
URL_PATH = "/exports/latest.zip"


# ---------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Input:
    """One thing dropped into the inbox (or served by a URL source) and how it must end."""

    name: str
    data: bytes
    state: str  # final arrivals.state: done, quarantined or duplicate
    studies: tuple[str, ...] = ()  # StudyInstanceUIDs that must each get one result JSON
    reason: str | None = None  # for a quarantined input: words its error must contain
    duplicate_of: str | None = None  # for a duplicate: the name of the input it duplicates
    kind: str = "inbox"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@functools.cache
def _study_zip(name: str, sizes: tuple[int, ...]) -> tuple[bytes, tuple[str, ...]]:
    """The bytes of a ZIP of new studies, and their UIDs; made once per name, since each test has
    its own database (the same bytes in two tests are no duplicate) and generating takes time."""
    series = [make_series(n) for n in sizes]
    with tempfile.TemporaryDirectory() as folder:
        data = write_zip(Path(folder) / name, [ds for s in series for ds in s]).read_bytes()
    return data, tuple(s[0].StudyInstanceUID for s in series)


def good(name: str, *sizes: int) -> Input:
    """A ZIP holding one study per size (each a series of that many slices; one of 20 by default)."""
    data, studies = _study_zip(name, sizes or (20,))
    return Input(name, data, "done", studies)


def bad(name: str, what: str) -> Input:
    """A bad input: ``notes`` (text, not a ZIP), ``cut`` (a truncated ZIP) or ``slip`` (zip-slip)."""
    if what == "notes":
        return Input(name, f"{name}: shopping list\nmilk\neggs\n".encode(), "quarantined", reason=NO_DICOM)
    if what == "cut":
        data = good(f"whole-{name}").data
        return Input(name, data[: len(data) // 2], "quarantined", reason=CUT)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../outside.dcm", name.encode())
    return Input(name, buf.getvalue(), "quarantined", reason=SLIP)


def new_project(tmp_path: Path, **settings: Any) -> Project:
    """A project in ``tmp_path/project``: the weight-free test pipeline, cases' settings on top."""
    (tmp_path / "project").mkdir()
    return Project(tmp_path / "project", **settings)


def drop(project: Project, *inputs: Input) -> None:
    """Put inputs into the inbox whole (written beside it, then renamed in)."""
    staging = project.root / "dropping"
    staging.mkdir(exist_ok=True)
    for item in inputs:
        assert item.kind == "inbox"
        tmp = staging / item.name
        tmp.write_bytes(item.data)
        tmp.replace(project.inbox / item.name)


def serve(body: bytes) -> Callable[[BaseHTTPRequestHandler], None]:
    """A route serving ``body`` with an ETag, answering 304 to a matching If-None-Match."""
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'

    def route(handler: BaseHTTPRequestHandler) -> None:
        if handler.headers.get("If-None-Match") == etag:
            send(handler, 304, ETag=etag)
        else:
            send(handler, 200, body, Content_Type="application/zip", ETag=etag)

    return route


def source_settings(site: Site) -> dict[str, Any]:
    return {
        "sources": [{"name": "scanner", "kind": "http", "url": site.url(URL_PATH), "every": "1s"}],
        "fetch": {"allow_hosts": ["127.0.0.1"], "timeout_seconds": 5, "retries": 2, "backoff_seconds": 0.05},
    }


@pytest.fixture
def site() -> Iterator[Site]:
    s = Site()
    s.start()
    try:
        yield s
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------- daemon runs
class Daemons:
    """The daemon runs of one test, one at a time, all logging to the project's daemon.log."""

    def __init__(self, project: Project, monkeypatch: pytest.MonkeyPatch) -> None:
        self.project = project
        self.monkeypatch = monkeypatch
        self.procs: list[subprocess.Popen[str]] = []
        self.offset = 0

    def start(self, fault: str | None = None) -> subprocess.Popen[str]:
        """A daemon; ``fault`` is the CTWATCH_FAULT rule only this child gets."""
        self.offset = len(self.project.log_text())
        if fault:
            self.monkeypatch.setenv(ENV, fault)
        else:
            self.monkeypatch.delenv(ENV, raising=False)
        try:
            proc = self.project.start()
        finally:
            self.monkeypatch.delenv(ENV, raising=False)
        self.procs.append(proc)
        return proc

    def log(self) -> str:
        """What the current (last started) run has logged."""
        return self.project.log_text()[self.offset :]

    def started(self) -> bool:
        """The current run has started its threads (crash recovery is done)."""
        return "daemon.started" in self.log()

    def drained(self, inputs: list[Input]) -> bool:
        return self.started() and not unsettled(self.project, inputs)

    def broken(self, proc: subprocess.Popen[str]) -> bool:
        """The run ended, or one of its threads died of an exception (it will never drain)."""
        return proc.poll() is not None or "Exception in thread" in self.log()

    def tail(self) -> str:
        return "\n--- daemon log (this run, tail) ---\n" + self.log()[-4000:]

    def crash(self, point: str, rule: str | None = None, timeout: float = 60) -> None:
        """Run with the fault until it fires; fail if it never does or the exit is not the fault's."""
        proc = self.start(rule or point)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"fault point {point} was not reached within {timeout:.0f}s "
                f"(CTWATCH_FAULT={rule or point}); no run crosses it in this case" + self.tail()
            ) from None
        assert code == 137, f"the faulted daemon exited with {code}, not 137" + self.tail()
        assert f"fault.injected point={point}" in self.log(), (
            f"no fault.injected line for {point}" + self.tail()
        )

    def drain(
        self,
        inputs: list[Input],
        timeout: float = 60,
        then: Callable[[], object] | None = None,
        what: str = "",
    ) -> None:
        """Run without a fault until every input has a final arrival and nothing waits; then SIGTERM."""
        proc = self.start()
        try:
            wait_for(
                lambda: self.broken(proc) or self.drained(inputs),
                timeout,
                f"the queue to drain ({len(inputs)} inputs)",
            )
            assert not self.broken(proc), (
                f"the daemon (exit {proc.poll()}) or a thread of it died while draining"
            )
            if then is not None:
                wait_for(then, 30, what)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nstill: {unsettled(self.project, inputs)}\n{describe(self.project)}{self.tail()}"
            ) from None
        self.stop(proc)

    def stop(self, proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        assert code == 0, f"the daemon exited with {code} on SIGTERM" + self.tail()

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)


@pytest.fixture
def daemons(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Project], Daemons]]:
    made: list[Daemons] = []

    def make(project: Project) -> Daemons:
        made.append(Daemons(project, monkeypatch))
        return made[-1]

    yield make
    for runs in made:
        runs.kill()


# ---------------------------------------------------------------------------------------- state
def arrivals(project: Project) -> list[dict[str, Any]]:
    """Every arrival row, or [] while the daemon has not created its database yet."""
    if not project.state_path.exists():
        return []
    try:
        conn = sqlite3.connect(f"file:{project.state_path}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return []
    try:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("select * from arrivals order by id")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def query(project: Project, sql: str) -> list[tuple]:
    conn = sqlite3.connect(project.state_path, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def control(project: Project) -> Path:
    return project.inbox / ".ctwatch"


def leftovers(project: Project) -> list[str]:
    """Entries still in the inbox (or its night and urgent folders) or in work/."""
    out = [p.name for p in project.inbox.iterdir() if p.name not in (".ctwatch", "night", "urgent")]
    for lane in ("night", "urgent"):
        folder = project.inbox / lane
        out += [f"{lane}/{p.name}" for p in folder.iterdir()] if folder.is_dir() else []
    work = control(project) / "work"
    out += [f"work/{p.name}" for p in work.iterdir()] if work.is_dir() else []
    return out


def unsettled(project: Project, inputs: list[Input]) -> list[str]:
    """What still keeps the queue from being drained (nothing: drained): an input without an
    arrival, an arrival pending or running, an entry in the inbox or work/, a final arrival
    without its receipt, a quarantined input without its note."""
    rows = arrivals(project)
    out = [f"no arrival for {n}" for n in sorted({i.name for i in inputs} - {r["name"] for r in rows})]
    out += [f"{r['name']} is {r['state']}" for r in rows if r["state"] in ACTIVE]
    out += [f"{name} is in the inbox or work/" for name in leftovers(project)]
    out += [
        f"{r['name']} has no receipt yet"
        for r in rows
        if r["state"] not in ACTIVE and not Path(r["receipt_path"] or "").is_file()
    ]
    out += [
        f"{r['name']} has no quarantine note yet"
        for r in rows
        if r["state"] == "quarantined" and not Path(f"{r['current_path']}.error.txt").is_file()
    ]
    return out


def describe(project: Project) -> str:
    rows = [(r["id"], r["name"], r["state"], r["attempts"], r["error"]) for r in arrivals(project)]
    return f"arrivals (id, name, state, attempts, error): {rows}\nin the inbox or work/: {leftovers(project)}"


# ---------------------------------------------------------------------------------------- invariants
def check_outcome(project: Project, inputs: list[Input]) -> None:
    """Every invariant of issue 14 at once; all violations are reported together."""
    problems: list[str] = []
    integrity = query(project, "pragma integrity_check")
    if integrity != [("ok",)]:
        problems.append(f"PRAGMA integrity_check: {integrity}")
    rows = arrivals(project)
    by_name = {i.name: [r for r in rows if r["name"] == i.name] for i in inputs}
    extra = [(r["id"], r["name"], r["state"]) for r in rows if r["name"] not in by_name]
    if extra:
        problems.append(f"arrivals for nothing that was dropped: {extra}")
    ids: dict[str, int] = {}
    for item in inputs:
        mine = by_name[item.name]
        if len(mine) != 1:
            problems.append(
                f"{item.name}: {len(mine)} arrivals {[(r['id'], r['state']) for r in mine]}, "
                "want exactly one final outcome"
            )
            continue
        ids[item.name] = mine[0]["id"]
        problems += _check_arrival(project, item, mine[0], ids)
    problems += _check_kept(project, inputs)
    problems += _check_results(project, inputs, ids)
    problems += _check_receipts(project, rows)
    problems += _check_no_temp_files(project)
    assert not problems, "\n".join(["fault-injection invariants violated:", *problems, describe(project)])


def _check_arrival(project: Project, item: Input, row: dict[str, Any], ids: dict[str, int]) -> list[str]:
    """Its final state and reason, and the kept input it points at (and its note)."""
    problems = []
    error = row["error"] or ""
    if row["state"] != item.state:
        problems.append(f"{item.name}: state {row['state']} (error {error!r}), want {item.state}")
    if item.reason is not None and item.reason not in error:
        problems.append(f"{item.name}: error {error!r} does not give the real reason ({item.reason!r})")
    if item.reason is None and error:
        problems.append(f"{item.name}: error {error!r} on an input that must end {item.state}")
    if any(s in error for s in STALE):
        problems.append(f"{item.name}: error {error!r} blames the input's disappearance on someone else")
    if item.duplicate_of is not None and row["duplicate_of"] != ids.get(item.duplicate_of):
        problems.append(f"{item.name}: duplicate_of {row['duplicate_of']}, want {ids.get(item.duplicate_of)}")
    where = Path(row["current_path"] or "")
    folder = control(project) / ("quarantine" if item.state == "quarantined" else "done")
    if not where.is_file():
        problems.append(f"{item.name}: current_path {where} is not a file")
    elif not where.is_relative_to(folder) or where.name != item.name:
        problems.append(
            f"{item.name}: kept at {where}, want {folder}/{'' if item.state == 'quarantined' else '<date>/'}"
            f"{item.name}"
        )
    elif hashlib.sha256(where.read_bytes()).hexdigest() != item.sha256:
        problems.append(f"{item.name}: the kept copy {where} is not byte-identical to what was dropped")
    if item.state == "quarantined":
        note = where.with_name(where.name + ".error.txt")
        text = note.read_text() if note.is_file() else ""
        if not text:
            problems.append(f"{item.name}: no quarantine note {note.name}")
        elif item.reason not in text or any(s in text for s in STALE):
            problems.append(f"{item.name}: the note {note.name} does not give the real reason: {text!r}")
    return problems


def _check_kept(project: Project, inputs: list[Input]) -> list[str]:
    """Every input exactly once under done/<date>/ or quarantine/; nothing else there; work/ empty."""
    root = control(project)
    kept = [p for p in (root / "done").glob("*/*") if p.is_file()] if (root / "done").is_dir() else []
    quarantine = root / "quarantine"
    kept += (
        [p for p in quarantine.iterdir() if not p.name.endswith(".error.txt")] if quarantine.is_dir() else []
    )
    notes = sorted(p.name for p in quarantine.glob("*.error.txt")) if quarantine.is_dir() else []
    problems = [f"left in the inbox or work/: {left}"] if (left := leftovers(project)) else []
    names = Counter(p.name for p in kept)
    want = Counter(i.name for i in inputs)
    if names != want:
        problems.append(
            f"inputs kept under done/ and quarantine/: {sorted(names.elements())}, "
            f"want each once: {sorted(want.elements())}"
        )
    want_notes = sorted(f"{i.name}.error.txt" for i in inputs if i.state == "quarantined")
    if notes != want_notes:
        problems.append(f"quarantine notes {notes}, want {want_notes}")
    contents = Counter(hashlib.sha256(p.read_bytes()).hexdigest() for p in kept)
    if contents != Counter(i.sha256 for i in inputs):
        problems.append("the bytes kept under done/ and quarantine/ are not exactly the bytes dropped")
    staged = [p.name for p in (root / "fetch").rglob("*") if p.is_file()] if (root / "fetch").is_dir() else []
    if staged:
        problems.append(f"downloads left in .ctwatch/fetch/: {staged}")
    return problems


def _check_results(project: Project, inputs: list[Input], ids: dict[str, int]) -> list[str]:
    """One result JSON per study, named <study_uid>.json, from the right input, recorded once."""
    problems = []
    owner = {uid: i for i in inputs if i.state == "done" for uid in i.studies}
    results = project.results()
    extras = [p.name for p in results if EXTRA_JSON.search(p.name)]
    if extras:
        problems.append(f"duplicate result JSONs: {extras}")
    stems = Counter(p.name.removesuffix(".json") for p in results if not EXTRA_JSON.search(p.name))
    if stems != Counter(list(owner)):
        problems.append(
            f"result JSONs for studies {sorted(stems.elements())}, want each once: {sorted(owner)}"
        )
    for path in results:
        doc = json.loads(path.read_text())
        item = owner.get(doc.get("study_uid"))
        if item is None:
            continue
        if doc["source"]["sha256"] != item.sha256:
            problems.append(f"{path.name}: source.sha256 is not that of {item.name}")
        if doc["processing_status"] not in ("Success", "Partial"):
            problems.append(f"{path.name}: processing_status {doc['processing_status']} ({doc.get('error')})")
    recorded = query(project, "select arrival_id, study_uid, json_path from studies")
    for uid, item in owner.items():
        if item.name not in ids:
            continue  # not one arrival: reported already
        mine = [row for row in recorded if row[1] == uid]
        if len(mine) != 1 or mine[0][0] != ids.get(item.name) or not Path(mine[0][2] or "").is_file():
            problems.append(
                f"study {uid} of {item.name}: studies rows {mine}, want one of arrival "
                f"{ids.get(item.name)} pointing at its JSON"
            )
    return problems


def _check_receipts(project: Project, rows: list[dict[str, Any]]) -> list[str]:
    """One receipt per arrival, with the arrival's outcome; a rejection's message gives its reason."""
    problems = []
    files = sorted((project.outbox / "receipts").glob("*.json"))
    if len(files) != len(rows):
        problems.append(f"{len(files)} receipts {[p.name for p in files]} for {len(rows)} arrivals")
    for row in rows:
        path = Path(row["receipt_path"] or "")
        if not path.is_file():
            problems.append(f"{row['name']}: no receipt (receipt_path {row['receipt_path']!r})")
            continue
        receipt = json.loads(path.read_text())
        want = RECEIPT_OUTCOME.get(row["state"])
        if receipt["arrival_id"] != row["id"] or receipt["outcome"] != want:
            problems.append(
                f"{row['name']}: receipt for arrival {receipt['arrival_id']} says "
                f"{receipt['outcome']}, want arrival {row['id']} {want}"
            )
        if row["state"] == "quarantined" and (row["error"] or "") not in receipt["message"]:
            problems.append(
                f"{row['name']}: receipt message {receipt['message']!r} is not the reason {row['error']!r}"
            )
        if any(s in receipt["message"] for s in STALE):
            problems.append(f"{row['name']}: receipt message {receipt['message']!r}")
        for study in receipt["studies"] if row["state"] == "done" else []:
            if not Path(study.get("json") or "").is_file() or EXTRA_JSON.search(study.get("json") or ""):
                problems.append(f"{row['name']}: receipt points at {study.get('json')!r}")
    return problems


def _check_no_temp_files(project: Project) -> list[str]:
    temps = [
        str(p.relative_to(project.root))
        for top in (project.outbox, project.inbox)
        for p in top.rglob("*")
        if TEMP_NAME.match(p.name)
    ]
    return [f"temp files left behind: {temps}"] if temps else []


# ---------------------------------------------------------------------------------------- every point
@dataclass(frozen=True)
class Case:
    """One crash point and the drop that crosses it; ``victim`` says whose path the first hit is on:
    ``good`` (the good ZIPs sort, so register and run, first) or ``bad`` (the bad input first)."""

    point: str
    victim: str = "good"
    bad: str = "notes"

    def __str__(self) -> str:
        return (
            f"{self.point}-{self.victim}-{self.bad}" if self.bad != "notes" else f"{self.point}-{self.victim}"
        )


CASES = [
    Case("intake.registered"),
    Case("intake.registered", "bad"),
    Case("url.registered", "url"),
    Case("arrival.claimed"),
    Case("prefetch.prepared"),
    Case("study.started"),
    Case("study.json_written"),
    Case("arrival.recorded"),
    Case("arrival.recorded", "bad"),
    Case("arrival.receipt_written"),
    Case("arrival.receipt_written", "bad"),
    Case("arrival.moved"),  # only the done path crosses it; quarantine.note_before is its twin there
    Case("quarantine.note_before", "bad", "cut"),
    Case("quarantine.note_written", "bad", "slip"),
    Case("excel.writing"),
]


# Points that need a running destination: their own end-to-end test kills the daemon there.
ELSEWHERE = {"delivery.sent": "tests/test_sendback_e2e.py"}


def test_every_fault_point_has_a_case() -> None:
    assert sorted({c.point for c in CASES} | set(ELSEWHERE)) == sorted(POINTS)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_crash_at_point_then_restart(
    case: Case, tmp_path: Path, site: Site, daemons: Callable[[Project], Daemons]
) -> None:
    settings: dict[str, Any] = {"reports": {"enabled": False}, "limits": {"max_attempts": 3}}
    if case.point == "prefetch.prepared":
        settings["worker"] = {"max_inflight_studies": 1, "cpu_workers": 0}
    if case.point == "excel.writing":
        settings["reports"] = {"enabled": True, "debounce_seconds": 0}
    first, last = ("1", "3") if case.victim == "bad" else ("3", "1")
    inputs = [bad(f"{first}-{case.bad}.zip", case.bad), good("2-good.zip"), good(f"{last}-good.zip")]
    served: list[Input] = []
    if case.point == "url.registered":
        served = [replace(good("latest.zip"), kind="http")]
        site.routes[URL_PATH] = serve(served[0].data)
        settings |= source_settings(site)
    project = new_project(tmp_path, **settings)
    drop(project, *inputs)
    runs = daemons(project)

    runs.crash(case.point)
    runs.drain(inputs + served)

    check_outcome(project, inputs + served)
    if case.point == "excel.writing":
        assert (project.outbox / "reports" / "ctwatch-latest.xlsx").is_file()


# ---------------------------------------------------------------------------------------- a poison input
def test_poison_study_is_charged_alone(tmp_path: Path, daemons: Callable[[Project], Daemons]) -> None:
    """A study that kills the worker every time is quarantined after limits.max_attempts crashes;
    the studies prefetched beside it are not charged for its crashes and end done."""
    project = new_project(
        tmp_path,
        reports={"enabled": False},
        worker={"max_inflight_studies": 1, "cpu_workers": 0},
        limits={"max_attempts": 3},
    )
    # poison.zip sorts first, so it is claimed first and the others are prefetched while it crashes.
    poison = replace(good("poison.zip"), state="quarantined", studies=(), reason=POISON)
    inputs = [poison, good("study-a.zip"), good("study-b.zip")]
    drop(project, *inputs)
    runs = daemons(project)
    exits: list[int] = []
    for _ in range(8):
        proc = runs.start("study.started~poison")
        wait_for(
            lambda proc=proc: runs.broken(proc) or runs.drained(inputs),
            60,
            f"the daemon to crash on the poison study or drain (run {len(exits) + 1})",
        )
        assert "Exception in thread" not in runs.log(), runs.tail()
        if proc.poll() is None:
            runs.stop(proc)
            break
        exits.append(proc.returncode)
        assert proc.returncode == 137 and "fault.injected point=study.started" in runs.log(), runs.tail()
    else:
        raise AssertionError(f"not drained after 8 runs (exits {exits})\n{describe(project)}")
    assert exits == [137] * 3, f"the poison study ran {len(exits)} times, want 3 (limits.max_attempts)"
    check_outcome(project, inputs)


# ---------------------------------------------------------------------------------------- a URL body
def test_url_body_survives_restart_before_move(
    tmp_path: Path, site: Site, daemons: Callable[[Project], Daemons]
) -> None:
    """A downloaded body recorded as an arrival but still in the staging folder when the daemon
    dies is processed once at the restart: not quarantined as vanished, not fetched in again."""
    body = replace(good("latest.zip"), kind="http")
    site.routes[URL_PATH] = serve(body.data)
    project = new_project(tmp_path, reports={"enabled": False}, **source_settings(site))
    runs = daemons(project)

    runs.crash("url.registered")
    polled = len(site.hits(URL_PATH))
    runs.drain(
        [body],
        then=lambda: len(site.hits(URL_PATH)) >= polled + 2,
        what="two polls of the source after the restart (a body fetched again would show)",
    )

    check_outcome(project, [body])
    assert [(r["kind"], r["name"], r["state"]) for r in arrivals(project)] == [("http", "latest.zip", "done")]


# ---------------------------------------------------------------------------------------- soak
KILLS = 14


@pytest.mark.slow
def test_soak_random_kills(tmp_path: Path, daemons: Callable[[Project], Daemons]) -> None:
    """SIGKILL at 14 random moments while a burst is taken in and processed, then a last drain."""
    rng = random.Random(14)
    # Short stability so that runs of well under a second take inputs in; a study held 0.3 s so
    # that the burst spans many runs and kills land inside studies; a high attempt cap so that
    # random kills (not a poison input) never exhaust it.
    steps = [
        {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
        {"id": "hold", "uses": "util.delay", "with": {"seconds": 0.3}},
    ]
    project = new_project(
        tmp_path,
        pipeline_steps=steps,
        reports={"enabled": False},
        limits={"max_attempts": 100},
        inbox={
            "dirs": ["inbox"],
            "night_dirs": ["inbox/night"],
            "stable_seconds": 0.2,
            "scan_interval_seconds": 0.1,
        },
    )
    goods = [good(f"good-{k:02d}.zip", 20 + k % 4) for k in range(10)]
    goods.append(good("pair.zip", 20, 21))  # two studies in one ZIP
    twin = replace(
        goods[0], name="zz-copy-of-00.zip", state="duplicate", studies=(), duplicate_of=goods[0].name
    )  # the same bytes again, under another name
    bads = [bad("notes.zip", "notes"), bad("cut.zip", "cut"), bad("slip.zip", "slip")]
    inputs = [*goods, twin, *bads]
    late = dict(zip(range(2, KILLS, 2), goods[4:], strict=False))  # dropped while the kills go on
    drop(project, *[i for i in inputs if i not in late.values()])
    runs = daemons(project)
    busy = 0  # kills that found an arrival running
    for life in range(KILLS):
        if life in late:
            drop(project, late[life])
        proc = runs.start()
        wait_for(lambda: runs.log() or proc.poll() is not None, 60, "the daemon's first log line")  # noqa: B023
        try:
            code = proc.wait(rng.uniform(0.05, 0.8))
        except subprocess.TimeoutExpired:
            busy += any(r["state"] == "running" for r in arrivals(project))
            proc.kill()
            proc.wait(30)
        else:
            raise AssertionError(f"the daemon exited by itself with {code} (run {life + 1})" + runs.tail())
    runs.drain(inputs, timeout=120)
    check_outcome(project, inputs)
    assert busy >= 5, f"only {busy} of {KILLS} kills found an arrival running: the soak stresses too little"
