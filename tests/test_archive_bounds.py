"""Work per arrival bounded by what it really holds; inputs read with ordinary I/O; unreadable,
empty, HTML and other non-DICOM inputs refused in plain words (issue 15).

Real ZIPs of real DICOM (tests/dicomgen.py), real truncation of a file another process is reading,
real permissions: as root, the reading runs in a child process without the capabilities that let
root read everything (``setpriv``), on files and folders owned by another user.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from processor.config import load_settings
from processor.daemon import Components, build
from processor.dicom.scan import looks_like_dicom, scan_members
from processor.errors import IngestError
from processor.executor import LocalExecutor
from processor.intake.archive import Limits, open_arrival
from processor.intake.bounds import ReadBudget, preadv_into
from processor.state import Arrival
from processor.vocab import ArrivalState
from tests import dicomgen
from tests.conftest import REPO, Project
from tests.dicomgen import BIG, DEFLATED, EXPLICIT, IMPLICIT, make_series, to_bytes, write_folder, write_zip

MEMBER = 1_000_000  # bytes of zeros per member: 1 MB deflates ~1000x, just under the ratio cap's size floor


def _zeros_zip(path: Path, members: int, good: list | None = None) -> Path:
    block = bytes(MEMBER)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(members):
            zf.writestr(f"zeros/{i:05d}.dcm", block)
        for i, ds in enumerate(good or []):
            zf.writestr(f"study/IM{i:04d}", to_bytes(ds))
    return path


def _zip_bytes(datasets: list) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for i, ds in enumerate(datasets):
            zf.writestr(f"IM{i}", to_bytes(ds))
    return buffer.getvalue()


# ---------------------------------------------------------------- what is DICOM, from its first bytes
@pytest.mark.parametrize("body", [IMPLICIT, EXPLICIT, BIG, DEFLATED])
@pytest.mark.parametrize("preamble,meta", [(True, True), (False, True), (False, False)])
def test_every_encoding_the_scan_reads_looks_like_dicom(body: str, preamble: bool, meta: bool) -> None:
    datasets, _ = dicomgen.small_series(1, 16)
    data = dicomgen.encoded_bytes(
        datasets[0], body=body, preamble=preamble, meta=meta, declared="same" if meta else None
    )
    assert looks_like_dicom(data) and looks_like_dicom(data[:200])


def _element(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", group, element, len(value)) + value  # Implicit VR Little Endian


def test_old_layouts_without_preamble_look_like_dicom() -> None:
    command = _element(0, 0, struct.pack("<L", 18)) + _element(0, 0x0100, struct.pack("<H", 1))
    acr_nema = _element(8, 0, struct.pack("<L", 30)) + _element(8, 0x0016, b"1.2.840.10008.5.1.4.1.1.2\0")
    for data in (command + _element(8, 0x0018, b"1.2\0"), acr_nema + _element(8, 0x0018, b"1.2\0")):
        assert looks_like_dicom(data)


@pytest.mark.parametrize(
    "data",
    [
        bytes(MEMBER),
        b"<!DOCTYPE html><html><body>Sign in</body></html>",
        b"%PDF-1.7\n" + bytes(500),
        b"patient notes, plain text\n" * 40,
        b"\x89PNG\r\n\x1a\n" + bytes(300),
        _element(0x0010, 0x0010, b"DOE^JOHN") + _element(0x0008, 0x0018, b"1.2\0"),  # tags descending
        _element(0x0018, 0x0050, b"1 ") * 4,  # starts after group 0008: no SOPInstanceUID can follow
    ],
    ids=["zeros", "html", "pdf", "text", "png", "descending", "late-group"],
)
def test_what_cannot_start_a_dicom_file_is_not_dicom(data: bytes) -> None:
    assert not looks_like_dicom(data)


def test_zero_filled_members_are_skipped_from_their_first_bytes_without_inflating_them(
    tmp_path: Path,
) -> None:
    """300 members of 1 MB of zeros beside a real series: the series is found, every zeros member is
    'not DICOM', and what was inflated is their heads, not their 300 MB."""
    series = make_series(20)
    path = _zeros_zip(tmp_path / "zeros.zip", 300, series)
    with open_arrival(path, Limits()) as contents:
        result = scan_members(contents.members)
        spent = contents.budget.spent
    assert result.dicom_files == 20 and dict(result.skipped) == {"not DICOM": 300}
    assert spent < 300 * 2 * 65536 + 20 * 1_000_000  # a head of each, not 300 MB


def test_a_preamble_followed_by_no_dicom_element_is_corrupt_without_being_parsed(tmp_path: Path) -> None:
    path = tmp_path / "junk.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i in range(200):
            zf.writestr(f"f{i}", b"\0" * 128 + b"DICM" + bytes(MEMBER - 132))
    with open_arrival(path, Limits()) as contents:
        result = scan_members(contents.members)
        assert dict(result.skipped) == {"corrupt DICOM": 200} and contents.budget.spent < 200 * 2 * 65536


def test_reads_beyond_the_arrivals_byte_budget_are_refused(tmp_path: Path) -> None:
    """Declared sizes within max_total_bytes, but real DICOM files whose headers end past the first
    64 KiB, so each is read twice: the bytes actually read pass the running budget and the arrival
    is refused in plain words."""
    blobs = []
    for ds in make_series(3):
        ds.add_new(0x00290010, "LO", "CTWATCH TEST")  # a private block before the pixels
        ds.add_new(0x00291010, "OB", bytes(400_000))
        blobs.append(to_bytes(ds))
    path = tmp_path / "rereads.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, blob in enumerate(blobs):
            zf.writestr(f"IM{i}", blob)
    limit = sum(map(len, blobs)) + 50_000
    with open_arrival(path, Limits()) as contents:
        assert scan_members(contents.members).dicom_files == 3 and contents.budget.spent > limit
    with (
        pytest.raises(IngestError, match=f"reading its files took more than {limit} bytes"),
        open_arrival(path, Limits(max_total_bytes=limit)) as contents,
    ):
        scan_members(contents.members)


def test_the_check_runs_while_members_are_read(tmp_path: Path) -> None:
    calls: list[int] = []

    class Stop(Exception):
        pass

    def check() -> None:
        calls.append(1)
        if len(calls) == 50:
            raise Stop

    with pytest.raises(Stop), open_arrival(_zeros_zip(tmp_path / "z.zip", 200), Limits(), check) as contents:
        scan_members(contents.members)
    assert len(calls) == 50


# ---------------------------------------------------------------- the executor: time budget, stop, reasons
def _components(project: Project) -> Components:
    return build(load_settings(project.config))


def _claimed(components: Components, path: Path) -> Arrival:
    aid = components.intake.accept(path)
    assert aid is not None
    arrival = components.state.claim(aid)
    assert arrival is not None
    return arrival


class _TickingClock:
    """A clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_an_arrival_that_takes_too_long_to_read_is_quarantined_and_the_next_is_processed(
    project: Project,
) -> None:
    components = _components(project)
    executor = LocalExecutor(
        components.pipeline,
        components.recorder(),
        limits=Limits(max_seconds_per_arrival=600),
        clock=_TickingClock(),  # one "second" per chunk read: 1,500 members take far longer than 600
    )
    slow = _claimed(components, _zeros_zip(project.inbox / "zeros.zip", 1500))
    assert executor.process(slow) == ArrivalState.QUARANTINED
    reason = components.state.arrival(slow.id).error or ""
    assert "took longer than limits.max_seconds_per_arrival (600 s)" in reason
    assert "raise limits.max_seconds_per_arrival" in reason
    good = _claimed(components, write_zip(project.inbox / "good.zip", make_series(20)))
    assert executor.process(good) == ArrivalState.DONE
    components.state.close()


