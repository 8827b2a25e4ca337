"""dicom.select_series: hard rules, ranking, a reason for every series, through the real engine."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from processor.dicom.select import (
    DEFAULT_LUNG_KERNELS,
    SelectionRules,
    SeriesFacts,
    evaluate,
    is_lung_kernel,
)
from processor.pipeline.spec import PipelineSpec, compile_steps
from processor.pipeline.step import StepEnv
from processor.steps import default_registry
from tests import dicomgen

RULES = SelectionRules()


def _study(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Scout + thick + thin lung-kernel + thin soft-kernel + MR + DERIVED MIP + sagittal + too short."""
    study = generate_uid()
    parts = {
        "scout": dicomgen.make_scout(study_uid=study, series_number=1),
        "thick": dicomgen.make_series(
            24, study_uid=study, series_number=2, spacing=5.0, description="Thorax 5mm", kernel="B30f"
        ),
        "lung": dicomgen.make_series(
            30, study_uid=study, series_number=3, spacing=1.0, description="Lung 1mm", kernel="B70f"
        ),
        "soft": dicomgen.make_series(
            30, study_uid=study, series_number=4, spacing=1.0, description="Soft 1mm", kernel="B30f"
        ),
        "mr": dicomgen.make_mr_series(24, study_uid=study, series_number=5, description="T1"),
        "mip": dicomgen.make_series(
            30,
            study_uid=study,
            series_number=6,
            spacing=1.0,
            description="MIP lung",
            kernel="B70f",
            image_type=("DERIVED", "SECONDARY", "MIP"),
        ),
        "sagittal": dicomgen.make_series(
            30,
            study_uid=study,
            series_number=7,
            spacing=1.0,
            kernel="B70f",
            orientation=(0, 1, 0, 0, 0, -1),
            description="Sag MPR",
        ),
        "short": dicomgen.make_series(10, study_uid=study, series_number=8, spacing=1.0, kernel="B70f"),
    }
    datasets = [ds for series in parts.values() for ds in series]
    uids = {name: str(series[0].SeriesInstanceUID) for name, series in parts.items()}
    return dicomgen.write_zip(tmp_path / "study.zip", datasets, shuffle_seed=7), uids


def test_thin_lung_kernel_original_wins_and_every_other_series_has_its_reason(tmp_path: Path) -> None:
    path, uids = _study(tmp_path)
    ctx, outcome = dicomgen.run_steps(path, [{"id": "series", "uses": "dicom.select_series"}], tmp_path)
    assert outcome.status == "Success"
    selection = ctx.result["series_selection"]
    assert selection["chosen"] == uids["lung"] == ctx.values["series"].uid
    rows = {row["series_uid"]: row for row in selection["series"]}
    assert set(rows) == set(uids.values())
    for row in rows.values():
        assert {
            "series_uid",
            "number",
            "description",
            "modality",
            "kernel",
            "thickness",
            "count",
            "rank",
            "score",
            "reason",
        } <= set(row)
    reason = {name: rows[uid]["reason"] for name, uid in uids.items()}
    assert rows[uids["lung"]]["rank"] == 1 and reason["lung"] == "chosen"
    assert "kernel B30f is not a lung kernel" in reason["soft"]
    assert "thicker slices (5.0 mm vs 1.0 mm)" in reason["thick"]
    assert "DERIVED (ImageType DERIVED\\SECONDARY\\MIP)" in reason["mip"]
    assert reason["scout"].startswith("rejected:") and "localizer" in reason["scout"]
    assert "modality MR is not CT" in reason["mr"]
    assert "not axial" in reason["sagittal"]
    assert "10 usable slice positions, fewer than min_slices=20" in reason["short"]
    ranks = sorted(r["rank"] for r in rows.values() if r["rank"] is not None)
    assert ranks == [1, 2, 3, 4]  # lung, soft, thick, mip
    assert rows[uids["lung"]]["kernel"] == "B70f" and rows[uids["lung"]]["thickness"] == 1.0
    assert rows[uids["lung"]]["count"] == 30 and rows[uids["scout"]]["rank"] is None


