"""Field conditions that broke other DICOM tools (BH-10 … BH-15), built with the project's generator.

Each condition is a chest phantom of known HU (:func:`tests.dicomgen.chest_phantom`) written as real
DICOM and run through the real engine (series → volume → lungs → render.key_slices). Truth comes from
the phantom's construction — its HU voxel for voxel, its lung voxel count times the true spacing —
never from a previous run.

* BH-10 gantry tilt 20° (dcm2niix #697, #253; heudiconv #409): the slice spacing is the distance
  between the tilted planes, 2.5·cos 20° mm, not the table step.
* BH-11 Enhanced CT stored head to feet (Slicer #6773): geometry and rescale only in the
  functional groups.
* BH-12 JPEG-LS of signed 12-bit values (pydicom #2009): JPEG-LS carries no sign.
* BH-13 JPEG 2000 whose codestream is unsigned 13-bit while the header says signed (pydicom #1149).
* BH-14 PixelPaddingValue −2000 outside the reconstruction circle (vtk-dicom #173, dcm2niix #262).
* BH-15 MONOCHROME1 (scifio #311, monai-deploy PR #290): a display hint, never a change of HU.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from processor.pipeline.step import StudyContext
from tests import dicomgen

SHAPE = (40, 64, 64)
SLICE_MM, PIXEL_MM = 2.5, 5.0  # 5 mm pixels: the 64 × 64 phantom has adult-sized lungs (~1.3 L)
STEPS = [
    {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
    {"id": "slices", "uses": "render.key_slices"},
]
LUNG_HU, BODY_HU = -850.0, 40.0  # chest_phantom's parenchyma and soft tissue


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, dict]:
    return dicomgen.chest_phantom(SHAPE)


def _classic(stored: np.ndarray, **kwargs: object) -> list[Dataset]:
    return dicomgen.make_series(
        SHAPE[0], stored=stored, spacing=SLICE_MM, pixel_spacing=PIXEL_MM, kernel="B70f", **kwargs
    )  # type: ignore[arg-type]


def _run(tmp_path: Path, datasets: list[Dataset]) -> StudyContext:
    """The study through series → volume → lungs → render.key_slices; every step must be done."""
    zip_path = dicomgen.write_zip(tmp_path / "study.zip", datasets, shuffle_seed=11)
    ctx, outcome = dicomgen.run_steps(zip_path, STEPS, tmp_path / "out")
    assert outcome.status == "Success", outcome.error
    assert [(s.step_id, s.status) for s in outcome.steps] == [(s["id"], "done") for s in STEPS]
    return ctx


def _true_ml(truth: dict, slice_mm: float = SLICE_MM) -> float:
    return truth["lung_voxels"] * slice_mm * PIXEL_MM**2 / 1000


def _assert_lungs_of_the_phantom(ctx: StudyContext, truth: dict, slice_mm: float = SLICE_MM) -> None:
    lungs = ctx.result["lungs"]
    assert lungs["volume_ml"] == pytest.approx(_true_ml(truth, slice_mm), rel=0.02)
    assert lungs["mean_lung_density_hu"] == pytest.approx(truth["mean_lung_density_hu"], abs=2)
    assert lungs["plausible"], lungs["notes"]
    mask = ctx.values["lung_mask"]
    assert mask.sum() == pytest.approx(truth["lung_voxels"], rel=0.02)


def _assert_hu_of_the_phantom(ctx: StudyContext, hu: np.ndarray, slice_mm: float = SLICE_MM) -> None:
    """All slices, inferior first (the emphysema is superior, so the phantom is not symmetric in z)."""
    volume = ctx.values["volume"]
    assert ctx.result["volume"]["frames_used"] == SHAPE[0]
    assert volume.spacing_zyx == pytest.approx((slice_mm, PIXEL_MM, PIXEL_MM), abs=1e-3)
    assert np.array_equal(volume.hu, hu.astype(np.int16))


def test_clean_control_gives_the_phantom(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    ctx = _run(tmp_path, _classic((hu + 1024).astype(np.int16)))
    _assert_hu_of_the_phantom(ctx, hu)
    _assert_lungs_of_the_phantom(ctx, truth)


# --- BH-10: gantry tilt ------------------------------------------------------------------------------


def test_gantry_tilt_spacing_is_the_distance_between_the_tilted_planes(
    tmp_path: Path, phantom: tuple
) -> None:
    hu, truth = phantom
    tilt = math.radians(20.0)
    datasets = _classic(
        (hu + 1024).astype(np.int16), orientation=(1, 0, 0, 0, math.cos(tilt), math.sin(tilt))
    )
    rows, cols = SHAPE[1:]
    y0 = -rows * PIXEL_MM / 2
    for k, ds in enumerate(datasets):  # the table moves 2.5 mm along z; the planes lean 20° about left-right
        ds.ImagePositionPatient = [
            -cols * PIXEL_MM / 2,
            y0 * math.cos(tilt),
            k * SLICE_MM + y0 * math.sin(tilt),
        ]
        ds.SliceLocation = k * SLICE_MM
        ds.GantryDetectorTilt = 20
        del ds.SpacingBetweenSlices
    ctx = _run(tmp_path, datasets)
    plane_to_plane = SLICE_MM * math.cos(tilt)  # 2.349 mm
    _assert_hu_of_the_phantom(ctx, hu, plane_to_plane)
    assert ctx.result["volume"]["tilt_degrees"] == pytest.approx(20.0, abs=0.01)
    assert any("tilt" in w.lower() and "20" in w for w in ctx.warnings), ctx.warnings
    _assert_lungs_of_the_phantom(ctx, truth, plane_to_plane)  # shearing keeps each voxel's volume


# --- BH-11: Enhanced CT, frames stored head to feet ----------------------------------------------------


def test_enhanced_ct_stored_head_to_feet_equals_the_classic_study(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    classic = _classic((hu + 1024).astype(np.int16))
    for ds in classic:  # unsigned 12-bit in 16, as scanners write Enhanced CT
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
    enhanced = dicomgen.make_enhanced(classic[::-1])  # frame 1 is the most superior slice
    del enhanced.SpacingBetweenSlices
    enhanced.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SpacingBetweenSlices = SLICE_MM
    for keyword in (
        "PixelSpacing",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "RescaleIntercept",
        "RescaleSlope",
        "SliceThickness",
        "SpacingBetweenSlices",
    ):
        assert keyword not in enhanced, keyword  # only in the functional groups
    stored_z = [
        float(f.PlanePositionSequence[0].ImagePositionPatient[2])
        for f in enhanced.PerFrameFunctionalGroupsSequence
    ]
    assert stored_z == sorted(stored_z, reverse=True)
    ctx = _run(tmp_path, [enhanced])
    assert ctx.result["volume"]["enhanced_multiframe"] is True
    _assert_hu_of_the_phantom(ctx, hu)
    volume = ctx.values["volume"]
    np.testing.assert_allclose(volume.positions_mm, [k * SLICE_MM for k in range(SHAPE[0])], atol=1e-6)
    assert volume.affine[2, 3] == pytest.approx(0.0) and volume.affine[2, 2] == pytest.approx(SLICE_MM)
    _assert_lungs_of_the_phantom(ctx, truth)


# --- BH-12, BH-13: compressed signed pixels ------------------------------------------------------------


def _signed_series(hu: np.ndarray, bits_stored: int) -> list[Dataset]:
    """Stored value = HU (intercept 0), signed, ``bits_stored`` of 16 bits."""
    datasets = _classic(hu.astype(np.int16), intercept=0.0)
    for ds in datasets:
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    return datasets


def _j2k_sign_and_precision(ds: Dataset) -> tuple[bool, int]:
    """(signed, bits) of the first frame's JPEG 2000 codestream, from Ssiz of its SIZ marker."""
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    at = frame.index(b"\xff\x51")
    ssiz = frame[at + 2 + 2 + 2 + 32 + 2]  # marker, Lsiz, Rsiz, 8 × 4-byte sizes, Csiz
    return bool(ssiz & 0x80), (ssiz & 0x7F) + 1


