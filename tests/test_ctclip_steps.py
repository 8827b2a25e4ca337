"""The CT-CLIP steps end to end: generated DICOM → `process` → JSON, with the small reference model.

The probabilities in the JSON must equal the model's own ``zero_shot`` / ``classify`` on the
same volume, computed here directly from the stored pixels and the series geometry.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np

from processor.models.ctclip import (
    CTRATE_FINDINGS,
    ctrate_xyz_from_dicom,
    load_ctclip,
    preprocess_volume,
)
from processor.pipeline.spec import PipelineSpec, compile_steps
from processor.pipeline.step import StepEnv
from processor.steps import default_registry
from tests.conftest import FIXTURES, Project
from tests.dicomgen import make_series, run_steps, write_zip

FIX = FIXTURES / "ct_clip"
SMALL = {
    "vocab": "weights/ct_clip/vocab.txt",
    "config": "weights/ct_clip/small_config.json",
    "target_xyz": [32, 32, 24],
}
PIXEL_SPACING, SLICE_STEP, INTERCEPT = 1.5, 2.0, -1024.0


def _install_small_weights(root: Path) -> None:
    target = root / "weights" / "ct_clip"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("small_ctclip.pt", "small_lipro.pt", "small_config.json", "vocab.txt"):
        shutil.copy(FIX / name, target / name)


def _pipeline(zero_shot: dict, classify: dict) -> list[dict]:
    return [
        {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
        {"id": "volume", "uses": "ct.volume"},
        {"id": "clip", "uses": "ctclip.zero_shot", "with": zero_shot},
        {"id": "lipro", "uses": "ctclip.classify", "with": classify},
    ]


def _stored(seed: int) -> np.ndarray:
    """24 slices of 32x32 stored values: a body-like blob with air around it, plus noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:24, 0:32, 0:32]
    body = ((y - 16) ** 2 + (x - 16) ** 2) < (10 + z % 5) ** 2
    hu = np.where(body, rng.normal(40, 200, body.shape), -1000 + rng.normal(0, 20, body.shape))
    return np.clip(hu - INTERCEPT, 0, 4000).astype(np.int16)