def test_no_eligible_series_is_a_failure_listing_every_series(tmp_path: Path) -> None:
    study = generate_uid()
    datasets = [*dicomgen.make_scout(study_uid=study), *dicomgen.make_mr_series(24, study_uid=study)]
    path = dicomgen.write_zip(tmp_path / "none.zip", datasets)
    ctx, outcome = dicomgen.run_steps(path, [{"id": "series", "uses": "dicom.select_series"}], tmp_path)
    assert outcome.status == "Failure"
    assert "no eligible series" in outcome.error and "modality MR is not CT" in outcome.error
    assert "localizer" in outcome.error and "Fix:" in outcome.error
    assert ctx.result["series_selection"]["chosen"] is None
    assert len(ctx.result["series_selection"]["series"]) == 2 and "series" not in ctx.values


def test_rules_come_from_the_yaml_block(tmp_path: Path) -> None:
    study = generate_uid()
    datasets = dicomgen.make_series(12, study_uid=study, kernel="SHARPX")
    path = dicomgen.write_zip(tmp_path / "s.zip", datasets)
    steps = [
        {
            "id": "series",
            "uses": "dicom.select_series",
            "with": {"min_slices": 10, "lung_kernels": ["SHARP.*"], "max_thickness_mm": 2.0},
        }
    ]
    ctx, outcome = dicomgen.run_steps(path, steps, tmp_path)
    assert outcome.status == "Success"
    assert ctx.result["series_selection"]["series"][0]["score"] == pytest.approx(
        1000 + 0 + 4 * 75 + 2 + 0.028 + 12e-7, abs=1e-9
    )


def test_bad_kernel_pattern_and_unknown_parameter_fail_at_compile_time(tmp_path: Path) -> None:
    spec = PipelineSpec.model_validate(
        {
            "name": "t",
            "version": 1,
            "steps": [
                {
                    "id": "series",
                    "uses": "dicom.select_series",
                    "with": {"lung_kernels": ["B7(0"], "min_slice": 3},
                }
            ],
        }
    )
    _, problems = compile_steps(spec, default_registry(), StepEnv(root=tmp_path))
    text = "\n".join(problems)
    assert "steps[0].with.lung_kernels" in text and "not a valid regular expression" in text
    assert "steps[0].with.min_slice" in text


@pytest.mark.parametrize(
    "kernel",
    [
        "LUNG",
        "B60f",
        "B70f",
        "B80f",
        "B70s",
        "I70f\\3",
        "Br60d",
        "Br64",
        "Bl57d",
        "FC51",
        "FC81",
        "FC86",
        "YA",
        "YB",
        "BONEPLUS",
        "lung",
    ],
)
def test_default_lung_kernels_match(kernel: str) -> None:
    assert is_lung_kernel(kernel, DEFAULT_LUNG_KERNELS)


@pytest.mark.parametrize(
    "kernel",
    ["STANDARD", "SOFT", "B30f", "B45f", "B90f", "Br40d", "Br36", "FC13", "FC52", "C", "B", "BONE", ""],
)
def test_soft_kernels_do_not_match(kernel: str) -> None:
    assert not is_lung_kernel(kernel, DEFAULT_LUNG_KERNELS)


# --- properties of the pure rules ------------------------------------------------------------------

