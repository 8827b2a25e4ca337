"""The decision fields: threshold rule, severity order, ties, all-below-threshold, nothing ran."""

from __future__ import annotations

from pathlib import Path

import pytest

from processor.dicom.scan import Study
from processor.outputs.result import build_result
from processor.pipeline.step import StepEnv, StudyContext
from processor.steps.ensemble import (
    NO_PATHOLOGY,
    SEVERITY_ORDER,
    DecisionParams,
    DecisionPathology,
    collect_features,
    decide,
)
from processor.steps.ports import FUSION, SCORES, FusionOutput, ModelScores

ORDER = ["Pleural effusion", "Lung nodule", "Emphysema"]


@pytest.mark.parametrize(
    ("probability", "threshold", "expected"),
    [
        (0.59, 0.59, 1),  # at the threshold counts as pathology (>=)
        (0.5899999, 0.59, 0),
        (0.0, 0.0, 1),
        (1.0, 1.0, 1),
        (0.2, 0.5, 0),
        (None, 0.5, None),  # no fusion model: null, never invented
    ],
)
def test_pathology_threshold(probability, threshold, expected) -> None:
    out = decide(probability, threshold, {"Lung nodule": 0.9}, {"Lung nodule": 0.5}, ORDER)
    assert out["pathology"] == expected
    assert out["probability_of_pathology"] == (None if probability is None else pytest.approx(probability))
    if probability is None:
        assert "no fusion model" in out["reason"]


@pytest.mark.parametrize(
    ("findings", "thresholds", "expected", "positives"),
    [
        # several pass: the first in severity order wins, whatever the probabilities
        (
            {"Emphysema": 0.99, "Lung nodule": 0.6, "Pleural effusion": 0.51},
            {"Emphysema": 0.5, "Lung nodule": 0.5, "Pleural effusion": 0.5},
            "Pleural effusion",
            ["Pleural effusion", "Lung nodule", "Emphysema"],
        ),
        # the most severe is below its own threshold
        (
            {"Emphysema": 0.7, "Pleural effusion": 0.7},
            {"Emphysema": 0.5, "Pleural effusion": 0.8},
            "Emphysema",
            ["Emphysema"],
        ),
        # exactly at the threshold passes
        (
            {"Lung nodule": 0.5, "Emphysema": 0.49},
            {"Lung nodule": 0.5, "Emphysema": 0.5},
            "Lung nodule",
            ["Lung nodule"],
        ),
        # ties in probability: severity decides
        (
            {"Emphysema": 0.8, "Lung nodule": 0.8},
            {"Emphysema": 0.5, "Lung nodule": 0.5},
            "Lung nodule",
            ["Lung nodule", "Emphysema"],
        ),
        # findings outside the order rank after listed ones; among them higher probability, then name
        (
            {"Hiatal hernia": 0.9, "Cardiomegaly": 0.9, "Atelectasis": 0.95, "Emphysema": 0.6},
            {"Hiatal hernia": 0.5, "Cardiomegaly": 0.5, "Atelectasis": 0.5, "Emphysema": 0.5},
            "Emphysema",
            ["Emphysema", "Atelectasis", "Cardiomegaly", "Hiatal hernia"],
        ),
        # all below threshold
        ({"Emphysema": 0.1, "Lung nodule": 0.49}, {"Emphysema": 0.5, "Lung nodule": 0.5}, NO_PATHOLOGY, []),
        # no per-finding probabilities at all: null
        ({}, {}, None, []),
    ],
)
def test_most_dangerous(findings, thresholds, expected, positives) -> None:
    out = decide(0.7, 0.5, findings, thresholds, ORDER)
    assert out["most_dangerous_pathology_type"] == expected
    assert out["findings_above_threshold"] == positives
    if expected is None:
        assert "no model produced per-finding probabilities" in out["reason"]


def _ctx(scores: list[ModelScores] | None = None, fusion: FusionOutput | None = None) -> StudyContext:
    """A study whose earlier steps provided these ports (none: nothing ran that gives them)."""
    ctx = StudyContext(1, Study("1.2.3"), Path("unused"))
    if scores is not None:
        ctx.values[SCORES.name] = scores
    if fusion is not None:
        ctx.values[FUSION.name] = fusion
    return ctx


def _run(scores: list[ModelScores] | None = None, fusion: FusionOutput | None = None, **params) -> dict:
    ctx = _ctx(scores, fusion)
    DecisionPathology(DecisionParams(**params), StepEnv(Path("."))).run(ctx)
    return ctx.result["decision"]


