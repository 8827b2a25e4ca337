"""render.key_slices: deterministic levels and windows, radiological orientation, PNGs listed in the result."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processor.dicom.render import choose_levels, orient, radiological_orientation, window
from tests import dicomgen

SHAPE = (24, 64, 64)
STEPS = [
    {"id": "series", "uses": "dicom.select_series"},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
    {"id": "slices", "uses": "render.key_slices"},
]


def _marker_side(image: np.ndarray) -> tuple[str, str]:
    """Where the bright (bone-density) marker is: ('left'|'right', 'top'|'bottom') of the image."""
    rows, cols = np.nonzero(image == 255)
    h, w = image.shape
    return ("right" if cols.mean() > w / 2 else "left"), ("top" if rows.mean() < h / 2 else "bottom")


def _phantom_series(orientation: tuple[float, ...], stored_hu: np.ndarray) -> list:
    return dicomgen.make_series(
        SHAPE[0],
        stored=(stored_hu + 1024).astype(np.int16),
        orientation=orientation,
        spacing=6.0,
        pixel_spacing=5.0,
        kernel="B70f",
    )


@pytest.mark.parametrize(
    ("name", "orientation", "to_stored"),
    [
        ("standard", (1, 0, 0, 0, 1, 0), lambda a: a),
        ("columns run to patient right", (-1, 0, 0, 0, 1, 0), lambda a: a[:, :, ::-1]),
        ("feet-first prone", (-1, 0, 0, 0, -1, 0), lambda a: a[:, ::-1, ::-1]),
    ],
)
def test_marker_on_patient_left_appears_on_image_right(
    tmp_path: Path, name: str, orientation: tuple, to_stored: object
) -> None:
    hu, _ = dicomgen.chest_phantom(SHAPE, left_marker=True)  # marker at patient-left, mid antero-posterior
    hu[:, 6:9, 30:34] = 1500.0  # a second marker at the front of the body (anterior)
    datasets = _phantom_series(orientation, np.ascontiguousarray(to_stored(hu)))  # type: ignore[operator]
    path = dicomgen.write_zip(tmp_path / "p.zip", datasets)
    ctx, outcome = dicomgen.run_steps(path, STEPS, tmp_path)
    assert outcome.status == "Success", outcome.error
    for key in ctx.values["key_slices"]:
        if key.window != "mediastinal":
            continue
        left = key.image.copy()
        left[:20] = 0  # hide the anterior marker
        assert _marker_side(left)[0] == "right", name
        front = key.image.copy()
        front[:, 40:] = 0  # hide the left marker
        assert _marker_side(front)[1] == "top", name


def test_pngs_are_written_next_to_the_study_json_and_listed(tmp_path: Path) -> None:
    hu, _ = dicomgen.chest_phantom(SHAPE)
    path = dicomgen.write_zip(tmp_path / "p.zip", _phantom_series((1, 0, 0, 0, 1, 0), hu))
    ctx, outcome = dicomgen.run_steps(path, STEPS, tmp_path)
    assert outcome.status == "Success", outcome.error
    listed = ctx.result["key_slices"]
    assert [e["file"] for e in listed] == [
        f"{ctx.study.uid}/key_{w}_{n}.png" for w in ("lung", "mediastinal") for n in (1, 2, 3)
    ]
    json_folder = ctx.out_dir.parent  # <outbox>/<date>/, where <StudyUID>.json is written
    mask_z = np.flatnonzero(ctx.values["lung_mask"].any(axis=(1, 2)))
    for entry, key in zip(listed, ctx.values["key_slices"], strict=True):
        data = (json_folder / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] == key.sha256
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), key.image)
        assert key.image.dtype == np.uint8 and key.window == entry["window"]
        assert mask_z[0] < entry["slice_index"] < mask_z[-1]
        assert entry["z_mm"] == pytest.approx(6.0 * entry["slice_index"])
    assert (entry["width"], entry["level"]) == (350.0, 40.0)
    assert ctx.result["key_slices_method"]["levels"] == "lung mask z-extent"
    json.loads(json.dumps(ctx.result, allow_nan=False))  # every step's result fragment is plain JSON
    again, _ = dicomgen.run_steps(path, STEPS, tmp_path / "again")
    assert [e["sha256"] for e in again.result["key_slices"]] == [e["sha256"] for e in listed]


def test_without_a_lung_mask_levels_span_the_volume(tmp_path: Path) -> None:
    hu, _ = dicomgen.chest_phantom(SHAPE)
    path = dicomgen.write_zip(tmp_path / "p.zip", _phantom_series((1, 0, 0, 0, 1, 0), hu))
    steps = [
        STEPS[0],
        STEPS[1],
        {"id": "slices", "uses": "render.key_slices", "with": {"count": 2, "windows": ["lung"]}},
    ]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success", outcome.error
    assert [e["slice_index"] for e in ctx.result["key_slices"]] == [8, 15]
    assert ctx.result["key_slices_method"]["levels"] == "whole volume (no lung mask)"


def test_window_maps_the_documented_range() -> None:
    hu = np.array([-1400, -1350, -600, 150, 400], np.float32)
    assert window(hu, 1500, -600).tolist() == [0, 0, 128, 255, 255]
    assert window(np.array([-135, 40, 215], np.float32), 350, 40).tolist() == [0, 128, 255]


def test_orientation_for_a_transposed_acquisition() -> None:
    image = np.zeros((8, 8), np.uint8)
    image[6, 1] = 255  # stored row 6 runs to patient left when row cosines point posterior
    how = radiological_orientation((0, 1, 0), (1, 0, 0))
    assert how.transpose and not how.flip_lr and not how.flip_ud
    out = orient(image, how)
    rows, cols = np.nonzero(out)
    assert cols[0] == 6 and rows[0] == 1  # patient left → image right half


def test_levels_are_evenly_spaced_inside_the_mask() -> None:
    mask = np.zeros((50, 4, 4), bool)
    mask[10:31] = True
    assert choose_levels(3, 50, mask) == ([15, 20, 25], "lung mask z-extent")
    assert choose_levels(1, 50, np.zeros_like(mask))[1] == "whole volume (lung mask empty)"


# ---------------------------------------------------------------- square physical pixels
ROW_MM, COL_MM = 2.0, 3.0  # PixelSpacing: between rows, between columns


def _anisotropic_series(stored_hu: np.ndarray, orientation: tuple[float, ...]) -> list:
    datasets = dicomgen.make_series(
        stored_hu.shape[0],
        stored=np.rint(stored_hu + 1024).astype(np.int16),
        orientation=orientation,
        spacing=5.0,
    )
    for ds in datasets:
        ds.PixelSpacing = [ROW_MM, COL_MM]
    return datasets


def _physical_phantom(
    shape_rc: tuple[int, int],
    mm: tuple[float, float],
    depth: int,
    centre_mm: tuple[float, float],
    body_mm: tuple[float, float],
    lung_mm: float,
) -> np.ndarray:
    """HU (z, rows, cols) sampled at row/column spacing ``mm``: an elliptic body (40 HU) with semi-axes
    ``body_mm`` along (rows, cols) and a round lung (−850 HU) of radius ``lung_mm`` in its middle."""
    r = (np.arange(shape_rc[0])[:, None] + 0.5) * mm[0] - centre_mm[0]
    c = (np.arange(shape_rc[1])[None, :] + 0.5) * mm[1] - centre_mm[1]
    plane = np.full(shape_rc, -1000.0, np.float32)
    plane[(r / body_mm[0]) ** 2 + (c / body_mm[1]) ** 2 <= 1] = 40.0
    plane[r**2 + c**2 <= lung_mm**2] = -850.0
    return np.repeat(plane[None], depth, axis=0)


def _extent(mask: np.ndarray) -> tuple[int, int]:
    """(height, width) in pixels of the bounding box of ``mask``."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)


