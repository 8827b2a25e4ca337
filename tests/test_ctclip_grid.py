"""CT-CLIP input on irregular slice grids and with unknown spacing.

Truth from outside: a phantom that is linear along the slice axis is reproduced exactly by linear
interpolation, so a study with missing slices, resampled on its true positions, must give the same
model input — and the same probabilities — as the complete study on the official regular path.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from processor.dicom.grid import SliceGrid
from processor.models.ctclip import CTRATE_FINDINGS, load_ctclip
from processor.models.ctclip_preprocess import (
    ctrate_slice_positions,
    ctrate_xyz_from_dicom,
    planned_shape_zxy,
    preprocess_volume,
)
from tests.dicomgen import make_series, run_steps, write_zip
from tests.test_ctclip_steps import FIX, SMALL, _install_small_weights

STEP, PIXEL = 2.0, 1.5
DEPTH, SIDE = 24, 32
MISSING = (9, 10, 11)  # a 8 mm gap


def _linear_in_z(depth: int = DEPTH) -> np.ndarray:
    """HU (z, y, x) rising 25 HU per slice (12.5 HU/mm) on top of an in-plane pattern; inside ±1000."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    plane = 150.0 * (((y - 16) ** 2 + (x - 14) ** 2) < 80) + 3.0 * x
    return (-900.0 + 25.0 * np.arange(depth)[:, None, None] + plane[None]).astype(np.float32)


def _affine(row: tuple, col: tuple, step: float) -> np.ndarray:
    affine = np.eye(4)
    row_v, col_v = np.asarray(row, float), np.asarray(col, float)
    affine[:3, 0], affine[:3, 1], affine[:3, 2] = row_v * PIXEL, col_v * PIXEL, np.cross(row_v, col_v) * step
    return affine


AFFINES = {
    "axial, head-first": _affine((1, 0, 0), (0, 1, 0), STEP),
    "axial, normal to the feet": _affine((1, 0, 0), (0, -1, 0), STEP),
    "coronal": _affine((1, 0, 0), (0, 0, -1), STEP),
}


@pytest.mark.parametrize("name", list(AFFINES))
def test_missing_slices_resampled_on_true_positions_give_the_complete_studys_input(name: str) -> None:
    affine = AFFINES[name]
    full = _linear_in_z()
    positions = np.arange(DEPTH) * STEP
    keep = [k for k in range(DEPTH) if k not in MISSING]
    spacing = (STEP, PIXEL, PIXEL)
    xyz, spacing_xyz = ctrate_xyz_from_dicom(full, spacing, affine)
    expected = preprocess_volume(xyz, spacing_xyz, (32, 32, 24)).numpy()  # the official regular path
    holed = full[keep]
    grid = SliceGrid.of(positions[keep])
    assert grid.irregular and grid.gaps == 1 and grid.median_mm == STEP
    xyz, spacing_xyz = ctrate_xyz_from_dicom(holed, spacing, affine)
    where = ctrate_slice_positions(positions[keep], affine)
    got = preprocess_volume(xyz, spacing_xyz, (32, 32, 24), positions=where).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    # a uniform median step squeezes the volume: what the old path gave is far off
    squeezed = preprocess_volume(xyz, spacing_xyz, (32, 32, 24)).numpy()
    assert np.abs(squeezed - expected).max() > 0.02


def test_uneven_steps_interpolate_at_the_true_positions() -> None:
    positions = np.array([0.0, 2.0, 4.5, 6.0, 8.0, 10.0, 12.5, 14.0, 16.0, 18.0])
    hu = (-500.0 + 10.0 * positions[:, None, None] + np.zeros((1, 4, 4))).astype(np.float32)  # 10 HU/mm
    grid = SliceGrid.of(positions)
    assert grid.uneven and grid.gaps == 0 and grid.irregular
    xyz, spacing_xyz = ctrate_xyz_from_dicom(hu, (2.0, 1.5, 1.5), np.diag([1.5, 1.5, 2.0, 1.0]))
    size_z = planned_shape_zxy(xyz.shape, spacing_xyz, (2, positions))[0]
    assert size_z == int((18.0 + 2.0) / 1.5)
    out = preprocess_volume(xyz, spacing_xyz, (8, 8, size_z), positions=(2, positions)).numpy()
    centres = -1.0 + (np.arange(size_z) + 0.5) * (20.0 / size_z)  # first − step/2 + (o + ½)·extent/size
    truth = (-500.0 + 10.0 * np.clip(centres, 0.0, 18.0)) / 1000.0
    np.testing.assert_allclose(out[0, :, 4, 4], truth, rtol=0, atol=1e-6)


def test_a_regular_grid_is_not_irregular() -> None:
    jitter = np.arange(30) * 1.25 + np.tile([0.0, 0.004], 15)  # rounding in the headers
    assert not SliceGrid.of(jitter).irregular
    assert SliceGrid.of(jitter).as_dict()["regular"] is True


