"""Inputs the service user may not read (issue 15): an unreadable ZIP, a folder, a file or sub-folder in
a folder — each ends once as a rejected arrival whose receipt says what could not be read and the
fix, and intake goes on. Nothing in the inbox (a symlink loop, a folder nested past Python's
recursion limit, a night folder it may not list) stops the watcher.

Permissions are real. As root, the inputs belong to ``nobody`` (mode 600, 700 for a folder) and the
daemon runs without the capabilities that let root read and move everything (``setpriv``); as
another user, the inputs are mode 000. Either way an unreadable folder cannot be moved out of the
inbox (renaming a folder to a new parent needs write access to it), so it stays where it is.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.intake.inbox import folder_files, sha256_of
from processor.intake.stability import signature
from processor.intake.watcher import InboxWatcher
from tests.conftest import REPO, Project, _env, wait_for
from tests.dicomgen import make_series, write_zip
from tests.test_spine_e2e import _stop, db_rows

AS_ROOT = os.geteuid() == 0
NOBODY = 65534
CAPS = "-dac_override,-dac_read_search,-fowner"  # what lets root read, search and move anything
DEPTH = 1200  # past Python's recursion limit (1000): os.walk, rglob and shutil.rmtree fail here

pytestmark = pytest.mark.skipif(
    AS_ROOT and shutil.which("setpriv") is None, reason="as root, dropping capabilities needs setpriv"
)


# ---------------------------------------------------------------- permissions and the daemon
def deny(path: Path) -> Path:
    """Make ``path`` unreadable to the daemon: another user's 600/700 as root, else mode 000."""
    if AS_ROOT:
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o700 if path.is_dir() else 0o600)
    else:
        path.chmod(0)
    return path


def allow(path: Path) -> None:
    """Give the daemon its access back: our own again, 755 (644 for a file)."""
    if AS_ROOT:
        os.chown(path, os.getuid(), os.getgid())
    path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture(autouse=True)
def restored(tmp_path: Path) -> Iterator[None]:
    """Whatever a test denied is ours again afterwards, so its folder can be removed."""
    yield
    folders = [tmp_path]
    while folders:  # not os.walk: it recurses, and some trees here are deeper than the recursion limit
        with os.scandir(folders.pop()) as listing:
            for entry in listing:
                if not entry.is_symlink():
                    allow(Path(entry.path))
                    if entry.is_dir():
                        folders.append(Path(entry.path))


