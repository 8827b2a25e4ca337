"""Issue 13, kinds 1, 2, 5: one volume or several decided by geometry; a series judged by its image
stack; no invented spacing. Truth comes from the phantom's construction, never from a previous run."""

from __future__ import annotations

import copy
import random
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from processor.dicom.ordering import acquisition_seconds, order_frames, time_clusters, tm_seconds
from processor.dicom.select import SelectionRules, SeriesFacts, evaluate
from tests import dicomgen

NORMAL = np.array([0.0, 0.0, 1.0])
SHAPE = (40, 64, 64)
SLICE_MM, PIXEL_MM = 2.5, 5.0  # 64 × 5 mm: an adult-sized field of view for the small phantom
STEPS = [
    {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
]


def _make(n: int, **kwargs: object) -> list:
    kwargs.setdefault("pixel_spacing", PIXEL_MM)
    return dicomgen.make_series(n, **kwargs)  # type: ignore[arg-type]


def _positions(z: list[float]) -> np.ndarray:
    return np.array([[0.0, 0.0, v] for v in z])


# --- kind 1: properties of the ordering ----------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(20, 90),
    step=st.floats(0.5, 5.0),
    cuts=st.lists(st.floats(0.05, 0.95), min_size=1, max_size=4),
    share=st.booleans(),
    labels=st.permutations(list(range(1, 6))),
    seed=st.integers(0, 2**31),
)
def test_any_split_of_one_scan_into_acquisitions_gives_back_the_whole_scan(
    n: int, step: float, cuts: list[float], share: bool, labels: list[int], seed: int
) -> None:
    z = [k * step for k in range(n)]
    bounds = sorted({max(1, min(n - 1, round(c * n))) for c in cuts})
    chunks, start = [], 0
    for b in [*bounds, n]:
        chunks.append(list(range(start, b)))
        start = b
    frames: list[tuple[float, str]] = []
    for c, chunk in enumerate(chunks):
        label = str(labels[c % len(labels)] + 10 * (c // len(labels)))
        if share and c > 0:  # the next acquisition starts at the last position of the previous one
            frames.append((z[chunk[0] - 1], label))
        frames.extend((z[k], label) for k in chunk)
    random.Random(seed).shuffle(frames)
    result = order_frames(
        _positions([f[0] for f in frames]), NORMAL, phase_keys={"AcquisitionNumber": [f[1] for f in frames]}
    )
    assert result.phases is None
    np.testing.assert_allclose(result.positions_mm, z)  # every position once, none lost, in order
    assert len(result.dropped) == len(frames) - n


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(20, 80),
    step=st.floats(1.0, 5.0),
    offset=st.floats(0.05, 0.95),
    cover=st.floats(0.6, 1.0),
    second_first=st.booleans(),
    rule=st.sampled_from(["first", "last", "largest"]),
    seed=st.integers(0, 2**31),
)
def test_two_phases_at_any_offset_never_interleave(
    n: int, step: float, offset: float, cover: float, second_first: bool, rule: str, seed: int
) -> None:
    a = [k * step for k in range(n)]
    m = max(2, round(n * cover))
    b = [k * step + offset * step for k in range(m)]
    labels = ("7", "3") if second_first else ("3", "7")  # key order decides "first", not file order
    frames = [(v, labels[0], 0) for v in a] + [(v, labels[1], 1) for v in b]
    random.Random(seed).shuffle(frames)
    result = order_frames(
        _positions([f[0] for f in frames]),
        NORMAL,
        phase_keys={"AcquisitionNumber": [f[1] for f in frames]},
        rule=rule,
    )
    kept_phase = {frames[i][2] for i in result.order}
    assert len(kept_phase) == 1  # never an interleaved stack
    assert result.phases is not None and len(result.phases["phases"]) == 2
    in_key_order = [0, 1] if not second_first else [1, 0]  # phase index by ascending AcquisitionNumber
    expected = {
        "first": in_key_order[0],
        "last": in_key_order[1],
        "largest": 0 if n > m or (n == m and in_key_order[0] == 0) else 1,
    }[rule]
    assert kept_phase == {expected}
    assert len(result.order) == (n if expected == 0 else m)
    assert np.all(np.diff(result.positions_mm) > 0)


def test_per_slice_acquisition_numbers_with_two_passes_are_split_by_acquisition_time() -> None:
    z = [k * 2.5 for k in range(30)]
    positions = _positions(z + [v + 1.2 for v in z])
    per_slice = [str(i) for i in range(60)]  # no use as a phase key: every image has its own number
    times = time_clusters([36000 + 0.1 * k for k in range(30)] + [36045 + 0.1 * k for k in range(30)])
    result = order_frames(
        positions, NORMAL, phase_keys={"AcquisitionNumber": per_slice, "acquisition time": times}
    )
    assert result.phases["split_by"] == "acquisition time"
    assert sorted(result.order) == list(range(30))


def test_temporal_positions_at_identical_positions_are_phases_and_the_rule_picks_one() -> None:
    z = [k * 2.5 for k in range(20)]
    positions = _positions(z * 3)
    temporal = ["1"] * 20 + ["2"] * 20 + ["3"] * 20
    for rule, kept in (("first", range(0, 20)), ("last", range(40, 60))):
        result = order_frames(positions, NORMAL, phase_keys={"temporal position": temporal}, rule=rule)
        assert sorted(result.order) == list(kept)
        assert [p["frames"] for p in result.phases["phases"]] == [20, 20, 20]


def test_parts_that_overlap_by_a_few_slices_at_other_positions_do_not_interleave() -> None:
    first = [k * 2.5 for k in range(30)]  # 0 .. 72.5
    second = [70.0 + 1.2 + k * 2.5 for k in range(30)]  # 71.2 .. 143.7: overlaps the first by one slice
    result = order_frames(
        _positions(first + second), NORMAL, phase_keys={"AcquisitionNumber": ["1"] * 30 + ["2"] * 30}
    )
    assert result.phases is None and result.parts is not None
    d = result.positions_mm
    assert np.all(np.diff(d) > 1.0)  # no 1.2/1.3 mm interleaving at the seam
    assert result.parts["replaced_by_later_part"] == 1  # the first part's 72.5 mm slice gave way


def test_a_few_stray_images_never_become_the_chosen_phase() -> None:
    z = [k * 2.5 for k in range(80)]
    # one repeated image with a lower AcquisitionNumber inside the scan: left out, never "phase 1"
    result = order_frames(
        _positions([*z, 100.0]), NORMAL, phase_keys={"AcquisitionNumber": ["2"] * 80 + ["1"]}
    )
    assert result.phases is None and len(result.order) == 80 and 80 not in result.order
    assert result.left_out["frames"] == 1
    # three slices of the scan without the tag (on its grid, at free positions) fill their places
    values = ["2"] * 80
    for k in (10, 40, 70):
        values[k] = ""
    result = order_frames(_positions(z), NORMAL, phase_keys={"AcquisitionNumber": values})
    assert result.phases is None and len(result.order) == 80


def test_per_image_numbers_of_a_second_pass_never_reach_the_first_pass_volume() -> None:
    z = [k * 2.5 for k in range(80)]
    second = [v + 1.25 for v in z]
    values = ["1"] * 80 + [str(k + 2) for k in range(80)]  # pass 1 one number, pass 2 one per image
    result = order_frames(_positions(z + second), NORMAL, phase_keys={"AcquisitionNumber": values})
    assert sorted(result.order) == list(range(80))


def test_passes_told_apart_by_acquisition_date_and_time_even_across_midnight() -> None:
    z = [k * 2.5 for k in range(40)]
    before = acquisition_seconds("20260101", "235930", "")
    after = acquisition_seconds("", "", "20260102000110.5")
    assert after - before == pytest.approx(100.5)
    times = time_clusters([before + 0.1 * k for k in range(40)] + [after + 0.1 * k for k in range(40)])
    result = order_frames(_positions(z + z), NORMAL, phase_keys={"acquisition time": times})
    assert sorted(result.order) == list(range(40))  # the 23:59:30 pass is the first
    assert result.phases["phases"][0]["keys"] == ["2026-01-01 23:59:30.0"]


def test_a_second_pass_overlapping_a_good_part_of_the_first_is_a_phase_not_a_part() -> None:
    a = [k * 2.5 for k in range(80)]
    b = [120.0 + k * 2.5 for k in range(80)]  # 40 % of it inside the first pass's range
    result = order_frames(
        _positions(a + b), NORMAL, phase_keys={"AcquisitionNumber": ["1"] * 80 + ["2"] * 80}
    )
    assert result.phases is not None and sorted(result.order) == list(range(80))


def test_tm_values() -> None:
    assert tm_seconds("101502.5") == 10 * 3600 + 15 * 60 + 2.5
    assert tm_seconds("10:15:02") == 36902
    assert tm_seconds("") is None and tm_seconds("garbage") is None


# --- kinds 1, 2 and 5 end to end on real DICOM --------------------------------------------------------


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, dict]:
    return dicomgen.chest_phantom(SHAPE)


