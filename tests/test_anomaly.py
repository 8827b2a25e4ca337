"""The diffusion anomaly detector: a tiny UNet trained here on synthetic normal lungs, the
fit-anomaly command (checkpoints, resume) and the anomaly.diffusion step end to end from a ZIP."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from processor.fit.fit_anomaly import AnomalyOptions, fit_anomaly, study_slices, train
from processor.models.diffusion import prepare_slices, reconstruct, slice_scores
from processor.state import State
from tests.conftest import Project
from tests.dicomgen import make_series, write_zip

SIZE, DEPTH = 64, 24


def phantom(seed: int, lesion: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(z, y, x) HU volume of a chest-like phantom and its lung mask: body, two lungs with vessels.

    With ``lesion`` a soft-tissue sphere (radius 5 px) sits in the middle of the right lung.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE].astype(float)
    hu = np.full((DEPTH, SIZE, SIZE), -1000.0, np.float32)
    body = ((yy - 32) / 27) ** 2 + ((xx - 32) / 30) ** 2 <= 1
    cy, dx = 32 + rng.uniform(-2, 2), rng.uniform(-1.5, 1.5)
    ry, rx = 17 + rng.uniform(-2, 2), 10 + rng.uniform(-1, 1)
    lungs = (((yy - cy) / ry) ** 2 + ((xx - 19 - dx) / rx) ** 2 <= 1) | (
        ((yy - cy) / ry) ** 2 + ((xx - 45 + dx) / rx) ** 2 <= 1
    )
    for z in range(DEPTH):
        hu[z][body] = 40 + rng.normal(0, 10, body.sum())
        hu[z][lungs] = -850 + rng.normal(0, 25, lungs.sum())
        for _ in range(6):  # vessels: single bright pixels inside the lungs
            vy, vx = np.argwhere(lungs)[rng.integers(lungs.sum())]
            hu[z, vy, vx] = -100
    if lesion:
        zz = np.arange(DEPTH)[:, None, None]
        sphere = ((zz - DEPTH / 2) / 8) ** 2 + ((yy - cy) / 5) ** 2 + ((xx - 19 - dx) / 5) ** 2 <= 1
        hu[sphere & lungs[None]] = 40
    return hu, np.broadcast_to(lungs, hu.shape).copy()


OPTS = AnomalyOptions(
    image_size=32,
    channels=(16, 32),
    slices_per_study=8,
    steps=120,
    batch_size=16,
    lr=2e-3,
    checkpoint_every=1000,
    device="cpu",
    progress=False,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second thread only adds synchronisation (and the CI box has two CPUs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, one_thread):
    data = np.concatenate(
        [study_slices(*phantom(seed), OPTS.slices_per_study, OPTS.image_size) for seed in range(20)]
    )
    return train(data, OPTS, tmp_path_factory.mktemp("ckpt"), resume=False)


def test_lesion_slices_score_higher_than_held_out_normals(tiny_model) -> None:
    unet, scheduler, loss = tiny_model
    assert loss < 0.2
    levels = [8, 11, 14, 16]  # the lesion spans these slices
    normal, lesion = [], []
    for seed in range(100, 104):  # held out: never seen in training
        (hu, mask), (sick, _) = phantom(seed), phantom(seed, lesion=True)
        a, b = (
            prepare_slices(hu, mask, levels, OPTS.image_size),
            prepare_slices(sick, mask, levels, OPTS.image_size),
        )
        images = np.concatenate([a.images, b.images])  # one batch, the same noise seed
        recon = reconstruct(unet, scheduler.config, torch.from_numpy(images), seed=seed).numpy()
        scores = slice_scores(images, recon, np.concatenate([a.masks, b.masks]))[0]
        normal.extend(scores[: len(levels)])
        lesion.extend(scores[len(levels) :])
    normal_a, lesion_a = np.array(normal), np.array(lesion)
    print(
        f"mean slice score normal={normal_a.mean():.4f} lesion={lesion_a.mean():.4f} "
        f"paired lesion>normal={np.mean(lesion_a > normal_a):.2f}"
    )
    assert lesion_a.mean() > normal_a.mean()
    assert np.mean(lesion_a > normal_a) >= 0.7


def test_reconstruction_is_deterministic(tiny_model) -> None:
    unet, scheduler, _ = tiny_model
    hu, mask = phantom(7)
    images = torch.from_numpy(prepare_slices(hu, mask, [5, 10], OPTS.image_size).images)
    a = reconstruct(unet, scheduler.config, images, seed=3)
    b = reconstruct(unet, scheduler.config, images, seed=3)
    assert torch.equal(a, b)


def _zip(path: Path, seed: int, lesion: bool = False, missing: tuple[int, ...] = ()) -> Path:
    hu, _ = phantom(seed, lesion)
    stored = np.rint(hu + 1024).astype(np.int16)
    datasets = make_series(DEPTH, stored=stored, pixel_spacing=6.0, spacing=10.0, accession=f"ACC{seed}")
    return write_zip(path, [ds for k, ds in enumerate(datasets) if k not in missing])


def test_fit_anomaly_command_resume_and_step_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the subprocesses' torch: tiny model, two-CPU box
    project = Project(tmp_path)
    normals = tmp_path / "normals"
    for seed in range(3):
        _zip(normals / f"normal{seed}.zip", seed)
    (normals / "notes.txt").write_text("not DICOM")
    args = [
        "fit-anomaly",
        "--normals",
        str(normals),
        "--image-size",
        "32",
        "--channels",
        "16,32",
        "--slices-per-study",
        "8",
        "--batch-size",
        "8",
        "--checkpoint-every",
        "10",
        "--device",
        "cpu",
    ]
    done = project.run(*args, "--steps", "20")
    assert done.returncode == 0, done.stderr
    assert "studies" in done.stdout and "fit-anomaly" in done.stderr  # table on stdout, progress on stderr
    out = tmp_path / "weights/anomaly"
    assert torch.load(out / "checkpoint/state.pt", weights_only=True)["step"] == 20
    fit = fit_anomaly(None, out, replace(OPTS, steps=30, batch_size=8, checkpoint_every=10), resume=True)
    assert fit.steps == 30 and fit.slices == 24  # the cached slices: --normals is not read again
    assert torch.load(out / "checkpoint/state.pt", weights_only=True)["step"] == 30
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["studies"] == 3 and card["training"]["slices"] == 24 and card["image_size"] == 32
    assert (out / "unet/diffusion_pytorch_model.safetensors").exists()

    project.write_pipeline(
        [
            {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "lungs", "uses": "quantify.lungs"},
            {
                "id": "anomaly",
                "uses": "anomaly.diffusion",
                "with": {"checkpoint": "weights/anomaly/", "slices": 4, "heatmap": True},
            },
            {"id": "fusion", "uses": "fusion.lightgbm", "with": {"model": "weights/fusion/model.txt"}},
            {"id": "decision", "uses": "decision.pathology"},
        ]
    )
    study = _zip(tmp_path / "drop/study.zip", 50, lesion=True)
    done = project.run("process", str(study))
    assert done.returncode == 0, done.stderr
    [json_path] = project.results()
    result = json.loads(json_path.read_text())
    steps = {s["step_id"]: s for s in result["steps"]}
    assert steps["anomaly"]["status"] == "done" and steps["decision"]["status"] == "done"
    assert steps["fusion"]["status"] == "skipped" and result["processing_status"] == "Partial"
    anomaly = result["anomaly"]
    assert len(anomaly["slices"]) == 4 and anomaly["score"] == max(s["score"] for s in anomaly["slices"]) > 0
    for row in anomaly["slices"]:
        assert (json_path.parent / row["heatmap"]).read_bytes()[:4] == b"\x89PNG"
    assert result["features"]["anomaly.score"] == anomaly["score"]
    # no fusion model: nulls with a reason, never an invented number
    assert result["probability_of_pathology"] is None and result["pathology"] is None
    assert (
        result["most_dangerous_pathology_type"] is None and "no fusion model" in result["decision"]["reason"]
    )
    state = State(project.state_path)
    [stored] = state.study_features()
    state.close()
    assert stored["features"]["anomaly.score"] == pytest.approx(anomaly["score"])
    assert stored["accession"] == "ACC50" and stored["features"]["lungs.volume_ml"] > 0
    assert anomaly["warnings"] == []
    # missing slices: the section that reports the score says its levels sit on an irregular grid
    done = project.run("process", str(_zip(tmp_path / "drop/holed.zip", 51, missing=(11, 12))))
    assert done.returncode == 0, done.stderr
    [holed] = [
        doc
        for doc in map(lambda p: json.loads(p.read_text()), project.results())
        if doc["accession"] == "ACC51"
    ]
    [note] = holed["anomaly"]["warnings"]
    assert note.startswith("levels chosen by slice index on irregular slice positions: 1 gap(s)"), note
