"""quantify.lungs on tight fields of view, irregular slice grids and unknown pixel spacing.

Issue 13: on cropped chest CTs the air outside the patient (lifted to about −930 HU by the table
and partial volume) was counted as lung. The phantoms here are built with known lung voxels —
the truth comes from their construction, not from what the code produced before.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import ndimage

from processor.dicom.body import body_spans
from processor.dicom.lungs import LungSettings, lung_mask, lung_metrics, slab_thickness_mm
from tests import dicomgen

STEPS = [
    {"id": "series", "uses": "dicom.select_series"},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
]
SPACING = (5.0, 2.5, 2.5)  # z, row, column (mm)


def fov_phantom(
    shape: tuple[int, int, int] = (40, 128, 128),
    *,
    outside_hu: float = -930.0,
    body_half_width: float = 0.62,
    body_half_height: float = 0.40,
    table: str = "apart",
    noise: float = 20.0,
    seed: int = 3,
) -> tuple[np.ndarray, dict]:
    """A chest in HU (z, y, x) seen through a field of view of ``shape``; fractions are of the image size.

    Body (40 HU): an elliptic cylinder centred at 45 % of the height, ``body_half_width`` and
    ``body_half_height`` of the image wide and high — above 0.5 wide, the image's left and right
    edges cut it. Lungs (−850 HU, upper part of the left one −980 HU emphysema, a 40 HU vessel in
    each, enclosed by lung in every slice): ellipsoids inside the body (centred 48 % of its
    half-width off the midline, 35.5 % of it wide, a quarter of the image high), closed in z; with
    the default body (62 %) they reach past the image's left and right edges. Outside the body:
    ``outside_hu``. ``table``: "apart" (a 300 HU bar of 3 % of the height, 5 % below the body,
    across the whole width, with a hollow −950 HU core that does not reach the edges), "touching"
    (the bar right under the body), or "none". Gaussian noise ``noise`` HU on every voxel.
    """
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    cy, cz = 0.45 * ny, (nz - 1) / 2
    hu = np.full(shape, outside_hu, np.float32)
    body = ((y - cy) / (body_half_height * ny)) ** 2 + ((x - nx / 2) / (body_half_width * nx)) ** 2 <= 1
    hu[np.broadcast_to(body, shape)] = 40.0
    lungs = np.zeros(shape, bool)
    centres = (nx / 2 - 0.48 * body_half_width * nx, nx / 2 + 0.48 * body_half_width * nx)
    for cx in centres:
        lungs |= (
            ((z - cz) / (0.4 * nz)) ** 2
            + ((y - cy) / (0.25 * ny)) ** 2
            + ((x - cx) / (0.355 * body_half_width * nx)) ** 2
        ) <= 1
    hu[lungs] = -850.0
    hu[lungs & (x > nx / 2) & (y < cy - 0.08 * ny)] = -980.0
    deep = ndimage.binary_erosion(
        lungs,
        np.array([[[0, 0, 0]] * 3, [[0, 1, 0], [1, 1, 1], [0, 1, 0]], [[0, 0, 0]] * 3], bool),
        iterations=3,
    )
    for cx in (centres[0] + 0.08 * body_half_width * nx, centres[1] - 0.08 * body_half_width * nx):
        hu[((y - cy) ** 2 + (x - round(cx)) ** 2 <= 2) & deep] = 40.0
    table_core = np.zeros(shape, bool)
    if table != "none":
        top = int(round((cy + body_half_height * ny) + (0.05 * ny if table == "apart" else -1)))
        height = max(3, round(0.03 * ny))
        hu[:, top : top + height, :] = 300.0
        if table == "apart":
            table_core[:, top + 1 : top + height - 1, 4 : nx - 4] = True
            hu[table_core] = -950.0
    outside = ~np.broadcast_to(body, shape) & (hu == outside_hu)
    hu += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32)
    hu = np.rint(hu)
    return hu, {
        "lungs": lungs,
        "outside": outside,
        "table_core": table_core,
        "lung_voxels": int(lungs.sum()),
        "laa_voxels": int((hu[lungs] < -950).sum()),
        "mean_lung_density_hu": float(hu[lungs].mean(dtype=np.float64)),
    }


def true_ml(voxels: int, spacing: tuple[float, float, float] = SPACING) -> float:
    return voxels * math.prod(spacing) / 1000.0


def assert_truth(metrics, truth: dict, spacing: tuple[float, float, float] = SPACING) -> None:
    assert metrics.volume_ml == pytest.approx(true_ml(truth["lung_voxels"], spacing), rel=0.005)
    assert metrics.laa950_percent == pytest.approx(truth["laa_voxels"] / truth["lung_voxels"] * 100, abs=0.2)
    assert metrics.mean_lung_density_hu == pytest.approx(truth["mean_lung_density_hu"], abs=2)


@pytest.mark.parametrize("outside_hu", [-930.0, -960.0, -1000.0])
@pytest.mark.parametrize("table", ["apart", "touching", "none"])
def test_tight_fov_outside_air_is_never_lung_and_cut_lungs_are_kept_and_flagged(
    outside_hu: float, table: str
) -> None:
    hu, truth = fov_phantom(outside_hu=outside_hu, table=table)
    mask = lung_mask(hu)
    assert not (mask & truth["outside"]).any() and not (mask & truth["table_core"]).any()
    assert np.array_equal(mask, truth["lungs"])
    metrics = lung_metrics(hu, mask, SPACING)
    assert_truth(metrics, truth)
    assert metrics.flags == ["lungs_cut_in_plane"] and metrics.plausible is False
    assert "the left and right edges of the image" in metrics.notes[0]
    assert "cover only the part inside the image" in metrics.notes[0]


def test_the_issue_case_without_the_body_mask_would_count_the_outside_air() -> None:
    """The condition is real: outside air at −930 HU is as voluminous as the lungs and denser than
    the −970 HU room-air rule, so only the body mask tells them apart."""
    hu, truth = fov_phantom(outside_hu=-930.0)
    outside_air = truth["outside"] & (hu < -320)
    assert outside_air.sum() > 0.5 * truth["lung_voxels"] and hu[outside_air].mean() > -970
    metrics = lung_metrics(hu, lung_mask(hu), SPACING)
    assert metrics.volume_ml < 1.01 * true_ml(truth["lung_voxels"])


def test_whole_body_in_air_is_plausible_and_exact() -> None:
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.46)
    assert not truth["lungs"][:, :, [0, -1]].any()
    mask = lung_mask(hu)
    assert np.array_equal(mask, truth["lungs"])
    metrics = lung_metrics(hu, mask, SPACING)
    assert_truth(metrics, truth)
    assert metrics.plausible and metrics.flags == []
    assert metrics.summary.startswith("The lungs were found whole")


def test_fov_so_tight_that_there_is_no_outside_air() -> None:
    hu, truth = fov_phantom(body_half_width=0.8, body_half_height=0.8, table="none")
    assert not truth["outside"].any()
    mask = lung_mask(hu)
    assert np.array_equal(mask, truth["lungs"])
    metrics = lung_metrics(hu, mask, SPACING)
    assert_truth(metrics, truth)
    assert metrics.flags == ["lungs_cut_in_plane"]


def test_full_size_images_use_the_coarse_body_grid_with_the_same_result() -> None:
    hu, truth = fov_phantom((12, 512, 512), outside_hu=-930.0)
    mask = lung_mask(hu.astype(np.int16))
    assert not (mask & truth["outside"]).any()
    assert np.array_equal(mask, truth["lungs"])


def test_body_interior_excludes_the_table_and_covers_the_cut_body() -> None:
    hu, truth = fov_phantom(table="apart")
    left, right = body_spans(hu)
    mid, cy = hu.shape[0] // 2, int(0.45 * hu.shape[1])
    assert left[mid, cy] <= 0 and right[mid, cy] >= hu.shape[2] - 1  # the cut body spans the image
    table_row = int(round(0.45 * 128 + 0.40 * 128 + 0.05 * 128)) + 1
    assert left[mid, table_row] > right[mid, table_row]  # no interior at the table
    assert left[mid, 2] > right[mid, 2]  # nor in the outside air above the body


def test_lungs_cut_by_a_padded_reconstruction_circle_are_kept_and_flagged() -> None:
    """Pixels outside the circular reconstruction field are padding (−3024 HU): not data, an edge."""
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.6, table="none")
    nz, ny, nx = hu.shape
    yy, xx = np.ogrid[:ny, :nx]
    circle = (yy - 0.45 * ny) ** 2 + (xx - nx / 2) ** 2 <= (0.44 * nx) ** 2
    hu[:, ~circle] = -3024.0
    lungs = truth["lungs"] & circle
    assert lungs.sum() < truth["lung_voxels"]  # the circle cuts the lungs
    mask = lung_mask(hu)
    assert np.array_equal(mask, lungs)
    metrics = lung_metrics(hu, mask, SPACING)
    assert metrics.volume_ml == pytest.approx(true_ml(int(lungs.sum())), rel=0.005)
    assert metrics.mean_lung_density_hu == pytest.approx(float(hu[lungs].mean()), abs=2)
    assert metrics.flags == ["lungs_cut_in_plane"] and "reconstruction circle" in metrics.notes[0]


def test_the_mask_and_metrics_do_not_depend_on_the_slabs_the_volume_is_worked_in() -> None:
    """Issue 18 (memory): the air is labelled, the padding found and the holes filled a slab of
    slices at a time. Slabs of 1, 3 and 7 slices give what the whole volume in one piece gives (the
    method as it was: one 3-D labelling, one fill) — mask, flags, notes and metrics — on a tight
    field of view, a padded reconstruction circle, a noisy chest and lungs cut by the scan range."""
    from processor.dicom.lungs import segment_lungs

    tight, _ = fov_phantom(outside_hu=-930.0, table="touching")
    padded, _ = fov_phantom(outside_hu=-1000.0, body_half_width=0.6, table="none", noise=60.0)
    yy, xx = np.ogrid[:128, :128]
    padded[:, (yy - 0.45 * 128) ** 2 + (xx - 64) ** 2 > (0.44 * 128) ** 2] = -3024.0
    chest, _ = dicomgen.chest_phantom((40, 96, 96), left_marker=True)
    noisy = chest + np.random.default_rng(7).normal(0, 150, chest.shape)
    for hu in (tight, padded, noisy, chest[10:22]):
        whole = segment_lungs(hu, None, (2.5, 2.5), slab_voxels=hu.size)
        assert whole.mask.any()
        expected = lung_metrics(hu, whole.mask, SPACING, found=whole)
        for slices in (1, 3, 7):
            found = segment_lungs(hu, None, (2.5, 2.5), slab_voxels=slices * hu[0].size)
            assert np.array_equal(found.mask, whole.mask)
            assert (found.flags, found.notes) == (whole.flags, whole.notes)
            assert lung_metrics(hu, found.mask, SPACING, found=found) == expected


def test_slab_thickness_on_regular_and_irregular_grids() -> None:
    assert slab_thickness_mm(np.arange(6) * 1.25) == pytest.approx([1.25] * 6)
    d = np.array([0.0, 2.0, 4.0, 10.0, 12.0])
    assert slab_thickness_mm(d) == pytest.approx([2.0, 2.0, 4.0, 4.0, 2.0])


@given(st.lists(st.floats(0.1, 20.0), min_size=1, max_size=40), st.floats(-500, 500))
def test_slabs_tile_the_scanned_range(steps: list[float], start: float) -> None:
    d = start + np.concatenate([[0.0], np.cumsum(steps)])
    slabs = slab_thickness_mm(d)
    assert np.all(slabs > 0)
    assert slabs.sum() == pytest.approx(d[-1] - d[0] + (steps[0] + steps[-1]) / 2)


def test_missing_slices_inside_the_lungs_are_bridged_and_flagged() -> None:
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.46)
    positions = np.arange(hu.shape[0]) * SPACING[0]
    keep = np.r_[0:18, 21 : hu.shape[0]]  # slices 18-20 missing, in the middle of the lungs
    metrics = lung_metrics(hu[keep], lung_mask(hu[keep]), SPACING, positions_mm=positions[keep])
    whole = true_ml(truth["lung_voxels"])
    assert metrics.volume_ml == pytest.approx(whole, rel=0.02)  # integrated over the true slabs
    naive = true_ml(int(truth["lungs"][keep].sum()))
    assert abs(naive - whole) / whole > 0.05  # counting slices alone would lose ~7 %
    assert metrics.flags == ["gap_in_lungs"] and metrics.plausible is False
    note = metrics.notes[0]
    assert "20.0 mm between slices 17 and 18" in note and "3 slice(s) missing" in note and "5.00 mm" in note


def test_a_gap_outside_the_lungs_is_not_a_lung_flag() -> None:
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.46)
    positions = np.arange(hu.shape[0]) * SPACING[0]
    keep = np.r_[0:1, 3 : hu.shape[0]]  # below the lungs (they start at slice 4)
    assert not truth["lungs"][:4].any()
    metrics = lung_metrics(hu[keep], lung_mask(hu[keep]), SPACING, positions_mm=positions[keep])
    assert metrics.flags == []
    assert metrics.volume_ml == pytest.approx(true_ml(truth["lung_voxels"]), rel=0.005)


def test_unknown_pixel_spacing_withholds_the_volume_only() -> None:
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.46)
    reason = "pixel spacing unknown: PixelSpacing (0028,0030) is missing"
    metrics = lung_metrics(hu, lung_mask(hu), (SPACING[0], math.nan, math.nan), spacing_unknown=reason)
    assert metrics.volume_ml is None and metrics.flags == ["spacing_unknown"] and reason in metrics.notes[0]
    assert metrics.laa950_percent == pytest.approx(truth["laa_voxels"] / truth["lung_voxels"] * 100, abs=0.2)
    assert metrics.mean_lung_density_hu == pytest.approx(truth["mean_lung_density_hu"], abs=2)
    json.dumps(metrics.as_dict(), allow_nan=False)
    # a NaN spacing without a stated reason is withheld as well, never reported as NaN
    silent = lung_metrics(hu, lung_mask(hu), (SPACING[0], math.nan, math.nan))
    assert silent.volume_ml is None and silent.flags == ["spacing_unknown"]
    json.dumps(silent.as_dict(), allow_nan=False)


def _run(
    tmp_path: Path, hu: np.ndarray, *, drop: list[int] | None = None, pixel_spacing: bool = True
) -> tuple:
    stored = (hu + 1024).astype(np.int16)
    datasets = dicomgen.make_series(
        hu.shape[0], stored=stored, spacing=SPACING[0], pixel_spacing=SPACING[1], kernel="B70f"
    )
    for ds in datasets:
        if not pixel_spacing:
            del ds.PixelSpacing
    datasets = [ds for k, ds in enumerate(datasets) if k not in set(drop or [])]
    path = dicomgen.write_zip(tmp_path / "study.zip", datasets, shuffle_seed=5)
    ctx, outcome = dicomgen.run_steps(path, STEPS, tmp_path)
    assert outcome.status == "Success", outcome.error
    return ctx, json.loads(json.dumps(ctx.result["lungs"], allow_nan=False))


def test_the_json_lungs_section_says_in_words_that_a_tight_fov_cuts_the_lungs(tmp_path: Path) -> None:
    hu, truth = fov_phantom(outside_hu=-930.0)
    ctx, lungs = _run(tmp_path, hu)
    assert lungs["volume_ml"] == pytest.approx(true_ml(truth["lung_voxels"]), rel=0.005)
    assert lungs["plausible"] is False and lungs["flags"] == ["lungs_cut_in_plane"]
    assert lungs["body_mask"] is True
    assert "field of view" in lungs["summary"] and "cover only the part inside the image" in lungs["summary"]
    assert any("field of view" in w for w in ctx.warnings)


def test_the_json_lungs_section_carries_a_gap(tmp_path: Path) -> None:
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.46)
    ctx, lungs = _run(tmp_path, hu, drop=[18, 19, 20])
    assert lungs["flags"] == ["gap_in_lungs"] and "missing inside the lungs" in lungs["summary"]
    assert lungs["volume_ml"] == pytest.approx(true_ml(truth["lung_voxels"]), rel=0.02)
    assert any("gap_in_lungs" in w for w in ctx.warnings)


def test_the_json_lungs_section_withholds_the_volume_without_pixel_spacing(tmp_path: Path) -> None:
    hu, truth = fov_phantom(outside_hu=-1000.0, body_half_width=0.46)
    ctx, lungs = _run(tmp_path, hu, pixel_spacing=False)
    assert lungs["volume_ml"] is None and "spacing_unknown" in lungs["flags"]
    assert lungs["mean_lung_density_hu"] == pytest.approx(truth["mean_lung_density_hu"], abs=2)
    assert any("spacing" in w.lower() for w in ctx.warnings)


def test_settings_still_reach_the_body_mask() -> None:
    hu, _ = fov_phantom(outside_hu=-930.0)
    # when edge-open air had to lie wholly inside the body's hull, both cut lungs would go
    assert not lung_mask(hu, LungSettings(cut_lung_min_inside=1.01)).any()
