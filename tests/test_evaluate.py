"""``evaluate``: figures against hand-worked examples and scikit-learn, the leakage guard, the
report folder, and the orientation check end to end (generated DICOM → `process` → evaluate)."""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score

from processor.cli import main
from processor.config import load_settings
from processor.errors import ConfigError
from processor.fit.calibration import bootstrap_auroc_ci
from processor.fit.data import study_key
from processor.fit.evaluate import add_evaluate_parser, cmd_evaluate, evaluate
from processor.fit.evaluate_report import write_report
from processor.fit.orientation import DIHEDRAL, compare, transformed
from processor.models.ctclip import ctrate_xyz_from_dicom, load_ctclip, preprocess_volume
from processor.state import State
from tests.conftest import FIXTURES, Project
from tests.dicomgen import make_series, write_zip


# ---------------------------------------------------------------------------------------- helpers
def _uid(i: int) -> str:
    return f"1.2.826.0.9.{i + 1}"


def _store(project: Project, studies: list[dict]) -> None:
    """Studies as the recorder leaves them: a studies row (fused probability, decision) + features."""
    state = State(project.state_path)
    for i, s in enumerate(studies):
        arrival = state.register_arrival(
            kind="cli",
            name=f"s{i}.zip",
            original_path=str(project.root / f"gone{i}.zip"),
            current_path=str(project.root / f"gone{i}.zip"),
            sha256=f"{i:064x}",
            size=1,
            pipeline_name="p",
            pipeline_version=1,
        )
        fields = {
            "accession": f"ACC{i}",
            "status": "Success",
            "probability_of_pathology": s.get("fused"),
            "pathology": None if s.get("fused") is None else int(s["fused"] >= s.get("decided_at", 0.5)),
            "patient_key": s.get("patient"),
            "result": {
                "decision": {"threshold": s.get("decided_at", 0.5), "findings": s.get("decision", {})}
            },
        }
        with state.transaction():
            state.write_study(arrival.arrival_id, _uid(i), fields, [], s.get("features", {}))
    state.close()


def _labels(path: Path, columns: dict[str, list[int | None]], uids: list[str] | None = None) -> Path:
    n = len(next(iter(columns.values())))
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_uid", *columns])
        for i in range(n):
            cells = ["" if v[i] is None else v[i] for v in columns.values()]
            writer.writerow([(uids or [_uid(k) for k in range(n)])[i], *cells])
    return path


def _card(project: Project, model: str, card: dict) -> None:
    folder = project.root / "weights" / model
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps(card))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_evaluate_parser(parser.add_subparsers(dest="command"), argparse.ArgumentParser(add_help=False))
    return parser.parse_args(["evaluate", *argv])


