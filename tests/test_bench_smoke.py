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
    "ingest_fraction_of_memory_read",
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
    assert "ingest_fraction_of_memory_read" in run.stdout
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