def _expected(stored: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model outputs computed directly: HU volume + geometry → mapping → preprocessing → model."""
    hu_zyx = stored.astype(np.float32) + np.float32(INTERCEPT)
    affine = np.diag([PIXEL_SPACING, PIXEL_SPACING, SLICE_STEP, 1.0])  # IOP 1\0\0\0\1\0, slices ascending
    hu_xyz, spacing_xyz = ctrate_xyz_from_dicom(hu_zyx, (SLICE_STEP, PIXEL_SPACING, PIXEL_SPACING), affine)
    tensor = preprocess_volume(hu_xyz, spacing_xyz, (32, 32, 24))
    clip = load_ctclip(FIX / "small_ctclip.pt", FIX / "vocab.txt", FIX / "small_config.json")
    lipro = load_ctclip(FIX / "small_lipro.pt", FIX / "vocab.txt", FIX / "small_config.json")
    return (
        clip.zero_shot(tensor)[0].numpy(),
        lipro.classify(tensor)[0].numpy(),
        clip.encode_image(tensor)[0].numpy(),
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_zero_shot_and_classify_end_to_end_two_studies(tmp_path: Path) -> None:
    project = Project(
        tmp_path,
        _pipeline(
            {"checkpoint": "weights/ct_clip/small_ctclip.pt", "save_latent": True, "batch_size": 5, **SMALL},
            {"checkpoint": "weights/ct_clip/small_lipro.pt", **SMALL},
        ),
    )
    _install_small_weights(project.root)
    stored = {seed: _stored(seed) for seed in (1, 2)}
    series = {
        seed: make_series(
            24,
            stored=stored[seed],
            pixel_spacing=PIXEL_SPACING,
            spacing=SLICE_STEP,
            intercept=INTERCEPT,
            description=f"S{seed}",
        )
        for seed in stored
    }
    path = write_zip(tmp_path / "two.zip", series[1] + series[2], shuffle_seed=3)
    proc = project.run("process", str(path))
    assert proc.returncode == 0, proc.stderr
    # one load per checkpoint for both studies: the cache keeps them resident
    assert proc.stderr.count("models.loaded") == 2, proc.stderr
    assert proc.stderr.count("ctclip.licence") == 2 and "non-commercial" in proc.stderr
    # both steps share one preprocessed input per study (same target size)
    assert proc.stderr.count("ctclip.preprocessed step=clip") == 2, proc.stderr
    assert "ctclip.preprocessed step=lipro" not in proc.stderr
    docs = {json.loads(p.read_text())["study_uid"]: (p, json.loads(p.read_text())) for p in project.results()}
    assert len(docs) == 2
    for seed, datasets in series.items():
        json_path, doc = docs[datasets[0].StudyInstanceUID]
        assert doc["processing_status"] == "Success", doc["error"]
        assert [s["status"] for s in doc["steps"]] == ["done"] * 4
        clip, lipro = doc["models"]["clip"], doc["models"]["lipro"]
        assert clip["kind"] == "ctclip_zero_shot" and lipro["kind"] == "ctclip_lipro"
        assert clip["model"] == "small_ctclip.pt" and lipro["model"] == "small_lipro.pt"
        assert clip["sha256"] == _sha256(FIX / "small_ctclip.pt")
        assert lipro["sha256"] == _sha256(FIX / "small_lipro.pt")
        assert "non-commercial" in clip["licence"] and "CC-BY-NC-SA" in lipro["licence"]
        assert list(clip["probabilities"]) == list(CTRATE_FINDINGS) == list(lipro["probabilities"])
        pre = clip["preprocessing"]
        assert pre["target_xyz"] == [32, 32, 24] and pre["model_input_zxy"] == [24, 32, 32]
        assert pre["target_spacing_zxy_mm"] == [1.5, 0.75, 0.75] and pre["hu_clip"] == [-1000.0, 1000.0]
        assert pre["orientation"]["axes"]["X"] == {"from": "column", "flipped": False}
        assert pre["orientation"]["axes"]["Z"] == {"from": "slice", "flipped": False}
        # exactness: the JSON holds what the model computes on the same volume
        zero_shot, classify, latent = _expected(stored[seed])
        got_zs = np.array([clip["probabilities"][f] for f in CTRATE_FINDINGS])
        got_cl = np.array([lipro["probabilities"][f] for f in CTRATE_FINDINGS])
        np.testing.assert_allclose(got_zs, zero_shot, rtol=0, atol=1e-6)
        np.testing.assert_allclose(got_cl, classify, rtol=0, atol=1e-6)
        saved = np.load(json_path.parent / clip["latent_file"])
        assert saved.shape == (16,) and saved.dtype == np.float32
        np.testing.assert_allclose(saved, latent, rtol=0, atol=1e-6)
        assert lipro["latent_file"] is None


def test_missing_weights_make_steps_skipped_and_study_partial(tmp_path: Path) -> None:
    project = Project(
        tmp_path,
        _pipeline(
            {"checkpoint": "weights/ct_clip/small_ctclip.pt", **SMALL},
            {"checkpoint": "weights/ct_clip/CT_LiPro_v2.pt", **SMALL},
        ),
    )
    _install_small_weights(project.root)
    (project.root / "weights" / "ct_clip" / "small_ctclip.pt").unlink()
    path = write_zip(
        tmp_path / "s.zip",
        make_series(
            24, stored=_stored(3), pixel_spacing=PIXEL_SPACING, spacing=SLICE_STEP, intercept=INTERCEPT
        ),
    )
    proc = project.run("process", str(path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(project.results()[0].read_text())
    assert doc["processing_status"] == "Partial"
    steps = {s["step_id"]: s for s in doc["steps"]}
    weights = project.root / "weights" / "ct_clip"
    assert steps["volume"]["status"] == "done"
    assert steps["clip"]["status"] == "skipped"
    assert steps["clip"]["missing"] == [str(weights / "small_ctclip.pt")]
    assert steps["lipro"]["status"] == "skipped"
    assert steps["lipro"]["missing"] == [str(weights / "CT_LiPro_v2.pt")]
    assert "models" not in doc
    assert "models.loaded" not in proc.stderr


def _compile(steps: list[dict], root: Path) -> list[str]:
    spec = PipelineSpec.model_validate({"name": "t", "version": 1, "steps": steps})
    return compile_steps(spec, default_registry(), StepEnv(root, "cpu"))[1]


def test_compile_time_checks(tmp_path: Path) -> None:
    _install_small_weights(tmp_path)
    base = [{"id": "series", "uses": "dicom.select_series"}, {"id": "volume", "uses": "ct.volume"}]
    ok = _compile(
        base
        + [
            {
                "id": "clip",
                "uses": "ctclip.zero_shot",
                "with": {
                    "checkpoint": "weights/ct_clip/small_ctclip.pt",
                    **SMALL,
                    "findings": [
                        "Emphysema",
                        {"name": "Nodule", "present": "A nodule.", "absent": "No nodule."},
                    ],
                },
            }
        ],
        tmp_path,
    )
    assert ok == []
    problems = _compile(
        base
        + [
            {"id": "a", "uses": "ctclip.zero_shot", "with": {**SMALL, "target_xyz": [64, 64, 24]}},
            {"id": "b", "uses": "ctclip.zero_shot", "with": {"findings": ["Emphysema", "Emphysema"]}},
            {"id": "c", "uses": "ctclip.classify", "with": {"target_xyz": [480, 480, 245]}},
            {"id": "d", "uses": "ctclip.zero_shot", "with": {"batch_size": 0, "save_latents": True}},
        ],
        tmp_path,
    )
    text = "\n".join(problems)
    assert "(a): with.target_xyz (value: [64, 64, 24]): this model takes 32x32 images" in text
    assert "(b): with.findings (value: ['Emphysema']): listed twice" in text
    assert (
        "(c): with.target_xyz (value: [480, 480, 245]): Z must be a multiple of the temporal patch size 10"
        in text
    )
    assert "steps[5].with.batch_size" in text and "steps[5].with.save_latents" in text


def test_step_ids_and_weight_files(tmp_path: Path) -> None:
    from processor.pipeline.spec import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(
        json.dumps(
            {
                "name": "t",
                "version": 1,
                "steps": [
                    {"id": "series", "uses": "dicom.select_series"},
                    {"id": "volume", "uses": "ct.volume"},
                    {"id": "clip", "uses": "ctclip.zero_shot"},
                    {"id": "lipro", "uses": "ctclip.classify", "with": {"config": "cfg.json"}},
                ],
            }
        )
    )
    pipeline = load_pipeline(path, default_registry(), StepEnv(tmp_path, "cpu"))
    clip, lipro = pipeline.steps[2].step, pipeline.steps[3].step
    assert (clip.step_id, lipro.step_id) == ("clip", "lipro")
    assert clip.weight_files() == [
        tmp_path / "weights/ct_clip/CT_VocabFine_v2.pt",
        tmp_path / "weights/ct_clip/vocab.txt",
    ]
    assert lipro.weight_files() == [
        tmp_path / "weights/ct_clip/CT_LiPro_v2.pt",
        tmp_path / "weights/ct_clip/vocab.txt",
        tmp_path / "cfg.json",
    ]


def test_bad_model_config_is_a_compile_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    problems = _compile(
        [
            {"id": "series", "uses": "dicom.select_series"},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "clip", "uses": "ctclip.zero_shot", "with": {"config": "bad.json"}},
        ],
        tmp_path,
    )
    assert len(problems) == 1 and "with.config" in problems[0] and "cannot be read" in problems[0]


def test_the_shared_input_is_released_by_the_last_ctclip_step(tmp_path: Path) -> None:
    _install_small_weights(tmp_path)
    arrival = write_zip(
        tmp_path / "s.zip",
        make_series(
            24, stored=_stored(1), pixel_spacing=PIXEL_SPACING, spacing=SLICE_STEP, intercept=INTERCEPT
        ),
    )
    both = _pipeline(
        {"checkpoint": "weights/ct_clip/small_ctclip.pt", **SMALL},
        {"checkpoint": "weights/ct_clip/small_lipro.pt", **SMALL},
    )
    ctx, outcome = run_steps(arrival, both, tmp_path)
    assert outcome.status == "Success", outcome.error
    assert ctx.values["ctclip_inputs"] == {}  # taken out by the classify step, not held for the study
    other_size = both[:3] + [{**both[3], "with": {**both[3]["with"], "target_xyz": [32, 32, 32]}}]
    compiled, problems = compile_steps(
        PipelineSpec.model_validate({"name": "t", "version": 1, "steps": other_size}),
        default_registry(),
        StepEnv(root=tmp_path),
    )
    assert not problems and [c.step.shares_input for c in compiled[2:]] == [False, False]
    compiled, _ = compile_steps(
        PipelineSpec.model_validate({"name": "t", "version": 1, "steps": both}),
        default_registry(),
        StepEnv(root=tmp_path),
    )
    assert [c.step.shares_input for c in compiled[2:]] == [True, False]
