"""Safe archive reading and DICOM discovery on a hostile corpus of real ZIPs."""

from __future__ import annotations

import io
import stat
import struct
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from processor.dicom.scan import HEADER_PREFIX, scan_members
from processor.dicom.volume import load_volume
from processor.errors import IngestError, StepError
from processor.intake.archive import (
    Limits,
    open_arrival,
    safe_member_name,
    zip_central_directory_reads,
)
from processor.intake.diskfiles import ZIP_IN_FOLDER
from tests.dicomgen import make_series, to_bytes, write_folder, write_zip


def scan(path: Path, limits: Limits | None = None):
    with open_arrival(path, limits or Limits()) as contents:
        result = scan_members(contents.members)
        return result, contents.skipped + result.skipped


# ---------------------------------------------------------------- member names
@given(st.text())
def test_safe_member_name_never_escapes(name: str) -> None:
    safe = safe_member_name(name)
    if safe is not None:
        assert not safe.startswith("/")
        assert ".." not in safe.split("/")
        assert "\\" not in safe and "\x00" not in safe
        assert safe == safe_member_name(safe)  # normalising twice changes nothing


@pytest.mark.parametrize(
    "name", ["../evil.dcm", "a/../../evil", "/etc/passwd", "C:\\x.dcm", "..\\..\\x", "a/\x00b", ""]
)
def test_unsafe_names_refused(name: str) -> None:
    assert safe_member_name(name) is None


@pytest.mark.parametrize("name,expected", [("a/b.dcm", "a/b.dcm"), ("./a//b", "a/b"), ("a\\b", "a/b")])
def test_names_normalised(name: str, expected: str) -> None:
    assert safe_member_name(name) == expected