# ---------------------------------------------------------------------------------------- hand-worked
def test_four_studies_by_hand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # pathology 1, 1, 0, 0 with fused 0.9, 0.4, 0.6, 0.1: of the 4 (positive, negative) pairs the
    # positive scores higher in 3 (0.9>0.6, 0.9>0.1, 0.4>0.1; not 0.4<0.6) → AUROC 3/4.
    # Decided at 0.5 (no card installed): called 0.9 and 0.6 → TP 1, FP 1, FN 1, TN 1.
    # ECE (10 bins): each study alone in its bin, gaps 0.1, 0.6, 0.6, 0.1 → mean 0.35.
    project = Project(tmp_path)
    _store(project, [{"fused": p} for p in (0.9, 0.4, 0.6, 0.1)])
    labels = _labels(tmp_path / "labels.csv", {"pathology": [1, 1, 0, 0]})
    out = tmp_path / "report"
    settings = load_settings(project.config)
    assert cmd_evaluate(settings, _args("--labels", str(labels), "--out", str(out), "--no-orientation")) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("evaluate: 4 studies, fused AUROC 0.750 (")
    assert "sens 0.50 spec 0.50 at 0.5" in line and line.endswith(f"report: {out / 'report.md'}")
    doc = json.loads((out / "report.json").read_text())
    fused = doc["pathology"]["fused"]
    assert fused["auroc"] == 0.75 and fused["n"] == 4 and fused["positives"] == 2
    assert fused["confusion"] == {"tp": 1, "fp": 1, "fn": 1, "tn": 1}
    assert fused["sensitivity"] == 0.5 and fused["specificity"] == 0.5
    assert fused["ece"] == pytest.approx(0.35, abs=1e-12)
    assert fused["threshold"] == 0.5 and fused["threshold_from"].startswith("study results")
    assert doc["orientation"] == {"skipped": "--no-orientation was given"}
    assert [w for w in doc["warnings"] if "no card at" in w] == [
        f"fused: no card at {project.root / 'weights/fusion/card.json'}, so the model that produced these "
        "values is not installed there and overlap with the fusion's training set cannot be checked. Fix: "
        "install the model the studies were processed with, or process them again with the installed one."
    ]
    for name in ("report.md", "report.json", "roc.png", "calibration.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert (out / "roc.png").read_bytes()[:4] == b"\x89PNG"
    text = (out / "report.md").read_text()
    assert "| fused probability | 4 | 2 | 0.750 |" in text and "![roc.png](roc.png)" in text

    # An installed fusion card wins over what the studies were decided with, and the report says so.
    _card(
        project,
        "fusion",
        {"threshold": 0.35, "feature_names": ["zs.Emphysema"], "training_keys": [], "training_groups": []},
    )
    evaluation = evaluate(settings, labels, orientation=False, n_boot=200)
    fig = evaluation.pathology[0].figures
    assert fig["confusion"] == {"tp": 2, "fp": 1, "fn": 0, "tn": 1}  # 0.4 ≥ 0.35 now
    assert fig["threshold_from"].startswith("fusion card") and fig["threshold_in_results"] == 0.5
    assert any("decided at 0.5" in w for w in evaluation.warnings)


# ---------------------------------------------------------------------------------------- synthetic
N, PATIENTS = 160, 80


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Project, dict[str, np.ndarray]]:
    """160 studies of 80 patients (2 each): fused, head and zero-shot scores with a real signal."""
    project = Project(tmp_path_factory.mktemp("evaluate"))
    rng = np.random.default_rng(5)
    patient = np.repeat(np.arange(PATIENTS), 2)
    y = (rng.random(PATIENTS) < 0.4).astype(int)[patient]
    nodule = (rng.random(PATIENTS) < 0.3).astype(int)[patient]
    data = {
        "pathology": y,
        "nodule": nodule,
        "fused": 1 / (1 + np.exp(-(2.2 * y - 1.1 + rng.normal(0, 1, N)))),
        "head": 1 / (1 + np.exp(-(2 * nodule - 1 + rng.normal(0, 1, N)))),
        "zs": 1 / (1 + np.exp(-(nodule + rng.normal(0, 1, N)))),
    }
    studies = []
    for i in range(N):
        features = {"zs.Lung nodule": data["zs"][i], "zs.Emphysema": rng.random()}
        if i % 9:
            features["head.Lung nodule"] = data["head"][i]  # some studies processed before the head
        studies.append(
            {"fused": data["fused"][i], "decided_at": 0.45, "patient": f"p{patient[i]}", "features": features}
        )
    _store(project, studies)
    data["patient"] = np.array([f"patient:p{k}" for k in patient])
    data["has_head"] = np.array([bool(i % 9) for i in range(N)])
    _labels(project.root / "labels.csv", {"pathology": list(y), "Lung nodule": list(nodule)})
    return project, data


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, 11)[1:-1], p), minlength=10)
    return float(np.sum(counts[counts > 0] / p.size * np.abs(observed - predicted)))