def test_a_stop_request_ends_the_reading_at_the_next_chunk_and_releases_the_arrival(project: Project) -> None:
    components = _components(project)
    executor = components.executor()
    arrival = _claimed(components, _zeros_zip(project.inbox / "zeros.zip", 2000))
    asked: list[int] = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 100

    assert executor.process(arrival, should_stop) == ArrivalState.PENDING
    assert len(asked) == 100, "checked while the members were read, and not read further once asked"
    assert components.state.arrival(arrival.id).state == ArrivalState.PENDING
    components.state.close()


def _deflate64(path: Path) -> Path:
    """A real ZIP whose members say Deflate64 (method 9), as Windows writes large folders."""
    raw = bytearray(path.read_bytes())
    for signature, at in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        offset = raw.find(signature)
        while offset >= 0:
            struct.pack_into("<H", raw, offset + at, 9)
            offset = raw.find(signature, offset + 1)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    "name,make,words",
    [
        (
            "empty.zip",
            lambda p: p.write_bytes(b""),
            "is empty (0 bytes): the copy or download did not complete",
        ),
        (
            "study.zip",
            lambda p: p.write_bytes(b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n"),
            "is an HTML page, not DICOM or a ZIP: the download probably returned a login or error page",
        ),
        (
            "report.pdf",
            lambda p: p.write_bytes(b"%PDF-1.4\n" + bytes(4000)),
            "no DICOM images found: the file is not a ZIP, it is a PDF document — export the study as DICOM",
        ),
        (
            "notes.txt",
            lambda p: p.write_text("findings: none\n" * 50),
            "no DICOM images found: the file is not a ZIP, it is text — export",
        ),
        (
            "study.7z",
            lambda p: p.write_bytes(b"7z\xbc\xaf\x27\x1c" + bytes(500)),
            "it is a 7-Zip archive — ctwatch reads ZIP archives only: re-pack the study as a ZIP",
        ),
        (
            "win.zip",
            lambda p: _deflate64(write_zip(p, make_series(3))),
            "is compressed with Deflate64 (ZIP method 9), which ctwatch cannot read; re-export the ZIP",
        ),
        (
            "nothing.zip",
            lambda p: p.write_bytes(b"PK\x05\x06" + bytes(18)),
            "no DICOM images found among 0 file(s)",
        ),
        (
            "batch",  # a folder of ZIPs: read as one drop's DICOM files, so its ZIPs are not opened
            lambda p: (
                p.mkdir(),
                write_zip(p / "a.zip", make_series(3)),
                write_zip(p / "b.zip", make_series(3)),
            ),
            "the folder holds 2 ZIP file(s) and no DICOM files. A folder is read as the DICOM files of "
            "one drop, so the ZIPs inside are not opened — drop each ZIP on its own",
        ),
        (
            "study.exe",  # a program with a ZIP appended
            lambda p: p.write_bytes(b"MZ\x90\x00" + bytes(500) + _zip_bytes(make_series(1))),
            "it is a self-extracting archive (a program with a ZIP inside) — ctwatch does not run programs",
        ),
    ],
    ids=["empty", "html", "pdf", "text", "7z", "deflate64", "empty-zip", "folder-of-zips", "self-extracting"],
)
def test_inputs_without_dicom_are_quarantined_with_their_own_plain_reason(
    project: Project, name: str, make: Callable[[Path], object], words: str
) -> None:
    components = _components(project)
    path = project.inbox / name
    make(path)
    arrival = _claimed(components, path)
    assert components.executor().process(arrival) == ArrivalState.QUARANTINED
    reason = components.state.arrival(arrival.id).error or ""
    assert words in reason and "internal error" not in reason
    components.state.close()


