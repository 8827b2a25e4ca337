"""ZIP members' CRC-32 and DEFLATE through ISA-L (issue 18, item 5): the bytes :mod:`zipfile` reads,
every damaged member still refused, and zlib in its place when python-isal is missing."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from processor import deflate
from processor.intake.archive import Limits, open_arrival
from processor.intake.inflate import CHUNK
from tests.conftest import REPO
from tests.dicomgen import make_series, to_bytes


def _study(n: int = 4, size: int = 192) -> list[bytes]:
    """Real DICOM slices with CT-like noise: each one larger than a :data:`CHUNK` (72 KiB of pixels),
    so a member is inflated and CRC-checked over several chunks."""
    rng = np.random.default_rng(7)
    stored = (1024 + rng.normal(0, 40, (n, size, size))).astype(np.int16)
    return [to_bytes(ds) for ds in make_series(n, stored=stored)]


def _zip(path: Path, members: list[tuple[str, bytes, int, int | None]]) -> Path:
    """A ZIP of ``(name, bytes, method, compresslevel)`` members."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, method, level in members:
            zf.writestr(name, data, compress_type=method, compresslevel=level)
    return path


def _declare_size(path: Path, name: str, size: int) -> None:
    """Rewrite a member's declared uncompressed size, in its local header and the central directory."""
    raw = bytearray(path.read_bytes())
    for signature, name_at, size_at in ((b"PK\x03\x04", 30, 22), (b"PK\x01\x02", 46, 24)):
        at = raw.find(signature)
        while raw[at + name_at : at + name_at + len(name)] != name.encode():
            at = raw.find(signature, at + 1)
        struct.pack_into("<I", raw, at + size_at, size)
    path.write_bytes(bytes(raw))


def _flip(path: Path, name: str, offsets: list[int]) -> None:
    """Flip every bit of the bytes at ``offsets`` into member ``name``'s stored (compressed) bytes."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    for offset in offsets:
        raw[start + offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_the_library_in_use_is_isa_l_and_its_crc_is_zlibs() -> None:
    data = _study(1)[0]
    assert deflate.BACKEND.startswith("ISA-L")  # a dependency: zlib only when it is missing
    view = memoryview(data)
    running = 0
    for at in range(0, len(data), 10_000):  # continued over pieces, as the reader does
        running = deflate.crc32(view[at : at + 10_000], running)
    assert running == deflate.crc32(data) == zlib.crc32(data)


def test_members_read_through_ctwatch_are_the_bytes_zipfile_reads(tmp_path: Path) -> None:
    """STORED and DEFLATE members (levels 1, 6, 9 and 0: stored blocks) of real DICOM, an empty
    member among them: read whole, as data, streamed in odd read sizes and by prefixes, each member
    is what :mod:`zipfile` reads, and its CRC-32 is the one the central directory holds."""
    slices = _study()
    members = [
        ("S/0.dcm", slices[0], zipfile.ZIP_STORED, None),
        ("S/1.dcm", slices[1], zipfile.ZIP_DEFLATED, 6),
        ("S/2.dcm", slices[2], zipfile.ZIP_DEFLATED, 1),
        ("S/3.dcm", slices[3], zipfile.ZIP_DEFLATED, 9),
        ("S/4.dcm", slices[0], zipfile.ZIP_DEFLATED, 0),
        ("empty", b"", zipfile.ZIP_DEFLATED, 6),
    ]
    path = _zip(tmp_path / "study.zip", members)
    with zipfile.ZipFile(path) as zf:
        expected = {info.filename: (zf.read(info), info.CRC) for info in zf.infolist()}
    with open_arrival(path, Limits()) as contents:
        assert sorted(m.name for m in contents.members) == sorted(expected)
        for member in contents.members:
            data, crc = expected[member.name]
            assert member.size == len(data) and deflate.crc32(data) == crc
            assert member.read() == data and bytes(member.data()) == data
            with member.open() as fh:
                pieces = []
                while piece := fh.read(CHUNK - 3):
                    pieces.append(piece)
            assert b"".join(pieces) == data
            for n in (0, 1, 132, CHUNK, CHUNK + 1, len(data)):
                assert member.read_prefix(n) == data[:n]


def test_a_flipped_byte_is_refused_by_the_crc_check(tmp_path: Path) -> None:
    """A byte flipped in a STORED member and in a DEFLATE member's stored block (the stream still
    inflates): the CRC-32 check refuses both, also a prefix that covers all of the member."""
    data = _study(1)[0]
    path = _zip(
        tmp_path / "flip.zip",
        [("stored.dcm", data, zipfile.ZIP_STORED, None), ("deflated.dcm", data, zipfile.ZIP_DEFLATED, 0)],
    )
    _flip(path, "stored.dcm", [len(data) - 1000])
    _flip(path, "deflated.dcm", [len(data) - 1000])
    with open_arrival(path, Limits()) as contents:
        for member in contents.members:
            assert member.read_prefix(1000) == data[:1000]  # a head far from the flip is read
            for read in (member.read, member.data, lambda m=member: m.read_prefix(len(data))):
                with pytest.raises(zipfile.BadZipFile, match="CRC"):
                    read()


def test_flipped_bytes_inside_a_compressed_stream_are_refused(tmp_path: Path) -> None:
    """Bytes flipped at places through a compressed stream: each member is refused (as corrupt, as
    too long or short, or by its CRC-32), never handed over whole."""
    data = _study(1)[0]
    path = tmp_path / "s.zip"
    _zip(path, [("s.dcm", data, zipfile.ZIP_DEFLATED, 6)])
    compressed = zipfile.ZipFile(path).getinfo("s.dcm").compress_size
    for k, at in enumerate(range(compressed // 10, compressed - 8, compressed // 10)):
        damaged = tmp_path / f"d{k}.zip"
        damaged.write_bytes(path.read_bytes())
        _flip(damaged, "s.dcm", [at])
        with open_arrival(damaged, Limits()) as contents, pytest.raises(zipfile.BadZipFile):
            contents.members[0].read()


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_a_member_that_inflates_past_its_declared_size_is_still_refused(tmp_path: Path, method: int) -> None:
    data = _study(1)[0]
    path = _zip(tmp_path / "long.zip", [("s.dcm", data, method, None)])
    _declare_size(path, "s.dcm", len(data) - 10)
    with open_arrival(path, Limits()) as contents:
        (member,) = contents.members
        assert member.size == len(data) - 10
        for read in (member.read, member.data, lambda: member.open().read()):
            with pytest.raises(zipfile.BadZipFile, match="inflates past its declared size"):
                read()


FALLBACK = """
import json, sys, zipfile
sys.modules["isal"] = None  # python-isal as if not installed: its import raises ImportError
from processor import deflate
from processor.intake.archive import Limits, open_arrival
with zipfile.ZipFile(sys.argv[1]) as zf:
    expected = {i.filename: zf.read(i) for i in zf.infolist()}
