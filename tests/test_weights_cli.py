"""`python run.py weights [--verify]` and the shipped weights manifest."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import yaml

from processor.cli import main
from processor.config import load_settings
from processor.weights import (
    SHIPPED_MANIFEST,
    covering_row,
    exit_code,
    format_table,
    load_manifest,
    manifest_path,
    weight_files_of,
    weight_rows,
)
from tests.conftest import FIXTURES, REPO, Project

FIX = FIXTURES / "ct_clip"
MODEL = "weights/caption/blip2-opt-2.7b"
DEFAULT_STEPS = [
    {"id": "series", "uses": "dicom.select_series"},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "clip", "uses": "ctclip.zero_shot"},
    {"id": "lipro", "uses": "ctclip.classify"},
]


def _row(stdout: str, path: str) -> str:
    """The row of ``path``: its FILE / USED BY / STATUS line and the indented lines under it."""
    lines = stdout.splitlines()
    [at] = [i for i, line in enumerate(lines) if line.startswith(path + " ")]
    block = [lines[at]]
    for line in lines[at + 1 :]:
        if not line.startswith("    "):
            break
        block.append(line)
    return "\n".join(block)


def _listed(stdout: str) -> list[str]:
    return [line.split(" ")[0] for line in stdout.splitlines() if line.startswith("weights/")]


def test_weights_lists_exactly_the_files_the_pipeline_reads(project: Project) -> None:
    project.write_pipeline(DEFAULT_STEPS)
    (project.root / "weights" / "ct_clip").mkdir(parents=True)
    shutil.copy(FIX / "vocab.txt", project.root / "weights" / "ct_clip" / "vocab.txt")
    proc = project.run("weights")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # files the pipeline uses are missing
    out = proc.stdout
    # the two CT-CLIP steps read three files, in pipeline order; no other manifest row is shown
    assert _listed(out) == [
        "weights/ct_clip/CT_VocabFine_v2.pt",
        "weights/ct_clip/vocab.txt",
        "weights/ct_clip/CT_LiPro_v2.pt",
    ]
    vocab = _row(out, "weights/ct_clip/vocab.txt")
    assert "present-unverified" in vocab and "clip (ctclip.zero_shot), lipro (ctclip.classify)" in vocab
    assert "source:  Hugging Face model microsoft/BiomedVLP-CXR-BERT-specialized, file vocab.txt" in vocab
    assert "licence: MIT" in vocab and "sha256:  not published" in vocab
    fine = _row(out, "weights/ct_clip/CT_VocabFine_v2.pt")
    assert " missing" in fine.splitlines()[0] and "clip (ctclip.zero_shot)" in fine
    assert "source:  Hugging Face dataset ibrahimhamamci/CT-RATE" in fine
    assert "licence: CC-BY-NC-SA-4.0 (non-commercial)" in fine and "sha256:  not published" in fine
    lipro = _row(out, "weights/ct_clip/CT_LiPro_v2.pt")
    assert " missing" in lipro.splitlines()[0] and "lipro (ctclip.classify)" in lipro
    for stale in ("planned", "not built", "not in the manifest", "CT-CLIP_v2.pt", "fusion", "head.pt"):
        assert stale not in out, stale
    assert "2 file(s) the pipeline uses are missing" in out
    assert "non-commercial purposes only" in out


def test_weights_of_a_pipeline_without_models(project: Project) -> None:
    """No step reads a model file: nothing is listed, nothing is missing (in-process, no subprocess)."""
    project.write_pipeline(DEFAULT_STEPS[:2])
    settings = load_settings(project.config)
    assert weight_rows(settings) == [] and exit_code([]) == 0
    assert "(none: no step of this pipeline reads a model file)" in format_table([], settings, False)


def test_weights_verify_with_a_site_manifest(project: Project) -> None:
    small = {
        "checkpoint": "weights/ct_clip/small_ctclip.pt",
        "config": "weights/ct_clip/small_config.json",
        "target_xyz": [32, 32, 24],
    }
    project.write_pipeline(DEFAULT_STEPS[:2] + [{"id": "clip", "uses": "ctclip.zero_shot", "with": small}])
    folder = project.root / "weights" / "ct_clip"
    folder.mkdir(parents=True)
    for name in ("vocab.txt", "small_ctclip.pt", "small_config.json"):
        shutil.copy(FIX / name, folder / name)
    small_sha = hashlib.sha256((FIX / "small_ctclip.pt").read_bytes()).hexdigest()
    manifest = {
        "version": 1,
        "files": [
            {
                "path": "ct_clip/vocab.txt",
                "steps": ["ctclip.zero_shot"],
                "sha256": "0" * 64,  # not this copy's: a different or corrupt file
                "licence": "MIT",
                "source": "CXR-BERT",
            },
            {
                "path": "ct_clip/small_ctclip.pt",
                "steps": ["ctclip.zero_shot"],
                "status": "required",  # a key of older manifests: accepted, ignored
                "sha256": small_sha,
                "licence": "CC-BY-NC-SA-4.0 (non-commercial)",
                "source": "CT-RATE",
            },
        ],
    }
    site = project.root / "weights" / "manifest.yaml"
    site.write_text(yaml.safe_dump(manifest))

    proc = project.run("weights", "--verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert f"manifest: {site}" in out
    checkpoint = _row(out, "weights/ct_clip/small_ctclip.pt")
    assert " verified" in checkpoint.splitlines()[0] and f"sha256:  {small_sha}" in checkpoint
    assert " MISMATCH" in _row(out, "weights/ct_clip/vocab.txt").splitlines()[0]
    assert "MISMATCH weights/ct_clip/vocab.txt" in out and "Fix: copy the file again" in out
    config = _row(out, "weights/ct_clip/small_config.json")
    assert "present-unverified" in config and f"not listed in {site}: add a row" in config
    config_sha = hashlib.sha256((FIX / "small_config.json").read_bytes()).hexdigest()
    assert f"{config_sha}  weights/ct_clip/small_config.json" in out  # printed so a site can pin it

    # in-process: without --verify nothing is hashed; a missing file the pipeline reads fails
    settings = load_settings(project.config)
    rows = {r.shown: r for r in weight_rows(settings)}
    assert rows["weights/ct_clip/vocab.txt"].status == "present-unverified"
    assert rows["weights/ct_clip/vocab.txt"].actual_sha256 is None
    assert not rows["weights/ct_clip/small_config.json"].in_manifest
    (folder / "vocab.txt").unlink()
    rows_verified = weight_rows(settings, verify=True)
    assert {r.shown: r.status for r in rows_verified}["weights/ct_clip/vocab.txt"] == "missing"
    assert exit_code(rows_verified) == 1


def test_shipped_manifest() -> None:
    manifest = load_manifest(SHIPPED_MANIFEST)
    files = {f.path: f for f in manifest.files}
    for name in ("CT_VocabFine_v2.pt", "CT_LiPro_v2.pt"):
        entry = files[f"ct_clip/{name}"]
        assert entry.licence == "CC-BY-NC-SA-4.0 (non-commercial)"
        assert "ibrahimhamamci/CT-RATE" in entry.source
    assert "microsoft/BiomedVLP-CXR-BERT-specialized" in files["ct_clip/vocab.txt"].source
    assert "Salesforce/blip2-opt-2.7b" in files["caption/blip2-opt-2.7b/"].source
    for path in ("head/head.pt", "anomaly/card.json", "fusion/model.txt"):
        assert "fit-" in files[path].source and files[path].licence.startswith("yours"), path
    assert all(f.status is None for f in manifest.files)  # no required / optional / planned rows
    assert all(f.sha256 is None for f in manifest.files)  # none is published; none is invented
    text = SHIPPED_MANIFEST.read_text()
    assert text.count("# not published") >= 3
    readme = (SHIPPED_MANIFEST.parent / "README.md").read_text()
    assert "python run.py weights --verify" in readme and "ibrahimhamamci/CT-RATE" in readme
    assert (SHIPPED_MANIFEST.parent / ".gitkeep").exists()


def test_the_manifest_and_the_shipped_pipelines_agree() -> None:
    """Every file a step of pipelines/*.yaml reads has a manifest row (the file, or the model folder it
    lies in) with a source and a licence, whose ``steps`` are exactly the steps that read it; every
    manifest row is read by some shipped pipeline."""
    settings = load_settings(REPO / "config" / "default.yaml")
    assert manifest_path(settings) == SHIPPED_MANIFEST
    manifest = load_manifest(SHIPPED_MANIFEST)
    readers: dict[str, set[str]] = {entry.path: set() for entry in manifest.files}
    pipelines = sorted((REPO / "pipelines").glob("*.yaml"))
    assert pipelines
    for pipeline in pipelines:
        used = weight_files_of(pipeline, REPO)
        unlisted = [str(p) for p in used if covering_row(p, manifest, settings.weights) is None]
        assert not unlisted, f"{pipeline.name}: add these to weights/manifest.yaml: {unlisted}"
        for path, steps in used.items():
            entry = covering_row(path, manifest, settings.weights)
            assert entry is not None
            readers[entry.path] |= {s.split(" (")[1].rstrip(")") for s in steps}
    unused = [path for path, uses in readers.items() if not uses]
    assert not unused, f"no shipped pipeline reads these manifest rows: {unused}"
    for entry in manifest.files:
        assert entry.source and entry.licence, entry.path
        assert sorted(entry.steps) == sorted(readers[entry.path]), entry.path
    # the configured default pipeline: one row per file it reads, every one from the manifest
    rows = weight_rows(settings)
    assert rows and all(r.in_manifest and r.used_by and r.source and r.licence for r in rows)
    assert {r.entry for r in rows} == set(readers)  # chest-ct.yaml reads every row


def test_a_model_folder_row_names_the_file_missing_inside_it(project: Project) -> None:
    project.write_pipeline(
        [
            *DEFAULT_STEPS[:2],
            {"id": "slices", "uses": "render.key_slices"},
            {"id": "caption", "uses": "caption.image_to_text", "with": {"model": MODEL}},
        ]
    )
    folder = project.root / MODEL
    folder.mkdir(parents=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        )
    )
    (folder / "model-00001-of-00002.safetensors").write_bytes(b"shard")
    settings = load_settings(project.config)
    rows = {r.shown: r for r in weight_rows(settings)}
    assert list(rows)[0] == f"{MODEL}/"  # the folder first, then what is missing inside it
    assert rows[f"{MODEL}/"].used_by == ["caption (caption.image_to_text)"]
    assert rows[f"{MODEL}/"].status == "present-unverified"
    assert "Salesforce/blip2-opt-2.7b" in rows[f"{MODEL}/"].source
    missing = {shown: r for shown, r in rows.items() if r.status == "missing"}
    assert set(missing) == {f"{MODEL}/config.json", f"{MODEL}/model-00002-of-00002.safetensors"}
    assert all(
        r.in_manifest and r.source.startswith(f"part of {MODEL}/: Hugging Face") for r in missing.values()
    )
    assert all(r.licence == rows[f"{MODEL}/"].licence for r in missing.values())
    assert exit_code(list(rows.values())) == 1


def test_steps_lists_every_parameter_with_its_default_or_required(project: Project) -> None:
    proc = project.run("steps")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Undefined" not in out
    assert "    with.model = (required)  model folder written by save_pretrained" in out  # caption step
    assert "    with.windows = ['lung', 'mediastinal']" in out  # a default built by a factory


def test_an_unreadable_weight_index_is_a_row_of_the_table(
    project: Project, capsys: pytest.CaptureFixture[str]
) -> None:
    """``{not json`` in a model folder's index: the table is printed, that file's row says
    UNREADABLE and why, and the exit code is 1 (not "weights error", exit 2)."""
    project.write_pipeline(
        [
            *DEFAULT_STEPS[:2],
            {"id": "slices", "uses": "render.key_slices"},
            {"id": "caption", "uses": "caption.image_to_text", "optional": True, "with": {"model": MODEL}},
        ]
    )
    folder = project.root / MODEL
    folder.mkdir(parents=True)
    (folder / "model.safetensors.index.json").write_text("{not json")
    assert main(["weights", "--config", str(project.config)]) == 1
    out = capsys.readouterr().out
    index = _row(out, f"{MODEL}/model.safetensors.index.json")
    assert " UNREADABLE" in index.splitlines()[0] and "caption (caption.image_to_text)" in index
    assert "    problem: " in index and "weight index cannot be read" in index
    assert "part of weights/caption/blip2-opt-2.7b/: Hugging Face" in index
    assert "1 file(s) cannot be read: their steps fail on every study" in out


@pytest.mark.parametrize(
    ("setting", "effect"),
    [
        ("skip", "their steps will be recorded as skipped and studies come out Partial"),
        ("fail", "every study will fail at the first step that reads one"),
    ],
)
def test_what_missing_files_do_follows_on_missing_weights(
    project: Project, capsys: pytest.CaptureFixture[str], setting: str, effect: str
) -> None:
    project.pipeline.write_text(
        yaml.safe_dump({"name": "t", "version": 1, "on_missing_weights": setting, "steps": DEFAULT_STEPS})
    )
    assert main(["weights", "--config", str(project.config)]) == 1
    out = capsys.readouterr().out
    assert (
        f"3 file(s) the pipeline uses are missing: {effect} (the pipeline sets on_missing_weights: {setting})"
        in out
    )