# ---------------------------------------------------------------- hostile corpus
def _zip_with(path: Path, entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for info, data in entries:
            zf.writestr(info, data)
    return path


def test_zip_slip_refused(tmp_path: Path) -> None:
    path = _zip_with(tmp_path / "slip.zip", [("ok.dcm", b"x"), ("../../etc/evil.dcm", b"x")])
    with pytest.raises(IngestError, match="zip-slip"):
        scan(path)


def test_symlink_member_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link.dcm")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    path = _zip_with(tmp_path / "link.zip", [(info, b"/etc/passwd")])
    with pytest.raises(IngestError, match="symbolic link"):
        scan(path)


def test_encrypted_member_refused(tmp_path: Path) -> None:
    path = _zip_with(tmp_path / "enc.zip", [("a.dcm", b"data")])
    raw = bytearray(path.read_bytes())
    # Set the "encrypted" general-purpose flag in the local header and the central directory entry.
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        at = raw.find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        raw[flag_at] |= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(IngestError, match="encrypted"):
        scan(path)


def test_zip_bomb_ratio_refused(tmp_path: Path) -> None:
    path = _zip_with(tmp_path / "bomb.zip", [("zeros.dcm", b"\x00" * 50_000_000)])
    with pytest.raises(IngestError, match="ZIP bomb"):
        scan(path)


def test_zip_total_size_refused(tmp_path: Path) -> None:
    path = _zip_with(tmp_path / "big.zip", [(f"f{i}.bin", b"\x01" * 400_000) for i in range(3)])
    with pytest.raises(IngestError, match="bytes uncompressed"):
        scan(path, Limits(max_total_bytes=1_000_000))


def test_member_count_refused(tmp_path: Path) -> None:
    path = _zip_with(tmp_path / "many.zip", [(f"f{i}", b"") for i in range(30)])
    with pytest.raises(IngestError, match="more than 25 members"):
        scan(path, Limits(max_members=25))


def test_truncated_zip_refused(tmp_path: Path) -> None:
    good = write_zip(tmp_path / "good.zip", make_series(4))
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(IngestError, match="cut.zip is cut short, or has data after its end"):
        scan(cut)


def test_only_non_dicom_files(tmp_path: Path) -> None:
    path = _zip_with(tmp_path / "docs.zip", [("readme.txt", b"hello"), ("report.pdf", b"%PDF-1.4 x" * 50)])
    result, skipped = scan(path)
    assert result.studies == [] and skipped["not DICOM"] == 2


def test_scan_restores_garbage_collector_state(tmp_path: Path) -> None:
    """The scan pauses the cyclic GC for speed; it must leave it as it found it, even on error."""
    import gc

    path = write_zip(tmp_path / "s.zip", make_series(3))
    was = gc.isenabled()
    try:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            result, _ = scan(path)
            assert result.dicom_files == 3 and gc.isenabled() is enabled
        gc.enable()
        with pytest.raises(RuntimeError):
            scan_members(_Boom())
        assert gc.isenabled()
    finally:
        (gc.enable if was else gc.disable)()


class _Boom:
    def __iter__(self):  # noqa: ANN204
        raise RuntimeError("boom")


def test_only_dicomdir_and_mac_junk(tmp_path: Path) -> None:
    path = _zip_with(
        tmp_path / "dir.zip",
        [("DICOMDIR", to_bytes(make_series(1)[0])), ("__MACOSX/._IMG1", b"junk"), (".DS_Store", b"junk")],
    )
    result, skipped = scan(path)
    assert result.studies == []
    assert skipped["DICOMDIR index"] == 1 and skipped["macOS metadata (__MACOSX)"] == 1
    assert skipped["system file (.DS_Store)"] == 1


def test_two_studies_nested_folders_no_extensions_shuffled(tmp_path: Path) -> None:
    a, b = make_series(21), make_series(22)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, ds in enumerate(a):
            zf.writestr(f"PAT/STUDY1/SER{i % 3}/{i:08d}", to_bytes(ds))
    path = write_zip(
        tmp_path / "two.zip",
        b,
        folder="deep/er/still",
        extension="",
        shuffle_seed=3,
        extra={"inner.zip": buf.getvalue(), "notes.txt": b"not dicom"},
    )
    result, skipped = scan(path)
    counts = sorted(s.instance_count for s in result.studies)
    assert counts == [21, 22]
    assert skipped == {"not DICOM": 1}


def test_corrupt_dicom_member_skipped_individually(tmp_path: Path) -> None:
    good = [to_bytes(ds) for ds in make_series(3)]
    broken = good[0][:200]  # DICM preamble but the header is cut short
    path = _zip_with(tmp_path / "c.zip", [("a", good[0]), ("b", good[1]), ("c", good[2]), ("d", broken)])
    result, skipped = scan(path)
    assert result.studies[0].instance_count == 3
    assert sum(skipped.values()) == 1


def test_folder_arrival(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "drop", make_series(5))
    (folder / "sub").mkdir()
    (folder / "sub" / "x.txt").write_text("hi")
    result, skipped = scan(folder)
    assert result.studies[0].instance_count == 5 and skipped["not DICOM"] == 1


def test_dicom_without_preamble_found_by_parse(tmp_path: Path) -> None:
    data = to_bytes(make_series(1)[0])
    bare = data[132:]  # drop preamble and 'DICM': file meta then dataset, as some old exports write
    path = _zip_with(tmp_path / "bare.zip", [("IMG", bare)])
    result, _ = scan(path)
    assert len(result.studies) == 1


def _stored_zip_with_flipped_last_byte(path: Path, entries: list[tuple[str, bytes]], flip: str) -> Path:
    """A STORED ZIP whose member ``flip`` has its last byte changed, so its CRC-32 no longer matches."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    blob = bytearray(buf.getvalue())
    data = dict(entries)[flip]
    end = blob.index(data) + len(data) - 1
    blob[end] ^= 0xFF
    path.write_bytes(bytes(blob))
    return path


def test_bad_crc_in_a_small_member_is_skipped_and_counted(tmp_path: Path) -> None:
    good = [to_bytes(ds) for ds in make_series(3)]  # smaller than the header prefix: read whole
    path = _stored_zip_with_flipped_last_byte(
        tmp_path / "crc.zip", [("a", good[0]), ("b", good[1]), ("c", good[2])], flip="b"
    )
    result, skipped = scan(path)
    assert result.studies[0].instance_count == 2
    assert skipped == {"unreadable member (bad CRC or truncated)": 1}


def test_bad_crc_past_the_header_fails_the_decode_with_a_fix(tmp_path: Path) -> None:
    stored = np.zeros((3, 256, 256), np.int16)  # 128 KiB of pixels: the scan reads only a prefix
    good = [to_bytes(ds) for ds in make_series(3, stored=stored)]
    path = _stored_zip_with_flipped_last_byte(
        tmp_path / "crc.zip", [("a", good[0]), ("b", good[1]), ("c", good[2])], flip="c"
    )
    with open_arrival(path, Limits()) as contents:
        result = scan_members(contents.members)
        assert result.studies[0].instance_count == 3 and not result.skipped
        series = next(iter(result.studies[0].series.values()))
        with pytest.raises(StepError, match="bad CRC.*copy the study again"):
            load_volume(series)


def test_large_members_are_scanned_from_a_prefix_in_zips_and_folders(tmp_path: Path) -> None:
    datasets = make_series(4, stored=np.arange(4 * 256 * 256, dtype=np.int16).reshape(4, 256, 256))
    for arrival in (write_zip(tmp_path / "big.zip", datasets), write_folder(tmp_path / "big", datasets)):
        with open_arrival(arrival, Limits()) as contents:
            member = contents.members[0]
            assert member.size > HEADER_PREFIX
            assert member.read_prefix(HEADER_PREFIX) == member.read()[:HEADER_PREFIX]
            with member.open() as fh:
                assert fh.read() == member.read()
            result = scan_members(contents.members)
            assert result.studies[0].instance_count == 4
            assert all(
                i.pixel_offset is not None
                for i in result.studies[0].series[datasets[0].SeriesInstanceUID].instances
            )


# ---------------------------------------------------------------- members read where they lie
def test_stored_members_and_files_are_read_where_they_lie_with_the_crc_checked(tmp_path: Path) -> None:
    """A STORED member is its exact byte range of the ZIP (ordinary reads, no memory map), a member
    of a nested ZIP a view of the bytes in memory, a DEFLATE member inflated; a file of a folder is
    read from disk. Heads are read where they lie, never the whole member."""
    datasets = make_series(3, stored=np.arange(3 * 64 * 64, dtype=np.int16).reshape(3, 64, 64))
    blobs = {f"S/{i}.dcm": to_bytes(ds) for i, ds in enumerate(datasets)}
    zpath = tmp_path / "mixed.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("S/0.dcm", blobs["S/0.dcm"], compress_type=zipfile.ZIP_STORED)
        zf.writestr("S/1.dcm", blobs["S/1.dcm"], compress_type=zipfile.ZIP_DEFLATED)
        inner = io.BytesIO()
        with zipfile.ZipFile(inner, "w") as nested:
            nested.writestr("S/2.dcm", blobs["S/2.dcm"], compress_type=zipfile.ZIP_STORED)
        zf.writestr("inner.zip", inner.getvalue(), compress_type=zipfile.ZIP_STORED)
    with open_arrival(zpath, Limits()) as contents:
        by_name = {m.name: m for m in contents.members}
        stored, deflated, nested_member = by_name["S/0.dcm"], by_name["S/1.dcm"], by_name["inner.zip!S/2.dcm"]
        assert isinstance(stored.data(), bytes) and stored.data() == blobs["S/0.dcm"] == stored.read()
        assert stored.head(100) == blobs["S/0.dcm"][:100] and stored.read_prefix(7) == blobs["S/0.dcm"][:7]
        assert deflated.span is None and deflated.data() == blobs["S/1.dcm"]  # inflated
        assert isinstance(nested_member.data(), memoryview)
        assert bytes(nested_member.data()) == blobs["S/2.dcm"]
        assert scan_members(contents.members).dicom_files == 3
    folder = write_folder(tmp_path / "folder", datasets)
    (folder / "empty").write_bytes(b"")
    with open_arrival(folder, Limits()) as contents:
        by_name = {m.name: m for m in contents.members}
        assert (
            by_name["IM00001"].data() == blobs["S/0.dcm"]
            and by_name["IM00001"].head(9) == blobs["S/0.dcm"][:9]
        )
        assert bytes(by_name["empty"].data()) == b""
        assert scan_members(contents.members).studies[0].instance_count == 3


@pytest.mark.parametrize("extra", [0, 9, 40, 600])
def test_a_stored_members_first_bytes_read_with_its_local_header_are_its_own(
    tmp_path: Path, extra: int
) -> None:
    """A STORED member's first bytes come with its local header's read (the nested-ZIP check's
    four): whatever the local extra field's length, the member's bytes are its own, never the
    next record's, and a tiny member's CRC-32 is still checked."""
    members = {"a": b"\x01\x02\x03", "b": b"PK\x03", "c": bytes(range(70)), "d": b""}
    zpath = tmp_path / "extra.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for name, data in members.items():
            info = zipfile.ZipInfo(name)
            info.extra = struct.pack("<HH", 0xCAFE, extra) + bytes(extra) if extra else b""
            zf.writestr(info, data, compress_type=zipfile.ZIP_STORED)
    raw = bytearray(zpath.read_bytes())
    with open_arrival(zpath, Limits()) as contents:
        by_name = {m.name: m for m in contents.members}
        for name, data in members.items():
            member = by_name[name]
            assert member.read_prefix(4) == data[:4] and bytes(member.data()) == data
            assert bytes(member.span(0, len(data))) == data and member.head(2) == data[:2]
            if data:
                assert bytes(member.span(1, len(data) - 1)) == data[1:]
    at = raw.find(bytes(range(70)))
    raw[at + 2] ^= 0xFF  # inside the first bytes of member c
    zpath.write_bytes(bytes(raw))
    with open_arrival(zpath, Limits()) as contents:
        c = next(m for m in contents.members if m.name == "c")
        with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
            c.data()
        assert c.read_prefix(4) == bytes([0, 1, 2 ^ 0xFF, 3])


def test_a_stored_member_with_a_bad_crc_is_refused_when_read_whole(tmp_path: Path) -> None:
    good = [to_bytes(ds) for ds in make_series(2, stored=np.zeros((2, 256, 256), np.int16))]
    path = _stored_zip_with_flipped_last_byte(
        tmp_path / "crc.zip", [("a", good[0]), ("b", good[1])], flip="b"
    )
    with open_arrival(path, Limits()) as contents:
        b = next(m for m in contents.members if m.name == "b")
        assert b.head(HEADER_PREFIX) == good[1][:HEADER_PREFIX]  # the head alone is not checked
        for read in (b.read, b.data, lambda: b.read_prefix(len(good[1]))):
            with pytest.raises(zipfile.BadZipFile, match="CRC"):
                read()


# ---------------------------------------------------------------- members that lie, and what cannot be read
_LOCAL_FIELDS = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "size": (22, "<I")}
_CENTRAL_FIELDS = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "size": (24, "<I")}


def _patch_entry(path: Path, name: str, *, flags: int = 0, **fields: int) -> Path:
    """Rewrite one member's entry, in its local header and in the central directory: ``flags`` are
    OR-ed in, ``method``, ``crc`` and ``size`` (the declared uncompressed size) replaced."""
    raw = bytearray(path.read_bytes())
    encoded = name.encode()
    for signature, name_at, layout in (
        (b"PK\x03\x04", 30, _LOCAL_FIELDS),
        (b"PK\x01\x02", 46, _CENTRAL_FIELDS),
    ):
        at = raw.find(signature)
        while raw[at + name_at : at + name_at + len(encoded)] != encoded:
            at = raw.find(signature, at + 1)
            assert at >= 0, f"no {signature!r} entry for {name}"
        offset, fmt = layout["flags"]
        struct.pack_into(fmt, raw, at + offset, struct.unpack_from(fmt, raw, at + offset)[0] | flags)
        for key, value in fields.items():
            struct.pack_into(layout[key][1], raw, at + layout[key][0], value)
    path.write_bytes(bytes(raw))
    return path


def _zeros_zip(path: Path, mib: int, method: int, extra: dict[str, bytes] | None = None) -> Path:
    """A ZIP with ``big.dcm``: ``mib`` MiB of zeros, written in a stream (never whole in memory)."""
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
        with zf.open("big.dcm", "w") as fh:
            block = bytes(1 << 20)
            for _ in range(mib):
                fh.write(block)
    return path


def _peak_bytes(read: Callable[[], object]) -> int:
    """The peak of Python's traced memory while ``read`` runs (it is expected to raise)."""
    tracemalloc.start()
    try:
        with pytest.raises(zipfile.BadZipFile, match="inflates past its declared size of 1000 bytes"):
            read()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "method,mib",
    [(zipfile.ZIP_DEFLATED, 192), (zipfile.ZIP_STORED, 16), (zipfile.ZIP_BZIP2, 16), (zipfile.ZIP_LZMA, 16)],
)
def test_member_inflating_past_its_declared_size_is_stopped_in_bounded_memory(
    tmp_path: Path, method: int, mib: int
) -> None:
    """The central directory says 1000 bytes, the stream inflates to ``mib`` MiB (192 MiB of zeros
    deflate to ~190 KB, so no ratio cap sees it): the read stops at the first byte too many, and
    memory stays near one chunk, never near the inflated size."""
    good = to_bytes(make_series(1)[0])
    path = _patch_entry(
        _zeros_zip(tmp_path / "lie.zip", mib, method, {"good.dcm": good}), "big.dcm", size=1000
    )
    with open_arrival(path, Limits()) as contents:
        big = next(m for m in contents.members if m.name == "big.dcm")
        assert big.size == 1000
        for read in (big.read, big.data, lambda: big.head(HEADER_PREFIX), lambda: big.open().read()):
            assert _peak_bytes(read) < 2 * 2**20  # 2 MiB, against 16-192 MiB inflated
        result = scan_members(contents.members)
    assert result.dicom_files == 1 and result.skipped == {"unreadable member (bad CRC or truncated)": 1}


