"""Issue 16, provenance that binds and export: every stored feature and latent names the checkpoint
that produced it, the patient is a keyed hash, a fitted model refuses another checkpoint's outputs,
and ``export`` writes what SQLite holds.

One arrival of four studies goes through a real ``process`` run with the tiny CT-CLIP models, the
weight-free lung metrics and a head; the database, JSON files, log and export are then read back.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import json
import shutil
import sqlite3
from datetime import date, timedelta
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import sqlite_utils
import torch

from processor.atomic import file_mode
from processor.dicom.scan import Study
from processor.errors import StepError
from processor.pipeline.spec import PipelineSpec, compile_steps
from processor.pipeline.step import StepEnv, StudyContext
from processor.provenance import DISTRIBUTIONS
from processor.state import State
from processor.state.schema import MIGRATIONS
from processor.steps import default_registry
from processor.steps.ensemble import CtclipHead, FusionLightGBM, FusionParams, HeadParams
from processor.steps.ports import FEATURE_MODELS, FEATURES, LATENT_MODELS
from tests.conftest import FIXTURES, Project
from tests.dicomgen import chest_phantom, make_series, write_zip

PATIENT = "PX-7731-SECRET"  # never to be found in clear anywhere ctwatch writes
HEAD_FINDINGS = ["Emphysema", "Lung nodule"]
SMALL = {
    "vocab": "weights/ct_clip/vocab.txt",
    "config": "weights/ct_clip/small_config.json",
    "target_xyz": [32, 32, 24],
}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _steps(head: bool = True, fusion: bool = False) -> list[dict]:
    steps = [
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
    ]
    if head:
        steps.append({"id": "head", "uses": "ctclip.head", "with": {"checkpoint": "weights/head/"}})
    if fusion:
        steps.append(
            {"id": "fusion", "uses": "fusion.lightgbm", "with": {"model": "weights/fusion/model.txt"}}
        )
    return steps


def _install(root: Path, trained_on: dict | None) -> None:
    """The tiny CT-CLIP models and a head on their 16-value latent, its card binding it as given."""
    from processor.models.head import build_head, save_head

    target = root / "weights/ct_clip"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("small_ctclip.pt", "small_lipro.pt", "small_config.json", "vocab.txt"):
        shutil.copy(FIXTURES / "ct_clip" / name, target / name)
    torch.manual_seed(0)
    card = {
        "architecture": {"in_dim": 16, "hidden": 0, "dropout": 0.1},
        "findings": HEAD_FINDINGS,
        "date": "2024-01-01",
    }
    if trained_on is not None:
        card["trained_on"] = trained_on
    save_head(root / "weights/head", build_head(16, HEAD_FINDINGS), card)


def _study(patient_id: str, issuer: str | None, accession: str) -> list:
    hu, _ = chest_phantom((40, 96, 96))
    datasets = make_series(
        40, stored=np.round(hu + 1024).astype(np.int16), spacing=2.5, pixel_spacing=4.0, accession=accession
    )
    for ds in datasets:
        ds.PatientID = patient_id
        if issuer is not None:
            ds.IssuerOfPatientID = issuer
    return datasets


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("provenance")
    project = Project(root, _steps())
    ctclip_sha = _sha256(FIXTURES / "ct_clip/small_ctclip.pt")
    _install(root, {"latent": "ctclip", "model_sha256": ctclip_sha})
    studies = {
        "A": _study(PATIENT, "HOSP-A", "ACC-A"),
        "B": _study(PATIENT, "HOSP-A", "ACC-B"),  # a second scan of the same patient
        "C": _study(PATIENT, "HOSP-B", "ACC-C"),  # the same ID in another issuer's namespace
        "D": _study("   ", None, "ACC-D"),  # no PatientID
    }
    arrival = write_zip(root / "four.zip", [ds for group in studies.values() for ds in group])
    done = project.run("process", str(arrival), timeout=600)
    assert done.returncode == 0, done.stderr
    return {
        "project": project,
        "uids": {k: v[0].StudyInstanceUID for k, v in studies.items()},
        "ctclip_sha": ctclip_sha,
        "lipro_sha": _sha256(FIXTURES / "ct_clip/small_lipro.pt"),
        "head_sha": _sha256(root / "weights/head/head.pt"),
        "stderr": done.stderr,
    }


# ------------------------------------------------------------------------------------ stored rows
def test_feature_and_latent_rows_name_their_checkpoint_and_software(processed) -> None:
    project = processed["project"]
    db = sqlite_utils.Database(project.state_path)
    expected = {"zs": processed["ctclip_sha"], "lipro": processed["lipro_sha"], "head": processed["head_sha"]}
    versions = {name: metadata.version(name) for name in DISTRIBUTIONS}
    rows = list(db.query("select study_uid, name, model_sha256, software from features"))
    assert {r["name"].split(".", 1)[0] for r in rows} == {"lungs", "zs", "lipro", "head"}
    for row in rows:
        assert row["model_sha256"] == expected.get(row["name"].split(".", 1)[0]), row  # lungs.*: NULL
        assert json.loads(row["software"]) == versions
    latents = list(db.query("select study_uid, name, model_sha256, software from latents"))
    assert len(latents) == 4
    assert {(r["name"], r["model_sha256"]) for r in latents} == {("ctclip", processed["ctclip_sha"])}
    # the same digest the result JSON gives for each model
    for path in project.results():
        doc = json.loads(path.read_text())
        assert doc["models"]["clip"]["sha256"] == processed["ctclip_sha"]
        assert doc["models"]["head"]["sha256"] == processed["head_sha"]
    db.close()


def test_read_api_gives_provenance_and_patient_key(processed) -> None:
    state = State(processed["project"].state_path)
    keys = {row["study_uid"]: row["patient_key"] for row in state.db.query("select * from studies")}
    features = {row["study_uid"]: row for row in state.study_features()}
    latents = {row["study_uid"]: row for row in state.study_latents("ctclip")}
    state.close()
    assert set(features) == set(latents) == set(processed["uids"].values())
    for uid, row in features.items():
        assert {
            "study_uid",
            "accession",
            "arrival_id",
            "features",
            "patient_key",
            "models",
            "software",
        } <= set(row)
        assert row["patient_key"] == keys[uid] == latents[uid]["patient_key"]
        assert set(row["models"]) == set(row["features"])
        assert row["models"]["zs.Emphysema"] == processed["ctclip_sha"]
        assert row["models"]["lungs.volume_ml"] is None
        assert row["software"]["ctwatch"] == metadata.version("ctwatch")
        assert latents[uid]["model_sha256"] == processed["ctclip_sha"]
        assert latents[uid]["software"] == row["software"]
        assert latents[uid]["vector"].shape == (16,)


# ------------------------------------------------------------------------------------ patient key
def test_patient_key_groups_by_patient_within_its_issuer(processed) -> None:
    project, uids = processed["project"], processed["uids"]
    state = State(project.state_path)
    key = {
        k: state.db.execute("select patient_key from studies where study_uid = ?", [u]).fetchone()[0]
        for k, u in uids.items()
    }
    secret = bytes.fromhex(state.meta_value("patient_key_secret") or "")
    state.close()
    # "" = processed, no PatientID in the DICOM (a patient of its own); NULL is kept for "not recorded"
    assert key["A"] == key["B"] and key["A"] != key["C"] and key["D"] == ""
    # truth from outside: the documented HMAC, computed here with the stored secret
    assert key["A"] == hmac.new(secret, f"HOSP-A\x00{PATIENT}".encode(), hashlib.sha256).hexdigest()
    assert key["C"] == hmac.new(secret, f"HOSP-B\x00{PATIENT}".encode(), hashlib.sha256).hexdigest()
    assert len(secret) == 32


def test_patient_key_rules(tmp_path: Path) -> None:
    state = State(tmp_path / "s.db")
    other = State(tmp_path / "other.db")
    try:
        assert state.patient_key("P1", "X") == state.patient_key(" P1 ", "X ")
        assert state.patient_key("P1", "X") != state.patient_key("P1", "Y")
        assert state.patient_key("P1") == state.patient_key("P1", "") != state.patient_key("P2")
        assert (
            state.patient_key("") is None
            and state.patient_key("  ") is None
            and state.patient_key(None) is None
        )
        assert state.patient_key("P1") != other.patient_key("P1")  # a secret per database
    finally:
        state.close()
        other.close()


def test_clear_patient_id_is_stored_nowhere(processed) -> None:
    project = processed["project"]
    conn = sqlite3.connect(project.state_path)
    dump = "\n".join(conn.iterdump())
    conn.close()
    assert "PatientID" not in dump and PATIENT not in dump
    assert "ACC-A" in dump  # the dump is the real one: the accession is stored
    for path in [*project.results(), *project.outbox.glob("receipts/*.json")]:
        text = path.read_text()
        assert PATIENT not in text and "patient_key" not in text, path
    log = project.state_path.parent / "ctwatch.log"
    assert log.exists() and PATIENT not in log.read_text() and PATIENT not in processed["stderr"]


# ------------------------------------------------------------------------------------ migration
def test_migration_keeps_old_rows_with_unknown_provenance(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite_utils.Database(path)
    db.table("_migrations").create({"name": str, "applied_at": str}, pk="name")
    for name, apply in MIGRATIONS:
        if name == "0009_provenance":
            break
        apply(db)
        db.table("_migrations").insert({"name": name, "applied_at": "2024-01-01T00:00:00+00:00"})
    arrival = (
        db.table("arrivals").insert({"kind": "cli", "name": "x", "sha256": "a" * 64, "state": "done"}).last_pk
    )
    db.table("studies").insert(
        {"arrival_id": arrival, "study_uid": "1.2.3", "accession": "A1", "status": "Success"}
    )
    db.table("features").insert(
        {
            "arrival_id": arrival,
            "study_uid": "1.2.3",
            "accession": "A1",
            "name": "zs.Emphysema",
            "value": 0.25,
        }
    )
    vector = np.arange(4, dtype="<f4")
    db.table("latents").insert(
        {"arrival_id": arrival, "study_uid": "1.2.3", "name": "ctclip", "dim": 4, "vector": vector.tobytes()}
    )
    db.close()

    state = State(path)
    [row] = state.study_features()
    [latent] = state.study_latents("ctclip")
    secret = state.meta_value("patient_key_secret")
    state.close()
    assert row["features"] == {"zs.Emphysema": 0.25} and row["models"] == {"zs.Emphysema": None}
    assert row["software"] == {} and row["patient_key"] is None and row["accession"] == "A1"
    assert latent["model_sha256"] is None and latent["software"] == {} and latent["patient_key"] is None
    assert latent["vector"].tolist() == [0, 1, 2, 3]
    assert secret is not None and len(bytes.fromhex(secret)) == 32


# ------------------------------------------------------------------------------------ binding
def _head_step(root: Path) -> CtclipHead:
    step = CtclipHead(HeadParams(checkpoint="weights/head"), StepEnv(root))
    step.step_id = "head"
    return step


def _latent_ctx(sha: str | None) -> StudyContext:
    ctx = StudyContext(1, Study("1.2.3"), Path("unused"))
    ctx.values["ctclip_latent"] = np.zeros(16, np.float32)
    if sha is not None:
        ctx.values[LATENT_MODELS] = {"ctclip": sha}
    return ctx


def test_head_refuses_latents_of_another_checkpoint_at_run_time(processed, tmp_path: Path) -> None:
    root = processed["project"].root
    other = "f" * 64
    with pytest.raises(
        StepError,
        match=rf"trained on latents of CT-CLIP checkpoint {processed['ctclip_sha'][:12]} but this pipeline's is ffffffffffff.*Fix: refit the head",
    ):
        _head_step(root).run(_latent_ctx(other))
    ctx = _latent_ctx(processed["ctclip_sha"])
    _head_step(root).run(ctx)
    assert ctx.warnings == [] and set(ctx.values[FEATURE_MODELS].values()) == {processed["head_sha"]}
    # an older head (no trained_on) still runs, with the warning that its provenance is unknown
    _install(tmp_path, None)
    ctx = _latent_ctx(other)
    _head_step(tmp_path).run(ctx)
    assert "provenance unknown" in ctx.warnings[0] and "refit the head" in ctx.warnings[0]
    assert ctx.result["models"]["head"]["probabilities"]


def test_head_refuses_another_checkpoint_at_compile_time(tmp_path: Path) -> None:
    project = Project(tmp_path, _steps())
    _install(tmp_path, {"latent": "ctclip", "model_sha256": "0" * 64})
    done = project.run("check-config")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "steps[5] (head)" in done.stderr and "checkpoint 000000000000" in done.stderr
    assert (
        _sha256(FIXTURES / "ct_clip/small_ctclip.pt")[:12] in done.stderr and "(step 'clip')" in done.stderr
    )
    assert "Fix: refit the head (fit-head)" in done.stderr
    # the same head behind the checkpoint it was trained on compiles
    _install(tmp_path, {"latent": "ctclip", "model_sha256": _sha256(FIXTURES / "ct_clip/small_ctclip.pt")})
    done = project.run("check-config")
    assert done.returncode == 0, done.stderr


def _fusion(root: Path, trained_on: dict | None) -> None:
    """A tiny real booster on zs.Emphysema and lungs.volume_ml, with its card."""
    import lightgbm as lgb

    from processor.models.fusion import booster_name

    names = ["zs.Emphysema", "lungs.volume_ml"]
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (80, 2))
    y = (x[:, 0] > 0).astype(int)
    params = {"objective": "binary", "verbose": -1, "min_data_in_leaf": 5}
    booster = lgb.train(params, lgb.Dataset(x, y, feature_name=[booster_name(n) for n in names]), 5)
    (root / "weights/fusion").mkdir(parents=True, exist_ok=True)
    booster.save_model(str(root / "weights/fusion/model.txt"))
    card = {"feature_names": names, "threshold": 0.5, "date": "2024-01-01"}
    if trained_on is not None:
        card["trained_on"] = trained_on
    (root / "weights/fusion/card.json").write_text(json.dumps(card))


def test_fusion_refuses_features_of_another_checkpoint(tmp_path: Path) -> None:
    ctclip_sha = _sha256(FIXTURES / "ct_clip/small_ctclip.pt")
    _install(tmp_path, {"latent": "ctclip", "model_sha256": ctclip_sha})
    _fusion(tmp_path, {"feature_models": {"zs.Emphysema": "a" * 64, "lungs.volume_ml": None}})
    spec = PipelineSpec.model_validate({"name": "t", "version": 1, "steps": _steps(head=False, fusion=True)})
    _, problems = compile_steps(spec, default_registry(), StepEnv(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("steps[5] (fusion): ")
    assert f"zs.* trained on aaaaaaaaaaaa, this pipeline's is {ctclip_sha[:12]}" in problems[0]
    assert "Fix: refit the fusion (fit-fusion)" in problems[0]

    step = FusionLightGBM(FusionParams(), StepEnv(tmp_path))
    ctx = StudyContext(1, Study("1.2.3"), Path("unused"))
    ctx.values[FEATURES.name] = {"zs.Emphysema": 0.7, "lungs.volume_ml": 3000.0}
    ctx.values[FEATURE_MODELS] = {"zs.Emphysema": ctclip_sha, "lungs.volume_ml": None}
    with pytest.raises(StepError, match="zs.* trained on aaaaaaaaaaaa"):
        step.run(ctx)

    # trained on this checkpoint: compiles and runs; an older card runs with a warning
    _fusion(tmp_path, {"feature_models": {"zs.Emphysema": ctclip_sha, "lungs.volume_ml": None}})
    assert compile_steps(spec, default_registry(), StepEnv(tmp_path))[1] == []
    FusionLightGBM(FusionParams(), StepEnv(tmp_path)).run(ctx)
    assert ctx.warnings == [] and 0 <= ctx.result["fusion"]["probability"] <= 1
    _fusion(tmp_path, None)
    ctx.warnings.clear()
    FusionLightGBM(FusionParams(), StepEnv(tmp_path)).run(ctx)
    assert "provenance unknown" in ctx.warnings[0]


# ------------------------------------------------------------------------------------ export
def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_export_writes_what_sqlite_holds(processed, tmp_path: Path) -> None:
    project = processed["project"]
    out = tmp_path / "export"
    today = date.today()
    done = project.run("export", "--since", (today - timedelta(days=1)).isoformat(), "--to", str(out))
    assert done.returncode == 0, done.stderr
    state = State(project.state_path)
    studies = {r["study_uid"]: r for r in state.db.query("select * from studies")}
    stored = {r["study_uid"]: r for r in state.study_features()}
    latents = {r["study_uid"]: r for r in state.study_latents("ctclip")}
    state.close()

    rows = _csv_rows(out / "studies.csv")
    assert sorted(r["study_uid"] for r in rows) == sorted(studies)
    for row in rows:
        db_row = studies[row["study_uid"]]
        assert row["patient_key"] == (db_row["patient_key"] or "")
        assert row["accession"] == db_row["accession"] and row["status"] == db_row["status"]
        assert int(row["arrival_id"]) == db_row["arrival_id"] and row["processed_at"] == db_row["finished_at"]

    features = _csv_rows(out / "features.csv")
    names = list(features[0])[1:]
    assert names == sorted(stored[features[0]["study_uid"]]["features"])
    for row in features:
        for name in names:
            assert float(row[name]) == stored[row["study_uid"]]["features"][name]  # exact: repr round-trips

    provenance = {r["feature"]: r for r in _csv_rows(out / "features_provenance.csv")}
    assert set(provenance) == set(names)
    assert provenance["zs.Emphysema"]["model_sha256"] == processed["ctclip_sha"]
    assert (
        provenance["lungs.volume_ml"]["model_sha256"] == ""
        and provenance["lungs.volume_ml"]["studies"] == "4"
    )
    assert json.loads(provenance["head.Emphysema"]["software"])["ctwatch"] == metadata.version("ctwatch")

    with np.load(out / "latents.npz") as npz:
        assert set(npz.files) == {"study_uid", "ctclip", "model_sha256"}
        assert npz["ctclip"].dtype == np.float32 and npz["ctclip"].shape == (4, 16)
        for uid, vector, sha in zip(npz["study_uid"], npz["ctclip"], npz["model_sha256"], strict=True):
            assert np.array_equal(vector, latents[str(uid)]["vector"]) and sha == processed["ctclip_sha"]

    labels = _csv_rows(out / "labels_template.csv")
    assert list(labels[0]) == [
        "study_uid",
        "accession",
        "pathology",
        *sorted({n.split(".", 1)[1] for n in names if not n.startswith("lungs.")}),
    ]
    assert {r["study_uid"] for r in labels} == set(studies)
    assert all(v == "" for r in labels for k, v in r.items() if k not in ("study_uid", "accession"))

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == {"studies": 4, "features": len(names), "latents": 4, "latent_dim": 16}
    assert manifest["until"] is None and manifest["ctwatch_version"] == metadata.version("ctwatch")
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(out / name)
    for path in out.iterdir():
        assert (path.stat().st_mode & 0o777) == file_mode() and not path.name.startswith(".")
        assert PATIENT.encode() not in path.read_bytes()

    # a window before the processing holds nothing (headers only)
    empty = tmp_path / "empty"
    yesterday = (today - timedelta(days=1)).isoformat()
    done = project.run("export", "--since", "2000-01-01", "--until", yesterday, "--to", str(empty))
    assert done.returncode == 0, done.stderr
    assert _csv_rows(empty / "studies.csv") == []
    with np.load(empty / "latents.npz") as npz:
        assert npz["ctclip"].shape[0] == 0


def test_export_refuses_bad_arguments(processed, tmp_path: Path) -> None:
    project = processed["project"]
    done = project.run("export", "--since", "last week", "--to", str(tmp_path / "x"))
    assert done.returncode == 2 and "'last week' is not a date; write YYYY-MM-DD" in done.stderr
    done = project.run(
        "export", "--since", "2024-02-01", "--until", "2024-01-01", "--to", str(tmp_path / "x")
    )
    assert done.returncode == 2 and "before --since" in done.stderr
    assert not (tmp_path / "x").exists()
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        done = project.run(
            "export", "--since", "2024-01-01", "--to", str(tmp_path / "x"), "--format", "parquet"
        )
        assert done.returncode == 2 and "pip install pyarrow, or use --format npz" in done.stderr
        assert not (tmp_path / "x").exists()


def test_export_parquet(processed, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is optional (export --format parquet)")

    project = processed["project"]
    out = tmp_path / "pq"
    done = project.run("export", "--since", "2000-01-01", "--to", str(out), "--format", "parquet")
    assert done.returncode == 0, done.stderr
    latents = pq.read_table(out / "latents.parquet").to_pydict()
    assert len(latents["study_uid"]) == 4 and len(latents["ctclip"][0]) == 16
    assert set(latents["model_sha256"]) == {processed["ctclip_sha"]}
    assert pq.read_table(out / "studies.parquet").num_rows == 4
    assert (out / "labels_template.csv").exists()
