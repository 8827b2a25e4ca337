"""fit-fusion on stored features, and the fusion.lightgbm step that loads what it wrote."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
import torch
import yaml

from processor.dicom.scan import Study
from processor.errors import WeightsError
from processor.fit.fit_fusion import FusionOptions, fit_fusion
from processor.models.calibration_map import Calibration
from processor.pipeline.step import StepEnv, StudyContext
from processor.state import State
from processor.steps.ensemble import (
    NO_PATHOLOGY,
    DecisionParams,
    DecisionPathology,
    FusionLightGBM,
    FusionParams,
    collect_features,
)
from processor.steps.ports import FEATURES, KIND_PREFIX, ModelScores
from tests.conftest import FIXTURES, REPO, Project
from tests.dicomgen import chest_phantom, make_series, run_steps, write_zip

N = 240


def _synthetic(seed: int = 0) -> tuple[list[dict[str, float]], np.ndarray]:
    """Features of N studies; pathology depends on two of them (plus a little noise), not the rest.

    Only outputs of models not fitted on the site's labels (lipro, zs) and weight-free ones (lungs):
    fit-fusion refuses site-fitted outputs (head, anomaly) it cannot prove are out-of-fold
    (tests/test_fit_honest.py)."""
    rng = np.random.default_rng(seed)
    nodule = rng.uniform(0, 1, N)
    anomaly = rng.normal(0, 1, N)
    y = (2.5 * nodule + anomaly + rng.normal(0, 0.2, N) > 1.25).astype(int)
    rows = []
    for i in range(N):
        row = {
            "lipro.Lung nodule": nodule[i],
            "lungs.mean_lung_density_hu": anomaly[i],
            "zs.Emphysema": rng.uniform(0, 1),
            "zs.Lung nodule": rng.uniform(0, 1),
            "lungs.laa950_percent": rng.uniform(0, 20),
        }
        if i % 7 == 0:
            del row["lipro.Lung nodule"]  # a study processed before that model was installed
        rows.append(row)
    return rows, y


def _uid(i: int) -> str:
    return f"1.2.826.0.1.{i + 1}"


def _store(state_path: Path, rows: list[dict[str, float]]) -> None:
    state = State(state_path)
    for i, features in enumerate(rows):
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
        state.record_features(arrival.arrival_id, _uid(i), f"ACC{i}", features)
    state.close()


def _labels(path: Path, y: np.ndarray, *, findings: dict[str, np.ndarray] | None = None) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", "accession", "pathology", *(findings or {})])
        for i, label in enumerate(y):
            # half the rows keyed by UID, half by accession only
            writer.writerow(
                [
                    _uid(i) if i % 2 else "",
                    f"ACC{i}",
                    int(label),
                    *(int(v[i]) for v in (findings or {}).values()),
                ]
            )
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[dict[str, float]]]:
    root = tmp_path_factory.mktemp("fusion")
    rows, y = _synthetic()
    _store(root / "state.db", rows)
    nodule_truth = np.array([r.get("lipro.Lung nodule", 0.5) > 0.6 for r in rows]).astype(int)
    labels = _labels(root / "labels.csv", y, findings={"Lung nodule": nodule_truth})
    state = State(root / "state.db")
    fit = fit_fusion(
        state, labels, root / "weights" / "fusion", FusionOptions(progress=False, allow_ungrouped=True)
    )
    state.close()
    return root, fit, rows


def _step(root: Path, **params: object) -> FusionLightGBM:
    step = FusionLightGBM(FusionParams(model="weights/fusion/model.txt", **params), StepEnv(root))
    step.step_id = "fusion"
    return step


def _ctx(features: dict[str, float]) -> StudyContext:
    ctx = StudyContext(1, Study("1.2.3"), Path("unused"))
    ctx.values[FEATURES.name] = dict(features)
    return ctx


def test_fit_fusion_learns_a_real_signal(fitted) -> None:
    root, fit, _ = fitted
    assert fit.installed and fit.report.auroc >= 0.9 and fit.report.better_than_chance
    card = json.loads((root / "weights/fusion/card.json").read_text())
    assert card["feature_names"] == sorted(
        [
            "lipro.Lung nodule",
            "lungs.mean_lung_density_hu",
            "zs.Emphysema",
            "zs.Lung nodule",
            "lungs.laa950_percent",
        ]
    )
    assert card["cv"]["auroc"] >= 0.9 and card["threshold_rule"] == "youden"
    assert 0 < card["threshold"] < 1 and len(card["data_hash"]) == 64
    assert card["training"]["studies"] == N and card["training"]["unmatched_labels"] == 0
    assert card["finding_thresholds"]["Lung nodule"]["feature"] == "lipro.Lung nodule"
    assert (root / "weights/fusion/roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_table_and_target_sensitivity(tmp_path: Path) -> None:
    project = Project(tmp_path)
    rows, y = _synthetic(seed=1)
    _store(project.state_path, rows)
    labels = _labels(tmp_path / "labels.csv", y)
    done = project.run(
        "fit-fusion", "--labels", str(labels), "--target-sensitivity", "0.95", "--allow-ungrouped"
    )
    assert done.returncode == 0, done.stderr
    assert "CV AUROC" in done.stdout and "sensitivity" in done.stdout and "specificity" in done.stdout
    card = json.loads((tmp_path / "weights/fusion/card.json").read_text())
    assert card["threshold_rule"] == "sensitivity>=0.95"
    # each held-out fold is called at the threshold its training folds chose for 95 %: on new
    # studies the sensitivity lands near the target, not on it (the card says what it really is)
    assert 0.85 <= card["cv"]["sensitivity"] <= 1.0 and len(card["cv"]["fold_thresholds"]) == 5
    print(done.stdout)


def test_shuffled_labels_are_no_better_than_chance(tmp_path: Path) -> None:
    project = Project(tmp_path)
    rows, y = _synthetic(seed=2)
    _store(project.state_path, rows)
    labels = _labels(tmp_path / "labels.csv", np.random.default_rng(5).permutation(y))
    done = project.run("fit-fusion", "--labels", str(labels), "--allow-ungrouped")
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
    calibration = Calibration.from_dict(fit.card["calibration"])
    assert calibration.method in ("isotonic", "sigmoid")
    step = _step(root)
    assert step.check() == []
    for i in range(25):
        ctx = _ctx(dict(zip(fit.feature_names, fit.matrix[i], strict=True)))
        step.run(ctx)
        fusion = ctx.result["fusion"]
        assert fusion["raw_probability"] == pytest.approx(expected[i], abs=1e-6)
        assert fusion["probability"] == pytest.approx(float(calibration.apply(expected[i])), abs=1e-6)
        contrib = fusion["contributions"]
        total = contrib["bias"] + sum(contrib["by_model"].values())
        assert 1 / (1 + np.exp(-total)) == pytest.approx(expected[i], abs=1e-4)  # SHAP adds up to the output
        assert set(contrib["by_model"]) == {"lipro", "zs", "lungs"}


def test_missing_features_still_fuse(fitted) -> None:
    root, fit, rows = fitted
    ctx = _ctx({"lungs.mean_lung_density_hu": 2.0, "zs.Emphysema": 0.2})  # no lipro, no LAA, no zs nodule
    step = _step(root)
    step.run(ctx)
    fusion = ctx.result["fusion"]
    assert 0 < fusion["probability"] < 1
    assert sorted(fusion["features_missing"]) == [
        "lipro.Lung nodule",
        "lungs.laa950_percent",
        "zs.Lung nodule",
    ]
    assert any("features missing" in w for w in ctx.warnings)
    DecisionPathology(DecisionParams(), StepEnv(root)).run(ctx)
    decision = ctx.result["decision"]
    assert decision["probability_of_pathology"] == fusion["probability"]
    assert decision["pathology"] == int(fusion["probability"] >= fusion["threshold"])
    # no per-finding model output in this study: the fused decision alone says what it can
    if decision["pathology"] == 0:
        assert decision["most_dangerous_pathology_type"] == NO_PATHOLOGY
    else:
        assert decision["most_dangerous_pathology_type"] is None
        assert "no model gave per-finding probabilities" in decision["reason"]
    # the same values as a NaN row in the booster
    row = np.full((1, len(fit.feature_names)), np.nan)
    row[0, fit.feature_names.index("lungs.mean_lung_density_hu")] = 2.0
    row[0, fit.feature_names.index("zs.Emphysema")] = 0.2
    booster = lgb.Booster(model_file=str(root / "weights/fusion/model.txt"))
    assert fusion["raw_probability"] == pytest.approx(booster.predict(row)[0], abs=1e-6)


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
        step.run(_ctx({"lungs.mean_lung_density_hu": 1.0}))


def test_threshold_override_from_pipeline(fitted) -> None:
    root, fit, _ = fitted
    ctx = _ctx(dict(zip(fit.feature_names, fit.matrix[0], strict=True)))
    _step(root, threshold=0.0).run(ctx)
    assert ctx.result["fusion"]["threshold"] == 0.0 and ctx.result["fusion"]["threshold_source"] == "pipeline"


# --------------------------------------------------------------- the default pipeline through its ports
HEAD_FINDINGS = ["Lung nodule", "Emphysema"]


def _install_models(root: Path, fusion_root: Path) -> None:
    """Tiny models of every step of the default pipeline but the captioner, at its weights paths."""
    from processor.models.diffusion import build_scheduler, build_unet, save_anomaly_model
    from processor.models.head import build_head, save_head

    shutil.copytree(fusion_root / "weights/fusion", root / "weights/fusion")
    (root / "weights/ct_clip").mkdir(parents=True)
    for name in ("small_ctclip.pt", "small_lipro.pt", "small_config.json", "vocab.txt"):
        shutil.copy(FIXTURES / "ct_clip" / name, root / "weights/ct_clip" / name)
    torch.manual_seed(0)
    save_head(
        root / "weights/head",
        build_head(16, HEAD_FINDINGS),
        {
            "architecture": {"in_dim": 16, "hidden": 0, "dropout": 0.1},
            "findings": HEAD_FINDINGS,
            "thresholds": {"Emphysema": 0.45, "Lung nodule": 0.5},
            "date": "2024-01-01",
        },
    )
    save_anomaly_model(
        root / "weights/anomaly",
        build_unet(32, (16, 32)),
        build_scheduler(),
        {
            "image_size": 32,
            "window": {"width": 1500, "level": -600},
            "date": "2024-01-01",
            "defaults": {"slices": 4, "noise_level": 0.3, "ddim_steps": 10},
        },
    )


def _default_steps() -> list[dict]:
    """pipelines/chest-ct.yaml as shipped, the CT-CLIP steps pointed at the small reference model."""
    steps = yaml.safe_load((REPO / "pipelines/chest-ct.yaml").read_text())["steps"]
    small = {"config": "weights/ct_clip/small_config.json", "target_xyz": [32, 32, 24]}
    for step in steps:
        if step["id"] == "clip":
            step["with"].update(checkpoint="weights/ct_clip/small_ctclip.pt", **small)
        if step["id"] == "lipro":
            step["with"].update(checkpoint="weights/ct_clip/small_lipro.pt", **small)
    return steps


def _findings_from_json(result: dict, sources: list[str]) -> dict[str, tuple[float, str]]:
    """Reference: per-finding probabilities read from the result JSON's model sections, first wins."""
    by_source: dict[str, dict[str, tuple[float, str]]] = {}
    for entry in result["models"].values():
        prefix = KIND_PREFIX[entry["kind"]]
        for finding, p in entry["probabilities"].items():
            by_source.setdefault(prefix, {}).setdefault(finding, (p, f"{prefix}.{finding}"))
    out: dict[str, tuple[float, str]] = {}
    for source in sources:
        for finding, value in by_source.get(source, {}).items():
            out.setdefault(finding, value)
    return out


