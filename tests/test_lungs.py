"""quantify.lungs: threshold lung mask and metrics on a phantom with known truth and on real CT pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from processor.dicom.lungs import LungSettings, lung_mask, lung_metrics
from tests import dicomgen

STEPS = [
    {"id": "series", "uses": "dicom.select_series"},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
]
PHANTOM_SHAPE = (40, 96, 96)
SLICE_MM, PIXEL_MM = 6.0, 3.5


def test_phantom_volume_and_laa_within_2_percent_through_the_engine(tmp_path: Path) -> None:
    hu, truth = dicomgen.chest_phantom(PHANTOM_SHAPE)
    stored = (hu + 1024).astype(np.int16)  # the usual CT storage: intercept −1024
    datasets = dicomgen.make_series(
        PHANTOM_SHAPE[0], stored=stored, spacing=SLICE_MM, pixel_spacing=PIXEL_MM, kernel="B70f"
    )
    path = dicomgen.write_zip(tmp_path / "phantom.zip", datasets, shuffle_seed=11)
    ctx, outcome = dicomgen.run_steps(path, STEPS, tmp_path)
    assert outcome.status == "Success", outcome.error
    lungs = ctx.result["lungs"]
    true_ml = truth["lung_voxels"] * SLICE_MM * PIXEL_MM**2 / 1000
    true_laa = truth["laa_voxels"] / truth["lung_voxels"] * 100
    assert lungs["volume_ml"] == pytest.approx(true_ml, rel=0.02)
    assert lungs["laa950_percent"] == pytest.approx(true_laa, rel=0.02)
    assert 2000 < lungs["volume_ml"] < 5000 and 10 < lungs["laa950_percent"] < 20
    assert lungs["mean_lung_density_hu"] == pytest.approx(truth["mean_lung_density_hu"], abs=5)
    assert lungs["plausible"] is True and lungs["flags"] == []
    mask = ctx.values["lung_mask"]
    assert mask.dtype == bool and mask.shape == PHANTOM_SHAPE


def test_air_around_the_patient_and_small_gas_pockets_are_not_lung() -> None:
    hu, truth = dicomgen.chest_phantom(PHANTOM_SHAPE)
    hu[20:24, 10:14, 46:50] = -1000  # a small gas pocket inside the body, e.g. bowel or oesophagus
    mask = lung_mask(hu)
    outside = hu == -1000
    assert not (mask & outside).any()
    assert abs(int(mask.sum()) - truth["lung_voxels"]) / truth["lung_voxels"] < 0.01


def test_lungs_cut_by_the_scan_range_and_a_small_volume_are_flagged() -> None:
    hu, _ = dicomgen.chest_phantom(PHANTOM_SHAPE)
    cut = hu[14:26]  # a slab through the middle of the lungs
    mask = lung_mask(cut)
    metrics = lung_metrics(cut, mask, (1.0, 1.0, 1.0))
    assert mask.any() and metrics.plausible is False
    assert {"lungs_cut_at_first_slice", "lungs_cut_at_last_slice", "volume_below_min"} <= set(metrics.flags)
    assert all("lung" in note for note in metrics.notes)


def test_no_air_gives_an_empty_mask_flag() -> None:
    hu = np.full((10, 32, 32), 40.0, np.float32)
    metrics = lung_metrics(hu, lung_mask(hu), (1.0, 1.0, 1.0))
    assert metrics.flags == ["empty_mask"] and metrics.laa950_percent is None and not metrics.plausible


def test_settings_change_the_method() -> None:
    hu, truth = dicomgen.chest_phantom(PHANTOM_SHAPE)
    mask = lung_mask(hu)
    one = lung_mask(hu, LungSettings(max_components=1))
    assert 0.4 < one.sum() / mask.sum() < 0.6  # one of two equal lungs
    strict = lung_metrics(hu, mask, (1.0, 1.0, 1.0), LungSettings(laa_threshold_hu=-990))
    assert strict.laa950_percent == 0.0


def test_real_ct_small_series_gives_plausible_densities_and_honest_flags(tmp_path: Path) -> None:
    """CT_small.dcm is an 85 mm crop of a real chest at the spine with both lungs cut by the image
    edge. Its lung densities are real; the volume is necessarily partial, and the flags say so."""
    datasets = dicomgen.make_series(30, spacing=5.0)
    path = dicomgen.write_zip(tmp_path / "ct_small.zip", datasets)
    ctx, outcome = dicomgen.run_steps(path, STEPS, tmp_path)
    assert outcome.status == "Success", outcome.error
    lungs = ctx.result["lungs"]
    assert -900 < lungs["mean_lung_density_hu"] < -650
    assert 0 <= lungs["laa950_percent"] < 10
    assert 50 < lungs["volume_ml"] < 500
    assert lungs["plausible"] is False
    assert set(lungs["flags"]) == {
        "volume_below_min",
        "lungs_cut_at_first_slice",
        "lungs_cut_at_last_slice",
        "lungs_cut_in_plane",
    }  # the lungs reach the top, left and right edges
    assert "top, left and right edges of the image on 30 of 30 lung slices" in lungs["summary"]
    assert any("lung numbers partial or not plausible" in w for w in ctx.warnings)


def test_int16_and_float32_volumes_give_the_same_mask_and_metrics() -> None:
    hu, _ = dicomgen.chest_phantom(PHANTOM_SHAPE)
    noisy = np.rint(hu + np.random.default_rng(5).normal(0, 20, hu.shape))  # whole HU, as ct.volume gives
    as_int16, as_float32 = noisy.astype(np.int16), noisy.astype(np.float32)
    mask16, mask32 = lung_mask(as_int16), lung_mask(as_float32)
    assert mask16.any() and np.array_equal(mask16, mask32)
    spacing = (SLICE_MM, PIXEL_MM, PIXEL_MM)
    assert lung_metrics(as_int16, mask16, spacing) == lung_metrics(as_float32, mask32, spacing)


def test_the_3d_labelling_is_scipys_to_the_voxel() -> None:
    """connected-components-3d, slab by slab, replaces ``scipy.ndimage.label`` for the lung mask's
    3-D air components (issue 18): the same labels, numbered in the same order, so every mask and
    metric is unchanged. Checked on chests (one with its field of view cut, one with the lungs cut
    by the scan range, one with noise making many small pockets) and on random masks with many
    components, each labelled whole and in slabs of 1, 2 and 5 slices (components joined across
    every slab boundary)."""
    from scipy import ndimage

    from processor.dicom.components import label_3d

    hu, _ = dicomgen.chest_phantom((48, 96, 96), left_marker=True)
    noisy = hu + np.random.default_rng(3).normal(0, 200, hu.shape)
    volumes = [hu, hu[:, 10:-10, 14:], hu[8:30], noisy]
    rng = np.random.default_rng(18)
    masks = [v < -320 for v in volumes] + [rng.random((24, 48, 40)) < p for p in (0.2, 0.31, 0.5)]
    # column-major memory: connected-components-3d numbers in memory order, scipy in index order
    masks.append(np.asfortranarray(rng.random((24, 48, 40)) < 0.31))
    for mask in masks:
        expected, n = ndimage.label(mask)
        for slices in (1, 2, 5, len(mask)):
            labels, count = label_3d(mask, slab_voxels=slices * mask[0].size)
            assert count == n and labels.dtype == np.uint16 and np.array_equal(labels, expected)
    assert max(label_3d(m)[1] for m in masks) > 100, "many components were compared"


def test_more_components_than_uint16_holds_are_labelled_as_scipy_does_in_int32() -> None:
    """Over 65,534 components (a volume of isolated voxels) do not fit uint16: labelled whole as
    int32, scipy's values — whether one slab already has too many or only the whole has. Columns
    that run through every slab make many pieces but few components: those stay uint16."""
    from scipy import ndimage

    from processor.dicom.components import label_3d

    dots = np.zeros((40, 90, 80), bool)
    dots[::2, ::2, ::2] = True  # 20 × 45 × 40 = 36,000 isolated voxels …
    dots[1::2, 1::2, 1::2] = True  # … and as many more between them, none of them touching
    dots[:, 0, 79] = True  # one column through every slice
    expected, n = ndimage.label(dots)
    assert n > 65_535
    for slices in (40, 4):  # one slab over the limit; ten slabs each under it
        labels, count = label_3d(dots, slab_voxels=slices * dots[0].size)
        assert count == n and labels.dtype == np.int32 and np.array_equal(labels, expected)
    columns = np.zeros((40, 180, 160), bool)
    columns[:, ::2, ::2] = True  # 7,200 columns along z: 72,000 pieces in 10 slabs of 4 slices
    expected, n = ndimage.label(columns)
    labels, count = label_3d(columns, slab_voxels=4 * columns[0].size)
    assert count == n == 7_200 and labels.dtype == np.uint16 and np.array_equal(labels, expected)


def test_the_in_plane_labellings_and_the_opening_are_scipys_to_the_voxel() -> None:
    """The lung and body masks label in-plane components and open the body mask without SciPy
    (issue 18: import only what runs; :mod:`processor.dicom.components`): each function gives
    ``scipy.ndimage``'s values on random masks of every density, on empty and full ones, on
    single rows and columns, and (the opening) with the ellipses of every radius pair up to 4."""
    from scipy import ndimage

    from processor.dicom.body import _by_offsets
    from processor.dicom.components import label_2d, label_in_plane

    cross = np.zeros((3, 3, 3), bool)
    cross[1] = ndimage.generate_binary_structure(2, 1)
    rng = np.random.default_rng(20)
    shapes = [(1, 1, 1), (3, 1, 17), (2, 19, 1), (4, 23, 31), (7, 40, 33)]
    masks = [rng.random(s) < p for s in shapes for p in (0.0, 0.2, 0.45, 0.6, 0.9, 1.0)]
    for mask in masks:
        expected, n = ndimage.label(mask, structure=cross)
        labels, count = label_in_plane(mask)
        assert count == n and labels.dtype == np.int32 and np.array_equal(labels, expected)
        for plane in (mask[0], np.asfortranarray(mask[-1])):
            expected, n = ndimage.label(plane)
            labels, count = label_2d(plane)
            assert count == n and labels.dtype == np.int32 and np.array_equal(labels, expected)
        mixed = mask[0] * rng.integers(1, 4, mask[0].shape)  # integer values: every nonzero is foreground
        assert np.array_equal(label_2d(mixed)[0], ndimage.label(mixed)[0])
    assert max(label_in_plane(m)[1] for m in masks) > 200, "many components were compared"
    for ry in range(5):
        for rx in range(5):
            dy, dx = np.ogrid[-ry : ry + 1, -rx : rx + 1]
            disc = (dy / max(ry, 0.5)) ** 2 + (dx / max(rx, 0.5)) ** 2 <= 1
            offsets = [(int(y), int(x)) for y, x in zip(*np.nonzero(disc), strict=True)]
            for mask in masks[-12:]:
                eroded = ndimage.binary_erosion(mask, disc[None], border_value=1)
                assert np.array_equal(_by_offsets(mask, offsets, (ry, rx), erode=True), eroded)
                dilated = ndimage.binary_dilation(mask, disc[None], border_value=0)
                assert np.array_equal(_by_offsets(mask, offsets, (ry, rx), erode=False), dilated)


def test_components_joined_only_far_away_are_numbered_as_scipy_does() -> None:
    """The cross-slab join (:func:`processor.dicom.components._components_of`, numpy in place of
    ``scipy.sparse.csgraph``) when pieces meet only through long chains: combs whose teeth start
    in the first slab and join only in the last, and a zigzag that crosses every slab boundary
    back and forth, labelled in slabs of one slice."""
    from scipy import ndimage

    from processor.dicom.components import label_3d

    comb = np.zeros((12, 9, 40), bool)
    comb[:, ::2, ::3] = True  # teeth: columns along z, apart in the first slices …
    comb[-1, :, :] = True  # … joined only in the last slice
    comb[:, 1, 1] = True  # and a lone column
    zigzag = np.zeros((10, 3, 60), bool)
    for k in range(20):  # a path that goes down and up through all slices, 3 columns a turn
        zigzag[:, 1, 3 * k] = True
        zigzag[0 if k % 2 else -1, 1, 3 * k : 3 * k + 4] = True
    rng = np.random.default_rng(5)
    for mask in (comb, zigzag, rng.random((16, 20, 20)) < 0.33):
        expected, n = ndimage.label(mask)
        labels, count = label_3d(mask, slab_voxels=mask[0].size)
        assert count == n and np.array_equal(labels, expected)


def test_the_fast_forms_of_the_masks_steps_give_the_same_arrays() -> None:
    """The coarse body grid read from strided views equals the fancy index it replaced, for grids
    that do and do not land on the last row and column; the chosen components by equality tests
    equal the table lookup, for none and one to six chosen ids (none or over four: the lookup itself)."""
    from processor.dicom.body import _grid, _sampled_above
    from processor.dicom.lungs import _members

    rng = np.random.default_rng(21)
    for ny, nx, step in [
        (512, 512, 4),
        (511, 513, 4),
        (100, 37, 3),
        (7, 5, 1),
        (10, 10, 3),
        (1, 1, 1),
        (2, 9, 4),
    ]:
        hu = rng.integers(-1000, 1000, (3, ny, nx)).astype(np.int16)
        rows, cols = _grid(ny, step), _grid(nx, step)
        assert np.array_equal(_sampled_above(hu, step, -500.0), hu[:, rows[:, None], cols] > -500.0)
    labels = rng.integers(0, 9, (4, 30, 20)).astype(np.uint16)
    for k in range(0, 7):
        lookup = np.zeros(9, bool)
        lookup[rng.choice(np.arange(1, 9), k, replace=False)] = True  # none, one to six
        assert np.array_equal(_members(labels, lookup, np.flatnonzero(lookup)), lookup[labels])
