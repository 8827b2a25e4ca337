"""fit-fusion on stored features, and the fusion.lightgbm step that loads what it wrote."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from processor.dicom.scan import Study
from processor.errors import WeightsError
from processor.fit.fit_fusion import FusionOptions, fit_fusion
from processor.pipeline.step import StepEnv, StudyContext
from processor.state import State
from processor.steps.ensemble import DecisionParams, DecisionPathology, FusionLightGBM, FusionParams
from tests.conftest import Project

N = 240


def _synthetic(seed: int = 0) -> tuple[list[dict[str, float]], np.ndarray]:
    """Features of N studies; pathology depends on two of them (plus a little noise), not the rest."""
    rng = np.random.default_rng(seed)
    nodule = rng.uniform(0, 1, N)
    anomaly = rng.normal(0, 1, N)
    y = (2.5 * nodule + anomaly + rng.normal(0, 0.2, N) > 1.25).astype(int)
    rows = []
    for i in range(N):
        row = {"head.Lung nodule": nodule[i], "anomaly.score": anomaly[i],
               "zs.Emphysema": rng.uniform(0, 1), "zs.Lung nodule": rng.uniform(0, 1),
               "lungs.laa950_percent": rng.uniform(0, 20)}
        if i % 7 == 0:
            del row["head.Lung nodule"]  # a study processed before the head existed
        rows.append(row)
    return rows, y


def _uid(i: int) -> str:
    return f"1.2.826.0.1.{i + 1}"


def _store(state_path: Path, rows: list[dict[str, float]]) -> None:
    state = State(state_path)
    for i, features in enumerate(rows):
        arrival = state.register_arrival(kind="cli", name=f"s{i}.zip", original_path="x", current_path="x",
                                         sha256=f"{i:064x}", size=1, pipeline_name="p", pipeline_version=1)
        state.record_features(arrival.arrival_id, _uid(i), f"ACC{i}", features)
    state.close()


def _labels(path: Path, y: np.ndarray, *, findings: dict[str, np.ndarray] | None = None) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "accession", "pathology", *(findings or {})])
        for i, label in enumerate(y):
            # half the rows keyed by UID, half by accession only
            writer.writerow([_uid(i) if i % 2 else "", f"ACC{i}", int(label),
                             *(int(v[i]) for v in (findings or {}).values())])
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[dict[str, float]]]:
    root = tmp_path_factory.mktemp("fusion")
    rows, y = _synthetic()
    _store(root / "state.db", rows)
    nodule_truth = np.array([r.get("head.Lung nodule", 0.5) > 0.6 for r in rows]).astype(int)
    labels = _labels(root / "labels.csv", y, findings={"Lung nodule": nodule_truth})
    state = State(root / "state.db")
    fit = fit_fusion(state, labels, root / "weights" / "fusion", FusionOptions(progress=False))
    state.close()
    return root, fit, rows


def _step(root: Path, **params: object) -> FusionLightGBM:
    step = FusionLightGBM(FusionParams(model="weights/fusion/model.txt", **params), StepEnv(root))
    step.step_id = "fusion"
    return step


def _ctx(features: dict[str, float]) -> StudyContext:
    ctx = StudyContext(1, Study("1.2.3"), Path("unused"))
    ctx.result["features"] = dict(features)
    return ctx


def test_fit_fusion_learns_a_real_signal(fitted) -> None:
    root, fit, _ = fitted
    assert fit.installed and fit.report.auroc >= 0.9 and fit.report.better_than_chance
    card = json.loads((root / "weights/fusion/card.json").read_text())
    assert card["feature_names"] == sorted(["head.Lung nodule", "anomaly.score", "zs.Emphysema", "zs.Lung nodule",
                                            "lungs.laa950_percent"])
    assert card["cv"]["auroc"] >= 0.9 and card["threshold_rule"] == "youden"
    assert 0 < card["threshold"] < 1 and len(card["data_hash"]) == 64
    assert card["training"]["studies"] == N and card["training"]["unmatched_labels"] == 0
    assert card["finding_thresholds"]["Lung nodule"]["feature"] == "head.Lung nodule"
    assert (root / "weights/fusion/roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_table_and_target_sensitivity(tmp_path: Path) -> None:
    project = Project(tmp_path)
    rows, y = _synthetic(seed=1)
    _store(project.state_path, rows)
    labels = _labels(tmp_path / "labels.csv", y)
    done = project.run("fit-fusion", "--labels", str(labels), "--target-sensitivity", "0.95")
    assert done.returncode == 0, done.stderr
    assert "CV AUROC" in done.stdout and "sensitivity" in done.stdout and "specificity" in done.stdout
    card = json.loads((tmp_path / "weights/fusion/card.json").read_text())
    assert card["threshold_rule"] == "sensitivity>=0.95" and card["cv"]["sensitivity"] >= 0.95
    print(done.stdout)


def test_shuffled_labels_are_no_better_than_chance(tmp_path: Path) -> None:
    project = Project(tmp_path)
    rows, y = _synthetic(seed=2)
    _store(project.state_path, rows)
    labels = _labels(tmp_path / "labels.csv", np.random.default_rng(5).permutation(y))
    done = project.run("fit-fusion", "--labels", str(labels))
    assert done.returncode == 1
    assert "no better than chance" in done.stdout
    auroc = float(next(line.split()[-1] for line in done.stdout.splitlines() if line.startswith("CV AUROC")))
    assert abs(auroc - 0.5) < 0.1
    assert not (tmp_path / "weights/fusion/model.txt").exists()  # not installed without --force
    print(done.stdout)


def test_step_reproduces_booster_predict(fitted) -> None:
    root, fit, rows = fitted
    booster = lgb.Booster(model_file=str(root / "weights/fusion/model.txt"))
    expected = booster.predict(fit.matrix[:25])
    step = _step(root)
    assert step.check() == []
    for i in range(25):
        ctx = _ctx(dict(zip(fit.feature_names, fit.matrix[i], strict=True)))
        step.run(ctx)
        fusion = ctx.result["fusion"]
        assert fusion["probability"] == pytest.approx(expected[i], abs=1e-6)
        contrib = fusion["contributions"]
        total = contrib["bias"] + sum(contrib["by_model"].values())
        assert 1 / (1 + np.exp(-total)) == pytest.approx(expected[i], abs=1e-4)  # SHAP adds up to the output
        assert set(contrib["by_model"]) == {"head", "anomaly", "zs", "lungs"}


def test_missing_features_still_fuse(fitted) -> None:
    root, fit, rows = fitted
    ctx = _ctx({"anomaly.score": 2.0, "zs.Emphysema": 0.2})  # no head, no lungs, no zs nodule
    step = _step(root)
    step.run(ctx)
    fusion = ctx.result["fusion"]
    assert 0 < fusion["probability"] < 1
    assert sorted(fusion["features_missing"]) == ["head.Lung nodule", "lungs.laa950_percent", "zs.Lung nodule"]
    assert any("features missing" in w for w in ctx.warnings)
    DecisionPathology(DecisionParams(), StepEnv(root)).run(ctx)
    decision = ctx.result["decision"]
    assert decision["probability_of_pathology"] == fusion["probability"]
    assert decision["pathology"] == int(fusion["probability"] >= fusion["threshold"])
    assert decision["most_dangerous_pathology_type"] is None  # no per-finding model output in this study
    # the same values as a NaN row in the booster
    row = np.full((1, len(fit.feature_names)), np.nan)
    row[0, fit.feature_names.index("anomaly.score")] = 2.0
    row[0, fit.feature_names.index("zs.Emphysema")] = 0.2
    booster = lgb.Booster(model_file=str(root / "weights/fusion/model.txt"))
    assert fusion["probability"] == pytest.approx(booster.predict(row)[0], abs=1e-6)


def test_mismatched_feature_names_are_refused(fitted, tmp_path: Path) -> None:
    root, _, _ = fitted
    (tmp_path / "weights/fusion").mkdir(parents=True)
    (tmp_path / "weights/fusion/model.txt").write_bytes((root / "weights/fusion/model.txt").read_bytes())
    card = json.loads((root / "weights/fusion/card.json").read_text())
    card["feature_names"][0] = "zs.Cardiomegaly"
    (tmp_path / "weights/fusion/card.json").write_text(json.dumps(card))
    step = _step(tmp_path)
    problems = step.check()
    assert len(problems) == 1 and "differ" in problems[0] and "refusing" in problems[0]
    with pytest.raises(WeightsError, match="differ"):
        step.run(_ctx({"anomaly.score": 1.0}))


def test_threshold_override_from_pipeline(fitted) -> None:
    root, fit, _ = fitted
    ctx = _ctx(dict(zip(fit.feature_names, fit.matrix[0], strict=True)))
    _step(root, threshold=0.0).run(ctx)
    assert ctx.result["fusion"]["threshold"] == 0.0 and ctx.result["fusion"]["threshold_source"] == "pipeline"
