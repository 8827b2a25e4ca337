"""The README's mechanical claims hold: every default in its configuration reference is the code's
default, and the file names it shows as examples are the names the code makes."""

from __future__ import annotations

import re
import types
from datetime import date
from pathlib import Path
from typing import Any

import yaml

from processor.config import Settings, parse_size
from processor.intake.inbox import free_path
from processor.outputs.receipt import receipt_path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def _config_rows() -> dict[str, str]:
    """``key -> default cell`` of the README's configuration reference table."""
    section = README[README.index("## Configuration reference") : README.index("## URL sources")]
    return dict(re.findall(r"^\| `([a-z_.]+)` \| ([^|]*) \|", section, re.M))


def _default(dotted: str) -> Any:
    model: Any = Settings
    value: Any = None
    for part in dotted.split("."):
        field = model.model_fields[part]
        value = field.get_default(call_default_factory=True)
        model = field.annotation
        if isinstance(model, types.UnionType):  # an optional section (``executor.dask``): its model
            model = next(arg for arg in model.__args__ if arg is not type(None))
    return value


def _same(cell: str, value: Any) -> bool:
    cell = cell.strip()
    if cell == "none":
        return value is None
    if not (cell.startswith("`") and cell.endswith("`")):
        return True  # a cell in words, checked by reading it
    text = cell.strip("`")
    if isinstance(value, bool):
        return text == str(value).lower()
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return float(text) == float(value)
        except ValueError:
            return parse_size(text) == value
    if isinstance(value, list):
        return [str(v) for v in yaml.safe_load(text)] == [str(v) for v in value]
    if hasattr(value, "value"):  # an enum
        return text == str(value.value)
    return text == str(value)


def test_every_default_in_the_configuration_reference_is_the_codes() -> None:
    rows = _config_rows()
    assert len(rows) > 40, "the table was found"
    wrong = {key: (cell, _default(key)) for key, cell in rows.items() if not _same(cell, _default(key))}
    assert not wrong, f"README default differs from the code (README, code): {wrong}"


def test_the_default_config_file_agrees_with_the_reference() -> None:
    """What config/default.yaml sets is what the README's table says (or the README says why not)."""
    shipped = yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    rows = _config_rows()
    for section, value in shipped.items():
        if isinstance(value, dict):
            for key, inner in value.items():
                dotted = f"{section}.{key}"
                if dotted in rows and dotted != "inbox.dirs":
                    assert _same(rows[dotted], inner), (dotted, rows[dotted], inner)


def test_the_example_file_names_are_the_ones_ctwatch_writes(tmp_path: Path) -> None:
    receipt = receipt_path(tmp_path, 12, "chest.zip").name
    assert receipt == "000012-chest.zip.json" and f"`{receipt}`" in README
    (tmp_path / "chest.zip").write_bytes(b"")
    archived = free_path(tmp_path, "chest.zip", 12).name  # a name already in done/<day>/
    assert archived == "chest.a12.zip" and f"`{archived}`" in README
    assert f"`outbox/{date.today():%Y}" not in README, "dates are written as <YYYY-MM-DD>, not today"


def test_the_two_commands_are_the_ones_ci_runs() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    test_command = next(line for line in ci.splitlines() if "pytest" in line and "pip install" in line)
    assert test_command in README, "the README's test command is the one .ci/run runs"
    packages = re.search(r"install -y -qq --no-install-recommends (.*?) >", ci)
    assert packages is not None
    for package in ("orthanc", "orthanc-dicomweb", "libreoffice-calc-nogui", "chromium", "poppler-utils"):
        assert package in packages.group(1).split() and package in README, package


def test_the_send_back_examples_are_valid_settings() -> None:
    """The README's `destinations` and `notifications` examples load as they are written (a bare
    YAML `on:` key included, which YAML 1.1 reads as true)."""
    section = README[README.index("## Results back to the PACS") : README.index("## Reports, status page")]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    destinations, notifications = (yaml.safe_load(b) for b in blocks)
    hosts = destinations["fetch"]["allow_hosts"] + ["hooks.hospital.example"]
    settings = Settings.model_validate(destinations | notifications | {"fetch": {"allow_hosts": hosts}})
    assert [d.kind for d in settings.destinations] == ["dicomweb", "dimse", "folder"]
    assert settings.notifications[0].on == ["failure", "pathology", "daily"]
    assert settings.destinations[1].retry.give_up_after == 3 * 86400