def test_member_shorter_than_declared_or_with_a_wrong_crc_is_unreadable(tmp_path: Path) -> None:
    good = [to_bytes(ds) for ds in make_series(3)]
    path = _zip_with(tmp_path / "bad.zip", [("a.dcm", good[0]), ("b.dcm", good[1]), ("c.dcm", good[2])])
    _patch_entry(path, "b.dcm", size=len(good[1]) + 100)
    _patch_entry(path, "c.dcm", crc=zlib.crc32(good[2]) ^ 1)
    with open_arrival(path, Limits()) as contents:
        by_name = {m.name: m for m in contents.members}
        with pytest.raises(zipfile.BadZipFile, match="ends 100 bytes short of its declared size"):
            by_name["b.dcm"].read()
        with pytest.raises(zipfile.BadZipFile, match="fails its CRC-32 check"):
            by_name["c.dcm"].read()
        with pytest.raises(zipfile.BadZipFile, match="fails its CRC-32 check"):  # a prefix covering it all
            by_name["c.dcm"].read_prefix(len(good[2]))
        result = scan_members(contents.members)
    assert result.dicom_files == 1 and result.skipped == {"unreadable member (bad CRC or truncated)": 2}


@pytest.mark.parametrize(
    "declared,reason", [(50, "unreadable member (bad CRC or truncated)"), (200_000, "corrupt nested ZIP")]
)
def test_nested_zip_that_lies_about_its_size_is_skipped(tmp_path: Path, declared: int, reason: str) -> None:
    """A lie found while its head is read leaves it a member the scan counts as unreadable; one
    found only when the whole nested ZIP is read skips it as a corrupt nested ZIP."""
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("x.bin", np.random.default_rng(1).bytes(400_000))
    path = _zip_with(
        tmp_path / "outer.zip", [("inner.zip", inner.getvalue()), ("a.dcm", to_bytes(make_series(1)[0]))]
    )
    _patch_entry(path, "inner.zip", size=declared)
    result, skipped = scan(path)
    assert result.dicom_files == 1 and skipped == {reason: 1}


