"""``bench/gpu_check.py`` (the GPU proof) runs every section with ``--device cpu --tiny`` and refuses
a device it cannot have. No timing is asserted: only that each section ran and wrote sane figures."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "gpu_check.py"
SECTIONS = (
    "environment",
    "ctclip_fixture",
    "ctclip_full",
    "host_to_device",
    "captioner",
    "diffusion",
    "daemon",
)
SDPA_BACKENDS = {"MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"}


def _run(
    *args: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )


def _without_uncarried_wheels(folder: Path) -> dict[str, str]:
    """An environment in which (through a ``sitecustomize`` on PYTHONPATH, so the daemon that
    gpu_check starts inherits it) the libraries ``bench/gpu_wheels.sh`` does not carry to the GPU
    machine cannot be imported, as there."""
    text = (REPO / "bench" / "gpu_wheels.sh").read_text(encoding="utf-8")
    names = re.search(r"^NOT_CARRIED = \{(.*)\}$", text, re.M)
    assert names, "gpu_wheels.sh names what it does not carry"
    modules = sorted(n.strip().strip('"').replace("-", "_") for n in names.group(1).split(","))
    assert "highdicom" in modules and "weasyprint" in modules
    # and what only they pull in (so not carried either; the image has none of these)
    modules += ["cffi", "cssselect2", "jpeg_ls", "pydyf", "pyphen", "retrying", "tinycss2", "tinyhtml5"]
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {set(modules)!r}\n"
        "class _NotCarried(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'{name} is not carried to the GPU machine', name=name)\n"
        "sys.meta_path.insert(0, _NotCarried())\n",
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), str(REPO), env.get("PYTHONPATH")]))
    return env


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_tiny_cpu_run_reports_every_section_ok(tmp_path: Path) -> None:
    # run as on the GPU machine: without the libraries the wheel folder leaves out
    out = tmp_path / "out"
    env = _without_uncarried_wheels(tmp_path / "not-carried")
    run = _run("--device", "cpu", "--tiny", "--out", str(out), cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    sections = doc["sections"]
    assert list(sections) == list(SECTIONS)
    assert {key: s["status"] for key, s in sections.items()} == dict.fromkeys(SECTIONS, "ok"), sections
    r = {key: s["result"] for key, s in sections.items()}
    assert all(s["seconds"] >= 0 for s in sections.values())

    env = r["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["cpu_count"] >= 1

    fixture = r["ctclip_fixture"]  # the CPU path is the reference's own: float32 matches exactly
    assert fixture["fp32"]["matches_reference"] and fixture["fp32"]["vq_codes_flipped"] == 0
    assert fixture["bf16"]["within_docs_cpu_bounds"] and fixture["bf16"]["vq_codes"] == 96
    assert 0 < fixture["bf16"]["zero_shot_max_dp"] < 0.18  # bf16 moves the numbers, within the docs' bound

    full = r["ctclip_full"]
    assert full["input_shape"] == [1, 1, 24, 32, 32] and full["gflop_per_study"] > 0
    for precision in ("fp32", "bf16"):
        for batch in (1, 2, 4):
            row = full["encode_image"][f"{precision}_batch{batch}"]
            assert _positive(row["median_ms"]) and row["per_study_ms"] == pytest.approx(
                row["median_ms"] / batch, abs=1e-3
            )
    agreement = full["fp32_vs_bf16"]
    assert 0 <= agreement["vq_agreement"] <= 1 and agreement["vq_codes"] == 96
    assert 0.9 < agreement["latent_cosine_min"] <= 1.0 + 1e-6
    assert full["sdpa_vs_plain_fp32"]["vq_agreement"] == 1.0  # two exact attentions, same codes
    assert len(full["sdpa"]) == 4  # spatial (with the position bias) and temporal, in fp32 and bf16
    for row in full["sdpa"]:
        assert row["dispatcher_picks"] in SDPA_BACKENDS, row
        assert row["backends_alone"]["MATH"]["accepted"], row  # the reference kernel takes anything
        accepted = [name for name, tried in row["backends_alone"].items() if tried["accepted"]]
        assert row["dispatcher_picks"] in accepted, row

    copies = r["host_to_device"]
    assert _positive(copies["pageable_to_device"]["gb_per_s"]) and copies["pinned"] is None

    caption = r["captioner"]
    assert caption["folder_problems"] == []
    for count in (6, 16):
        assert caption[f"images_{count}"]["new_tokens_per_call"] == 40
        assert _positive(caption[f"images_{count}"]["median_s"])

    diffusion = r["diffusion"]
    assert diffusion["slices"] == 16 and diffusion["unet_forwards"] == 15 and diffusion["scores_finite"]

    daemon = r["daemon"]
    assert daemon["studies_done"] == 3 and daemon["problems"] == [] and daemon["daemon_exit_code"] == 0
    assert _positive(daemon["studies_per_hour"]) and _positive(daemon["first_study_s"])
    assert 0 < daemon["gpu_step_wall_fraction"] <= 1.05
    assert set(daemon["step_seconds_median"]) == {
        "dicom.select_series",
        "ct.volume",
        "quantify.lungs",
        "render.key_slices",
        "caption.image_to_text",
        "ctclip.zero_shot",
        "ctclip.classify",
        "anomaly.diffusion",
    }
    assert daemon["gpu_utilisation"]["gpu_idle_fraction"] is None  # no GPU, nothing sampled
    assert "daemon.started" in (out / "daemon.log").read_text(encoding="utf-8")
    assert (out / "gpu_check.log").stat().st_size > 0
    assert "summary" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cuda_without_cuda_is_a_config_error(tmp_path: Path) -> None:
    run = _run("--out", str(tmp_path / "out"), cwd=tmp_path, timeout=120)  # --device cuda is the default
    assert run.returncode == 2
    assert "configuration error" in run.stderr and "CUDA is not available" in run.stderr
    assert not (tmp_path / "out").exists()  # nothing ran on the CPU instead


def test_full_size_on_the_cpu_is_refused(tmp_path: Path) -> None:
    run = _run("--device", "cpu", "--out", str(tmp_path / "out"), cwd=tmp_path, timeout=120)
    assert run.returncode == 2 and "--tiny" in run.stderr
