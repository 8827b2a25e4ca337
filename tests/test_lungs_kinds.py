"""quantify.lungs against three kinds of wrong numbers a tester found (README, item 8).

1. The lung volume depended on the field of view: the body mask's opening was sized in coarse
   grid pixels, so on 2 mm pixels (200²), 0.9 mm pixels (512²) or a 2 × 3 mm grid it removed a
   12 mm chest wall, and lung outside the shrunken hull was cut away with no flag.
2. One lung and a gastric bubble below the other hemithorax: the bubble was taken as the second
   lung (false volume and emphysema).
3. Arms down touching the torso with a field of view tight front to back: the outside air was
   taken whole as a "lung cut by the field of view".

The phantoms are built in mm on the scanner's pixel grid; the truth is their construction.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from processor.dicom.body import opening_radii
from processor.dicom.lungs import LungSettings, lung_metrics, segment_lungs
from tests import dicomgen

LUNG_HU, BODY_HU = -850.0, 40.0
TWO_LUNGS = ((-70.0, 0.0, 55.0, 80.0), (70.0, 0.0, 55.0, 80.0))  # centre x, y and half-axes (mm)


def chest(
    ny: int,
    nx: int,
    pixel_mm: tuple[float, float],
    *,
    nz: int = 24,
    slice_mm: float = 10.0,
    torso: tuple[float, float] = (150.0, 110.0),
    lungs=TWO_LUNGS,
    arms=(),
    outside_hu: float = -1000.0,
    gas: tuple[float, float, float, float] | None = None,
    noise: float = 20.0,
    seed: int = 1,
) -> tuple[np.ndarray, dict]:
    """HU (z, y, x) of a chest on an ``ny`` × ``nx`` grid of ``pixel_mm`` (rows, columns), centred.

    Torso: an elliptic cylinder of half-axes ``torso`` (mm). Lungs: ellipsoids (x, y, half-axes in
    plane; half-height 100 mm, centred in z) clipped to the torso; with the default torso and lungs
    the chest wall is at least 11.7 mm thick (at the side 150 − 125 = 25 mm, front and back 30 mm,
    thinnest obliquely). ``arms``: further body ellipses (x, y, half-axes). ``gas``: a −1000 HU sphere
    (x, y, z, radius in mm) that is not lung. Gaussian ``noise`` HU everywhere.
    """
    y = ((np.arange(ny) - (ny - 1) / 2) * pixel_mm[0])[None, :, None]
    x = ((np.arange(nx) - (nx - 1) / 2) * pixel_mm[1])[None, None, :]
    z = ((np.arange(nz) - (nz - 1) / 2) * slice_mm)[:, None, None]
    body = (x / torso[0]) ** 2 + (y / torso[1]) ** 2 <= 1
    for ax, ay, rx, ry in arms:
        body = body | (((x - ax) / rx) ** 2 + ((y - ay) / ry) ** 2 <= 1)
    hu = np.where(np.broadcast_to(body, (nz, ny, nx)), BODY_HU, outside_hu).astype(np.float32)
    lung = np.zeros(hu.shape, bool)
    for lx, ly, rx, ry in lungs:
        lung |= ((x - lx) / rx) ** 2 + ((y - ly) / ry) ** 2 + (z / 100.0) ** 2 <= 1
    lung &= body
    hu[lung] = LUNG_HU
    other = np.zeros(hu.shape, bool)
    if gas is not None:
        gx, gy, gz, r = gas
        other = ((x - gx) ** 2 + (y - gy) ** 2 + (z - gz) ** 2 <= r * r) & body & ~lung
        hu[other] = -1000.0
    hu += np.random.default_rng(seed).normal(0, noise, hu.shape).astype(np.float32)
    return np.rint(hu), {"lungs": lung, "other_air": other, "outside": ~np.broadcast_to(body, hu.shape)}


def ml(mask: np.ndarray, pixel_mm: tuple[float, float], slice_mm: float = 10.0) -> float:
    return int(mask.sum()) * pixel_mm[0] * pixel_mm[1] * slice_mm / 1000.0


# -- 1. the body mask's size is in mm: the same chest on any grid gives the same lungs -------------

GRIDS = [
    ((160, 160), (2.5, 2.5)),
    ((200, 200), (2.0, 2.0)),
    ((512, 512), (0.9, 0.9)),
    ((200, 134), (2.0, 3.0)),
    ((134, 200), (3.0, 2.0)),
]


@pytest.mark.parametrize(("matrix", "pixel_mm"), GRIDS)
def test_lung_volume_does_not_depend_on_the_field_of_view_or_pixel_grid(matrix, pixel_mm) -> None:
    slice_mm = 20.0 if matrix[0] > 300 else 10.0  # 12 or 24 slices over the 200 mm tall lungs
    hu, truth = chest(*matrix, pixel_mm, nz=12 if matrix[0] > 300 else 24, slice_mm=slice_mm)
    found = segment_lungs(hu.astype(np.int16), None, pixel_mm)
    assert np.array_equal(found.mask, truth["lungs"])
    metrics = lung_metrics(hu, found.mask, (slice_mm, *pixel_mm), found=found)
    assert metrics.volume_ml == pytest.approx(ml(truth["lungs"], pixel_mm, slice_mm), rel=0.001)
    assert metrics.flags == [] and metrics.plausible


@pytest.mark.parametrize("step_mm", [0.7, 1.0, 2.0, 2.5, 2.8, 3.0, 3.6, 4.0, 6.0])
def test_the_opening_never_removes_tissue_thicker_than_thin_mm(step_mm: float) -> None:
    thin_mm = 8.0
    for r in opening_radii((step_mm, step_mm), thin_mm):
        assert (2 * r + 1) * step_mm <= thin_mm  # what an opening of radius r removes
        assert (2 * (r + 1) + 1) * step_mm > thin_mm  # and it is the largest such radius


def test_lung_beyond_the_body_outline_is_kept_and_flagged_never_cut_silently() -> None:
    """Without the pixel spacing the body mask falls back to its pixel rule (an opening of 2 coarse
    pixels), which on 2 mm pixels removes a 12 mm chest wall: the lung beyond that outline is kept
    and the result says the outline was not found whole."""
    pixel_mm = (2.0, 2.0)
    hu, truth = chest(200, 200, pixel_mm)
    found = segment_lungs(hu, None, None)
    assert np.array_equal(found.mask, truth["lungs"])
    assert found.flags == ["lungs_beyond_body_outline"]
    assert "pixel rule" in " ".join(found.notes)
    metrics = lung_metrics(hu, found.mask, (10.0, *pixel_mm), found=found)
    assert not metrics.plausible and "lungs_beyond_body_outline" in metrics.flags
    assert metrics.volume_ml == pytest.approx(ml(truth["lungs"], pixel_mm), rel=0.001)


# -- 2. a gas bubble below one hemithorax is not the second lung -----------------------------------


@pytest.mark.parametrize(
    ("gas", "slices"), [((60.0, -20.0, -140.0, 45.0), 30), ((70.0, 20.0, 160.0, 45.0), 36)]
)
def test_one_lung_and_a_gas_bubble_beyond_its_height_is_one_lung(gas, slices: int) -> None:
    pixel_mm = (2.5, 2.5)
    hu, truth = chest(160, 160, pixel_mm, nz=slices, lungs=TWO_LUNGS[:1], gas=gas)
    bubble = truth["other_air"]
    assert ml(bubble, pixel_mm) > 0.1 * ml(truth["lungs"], pixel_mm)  # large enough to pass as a lung
    found = segment_lungs(hu, None, pixel_mm)
    assert np.array_equal(found.mask, truth["lungs"])
    metrics = lung_metrics(hu, found.mask, (10.0, *pixel_mm), found=found)
    assert metrics.laa950_percent == pytest.approx(
        np.count_nonzero(hu[truth["lungs"]] < -950) / truth["lungs"].sum() * 100, abs=0.01
    )
    assert metrics.flags == ["one_lung"]
    assert "only one lung" in metrics.summary.lower() and "was left out" in metrics.summary


def test_two_separate_lungs_and_a_bubble_keep_both_lungs_without_a_one_lung_flag() -> None:
    pixel_mm = (2.5, 2.5)
    hu, truth = chest(160, 160, pixel_mm, nz=36, gas=(60.0, -20.0, -160.0, 45.0))  # 15 mm below the lung
    assert ml(truth["other_air"], pixel_mm) > 0.1 * ml(truth["lungs"], pixel_mm) / 2
    found = segment_lungs(hu, None, pixel_mm)
    assert np.array_equal(found.mask, truth["lungs"])
    assert found.flags == []


def test_a_lung_beside_the_other_is_kept_even_when_it_is_shorter() -> None:
    """The z-overlap rule asks a further component to lie beside the largest, not to be as tall."""
    pixel_mm = (2.5, 2.5)
    hu, truth = chest(160, 160, pixel_mm, nz=30)
    short = truth["lungs"].copy()
    cut = np.zeros_like(short)
    cut[:10, :, 80:] = True  # the left lung loses its lower third: still beside the right one
    hu[short & cut] = BODY_HU
    short &= ~cut
    found = segment_lungs(hu, None, pixel_mm)
    assert np.array_equal(found.mask, short) and found.flags == []


def test_max_components_one_keeps_one_lung_and_says_so() -> None:
    hu, truth = chest(160, 160, (2.5, 2.5))
    found = segment_lungs(hu, LungSettings(max_components=1), (2.5, 2.5))
    assert 0.45 < found.mask.sum() / truth["lungs"].sum() < 0.55 and found.flags == ["one_lung"]


# -- 3. arms down: the outside air passes around the body and is never a cut lung -----------------

ARMS_DOWN = ((-195.0, 10.0, 45.0, 55.0), (195.0, 10.0, 45.0, 55.0))


@pytest.mark.parametrize(
    ("matrix", "pixel_mm", "outside_hu"),
    [
        ((118, 245), (2.0, 2.0), -930.0),
        ((160, 245), (2.0, 2.0), -1000.0),
        ((110, 170), (3.0, 3.0), -1000.0),
        ((236, 490), (1.0, 1.0), -930.0),
    ],
)
def test_arms_down_touching_the_torso_outside_air_is_not_lung(matrix, pixel_mm, outside_hu: float) -> None:
    slice_mm = 20.0 if matrix[1] > 300 else 10.0
    hu, truth = chest(
        *matrix,
        pixel_mm,
        arms=ARMS_DOWN,
        outside_hu=outside_hu,
        noise=30.0,
        nz=12 if matrix[1] > 300 else 24,
        slice_mm=slice_mm,
    )
    found = segment_lungs(hu, None, pixel_mm)
    assert not (found.mask & truth["outside"]).any()
    assert np.array_equal(found.mask, truth["lungs"])
    metrics = lung_metrics(hu, found.mask, (slice_mm, *pixel_mm), found=found)
    assert metrics.flags == [] and "field of view" not in metrics.summary


def test_a_lung_cut_by_the_field_of_view_is_still_kept_with_arms_down() -> None:
    """The wrapping rule removes air that passes around the body, not a lung cut at one edge."""
    pixel_mm = (2.0, 2.0)
    hu, truth = chest(
        118,
        245,
        pixel_mm,
        arms=ARMS_DOWN,
        outside_hu=-930.0,
        noise=30.0,
        lungs=((-70.0, 0.0, 55.0, 80.0), (70.0, 0.0, 55.0, 80.0)),
    )
    crop = hu[:, :, 60:]  # the field of view cuts the right lung (patient right, image left)
    lungs = truth["lungs"][:, :, 60:]
    assert lungs[:, :, 0].any()
    found = segment_lungs(crop, None, pixel_mm)
    assert np.array_equal(found.mask, lungs)
    metrics = lung_metrics(crop, found.mask, (10.0, *pixel_mm), found=found)
    assert metrics.flags == ["lungs_cut_in_plane"] and "the left edge of the image" in metrics.notes[0]


# -- through the engine: the pixel spacing reaches the body mask -----------------------------------


def test_the_lungs_section_on_a_2mm_grid_is_exact_and_plausible(tmp_path: Path) -> None:
    pixel_mm, slice_mm = (2.0, 2.0), 10.0
    hu, truth = chest(200, 200, pixel_mm, nz=24, slice_mm=slice_mm)
    stored = (hu + 1024).astype(np.int16)
    datasets = dicomgen.make_series(
        hu.shape[0], stored=stored, spacing=slice_mm, pixel_spacing=pixel_mm[0], kernel="B70f"
    )
    path = dicomgen.write_zip(tmp_path / "study.zip", datasets, shuffle_seed=3)
    steps = [
        {"id": "series", "uses": "dicom.select_series"},
        {"id": "volume", "uses": "ct.volume"},
        {"id": "lungs", "uses": "quantify.lungs"},
    ]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success", outcome.error
    lungs = json.loads(json.dumps(ctx.result["lungs"], allow_nan=False))
    assert lungs["volume_ml"] == pytest.approx(ml(truth["lungs"], pixel_mm, slice_mm), rel=0.001)
    assert lungs["plausible"] is True and lungs["flags"] == [] and lungs["notes"] == []
    assert math.isclose(lungs["body_thin_mm"], 8.0)


def test_joined_lungs_cut_on_both_sides_are_kept_they_meet_only_at_the_carina() -> None:
    """Two lungs joined by the airways and cut by the left and right image edges: the component
    reaches opposite edges, but only in the few slices of the carina, so it is not outside air."""
    pixel_mm = (2.0, 2.0)
    hu, truth = chest(95, 95, pixel_mm, outside_hu=-930.0, noise=30.0)  # 190 mm: the body cut on 4 sides
    z = np.arange(hu.shape[0])[:, None, None]
    y = ((np.arange(95) - 47) * 2.0)[None, :, None]
    x = ((np.arange(95) - 47) * 2.0)[None, None, :]
    bridge = (np.abs(y) <= 8) & (np.abs(x) <= 70) & ((z == 15) | (z == 16))
    hu[bridge] = LUNG_HU
    lungs = truth["lungs"] | bridge
    assert lungs[:, :, 0].any() and lungs[:, :, -1].any()
    found = segment_lungs(hu, None, pixel_mm)
    assert np.array_equal(found.mask, lungs)
    metrics = lung_metrics(hu, found.mask, (10.0, *pixel_mm), found=found)
    assert metrics.flags == ["lungs_cut_in_plane"] and "the left and right edges" in metrics.notes[0]
    assert metrics.volume_ml == pytest.approx(ml(lungs, pixel_mm), rel=0.001)