with open_arrival(__import__("pathlib").Path(sys.argv[1]), Limits()) as contents:
    same = all(m.read() == expected[m.name] for m in contents.members)
print(json.dumps({"backend": deflate.BACKEND, "same": same, "n": len(expected)}))
"""


def test_without_python_isal_zlib_reads_the_same_bytes_and_a_warning_says_so(tmp_path: Path) -> None:
    slices = _study(2, 96)
    path = _zip(
        tmp_path / "z.zip",
        [("a.dcm", slices[0], zipfile.ZIP_DEFLATED, 6), ("b.dcm", slices[1], zipfile.ZIP_STORED, None)],
    )
    run = subprocess.run(
        [sys.executable, "-c", FALLBACK, str(path)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    outcome = json.loads(run.stdout.strip().splitlines()[-1])
    assert outcome == {"backend": f"zlib {zlib.ZLIB_RUNTIME_VERSION}", "same": True, "n": 2}
    assert "deflate.fallback backend=zlib" in run.stderr and "pip install" in run.stderr


def test_a_deflated_data_set_inflates_to_what_zlib_gives() -> None:
    """The DICOM Deflated Explicit VR Little Endian body (PS3.5 A.5) through :func:`deflate.inflate`."""
    body = _study(1, 64)[0][132:]
    packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(body) + packer.flush()
    assert deflate.inflate(stream) == deflate.inflate(memoryview(stream + b"\0\0")) == body
    with pytest.raises(deflate.ERRORS):
        deflate.inflate(stream[:-20])
    assert io.BytesIO(deflate.inflater().decompress(stream, 100)).read() == body[:100]


def test_a_deflated_data_set_that_inflates_too_far_is_refused_as_a_bomb() -> None:
    """A Deflated Explicit VR Little Endian file of a few hundred kB whose data set inflates to
    300 MB (an OB element of zeros) is refused with a reason; an honest one reads, a cut one is
    refused as cut off. (The ZIP's caps bound the member, not its deflated data set.)"""
    from processor.dicom.encoding import Unreadable, read_file
    from tests.dicomgen import DEFLATED, encoded_bytes, make_series

    (ds,) = make_series(1)
    honest = encoded_bytes(ds, body=DEFLATED)
    read, encoding, _ = read_file(honest, stop_before_pixels=True)
    assert encoding.deflated and read.SOPInstanceUID == ds.SOPInstanceUID
    ds.add_new((0x0009, 0x1010), "OB", bytes(300 * 2**20))  # a private element: 300 MB of zeros
    bomb = encoded_bytes(ds, body=DEFLATED)
    assert len(bomb) < 2**20
    with pytest.raises(Unreadable, match="refused as a decompression bomb"):
        read_file(bomb, stop_before_pixels=True)
    with pytest.raises(Unreadable, match="cut off|does not inflate"):
        read_file(honest[: len(honest) - 40], stop_before_pixels=True)