def test_unknown_spacing_is_refused_by_the_preprocessing() -> None:
    with pytest.raises(ValueError, match="not a positive number"):
        preprocess_volume(np.zeros((8, 8, 8), np.int16), (float("nan"), float("nan"), 2.0), (8, 8, 8))


def _series(keep: list[int]) -> list:
    stored = np.rint(_linear_in_z() + 1024.0).astype(np.int16)
    datasets = make_series(DEPTH, stored=stored, pixel_spacing=PIXEL, spacing=STEP, intercept=-1024.0)
    return [datasets[k] for k in keep]


def _pipeline(optional: bool = False) -> list[dict]:
    return [
        {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
        {"id": "volume", "uses": "ct.volume"},
        {
            "id": "clip",
            "uses": "ctclip.zero_shot",
            "optional": optional,
            "with": {"checkpoint": "weights/ct_clip/small_ctclip.pt", **SMALL},
        },
        {
            "id": "lipro",
            "uses": "ctclip.classify",
            "optional": optional,
            "with": {"checkpoint": "weights/ct_clip/small_lipro.pt", **SMALL},
        },
    ]


def test_a_study_with_missing_slices_reaches_the_model_on_its_true_grid(tmp_path: Path) -> None:
    _install_small_weights(tmp_path)
    keep = [k for k in range(DEPTH) if k not in MISSING]
    arrival = write_zip(tmp_path / "holed.zip", _series(keep))
    ctx, outcome = run_steps(arrival, _pipeline(), tmp_path)
    assert outcome.status == "Success", outcome.error
    assert ctx.values["volume"].gap_after == [8]
    clip, lipro = ctx.result["models"]["clip"], ctx.result["models"]["lipro"]
    for entry in (clip, lipro):
        [note] = entry["warnings"]
        assert note.startswith("resampled from irregular slice positions: 1 gap(s)"), note
        assert entry["preprocessing"]["slice_positions"].startswith("true positions")
        assert entry["preprocessing"]["slice_grid"]["gaps"] == 1
        assert entry["preprocessing"]["resampled_shape_zxy"][0] == int(DEPTH * STEP / 1.5)
    # the model sees what the complete study gives: probabilities of the full, regular volume
    full = _linear_in_z()
    xyz, spacing_xyz = ctrate_xyz_from_dicom(full, (STEP, PIXEL, PIXEL), np.diag([PIXEL, PIXEL, STEP, 1.0]))
    tensor = preprocess_volume(xyz, spacing_xyz, (32, 32, 24))
    model = load_ctclip(FIX / "small_ctclip.pt", FIX / "vocab.txt", FIX / "small_config.json")
    expected = model.zero_shot(tensor)[0].numpy()
    got = np.array([clip["probabilities"][f] for f in CTRATE_FINDINGS])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    json.loads(json.dumps(ctx.result, allow_nan=False))
    # the complete study: official path, no note
    _install_small_weights(tmp_path / "full")
    ctx, outcome = run_steps(
        write_zip(tmp_path / "full.zip", _series(list(range(DEPTH)))), _pipeline(), tmp_path / "full"
    )
    assert outcome.status == "Success", outcome.error
    assert ctx.result["models"]["clip"]["warnings"] == []
    assert (
        ctx.result["models"]["clip"]["preprocessing"]["slice_positions"]
        == "uniform median step (regular grid)"
    )


@pytest.mark.parametrize("optional", [False, True])
def test_unknown_pixel_spacing_withholds_the_ctclip_steps_with_the_reason(
    tmp_path: Path, optional: bool, caplog: pytest.LogCaptureFixture
) -> None:
    _install_small_weights(tmp_path)
    datasets = _series(list(range(DEPTH)))
    for ds in datasets:
        del ds.PixelSpacing  # and no ImagerPixelSpacing: the in-plane spacing is unknown
    with caplog.at_level(logging.INFO):
        ctx, outcome = run_steps(write_zip(tmp_path / "s.zip", datasets), _pipeline(optional), tmp_path)
    assert ctx.values["volume"].spacing_unknown
    records = {r.step_id: r for r in outcome.steps}
    assert records["volume"].status == "done"
    clip = records["clip"]
    assert clip.status == "skipped" and clip.error is None and clip.reason is not None, clip
    assert clip.reason.startswith("pixel spacing unknown: PixelSpacing (0028,0030)"), clip.reason
    assert "a guessed spacing would give wrong numbers" in clip.reason
    assert "models" not in ctx.result and "ctclip_latent" not in ctx.values
    assert "ctclip.licence" not in caplog.text  # no model was loaded for a study it cannot serve
    # the CT-CLIP numbers are withheld with the reason, the rest of the study stands, optional or not
    assert outcome.status == "Partial" and records["lipro"].status == "skipped"
    assert outcome.error is None