@pytest.mark.parametrize("flags,method", [(0x1, 99), (0, 99), (0x1, zipfile.ZIP_DEFLATED)])
def test_encrypted_zip_is_refused_in_plain_words(tmp_path: Path, flags: int, method: int) -> None:
    """WinZip AES marks a member with method 99 (and flag bit 0); ZipCrypto only with the flag."""
    path = _zip_with(tmp_path / "aes.zip", [("a.dcm", to_bytes(make_series(1)[0]))])
    _patch_entry(path, "a.dcm", flags=flags, method=method)
    kind = "AES encryption" if method == 99 else "ZipCrypto"
    with pytest.raises(
        IngestError,
        match=rf"'a.dcm' is encrypted: the ZIP is password-protected \({kind}\)"
        ".*export the study without a password",
    ):
        scan(path)


@pytest.mark.parametrize("method,words", [(9, "Deflate64"), (98, "PPMd"), (77, "an unknown method")])
def test_unsupported_compression_method_is_refused_in_plain_words(
    tmp_path: Path, method: int, words: str
) -> None:
    path = _zip_with(tmp_path / "odd.zip", [("a.dcm", to_bytes(make_series(1)[0]))])
    _patch_entry(path, "a.dcm", method=method)
    with pytest.raises(
        IngestError,
        match=rf"'a.dcm' is compressed with {words} \(ZIP method {method}\), "
        "which ctwatch cannot read; re-export the ZIP with standard Deflate",
    ):
        scan(path)


