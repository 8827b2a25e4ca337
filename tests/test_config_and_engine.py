"""Settings validation, pipeline compilation errors, and the step registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from processor.config import default_config_path, load_settings, parse_size
from processor.errors import ConfigError
from processor.pipeline.registry import StepRegistry
from processor.pipeline.spec import load_pipeline
from processor.pipeline.step import Step, StepEnv
from processor.steps import default_registry
from processor.steps.ports import VOLUME
from tests.conftest import REPO, Project


def test_default_config_resolves_against_repo_root() -> None:
    settings = load_settings(default_config_path())
    assert settings.root == REPO
    assert settings.inbox.dirs == [REPO / "inbox"]
    assert settings.outbox == REPO / "outbox"
    assert settings.state == REPO / "state" / "ctwatch.db"
    assert settings.pipeline == REPO / "pipelines" / "chest-ct.yaml"
    assert (settings.status.host, settings.status.port) == ("127.0.0.1", 8765)
    assert settings.inbox.stable_seconds == 10 and settings.inbox.scan_interval_seconds == 5


def test_root_relative_to_config_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    cfg = tmp_path / "etc" / "c.yaml"
    cfg.write_text("root: ../data\noutbox: results\n")
    settings = load_settings(cfg)
    assert settings.outbox == tmp_path / "data" / "results"


def test_bad_config_names_file_key_value_and_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("inbox: {stable_seconds: 'soon', dirz: [x]}\ndevice: gpu\n")
    with pytest.raises(ConfigError) as err:
        load_settings(cfg)
    text = str(err.value)
    assert str(cfg) in text
    assert "inbox.stable_seconds (value: 'soon')" in text
    assert "inbox.dirz" in text and "remove this key" in text
    assert "device (value: 'gpu')" in text and "auto, cpu, cuda or cuda:N" in text


def test_bad_config_exits_2(project: Project) -> None:
    project.config.write_text(project.config.read_text() + "surprise: 1\n")
    proc = project.run("check-config")
    assert proc.returncode == 2
    assert "surprise" in proc.stderr and str(project.config) in proc.stderr


@pytest.mark.parametrize(
    "changes,key",
    [
        ({"outbox": "inbox/results"}, "outbox"),
        ({"state": "inbox/state/ctwatch.db"}, "state"),
        ({"weights": "inbox/weights"}, "weights"),
        ({"reports": {"dir": "inbox"}}, "reports.dir"),
        ({"inbox": {"dirs": ["outbox/drop"], "night_dirs": []}}, "inbox.dirs"),
        ({"inbox": {"dirs": ["inbox"], "night_dirs": ["outbox"]}}, "inbox.night_dirs"),
        ({"inbox": {"dirs": ["inbox", "inbox/sub"], "night_dirs": []}}, "inbox.dirs"),
        ({"inbox": {"dirs": ["night/day"], "night_dirs": ["night"]}}, "inbox.dirs"),
        ({"pipeline": "inbox/pipeline.yaml"}, "pipeline"),
    ],
)
def test_folders_that_overlap_an_inbox_are_refused_with_the_fix(
    project: Project, changes: dict, key: str
) -> None:
    data = yaml.safe_load(project.config.read_text())
    data.update(changes)
    project.config.write_text(yaml.safe_dump(data))
    proc = project.run("check-config")
    assert proc.returncode == 2, proc.stderr
    assert "folders overlap" in proc.stderr and f"  - {key} (" in proc.stderr
    assert "Fix:" in proc.stderr
    run = project.run("run", timeout=60)  # the daemon refuses too, before it creates anything
    assert run.returncode == 2 and "folders overlap" in run.stderr
    assert not list(project.root.rglob("*.db")) and not (project.root / "outbox").exists()


def test_night_folders_inside_the_day_inbox_are_fine(tmp_path: Path) -> None:
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("root: .\ninbox: {dirs: [inbox], night_dirs: [inbox/night]}\noutbox: out\n")
    settings = load_settings(cfg)
    assert settings.inbox.night_dirs == [tmp_path / "inbox" / "night"]


def test_cuda_without_cuda_is_a_config_error(project: Project) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = yaml.safe_load(project.config.read_text())
    data["device"] = "cuda"
    project.config.write_text(yaml.safe_dump(data))
    proc = project.run("check-config")
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr


@pytest.mark.parametrize("text,expected", [("8GiB", 8 * 2**30), ("500 MB", 500 * 10**6), (1024, 1024)])
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


def _pipeline(tmp_path: Path, steps: list[dict]) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "p", "version": 1, "steps": steps}))
    return path


def test_pipeline_problems_reported_at_once(tmp_path: Path) -> None:
    path = _pipeline(
        tmp_path,
        [
            {"id": "a", "uses": "dicom.select_serie"},
            {"id": "b", "uses": "dicom.select_series", "with": {"min_slices": "many", "colour": 1}},
            {"id": "b", "uses": "util.delay", "with": {"seconds": -1}},
        ],
    )
    with pytest.raises(ConfigError) as err:
        load_pipeline(path, default_registry(), StepEnv(tmp_path))
    text = str(err.value)
    assert str(path) in text
    assert "steps[0].uses (value: 'dicom.select_serie'): unknown step" in text
    assert "did you mean 'dicom.select_series'" in text
    assert "steps[1].with.min_slices" in text and "steps[1].with.colour" in text
    assert "steps[2].id (value: 'b'): used twice" in text
    assert "steps[2].with.seconds" in text


def test_unmet_need_is_reported(tmp_path: Path) -> None:
    registry = StepRegistry()

    class Needy(Step):
        uses = "test.needy"
        summary = "needs a volume"
        needs = (VOLUME,)

    registry.register(Needy)
    with pytest.raises(ConfigError, match="needs 'volume', which no earlier step provides"):
        load_pipeline(_pipeline(tmp_path, [{"id": "n", "uses": "test.needy"}]), registry, StepEnv(tmp_path))


def test_registering_a_name_twice_fails() -> None:
    registry = default_registry()
    cls = registry.get("dicom.select_series")
    assert cls is not None
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(cls)


def test_every_step_and_param_is_documented() -> None:
    readme = (REPO / "README.md").read_text()
    for name, cls in default_registry().items():
        assert cls.summary, name
        assert f"`{name}`" in readme, f"step {name} missing from README"
        for field in cls.Params.model_fields:
            assert field in readme, f"param {name}.{field} missing from README"


def test_every_setting_is_documented() -> None:
    from processor.config import Settings

    readme = (REPO / "README.md").read_text()

    def walk(model: type, prefix: str) -> list[str]:
        keys = []
        for name, info in model.model_fields.items():
            if info.exclude:
                continue
            ann = info.annotation
            keys.append(prefix + name)
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                keys.extend(walk(ann, prefix + name + "."))
        return keys

    missing = [k for k in walk(Settings, "") if f"`{k}`" not in readme]
    assert not missing, f"settings missing from the README's config reference: {missing}"


def test_shipped_pipelines_compile() -> None:
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        pipeline = load_pipeline(path, default_registry(), StepEnv(REPO))
        assert pipeline.steps, path
