"""BLIP-2 folders in the legacy or a half-converted layout: refused by check-config with the fix, and
never captioned without the image.

The folders are the tiny BLIP-2 (OPT) of tests/tinyvlm.py, saved by transformers 5 and then turned
back, in whole or in part, into the layout saved before transformers 4.47 (``downgrade_blip2``):
config.json without ``image_token_index``, the old preprocessor_config.json instead of
processor_config.json (no ``num_query_tokens``), a tokenizer without ``<image>``. Without the guard,
the legacy folder failed with "'bool' object has no attribute 'unsqueeze'" and a folder whose
processor lacked ``num_query_tokens`` captioned the prompt alone, silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from processor.errors import StepError, WeightsError
from processor.models import captioner as cap
from processor.pipeline.spec import PipelineSpec, compile_steps
from processor.pipeline.step import StepEnv
from processor.steps import default_registry
from tests import tinyvlm
from tests.conftest import Project
from tests.test_caption import install, pipeline_steps

FIX = "Fix: download the model folder again from Hugging Face"
NO_INDEX = "config.json has no image_token_index"
NO_QUERY = "the processor has no num_query_tokens"
IMAGE = np.full((32, 32), 128, dtype=np.uint8)


@pytest.fixture(scope="module")
def blip2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinyvlm.build_blip2_opt(tmp_path_factory.mktemp("weights") / "tiny-blip2-opt")


def variant(blip2: Path, where: Path, **parts: bool) -> Path:
    folder = where / "blip2-variant"
    shutil.copytree(blip2, folder)
    return tinyvlm.downgrade_blip2(folder, **parts)


def compile_problems(root: Path, model: str) -> list[str]:
    spec = PipelineSpec.model_validate({"name": "t", "version": 1, "steps": pipeline_steps(model)})
    _, problems = compile_steps(spec, default_registry(), StepEnv(root=root, device="cpu"))
    return problems


def test_legacy_folder_fails_check_config_with_the_fix(project: Project, blip2: Path, tmp_path: Path) -> None:
    model = install(project.root, variant(blip2, tmp_path))
    project.write_pipeline(pipeline_steps(model))
    run = project.run("check-config")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "steps[3] (caption" in run.stderr and "with.model" in run.stderr
    assert NO_INDEX in run.stderr and NO_QUERY in run.stderr and FIX in run.stderr
    assert "'bool' object has no attribute 'unsqueeze'" in run.stderr  # the error it replaces, named


@pytest.mark.parametrize(
    ("parts", "expected"),
    [
        ({"processor": False, "tokenizer": False}, [NO_INDEX]),
        ({"config": False, "tokenizer": False}, [NO_QUERY, "caption the text alone, without the image"]),
        ({"config": False, "processor": False}, []),  # <image> is appended at its old id: it works
    ],
    ids=["config-not-updated", "processor-not-updated", "tokenizer-not-updated"],
)
def test_half_converted_folders(
    blip2: Path, tmp_path: Path, parts: dict[str, bool], expected: list[str]
) -> None:
    model = install(tmp_path, variant(blip2, tmp_path, **parts))
    problems = compile_problems(tmp_path, model)
    if not expected:
        assert problems == []
        return
    [problem] = problems
    assert all(text in problem for text in expected) and FIX in problem, problem
    assert problem.startswith("steps[3] (caption") and f"with.model (value: {model!r})" in problem


def test_an_image_token_id_the_model_does_not_know_is_refused(blip2: Path, tmp_path: Path) -> None:
    folder = variant(blip2, tmp_path, config=False, processor=False, tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_token_index": 5}))
    [problem] = compile_problems(tmp_path, install(tmp_path, folder))
    assert "<image> token has id 320 but config.json's image_token_index is 5" in problem


def test_loading_a_half_converted_folder_is_refused(blip2: Path, tmp_path: Path) -> None:
    folder = variant(blip2, tmp_path, config=False, tokenizer=False)
    with pytest.raises(WeightsError, match=NO_QUERY):
        cap.load_captioner(cap.detect(folder), "cpu", None)


def test_no_caption_without_the_image_tokens(blip2: Path, tmp_path: Path) -> None:
    """The captioner itself refuses a prompt without the image tokens, whatever built it."""
    folder = variant(blip2, tmp_path, config=False, tokenizer=False)  # the processor adds none
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    processor = transformers.AutoProcessor.from_pretrained(folder, local_files_only=True)
    captioner = cap.Captioner(cap.detect(folder), model.eval(), processor, torch.device("cpu"), None)
    with pytest.raises(
        StepError, match=r"holds \[0, 0\] image token\(s\) per image where the model expects 4"
    ):
        captioner.caption([IMAGE, IMAGE], "Question: what is seen? Answer:", cap.Generation(3, 1))
    assert captioner.stats.generate_calls == 0
    processor.num_query_tokens = 4  # the same objects, the image tokens in place: it captions
    [text] = captioner.caption([IMAGE], None, cap.Generation(3, 1))
    assert isinstance(text, str) and captioner.stats.generate_calls == 1
