"""`python run.py weights [--verify]` and the shipped weights manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import yaml

from processor.config import load_settings
from processor.weights import (
    SHIPPED_MANIFEST,
    covering_row,
    exit_code,
    load_manifest,
    manifest_path,
    pipeline_weight_files,
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
    [line] = [line for line in stdout.splitlines() if line.startswith(path + " ")]
    return line


def test_weights_lists_present_and_missing(project: Project) -> None:
    project.write_pipeline(DEFAULT_STEPS)
    (project.root / "weights" / "ct_clip").mkdir(parents=True)
    shutil.copy(FIX / "vocab.txt", project.root / "weights" / "ct_clip" / "vocab.txt")
    proc = project.run("weights")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # files the pipeline uses are missing
    out = proc.stdout
    vocab = _row(out, "weights/ct_clip/vocab.txt")
    assert "present-unverified" in vocab and "clip (ctclip.zero_shot), lipro (ctclip.classify)" in vocab
    assert "microsoft/BiomedVLP-CXR-BERT-specialized" in vocab
    fine = _row(out, "weights/ct_clip/CT_VocabFine_v2.pt")
    assert " missing " in fine and "clip (ctclip.zero_shot)" in fine and "ibrahimhamamci/CT-RATE" in fine
    lipro = _row(out, "weights/ct_clip/CT_LiPro_v2.pt")
    assert " missing " in lipro and "lipro (ctclip.classify)" in lipro
    base = _row(out, "weights/ct_clip/CT-CLIP_v2.pt")
    assert " missing " in base and "(ctclip" not in base  # listed, but not used by this pipeline
    fusion = _row(out, "weights/fusion/model.txt")  # listed, with where it comes from; unused here
    assert " missing " in fusion and "fit-fusion" in fusion and "(step not built yet)" not in out
    assert "weights/caption/blip2-opt-2.7b/ " in out and "weights/head/head.pt " in out
    assert "2 file(s) the pipeline uses are missing" in out
    assert "non-commercial" in out


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
    (folder / "CT_LiPro_v2.pt").write_bytes(b"an interrupted download")
    vocab_sha = hashlib.sha256((FIX / "vocab.txt").read_bytes()).hexdigest()
    manifest = {
        "version": 1,
        "files": [
            {
                "path": "ct_clip/vocab.txt",
                "steps": ["ctclip.zero_shot"],
                "sha256": vocab_sha,
                "licence": "MIT",
                "source": "CXR-BERT",
            },
            {
                "path": "ct_clip/CT_LiPro_v2.pt",
                "steps": ["ctclip.classify"],
                "sha256": "0" * 64,
                "licence": "CC-BY-NC-SA-4.0 (non-commercial)",
                "source": "CT-RATE",
            },
        ],
    }
    (project.root / "weights" / "manifest.yaml").write_text(yaml.safe_dump(manifest))

    proc = project.run("weights", "--verify")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert str(project.root / "weights" / "manifest.yaml") in out
    assert " verified " in _row(out, "weights/ct_clip/vocab.txt")
    assert " MISMATCH " in _row(out, "weights/ct_clip/CT_LiPro_v2.pt")
    assert "MISMATCH weights/ct_clip/CT_LiPro_v2.pt" in out
    small_row = _row(out, "weights/ct_clip/small_ctclip.pt")
    assert "present-unverified" in small_row and "not in the manifest" in small_row
    small_sha = hashlib.sha256((FIX / "small_ctclip.pt").read_bytes()).hexdigest()
    assert f"{small_sha}  weights/ct_clip/small_ctclip.pt" in out  # printed so a site can pin it

    # in-process: without --verify nothing is hashed; once the bad file is gone all is well
    settings = load_settings(project.config)
    rows = {r.shown: r for r in weight_rows(settings)}
    assert rows["weights/ct_clip/CT_LiPro_v2.pt"].status == "present-unverified"
    assert rows["weights/ct_clip/CT_LiPro_v2.pt"].actual_sha256 is None
    (folder / "CT_LiPro_v2.pt").unlink()
    rows_verified = weight_rows(settings, verify=True)
    assert {r.shown: r.status for r in rows_verified}["weights/ct_clip/CT_LiPro_v2.pt"] == "missing"
    assert exit_code(rows_verified) == 0  # missing, but this pipeline does not use it


def test_shipped_manifest() -> None:
    manifest = load_manifest(SHIPPED_MANIFEST)
    files = {f.path: f for f in manifest.files}
    for name in ("CT-CLIP_v2.pt", "CT_VocabFine_v2.pt", "CT_LiPro_v2.pt"):
        entry = files[f"ct_clip/{name}"]
        assert entry.licence == "CC-BY-NC-SA-4.0 (non-commercial)"
        assert "ibrahimhamamci/CT-RATE" in entry.source
    assert "microsoft/BiomedVLP-CXR-BERT-specialized" in files["ct_clip/vocab.txt"].source
    assert {"ctclip.zero_shot", "ctclip.classify"} <= set(files["ct_clip/vocab.txt"].steps)
    assert not [p for p, f in files.items() if f.status == "planned"]  # every step is built
    assert "Salesforce/blip2-opt-2.7b" in files["caption/blip2-opt-2.7b/"].source
    for path in ("head/head.pt", "anomaly/card.json", "fusion/model.txt"):
        assert "fit-" in files[path].source and files[path].licence.startswith("yours"), path
    assert all(f.sha256 is None for f in manifest.files)  # none is published; none is invented
    text = SHIPPED_MANIFEST.read_text()
    assert text.count("# not published") >= 4
    readme = (SHIPPED_MANIFEST.parent / "README.md").read_text()
    assert "python run.py weights --verify" in readme and "ibrahimhamamci/CT-RATE" in readme
    assert (SHIPPED_MANIFEST.parent / ".gitkeep").exists()
    assert Path(SHIPPED_MANIFEST).parent.name == "weights"


def test_the_manifest_lists_every_file_the_default_pipeline_reads() -> None:
    """pipelines/chest-ct.yaml under config/default.yaml: each step's weight_files() has a manifest row
    (the file, or the model folder it lies in), and every row is read by a step or marked optional."""
    settings = load_settings(REPO / "config" / "default.yaml")
    assert manifest_path(settings) == SHIPPED_MANIFEST
    manifest = load_manifest(SHIPPED_MANIFEST)
    used = pipeline_weight_files(settings)
    assert {s.split(" ")[0] for steps in used.values() for s in steps} >= {"clip", "lipro", "caption"}
    unlisted = [str(p) for p in used if covering_row(p, manifest, settings.weights) is None]
    assert not unlisted, f"add these to weights/manifest.yaml: {unlisted}"
    rows = {r.shown: r for r in weight_rows(settings)}
    assert all(r.in_manifest for r in rows.values())
    unused = [r.shown for r in rows.values() if not r.used_by]
    optional = [f"weights/{f.path}" for f in manifest.files if f.status == "optional"]
    assert unused == optional == ["weights/ct_clip/CT-CLIP_v2.pt"]  # the alternative checkpoint
    for entry in manifest.files:
        assert entry.source and entry.licence and entry.steps, entry.path


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
    assert rows[f"{MODEL}/"].used_by == ["caption (caption.image_to_text)"]
    assert rows[f"{MODEL}/"].status == "present-unverified"
    missing = {shown: r for shown, r in rows.items() if r.status == "missing" and r.used_by}
    assert set(missing) == {f"{MODEL}/config.json", f"{MODEL}/model-00002-of-00002.safetensors"}
    assert all(r.in_manifest and r.source == f"part of {MODEL}/" for r in missing.values())
    assert exit_code(list(rows.values())) == 1


def test_steps_lists_every_parameter_with_its_default_or_required(project: Project) -> None:
    proc = project.run("steps")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Undefined" not in out
    assert "    with.model = (required)  model folder written by save_pretrained" in out  # caption step
    assert "    with.windows = ['lung', 'mediastinal']" in out  # a default built by a factory
