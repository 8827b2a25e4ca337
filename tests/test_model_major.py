"""Model-major (night batches) and study-major orders give identical results; model-major never
reloads a model per study even when the cache holds only one model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from processor.config import load_settings
from processor.daemon import build
from tests.conftest import Project
from tests.dicomgen import make_series, write_zip
from tests.test_ctclip_steps import (
    INTERCEPT,
    PIXEL_SPACING,
    SLICE_STEP,
    SMALL,
    _install_small_weights,
    _stored,
)

STEPS = [
    {"id": "series", "uses": "dicom.select_series", "with": {"min_slices": 20}},
    {"id": "volume", "uses": "ct.volume"},
    {"id": "lungs", "uses": "quantify.lungs"},
    {
        "id": "clip",
        "uses": "ctclip.zero_shot",
        "with": {"checkpoint": "weights/ct_clip/small_ctclip.pt", **SMALL},
    },
    {
        "id": "lipro",
        "uses": "ctclip.classify",
        "with": {"checkpoint": "weights/ct_clip/small_lipro.pt", **SMALL},
    },
    {"id": "decision", "uses": "decision.pathology"},
]


def _run(root: Path, zips: list[Path], *, together: bool) -> tuple[dict[str, dict], dict]:
    root.mkdir()
    project = Project(root, STEPS, models={"capacity": 1})
    _install_small_weights(project.root)
    components = build(load_settings(project.config))
    executor = components.executor(components.state)
    state = components.state
    ids = [components.intake.accept_in_place(z) for z in zips]
    claimed = [state.claim(i) for i in ids]
    if together:
        finals = executor.process_many(claimed)
    else:
        finals = [executor.process_many([arrival])[0] for arrival in claimed]
    assert finals == ["done"] * len(zips)
    stats = components.models.stats()
    docs = {}
    for path in project.results():
        doc = json.loads(path.read_text())
        docs[doc["study_uid"]] = doc
    state.close()
    return docs, stats


def _comparable(doc: dict) -> dict:
    """The result without what legitimately differs between runs (times, arrival ids, paths)."""
    drop = {"time_of_processing", "finished_at", "source", "steps"}
    out = {k: v for k, v in doc.items() if k not in drop}
    out["steps"] = [(s["step_id"], s["status"], s["error"], s["reason"]) for s in doc["steps"]]
    return without_report_timing(out)


def without_report_timing(doc: dict) -> dict:
    """``doc`` with its report page's and PDF's sha256 set aside: the page shows when the study was
    analysed and how long each step took (every other file of the ``report`` section is kept)."""
    report = doc.get("report")
    if report:
        timed = ("html", "pdf")
        files = [
            {k: v for k, v in f.items() if k != "sha256" or f["kind"] not in timed} for f in report["files"]
        ]
        doc = doc | {"report": report | {"files": files}}
    return doc


@pytest.mark.slow
def test_model_major_equals_study_major_and_loads_each_model_once(tmp_path: Path) -> None:
    zips = []
    for seed in (1, 2, 3):
        series = make_series(
            24,
            stored=_stored(seed),
            pixel_spacing=PIXEL_SPACING,
            spacing=SLICE_STEP,
            intercept=INTERCEPT,
            description=f"S{seed}",
        )
        zips.append(write_zip(tmp_path / f"s{seed}.zip", series))
    major, major_stats = _run(tmp_path / "model-major", zips, together=True)
    minor, minor_stats = _run(tmp_path / "study-major", zips, together=False)
    assert set(major) == set(minor) and len(major) == 3
    for uid in major:
        assert _comparable(major[uid]) == _comparable(minor[uid])
        assert len(major[uid]["models"]["clip"]["probabilities"]) == 18
    # capacity 1, two models: model-major loads each once; study-major swaps them for every study.
    assert major_stats["loads"] == 2
    assert minor_stats["loads"] == 6


@pytest.mark.slow
def test_worker_takes_night_arrivals_together_after_the_day_queue(tmp_path: Path) -> None:
    from processor.worker import Worker

    project = Project(tmp_path, STEPS, models={"capacity": 1})
    _install_small_weights(project.root)
    components = build(load_settings(project.config))
    night_dir = project.inbox / "night"
    night_dir.mkdir()
    paths = []
    for seed in (1, 2, 3, 4):
        series = make_series(
            24,
            stored=_stored(seed),
            pixel_spacing=PIXEL_SPACING,
            spacing=SLICE_STEP,
            intercept=INTERCEPT,
            description=f"S{seed}",
        )
        folder = night_dir if seed > 1 else project.inbox
        paths.append((write_zip(folder / f"s{seed}.zip", series), seed > 1))
    for path, night in reversed(paths):  # the night arrivals are registered first
        components.intake.accept(path, night=night)
    _run_worker(Worker(components.state, components.executor(), night_batch=3), project, 4)
    rows = {r.name: r for r in components.state.arrivals(limit=10)}
    components.state.close()
    day, nights = rows["s1.zip"], [rows[f"s{i}.zip"] for i in (2, 3, 4)]
    assert all(day.finished_at <= n.claimed_at for n in nights), "the day queue goes first"
    assert max(n.claimed_at for n in nights) <= min(n.finished_at for n in nights), "one batch"
    # capacity 1: the day study loads both models (2), the night batch loads each once more (2);
    # one night study at a time would need 6 more loads.
    assert components.models.stats()["loads"] == 4


def test_prefetch_prepares_the_next_arrival_while_the_current_one_finishes(tmp_path: Path, caplog) -> None:
    import logging

    from processor.worker import Worker

    steps = [
        STEPS[0],
        {"id": "hold", "uses": "util.delay", "with": {"seconds": 0.5}},
        {"id": "decision", "uses": "decision.pathology"},
    ]
    project = Project(tmp_path, steps)
    components = build(load_settings(project.config))
    for seed in (1, 2, 3):
        path = write_zip(project.inbox / f"s{seed}.zip", make_series(20, description=f"S{seed}"))
        components.intake.accept(path)
    caplog.set_level(logging.INFO, logger="processor")
    _run_worker(Worker(components.state, components.executor(), max_inflight=1), project, 3)
    events = [
        (r.getMessage().split()[0], r.getMessage().split()[1])
        for r in caplog.records
        if r.getMessage().startswith(("arrival.start", "arrival.done"))
    ]
    assert events.index(("arrival.start", "arrival=2")) < events.index(("arrival.done", "arrival=1"))
    assert components.state.counts_by_state() == {"done": 3}
    components.state.close()


def _run_worker(worker, project: Project, results: int) -> None:
    """Run the worker thread until ``results`` study JSONs exist, then stop and join it."""
    from tests.conftest import wait_for

    worker.start()
    try:
        wait_for(lambda: len(project.results()) == results, 120, f"{results} results")
    finally:
        worker.stop()
        worker.join(60)
