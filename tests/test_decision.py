"""The decision fields: the truth table, the severity rule, threshold provenance, nothing ran.

``most_dangerous_pathology_type`` names a finding only when ``pathology`` is 1 and the finding is at
or above a threshold from a fitted card (or one the site set in the pipeline); never on a default.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from processor.dicom.scan import Study
from processor.errors import ConfigError
from processor.outputs.result import build_result
from processor.pipeline.spec import load_pipeline
from processor.pipeline.step import StepEnv, StudyContext
from processor.steps import default_registry
from processor.steps.ensemble import (
    MOST_DANGEROUS_RULE,
    NO_PATHOLOGY,
    SEVERITY_ORDER,
    THRESHOLD_SOURCES,
    DecisionParams,
    DecisionPathology,
    Finding,
    collect_features,
    decide,
)
from processor.steps.ports import FUSION, SCORES, FusionOutput, ModelScores

ORDER = ["Pleural effusion", "Lung nodule", "Emphysema"]


def fitted(probability: float, threshold: float, origin: str = "fusion card") -> Finding:
    return Finding(probability, "head.x", threshold, origin)


def unfitted(probability: float) -> Finding:
    return Finding(probability, "zs.x")


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
    out = decide(probability, threshold, {"Lung nodule": fitted(0.9, 0.5)}, ORDER)
    assert out["pathology"] == expected
    assert out["probability_of_pathology"] == (None if probability is None else pytest.approx(probability))
    if probability is None:
        assert "no fusion model" in out["reason"]


NONE: dict[str, Finding] = {}
UNFITTED = {"Pleural effusion": unfitted(0.99), "Emphysema": unfitted(0.7)}
FITTED_BELOW = {"Pleural effusion": fitted(0.4, 0.5), "Emphysema": fitted(0.2, 0.3)}
ONE_ABOVE = {"Pleural effusion": fitted(0.4, 0.5), "Emphysema": fitted(0.35, 0.3)}
SEVERAL_ABOVE = {
    "Emphysema": fitted(0.99, 0.3),
    "Lung nodule": fitted(0.6, 0.5),
    "Pleural effusion": fitted(0.51, 0.5),
}
# a zero-shot finding far above 0.5 and more severe than the fitted positive: it never counts
MIXED = {"Pleural effusion": unfitted(0.99), "Emphysema": fitted(0.35, 0.3)}


@pytest.mark.parametrize(
    ("fused", "findings", "expected", "reason"),
    [
        # pathology null: no fusion model, whatever the findings say
        (None, NONE, None, "no fusion model, so no decision"),
        (None, UNFITTED, None, "no fusion model, so no decision"),
        (None, ONE_ABOVE, None, "no fusion model, so no decision"),
        (None, SEVERAL_ABOVE, None, "no fusion model, so no decision"),
        # pathology 0: the fused decision rules, even over findings above their thresholds
        (0.1, NONE, NO_PATHOLOGY, None),
        (0.1, UNFITTED, NO_PATHOLOGY, "have no fitted threshold"),
        (0.1, FITTED_BELOW, NO_PATHOLOGY, None),
        (0.1, ONE_ABOVE, NO_PATHOLOGY, "although Emphysema reached its threshold"),
        (0.1, SEVERAL_ABOVE, NO_PATHOLOGY, "although Pleural effusion, Lung nodule, Emphysema reached"),
        # pathology 1: a finding only from a fitted threshold; otherwise null with the reason
        (0.9, NONE, None, "pathology is 1 but no model gave per-finding probabilities"),
        (0.9, UNFITTED, None, "pathology is 1 but no finding has a fitted threshold"),
        (0.9, FITTED_BELOW, None, "pathology is 1 but no finding reached its fitted threshold"),
        (0.9, ONE_ABOVE, "Emphysema", None),
        (0.9, SEVERAL_ABOVE, "Pleural effusion", None),
        (0.9, MIXED, "Emphysema", "1 finding(s) have no fitted threshold (Pleural effusion)"),
    ],
)
def test_truth_table(fused, findings, expected, reason) -> None:
    out = decide(fused, None if fused is None else 0.5, findings, ORDER)
    assert out["pathology"] == (None if fused is None else int(fused >= 0.5))
    assert out["most_dangerous_pathology_type"] == expected
    assert out["most_dangerous_rule"] == MOST_DANGEROUS_RULE
    if reason is None:
        assert out["reason"] is None
    else:
        assert reason in out["reason"]
    if expected is None:
        assert "most_dangerous_pathology_type" in out["reason"]  # every null is explained


@pytest.mark.parametrize(
    ("findings", "expected", "ranked"),
    [
        # several pass: the first in severity order wins, whatever the probabilities
        (SEVERAL_ABOVE, "Pleural effusion", ["Pleural effusion", "Lung nodule", "Emphysema"]),
        # the most severe is below its own threshold
        ({"Emphysema": fitted(0.7, 0.5), "Pleural effusion": fitted(0.7, 0.8)}, "Emphysema", ["Emphysema"]),
        # exactly at the threshold passes
        ({"Lung nodule": fitted(0.5, 0.5), "Emphysema": fitted(0.49, 0.5)}, "Lung nodule", ["Lung nodule"]),
        # unlisted findings rank after listed ones; among them the larger margin (not probability)
        (
            {
                "Hiatal hernia": fitted(0.9, 0.85),  # margin 0.05
                "Cardiomegaly": fitted(0.6, 0.3),  # margin 0.3
                "Atelectasis": fitted(0.6, 0.3),  # same margin: name decides
                "Emphysema": fitted(0.31, 0.3),
            },
            "Emphysema",
            ["Emphysema", "Atelectasis", "Cardiomegaly", "Hiatal hernia"],
        ),
        # unfitted findings are never ranked, however high
        (MIXED, "Emphysema", ["Emphysema"]),
    ],
)
def test_severity_rule(findings, expected, ranked) -> None:
    out = decide(0.7, 0.5, findings, ORDER)
    assert out["most_dangerous_pathology_type"] == expected
    assert out["findings_above_threshold"] == ranked


def test_the_two_contradictions_from_the_issue_are_gone() -> None:
    # pathology 0 used to come with "Pleural effusion" (a default 0.5 on a zero-shot softmax)
    out = decide(0.2, 0.5, {"Pleural effusion": unfitted(0.8), "Emphysema": fitted(0.9, 0.4)}, ORDER)
    assert (out["pathology"], out["most_dangerous_pathology_type"]) == (0, NO_PATHOLOGY)
    # pathology 1 used to come with "No significant pathology" (nothing above a default threshold)
    out = decide(0.8, 0.5, {"Pleural effusion": fitted(0.3, 0.5)}, ORDER)
    assert out["pathology"] == 1 and out["most_dangerous_pathology_type"] is None
    assert "no finding reached its fitted threshold" in out["reason"]


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


def _fusion(probability: float, thresholds: dict[str, float] | None = None) -> FusionOutput:
    return FusionOutput(probability, 0.5, thresholds or {}, {"by_model": {"head": 0.4}})


def test_step_nothing_ran_gives_nulls_with_reasons() -> None:
    decision = _run()
    assert decision["probability_of_pathology"] is None and decision["pathology"] is None
    assert decision["most_dangerous_pathology_type"] is None and decision["contributions"] is None
    assert "no fusion model, so no decision" in decision["reason"]
    assert decision["findings"] == {} and decision["most_dangerous_rule"] == MOST_DANGEROUS_RULE


def test_step_zero_shot_alone_is_never_judged() -> None:
    scores = [ModelScores("clip", "zs", {"Emphysema": 0.8, "Lung nodule": 0.3})]
    decision = _run(scores, _fusion(0.9))
    assert decision["pathology"] == 1 and decision["most_dangerous_pathology_type"] is None
    assert "no finding has a fitted threshold" in decision["reason"]
    assert decision["findings"]["Emphysema"] == {
        "probability": 0.8,
        "source": "zs.Emphysema",
        "threshold": None,
        "threshold_from": None,
        "positive": None,
    }
    assert decision["findings_above_threshold"] == []
    # without fusion: the findings are listed, the field is null for that reason
    decision = _run(scores)
    assert decision["most_dangerous_pathology_type"] is None and "no fusion model" in decision["reason"]


def test_step_threshold_precedence_and_sources() -> None:
    scores = [
        ModelScores("clip", "zs", {"Emphysema": 0.9, "Lung nodule": 0.9, "Cardiomegaly": 0.99}),
        ModelScores(
            "head",
            "head",
            {"Emphysema": 0.3, "Lung nodule": 0.4, "Pleural effusion": 0.2},
            {"Emphysema": 0.25, "Lung nodule": 0.5, "Pleural effusion": 0.1},
        ),
    ]
    fusion = _fusion(0.7, {"Lung nodule": 0.35, "Pleural effusion": float("nan")})
    decision = _run(scores, fusion, severity_order=ORDER, finding_thresholds={"Emphysema": 0.35})
    findings = decision["findings"]
    # head preferred over zero-shot; pipeline > fusion card > model card; a NaN in a card is no threshold
    assert findings["Emphysema"]["source"] == "head.Emphysema"
    assert (findings["Emphysema"]["threshold"], findings["Emphysema"]["threshold_from"]) == (0.35, "pipeline")
    assert (findings["Lung nodule"]["threshold"], findings["Lung nodule"]["threshold_from"]) == (
        0.35,
        "fusion card",
    )
    assert findings["Pleural effusion"]["threshold_from"] == "model card"
    assert findings["Cardiomegaly"]["threshold_from"] is None  # only zero-shot gives it
    assert findings["Emphysema"]["positive"] is False and findings["Lung nodule"]["positive"] is True
    assert decision["findings_above_threshold"] == ["Pleural effusion", "Lung nodule"]
    assert decision["most_dangerous_pathology_type"] == "Pleural effusion"
    assert decision["pathology"] == 1 and decision["threshold"] == 0.5
    assert decision["contributions"] == {"by_model": {"head": 0.4}}
    # only zero-shot as a source: the head's card thresholds do not apply to zero-shot numbers
    decision = _run(scores, fusion, sources=["zs"], severity_order=ORDER)
    assert decision["findings"]["Emphysema"]["threshold_from"] is None
    assert decision["findings"]["Lung nodule"]["source"] == "zs.Lung nodule"
    # a site's own threshold counts, labelled as the pipeline's
    decision = _run(
        scores,
        fusion,
        sources=["zs"],
        finding_thresholds={"Cardiomegaly": 0.95},
        severity_order=["Cardiomegaly"],
    )
    assert decision["most_dangerous_pathology_type"] == "Cardiomegaly"
    assert decision["findings"]["Cardiomegaly"]["threshold_from"] == "pipeline"


def test_result_json_reads_the_decision_section() -> None:
    ctx = _ctx(
        [ModelScores("h", "head", {"Lung nodule": 0.7}, {"Lung nodule": 0.6})],
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
    assert result["decision"]["most_dangerous_rule"] == MOST_DANGEROUS_RULE


NAMES = ["Pleural effusion", "Lung nodule", "Emphysema", "Cardiomegaly", "Hiatal hernia"]
unit = st.floats(0, 1)
per_finding = st.dictionaries(st.sampled_from(NAMES), unit)


@st.composite
def study_inputs(draw):
    """Random scores (zero-shot and lipro without thresholds, a head with some), fusion or not, params."""
    scores = [
        ModelScores(step, source, draw(per_finding), draw(per_finding) if source == "head" else {})
        for step, source in draw(
            st.lists(st.sampled_from([("clip", "zs"), ("lipro", "lipro"), ("head", "head")]), unique=True)
        )
    ]
    fusion = draw(st.none() | st.builds(FusionOutput, unit, unit, per_finding, st.just({})))
    params = {
        "finding_thresholds": draw(per_finding),
        "sources": draw(st.lists(st.sampled_from(["head", "lipro", "zs"]), unique=True, min_size=1)),
        "severity_order": draw(st.lists(st.sampled_from(NAMES), unique=True)),
    }
    return scores, fusion, params


@given(study_inputs())
def test_most_dangerous_never_contradicts_pathology(inputs) -> None:
    scores, fusion, params = inputs
    decision = _run(scores, fusion, **params)
    worst, pathology = decision["most_dangerous_pathology_type"], decision["pathology"]
    if pathology is None:
        assert worst is None and fusion is None
    if pathology == 0:
        assert worst == NO_PATHOLOGY
    if worst is None:
        assert decision["reason"]
    for f in decision["findings"].values():
        assert f["threshold_from"] in (*THRESHOLD_SOURCES, None)
        assert f["positive"] is (None if f["threshold"] is None else f["probability"] >= f["threshold"])
    if worst not in (None, NO_PATHOLOGY):
        assert pathology == 1 and fusion is not None and fusion.probability >= fusion.threshold
        f = decision["findings"][worst]
        assert f["threshold"] is not None and f["probability"] >= f["threshold"]
        # the threshold really is the site's or a fitted card's, found here without the step
        if f["threshold_from"] == "pipeline":
            assert f["threshold"] == params["finding_thresholds"][worst]
        elif f["threshold_from"] == "fusion card":
            assert f["threshold"] == fusion.finding_thresholds[worst]
        else:
            [head] = [s for s in scores if s.source == "head"]
            assert f["source"] == f"head.{worst}" and f["threshold"] == head.thresholds[worst]
        # no positive finding is more severe
        rank = {n: i for i, n in enumerate(params["severity_order"])}
        for other in decision["findings_above_threshold"]:
            assert rank.get(worst, len(rank)) <= rank.get(other, len(rank))


def test_removed_default_threshold_is_refused_with_the_fix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`finding_threshold` was removed"):
        DecisionParams(finding_threshold=0.5)
    path = tmp_path / "pipeline.yaml"
    step = {"id": "decision", "uses": "decision.pathology", "with": {"finding_threshold": 0.5}}
    path.write_text(yaml.safe_dump({"name": "p", "version": 1, "steps": [step]}))
    with pytest.raises(ConfigError) as caught:
        load_pipeline(path, default_registry(), StepEnv(tmp_path))
    message = str(caught.value)
    assert "steps[0].with" in message and "`finding_threshold` was removed" in message
    assert "set it per finding under `finding_thresholds`" in message and "Fix: remove it" in message


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


def test_fusion_card_threshold_holds_only_for_the_feature_it_was_fitted_on() -> None:
    """A threshold fitted on head.Lung nodule is no threshold for lipro.Lung nodule (head skipped)."""
    from processor.steps.ensemble import with_thresholds

    found = {"Lung nodule": (0.7, "lipro.Lung nodule", None)}
    skipped_head = with_thresholds(found, {}, {"Lung nodule": 0.4}, {"Lung nodule": "head.Lung nodule"})
    assert skipped_head["Lung nodule"].threshold is None and skipped_head["Lung nodule"].positive is None
    same_source = with_thresholds(found, {}, {"Lung nodule": 0.4}, {"Lung nodule": "lipro.Lung nodule"})
    assert same_source["Lung nodule"].threshold == 0.4
    assert same_source["Lung nodule"].threshold_from == "fusion card"


def test_a_head_no_better_than_chance_gives_no_threshold() -> None:
    """fit-head installs a head even when a finding's CV AUROC interval includes 0.5; the decision
    never calls that finding on its threshold."""
    from processor.steps.ensemble import usable_thresholds

    card = {
        "thresholds": {"Emphysema": 0.43, "Lung nodule": 0.51},
        "cv": {
            "per_finding": {
                "Emphysema": {"better_than_chance": False},
                "Lung nodule": {"better_than_chance": True},
            }
        },
    }
    assert usable_thresholds(card) == {"Lung nodule": 0.51}
    assert usable_thresholds({"thresholds": {"Emphysema": 0.4}}) == {"Emphysema": 0.4}  # older card


def test_a_fusion_card_verdict_of_chance_is_not_sidestepped_by_the_model_card() -> None:
    """The fusion card fitted head.Pleural effusion's threshold and found it no better than chance:
    the head card's own threshold must not take its place."""
    from processor.steps.ensemble import with_thresholds

    found = {"Pleural effusion": (0.7, "head.Pleural effusion", 0.2)}
    vetoed = {"Pleural effusion": "head.Pleural effusion"}
    f = with_thresholds(found, {}, {}, vetoed, vetoed)["Pleural effusion"]
    assert f.threshold is None and f.positive is None
    other_source = with_thresholds(
        {"Pleural effusion": (0.7, "lipro.Pleural effusion", 0.2)}, {}, {}, vetoed, vetoed
    )["Pleural effusion"]
    assert other_source.threshold == 0.2 and other_source.threshold_from == "model card"
    site = with_thresholds(found, {"Pleural effusion": 0.5}, {}, vetoed, vetoed)["Pleural effusion"]
    assert site.threshold == 0.5 and site.threshold_from == "pipeline"  # a deliberate site choice