@pytest.mark.parametrize(
    "method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA]
)
def test_every_supported_method_reads_back_whole_in_prefixes_and_as_a_stream(
    tmp_path: Path, method: int
) -> None:
    rng = np.random.default_rng(7)
    blobs = {
        "empty": b"",
        "odd": rng.integers(0, 4, 3 * 65536 + 17, dtype=np.uint8).tobytes(),
        "even": rng.integers(0, 4, 2 * 65536, dtype=np.uint8).tobytes(),
    }
    datasets = make_series(3, stored=np.arange(3 * 64 * 64, dtype=np.int16).reshape(3, 64, 64))
    blobs.update({f"S/{i}.dcm": to_bytes(ds) for i, ds in enumerate(datasets)})
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w", compression=method) as zf:
        for name, data in blobs.items():
            zf.writestr(name, data)
    with open_arrival(path, Limits()) as contents:
        for member in contents.members:
            data = blobs[member.name]
            assert member.read() == bytes(member.data()) == data
            for n in (0, 1, 4096, len(data) - 1, len(data), len(data) + 1):
                assert member.read_prefix(max(n, 0)) == data[: max(n, 0)]
            with member.open() as fh:
                assert fh.read(5) + fh.read() == data
        assert scan_members(contents.members).dicom_files == 3


