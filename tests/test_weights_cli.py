"""`python run.py weights [--verify]` and the shipped weights manifest."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from processor.config import load_settings
from processor.weights import SHIPPED_MANIFEST, exit_code, load_manifest, weight_rows
from tests.conftest import FIXTURES, Project

FIX = FIXTURES / "ct_clip"
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
    assert "(step not built yet)" in _row(out, "weights/fusion/lightgbm.txt")
    assert "weights/caption/ " in out and "weights/head/supervised_head.pt " in out
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
    for folder in ("caption/", "anomaly/", "fusion/", "head/"):
        assert any(p.startswith(folder) and f.status == "planned" for p, f in files.items()), folder
    assert all(f.sha256 is None for f in manifest.files)  # none is published; none is invented
    text = SHIPPED_MANIFEST.read_text()
    assert text.count("# not published") >= 4
    readme = (SHIPPED_MANIFEST.parent / "README.md").read_text()
    assert "python run.py weights --verify" in readme and "ibrahimhamamci/CT-RATE" in readme
    assert (SHIPPED_MANIFEST.parent / ".gitkeep").exists()
    assert Path(SHIPPED_MANIFEST).parent.name == "weights"


def test_steps_lists_every_parameter_with_its_default_or_required(project: Project) -> None:
    proc = project.run("steps")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Undefined" not in out
    assert "    with.model = (required)  model folder written by save_pretrained" in out  # caption step
    assert "    with.windows = ['lung', 'mediastinal']" in out  # a default built by a factory