def test_step_nothing_ran_gives_nulls_with_reasons() -> None:
    decision = _run()
    assert decision["probability_of_pathology"] is None and decision["pathology"] is None
    assert decision["most_dangerous_pathology_type"] is None
    assert "no fusion model" in decision["reason"] and "per-finding" in decision["reason"]


def test_step_without_fusion_reports_model_probabilities_only() -> None:
    decision = _run([ModelScores("clip", "zs", {"Emphysema": 0.8, "Lung nodule": 0.3})])
    assert decision["probability_of_pathology"] is None and decision["pathology"] is None
    assert decision["most_dangerous_pathology_type"] == "Emphysema"
    assert decision["findings"]["Emphysema"] == {
        "probability": 0.8,
        "source": "zs.Emphysema",
        "threshold": 0.5,
        "threshold_from": "default",
        "positive": True,
    }


def test_step_threshold_precedence_and_sources() -> None:
    scores = [
        ModelScores("clip", "zs", {"Emphysema": 0.9, "Lung nodule": 0.9}),
        ModelScores(
            "head", "head", {"Emphysema": 0.3, "Lung nodule": 0.4}, {"Emphysema": 0.25, "Lung nodule": 0.5}
        ),
    ]
    fusion = FusionOutput(
        probability=0.7,
        threshold=0.59,
        contributions={"by_model": {"head": 0.4}},
        finding_thresholds={"Lung nodule": 0.35},
    )
    decision = _run(scores, fusion, severity_order=ORDER, finding_thresholds={"Emphysema": 0.35})
    # head preferred over zero-shot; pipeline > fusion card > model card > default
    assert decision["findings"]["Emphysema"]["source"] == "head.Emphysema"
    assert decision["findings"]["Emphysema"]["threshold_from"] == "pipeline"
    assert decision["findings"]["Lung nodule"]["threshold_from"] == "fusion card"
    assert decision["most_dangerous_pathology_type"] == "Lung nodule"
    assert decision["pathology"] == 1 and decision["threshold"] == 0.59
    assert decision["contributions"] == {"by_model": {"head": 0.4}}
    # only zero-shot as a source
    decision = _run(scores, fusion, sources=["zs"], severity_order=ORDER)
    assert decision["findings"]["Lung nodule"]["source"] == "zs.Lung nodule"


def test_result_json_reads_the_decision_section() -> None:
    ctx = _ctx(
        [ModelScores("h", "head", {"Lung nodule": 0.7})],
        FusionOutput(probability=0.61, threshold=0.59, finding_thresholds={}, contributions={}),
    )
    DecisionPathology(DecisionParams(), StepEnv(Path("."))).run(ctx)
    result = build_result(
        study_uid="1.2.3",
        accession=None,
        outcome_status="Success",
        error=None,
        seconds=1.0,
        sections=ctx.result,
        steps=[],
        source={},
        pipeline={},
        device="cpu",
        dicom={},
        warnings=[],
        finished_at="2024-01-01T00:00:00+00:00",
    )
    assert (result["probability_of_pathology"], result["pathology"]) == (0.61, 1)
    assert result["most_dangerous_pathology_type"] == "Lung nodule"


def test_severity_order_validation_and_default() -> None:
    with pytest.raises(ValueError, match="listed twice"):
        DecisionParams(severity_order=["Emphysema", "Emphysema"])
    with pytest.raises(ValueError):
        DecisionParams(finding_thresholds={"Emphysema": 1.5})
    from processor.models.ctclip import CTRATE_FINDINGS

    assert sorted(SEVERITY_ORDER) == sorted(CTRATE_FINDINGS)  # the default orders every CT-RATE finding


def test_collect_features_names() -> None:
    result = {
        "features": {"anomaly.score": 0.01, "bad": float("nan")},
        "models": {
            "c": {"kind": "ctclip_zero_shot", "probabilities": {"Emphysema": 0.2}},
            "l": {"kind": "ctclip_lipro", "probabilities": {"Emphysema": 0.4}},
        },
        "lungs": {"volume_ml": 4200.0, "laa950_percent": None, "mean_lung_density_hu": -850.0},
    }
    assert collect_features(result) == {
        "anomaly.score": 0.01,
        "zs.Emphysema": 0.2,
        "lipro.Emphysema": 0.4,
        "lungs.volume_ml": 4200.0,
        "lungs.mean_lung_density_hu": -850.0,
    }
