"""Typed ports: a need is provided earlier with its type (checked at load), a provided value has it (at run)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from processor.dicom.scan import Study
from processor.errors import ConfigError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.runner import PipelineRunner
from processor.pipeline.spec import load_pipeline
from processor.pipeline.step import Port, Step, StepEnv, StudyContext
from processor.steps import default_registry
from processor.steps.ports import FEATURES, VOLUME


class ListVolume(Step):
    uses = "test.list_volume"
    summary = "provides a 'volume' that is a list"
    provides = (Port("volume", list),)

    def run(self, ctx: StudyContext) -> None:
        ctx.values["volume"] = []


class DictFusion(Step):
    uses = "test.dict_fusion"
    summary = "provides a 'fusion' that is a plain dict"
    provides = (Port("fusion", dict),)

    def run(self, ctx: StudyContext) -> None:
        ctx.values["fusion"] = {}


class WrongFeatures(Step):
    uses = "test.wrong_features"
    summary = "declares the features dict, provides a list"
    provides = (FEATURES,)

    def run(self, ctx: StudyContext) -> None:
        ctx.values[FEATURES.name] = [0.5]


class GoodFeatures(Step):
    uses = "test.good_features"
    summary = "provides the features dict"
    provides = (FEATURES,)

    def run(self, ctx: StudyContext) -> None:
        ctx.values[FEATURES.name] = {"x.y": 0.5}


class ReadsFeatures(Step):
    uses = "test.reads_features"
    summary = "needs the features"
    needs = (FEATURES,)

    def run(self, ctx: StudyContext) -> None:
        ctx.result["seen"] = dict(ctx.values[FEATURES.name])


def _registry() -> StepRegistry:
    registry = default_registry()
    for cls in (ListVolume, DictFusion, WrongFeatures, GoodFeatures, ReadsFeatures):
        registry.register(cls)
    return registry


def _load(tmp_path: Path, steps: list[dict]):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "version": 1, "steps": steps}))
    return load_pipeline(path, _registry(), StepEnv(tmp_path))


def _problems(tmp_path: Path, steps: list[dict]) -> str:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, steps)
    return str(err.value)


def test_a_bare_name_is_refused_at_import() -> None:
    with pytest.raises(TypeError, match=r"Needy.needs: 'volume' is not a Port. Fix: declare Port\('volume'"):

        class Needy(Step):
            uses = "test.needy"
            summary = "needs a volume by name only"
            needs = ("volume",)  # type: ignore[assignment]


def test_a_need_provided_with_another_type_names_step_port_and_providers(tmp_path: Path) -> None:
    text = _problems(
        tmp_path, [{"id": "fake", "uses": "test.list_volume"}, {"id": "lungs", "uses": "quantify.lungs"}]
    )
    assert (
        "steps[1] (lungs, uses quantify.lungs): needs 'volume' as Volume, but step 'fake' provides it as list"
    ) in text
    assert "provided by ct.volume" in text


def test_a_need_provided_only_later_says_where(tmp_path: Path) -> None:
    text = _problems(
        tmp_path,
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "lungs", "uses": "quantify.lungs"},
            {"id": "volume", "uses": "ct.volume"},
        ],
    )
    assert "steps[1] (lungs, uses quantify.lungs): needs 'volume', which no earlier step provides" in text
    assert "move this step after step 'volume'" in text
    assert text.count(" - ") == 1  # ct.volume's own need (series) is met


def test_every_problem_at_once_with_the_registered_providers(tmp_path: Path) -> None:
    text = _problems(
        tmp_path, [{"id": "fusion", "uses": "fusion.lightgbm"}, {"id": "head", "uses": "ctclip.head"}]
    )
    assert (
        "steps[0] (fusion, uses fusion.lightgbm): needs 'features', which no earlier step provides (type dict)"
        in text
    )
    assert "Fix: move this step after step 'head', which provides it later in the pipeline." in text
    assert "steps[1] (head, uses ctclip.head): needs 'ctclip_latent'" in text
    assert "provided by ctclip.classify, ctclip.zero_shot" in text


def test_the_registered_providers_are_listed(tmp_path: Path) -> None:
    text = _problems(tmp_path, [{"id": "fusion", "uses": "fusion.lightgbm"}])
    assert (
        "Fix: add a step that provides it before this one (provided by anomaly.diffusion, ctclip.classify, "
        "ctclip.head, ctclip.zero_shot, quantify.lungs, test.good_features, test.wrong_features)."
    ) in text


def test_optional_needs_may_be_absent_but_not_of_another_type(tmp_path: Path) -> None:
    _load(
        tmp_path,
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "slices", "uses": "render.key_slices"},
            {"id": "decision", "uses": "decision.pathology"},
        ],
    )
    text = _problems(
        tmp_path,
        [{"id": "fake", "uses": "test.dict_fusion"}, {"id": "decision", "uses": "decision.pathology"}],
    )
    assert (
        "steps[1] (decision, uses decision.pathology): needs 'fusion' as FusionOutput, but step 'fake' "
        "provides it as dict. Fix: provide it with a step that gives a FusionOutput (provided by "
        "fusion.lightgbm)."
    ) in text
    text = _problems(
        tmp_path,
        [
            {"id": "fake", "uses": "test.list_volume"},
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "slices", "uses": "render.key_slices"},
        ],
    )
    assert (
        "steps[2] (volume, uses ct.volume): provides 'volume' as Volume, but step 'fake' already provides "
        "it as list" in text
    )


def test_a_value_of_the_wrong_type_fails_its_step_not_the_next(tmp_path: Path) -> None:
    pipeline = _load(
        tmp_path,
        [{"id": "bad", "uses": "test.wrong_features"}, {"id": "read", "uses": "test.reads_features"}],
    )
    ctx = StudyContext(1, Study("1.2.3"), tmp_path / "out")
    outcome = PipelineRunner(pipeline).run(ctx)
    assert outcome.status == "Failure"
    assert [(r.step_id, r.status) for r in outcome.steps] == [("bad", "failed"), ("read", "not_run")]
    assert "provided 'features' as list, but the step declares it as dict" in outcome.steps[0].error
    assert "seen" not in ctx.result

    pipeline = _load(
        tmp_path,
        [{"id": "good", "uses": "test.good_features"}, {"id": "read", "uses": "test.reads_features"}],
    )
    ctx = StudyContext(1, Study("1.2.3"), tmp_path / "out")
    assert PipelineRunner(pipeline).run(ctx).status == "Success" and ctx.result["seen"] == {"x.y": 0.5}


def test_port_accepts_its_type_and_subtypes() -> None:
    assert VOLUME.accepts(VOLUME) and not VOLUME.accepts(Port("volume", list))
    assert Port("x", object).accepts(Port("x", dict)) and not Port("x", dict).accepts(Port("x", object))
    assert not FEATURES.accepts(Port("other", dict))
    assert str(FEATURES) == "features (dict)"