def _stored(hu: np.ndarray) -> np.ndarray:
    return (hu + 1024).astype(np.int16)


def _run(tmp_path: Path, datasets: list, name: str = "study.zip") -> tuple:
    zip_path = dicomgen.write_zip(tmp_path / name, datasets, shuffle_seed=3)
    return dicomgen.run_steps(zip_path, STEPS, tmp_path / "out")


def _true_ml(truth: dict, pixel: float = PIXEL_MM) -> float:
    return truth["lung_voxels"] * SLICE_MM * pixel**2 / 1000


def test_two_acquisitions_sharing_a_position_are_one_volume(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    stored = _stored(hu)
    study, series = generate_uid(), generate_uid()
    feet = _make(21, study_uid=study, series_uid=series, stored=stored[:21])
    head = _make(20, study_uid=study, series_uid=series, stored=stored[20:], origin=(0, 0, 20 * SLICE_MM))
    for ds in feet:
        ds.AcquisitionNumber = 2
    for ds in head:
        ds.AcquisitionNumber = 3
    ctx, outcome = _run(tmp_path, feet + head)
    assert outcome.status == "Success", outcome.error
    volume = ctx.result["volume"]
    assert volume["frames_used"] == 40 and volume["duplicates_dropped"] == 1
    assert volume["parts_merged"]["merged_by"] == "AcquisitionNumber"
    assert ctx.values["volume"].spacing_zyx[0] == pytest.approx(SLICE_MM)
    assert np.array_equal(ctx.values["volume"].hu, hu.astype(np.int16))
    assert ctx.result["lungs"]["volume_ml"] == pytest.approx(_true_ml(truth), rel=0.02)
    assert any("already-used position" in w for w in ctx.warnings)


def test_two_contrast_phases_offset_in_z_are_separated(tmp_path: Path, phantom: tuple) -> None:
    hu, truth = phantom
    study, series = generate_uid(), generate_uid()
    enhanced = hu.copy()
    enhanced[hu == 40.0] = 200.0
    plain = _make(40, study_uid=study, series_uid=series, stored=_stored(hu))
    contrast = _make(40, study_uid=study, series_uid=series, stored=_stored(enhanced), origin=(0, 0, 1.2))
    for ds in plain:
        ds.AcquisitionNumber = 1
    for ds in contrast:
        ds.AcquisitionNumber = 2
        ds.InstanceNumber += 40
    ctx, outcome = _run(tmp_path, plain + contrast)
    assert outcome.status == "Success", outcome.error
    volume = ctx.values["volume"]
    assert volume.hu.shape[0] == 40 and volume.spacing_zyx[0] == pytest.approx(SLICE_MM)
    assert np.array_equal(volume.hu, hu.astype(np.int16))  # the first phase, all of it, nothing else
    phases = ctx.result["volume"]["phases_split"]
    assert phases["chosen"] == 1 and [p["frames"] for p in phases["phases"]] == [40, 40]
    body = [p["mean_body_hu"] for p in phases["phases"]]
    assert body[1] > body[0] + 100  # the enhanced pass is reported, and recognisably so
    assert any("2 phases" in w for w in ctx.warnings)
    assert ctx.result["lungs"]["volume_ml"] == pytest.approx(_true_ml(truth), rel=0.02)


def test_orientation_noise_on_either_side_of_a_rounding_edge_is_one_stack(
    tmp_path: Path, phantom: tuple
) -> None:
    hu, truth = phantom
    datasets = _make(40, stored=_stored(hu))
    for k, ds in enumerate(datasets):
        ds.ImageOrientationPatient = [1, 0.0004 if k % 2 else 0.0006, 0, 0, 1, 0]
    ctx, outcome = _run(tmp_path, datasets)
    assert outcome.status == "Success", outcome.error
    assert ctx.result["series_selection"]["set_aside"] == {}
    assert ctx.values["volume"].hu.shape == SHAPE


@pytest.mark.parametrize(
    "foreign", ["scout", "rtstruct", "secondary capture", "coronal", "matrix", "spacing"]
)
def test_foreign_instances_in_the_series_are_set_aside_and_counted(
    tmp_path: Path, phantom: tuple, foreign: str
) -> None:
    hu, truth = phantom
    study, series = generate_uid(), generate_uid()
    axial = _make(40, study_uid=study, series_uid=series, stored=_stored(hu))
    if foreign == "scout":
        extra = dicomgen.make_scout(study_uid=study)[0]
        extra.SeriesInstanceUID = series
        reason = "localizer/scout"
    elif foreign == "rtstruct":
        extra = dicomgen.make_rtstruct(study_uid=study, series_uid=series)
        reason = "non-image object (RT Structure Set Storage)"
    elif foreign == "secondary capture":
        extra = dicomgen.make_secondary_capture(axial[0])
        reason = "secondary capture"
    else:
        extra = copy.deepcopy(axial[5])
        extra.SOPInstanceUID = extra.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        if foreign == "coronal":
            extra.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
            reason = "other orientation (coronal)"
        elif foreign == "matrix":
            dicomgen._set_pixels(extra, np.zeros((32, 48), np.int16))
            reason = "other matrix size (32x48)"
        else:
            extra.PixelSpacing = [4.5, 4.5]
            reason = "other pixel spacing (4.5\\4.5 mm)"
    # the foreign object first in the ZIP, so that it would be instances[0]
    zip_path = dicomgen.write_zip(tmp_path / "study.zip", [extra, *axial])
    ctx, outcome = dicomgen.run_steps(zip_path, STEPS, tmp_path / "out")
    assert outcome.status == "Success", outcome.error
    selection = ctx.result["series_selection"]
    assert selection["set_aside"] == {reason: 1} == ctx.result["volume"]["set_aside"]
    assert selection["series"][0]["modality"] == "CT" and selection["series"][0]["count"] == 40
    assert ctx.values["volume"].hu.shape == SHAPE
    assert ctx.result["lungs"]["volume_ml"] == pytest.approx(_true_ml(truth), rel=0.02)
    assert any("set aside" in w and reason in w for w in ctx.warnings)


@pytest.mark.parametrize("numbering", ["same", "reversed"])
def test_two_reconstructions_under_one_series_uid_are_never_mixed(
    tmp_path: Path, phantom: tuple, numbering: str
) -> None:
    hu, truth = phantom
    study, series = generate_uid(), generate_uid()
    sharp = hu.copy()
    sharp[hu == -850.0] = -960.0  # the sharp kernel reads the lungs darker: a mix would be a plausible lie
    soft = _make(40, study_uid=study, series_uid=series, stored=_stored(hu), kernel="B30f")
    lung = _make(40, study_uid=study, series_uid=series, stored=_stored(sharp), kernel="B70f")
    if numbering == "reversed":
        for k, ds in enumerate(lung):
            ds.InstanceNumber = 40 - k
    ctx, outcome = _run(tmp_path, soft + lung)
    assert outcome.status == "Success", outcome.error
    assert np.array_equal(ctx.values["volume"].hu, hu.astype(np.int16))  # all B30f (first in key order)
    phases = ctx.result["volume"]["phases_split"]
    assert phases["split_by"] == "reconstruction" and len(phases["phases"]) == 2
    assert ctx.result["lungs"]["mean_lung_density_hu"] == pytest.approx(truth["mean_lung_density_hu"], abs=2)


def test_a_series_that_is_only_foreign_objects_is_rejected_in_words(tmp_path: Path, phantom: tuple) -> None:
    hu, _ = phantom
    study = generate_uid()
    axial = _make(40, study_uid=study, stored=_stored(hu))
    rt = dicomgen.make_rtstruct(study_uid=study, series_uid=generate_uid())
    zip_path = dicomgen.write_zip(tmp_path / "study.zip", [rt, *axial])
    ctx, outcome = dicomgen.run_steps(zip_path, STEPS, tmp_path / "out")
    assert outcome.status == "Success"
    rows = {r["series_uid"]: r for r in ctx.result["series_selection"]["series"]}
    assert "no image stack" in rows[rt.SeriesInstanceUID]["reason"]
    assert "RT Structure Set" in rows[rt.SeriesInstanceUID]["reason"]


@pytest.mark.parametrize("case", ["imager", "missing", "zero"])
def test_pixel_spacing_is_never_invented(tmp_path: Path, phantom: tuple, case: str) -> None:
    hu, truth = phantom
    datasets = _make(40, stored=_stored(hu), pixel_spacing=7.0)
    for ds in datasets:
        if case == "zero":
            ds.PixelSpacing = [0, 0]
        else:
            del ds.PixelSpacing
        if case == "imager":
            ds.ImagerPixelSpacing = [7.0, 7.0]
    ctx, outcome = _run(tmp_path, datasets)
    volume = ctx.values["volume"]
    if case == "imager":
        assert volume.spacing_zyx == pytest.approx((SLICE_MM, 7.0, 7.0))
        assert volume.spacing_unknown is None
        assert ctx.result["volume"]["in_plane_spacing"]["source"].startswith("ImagerPixelSpacing")
        assert any("ImagerPixelSpacing" in w for w in ctx.warnings)
        assert ctx.result["lungs"]["volume_ml"] == pytest.approx(_true_ml(truth, 7.0), rel=0.02)
    else:
        assert volume.spacing_unknown and "pixel spacing unknown" in volume.spacing_unknown
        assert np.isnan(volume.spacing_zyx[1]) and np.isnan(volume.spacing_zyx[2])
        assert ctx.result["volume"]["spacing_zyx"][1:] == [None, None]
        assert ctx.result["lungs"]["volume_ml"] is None
        assert any("pixel spacing unknown" in w for w in ctx.warnings)
        # orientation still known: previews keep radiological orientation
        np.testing.assert_allclose(volume.row_cosines, [1, 0, 0])


def test_unknown_slice_thickness_is_ranked_by_the_measured_step_and_called_unknown() -> None:
    common = {
        "description": "",
        "modality": "CT",
        "image_type": ("ORIGINAL", "PRIMARY", "AXIAL"),
        "orientations": 1,
        "tilt_from_axial_deg": 0.0,
        "matrix_sizes": ((512, 512),),
        "pixel_spacings": ((0.7, 0.7),),
    }
    unknown_thin = SeriesFacts(
        uid="1.1",
        number=3,
        image_count=300,
        slice_count=300,
        thickness_mm=None,
        coverage_mm=299.0,
        measured_step_mm=1.0,
        **common,
    )
    thick = SeriesFacts(
        uid="1.2",
        number=2,
        image_count=60,
        slice_count=60,
        thickness_mm=5.0,
        coverage_mm=295.0,
        measured_step_mm=5.0,
        **common,
    )
    verdicts = evaluate([thick, unknown_thin], SelectionRules())
    assert verdicts[0].facts.uid == "1.1"
    assert verdicts[0].row()["thickness_source"] == "measured step between positions"
    unknown_thick = SeriesFacts(
        uid="1.3",
        number=4,
        image_count=60,
        slice_count=60,
        thickness_mm=None,
        coverage_mm=295.0,
        measured_step_mm=5.0,
        **common,
    )
    thin = SeriesFacts(
        uid="1.4",
        number=5,
        image_count=300,
        slice_count=300,
        thickness_mm=1.0,
        coverage_mm=299.0,
        measured_step_mm=1.0,
        **common,
    )
    verdicts = evaluate([unknown_thick, thin], SelectionRules())
    assert verdicts[0].facts.uid == "1.4"
    assert "unknown (SliceThickness missing; measured step 5 mm)" in verdicts[1].reason


def test_phases_and_set_aside_images_reach_the_json_and_the_excel_row(tmp_path: Path, phantom: tuple) -> None:
    import json

    import openpyxl

    from processor.outputs.excel import HEADERS, NOTES_HEADER
    from tests.conftest import Project

    hu, _ = phantom
    study, series = generate_uid(), generate_uid()
    plain = _make(40, study_uid=study, series_uid=series, stored=_stored(hu))
    contrast = _make(40, study_uid=study, series_uid=series, stored=_stored(hu + 100), origin=(0, 0, 1.2))
    for n, ds in enumerate(plain + contrast):
        ds.AcquisitionNumber = 1 if n < 40 else 2
    scout = dicomgen.make_scout(study_uid=study)[0]
    scout.SeriesInstanceUID = series
    project = Project(tmp_path, STEPS)
    zip_path = dicomgen.write_zip(tmp_path / "two-phases.zip", [scout, *plain, *contrast])
    done = project.run("process", str(zip_path))
    assert done.returncode == 0, done.stderr
    doc = json.loads(project.results()[0].read_text())
    assert doc["series_selection"]["set_aside"] == {"localizer/scout": 1}
    assert doc["volume"]["phases_split"]["chosen"] == 1 and doc["volume"]["frames_used"] == 40
    assert project.run("report").returncode == 0
    book = openpyxl.load_workbook(next((project.outbox / "reports").glob("*.xlsx")))
    sheet = book.worksheets[0]
    row = dict(zip(HEADERS, [c.value for c in sheet[2]], strict=True))
    assert "2 phases" in row[NOTES_HEADER] and "localizer/scout: 1" in row[NOTES_HEADER]
    lines = row[NOTES_HEADER].count("\n") + 1
    assert sheet.row_dimensions[2].height >= 15 * lines  # tall enough that wrapped notes do not overlap


def test_a_zero_rescale_slope_is_refused_and_a_missing_rescale_is_said(
    tmp_path: Path, phantom: tuple
) -> None:
    hu, _ = phantom
    zero = _make(40, stored=_stored(hu))
    for ds in zero:
        ds.RescaleSlope = 0
    _, outcome = _run(tmp_path / "zero", zero)
    assert outcome.status == "Failure" and "RescaleSlope is 0 in 40 image(s)" in (outcome.error or "")
    missing = _make(40, stored=hu.astype(np.int16))  # stored values already HU, rescale attributes gone
    for ds in missing:
        del ds.RescaleSlope
        del ds.RescaleIntercept
    ctx, outcome = _run(tmp_path / "missing", missing)
    assert outcome.status == "Success" and ctx.result["volume"]["rescale_missing"] == 40
    assert any("RescaleSlope/RescaleIntercept missing in 40 image(s)" in w for w in ctx.warnings)
    assert np.array_equal(ctx.values["volume"].hu, hu.astype(np.int16))


def test_an_enhanced_ct_holding_an_axial_and_a_coronal_stack_uses_the_axial_one(
    tmp_path: Path, phantom: tuple
) -> None:
    hu, truth = phantom
    study, series = generate_uid(), generate_uid()
    axial = _make(40, study_uid=study, series_uid=series, stored=_stored(hu))
    coronal = _make(
        20, study_uid=study, series_uid=series, stored=_stored(hu[:20]), orientation=(1, 0, 0, 0, 0, -1)
    )
    enhanced = dicomgen.make_enhanced(axial + coronal)
    for item in enhanced.PerFrameFunctionalGroupsSequence[40:]:
        item.PlaneOrientationSequence = [dicomgen.sequence_item(ImageOrientationPatient=[1, 0, 0, 0, 0, -1])]
    ctx, outcome = _run(tmp_path, [enhanced])
    assert outcome.status == "Success", outcome.error
    reason = "other orientation (coronal, frames of a multi-frame image)"
    assert ctx.result["series_selection"]["set_aside"] == {reason: 20} == ctx.result["volume"]["set_aside"]
    assert np.array_equal(ctx.values["volume"].hu, hu.astype(np.int16))
    assert ctx.result["lungs"]["volume_ml"] == pytest.approx(_true_ml(truth), rel=0.02)


def _comma_decimals(data: bytes) -> bytes:
    """The file with ImagePositionPatient written with decimal commas ('2,5'), as some exports do."""
    at = data.index(b"\x20\x00\x32\x00DS")
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    value = data[at + 8 : at + 8 + length]
    return data[: at + 8] + value.replace(b".", b",") + data[at + 8 + length :]


def test_images_without_geometry_are_named_as_such(tmp_path: Path, phantom: tuple) -> None:
    hu, _ = phantom
    some = _make(40, stored=_stored(hu))
    for ds in some[:5]:
        del ds.ImageOrientationPatient
    ctx, outcome = _run(tmp_path / "some", some)
    assert ctx.result["series_selection"]["set_aside"] == {"no ImageOrientationPatient (left out)": 5}
    zip_path = tmp_path / "commas.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for k, ds in enumerate(_make(40, stored=_stored(hu))):
            zf.writestr(f"IM{k:04d}.dcm", _comma_decimals(dicomgen.to_bytes(ds)))
    _, outcome = dicomgen.run_steps(zip_path, STEPS, tmp_path / "every")
    assert outcome.status == "Failure"
    assert "40 image(s) without a readable ImagePositionPatient/ImageOrientationPatient" in outcome.error


def test_enhanced_ct_with_a_non_finite_rescale_is_named_never_used(tmp_path: Path, phantom: tuple) -> None:
    """A RescaleSlope of "NaN" in an Enhanced CT frame is as unreadable as a missing one: it never turns
    into NaN Hounsfield units; the frames count as lacking their rescale, as a classic file's would."""
    hu, _ = phantom
    classic = _make(24, stored=_stored(hu)[:24])
    enhanced = dicomgen.make_enhanced(classic)
    for item in enhanced.PerFrameFunctionalGroupsSequence[:3]:
        transform = item.get("PixelValueTransformationSequence") or enhanced.SharedFunctionalGroupsSequence[
            0
        ].get("PixelValueTransformationSequence")
        assert transform is not None, "the generator states the rescale per frame or shared"
        if "PixelValueTransformationSequence" not in item:
            item.PixelValueTransformationSequence = copy.deepcopy(transform)
        with warnings.catch_warnings():  # pydicom warns that "NaN" is not a valid DS: that is the point
            warnings.simplefilter("ignore")
            item.PixelValueTransformationSequence[0].RescaleSlope = "NaN"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dicomgen.write_zip(tmp_path / "study.zip", [enhanced])
    ctx, outcome = dicomgen.run_steps(tmp_path / "study.zip", STEPS, tmp_path / "out")
    volume = ctx.result["volume"]
    assert volume["rescale_missing"] == 3
    assert any("RescaleSlope/RescaleIntercept missing in 3 image(s)" in w for w in ctx.warnings)
    assert np.isfinite(ctx.values["volume"].hu).all()


def test_the_frames_and_the_stack_of_a_series_follow_its_instances(tmp_path: Path) -> None:
    """Selection and the volume ask for the same frames and image stack; they are computed once
    for a list of instances (``Series.memo``) and again whenever the list changes — here or in
    the stack series a caller was handed — and a pickled series carries none of it."""
    import pickle

    from processor.dicom.frames import frames_of
    from processor.dicom.scan import scan_members
    from processor.dicom.stack import image_stack
    from processor.intake.archive import Limits, open_arrival

    study, uid = generate_uid(), generate_uid()
    scout = dicomgen.make_scout(study_uid=study)[0]
    scout.SeriesInstanceUID = uid
    axial = _make(6, study_uid=study, series_uid=uid)
    with open_arrival(dicomgen.write_zip(tmp_path / "s.zip", [scout, *axial]), Limits()) as contents:
        series = scan_members(contents.members).studies[0].series[uid]
    first = image_stack(series)
    assert first.set_aside == {"localizer/scout": 1} and len(first.series.instances) == 6
    assert len(frames_of(series)) == 7 and frames_of(first.series) == frames_of(first.series)
    computed = first.series._memo["frames"][1]
    again = image_stack(series)
    assert again.set_aside == first.set_aside and again is not first and again.series is not first.series
    assert frames_of(again.series) == frames_of(first.series)
    assert again.series._memo["frames"][1] is computed, "the stack's frames computed once"
    again.set_aside.clear()  # each caller's own Stack
    assert image_stack(series).set_aside == {"localizer/scout": 1}
    first.series.instances.append(series.instances[0])  # a caller changed its stack series' list
    assert len(again.series.instances) == 6 and len(image_stack(series).series.instances) == 6
    assert len(frames_of(first.series)) == 7 and len(frames_of(again.series)) == 6
    scout_instance = series.instances.pop(0)
    assert scout_instance.facts.image_type and not image_stack(series).set_aside
    assert len(frames_of(series)) == 6 and [f.instance for f in frames_of(series)] == list(range(6))
    copied = pickle.loads(pickle.dumps(series))
    assert copied._memo == {} and [i.sop_uid for i in copied.instances] == [
        i.sop_uid for i in series.instances
    ]


@pytest.mark.parametrize("left_out", [(), (0,), (3,), (0, 4, 7), (7,)])
def test_the_stack_frames_taken_from_its_series_are_those_computed_for_its_files(
    tmp_path: Path, left_out: tuple[int, ...]
) -> None:
    """The image stack's frames are renumbered from its series' frames, not computed again; they
    are the frames its own files give (each naming its file by its index in the stack), whichever
    files were set aside, first, in the middle or last."""
    from processor.dicom.frames import _frames_of, frames_of
    from processor.dicom.scan import scan_members
    from processor.dicom.stack import image_stack
    from processor.intake.archive import Limits, open_arrival

    study, uid = generate_uid(), generate_uid()
    files = _make(8, study_uid=study, series_uid=uid)
    for k in left_out:  # a scout in the series at this place: set aside
        scout = dicomgen.make_scout(study_uid=study)[0]
        scout.SeriesInstanceUID = uid
        files[k] = scout
    with open_arrival(dicomgen.write_zip(tmp_path / "s.zip", files), Limits()) as contents:
        series = scan_members(contents.members).studies[0].series[uid]
    stack = image_stack(series)
    assert stack.set_aside == ({"localizer/scout": len(left_out)} if left_out else {})
    taken = frames_of(stack.series)
    assert taken == _frames_of(stack.series)  # computed afresh from the stack's own files
    assert [f.instance for f in taken] == list(range(8 - len(left_out)))
    assert [f.position for f in taken] == [
        f.position for f in frames_of(series) if f.instance not in left_out
    ]