# ---------------------------------------------------------------- a truncated input: an error, never SIGBUS
_READER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from processor.dicom.scan import scan_members
    from processor.errors import IngestError
    from processor.intake.archive import Limits, open_arrival

    try:
        with open_arrival(Path(sys.argv[1]), Limits()) as contents:
            print("opened", flush=True)
            if sys.stdin.readline().strip() == "loop":
                for _ in range(10_000):  # read every member whole, again and again, until it fails
                    for member in contents.members:
                        member.data()
            scan = scan_members(contents.members)
            for study in scan.studies:
                for series in study.series.values():
                    for instance in series.instances:
                        instance.member.data()
            print("read", scan.dicom_files, flush=True)
    except IngestError as exc:
        print("refused:", exc, flush=True)
    """
)


def _reader(path: Path, mode: str, cut: Callable[[], None]) -> subprocess.CompletedProcess[str]:
    """Run _READER on ``path`` in a child; ``cut`` truncates once it has opened the input (``mode``
    'then' reads after the cut, 'loop' is already reading whole members when the cut comes)."""
    child = subprocess.Popen(
        [sys.executable, "-c", _READER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline().strip() == "opened"
        if mode == "loop":
            child.stdin.write("loop\n")
            child.stdin.flush()
            cut()
        else:
            cut()
            child.stdin.write("then\n")
            child.stdin.flush()
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
        child.wait()
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def _big_series(n: int) -> list:
    return make_series(n, stored=np.arange(n * 512 * 512, dtype=np.int16).reshape(n, 512, 512) % 3000)


@pytest.mark.parametrize("mode", ["then", "loop"])
@pytest.mark.parametrize("kind", ["stored-zip", "deflated-zip", "file", "folder"])
def test_an_input_truncated_while_it_is_read_is_an_error_for_the_arrival_not_a_signal(
    tmp_path: Path, kind: str, mode: str
) -> None:
    series = _big_series(40)  # 40 slices of 512 KB
    if kind.endswith("zip"):
        path = target = tmp_path / f"{kind}.zip"
        method = zipfile.ZIP_STORED if kind == "stored-zip" else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(path, "w", compression=method) as zf:
            for i, ds in enumerate(series):
                zf.writestr(f"IM{i:04d}", to_bytes(ds))
    elif kind == "file":
        path = target = tmp_path / "one.dcm"
        path.write_bytes(to_bytes(_big_series(1)[0]) + bytes(64 << 20))  # one large uncompressed file
    else:
        path = write_folder(tmp_path / "folder", series)
        target = sorted(path.iterdir())[-1]

    def cut() -> None:
        os.truncate(target, target.stat().st_size // 3)

    run = _reader(path, mode, cut)
    assert run.returncode == 0, f"the reader died (signal {-run.returncode})" + run.stderr[-2000:]
    assert "refused:" in run.stdout, run.stdout + run.stderr[-2000:]
    assert "while it was read" in run.stdout and "copy it again" in run.stdout, run.stdout


# ---------------------------------------------------------------- what the service user cannot read
OTHER_UID = 54321
_OPENER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from processor.dicom.scan import scan_members
    from processor.errors import IngestError
    from processor.intake.archive import Limits, open_arrival

    try:
        with open_arrival(Path(sys.argv[1]), Limits()) as contents:
            print("read", scan_members(contents.members).dicom_files)
    except IngestError as exc:
        print("refused:", exc)
    """
)


