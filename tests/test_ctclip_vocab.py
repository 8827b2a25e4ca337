"""The CXR-BERT vocabulary is checked by content: special-token layout always, sha256 where pinned.

A vocabulary of the right size but another layout (bert-base-uncased's: [PAD]=0, [unused0..98],
[UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103) would give other token ids to every prompt, silently.
The vocabularies here are built at test time: Google's layout and CXR-BERT's, at the tiny model's
size (128) and at the released size (30522).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from processor.config import load_settings
from processor.errors import WeightsError
from processor.models.ctclip import load_ctclip
from processor.models.ctclip_vocab import CXR_BERT, CXR_BERT_SIZE, build_tokenizer, check_vocab
from processor.pipeline.spec import load_pipeline
from processor.pipeline.step import StepEnv
from processor.steps import default_registry
from processor.weights import pinned_sha256
from tests.conftest import FIXTURES, Project

FIX = FIXTURES / "ct_clip"
TINY = FIX / "vocab.txt"
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokens() -> list[str]:
    return TINY.read_text(encoding="utf-8").split("\n")[:-1]


def google_layout(size: int) -> list[str]:
    """bert-base-uncased's layout: [PAD], [unused0..98], [UNK] [CLS] [SEP] [MASK], then words."""
    head = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = [t for t in tiny_tokens() if t not in SPECIALS]
    return (head + words + [f"word{i}" for i in range(size)])[:size]


def cxr_layout(size: int) -> list[str]:
    return (tiny_tokens() + [f"word{i}" for i in range(size)])[:size]


def write(path: Path, tokens: list[str]) -> Path:
    path.write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")
    return path


def load_small(vocab: Path) -> object:
    return load_ctclip(FIX / "small_ctclip.pt", vocab, FIX / "small_config.json")


# ---------------------------------------------------------------------------------------------- layout


def test_bert_base_uncased_layout_of_the_same_size_is_refused_at_load(tmp_path: Path) -> None:
    vocab = write(tmp_path / "vocab.txt", google_layout(128))  # the tiny model's size: only content differs
    with pytest.raises(WeightsError) as caught:
        load_small(vocab)
    message = str(caught.value)
    assert "[UNK] at line 101 (id 100)" in message and "[CLS] at line 102 (id 101)" in message
    assert "bert-base-uncased" in message and CXR_BERT in message and "Fix:" in message


def test_a_vocab_with_cxr_bert_specials_moved_is_refused(tmp_path: Path) -> None:
    tokens = tiny_tokens()
    tokens[2], tokens[3] = tokens[3], tokens[2]  # [CLS] and [SEP] swapped: same size, same tokens
    with pytest.raises(WeightsError, match=r"\[CLS\] at line 4 \(id 3\)"):
        load_small(write(tmp_path / "vocab.txt", tokens))


def test_released_size_checked_by_content_not_size(tmp_path: Path) -> None:
    google = write(tmp_path / "bert-base-uncased.txt", google_layout(CXR_BERT_SIZE))
    cxr = write(tmp_path / "cxr-like.txt", cxr_layout(CXR_BERT_SIZE))
    [problem] = check_vocab(google, CXR_BERT_SIZE)
    assert "not CXR-BERT's" in problem and "[MASK] at line 104 (id 103)" in problem
    assert check_vocab(cxr, CXR_BERT_SIZE) == []
    tokenizer = build_tokenizer(cxr, CXR_BERT_SIZE)
    assert len(tokenizer) == CXR_BERT_SIZE
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id] == [0, 1, 2]
    assert [tokenizer.sep_token_id, tokenizer.mask_token_id] == [3, 4]


def test_the_right_layout_loads_and_tokenizes_like_the_official_code() -> None:
    model = load_small(TINY)
    golden = json.loads((FIX / "small_golden_tokenized_prompts.json").read_text())
    for entry in golden:
        prompts = [f"{entry['pathology']} is present.", f"{entry['pathology']} is not present."]
        ids = [model.tokenizer(p)["input_ids"] for p in prompts]  # type: ignore[attr-defined]
        assert ids == entry["input_ids_unpadded"]


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (cxr_layout(127), "has 127 entries but the model's text encoder has 128"),
        ([*cxr_layout(127)[:-1], "cardio", "[PAD]"], "appear more than once"),
        ([*cxr_layout(127), ""], "line(s) 128 are empty"),
    ],
    ids=["size", "duplicate", "empty-line"],
)
def test_other_content_problems_are_refused(tmp_path: Path, tokens: list[str], expected: str) -> None:
    with pytest.raises(WeightsError) as caught:
        load_small(write(tmp_path / "vocab.txt", tokens))
    assert expected in str(caught.value)