def _png(ctx, name: str) -> np.ndarray:
    return np.asarray(Image.open(ctx.out_dir / name))


def test_a_circle_on_a_2_by_3_mm_grid_comes_out_round(tmp_path: Path) -> None:
    # 120 x 120 mm field: 60 rows of 2 mm, 40 columns of 3 mm; body a circle of radius 50 mm
    hu = _physical_phantom((60, 40), (ROW_MM, COL_MM), 24, (60.0, 60.0), (50.0, 50.0), 20.0)
    path = dicomgen.write_zip(tmp_path / "p.zip", _anisotropic_series(hu, (1, 0, 0, 0, 1, 0)))
    steps = [STEPS[0], STEPS[1], {"id": "slices", "uses": "render.key_slices"}]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success", outcome.error
    image = _png(ctx, "key_lung_2.png")
    assert image.shape == (60, 60)  # rows kept (2 mm, the finer), columns 40 x 3 / 2
    # a diameter of 100 mm is 50 px at 2 mm; an edge sampled every 3 mm may land up to one stored
    # column (1.5 px) off, so the stretched axis gets ±3 px; squeezed it would be 34 px wide
    height, width = _extent(image >= 128)  # the body: 40 HU is bright in the lung window
    assert abs(height - 50) <= 1 and abs(width - 50) <= 3
    lung_h, lung_w = _extent(image[15:45, 15:45] < 128)  # inside the body
    assert abs(lung_h - 20) <= 1 and abs(lung_w - 20) <= 3
    assert image[30, 30] < 128 < image[30, 10]  # lung dark, soft tissue bright
    pixels = ctx.result["key_slices_method"]["pixels"]
    assert pixels["resampled"] is True and pixels["output_pixel_mm"] == ROW_MM
    assert pixels["displayed_spacing_mm"] == {"vertical": ROW_MM, "horizontal": COL_MM}
    assert pixels["image_size"] == [60, 60] and "before windowing" in pixels["method"]
    assert all(k.pixel_mm == ROW_MM and k.image.shape == (60, 60) for k in ctx.values["key_slices"])
    # windowing stays exact on the square grid: every value is the window of one interpolated HU
    lung = ctx.values["key_slices"][1]
    assert set(np.unique(lung.image[:, :2])) <= {int(window(np.float32(-1000.0), 1500, -600))}
    again, _ = dicomgen.run_steps(path, steps, tmp_path / "again")
    assert [e["sha256"] for e in again.result["key_slices"]] == [
        e["sha256"] for e in ctx.result["key_slices"]
    ]