def test_figures_match_sklearn_and_the_leakage_guard(synthetic) -> None:
    project, d = synthetic
    fusion_train = list(range(0, 30))  # the fusion was fitted on the first 30 studies
    head_train = list(range(100, 120))  # the head on 20 others; its output feeds the fusion
    _card(
        project,
        "fusion",
        {
            "threshold": 0.45,
            "feature_names": ["head.Lung nodule", "zs.Lung nodule"],
            "finding_thresholds": {"Lung nodule": {"feature": "zs.Lung nodule", "threshold": 0.6}},
            "training_keys": [study_key(_uid(i)) for i in fusion_train],
            "training_groups": [],
        },
    )
    _card(
        project,
        "head",
        {
            "thresholds": {"Lung nodule": 0.55},
            "training_keys": [study_key(_uid(i)) for i in head_train],
            "training_groups": [],
        },
    )
    settings = load_settings(project.config)
    ev = evaluate(settings, project.root / "labels.csv", orientation=False, n_boot=500, seed=3)
    assert ev.left_out == {"fusion": 30, "head": 20}
    assert not ev.warnings, ev.warnings

    # fused: neither the fusion's nor the head's training studies (the head feeds the fusion)
    keep = np.ones(N, bool)
    keep[fusion_train + head_train] = False
    fused = next(s for s in ev.pathology if s.score == "fused").figures
    y, p = d["pathology"][keep], d["fused"][keep]
    assert fused["n"] == 110 and fused["left_out"] == {"fusion": 30, "head": 20}
    assert fused["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert fused["auroc_ci95"] == list(
        bootstrap_auroc_ci(y, p, groups=list(d["patient"][keep]), n_boot=500, seed=3)
    )
    assert fused["auroc_ci95"][0] < fused["auroc"] < fused["auroc_ci95"][1]
    assert fused["patients"] == len(set(d["patient"][keep]))
    called = p >= 0.45
    assert fused["sensitivity"] == pytest.approx(called[y == 1].mean())
    assert fused["specificity"] == pytest.approx((~called[y == 0]).mean())
    assert fused["confusion"]["tp"] + fused["confusion"]["fn"] == y.sum()
    assert fused["ece"] == pytest.approx(_ece(y, p), abs=1e-12)

    by_score = {s.score: s.figures for s in ev.findings}
    # head: without the head's training studies (and the studies it never scored)
    head_keep = d["has_head"].copy()
    head_keep[head_train] = False
    head = by_score["head.Lung nodule"]
    assert head["n"] == head_keep.sum() and head["threshold"] == 0.55
    assert head["auroc"] == pytest.approx(
        roc_auc_score(d["nodule"][head_keep], d["head"][head_keep]), abs=1e-12
    )
    assert head["threshold_from"].startswith("head card")
    # zero-shot: its threshold was fitted by the fusion, so the fusion's training studies are out
    zs_keep = np.ones(N, bool)
    zs_keep[fusion_train] = False
    zs = by_score["zs.Lung nodule"]
    assert zs["n"] == 130 and zs["left_out"] == {"fusion": 30} and zs["threshold"] == 0.6
    assert zs["auroc"] == pytest.approx(roc_auc_score(d["nodule"][zs_keep], d["zs"][zs_keep]), abs=1e-12)

    # grouped by patient: every patient's two scans move together, so the interval is wider than
    # one that counts them as independent
    naive = bootstrap_auroc_ci(y, p, n_boot=500, seed=3)
    assert fused["auroc_ci95"][1] - fused["auroc_ci95"][0] > naive[1] - naive[0]


def test_cards_without_training_keys_warn(synthetic, tmp_path: Path) -> None:
    project, _ = synthetic
    _card(project, "fusion", {"threshold": 0.45, "feature_names": ["zs.Lung nodule"]})
    _card(project, "head", {"thresholds": {"Lung nodule": 0.55}})
    ev = evaluate(load_settings(project.config), project.root / "labels.csv", orientation=False, n_boot=100)
    assert ev.left_out == {}
    assert sum("has no training_keys" in w for w in ev.warnings) == 2
    assert next(s for s in ev.pathology if s.score == "fused").figures["n"] == N
    out = tmp_path / "r"
    write_report(out, ev)
    assert (
        "overlap between the fusion's training set and these studies cannot be checked"
        in (out / "report.md").read_text()
    )