def start_daemon(project: Project) -> subprocess.Popen[str]:
    """``run.py run`` as in :meth:`Project.start`, without root's read-everything capabilities."""
    drop = ["setpriv", f"--inh-caps={CAPS}", f"--bounding-set={CAPS}"] if AS_ROOT else []
    with (project.root / "daemon.log").open("a") as log:
        return subprocess.Popen(
            [*drop, sys.executable, str(REPO / "run.py"), "run", "--config", str(project.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=project.root,
            env=_env(),
        )


def receipts(project: Project) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for path in sorted((project.outbox / "receipts").glob("*.json")):
        document = json.loads(path.read_text(encoding="utf-8"))
        found.setdefault(document["name"], []).append(document)
    return found


def states(project: Project) -> dict[str, list[str]]:
    """Arrival states by name ({} while the daemon has not made its database yet)."""
    found: dict[str, list[str]] = {}
    try:
        rows = db_rows(project, "select name, state from arrivals order by id")
    except sqlite3.OperationalError:
        return found
    for name, state in rows:
        found.setdefault(name, []).append(state)
    return found


def folder_of_slices(path: Path, n: int = 20) -> Path:
    path.mkdir()
    for i, ds in enumerate(make_series(n)):
        ds.save_as(path / f"{i:03d}.dcm")
    return path


def drop_zip(project: Project, tmp_path: Path, name: str) -> None:
    write_zip(tmp_path / name, make_series(20)).replace(project.inbox / name)


def done(project: Project, name: str) -> bool:
    return states(project).get(name) == ["done"]


def cannot_read(part: str) -> str:
    return f"cannot read {part}: permission denied — give the service user ("


# ---------------------------------------------------------------- the daemon
def test_unreadable_inputs_each_end_once_and_intake_goes_on(project: Project, tmp_path: Path) -> None:
    inbox = project.inbox
    deny(write_zip(inbox / "secret.zip", make_series(20)))
    deny(folder_of_slices(inbox / "file_locked") / "003.dcm")
    deny(folder_of_slices(folder_of_slices(inbox / "sub_locked") / "part2", 8))
    locked = deny(folder_of_slices(inbox / "locked\nINJECTED level=CRITICAL"))  # a name that forges a line
    daemon = start_daemon(project)
    try:
        wait_for(lambda: len(receipts(project)) == 4, 60, "a receipt for each unreadable input")
        drop_zip(project, tmp_path, "later.zip")
        wait_for(lambda: done(project, "later.zip"), 60, "a ZIP dropped after them processed")
        drop_zip(project, tmp_path, "last.zip")  # many scans later: the unreadable ones not taken again
        wait_for(lambda: done(project, "last.zip"), 60, "a second ZIP processed")
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]

    shown = "locked\\nINJECTED level=CRITICAL"
    parts = {
        "secret.zip": "secret.zip",
        "file_locked": "file_locked/003.dcm",
        "sub_locked": "sub_locked/part2",
        shown: shown,
    }
    found = receipts(project)
    assert sorted(found) == sorted([*parts, "later.zip", "last.zip"])
    for name, part in parts.items():
        (receipt,) = found[name]  # one receipt: never a loop
        assert receipt["outcome"] == "rejected", receipt
        assert cannot_read(part) in receipt["message"] and "then drop it again" in receipt["message"]
        assert states(project)[name] == ["quarantined"]
    assert found["later.zip"][0]["outcome"] == found["last.zip"][0]["outcome"] == "accepted"

    quarantine = inbox / ".ctwatch" / "quarantine"
    kept = {"secret.zip", "file_locked", "sub_locked"}
    assert {p.name for p in quarantine.iterdir()} == kept | {f"{n}.error.txt" for n in kept}
    assert locked.is_dir(), "a folder it may not move stays where it was, never deleted"
    allow(locked)
    assert len(list(locked.iterdir())) == 20

    log = project.log_text()
    assert "Exception in thread" not in log and "watch.scan_failed" not in log, log[-3000:]
    assert not [line for line in log.splitlines() if line.startswith("INJECTED")], "a name split a log line"
    assert f"arrival.quarantine_failed name={shown} path=" in log


def test_unreadable_folder_set_aside_is_taken_in_once_it_may_be_read(project: Project) -> None:
    locked = deny(folder_of_slices(project.inbox / "locked"))
    daemon = start_daemon(project)
    try:
        wait_for(lambda: "locked" in receipts(project), 60, "the refusal's receipt")
        allow(locked)  # the fix the receipt asks for; the folder changed, so it is looked at again
        wait_for(lambda: "done" in states(project).get("locked", []), 60, "the folder processed")
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    assert states(project)["locked"] == ["quarantined", "done"]
    assert [r["outcome"] for r in receipts(project)["locked"]] == ["rejected", "accepted"]
    assert len(project.results()) == 1


@pytest.mark.skipif(not AS_ROOT, reason="a file the daemon may not move needs another user's file")
def test_unmovable_file_is_looked_at_again_once_its_permissions_change(
    project: Project, tmp_path: Path
) -> None:
    """In a shared inbox with the sticky bit (like /tmp), another user's file cannot be moved: it stays
    with its receipt, set aside until it changes — and a change of permissions is a change."""
    os.chown(project.inbox, NOBODY, NOBODY)
    project.inbox.chmod(0o1777)
    secret = deny(write_zip(project.inbox / "secret.zip", make_series(20)))
    daemon = start_daemon(project)
    try:
        wait_for(lambda: "secret.zip" in receipts(project), 60, "the refusal's receipt")
        secret.chmod(0o644)  # readable now, still not ours to move
        wait_for(lambda: len(receipts(project).get("secret.zip", [])) == 2, 60, "a second look")
        drop_zip(project, tmp_path, "later.zip")
        wait_for(lambda: done(project, "later.zip"), 60, "a ZIP dropped after it processed")
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    first, second = (r["message"] for r in receipts(project)["secret.zip"])
    assert cannot_read("secret.zip") in first
    assert "may not move it (permission denied)" in second and "write access to the inbox" in second
    assert states(project)["secret.zip"] == ["quarantined", "quarantined"]
    assert secret.exists() and secret.stat().st_uid == NOBODY, "left where it was, unchanged"


def test_nothing_in_the_inbox_stops_the_watcher(project: Project, tmp_path: Path) -> None:
    """A symlink loop ended the watcher thread (``Path.resolve`` raises RuntimeError on one); a night
    folder it may not list did too; a folder nested past the recursion limit stopped the daemon
    starting (watchdog's recursive watch)."""
    (project.inbox / "loop.zip").symlink_to("loop.zip")
    (project.inbox / "night").mkdir()
    deny(project.inbox / "night")
    nested = _nested(project.inbox / "deep")
    daemon = start_daemon(project)
    try:
        drop_zip(project, tmp_path, "later.zip")
        wait_for(lambda: done(project, "later.zip"), 60, "a ZIP dropped after them processed")
        wait_for(lambda: "deep" in receipts(project), 60, "the deep folder's receipt")
    finally:
        try:
            assert _stop(daemon) == 0, project.log_text()[-3000:]
        finally:
            _remove(nested)
    log = project.log_text()
    assert "Exception in thread" not in log, log[-3000:]
    assert log.count("watch.folder_unreadable") == 1 and "inbox/night" in log
    if sys.version_info < (3, 12):  # 3.12's os.walk is iterative (gh-89727): watchdog then watches it
        assert "watch.events_unavailable" in log, "watchdog could not watch the deep folder: scans only"
    assert (project.inbox / "loop.zip").is_symlink(), "a link is never an arrival, never touched"


# ---------------------------------------------------------------- the watcher, in process
def test_failing_entry_and_failing_pass_never_end_the_watcher(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name in ("a.zip", "b.zip", "c.zip"):
        (inbox / name).write_bytes(b"not really a zip")
    handed: list[str] = []
    ticks = itertools.count()

    def on_stable(path: Path, night: bool) -> None:
        if path.name == "b.zip":
            raise ValueError("a bug in the hand-over")
        handed.append(path.name)
        path.rename(tmp_path / path.name)  # taken out of the inbox

    def clock() -> float:
        tick = next(ticks)
        if tick == 0:
            raise RuntimeError("the first pass fails as a whole")
        return float(tick)

    watcher = InboxWatcher(
        [inbox], [], stable_seconds=0, scan_interval=0.05, on_stable=on_stable, clock=clock
    )
    watcher.start()
    try:
        wait_for(lambda: handed == ["a.zip", "c.zip"], 10, "the other entries handed over")
        wait_for(lambda: watcher.last_scan is not None, 10, "a complete pass")
        first = watcher.last_scan
        wait_for(lambda: watcher.last_scan != first, 10, "scanning on")
        assert watcher.is_alive()
        assert watcher.errors == 2, "the failed pass and b.zip's hand-over, once: b.zip is set aside"
        assert (inbox / "b.zip").exists()
    finally:
        watcher.stop()
        watcher.join(5)


def test_last_scan_moves_only_while_every_folder_is_listed(tmp_path: Path) -> None:
    inbox, night = tmp_path / "inbox", tmp_path / "night"
    watcher = InboxWatcher([inbox], [night], stable_seconds=0, scan_interval=60, on_stable=_never)
    inbox.mkdir()
    night.write_text("a file where the night folder should be")
    watcher.scan_once()
    assert watcher.last_scan is None and set(watcher.unlisted) == {night}
    night.unlink()
    night.mkdir()
    watcher.scan_once()
    assert watcher.last_scan is not None and watcher.unlisted == {}


def test_deep_folder_is_walked_hashed_and_watched(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    deepest = _nested(inbox / "deep")
    try:
        relative = "/".join(["d"] * DEPTH) + "/x.dcm"
        expected = hashlib.sha256(relative.encode() + b"\x00" + b"slice").hexdigest()  # by the format
        assert sha256_of(inbox / "deep") == (expected, 5)
        assert signature(inbox / "deep")[:2] == (1, 5)
        handed = threading.Event()
        watcher = InboxWatcher(
            [inbox], [], stable_seconds=0, scan_interval=0.05, on_stable=lambda p, n: handed.set()
        )
        watcher.start()  # watchdog's recursive watch fails on it: scans only
        try:
            assert handed.wait(10) and watcher.is_alive()
        finally:
            watcher.stop()
            watcher.join(5)
    finally:
        _remove(deepest)


def test_folder_files_lists_in_rglob_order_without_links(tmp_path: Path) -> None:
    root = tmp_path / "f"
    for relative in ("a/x", "a-b", "a.b/y", "a/b/z", "B", "é/1", "\udcfc", "a b", "~t", "0/0/0"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode("utf-8", "surrogateescape"))
    (root / "link").symlink_to("a-b")
    (root / "dirlink").symlink_to("a")
    os.mkfifo(root / "pipe")
    expected = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    assert [p for p, _ in folder_files(root)] == expected
    assert all(st.st_size == p.stat().st_size for p, st in folder_files(root))


# ---------------------------------------------------------------- helpers
def _never(path: Path, night: bool) -> None:
    raise AssertionError(f"nothing is stable here: {path}")


def _nested(top: Path) -> Path:
    """``top/d/d/…/d`` (DEPTH levels) holding ``x.dcm``; returns the deepest folder. Built with
    relative steps (the absolute path is long, and os.makedirs recurses)."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(DEPTH):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        with open(os.open("x.dcm", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"slice")
    finally:
        os.close(fd)
    return top


def _remove(top: Path) -> None:
    """Remove what :func:`_nested` made, wherever the daemon put it (``shutil.rmtree`` and ``rglob``
    recurse too deep for it; GNU rm does not)."""
    control = top.parent / ".ctwatch"
    for where in (top, *control.glob(f"*/*{top.name}"), *control.glob(f"*/*/*{top.name}")):
        if where.is_dir():
            subprocess.run(["rm", "-rf", str(where)], check=True, timeout=60)