def test_a_transposed_acquisition_follows_the_displayed_axes(tmp_path: Path) -> None:
    # rows run along patient x (2 mm), columns along patient y (3 mm); the body is wide (100 mm left
    # to right) and shallow (60 mm front to back), with a bone marker on the patient's left
    rows_x, cols_y = 70, 30  # 140 mm left-right, 90 mm front-back
    hu = _physical_phantom((rows_x, cols_y), (ROW_MM, COL_MM), 24, (70.0, 45.0), (50.0, 30.0), 12.0)
    hu[:, 52:56, 14:16] = 1500.0  # x 104..112 mm: the patient's left half
    path = dicomgen.write_zip(tmp_path / "p.zip", _anisotropic_series(hu, (0, 1, 0, 1, 0, 0)))
    steps = [STEPS[0], STEPS[1], {"id": "slices", "uses": "render.key_slices"}]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success", outcome.error
    method = ctx.result["key_slices_method"]
    assert method["orientation"]["transposed"] is True
    assert method["pixels"]["displayed_spacing_mm"] == {"vertical": COL_MM, "horizontal": ROW_MM}
    image = _png(ctx, "key_lung_2.png")
    physical = (rows_x * ROW_MM) / (cols_y * COL_MM)  # displayed width (patient x) : height (patient y)
    assert image.shape == (45, 70)
    assert abs(image.shape[1] / image.shape[0] - physical) <= 0.03 * physical
    height, width = _extent(image >= 128)
    assert abs(width - 50) <= 1 and abs(height - 30) <= 3  # 100 x 60 mm at 2 mm (height: 3 mm stretched)
    marker = _png(ctx, "key_mediastinal_2.png") == 255
    assert np.flatnonzero(marker.any(axis=0)).mean() > image.shape[1] / 2  # patient left on image right


def test_unknown_pixel_spacing_is_not_guessed(tmp_path: Path) -> None:
    hu = _physical_phantom((60, 40), (ROW_MM, COL_MM), 24, (60.0, 60.0), (50.0, 50.0), 20.0)
    datasets = _anisotropic_series(hu, (1, 0, 0, 0, 1, 0))
    for ds in datasets:
        del ds.PixelSpacing  # and no ImagerPixelSpacing: the in-plane spacing is unknown
    path = dicomgen.write_zip(tmp_path / "p.zip", datasets)
    steps = [STEPS[0], STEPS[1], {"id": "slices", "uses": "render.key_slices"}]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success", outcome.error
    assert ctx.values["volume"].spacing_unknown
    image = _png(ctx, "key_lung_2.png")
    assert image.shape == (60, 40)  # pixel for pixel: no invented aspect
    assert image[30, 20] < 128 < image[30, 4]  # still oriented and windowed: lung dark, body bright
    pixels = ctx.result["key_slices_method"]["pixels"]
    assert pixels["resampled"] is False and pixels["output_pixel_mm"] is None
    assert pixels["method"].startswith("not resampled: pixel spacing unknown (PixelSpacing"), pixels["method"]
    assert all(k.pixel_mm is None for k in ctx.values["key_slices"])
    json.loads(json.dumps(ctx.result, allow_nan=False))


def test_square_pixels_are_left_alone() -> None:
    from processor.dicom.render import Orientation, PixelGrid, stretch, to_square_pixels

    upright = Orientation(False, False, False)
    square = PixelGrid.of(0.7, 0.7, upright)
    image = np.arange(12, dtype=np.int16).reshape(3, 4)
    assert to_square_pixels(image, square) is image
    assert square.as_dict(3, 4)["resampled"] is False and square.pixel_mm == 0.7
    grid = PixelGrid.of(1.0, 2.0, upright)
    assert grid.output_shape(3, 4) == (3, 8) and PixelGrid.of(
        1.0, 2.0, Orientation(True, False, False)
    ).output_shape(3, 4) == (6, 4)
    # linear, pixel centres aligned: doubling [0, 10] gives [0, 2.5, 7.5, 10]
    assert stretch(np.array([[0, 10]], np.int16), 1, 4).tolist() == [[0.0, 2.5, 7.5, 10.0]]
    assert PixelGrid.of(float("nan"), 1.0, upright).unknown is not None
