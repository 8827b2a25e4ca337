"""The benchmark keeps working (smoke mode) and its fast and naive paths agree (correctness only).

No timing is asserted here: figures live in bench/README.md, measured by `python bench/run.py`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import fast, naive
from bench.generate import SMOKE, VARIANTS, ensure_studies, stored_pixels

REPO = Path(__file__).resolve().parent.parent
KEYS = (
    "ingest_vs_memcpy_ratio",
    "fast_vs_naive_cpu_ratio",
    "zeroshot_vs_encode_ratio",
    "studies_per_hour_overlap_on",
    "studies_per_hour_overlap_off",
)


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ensure_studies(SMOKE, VARIANTS, tmp_path_factory.mktemp("bench-out"), say=lambda _: None)


def test_smoke_run_writes_finite_figures(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "run.py"),
            "--smoke",
            "--json",
            str(out),
            "--out",
            str(tmp_path / "cache"),
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert isinstance(figures[key], int | float) and math.isfinite(figures[key]), (key, figures[key])
    assert figures["mode"] == "smoke"
    for field in ("cores", "cpu_model", "torch", "device"):
        assert figures["machine"][field], field
    stages = figures["stages"]
    for variant in VARIANTS:
        wanted = [*fast.STAGES, "fast: ZIP → HU volume", "naive: ZIP → HU volume (float64)"]
        if variant in ("uncompressed", "deflated"):
            wanted += ["fast: ZIP → CT-CLIP tensor", "naive: ZIP → CT-CLIP tensor"]
        for stage in wanted:
            cell = stages[f"ingest/{variant}"][stage]
            assert math.isfinite(cell["cpu_s_median"]) and math.isfinite(cell["wall_s_median"]), (
                variant,
                stage,
            )
    assert "ctclip.zero_shot (clip)" in stages["steps"] and "write (result JSON, atomic)" in stages["steps"]
    assert figures["details"]["prefetch_max_inflight_seen"] <= 2
    assert figures["details"]["lung_labelling_cc3d_vs_scipy_cpu_ratio"] > 0
    assert figures["details"]["deflate_library"].startswith("ISA-L")  # CRC-32 and inflate, against zlib
    assert min(figures["details"][f"{part}_isal_vs_zlib_cpu_ratio"] for part in ("crc32", "inflate")) > 0
    assert len(stages["deflate"]) == 6  # CRC-32 and inflate with each library, the ZIP read two ways
    codecs = figures["details"]["codec_ingest"]  # compressed ingest, imagecodecs vs pydicom only
    for variant in ("jpeg-ls", "jpeg2000"):
        assert codecs[variant]["identical_volumes"] and codecs[variant]["imagecodecs_wall_over_cpu"] > 0
        assert codecs[variant]["decoders"]["imagecodecs"][0].startswith("imagecodecs ")
    assert "ingest_vs_memcpy_ratio" in run.stdout
    assert math.isfinite(figures["details"]["ingest_fraction_of_memory_read"])  # the old reference, kept
    assert figures["details"]["ingest_vs_memcpy"]["zip_dicom_mb"] > 0
    assert (
        0
        < figures["details"]["ingest_vs_memcpy"]["kernel_read_mb"]
        <= figures["details"]["ingest_vs_memcpy"]["zip_dicom_mb"]
    )
    # the ingest reads a fresh copy of the ZIP; the cached ZIP's kernel read is timed beside it
    assert figures["details"]["ingest_vs_memcpy"]["cached_zip_kernel_read_cpu_s"] > 0
    assert not list((tmp_path / "cache").rglob("ingest-memcpy-*"))  # the fresh copy is removed after
    assert "ingest_vs_memcpy" in stages and figures["machine"]["omp_wait_policy"]  # idle torch threads sleep
    latency = figures["details"]["drop_to_json_s"]  # drop → JSON through a daemon, one study per drop
    assert set(latency) == {"zip, close event", "zip, quiet period", "folder, quiet period"}
    assert all(math.isfinite(v) and v > 0 for v in latency.values()), latency


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_and_naive_paths_give_the_same_volume_and_input(studies: dict[str, Path], variant: str) -> None:
    path = studies[variant]
    mine = fast.fast_tensor(path)
    theirs = naive.naive_tensor(path)
    assert (
        mine.volume.hu.dtype == np.int16 and theirs.volume.hu.dtype == np.float64
    )  # exact: whole slope, intercept
    assert mine.volume.hu.shape == theirs.volume.hu.shape == (SMOKE.slices, SMOKE.size, SMOKE.size)
    # lossless input: the HU volumes are identical, and both are the generated pixels exactly
    assert np.array_equal(mine.volume.hu.astype(np.float64), theirs.volume.hu)
    truth = stored_pixels(SMOKE).astype(np.float64) - 1024.0
    assert np.array_equal(theirs.volume.hu, truth)
    assert mine.volume.spacing_zyx == pytest.approx(theirs.volume.spacing_zyx)
    np.testing.assert_allclose(mine.volume.affine, theirs.volume.affine, atol=1e-9)
    assert mine.tensor.shape == (1, 240, 480, 480)
    assert torch.equal(mine.tensor, theirs.tensor)


def test_stage_breakdown_decodes_the_same_volume(studies: dict[str, Path]) -> None:
    samples: dict = {}
    volume = fast.stage_breakdown(studies["jpeg-ls"], samples)
    assert list(samples) == list(fast.STAGES)
    assert np.array_equal(volume.hu, fast.fast_volume(studies["uncompressed"]).hu)


def test_daemon_rate_smoke_pool_off_and_on(tmp_path: Path) -> None:
    """bench/daemon_rate.py: the real daemon with the CPU pool off and with one process, two tiny
    studies each; every study gets its JSON with its weight-free steps done, the figures are finite."""
    out = tmp_path / "daemon.json"
    argv = ["--smoke", "--studies", "2", "--workers", "0", "1", "--json", str(out), "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "daemon_rate.py"), *argv],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    document = json.loads(out.read_text())
    runs = document["runs"]
    assert [r["cpu_workers"] for r in runs] == [0, 1]
    assert [r["pool_processes"] for r in runs] == [0, 1]
    for r in runs:
        assert r["results"] == r["complete"] == r["studies"] == 2, r
        assert r["peak"]["processes"] >= 1 + r["pool_processes"]  # the daemon and its pool, measured
        assert r["torch_processes"] == 0  # a weight-free daemon: no torch threads to count
    modes = document["figures"]["modes"]
    for m in modes.values():
        for key in ("per_hour", "cpu_s_per_study", "peak_rss_mb", "peak_rss_over_hu", "peak_rss_shm_once_mb"):
            assert math.isfinite(m[key]) and m[key] > 0, (key, m)
        assert math.isfinite(m["growth_over_hu"]) and m["step_wall_s"]["lungs"] >= 0
        assert m["peak_rss_handoff_once_mb"] > 0 and math.isfinite(
            m["growth_tree_per_inflight_study_over_hu"]
        )
    ratio = document["figures"]["rate_vs_pool_off"]["pool, 1 process"]
    assert math.isfinite(ratio) and ratio > 0
    assert "studies/hour pool, 1 process ÷ pool off" in run.stdout
    assert document["figures"]["two_process_ceiling"]["ceiling"] > 0  # what a 2nd process gains here


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm here")
def test_the_daemons_own_handoff_files_are_counted_once_and_no_one_elses() -> None:
    """bench/proctree.handoff_kb: a hand-off file named for the daemon counts while it waits in
    /dev/shm and, once mapped and unlinked (as processor.handoff.unpack does), while it is mapped —
    once, however many mappings; another daemon's file never counts."""
    import mmap
    import os

    from bench.proctree import handoff_kb

    me = os.getpid()
    mine, other = Path(f"/dev/shm/ctwatch-handoff-{me}-1-test"), Path("/dev/shm/ctwatch-handoff-1-1-test")
    try:
        for path in (mine, other):
            with open(path, "wb") as fh:
                os.posix_fallocate(fh.fileno(), 0, 1 << 20)
        assert handoff_kb(me, [me]) == 1024
        with open(mine, "rb") as fh:
            maps = [mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY) for _ in range(2)]
        mine.unlink()
        assert handoff_kb(me, [me]) == 1024  # mapped twice, unlinked: one file
        for m in maps:
            m.close()
        assert handoff_kb(me, [me]) == 0
    finally:
        for path in (mine, other):
            path.unlink(missing_ok=True)


