"""Safe archive reading and DICOM discovery on a hostile corpus of real ZIPs."""

from __future__ import annotations

import io
import stat
import zipfile
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
    can_map,
    filesystem_types,
    mappable_type,
    open_arrival,
    safe_member_name,
)
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


@pytest.mark.parametrize("name", ["../evil.dcm", "a/../../evil", "/etc/passwd", "C:\\x.dcm",
                                  "..\\..\\x", "a/\x00b", ""])
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
    with pytest.raises(IngestError, match="truncated or corrupt"):
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
    path = _zip_with(tmp_path / "dir.zip", [("DICOMDIR", to_bytes(make_series(1)[0])),
                                            ("__MACOSX/._IMG1", b"junk"), (".DS_Store", b"junk")])
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
    path = write_zip(tmp_path / "two.zip", b, folder="deep/er/still", extension="", shuffle_seed=3,
                     extra={"inner.zip": buf.getvalue(), "notes.txt": b"not dicom"})
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
    path = _stored_zip_with_flipped_last_byte(tmp_path / "crc.zip", [("a", good[0]), ("b", good[1]),
                                                                      ("c", good[2])], flip="b")
    result, skipped = scan(path)
    assert result.studies[0].instance_count == 2
    assert skipped == {"unreadable member (bad CRC or truncated)": 1}


def test_bad_crc_past_the_header_fails_the_decode_with_a_fix(tmp_path: Path) -> None:
    stored = np.zeros((3, 256, 256), np.int16)  # 128 KiB of pixels: the scan reads only a prefix
    good = [to_bytes(ds) for ds in make_series(3, stored=stored)]
    path = _stored_zip_with_flipped_last_byte(tmp_path / "crc.zip", [("a", good[0]), ("b", good[1]),
                                                                      ("c", good[2])], flip="c")
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
            assert all(i.pixel_offset is not None for i in result.studies[0].series[datasets[0].SeriesInstanceUID]
                       .instances)


# ---------------------------------------------------------------- zero-copy members
def test_stored_members_and_files_are_views_of_a_memory_map_with_the_crc_checked(tmp_path: Path) -> None:
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
        view = stored.data()
        assert isinstance(view, memoryview) and isinstance(view.obj, __import__("mmap").mmap)
        assert bytes(view) == blobs["S/0.dcm"] == stored.read()
        assert isinstance(deflated.data(), bytes) and deflated.data() == blobs["S/1.dcm"]  # inflated
        assert isinstance(nested_member.data(), memoryview) and bytes(nested_member.data()) == blobs["S/2.dcm"]
        del view
    folder = write_folder(tmp_path / "folder", datasets)
    (folder / "empty").write_bytes(b"")
    with open_arrival(folder, Limits()) as contents:
        by_name = {m.name: m for m in contents.members}
        assert isinstance(by_name["IM00001"].data(), memoryview)
        assert bytes(by_name["IM00001"].data()) == blobs["S/0.dcm"]
        assert bytes(by_name["empty"].data()) == b""
        assert scan_members(contents.members).studies[0].instance_count == 3


def test_network_and_fuse_filesystems_are_not_memory_mapped(tmp_path: Path) -> None:
    mountinfo = "\n".join([
        "25 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw",
        "90 25 0:52 / /mnt/pacs rw,relatime shared:40 - nfs4 pacs:/export rw,vers=4.2",
        "91 25 0:53 / /mnt/share\\040drop rw,relatime - cifs //nas/drop rw,vers=3.0",
        "92 25 0:54 / /mnt/cloud rw,nosuid - fuse.rclone remote: rw",
        "garbage line without the separator",
    ])
    types = filesystem_types(mountinfo)
    assert types == {(259, 2): "ext4", (0, 52): "nfs4", (0, 53): "cifs", (0, 54): "fuse.rclone"}
    assert [mappable_type(kind) for kind in ("ext4", "nfs4", "cifs", "fuse.rclone", None)] == \
        [True, False, False, False, True]
    assert can_map(tmp_path)  # the test machine's temporary folder is local
