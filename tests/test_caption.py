"""caption.image_to_text: tiny BLIP, BLIP-2 (OPT) and Gemma 3 folders built here, loaded like a user's.

The captions are gibberish (random weights); the tests check the path from a ZIP to the JSON, the
batching (one generate call, one vision-encoder pass for all slices), the content cache (hits, and
misses when the prompt changes), the provenance and the compile-time errors.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from processor.dicom.scan import scan_members
from processor.intake.archive import Limits, open_arrival
from processor.models.cache import ModelCache
from processor.outputs.excel import CAPTION_HEADER, study_row
from processor.outputs.result import load_schema
from processor.pipeline.runner import PipelineRunner
from processor.pipeline.spec import Pipeline, PipelineSpec, compile_steps
from processor.pipeline.step import StepEnv, StudyContext
from processor.state import MIGRATIONS, State
from processor.steps import default_registry
from tests import dicomgen, tinyvlm

SHAPE = (24, 64, 64)
FAMILY_NOTE = "BLIP (BlipForConditionalGeneration)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("weights")
    return {
        "blip": tinyvlm.build_blip(root / "tiny-blip"),
        "blip2": tinyvlm.build_blip2_opt(root / "tiny-blip2-opt"),
        "blip2-t5": tinyvlm.build_blip2_t5(root / "tiny-blip2-t5"),
        "gemma3": tinyvlm.build_gemma3(root / "tiny-gemma3"),
        "bert": tinyvlm.build_bert(root / "tiny-bert"),
    }


def phantom_zip(path: Path) -> Path:
    hu, _ = dicomgen.chest_phantom(SHAPE)
    return dicomgen.write_zip(path, dicomgen.make_series(SHAPE[0], stored=(hu + 1024).astype(np.int16)))


def pipeline_steps(model: str, **caption: object) -> list[dict]:
    return [
        {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
        {"id": "volume", "uses": "ct.volume"},
        {
            "id": "slices",
            "uses": "render.key_slices",
            "with": {"count": 2, "windows": ["lung", "mediastinal"]},
        },
        {
            "id": "caption",
            "uses": "caption.image_to_text",
            "with": {"model": model, "max_new_tokens": 6, **caption},
        },
    ]


def result_of(run) -> dict:  # noqa: ANN001 - CompletedProcess
    """The JSON written by a ``process`` run (its path is the last column of the output line)."""
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(Path(run.stdout.strip().splitlines()[-1].split("\t")[3]).read_text())


def install(project_root: Path, folder: Path) -> str:
    """Copy a model folder into the project's weights/ the way a site would; return the YAML path."""
    dest = project_root / "weights" / "caption" / folder.name
    shutil.copytree(folder, dest)
    return f"weights/caption/{folder.name}"