facts_strategy = st.builds(
    SeriesFacts,
    uid=st.uuids().map(str),
    number=st.one_of(st.none(), st.integers(1, 999)),
    description=st.sampled_from(["", "Chest", "Lung 1mm", "MIP 10mm", "Thorax"]),
    modality=st.sampled_from(["CT", "CT", "CT", "MR", "PT"]),
    image_count=st.integers(0, 600),
    slice_count=st.integers(0, 600),
    image_type=st.sampled_from(
        [
            ("ORIGINAL", "PRIMARY", "AXIAL"),
            ("DERIVED", "SECONDARY", "MIP"),
            ("ORIGINAL", "PRIMARY", "LOCALIZER"),
            ("DERIVED", "SECONDARY", "REFORMATTED"),
        ]
    ),
    kernel=st.sampled_from(["B70f", "B30f", "LUNG", "STANDARD", "FC86", ""]),
    thickness_mm=st.one_of(st.none(), st.sampled_from([0.625, 1.0, 1.25, 2.0, 3.0, 5.0, 7.5])),
    coverage_mm=st.floats(0, 600),
    tilt_from_axial_deg=st.one_of(st.none(), st.floats(0, 90)),
    orientations=st.integers(0, 2),
    matrix_sizes=st.sampled_from([((512, 512),), ((512, 512), (256, 256))]),
    pixel_spacings=st.sampled_from([((0.7, 0.7),), ((0.7, 0.7), (0.8, 0.8))]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(facts_strategy, min_size=1, max_size=8, unique_by=lambda f: f.uid), st.randoms())
def test_every_series_gets_a_verdict_and_the_order_is_stable(
    facts: list[SeriesFacts], rnd: random.Random
) -> None:
    verdicts = evaluate(facts, RULES)
    assert {v.facts.uid for v in verdicts} == {f.uid for f in facts}
    assert all(v.reason for v in verdicts)
    eligible = [v for v in verdicts if v.eligible]
    assert [v.rank for v in eligible] == list(range(1, len(eligible) + 1))
    assert all(v.rank is None and v.reason.startswith("rejected: ") for v in verdicts if not v.eligible)
    scores = [v.score for v in eligible]
    assert scores == sorted(scores, reverse=True)
    shuffled = list(facts)
    rnd.shuffle(shuffled)
    assert [v.facts.uid for v in evaluate(shuffled, RULES)] == [v.facts.uid for v in verdicts]


@settings(max_examples=150, deadline=None)
@given(facts_strategy)
def test_hard_rules_reject_what_they_must(f: SeriesFacts) -> None:
    verdict = evaluate([f], RULES)[0]
    must_reject = (
        f.modality != "CT"
        or "LOCALIZER" in f.image_type
        or 1 <= f.image_count <= 3
        or f.orientations != 1
        or f.tilt_from_axial_deg is None
        or f.tilt_from_axial_deg > 30
        or len(f.matrix_sizes) > 1
        or len(f.pixel_spacings) > 1
        or f.slice_count < 20
    )
    assert verdict.eligible is not must_reject


good = SeriesFacts(
    uid="a",
    number=2,
    description="Chest",
    modality="CT",
    image_count=300,
    slice_count=300,
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    kernel="B30f",
    thickness_mm=1.0,
    coverage_mm=300.0,
    tilt_from_axial_deg=0.0,
    orientations=1,
    matrix_sizes=((512, 512),),
    pixel_spacings=((0.7, 0.7),),
)


@settings(max_examples=200, deadline=None)
@given(
    thick_a=st.sampled_from([0.5, 0.625, 1.0, 1.25, 2.5, 5.0, 8.0]),
    thick_b=st.sampled_from([0.5, 0.625, 1.0, 1.25, 2.5, 5.0, 8.0]),
    kernel_a=st.sampled_from(["B70f", "B30f"]),
    kernel_b=st.sampled_from(["B70f", "B30f"]),
    cov_a=st.floats(50, 500),
    cov_b=st.floats(50, 500),
    n_a=st.integers(20, 900),
    n_b=st.integers(20, 900),
)
def test_ranking_is_original_then_thickness_then_kernel_then_coverage_then_count(
    thick_a: float,
    thick_b: float,
    kernel_a: str,
    kernel_b: str,
    cov_a: float,
    cov_b: float,
    n_a: int,
    n_b: int,
) -> None:
    a = replace(
        good, uid="a", number=2, thickness_mm=thick_a, kernel=kernel_a, coverage_mm=cov_a, image_count=n_a
    )
    b = replace(
        good,
        uid="b",
        number=3,
        thickness_mm=thick_b,
        kernel=kernel_b,
        coverage_mm=cov_b,
        image_count=n_b,
        image_type=("DERIVED", "SECONDARY", "MIP"),
    )
    assert evaluate([b, a], RULES)[0].facts.uid == "a"  # ORIGINAL beats DERIVED whatever else
    b = replace(b, image_type=a.image_type)
    key = [
        (-(t <= 5.0), t, -is_lung_kernel(k, DEFAULT_LUNG_KERNELS), -round(c), -n, num)
        for t, k, c, n, num in ((thick_a, kernel_a, cov_a, n_a, 2), (thick_b, kernel_b, cov_b, n_b, 3))
    ]
    expected = "a" if key[0] < key[1] else "b"
    assert evaluate([b, a], RULES)[0].facts.uid == expected
