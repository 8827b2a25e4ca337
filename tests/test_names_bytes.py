"""Names are bytes (issue 13): file, folder and ZIP member names in any encoding — UTF-8, Latin-1,
CP437, Shift-JIS, invalid UTF-8, control characters — go through `process` and the daemon into
SQLite, receipts, result JSON, logs and Excel: shown escaped where they are not valid text, their
raw bytes recoverable. An input that cannot be taken in ends once, as a rejected arrival."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import unicodedata
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.intake.archive import Limits, open_arrival
from processor.intake.inbox import fit_name
from processor.intake.register import Intake
from processor.intake.zipnames import member_raw_name, member_text, open_zip
from processor.names import display_name, display_text, name_bytes_hex, name_from_hex, raw_name
from processor.outputs.excel import Report, rejection_row, write_workbook
from processor.state import State
from tests.conftest import Project, wait_for
from tests.dicomgen import make_series, to_bytes, write_zip
from tests.test_spine_e2e import _stop, db_rows

UTF8_FLAG = 0x800
pytestmark = pytest.mark.skipif(
    os.fsencode("\udcfc") != b"\xfc", reason="needs the UTF-8 filesystem encoding with surrogate escapes"
)


# ---------------------------------------------------------------- building inputs with raw names
def zip_bytes_with_raw_names(members: list[tuple[bytes, bytes]], *, utf8_flag: bool) -> bytes:
    """A ZIP whose member names are exactly the given bytes, with bit 11 ("UTF-8") set or clear."""
    placeholders = [str(i).rjust(len(raw), "0") for i, (raw, _) in enumerate(members)]
    assert all(len(p) == len(raw) for p, (raw, _) in zip(placeholders, members, strict=True))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for placeholder, (_, data) in zip(placeholders, members, strict=True):
            zf.writestr(placeholder, data)
        offsets = [info.header_offset for info in zf.infolist()]
    blob = bytearray(buffer.getvalue())
    for offset, (raw, _) in zip(offsets, members, strict=True):  # local headers: flags at 6, name at 30
        _patch_name(blob, offset, flags_at=6, name_at=30, raw=raw, utf8_flag=utf8_flag)
    end = blob.rindex(b"PK\x05\x06")
    entry = struct.unpack_from("<I", blob, end + 16)[0]
    for raw, _ in members:  # central directory: flags at 8, name at 46
        _patch_name(blob, entry, flags_at=8, name_at=46, raw=raw, utf8_flag=utf8_flag)
        entry += 46 + sum(struct.unpack_from("<HHH", blob, entry + 28))
    return bytes(blob)


def _patch_name(
    blob: bytearray, at: int, *, flags_at: int, name_at: int, raw: bytes, utf8_flag: bool
) -> None:
    flags = struct.unpack_from("<H", blob, at + flags_at)[0]
    struct.pack_into("<H", blob, at + flags_at, flags | UTF8_FLAG if utf8_flag else flags & ~UTF8_FLAG)
    blob[at + name_at : at + name_at + len(raw)] = raw


def study_members(prefix: bytes, n: int = 20) -> list[tuple[bytes, bytes]]:
    """``n`` slices of a fresh study named ``<prefix>NNNN.dcm`` (raw bytes)."""
    return [(prefix + b"%04d.dcm" % i, to_bytes(ds)) for i, ds in enumerate(make_series(n), 1)]


CORRUPT_DICOM = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff"  # claims DICOM, header unreadable


@dataclass
class Input:
    """One input as the user made it: its path, and its name as display text and raw bytes."""

    path: Path
    raw: bytes

    @property
    def shown(self) -> str:
        return display_name(self.raw)


def _named(folder: Path, raw: bytes) -> Path:
    return folder / os.fsdecode(raw)


def make_inputs(folder: Path) -> list[Input]:
    """One input per way a name can be bytes; each holds one fresh 20-slice study."""
    folder.mkdir(parents=True, exist_ok=True)
    made: list[Input] = []

    def zip_of(raw: bytes, members: list[tuple[bytes, bytes]], utf8_flag: bool = False) -> None:
        path = _named(folder, raw)
        path.write_bytes(zip_bytes_with_raw_names(members, utf8_flag=utf8_flag))
        made.append(Input(path, raw))

    def folder_of(raw: bytes, file_prefix: bytes) -> None:
        path = _named(folder, raw)
        path.mkdir()
        for name, data in study_members(file_prefix):
            _named(path, name).write_bytes(data)
        made.append(Input(path, raw))

    latin1 = write_zip(_named(folder, b"M\xfcller_Thorax.zip"), make_series(20))
    made.append(Input(latin1, b"M\xfcller_Thorax.zip"))
    folder_of(b"Thorax_\xe4", b"Bild_\xe4_")
    zip_of(b"cp437.zip", study_members(b"M\x9aLLER/IMG"))  # CP437 'Ü', no UTF-8 flag
    sjis = "表示/画像".encode("shift_jis")  # 表 is 0x95 0x5C: a backslash byte inside a character
    zip_of(b"sjis.zip", study_members(sjis) + [(sjis + b"_bad.dcm", CORRUPT_DICOM)])
    zip_of(b"sjis-flagged.zip", study_members(sjis) + [(sjis + b"_bad.dcm", CORRUPT_DICOM)], utf8_flag=True)
    zip_of(b"bad-utf8-\xff.zip", study_members(b"\xc3\x28/\xff_"), utf8_flag=True)
    folder_of(b"raw_\xc3\x28", b"\xed\xa0\x80_")  # an encoded surrogate: invalid UTF-8
    zip_of(b"Zeile\nzwei\x1b[31m.zip", study_members(b"IMG"))
    zip_of(b"\xff" * 240 + b".zip", study_members(b"IMG"))  # shown in 964 characters: cut to fit on disk
    return made


def assert_valid_json_text(path: Path) -> dict:
    """The file is strict UTF-8 JSON whose strings hold no lone surrogates."""
    document = json.loads(path.read_bytes().decode("utf-8"))
    json.dumps(document, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return document


def assert_clean_log(text: str, inputs: list[Input]) -> None:
    assert "Traceback" not in text and "Logging error" not in text, text[-3000:]
    assert not any(line.startswith("zwei") for line in text.splitlines()), "a name split a log line"


def assert_receipts(project: Project, inputs: list[Input], outcome: str = "accepted") -> dict[str, dict]:
    paths = sorted((project.outbox / "receipts").glob("*.json"))
    receipts = {doc["name"]: doc for doc in map(assert_valid_json_text, paths)}
    assert len(receipts) == len(paths), "one receipt per arrival"
    for item in inputs:
        receipt = receipts[item.shown]
        assert receipt["outcome"] == outcome, receipt
        assert name_from_hex(receipt["name_bytes"]) == item.raw
    return receipts


def assert_results(project: Project, inputs: list[Input]) -> None:
    documents = [assert_valid_json_text(p) for p in project.results()]
    assert sorted(d["source"]["name"] for d in documents) == sorted(i.shown for i in inputs)
    raw = {d["source"]["name"]: name_from_hex(d["source"]["name_bytes"]) for d in documents}
    assert all(raw[i.shown] == i.raw for i in inputs), "the result JSON keeps the raw name bytes"
    assert all(d["processing_status"] != "Failure" for d in documents), [d["error"] for d in documents]
    rows = dict(db_rows(project, "select name, name_bytes from arrivals"))
    for item in inputs:
        assert bytes.fromhex(rows[item.shown]) == item.raw


# ---------------------------------------------------------------- the name helper
@given(st.binary(max_size=300))
def test_raw_bytes_round_trip_and_display_is_one_line_of_text(raw: bytes) -> None:
    as_python = os.fsdecode(raw)  # what os.listdir gives for this name
    assert raw_name(as_python) == raw
    assert name_from_hex(name_bytes_hex(as_python)) == raw
    shown = display_name(raw)
    assert shown == display_name(as_python) == display_name(shown)
    shown.encode("utf-8")
    assert len(shown.splitlines()) <= 1
    assert not any(unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") for ch in shown)


@given(st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp"))))
def test_valid_text_names_are_shown_unchanged(text: str) -> None:
    assert display_name(text) == display_name(text.encode()) == text


def test_display_examples() -> None:
    assert display_name(b"M\xfcller_Thorax.zip") == "M\\xfcller_Thorax.zip"
    assert display_name("Zeile\nzwei\x1b.zip") == "Zeile\\nzwei\\x1b.zip"
    assert display_text("a\u2028b") == "a\\u2028b"


_names = st.lists(
    st.binary(min_size=2, max_size=30).filter(lambda b: not b.endswith(b"/")),
    min_size=1,
    max_size=5,
    unique=True,
)


@given(_names, st.booleans())
def test_zip_member_raw_names_survive_with_and_without_utf8_flag(names: list[bytes], flagged: bool) -> None:
    blob = zip_bytes_with_raw_names([(n, b"x") for n in names], utf8_flag=flagged)
    with open_zip(io.BytesIO(blob)) as zf:
        infos = zf.infolist()
        assert [member_raw_name(info) for info in infos] == names
        for info in infos:
            member_text(info).encode("utf-8")
            assert zf.read(info) == b"x"


def test_folder_and_zip_members_have_display_and_raw_names(tmp_path: Path) -> None:
    raw = "表示/画像".encode("shift_jis") + b"0001.dcm"
    path = tmp_path / "flagged.zip"
    path.write_bytes(zip_bytes_with_raw_names([(raw, b"data")], utf8_flag=True))
    with open_arrival(path, Limits()) as contents:
        (member,) = contents.members
        assert member.raw_name == raw and member.read() == b"data"
        member.name.encode("utf-8")
    folder = tmp_path / "f"
    folder.mkdir()
    _named(folder, b"Bild_\xe4\n.dcm").write_bytes(b"data")
    with open_arrival(folder, Limits()) as contents:
        (member,) = contents.members
        assert member.name == "Bild_\\xe4\\n.dcm" and member.raw_name == b"Bild_\xe4\n.dcm"


def test_state_keeps_raw_paths_and_shows_names(tmp_path: Path) -> None:
    state = State(tmp_path / "state.db")
    path = str(_named(tmp_path, b"M\xfcller.zip"))
    aid = state.register_arrival(
        kind="cli",
        name=os.path.basename(path),
        original_path=path,
        current_path=path,
        sha256="0" * 64,
        size=1,
        pipeline_name="p",
        pipeline_version=1,
    ).arrival_id
    state.finish_arrival(aid, "failed", error=f"cannot read {path}")
    arrival = state.arrival(aid)
    assert arrival.current_path == path and arrival.original_path == path
    assert arrival.name == "M\\xfcller.zip" and name_from_hex(arrival.name_bytes) == b"M\xfcller.zip"
    assert "M\\xfcller.zip" in arrival.error and state.active_paths() == set()
    state.close()


def test_excel_cell_shows_escaped_name(tmp_path: Path) -> None:
    row = rejection_row(
        {
            "source_file": "Zeile\nzwei\x1b.zip",
            "state": "quarantined",
            "error": "bad",
            "arrival_id": 1,
            "kind": "inbox",
        }
    )
    assert row["Source file"] == "Zeile\\nzwei\\x1b.zip"
    write_workbook(tmp_path / "r.xlsx", Report("t", [row], 0.5, datetime.now(UTC)))


# ---------------------------------------------------------------- process
def test_process_names_in_any_encoding_and_a_bad_input_does_not_stop_the_batch(
    project: Project, tmp_path: Path
) -> None:
    inputs = make_inputs(tmp_path / "in")
    broken = tmp_path / "in" / "broken.zip"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    pipe = tmp_path / "in" / "pipe"
    os.mkfifo(pipe)
    order = [*inputs[:2], broken, pipe, *inputs[2:]]
    proc = project.run("process", *map(str, [i.path if isinstance(i, Input) else i for i in order]))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    printed = {line.split("\t")[0] for line in proc.stdout.splitlines()}
    assert printed == {display_name(i.path) for i in inputs}
    assert f"{display_name(pipe)}\tquarantined\t" in proc.stderr
    receipts = assert_receipts(project, inputs)
    assert len(receipts) == len(inputs) + 2
    assert receipts["broken.zip"]["outcome"] == receipts["pipe"]["outcome"] == "rejected"
    assert "neither a file nor a folder" in receipts["pipe"]["message"]
    assert_results(project, inputs)
    assert all(i.path.exists() for i in inputs), "process leaves its inputs where they are"
    log = (project.root / "state" / "ctwatch.log").read_bytes().decode("utf-8")
    assert_clean_log(log, inputs)
    assert "scan.corrupt member=" in log


# ---------------------------------------------------------------- daemon
def test_daemon_names_in_any_encoding(project: Project, tmp_path: Path) -> None:
    inputs = make_inputs(tmp_path / "in")
    daemon = project.start()
    try:
        for item in inputs:
            os.replace(item.path, project.inbox / item.path.name)
        wait_for(
            lambda: len(list((project.outbox / "receipts").glob("*.json"))) == len(inputs),
            120,
            "a receipt for every input",
        )
        wait_for(
            lambda: len(db_rows(project, "select 1 from arrivals where state = 'done'")) == len(inputs),
            60,
            "every arrival done",
        )
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    assert_receipts(project, inputs)
    assert_results(project, inputs)
    done = {p.name for p in (project.inbox / ".ctwatch" / "done").glob("*/*")}
    assert done == {fit_name(i.shown, spare=len(".error.txt")) for i in inputs}, "kept under display names"
    assert sorted(p.name for p in project.inbox.iterdir()) == [".ctwatch", "night", "urgent"]
    assert_clean_log(project.root.joinpath("daemon.log").read_bytes().decode("utf-8"), inputs)


def test_daemon_input_that_cannot_be_taken_in_ends_once_in_quarantine(
    project: Project, tmp_path: Path
) -> None:
    work = project.inbox / ".ctwatch" / "work"
    work.parent.mkdir(parents=True)
    work.write_text("not a folder")  # every move into the work folder now fails, before registration
    daemon = project.start()
    try:
        first = _named(tmp_path, b"M\xfcller_Thorax.zip")
        write_zip(first, make_series(20))
        os.replace(first, project.inbox / first.name)
        wait_for(lambda: list((project.outbox / "receipts").glob("*.json")), 60, "the first receipt")
        second = write_zip(tmp_path / "later.zip", make_series(20))  # several scans later
        os.replace(second, project.inbox / second.name)
        wait_for(
            lambda: len(list((project.outbox / "receipts").glob("*.json"))) == 2, 60, "the second receipt"
        )
    finally:
        assert _stop(daemon) == 0, project.log_text()[-3000:]
    receipts = assert_receipts(
        project, [Input(first, b"M\xfcller_Thorax.zip"), Input(second, b"later.zip")], outcome="rejected"
    )
    assert "could not be taken in" in receipts["later.zip"]["message"]
    quarantine = project.inbox / ".ctwatch" / "quarantine"
    assert sorted(p.name for p in quarantine.iterdir()) == [
        "M\\xfcller_Thorax.zip",
        "M\\xfcller_Thorax.zip.error.txt",
        "later.zip",
        "later.zip.error.txt",
    ]
    note = (quarantine / "M\\xfcller_Thorax.zip.error.txt").read_text(encoding="utf-8")
    assert "M\\xfcller_Thorax.zip" in note and "could not be taken in" in note
    assert db_rows(project, "select state from arrivals") == [("quarantined",), ("quarantined",)]
    log = project.root.joinpath("daemon.log").read_bytes().decode("utf-8")
    assert "Traceback" not in log and log.count("arrival.quarantined") == 2


# ---------------------------------------------------------------- log lines (issue 15: log forging)
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # every boundary str.splitlines knows


@given(st.text(alphabet=st.characters(blacklist_categories=())))  # surrogates and controls included
def test_display_text_of_any_text_is_one_line(text: str) -> None:
    shown = display_text(text)
    assert len(shown.splitlines()) <= 1 and not any(ch in shown for ch in LINE_BREAKS)
    shown.encode("utf-8")


def test_every_line_break_is_shown_as_its_escape() -> None:
    for ch in LINE_BREAKS:
        assert display_name(f"a{ch}b") == "a" + ch.encode("unicode_escape").decode("ascii") + "b"


def test_intake_log_lines_show_escaped_paths(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The intake's own log lines escape a name, whatever handler writes them (not only the CLI's
    one-line formatter): an entry that can be neither registered nor quarantined logs its path."""
    inbox = tmp_path / "inbox"
    control = inbox / ".ctwatch"
    control.mkdir(parents=True)
    (control / "work").write_text("in the way")  # registering fails: no work folder can be made
    (control / "quarantine").write_text("in the way")  # and so does the move to quarantine
    raw = b"Zeile\nINJECTED level=CRITICAL \xfc.zip"
    path = write_zip(_named(inbox, raw), make_series(20))
    state = State(tmp_path / "state.db")
    intake = Intake(state, pipeline_name="p", pipeline_version=1, inbox_dirs=[inbox], outbox=tmp_path / "out")
    with caplog.at_level(logging.DEBUG, logger="processor"):
        aid = intake.accept(path)
    state.close()
    assert aid is not None and path.exists(), "refused, and left where it was"
    lines = caplog.text.splitlines()
    assert not [line for line in lines if line.startswith("INJECTED")], caplog.text
    shown = display_name(raw)
    failed = [line for line in lines if "arrival.quarantine_failed" in line]
    assert failed and f"path={display_name(path)}" in failed[0] and shown in failed[0]
    assert any(f"arrival.quarantined arrival={aid} name={shown} " in line for line in lines)


