"""A drop is taken only once it is complete (issue 17, item 4).

A folder needs a longer quiet period than a file, and every DICOM file in it must read whole; a
copy that pauses longer than a file's quiet period is processed once, with all its slices. On a
local disk a ZIP is taken as soon as its copy closes it. Times are scaled down through the settings.
"""

from __future__ import annotations

import errno
import json
import logging
import queue
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from processor.config import load_settings
from processor.errors import ConfigError
from processor.intake.archive import Limits, open_arrival
from processor.intake.closes import CloseEvents, close_events_trusted, filesystem_type
from processor.intake.complete import Verdict, check_file
from processor.intake.diskfiles import TEMPORARY_IN_FOLDER
from processor.intake.watcher import InboxWatcher
from tests.conftest import Project, wait_for
from tests.dicomgen import BIG, encode, encoded_bytes, make_series, to_bytes, write_zip


def _arrivals(project: Project) -> list[tuple[str, str]]:
    if not project.state_path.exists():
        return []
    conn = sqlite3.connect(project.state_path)
    try:
        return conn.execute("select name, state from arrivals").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _nothing_taken(project: Project, folder: Path) -> None:
    control = project.inbox / ".ctwatch"
    taken = [*control.glob("work/*"), *control.glob("quarantine/*"), *control.glob("done/*/*")]
    assert folder.is_dir() and not taken and not _arrivals(project), f"taken before the copy ended: {taken}"


