"""The shipped default pipeline (pipelines/chest-ct.yaml) end to end from a ZIP dropped into a running daemon."""

from __future__ import annotations

import json
import shutil

import jsonschema
import numpy as np

from processor.outputs.result import load_schema
from tests.conftest import REPO, Project, wait_for
from tests.dicomgen import chest_phantom, make_scout, make_series, write_zip


def test_fresh_install_gets_weight_free_results_from_a_dropped_zip(tmp_path) -> None:
    project = Project(tmp_path)
    shutil.copy(REPO / "pipelines" / "chest-ct.yaml", project.pipeline)
    hu, truth = chest_phantom((40, 96, 96))
    stored = np.round(hu + 1024).astype(np.int16)  # intercept −1024, slope 1
    thin = make_series(
        40,
        stored=stored,
        spacing=2.5,
        kernel="B70f",
        series_number=3,
        description="LUNG 2.5",
        pixel_spacing=4.0,
    )
    study_uid = thin[0].StudyInstanceUID
    thick = make_series(
        20,
        study_uid=study_uid,
        stored=stored[::2],
        spacing=5.0,
        kernel="B30f",
        series_number=2,
        description="SOFT 5mm",
        pixel_spacing=4.0,
    )
    scout = make_scout(study_uid=study_uid)
    write_zip(tmp_path / "drop.zip", thin + thick + scout, shuffle_seed=5)
    daemon = project.start()
    try:
        shutil.move(tmp_path / "drop.zip", project.inbox / "drop.zip")
        wait_for(lambda: project.results(), 120, "the study JSON")
    finally:
        daemon.terminate()
        assert daemon.wait(timeout=60) == 0, project.log_text()
    path = project.results()[0]
    doc = json.loads(path.read_text())
    jsonschema.validate(doc, load_schema())
    assert doc["series_uid"] == thin[0].SeriesInstanceUID
    reasons = {row["description"]: row["reason"] for row in doc["series_selection"]["series"]}
    assert reasons["LUNG 2.5"] == "chosen" and "out-ranked" in reasons["SOFT 5mm"] and len(reasons) == 3
    lungs = doc["lungs"]
    expected_ml = truth["lung_voxels"] * 4.0 * 4.0 * 2.5 / 1000
    assert abs(lungs["volume_ml"] - expected_ml) / expected_ml < 0.02
    assert lungs["laa950_percent"] > 0
    previews = doc["key_slices"]
    assert len(previews) == 6 and all((path.parent / p["file"]).exists() for p in previews)
    assert doc["processing_status"] in ("Success", "Partial")
    statuses = {s["step_id"]: s["status"] for s in doc["steps"]}
    assert {statuses[k] for k in ("series", "volume", "lungs", "slices")} == {"done"}
    for step in doc["steps"]:
        if step["status"] == "skipped":
            # a skip is not a failure: the reason is in "reason", "error" stays for failures
            assert step["missing"] and "weights not installed" in step["reason"] and step["error"] is None
    assert doc["probability_of_pathology"] is None  # no model ran, no number shown