def test_tools_read_the_voxels_ctwatch_reads(studies: dict[str, Path]) -> None:
    """bench/tools.py's check pass: plain pydicom (and SimpleITK and dcm2niix where installed; CI has
    neither) read the chosen series' voxels exactly as ctwatch does, dcm2niix's rows reversed."""
    from bench import tools

    have = tools.available()
    if not have["unzip"]:
        pytest.skip("no unzip on this machine: the other tools read unzipped files")
    checks = tools.verify(studies["uncompressed"], have, say=lambda _: None)
    compared = {tool: check for tool, check in checks.items() if isinstance(check, dict)}
    assert "pydicom" in compared and checks["shape"] == [SMOKE.slices, SMOKE.size, SMOKE.size]
    assert all(check["identical"] for check in compared.values()), compared
    if "dcm2niix" in compared:
        assert compared["dcm2niix"]["flipped_axes"] == "y"  # NIfTI's rows run the other way


def test_child_figures_are_the_childs_own(studies: dict[str, Path]) -> None:
    """bench.baseline.run_child: a child's peak RSS does not inherit the bench's (256 MiB held
    here), and `process` of one ZIP in a fresh project of this tree gives its result and CPU."""
    from bench import baseline, process_cpu

    held = np.ones(256 * 2**20 // 8)  # touched: in this process's RSS
    child = baseline.run_child([sys.executable, "-c", "pass"])
    assert child.returncode == 0 and 0 < child.peak_rss_mb < 100 and held.sum() > 0
    run = process_cpu.process_once(REPO, studies["uncompressed"])
    assert run["status"] == "Partial" and set(run["lungs"]) == set(
        process_cpu.LUNG_FIGURES
    )  # model steps skipped
    assert run["cpu_s"] > 0.5 and run["peak_rss_mb"] > 50