def test_nothing_matches_is_a_config_error_with_a_fix(synthetic, tmp_path: Path) -> None:
    project, _ = synthetic
    labels = _labels(tmp_path / "other.csv", {"pathology": [1, 0]}, uids=["9.9.9.1", "9.9.9.2"])
    with pytest.raises(ConfigError, match="none of its 2 studies is in .*Fix: process them first"):
        evaluate(load_settings(project.config), labels, orientation=False)
    with pytest.raises(ConfigError, match="no column 'Nodule'"):
        evaluate(load_settings(project.config), project.root / "labels.csv", findings=["Nodule"])


# ---------------------------------------------------------------------------------------- orientation
def test_dihedral_transforms_are_the_eight_symmetries_of_the_square() -> None:
    t = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)  # (…, X, Y)
    images = {name: transformed(t, name) for name in DIHEDRAL}
    assert len({tuple(v.flatten().tolist()) for v in images.values()}) == 8
    assert torch.equal(images["identity"], t)
    assert torch.equal(images["flip X"][..., 0, :], t[..., 3, :])  # X reversed, Y kept
    assert torch.equal(images["flip Y"][..., :, 0], t[..., :, 3])
    assert torch.equal(images["transpose"][..., 1, 2], t[..., 2, 1])
    # a group: every composition is one of the eight, and every element has an inverse
    keys = {tuple(v.flatten().tolist()) for v in images.values()}
    for a, b in itertools.product(DIHEDRAL, repeat=2):
        assert tuple(transformed(transformed(t, a), b).flatten().tolist()) in keys
    for a in DIHEDRAL:
        assert any(torch.equal(transformed(transformed(t, a), b), t) for b in DIHEDRAL)


def test_orientation_verdicts() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=(120, 3)).astype(float)
    y[::7, 1] = np.nan  # some findings unknown for some studies
    noise = {name: rng.random((120, 3)) for name in DIHEDRAL}
    groups = [f"p{i // 2}" for i in range(120)]
    good = {**noise, "identity": y * 0.5 + noise["identity"] * 0.5}
    result = compare(y, good, ["a", "b", "c"], groups, n_boot=300)
    assert result["best"] == "identity" and result["warning"] is None
    assert "scores best" in result["verdict"]
    rows = {r["name"]: r for r in result["transforms"]}
    assert rows["identity"]["delta_vs_identity"] == 0 and rows["identity"]["delta_ci95"] == [0.0, 0.0]
    expected = np.mean(
        [roc_auc_score(y[~np.isnan(y[:, j]), j], noise["flip Y"][~np.isnan(y[:, j]), j]) for j in range(3)]
    )
    assert rows["flip Y"]["macro_auroc"] == pytest.approx(expected, abs=1e-12)
    # the volume was flipped left-right somewhere upstream: flip X recovers the signal
    flipped = {**noise, "flip X": y * 0.5 + noise["flip X"] * 0.5}
    result = compare(y, flipped, ["a", "b", "c"], groups, n_boot=300)
    assert result["best"] == "flip X" and "beyond the bootstrap noise" in result["verdict"]
    assert result["warning"].startswith(
        "orientation: the documented DICOM → CT-RATE orientation is not the best"
    )
    # pure noise everywhere: some other transform is best by chance, said as no evidence
    result = compare(y, noise, ["a", "b", "c"], groups, n_boot=300)
    assert result["best"] != "identity"
    assert "within the bootstrap noise" in result["verdict"]
    assert "No evidence of a wrong mapping yet" in result["warning"]