def test_a_folder_copy_that_pauses_is_processed_once_complete(tmp_path: Path) -> None:
    """The issue's case, scaled down: a file's quiet period 1 s, a folder's 4 s, and a copy that
    stops for 2.5 s in the middle of a file. Never taken half-way; one study of all 24 slices."""
    project = Project(
        tmp_path,
        inbox={
            "dirs": ["inbox"],
            "night_dirs": ["inbox/night"],
            "stable_seconds": 1,
            "folder_stable_seconds": 4,
            "scan_interval_seconds": 0.3,
        },
    )
    blobs = [to_bytes(ds) for ds in make_series(24)]
    daemon = project.start()
    try:
        wait_for(lambda: "daemon.started" in project.log_text(), 60, "the daemon to start")
        folder = project.inbox / "study"
        folder.mkdir()
        for i, blob in enumerate(blobs[:12]):
            (folder / f"IM{i:05d}").write_bytes(blob)
        cut = folder / "IM00012"
        cut.write_bytes(blobs[12][: len(blobs[12]) // 2])
        paused = time.monotonic()
        while time.monotonic() - paused < 2.5:  # the copy stalls: longer than a file's quiet period
            _nothing_taken(project, folder)
            time.sleep(0.1)
        with cut.open("ab") as fh:  # raises (no folder) had the half-copied folder been taken
            fh.write(blobs[12][len(blobs[12]) // 2 :])
        for i, blob in enumerate(blobs[13:], start=13):
            _nothing_taken(project, folder)
            (folder / f"IM{i:05d}").write_bytes(blob)
        wait_for(lambda: project.results(), 60, "the study's result")
        wait_for(lambda: _arrivals(project) == [("study", "done")], 30, "the arrival done")
    finally:
        daemon.terminate()
        assert daemon.wait(30) == 0
    results = project.results()
    assert len(results) == 1
    chosen = json.loads(results[0].read_text())["series_selection"]["series"][0]
    assert chosen["slices"] == 24, "every slice of the copy, not the part there before the pause"
    kept = list((project.inbox / ".ctwatch" / "done").glob("*/study"))
    assert len(kept) == 1 and len(list(kept[0].iterdir())) == 24
    assert "Not a directory" not in project.log_text()


def _watcher(inbox: Path, handed: list[Path], now: list[float]) -> InboxWatcher:
    return InboxWatcher(
        [inbox],
        [],
        stable_seconds=1,
        folder_stable_seconds=2,
        scan_interval=60,
        on_stable=lambda path, night: handed.append(path),
        use_watchdog=False,
        clock=lambda: now[0],
    )


def _scan_at(watcher: InboxWatcher, now: list[float], *times: float) -> None:
    for t in times:
        now[0] = t
        watcher.scan_once()


def test_a_quiet_folder_waits_while_a_dicom_file_in_it_is_cut_short(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    folder = inbox / "study"
    folder.mkdir(parents=True)
    blobs = [to_bytes(ds) for ds in make_series(3)]
    for i, blob in enumerate(blobs[:2]):
        (folder / f"IM{i}").write_bytes(blob)
    (folder / "IM2").write_bytes(blobs[2][:-300])  # its pixels cut: a copy stalled inside the file
    handed: list[Path] = []
    now = [0.0]
    watcher = _watcher(inbox, handed, now)
    _scan_at(watcher, now, 0.0, 1.0, 2.5, 5.9)  # quiet past the folder's 2 s, less than 3 x 2 s
    assert handed == [], "a folder with a DICOM file cut short is not taken when merely quiet"
    (folder / "IM2").write_bytes(blobs[2])  # the copy resumes and ends
    _scan_at(watcher, now, 6.0, 7.0)
    assert handed == [], "the folder's own quiet period starts again"
    _scan_at(watcher, now, 8.1)
    assert handed == [folder]


def test_a_file_that_never_reads_is_taken_after_three_quiet_periods_and_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = tmp_path / "inbox"
    folder = inbox / "study"
    folder.mkdir(parents=True)
    blobs = [to_bytes(ds) for ds in make_series(2)]
    (folder / "IM0").write_bytes(blobs[0])
    (folder / "IM1").write_bytes(blobs[1][:-300])
    handed: list[Path] = []
    now = [0.0]
    watcher = _watcher(inbox, handed, now)
    with caplog.at_level(logging.WARNING, logger="processor.intake.watcher"):
        _scan_at(watcher, now, 0.0, 3.0, 5.9)
        assert handed == []
        _scan_at(watcher, now, 6.1)
    assert handed == [folder], "never waited on for ever"
    warning = next(r.getMessage() for r in caplog.records if "watch.unfinished_handover" in r.getMessage())
    assert "(IM1: it ends " in warning and "bytes into its Pixel Data of" in warning
    assert "files=1" in warning and "nothing is deleted" in warning
    assert (folder / "IM1").stat().st_size == len(blobs[1]) - 300, "the file is kept as it is"


@pytest.mark.parametrize("kind", ["native", "jpeg-ls", "big-endian", "no preamble"])
def test_check_file_tells_a_dicom_file_cut_short_from_a_whole_one(tmp_path: Path, kind: str) -> None:
    ds = make_series(1)[0]
    data = {
        "native": lambda: to_bytes(ds),
        "jpeg-ls": lambda: to_bytes(encode(ds, "jpeg-ls")),  # encapsulated fragments
        "big-endian": lambda: encoded_bytes(ds, body=BIG),  # read by pydicom, not the lean walker
        "no preamble": lambda: encoded_bytes(ds, body=BIG, preamble=False, meta=False),
    }[kind]()
    path = tmp_path / "IM1"
    path.write_bytes(data)
    assert check_file(path).verdict is Verdict.COMPLETE
    for cut in (0, 200, 1500, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        result = check_file(path)
        assert result.verdict is Verdict.UNFINISHED and result.reason, (cut, result)
    path.write_bytes(b"Study notes: the patient moved during the scan.\n")
    assert check_file(path).verdict is Verdict.OTHER, "not DICOM: nothing to wait for"


def test_a_zip_copied_on_a_local_disk_is_taken_when_its_copy_closes(tmp_path: Path) -> None:
    """With a quiet period of 30 s, only the close can take the ZIP within the 20 s waited; a close
    after half the ZIP, or the whole ZIP written but still open, takes nothing."""
    if not close_events_trusted(filesystem_type(tmp_path)):
        pytest.skip(f"{tmp_path} is not on a local filesystem ({filesystem_type(tmp_path)})")
    data = write_zip(tmp_path / "source.zip", make_series(20)).read_bytes()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    handed: queue.Queue[Path] = queue.Queue()
    watcher = InboxWatcher(
        [inbox], [], stable_seconds=30, scan_interval=30, on_stable=lambda path, night: handed.put(path)
    )
    watcher.start()
    try:
        target = inbox / "study.zip"
        half = len(data) // 2
        with target.open("wb") as fh:  # a copy tool's first session
            fh.write(data[:half])
        with pytest.raises(queue.Empty):
            handed.get(timeout=1.5)
        with target.open("ab") as fh:  # the next session: reopened, the rest appended
            fh.write(data[half:])
            fh.flush()
            with pytest.raises(queue.Empty):
                handed.get(timeout=1.5)
        assert handed.get(timeout=20) == target
    finally:
        watcher.stop()
        watcher.join(10)


def test_network_shares_keep_the_quiet_period() -> None:
    mounts = (
        "/dev/vda / ext4 rw,relatime 0 0\n"
        "//pacs/export /mnt/pacs cifs rw,vers=3.0 0 0\n"
        "nas:/studies /mnt/nas nfs4 rw 0 0\n"
        "/dev/sdb1 /mnt/pacs/local\\040disk xfs rw 0 0\n"
    )
    assert filesystem_type(Path("/mnt/pacs/inbox"), mounts) == "cifs"
    assert filesystem_type(Path("/mnt/nas"), mounts) == "nfs4"
    assert filesystem_type(Path("/mnt/pacs/local disk/inbox"), mounts) == "xfs"
    assert filesystem_type(Path("/mnt/pacsx/inbox"), mounts) == "ext4"
    assert [close_events_trusted(t) for t in ("cifs", "smb3", "nfs4", "fuse.sshfs", None)] == [False] * 5
    assert close_events_trusted("ext4") and close_events_trusted("xfs")
    closes = CloseEvents(roots=(), clock=lambda: 10.0, settle=0.5)  # an inbox on a share: no roots
    closes.closed("/mnt/pacs/inbox/study.zip")
    assert not closes.settled(Path("/mnt/pacs/inbox/study.zip"), 0, 99.0)


def test_folder_quiet_period_is_checked_against_a_files(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("inbox: {stable_seconds: 10, folder_stable_seconds: 5}\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert (
        "inbox.folder_stable_seconds (value: 5)" in text and "shorter than inbox.stable_seconds (10)" in text
    )
    assert "Fix: make inbox.folder_stable_seconds at least inbox.stable_seconds" in text
    cfg.write_text("inbox: {stable_seconds: 1}\n")
    assert load_settings(cfg).inbox.folder_stable_seconds == 6, "unset: six file quiet periods"
    cfg.write_text("inbox: {stable_seconds: 10}\n")
    assert load_settings(cfg).inbox.folder_stable_seconds == 60


def test_a_folder_with_leftover_temporary_names_is_taken_once_they_stay_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Review F9: a desktop's ``.directory``, a thumbnail's dot-file in a sub-folder, an editor's
    ``~$`` file never get renamed; the folder is taken after three of its quiet periods, those
    files skipped and kept. A file rsync is still writing (its temporary name changes) holds the
    folder until it is renamed."""
    inbox = tmp_path / "inbox"
    left = inbox / "leftovers"
    blobs = [to_bytes(ds) for ds in make_series(3)]
    for i, blob in enumerate(blobs):
        (left / "DICOM" / "S2").mkdir(parents=True, exist_ok=True)
        (left / "DICOM" / "S2" / f"IM{i}").write_bytes(blob)
    leftovers = [left / ".directory", left / "DICOM" / ".hidden_thumb", left / "~$notes\n.docx"]
    for part in leftovers:
        part.write_bytes(b"[Dolphin]\n")
    copying = inbox / "copying"
    copying.mkdir()
    (copying / "IM0").write_bytes(blobs[0])
    partial = copying / ".IM1.Xa81Bq"  # rsync's name while it copies IM1
    partial.write_bytes(blobs[1][:1000])
    handed: list[Path] = []
    now = [0.0]
    watcher = _watcher(inbox, handed, now)  # a folder's quiet period: 2 s
    with caplog.at_level(logging.INFO, logger="processor.intake.watcher"):
        _scan_at(watcher, now, 0.0, 2.5, 4.0)
        assert handed == [], "a temporary name is a copy in progress while it may still change"
        with partial.open("ab") as fh:  # the stalled rsync goes on
            fh.write(blobs[1][1000:])
        _scan_at(watcher, now, 5.0, 6.5)
        assert handed == [left], "unchanged for three quiet periods: leftovers"
        partial.rename(copying / "IM1")
        _scan_at(watcher, now, 7.0, 9.1)
    assert handed == [left, copying]
    waits = sorted(r.getMessage() for r in caplog.records if "watch.waiting_on_temporary" in r.getMessage())
    assert len(waits) == 2, "logged once per folder"
    assert "copying files=1" in waits[0] and "(.IM1.Xa81Bq)" in waits[0]
    assert "leftovers files=3" in waits[1] and "DICOM/.hidden_thumb" in waits[1]
    assert "~$notes\\n.docx" in waits[1] and "\n" not in waits[1], "names escaped"
    assert all(part.exists() for part in leftovers), "nothing is deleted"
    with open_arrival(left, Limits()) as contents:
        assert len(contents.members) == 3 and contents.skipped == {TEMPORARY_IN_FOLDER: 3}


def test_a_file_closed_while_the_scan_hands_over_another_keeps_its_close(tmp_path: Path) -> None:
    """A ZIP dropped and closed after the scan listed its folders (here: while the scan hands over
    the ZIP before it) is taken on its close at the next scan, not after the 30 s quiet period: the
    scan's end forgets only the closes of entries gone before its listing began."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    data = write_zip(tmp_path / "source.zip", make_series(3)).read_bytes()
    first, second = inbox / "a.zip", inbox / "b.zip"
    now = [0.0]
    handed: list[Path] = []

    def on_stable(path: Path, night: bool) -> None:
        handed.append(path)
        if path == first:  # the next drop lands and closes while this scan is still running
            second.write_bytes(data)
            watcher.closes.closed(str(second))

    watcher = InboxWatcher(
        [inbox], [], stable_seconds=30, scan_interval=60, on_stable=on_stable, use_watchdog=False,
        clock=lambda: now[0],
    )  # fmt: skip
    watcher.closes.roots = {inbox}
    first.write_bytes(data)
    watcher.closes.closed(str(first))
    _scan_at(watcher, now, 0.0, 1.0)
    assert handed == [first]
    _scan_at(watcher, now, 2.0)
    assert handed == [first, second], "its close settled at the next scan"


def test_a_change_seen_late_in_a_long_scan_waits_its_whole_quiet_period(tmp_path: Path) -> None:
    """Review: the scan read the clock once; a folder changed while an earlier hand-over took 10 s
    was dated to the scan's start and taken 0.6 s after its last file landed (quiet period 5 s)."""
    inbox, taken = tmp_path / "inbox", tmp_path / "taken"
    for folder in (inbox / "A", inbox / "B", taken):
        folder.mkdir(parents=True)
    (inbox / "A" / "x").write_bytes(b"a")
    (inbox / "B" / "1").write_bytes(b"b")
    now, handed = [0.0], []

    def on_stable(path: Path, night: bool) -> None:
        handed.append((path.name, now[0]))
        path.rename(taken / path.name)
        if path.name == "A":  # a hand-over that takes 10 s, while B's copy goes on
            now[0] += 10.0
            (inbox / "B" / "2").write_bytes(b"c")

    watcher = InboxWatcher(
        [inbox], [], stable_seconds=5, folder_stable_seconds=5, scan_interval=30, on_stable=on_stable,
        use_watchdog=False, clock=lambda: now[0],
    )  # fmt: skip
    _scan_at(watcher, now, 0.0, 100.0, 110.5)
    assert handed == [("A", 100.0)], "B changed at 110 (as the scan saw it): quiet only 0.5 s"
    _scan_at(watcher, now, 115.5)
    assert handed == [("A", 100.0), ("B", 115.5)]


def test_an_inbox_that_fails_to_list_once_does_not_hand_its_entries_over_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review: one failed listing (EMFILE, a share's hiccup) made the scan forget that an entry the
    intake could not move was already handed over: it was handed over again, unchanged."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "bad.zip").write_bytes(b"PK\x03\x04 not really")  # the intake leaves it where it lies
    now, handed = [0.0], []
    watcher = InboxWatcher(
        [inbox], [], stable_seconds=5, scan_interval=30, use_watchdog=False,
        on_stable=lambda path, night: handed.append(now[0]), clock=lambda: now[0],
    )  # fmt: skip
    _scan_at(watcher, now, 0.0, 6.0, 20.0, 40.0)
    assert handed == [20.0], "three quiet periods for a ZIP that does not read"
    listing = Path.iterdir

    def fails_for_the_inbox(self: Path) -> Iterator[Path]:
        if self == inbox:
            raise OSError(errno.EMFILE, "Too many open files")
        return listing(self)

    monkeypatch.setattr(Path, "iterdir", fails_for_the_inbox)
    _scan_at(watcher, now, 50.0)
    assert watcher.unlisted
    monkeypatch.setattr(Path, "iterdir", listing)
    _scan_at(watcher, now, 60.0, 70.0, 80.0)
    assert handed == [20.0], "unchanged: not handed over again"


def test_urgent_and_night_folders_outside_the_inbox_get_file_events(tmp_path: Path) -> None:
    """Review F8: with a quiet period of 30 s, only a close event takes the ZIP within the 15 s
    waited; the night folder inside the inbox is covered by the inbox's recursive watch."""
    if not close_events_trusted(filesystem_type(tmp_path)):
        pytest.skip(f"{tmp_path} is not on a local filesystem ({filesystem_type(tmp_path)})")
    source = write_zip(tmp_path / "source.zip", make_series(3))
    inbox, urgent, night = tmp_path / "inbox", tmp_path / "urgent", tmp_path / "night"
    handed: queue.Queue[Path] = queue.Queue()
    watcher = InboxWatcher(
        [inbox],
        [inbox / "night", night],
        urgent_dirs=[urgent],
        stable_seconds=30,
        scan_interval=30,
        on_stable=lambda path, night: handed.put(path),
    )
    assert watcher.watched_folders() == [inbox, night, urgent]
    watcher.start()
    try:
        for folder in (urgent, night):
            (folder / "study.zip").write_bytes(source.read_bytes())
            assert handed.get(timeout=15) == folder / "study.zip"
    finally:
        watcher.stop()
        watcher.join(10)