def test_jpeg_ls_of_signed_12_bit_values_gives_exact_hu(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    datasets = [dicomgen.encode(ds, "jpeg-ls") for ds in _signed_series(hu, 12)]
    assert datasets[0].PixelRepresentation == 1 and datasets[0].RescaleIntercept == 0
    ctx = _run(tmp_path, datasets)
    assert ctx.result["volume"]["transfer_syntaxes"][0].startswith("1.2.840.10008.1.2.4.80 ")
    _assert_hu_of_the_phantom(ctx, hu)
    _assert_lungs_of_the_phantom(ctx, truth)


def test_jpeg_2000_unsigned_codestream_under_a_signed_header_gives_exact_hu(
    tmp_path: Path, phantom: tuple
) -> None:
    hu, truth = phantom
    datasets = []
    for ds in _signed_series(hu, 13):
        ds.PixelRepresentation = 0  # encode the 13-bit two's complement patterns as unsigned samples …
        ds.PixelData = (np.frombuffer(ds.PixelData, "<i2").astype(np.int32) & 0x1FFF).astype("<u2").tobytes()
        encoded = dicomgen.encode(ds, "jpeg2000")
        encoded.PixelRepresentation = 1  # … while the header says signed
        datasets.append(encoded)
    assert _j2k_sign_and_precision(datasets[0]) == (False, 13)
    ctx = _run(tmp_path, datasets)
    assert ctx.result["volume"]["transfer_syntaxes"][0].startswith("1.2.840.10008.1.2.4.90 ")
    _assert_hu_of_the_phantom(ctx, hu)
    _assert_lungs_of_the_phantom(ctx, truth)


# --- BH-14: padding outside the reconstruction circle -------------------------------------------------


def test_padding_outside_the_field_never_enters_the_lungs(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    rows, cols = SHAPE[1:]
    yy, xx = np.mgrid[0:rows, 0:cols]
    outside = (yy - (rows - 1) / 2) ** 2 + (xx - (cols - 1) / 2) ** 2 > (rows / 2) ** 2
    assert not (hu[:, outside] > -1000).any()  # the body lies inside the field
    stored = (hu + 1024).astype(np.int16)  # signed 16-bit, intercept -1024: padding is -3024 HU if rescaled
    stored[:, outside] = -2000
    datasets = _classic(stored)
    for ds in datasets:
        ds.PixelPaddingValue = -2000
    assert datasets[0].PixelRepresentation == 1 and datasets[0].RescaleIntercept == -1024
    ctx = _run(tmp_path, datasets)
    volume = ctx.values["volume"]
    assert volume.hu.shape == SHAPE and volume.spacing_zyx == pytest.approx((SLICE_MM, PIXEL_MM, PIXEL_MM))
    assert np.array_equal(volume.hu[:, ~outside], hu[:, ~outside].astype(np.int16))
    assert volume.hu[:, outside].max() <= -1000  # air or not-data, never tissue
    assert not ctx.values["lung_mask"][:, outside].any()
    _assert_lungs_of_the_phantom(ctx, truth)


# --- BH-15: MONOCHROME1 -----------------------------------------------------------------------------


def test_monochrome1_keeps_hu_and_previews_show_lungs_dark(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    datasets = _classic((hu + 1024).astype(np.int16))
    for ds in datasets:
        ds.PhotometricInterpretation = "MONOCHROME1"
    ctx = _run(tmp_path, datasets)
    _assert_hu_of_the_phantom(ctx, hu)
    _assert_lungs_of_the_phantom(ctx, truth)
    entry = next(
        e for e in ctx.result["key_slices"] if e["window"] == "lung" and e["file"].endswith("_2.png")
    )
    image = np.asarray(Image.open(io.BytesIO((ctx.out_dir.parent / entry["file"]).read_bytes())))
    level = hu[entry["slice_index"]]
    assert image.shape == level.shape  # standard orientation, square pixels: pixel for pixel
    lung, soft = image[level == LUNG_HU], image[level == BODY_HU]
    assert lung.size and soft.size
    assert lung.max() < 128 < soft.min(), (lung.max(), soft.min())


def test_the_in_process_reader_api_that_outside_checkers_use_stays(tmp_path: Path, phantom: tuple) -> None:
    """Outside oracles (the field-case probe) read a study in-process with these names and signatures."""
    from processor.dicom.lungs import lung_mask, lung_metrics
    from processor.dicom.scan import scan_members
    from processor.dicom.select import SelectionRules, evaluate, series_facts
    from processor.dicom.volume import load_volume
    from processor.intake.archive import Limits, open_arrival

    hu, truth = phantom
    zip_path = dicomgen.write_zip(tmp_path / "s.zip", _classic(np.round(hu + 1024).astype(np.int16)))
    with open_arrival(zip_path, Limits()) as contents:
        study = scan_members(contents.members).studies[0]
        verdicts = evaluate([series_facts(s) for s in study.series.values()], SelectionRules(min_slices=20))
        volume = load_volume(study.series[verdicts[0].facts.uid], workers=1)
    metrics = lung_metrics(volume.hu, lung_mask(volume.hu), volume.spacing_zyx).as_dict()
    assert {
        "frames_in_series",
        "frames_used",
        "duplicates_dropped",
        "phases_split",
        "spacing",
        "tilt_degrees",
    } <= set(volume.provenance)
    assert metrics["volume_ml"] == pytest.approx(
        truth["lung_voxels"] * float(np.prod(volume.spacing_zyx)) / 1000, rel=0.02
    )