def _lock_away(path: Path) -> None:
    """Make ``path`` unreadable to the child: another user's, mode 600/700 (as root), or mode 000."""
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
        path.chmod(0o700 if path.is_dir() else 0o600)
    else:
        path.chmod(0)


def _open_without_privilege(path: Path) -> subprocess.CompletedProcess[str]:
    drop = "dac_override,dac_read_search"
    prefix = (
        ["setpriv", f"--inh-caps=-{drop.replace(',', ',-')}", f"--bounding-set=-{drop.replace(',', ',-')}"]
        if os.geteuid() == 0
        else []
    )
    return subprocess.run(
        [*prefix, sys.executable, "-c", _OPENER, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


@pytest.fixture
def restore_access():  # type: ignore[no-untyped-def]
    locked: list[Path] = []
    yield locked.append
    for path in locked:  # so that tmp_path can be cleaned up when not root
        path.chmod(0o700)


@pytest.mark.parametrize(
    "kind,shown",
    [
        ("sub-folder", "cannot read 'deeper' in drop"),
        ("file", "cannot read 'IM00007' in drop"),
        ("zip", "cannot read study.zip"),
        ("single-file", "cannot read one.dcm"),
    ],
)
def test_what_cannot_be_read_refuses_the_arrival_in_plain_words(
    tmp_path: Path, kind: str, shown: str, restore_access: Callable[[Path], None]
) -> None:
    if os.geteuid() == 0 and subprocess.run(["setpriv", "--help"], capture_output=True).returncode != 0:
        pytest.skip("setpriv is needed to read as root without the capability to read everything")
    series = make_series(30)
    if kind in ("sub-folder", "file"):
        arrival = write_folder(tmp_path / "drop", series[:22])
        write_folder(arrival / "deeper", series[22:])
        locked = arrival / ("deeper" if kind == "sub-folder" else "IM00007")
    elif kind == "zip":
        arrival = locked = write_zip(tmp_path / "study.zip", series)
    else:
        arrival = locked = tmp_path / "one.dcm"
        arrival.write_bytes(to_bytes(series[0]))
    before = _open_without_privilege(arrival)
    assert before.stdout.strip() == ("read 1" if kind == "single-file" else "read 30"), before.stderr
    _lock_away(locked)
    restore_access(locked)
    run = _open_without_privilege(arrival)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith("refused: ") and shown in run.stdout, run.stdout + run.stderr[-2000:]
    assert "permission denied — give the service user read access to it, then drop it again" in run.stdout


@pytest.mark.parametrize("sizes", [(4, 4), (3, 4, 2), (2, 9, 5), (12,)])
def test_several_buffers_are_filled_in_turn_and_a_read_past_the_end_stops_short(
    tmp_path: Path, sizes: tuple[int, ...]
) -> None:
    """``preadv_into`` (a slice's header and pixels in one read): the bytes land in order, each
    charged; past the end of the file it returns how many it read and leaves the rest."""
    path = tmp_path / "ten"
    path.write_bytes(bytes(range(10)))
    budget = ReadBudget(1 << 20)
    buffers = [memoryview(bytearray(b"\xee" * n)) for n in sizes]
    fd = os.open(path, os.O_RDONLY)
    try:
        got = preadv_into(fd, buffers, 1, budget, "the file ten")
    finally:
        os.close(fd)
    joined = b"".join(bytes(b) for b in buffers)
    assert got == min(9, sum(sizes))
    assert joined[:got] == bytes(range(1, 1 + got)) and set(joined[got:]) <= {0xEE}
    assert budget.spent >= sum(sizes)


def test_reads_that_stop_short_again_and_again_go_on_where_they_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that hands back a few bytes per call (a signal, a network share): the views
    are filled in order all the same, in a loop (no recursion however short the reads)."""
    data = bytes(range(256)) * 20
    path = tmp_path / "f"
    path.write_bytes(data)
    real = os.preadv

    def one_byte(fd: int, buffers: list, offset: int) -> int:
        return real(fd, [buffers[0][:1]], offset)

    monkeypatch.setattr(os, "preadv", one_byte)
    buffers = [memoryview(bytearray(1500)), memoryview(bytearray(3000))]
    budget = ReadBudget(5000)  # the request is charged once, not again at each short read
    fd = os.open(path, os.O_RDONLY)
    try:
        got = preadv_into(fd, buffers, 7, budget, "the file f")
    finally:
        os.close(fd)
    assert got == 4500 and bytes(buffers[0]) + bytes(buffers[1]) == data[7:4507]
    assert budget.spent == 4500
