"""processor.handoff: a prepared batch's large arrays travel through shared memory, once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from processor.handoff import OUT_OF_BAND_BYTES, PREFIX, pack, remove_stale, unpack


def _batch() -> dict:
    rng = np.random.default_rng(7)
    return {
        "hu": rng.integers(-1024, 3000, size=(80, 128, 128), dtype=np.int16),
        "mask": rng.random((80, 128, 128)) > 0.5,
        "small": np.arange(10, dtype=np.float32),
        "words": "é \udcff ok",
    }


def test_large_arrays_go_out_of_band_and_come_back_equal_and_writable(tmp_path: Path) -> None:
    batch = _batch()
    packed = pack(batch, os.getpid(), tmp_path)
    assert packed.path is not None and Path(packed.path).parent == tmp_path
    assert sorted(n for _, n in packed.spans) == sorted([batch["mask"].nbytes, batch["hu"].nbytes])
    assert all(n >= OUT_OF_BAND_BYTES for _, n in packed.spans)
    assert all(start % 64 == 0 for start, _ in packed.spans)
    assert len(packed.payload) < 10_000  # the arrays are not in the pickle
    back = unpack(packed)
    assert not list(tmp_path.iterdir())  # unlinked as soon as it was mapped
    for key in ("hu", "mask", "small"):
        assert back[key].dtype == batch[key].dtype and np.array_equal(back[key], batch[key])
    assert back["words"] == batch["words"]
    back["hu"][0, 0, 0] = 1234  # writable, copy-on-write: the rest is untouched
    assert back["hu"][0, 0, 0] == 1234 and np.array_equal(back["hu"][1:], batch["hu"][1:])


def test_without_shared_memory_the_batch_goes_in_band(tmp_path: Path) -> None:
    batch = _batch()
    packed = pack(batch, os.getpid(), tmp_path / "missing")
    assert packed.path is None and len(packed.payload) > batch["hu"].nbytes
    assert np.array_equal(unpack(packed)["hu"], batch["hu"])


def test_files_of_dead_daemons_and_of_a_dead_pool_process_are_removed(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead = int(done.stdout)  # a PID that no longer runs (reuse within this test is not a concern)
    mine = os.getpid()
    names = {
        "dead_daemon": f"{PREFIX}{dead}-{dead}-abc",
        "live_daemon": f"{PREFIX}{mine}-{mine + 1}-abc",
        "dead_writer": f"{PREFIX}{mine}-{dead}-abc",
        "other": "sem.mp-xyz",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in remove_stale(tmp_path)] == [names["dead_daemon"]]
    assert [p.name for p in remove_stale(tmp_path, writer=dead)] == [names["dead_writer"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names["live_daemon"], names["other"]])
