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
STEPS = [{"id": "series", "uses": "dicom.select_series"}, {"id": "volume", "uses": "ct.volume"},
         {"id": "lungs", "uses": "quantify.lungs"}, {"id": "slices", "uses": "render.key_slices"}]


def _marker_side(image: np.ndarray) -> tuple[str, str]:
    """Where the bright (bone-density) marker is: ('left'|'right', 'top'|'bottom') of the image."""
    rows, cols = np.nonzero(image == 255)
    h, w = image.shape
    return ("right" if cols.mean() > w / 2 else "left"), ("top" if rows.mean() < h / 2 else "bottom")


def _phantom_series(orientation: tuple[float, ...], stored_hu: np.ndarray) -> list:
    return dicomgen.make_series(SHAPE[0], stored=(stored_hu + 1024).astype(np.int16), orientation=orientation,
                                spacing=6.0, pixel_spacing=5.0, kernel="B70f")


@pytest.mark.parametrize(("name", "orientation", "to_stored"), [
    ("standard", (1, 0, 0, 0, 1, 0), lambda a: a),
    ("columns run to patient right", (-1, 0, 0, 0, 1, 0), lambda a: a[:, :, ::-1]),
    ("feet-first prone", (-1, 0, 0, 0, -1, 0), lambda a: a[:, ::-1, ::-1]),
])
def test_marker_on_patient_left_appears_on_image_right(tmp_path: Path, name: str, orientation: tuple,
                                                       to_stored: object) -> None:
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
    assert [e["file"] for e in listed] == [f"{ctx.study.uid}/key_{w}_{n}.png"
                                           for w in ("lung", "mediastinal") for n in (1, 2, 3)]
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
    steps = [STEPS[0], STEPS[1], {"id": "slices", "uses": "render.key_slices",
                                  "with": {"count": 2, "windows": ["lung"]}}]
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