class Engine:
    """The real compiler and runner in this process, with a real SQLite content cache and model cache."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.models = ModelCache(capacity=2, device="cpu")
        self.cache = State.content_cache(root / "state" / "ctwatch.db")
        self.env = StepEnv(root=root, device="cpu", models=self.models, content_cache=self.cache)

    def compile(self, steps: list[dict]) -> Pipeline:
        spec = PipelineSpec.model_validate({"name": "test", "version": 1, "steps": steps})
        compiled, problems = compile_steps(spec, default_registry(), self.env)
        assert not problems, problems
        return Pipeline("test", 1, "skip", tuple(compiled), self.root / "pipeline.yaml", "test")

    def run(self, pipeline: Pipeline, arrival: Path, arrival_id: int = 1) -> StudyContext:
        with open_arrival(arrival, Limits()) as contents:
            study = scan_members(contents.members).studies[0]
            ctx = StudyContext(arrival_id, study, self.root / "outbox" / "2024-01-01" / study.uid)
            outcome = PipelineRunner(pipeline).run(ctx)
        assert outcome.status == "Success", [r.as_dict() for r in outcome.steps]
        return ctx


def caption_step(pipeline: Pipeline):  # noqa: ANN201 - the step instance
    return next(c.step for c in pipeline.steps if c.uses == "caption.image_to_text")


# ---------------------------------------------------------------------------------------------- BLIP, CLI


def test_blip_end_to_end_from_zip_cache_hit_and_prompt_change(project, tiny, tmp_path: Path) -> None:
    model = install(project.root, tiny["blip"])
    arrival = phantom_zip(tmp_path / "study.zip")
    project.write_pipeline(pipeline_steps(model), version=1)
    run = project.run("process", str(arrival))
    first = result_of(run)
    jsonschema.validate(first, load_schema())
    assert first["processing_status"] == "Success"
    captions = first["captions"]
    assert len(captions) == 4  # 2 levels × 2 windows, all captioned
    assert {(c["window"], c["slice_number"]) for c in captions} == {
        ("lung", 1),
        ("lung", 2),
        ("mediastinal", 1),
        ("mediastinal", 2),
    }
    for c, s in zip(captions, first["key_slices"], strict=True):
        assert c["diagnostic"] is False and c["model"] == "tiny-blip" and c["cached"] is False
        assert isinstance(c["text"], str) and c["text"]
        assert c["image"] == s["file"] and c["slice_index"] == s["slice_index"] and c["z_mm"] == s["z_mm"]
    [method] = first["captioning"]
    assert method["diagnostic"] is False and "not a diagnosis" in method["notice"]
    assert (
        method["model"]["family"] == "blip"
        and method["model"]["architecture"] == "BlipForConditionalGeneration"
    )
    assert len(method["model"]["folder_sha256"]) == 64 and method["model"]["path"] == model
    assert method["prompt"] == {"text": None, "sha256": None, "applied_as": "unconditional caption"}
    assert method["generation"] == {
        "max_new_tokens": 6,
        "num_beams": 1,
        "do_sample": False,
        "dtype": "float32",
    }
    assert method["batching"]["generate_calls"] == 1 and method["batching"]["images_per_call"] == [4]
    assert method["batching"]["generated"] == 4 and method["batching"]["cache_hits"] == 0
    # The Excel row (derived from SQLite) carries the captions under the honest header.
    state = State(project.state_path, readonly=True)
    [row] = state.report_studies("0000", "9999")
    state.close()
    excel = study_row(row, project.outbox / "reports")
    assert excel[CAPTION_HEADER] == " | ".join(c["text"] for c in captions)

    # The same study again (a new pipeline version, so it is not a duplicate): all from the cache.
    project.write_pipeline(pipeline_steps(model), version=2)
    run = project.run("process", str(arrival))
    again = result_of(run)
    assert [c["text"] for c in again["captions"]] == [c["text"] for c in captions]
    assert all(c["cached"] for c in again["captions"])
    batching = again["captioning"][0]["batching"]
    assert batching["cache_hits"] == 4 and batching["generate_calls"] == 0 and batching["generated"] == 0
    assert "caption.model_loaded" not in run.stderr  # nothing to generate: the model is not even loaded

    # Another prompt: never served the old captions.
    prompt = "a ct image of"
    project.write_pipeline(pipeline_steps(model, prompt=prompt), version=3)
    run = project.run("process", str(arrival))
    third = result_of(run)
    method = third["captioning"][0]
    assert method["prompt"]["text"] == prompt
    assert method["prompt"]["sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
    assert method["batching"]["generated"] == 4 and method["batching"]["cache_hits"] == 0
    assert method["batching"]["generate_calls"] == 1
    assert not any(c["cached"] for c in third["captions"])


# ---------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("family", ["blip2", "blip2-t5", "gemma3"])
def test_family_from_zip_one_generate_call_and_content_cache(family: str, tiny, tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    model = install(tmp_path, tiny[family])
    arrival = phantom_zip(tmp_path / "study.zip")
    pipeline = engine.compile(pipeline_steps(model))
    step = caption_step(pipeline)
    ctx = engine.run(pipeline, arrival)

    captions = ctx.result["captions"]
    assert len(captions) == 4 and all(c["diagnostic"] is False for c in captions)
    assert all(c["model"] == tiny[family].name and isinstance(c["text"], str) for c in captions)
    method = ctx.result["captioning"][0]
    expected = {
        "blip2": ("blip-2", "Blip2ForConditionalGeneration", "opt"),
        "blip2-t5": ("blip-2", "Blip2ForConditionalGeneration", "t5"),
        "gemma3": ("chat", "Gemma3ForConditionalGeneration", None),
    }[family]
    assert (
        method["model"]["family"],
        method["model"]["architecture"],
        method["model"]["language_model"],
    ) == expected
    if family == "gemma3":  # a chat model always gets a prompt, applied through its chat template
        assert method["prompt"]["text"] and "chat template" in method["prompt"]["applied_as"]
    # One generate call for the four slices, and the vision encoder saw them as one batch of four.
    captioner = step.last_captioner
    assert captioner is not None and captioner.stats.generate_calls == 1
    assert captioner.stats.images_per_call == [4] and captioner.stats.vision_batches[0] == 4
    assert engine.models.stats()["loads"] == 1

    # Same study, same everything: cache hits, no generate call.
    again = engine.run(pipeline, arrival, arrival_id=2)
    assert again.result["captioning"][0]["batching"]["cache_hits"] == 4
    assert [c["text"] for c in again.result["captions"]] == [c["text"] for c in captions]
    assert captioner.stats.generate_calls == 1

    # Same images, other prompt: generated anew (and one more call), by the model already loaded.
    other = engine.compile(pipeline_steps(model, prompt="Question: what is seen? Answer:"))
    third = engine.run(other, arrival, arrival_id=3)
    assert third.result["captioning"][0]["batching"]["generated"] == 4
    assert captioner.stats.generate_calls == 2 and engine.models.stats()["loads"] == 1

    # Other generation settings: also a new generation.
    engine.run(engine.compile(pipeline_steps(model, max_new_tokens=3)), arrival, arrival_id=4)
    assert captioner.stats.generate_calls == 3
    engine.cache.close()


def test_studies_share_generate_calls_up_to_batch_size(tiny, tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    model = install(tmp_path, tiny["blip"])
    upto_slices = engine.compile(pipeline_steps(model)[:3])
    contexts = [engine.run(upto_slices, phantom_zip(tmp_path / f"s{i}.zip"), arrival_id=i) for i in range(3)]

    pipeline = engine.compile(pipeline_steps(model, batch_size=8, images=["lung", "mediastinal:2"]))
    step = caption_step(pipeline)
    step.caption_studies(contexts)
    captioner = step.last_captioner
    assert captioner is not None
    # 3 studies × 3 selected slices = 9 images → calls of 8 and 1, shared across studies.
    assert captioner.stats.images_per_call == [8, 1] and captioner.stats.vision_batches == [8, 1]
    for ctx in contexts:
        assert [(c["window"], c["slice_number"]) for c in ctx.result["captions"]] == [
            ("lung", 1),
            ("lung", 2),
            ("mediastinal", 2),
        ]
        assert ctx.result["captioning"][0]["batching"]["studies_in_batch"] == 3
    assert contexts[0].result["captioning"][0]["batching"]["images_per_call"] == [8]
    assert contexts[2].result["captioning"][0]["batching"]["images_per_call"] == [8, 1]
    engine.cache.close()


# ---------------------------------------------------------------------------------------------- errors


def test_unsupported_folder_fails_at_compile_time_with_the_families(project, tiny) -> None:
    model = install(project.root, tiny["bert"])
    project.write_pipeline(pipeline_steps(model))
    run = project.run("check-config")
    assert run.returncode == 2
    assert "BertModel cannot caption images" in run.stderr and FAMILY_NOTE in run.stderr
    assert (
        "BLIP-2 (Blip2ForConditionalGeneration" in run.stderr
        and "Gemma3ForConditionalGeneration" in run.stderr
    )
    assert "steps[3] (caption)" in run.stderr


def test_param_errors_at_compile_time(tmp_path: Path) -> None:
    env = StepEnv(root=tmp_path, device="cpu")
    spec = PipelineSpec.model_validate(
        {
            "name": "t",
            "version": 1,
            "steps": pipeline_steps("weights/caption/absent", dtype="fp16", images=["lungs:1"])[2:],
        }
    )
    _, problems = compile_steps(spec, default_registry(), env)
    assert any("image selector" in p and "lungs:1" in p for p in problems), problems
    spec = PipelineSpec.model_validate(
        {"name": "t", "version": 1, "steps": pipeline_steps("weights/caption/absent", dtype="fp16")[2:]}
    )
    _, problems = compile_steps(spec, default_registry(), env)
    assert any("fp16 needs CUDA" in p for p in problems), problems


def test_missing_model_folder_skips_the_step(tmp_path: Path) -> None:
    engine = Engine(tmp_path)
    pipeline = engine.compile(pipeline_steps("weights/caption/blip2-opt-2.7b"))
    with open_arrival(phantom_zip(tmp_path / "s.zip"), Limits()) as contents:
        study = scan_members(contents.members).studies[0]
        ctx = StudyContext(1, study, tmp_path / "out" / study.uid)
        outcome = PipelineRunner(pipeline).run(ctx)
    record = outcome.steps[-1]
    assert outcome.status == "Partial" and record.status == "skipped"
    assert record.missing[0].endswith("weights/caption/blip2-opt-2.7b/config.json")
    engine.cache.close()


# ---------------------------------------------------------------------------------------------- state


def test_content_cache_store_is_per_thread_and_migrated(tmp_path: Path) -> None:
    names = [name for name, _ in MIGRATIONS]
    assert "0004_caption_cache" in names and names == sorted(names)
    store = State.content_cache(tmp_path / "db.sqlite")
    store.put("k", "from main")
    seen: list[str | None] = []
    worker = threading.Thread(
        target=lambda: (seen.append(store.get("k")), store.put("k2", "from worker")),
        name="ctwatch-test-cache",
    )
    worker.start()
    worker.join(10)
    assert seen == ["from main"] and store.get("k2") == "from worker" and store.get("nope") is None
    store.close()