# ---------------------------------------------------------------- where a ZIP ends (issue 17, review F1)
def _outer_with_a_zip_last(tmp_path: Path) -> tuple[bytes, int]:
    """A ZIP of 3 slices whose last member is a ZIP of 3 more, stored as ``zip`` stores ``.zip``
    members; and the offset where that inner ZIP's bytes end."""
    study = make_series(3)[0].StudyInstanceUID
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, ds in enumerate(make_series(3, study_uid=study, series_number=3)):
            zf.writestr(f"S3/IM{i}.dcm", to_bytes(ds))
    outer = _zip_with(
        tmp_path / "outer.zip",
        [(f"S2/IM{i}.dcm", to_bytes(ds)) for i, ds in enumerate(make_series(3, study_uid=study))],
    )
    with zipfile.ZipFile(outer, "a") as zf:
        zf.writestr(zipfile.ZipInfo("series3.zip"), inner.getvalue(), compress_type=zipfile.ZIP_STORED)
    data = outer.read_bytes()
    return data, data.index(inner.getvalue()) + len(inner.getvalue())


def test_a_zip_cut_short_after_a_zip_member_is_neither_complete_nor_read_as_that_member(
    tmp_path: Path,
) -> None:
    """zipfile finds the inner ZIP's end record and reads the cut copy as the inner ZIP alone."""
    data, inner_end = _outer_with_a_zip_last(tmp_path)
    whole = tmp_path / "whole.zip"
    whole.write_bytes(data)
    assert zip_central_directory_reads(whole)
    result, skipped = scan(whole)
    assert result.dicom_files == 6 and not skipped
    for cut in (inner_end, inner_end + 50, len(data) - 30):
        path = tmp_path / f"cut{cut}.zip"
        path.write_bytes(data[:cut])
        assert not zip_central_directory_reads(path), cut
        with pytest.raises(IngestError) as err:
            scan(path)
        assert f"the ZIP cannot be read: cut{cut}.zip is cut short" in str(err.value)
        assert "copy it again from the source" in str(err.value)


