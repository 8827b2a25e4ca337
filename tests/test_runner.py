"""The pipeline runner's study statuses: out-of-memory is Partial, a crash is Failure, batches isolate,
an unreadable model is that step's failure (not the arrival's)."""

from __future__ import annotations

from pathlib import Path

import torch

from processor.dicom.scan import Study
from processor.models import captioner
from processor.models.cache import ModelCache
from processor.pipeline.registry import StepRegistry
from processor.pipeline.runner import PipelineRunner
from processor.pipeline.spec import Pipeline, PipelineSpec, compile_steps
from processor.pipeline.step import Step, StepEnv, StudyContext


class OutOfMemory(Step):
    uses = "test.oom"
    summary = "raises CUDA out-of-memory for every study (as run_with_oom_backoff does at batch 1)"
    device = "gpu"

    def run(self, ctx: StudyContext) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


class Marks(Step):
    uses = "test.mark"
    summary = "marks the study; fails the one named 'bad'"

    def run(self, ctx: StudyContext) -> None:
        if ctx.study.uid == "9.9":
            raise ValueError("this study is broken")
        ctx.result["marked"] = True


class FolderModel(Step):
    uses = "test.folder_model"
    summary = "reads the Hugging Face model folder weights/m through the captioner's own file list"

    def weight_files(self) -> list[Path]:
        return captioner.weight_files(self.env.root / "weights" / "m")

    def run(self, ctx: StudyContext) -> None:
        ctx.result["captioned"] = True


def _pipeline(tmp_path: Path, steps: list[dict]) -> tuple[Pipeline, ModelCache]:
    registry = StepRegistry()
    registry.register(OutOfMemory)
    registry.register(Marks)
    registry.register(FolderModel)
    cache = ModelCache(2, "cpu")
    spec = PipelineSpec.model_validate({"name": "t", "version": 1, "steps": steps})
    compiled, problems = compile_steps(spec, registry, StepEnv(tmp_path, models=cache))
    assert not problems
    return Pipeline("t", 1, "skip", tuple(compiled), tmp_path / "p.yaml", "x"), cache


def _ctx(uid: str, tmp_path: Path) -> StudyContext:
    return StudyContext(1, Study(uid), tmp_path / uid)


def test_out_of_memory_makes_the_study_partial_and_later_steps_still_run(tmp_path: Path) -> None:
    pipeline, _ = _pipeline(
        tmp_path, [{"id": "big", "uses": "test.oom"}, {"id": "mark", "uses": "test.mark"}]
    )
    outcome = PipelineRunner(pipeline).run(_ctx("1.2", tmp_path))
    assert outcome.status == "Partial" and outcome.error is None
    assert [(r.step_id, r.status) for r in outcome.steps] == [("big", "failed"), ("mark", "done")]
    assert "out of memory" in outcome.steps[0].error


def test_in_a_batch_one_broken_study_fails_alone(tmp_path: Path) -> None:
    pipeline, _ = _pipeline(tmp_path, [{"id": "mark", "uses": "test.mark"}])
    ctxs = [_ctx(uid, tmp_path) for uid in ("1.1", "9.9", "1.3")]
    outcomes = PipelineRunner(pipeline).run_many(ctxs)
    assert [o.status for o in outcomes] == ["Success", "Failure", "Success"]
    assert "this study is broken" in outcomes[1].error
    assert ctxs[0].result == {"marked": True} and ctxs[2].result == {"marked": True}


def test_an_unreadable_weight_index_fails_that_step_on_every_study_and_the_others_run(tmp_path: Path) -> None:
    """``{not json`` in the model folder's index: the step fails with ``model_unusable`` naming the
    file; optional: the study is Partial and later steps run; required: the study is a Failure."""
    folder = tmp_path / "weights" / "m"
    folder.mkdir(parents=True)
    (folder / "model.safetensors.index.json").write_text("{not json")
    steps = [
        {"id": "caption", "uses": "test.folder_model", "optional": True},
        {"id": "mark", "uses": "test.mark"},
    ]
    pipeline, _ = _pipeline(tmp_path, steps)
    outcomes = PipelineRunner(pipeline).run_many([_ctx("1.1", tmp_path), _ctx("1.2", tmp_path)])
    for outcome in outcomes:
        assert outcome.status == "Partial" and outcome.error is None
        [caption, mark] = outcome.steps
        assert (caption.status, caption.problem, mark.status) == ("failed", "model_unusable", "done")
        assert caption.error is not None and "model.safetensors.index.json" in caption.error
        assert "cannot be read" in caption.error and "copy the model folder again" in caption.error
    required, _ = _pipeline(tmp_path, [{**steps[0], "optional": False}, steps[1]])
    outcome = PipelineRunner(required).run(_ctx("1.3", tmp_path))
    assert outcome.status == "Failure" and "index.json" in (outcome.error or "")
    assert [(r.status, r.problem) for r in outcome.steps] == [
        ("failed", "model_unusable"),
        ("not_run", "earlier_failed"),
    ]