CT = FIXTURES / "ct_clip"
SMALL = {
    "checkpoint": "weights/ct_clip/small_ctclip.pt",
    "vocab": "weights/ct_clip/vocab.txt",
    "config": "weights/ct_clip/small_config.json",
    "target_xyz": [32, 32, 24],
}
PIXEL, STEP, INTERCEPT = 1.5, 2.0, -1024.0
FINDINGS = ("Emphysema", "Lung nodule")


def _stored_pixels(seed: int) -> np.ndarray:
    """24 slices of 32x32: an off-centre blob (so flips change the image) in air, with noise."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:24, 0:32, 0:32]
    body = ((y - 14 - seed % 3) ** 2 + (x - 17 + seed % 4) ** 2) < (8 + z % 4) ** 2
    hu = np.where(body, rng.normal(40, 200, body.shape), -1000 + rng.normal(0, 20, body.shape))
    hu[:, 4:9, 20:26] += 600 * (seed % 2)  # something bright on one side in half of them
    return np.clip(hu - INTERCEPT, 0, 4000).astype(np.int16)


# In CT-RATE's (X, Y, Z) array, each transform done on the volume before preprocessing.
VOLUME_TRANSFORMS = {
    "identity": lambda a: a,
    "flip X": lambda a: a[::-1],
    "flip Y": lambda a: a[:, ::-1],
    "rotate 180": lambda a: a[::-1, ::-1],
    "rotate 90": lambda a: np.rot90(a, 1, axes=(0, 1)),
    "rotate 270": lambda a: np.rot90(a, 3, axes=(0, 1)),
    "transpose": lambda a: a.transpose(1, 0, 2),
    "anti-transpose": lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
}


@pytest.mark.slow
def test_orientation_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    project = Project(
        tmp_path,
        [
            {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
            {"id": "volume", "uses": "ct.volume"},
            {"id": "clip", "uses": "ctclip.zero_shot", "with": {**SMALL, "findings": list(FINDINGS)}},
        ],
    )
    target = project.root / "weights" / "ct_clip"
    target.mkdir(parents=True)
    for name in ("small_ctclip.pt", "small_config.json", "vocab.txt"):
        shutil.copy(CT / name, target / name)
    pixels = {seed: _stored_pixels(seed) for seed in range(6)}
    series = []
    for seed, stored in pixels.items():
        datasets = make_series(
            24, stored=stored, pixel_spacing=PIXEL, spacing=STEP, intercept=INTERCEPT, accession=f"A{seed}"
        )
        for ds in datasets:
            ds.PatientID = f"P{seed // 2}"  # three patients, two studies each
        series.append(datasets)
    path = write_zip(tmp_path / "six.zip", [ds for s in series for ds in s])
    # the daemon's `process` path, in this process (a subprocess would add ~7 s of imports)
    assert main(["process", str(path), "--config", str(project.config)]) == 0
    labels = _labels(
        tmp_path / "labels.csv",
        {"Emphysema": [1, 0, 1, 0, 0, 1], "Lung nodule": [0, 1, 1, 0, None, 1]},
        uids=[s[0].StudyInstanceUID for s in series],
    )
    settings = load_settings(project.config)
    with caplog.at_level(logging.INFO, logger="processor.fit.orientation"):
        ev = evaluate(settings, labels, n_boot=200)
    assert "evaluate.orientation studies=6 encodings=48 estimate_seconds=" in caplog.text
    o = ev.orientation
    assert o["studies"] == 6 and o["encodings"] == 48 and o["findings"] == list(FINDINGS)
    assert o["identity_vs_stored_max_abs"] < 1e-5  # the identity repeats the daemon's run

    # Truth from outside: the model on each transformed volume, preprocessed independently.
    clip = load_ctclip(CT / "small_ctclip.pt", CT / "vocab.txt", CT / "small_config.json")
    y = np.array([[1, 0, 1, 0, 0, 1], [0, 1, 1, 0, np.nan, 1]], dtype=float).T
    affine = np.diag([PIXEL, PIXEL, STEP, 1.0])
    tensors = []
    for change in VOLUME_TRANSFORMS.values():
        for seed in range(6):
            hu_zyx = pixels[seed].astype(np.float32) + np.float32(INTERCEPT)
            hu_xyz, spacing = ctrate_xyz_from_dicom(hu_zyx, (STEP, PIXEL, PIXEL), affine)
            tensors.append(preprocess_volume(np.ascontiguousarray(change(hu_xyz)), spacing, (32, 32, 24)))
    probs = clip.zero_shot(torch.stack(tensors), list(FINDINGS)).numpy().reshape(8, 6, 2)  # one batch
    expected = {
        name: np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], p[~np.isnan(y[:, j]), j]) for j in (0, 1)])
        for name, p in zip(VOLUME_TRANSFORMS, probs, strict=True)
    }
    got = {t["name"]: t["macro_auroc"] for t in o["transforms"]}
    assert got == pytest.approx(expected, abs=1e-9)
    stored_zs = np.array([[r[f"zs.{f}"] for f in FINDINGS] for r in _features(project, series)])
    assert got["identity"] == pytest.approx(
        np.mean([roc_auc_score(y[~np.isnan(y[:, j]), j], stored_zs[~np.isnan(y[:, j]), j]) for j in (0, 1)])
    )
    assert ("scores best" in o["verdict"]) == (o["best"] == "identity")
    write_report(tmp_path / "report", ev)
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"| flip X | left ↔ right | {got['flip X']:.3f} |" in text and "Verdict: " in text
    assert json.loads((tmp_path / "report" / "report.json").read_text())["orientation"]["studies"] == 6

    path.unlink()  # the input is gone: the check says so instead of failing
    again = evaluate(settings, labels, n_boot=50).orientation
    assert again["skipped"].startswith("no input file of the 6 labelled studies remains")


def _features(project: Project, series: list) -> list[dict[str, float]]:
    state = State(project.state_path)
    try:
        by_uid = {r["study_uid"]: r["features"] for r in state.study_features()}
    finally:
        state.close()
    return [by_uid[s[0].StudyInstanceUID] for s in series]


def test_orientation_skipped_without_a_zero_shot_step(synthetic) -> None:
    project, _ = synthetic
    labels = _labels(project.root / "zs.csv", {"Lung nodule": [1, 0, 1, 0]})
    ev = evaluate(load_settings(project.config), labels, n_boot=50)
    assert ev.orientation == {
        "skipped": f"the configured pipeline ({project.pipeline}) has no ctclip.zero_shot step"
    }


def test_installed_thresholds_are_the_ones_the_decision_step_uses(tmp_path: Path) -> None:
    """A threshold whose card says no better than chance calls nothing in the decision step, so
    evaluate reports no sensitivity at it either (and never falls back to another card's)."""
    from processor.fit.installed import Card, installed_threshold

    fusion = {
        "finding_thresholds": {
            "Pleural effusion": {
                "feature": "head.Pleural effusion",
                "threshold": 0.9,
                "better_than_chance": False,
            }
        }
    }
    head = {
        "thresholds": {"Pleural effusion": 0.2, "Lung nodule": 0.4},
        "cv": {"per_finding": {"Lung nodule": {"better_than_chance": False}}},
    }
    cards = {
        "fusion": Card("fusion", tmp_path / "fusion/card.json", fusion),
        "head": Card("head", tmp_path / "head/card.json", head),
        "anomaly": Card("anomaly", tmp_path / "anomaly/card.json", None),
    }
    threshold, origin, fitted_on = installed_threshold(cards, [], "Pleural effusion", "head.Pleural effusion")
    assert threshold is None and "no better than chance" in str(origin) and fitted_on == []
    threshold, origin, _ = installed_threshold(cards, [], "Lung nodule", "head.Lung nodule")
    assert threshold is None and "head card" in str(origin)