def test_a_zip_with_a_comment_or_zip64_ends_reads_and_one_with_data_around_it_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = to_bytes(make_series(1)[0])
    commented = tmp_path / "comment.zip"
    with zipfile.ZipFile(commented, "w") as zf:
        zf.writestr("a.dcm", blob)
        zf.comment = b"exported by PACS"
    big = tmp_path / "zip64.zip"
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 0)  # zipfile writes ZIP64 end records
    _zip_with(big, [("a.dcm", blob)])
    monkeypatch.undo()
    assert b"PK\x06\x06" in big.read_bytes()[-200:]
    for path in (commented, big):
        assert zip_central_directory_reads(path), path.name
        assert scan(path)[0].dicom_files == 1
    for name, data, words in [
        ("after.zip", commented.read_bytes() + b"\0" * 100, "has data after its end"),
        ("zip64cut.zip", big.read_bytes()[:-1], "has data after its end"),
        ("twice.zip", big.read_bytes() + commented.read_bytes(), "joined to other data"),
    ]:
        path = tmp_path / name
        path.write_bytes(data)
        assert not zip_central_directory_reads(path), name
        with pytest.raises(IngestError, match=words):
            scan(path)


@pytest.mark.parametrize("adjusted", [False, True], ids=["stub", "offsets-adjusted"])
def test_a_self_extracting_archive_is_named_as_one(tmp_path: Path, adjusted: bool) -> None:
    """A program with a ZIP appended (``zip -A`` adjusts the offsets for the program) is not read
    as a ZIP: ctwatch does not run programs."""
    stub = b"MZ\x90\x00" + bytes(2000)
    path = tmp_path / "study.exe"
    with path.open("wb") as fh:
        fh.write(stub)
        with zipfile.ZipFile(fh, "w") as zf:  # appended to a file: offsets count from its start
            zf.writestr("a.dcm", to_bytes(make_series(1)[0]))
    if not adjusted:
        path.write_bytes(stub + _zip_with(tmp_path / "plain.zip", [("a.dcm", b"x")]).read_bytes())
    with open_arrival(path, Limits()) as contents:
        assert contents.what is not None and contents.what[0].startswith("a self-extracting archive")
        assert "ctwatch does not run programs" in contents.what[1]


def test_a_zip_inside_a_folder_is_skipped_with_a_reason_that_says_so(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "study", make_series(2))
    write_zip(folder / "more.ZIP", make_series(2))
    result, skipped = scan(folder)
    assert result.dicom_files == 2 and skipped == {ZIP_IN_FOLDER: 1}
    assert "drop each ZIP on its own" in ZIP_IN_FOLDER