def test_default_pipeline_features_port_equals_the_json_features(fitted, tmp_path: Path) -> None:
    fusion_root, fit, _ = fitted
    _install_models(tmp_path, fusion_root)
    hu, _ = chest_phantom((40, 96, 96))
    datasets = make_series(40, stored=np.round(hu + 1024).astype(np.int16), spacing=2.5, pixel_spacing=4.0)
    ctx, outcome = run_steps(write_zip(tmp_path / "study.zip", datasets), _default_steps(), tmp_path)
    statuses = {r.step_id: r.status for r in outcome.steps}
    assert statuses.pop("caption") == "skipped" and set(statuses.values()) == {"done"}, outcome.steps
    result = ctx.result

    # the port holds exactly what the result JSON gives, from every model and the lung metrics
    features = ctx.values[FEATURES.name]
    assert features == collect_features(result)
    assert {name.split(".", 1)[0] for name in features} == {"lungs", "zs", "lipro", "head", "anomaly"}
    assert features["anomaly.score"] == result["anomaly"]["score"] == result["features"]["anomaly.score"]
    assert features["lungs.volume_ml"] == result["lungs"]["volume_ml"] > 0
    assert features["head.Lung nodule"] == result["models"]["head"]["probabilities"]["Lung nodule"]
    assert [(s.step_id, s.source) for s in ctx.values["scores"]] == [
        ("clip", "zs"),
        ("lipro", "lipro"),
        ("head", "head"),
    ]
    assert all(isinstance(s, ModelScores) for s in ctx.values["scores"])

    # fusion on the port = the booster on the JSON's features (computed here without the step)
    booster = lgb.Booster(model_file=str(tmp_path / "weights/fusion/model.txt"))
    row = np.array([[collect_features(result).get(n, np.nan) for n in fit.feature_names]])
    assert result["fusion"]["raw_probability"] == pytest.approx(booster.predict(row)[0], abs=1e-6)
    calibration = Calibration.from_dict(fit.card["calibration"])
    assert result["fusion"]["probability"] == pytest.approx(
        float(calibration.apply(booster.predict(row)[0])), abs=1e-6
    )
    assert result["fusion"]["features_missing"] == []

    # the decision from the ports = the one derived from the JSON's sections
    decision = result["decision"]
    assert decision["probability_of_pathology"] == result["fusion"]["probability"]
    assert decision["contributions"] == result["fusion"]["contributions"]
    expected = _findings_from_json(result, DecisionParams().sources)
    assert {f: (v["probability"], v["source"]) for f, v in decision["findings"].items()} == expected
    assert decision["findings"]["Emphysema"]["threshold_from"] == "model card"
    # the fusion card's Lung nodule threshold was fitted on lipro.Lung nodule; this study's Lung
    # nodule probability comes from the head, so the head's own card threshold holds
    assert fit.card["finding_thresholds"]["Lung nodule"]["feature"] == "lipro.Lung nodule"
    assert decision["findings"]["Lung nodule"]["source"] == "head.Lung nodule"
    assert decision["findings"]["Lung nodule"]["threshold_from"] == "model card"
    assert decision["findings"]["Cardiomegaly"]["source"] == "lipro.Cardiomegaly"
    # no card fitted a Cardiomegaly threshold: it is not judged, never on a default 0.5
    assert decision["findings"]["Cardiomegaly"]["threshold"] is None
    assert decision["findings"]["Cardiomegaly"]["positive"] is None
    # most_dangerous_pathology_type agrees with pathology and names only a finding above a fitted threshold
    worst = decision["most_dangerous_pathology_type"]
    if decision["pathology"] == 0:
        assert worst == NO_PATHOLOGY
    elif worst is not None:
        assert decision["findings"][worst]["positive"] is True
        assert decision["findings"][worst]["threshold_from"] in ("fusion card", "model card")