def test_missing_vocab_names_where_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found") as caught:
        load_small(tmp_path / "vocab.txt")
    assert CXR_BERT in str(caught.value)


# ---------------------------------------------------------------------------------------------- manifest


def small_project(tmp_path: Path, vocab: list[str] | None = None, pin: str | None = None) -> Project:
    """The small model installed where the default pipeline keeps CT-CLIP; a local manifest pins
    ``pin`` for ct_clip/vocab.txt (it takes precedence over the shipped one)."""
    small = {"vocab": "weights/ct_clip/vocab.txt", "config": "weights/ct_clip/small_config.json"}
    project = Project(
        tmp_path,
        [
            {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
            {"id": "volume", "uses": "ct.volume"},
            {
                "id": "clip",
                "uses": "ctclip.zero_shot",
                "with": {
                    "checkpoint": "weights/ct_clip/small_ctclip.pt",
                    "target_xyz": [32, 32, 24],
                    **small,
                },
            },
        ],
    )
    target = project.root / "weights" / "ct_clip"
    target.mkdir(parents=True)
    for name in ("small_ctclip.pt", "small_config.json", "vocab.txt"):
        shutil.copy(FIX / name, target / name)
    if vocab is not None:
        write(target / "vocab.txt", vocab)
    manifest = {
        "version": 1,
        "files": [{"path": "ct_clip/vocab.txt", "steps": ["ctclip.zero_shot"], "sha256": pin}],
    }
    (project.root / "weights" / "manifest.yaml").write_text(yaml.safe_dump(manifest))
    return project


def clip_step(project: Project):  # noqa: ANN201 - the compiled step
    settings = load_settings(project.config)
    env = StepEnv(settings.root, "cpu", pinned_sha256=pinned_sha256(settings))
    return load_pipeline(settings.pipeline, default_registry(), env).steps[2].step


def test_pinned_sha256_accepts_the_pinned_file(tmp_path: Path) -> None:
    pin = hashlib.sha256(TINY.read_bytes()).hexdigest()
    project = small_project(tmp_path, pin=pin)
    settings = load_settings(project.config)
    assert pinned_sha256(settings) == {(settings.weights / "ct_clip" / "vocab.txt").resolve(): pin}
    run = project.run("check-config")
    assert run.returncode == 0, run.stderr
    assert clip_step(project).model().tokenizer.cls_token_id == 2


def test_a_vocab_other_than_the_pinned_one_fails_check_config_and_load(tmp_path: Path) -> None:
    other = "0" * 64  # the pin of another file: the tiny vocab has the right layout, not this sha256
    project = small_project(tmp_path, pin=other)
    run = project.run("check-config")
    assert run.returncode == 2
    assert "with.vocab" in run.stderr and f"pins {other}" in run.stderr and CXR_BERT in run.stderr


def test_a_vocab_swapped_after_start_is_refused_at_load(tmp_path: Path) -> None:
    pin = hashlib.sha256(TINY.read_bytes()).hexdigest()
    project = small_project(tmp_path, pin=pin)
    step = clip_step(project)  # compiled (and checked) with the pinned file in place
    tokens = tiny_tokens()
    tokens[-1] = "swapped"  # same layout and size, other content
    write(project.root / "weights" / "ct_clip" / "vocab.txt", tokens)
    with pytest.raises(WeightsError, match=f"pins {pin}"):
        step.model()


def test_a_wrong_layout_fails_check_config_with_the_fix(tmp_path: Path) -> None:
    project = small_project(tmp_path, vocab=google_layout(128))  # nothing pinned: the layout decides
    run = project.run("check-config")
    assert run.returncode == 2
    assert "with.vocab" in run.stderr and "[UNK] at line 101 (id 100)" in run.stderr
    assert "huggingface-cli download" in run.stderr