def test_a_traceback_quoting_a_name_with_a_newline_cannot_forge_a_log_line() -> None:
    import logging
    import sys

    from processor.cli import OneLineFormatter

    formatter = OneLineFormatter("%(levelname)s %(message)s")
    try:
        raise RuntimeError("cannot read x.zip\nERROR forged line")
    except RuntimeError:
        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed %s", ("a\nb",), sys.exc_info())
    text = formatter.format(record)
    assert not any(line.startswith("ERROR forged") for line in text.splitlines()), text
    assert "RuntimeError: cannot read x.zip\\nERROR forged line" in text
    assert text.splitlines()[0] == "ERROR failed a\\nb"


@given(_names, st.booleans())
def test_zip_member_text_is_utf8_when_it_decodes_else_cp437(names: list[bytes], flagged: bool) -> None:
    """A member's name as text, whatever its bytes (ASCII ones read on a shorter path): the bytes
    decoded as UTF-8 where they are UTF-8, else as CP437, cut at a NUL."""
    blob = zip_bytes_with_raw_names([(n, b"x") for n in names], utf8_flag=flagged)
    with open_zip(io.BytesIO(blob)) as zf:
        for raw, info in zip(names, zf.infolist(), strict=True):
            try:
                expected = raw.decode("utf-8")
            except UnicodeDecodeError:
                expected = raw.decode("cp437")
            assert member_text(info) == expected.split("\x00", 1)[0], raw
