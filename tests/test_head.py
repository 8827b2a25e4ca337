"""fit-head on stored latents with a learnable signal, and the ctclip.head step that loads it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from processor.dicom.scan import Study
from processor.errors import StepError
from processor.models.calibration_map import Calibration
from processor.models.head import load_head
from processor.pipeline.step import StepEnv, StudyContext
from processor.state import State
from processor.steps.ensemble import CtclipHead, DecisionParams, DecisionPathology, HeadParams
from tests.conftest import Project

N, DIM = 200, 512
FINDINGS = ["Lung nodule", "Emphysema"]


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Latents on a 16-dimensional manifold (as image embeddings are) plus noise; each finding follows
    the manifold coordinates with a little label noise; one unknown Emphysema label per 20 studies."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1, (N, 16))
    x = (z @ rng.normal(0, 1, (16, DIM)) / 4 + 0.5 * rng.normal(0, 1, (N, DIM))).astype(np.float32)
    score = np.stack([z[:, 0], (z[:, 1] + z[:, 2]) / 1.4], axis=1) + rng.normal(0, 0.25, (N, 2))
    y = (score > np.array([0.3, -0.2])).astype(float)
    y[::20, 1] = np.nan
    return x, y


def _uid(i: int) -> str:
    return f"1.2.826.0.2.{i + 1}"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("head")
    project = Project(root)
    x, y = _data()
    state = State(project.state_path)
    for i in range(N):
        arrival = state.register_arrival(
            kind="cli",
            name=f"s{i}.zip",
            original_path="x",
            current_path="x",
            sha256=f"{i:064x}",
            size=1,
            pipeline_name="p",
            pipeline_version=1,
        )
        state.record_features(arrival.arrival_id, _uid(i), None, {"zs.Emphysema": 0.5}, {"ctclip": x[i]})
    state.close()
    labels = root / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["StudyInstanceUID", *FINDINGS, "Cardiomegaly"])
        for i in range(N):
            writer.writerow([_uid(i), *("" if np.isnan(v) else int(v) for v in y[i]), i % 2])
    # features stored without a studies row: no patient recorded, so each study is its own patient
    done = project.run(
        "fit-head", "--labels", str(labels), "--findings", *FINDINGS, "--epochs", "100", "--allow-ungrouped"
    )
    assert done.returncode == 0, done.stderr
    return root, x, y, done.stdout


def test_fit_head_cv_auroc(fitted) -> None:
    root, _, _, stdout = fitted
    card = json.loads((root / "weights/head/card.json").read_text())
    assert card["findings"] == FINDINGS and card["architecture"] == {
        "in_dim": DIM,
        "hidden": 0,
        "dropout": 0.1,
    }
    per_finding = card["cv"]["per_finding"]
    for name in FINDINGS:
        assert per_finding[name]["auroc"] >= 0.9, per_finding
    assert per_finding["Emphysema"]["n"] == N - N // 20  # unknown labels are left out, not guessed
    assert len(card["training_set_hash"]) == 64 and card["date"]
    assert (root / "weights/head/roc.png").read_bytes()[:4] == b"\x89PNG"
    assert "CV AUROC" in stdout and "Lung nodule" in stdout
    print(stdout)


def test_head_loads_in_the_step(fitted) -> None:
    root, x, _, _ = fitted
    step = CtclipHead(HeadParams(checkpoint="weights/head"), StepEnv(root))
    step.step_id = "head"
    assert all(p.exists() for p in step.weight_files())
    head = load_head(root / "weights/head")
    raw = torch.sigmoid(head.model(torch.from_numpy(x[:5]))).detach().numpy()
    # the head's output passed through each finding's calibration map from its card
    maps = [Calibration.from_dict(head.card["calibration"][f]) for f in FINDINGS]
    assert all(m.method in ("isotonic", "sigmoid") for m in maps)
    expected = np.stack([maps[j].apply(raw[:, j]) for j in range(len(FINDINGS))], axis=1)
    for i in range(5):
        ctx = StudyContext(1, Study(_uid(i)), Path("unused"))
        ctx.values["ctclip_latent"] = x[i]
        step.run(ctx)
        entry = ctx.result["models"]["head"]
        assert entry["kind"] == "ctclip_head" and len(entry["sha256"]) == 64
        for j, name in enumerate(FINDINGS):
            assert entry["probabilities"][name] == pytest.approx(expected[i, j], abs=1e-5)
            assert ctx.result["features"][f"head.{name}"] == entry["probabilities"][name]
        DecisionPathology(DecisionParams(), StepEnv(root)).run(ctx)
        decision = ctx.result["decision"]
        assert decision["findings"]["Lung nodule"]["threshold_from"] == "model card"
        assert decision["probability_of_pathology"] is None


def test_latent_of_the_wrong_size_fails_with_a_fix(fitted) -> None:
    root, _, _, _ = fitted
    step = CtclipHead(HeadParams(checkpoint="weights/head"), StepEnv(root))
    ctx = StudyContext(1, Study("1.2.3"), Path("unused"))
    ctx.values["ctclip_latent"] = np.zeros(16, np.float32)
    with pytest.raises(StepError, match="refit the head"):
        step.run(ctx)


def test_mlp_head_and_bad_labels(tmp_path: Path) -> None:
    from processor.errors import ConfigError
    from processor.fit.fit_head import HeadOptions, fit_head

    x, y = _data(seed=3)
    state = State(tmp_path / "s.db")
    for i in range(N):
        arrival = state.register_arrival(
            kind="cli",
            name=f"s{i}",
            original_path="x",
            current_path="x",
            sha256=f"{i:064x}",
            size=1,
            pipeline_name="p",
            pipeline_version=1,
        )
        state.record_features(arrival.arrival_id, _uid(i), f"A{i}", {}, {"ctclip": x[i]})
    labels = tmp_path / "labels.csv"
    labels.write_text("accession,Lung nodule\n" + "".join(f"A{i},{int(y[i, 0])}\n" for i in range(N)))
    fit = fit_head(
        state,
        labels,
        tmp_path / "head",
        HeadOptions(hidden=32, epochs=100, progress=False, allow_ungrouped=True),
    )
    assert fit.cv_auroc["Lung nodule"] >= 0.85
    assert load_head(tmp_path / "head").card["architecture"]["hidden"] == 32
    labels.write_text("accession,Lung nodule\nA1,yes\n")
    with pytest.raises(ConfigError, match="0 or 1"):
        fit_head(state, labels, tmp_path / "head2", HeadOptions(progress=False, allow_ungrouped=True))
    state.close()
