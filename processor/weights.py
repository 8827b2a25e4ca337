"""``python run.py weights [--verify]``: which model files the configured pipeline needs, and whether they are there.

The expected files are listed in ``weights/manifest.yaml`` (paths relative to the settings'
``weights`` folder). A ``manifest.yaml`` inside that folder takes precedence over the one shipped
with ctwatch, so a site can pin the checksums of its own trusted copies. Each row is a manifest
file or a file a pipeline step asks for (``Step.weight_files()``), with the pipeline steps using
it, its status and where to get it:

* ``verified``: present and its sha256 matches the manifest (``--verify`` only);
* ``present-unverified``: present, not checked (no ``--verify``, no published sha256, or a folder);
* ``MISMATCH``: present, but the sha256 differs (``--verify``): a corrupt or different file;
* ``missing``: absent.

A row ending in ``/`` (``caption/<model>/``) stands for a model folder and the files a step names
inside it. :func:`pinned_sha256` hands the pinned checksums to the steps (``StepEnv.pinned_sha256``),
which refuse a pinned file whose sha256 differs, at ``check-config`` and when the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processor.config import Settings
from processor.errors import ConfigError
from processor.models.cache import sha256_file

SHIPPED_MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.yaml"
NOT_PUBLISHED = "not published"


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    description: str = ""
    steps: list[str] = Field(default_factory=list)
    status: Literal["required", "optional", "planned"] = "required"
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    size: str | None = None
    licence: str = ""
    source: str = ""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = 1
    files: list[ManifestFile] = Field(default_factory=list)


@dataclass
class WeightRow:
    path: Path
    shown: str
    used_by: list[str] = field(default_factory=list)
    status: str = "missing"
    source: str = ""
    licence: str = ""
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    in_manifest: bool = True
    planned: bool = False


def manifest_path(settings: Settings) -> Path:
    local = settings.weights / "manifest.yaml"
    return local if local.is_file() else SHIPPED_MANIFEST


def load_manifest(path: Path) -> Manifest:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        return Manifest.model_validate(raw)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the weights manifest ({exc.strerror}).") from exc
    except (yaml.YAMLError, ValidationError) as exc:
        raise ConfigError(
            f"{path}: not a valid weights manifest: {exc}. Fix: compare it with the "
            f"shipped {SHIPPED_MANIFEST}."
        ) from exc


def pinned_sha256(settings: Settings) -> dict[Path, str]:
    """Resolved path → sha256 for every manifest file with a pinned checksum (steps check them at load)."""
    manifest = load_manifest(manifest_path(settings))
    return {
        (settings.weights / entry.path).resolve(): entry.sha256
        for entry in manifest.files
        if entry.sha256 is not None and not entry.path.endswith("/")
    }


def pipeline_weight_files(settings: Settings) -> dict[Path, list[str]]:
    """Resolved weight path → ["<step id> (<uses>)", ...] for the configured pipeline."""
    from processor.pipeline.spec import load_pipeline
    from processor.pipeline.step import StepEnv
    from processor.steps import default_registry

    # device "cpu": listing files needs no GPU, and a missing one must not hide the table
    pipeline = load_pipeline(settings.pipeline, default_registry(), StepEnv(settings.root, "cpu"))
    used: dict[Path, list[str]] = {}
    for compiled in pipeline.steps:
        for path in compiled.step.weight_files():
            used.setdefault(path.resolve(), []).append(f"{compiled.id} ({compiled.uses})")
    return used


def _shown(path: Path, root: Path, folder: bool = False) -> str:
    try:
        text = str(path.relative_to(root))
    except ValueError:
        text = str(path)
    return text + ("/" if folder or path.is_dir() else "")


def _present(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def covering_row(path: Path, manifest: Manifest, weights: Path) -> ManifestFile | None:
    """The manifest row naming ``path``: the file itself, or a folder row (``caption/<model>/``) it lies in."""
    for entry in manifest.files:
        listed = (weights / entry.path).resolve()
        if listed == path or (entry.path.endswith("/") and listed in path.parents):
            return entry
    return None


def weight_rows(settings: Settings, verify: bool = False) -> list[WeightRow]:
    """One row per manifest file, then one per pipeline file the manifest does not list.

    A folder row (``caption/<model>/``) stands for the files a step names inside it; such a file gets
    its own row only when the folder is there but the file is not.
    """
    manifest = load_manifest(manifest_path(settings))
    used = pipeline_weight_files(settings)
    rows: list[WeightRow] = []
    for entry in manifest.files:
        path = (settings.weights / entry.path).resolve()
        is_folder = entry.path.endswith("/")
        steps = list(used.get(path, []))
        for inner, users in used.items():
            if is_folder and path in inner.parents:
                steps += [s for s in users if s not in steps]
        rows.append(
            WeightRow(
                path,
                _shown(path, settings.root, is_folder),
                steps,
                source=entry.source,
                licence=entry.licence,
                expected_sha256=entry.sha256,
                planned=entry.status == "planned",
            )
        )
    rows += _rows_outside_the_manifest(used, manifest, settings)
    for row in rows:
        _check(row, verify)
    return rows


def _rows_outside_the_manifest(
    used: dict[Path, list[str]], manifest: Manifest, settings: Settings
) -> list[WeightRow]:
    """Pipeline files no manifest row names, and files missing from a model folder that is there."""
    rows = []
    for path, steps in used.items():
        covering = covering_row(path, manifest, settings.weights)
        if covering is None:
            rows.append(
                WeightRow(
                    path,
                    _shown(path, settings.root),
                    steps,
                    in_manifest=False,
                    source="not in the manifest: named by the pipeline",
                )
            )
        elif covering.path.endswith("/") and not path.exists():
            folder = (settings.weights / covering.path).resolve()
            if _present(folder):  # an incomplete copy: name the file that is missing
                shown = _shown(folder, settings.root, True)
                rows.append(WeightRow(path, _shown(path, settings.root), steps, source=f"part of {shown}"))
    return rows


def _check(row: WeightRow, verify: bool) -> None:
    if not _present(row.path):
        row.status = "missing"
        return
    row.status = "present-unverified"
    if verify and row.path.is_file():
        row.actual_sha256 = sha256_file(row.path)
        if row.expected_sha256 is not None:
            row.status = "verified" if row.actual_sha256 == row.expected_sha256 else "MISMATCH"


def exit_code(rows: list[WeightRow]) -> int:
    """1 when a file fails verification or a file the pipeline uses is missing, else 0."""
    bad = any(r.status == "MISMATCH" or (r.status == "missing" and r.used_by) for r in rows)
    return 1 if bad else 0


def format_table(rows: list[WeightRow], settings: Settings, verify: bool) -> str:
    header = ("FILE", "USED BY (this pipeline)", "STATUS", "GET IT FROM")
    cells = [
        (
            r.shown,
            ", ".join(r.used_by) or ("- (step not built yet)" if r.planned else "-"),
            r.status,
            r.source or "-",
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    lines = [
        f"weights folder: {settings.weights}   manifest: {manifest_path(settings)}   "
        f"pipeline: {settings.pipeline}",
        "",
    ]
    for cell in [header, *cells]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=False)) + "  " + cell[3])
    unpinned = [r for r in rows if r.actual_sha256 and r.expected_sha256 is None]
    if unpinned:
        lines += [
            "",
            f"sha256 of present files whose checksum is {NOT_PUBLISHED} (record them for later checks):",
        ]
        lines += [f"  {r.actual_sha256}  {r.shown}" for r in unpinned]
    for r in rows:
        if r.status == "MISMATCH":
            lines.append(
                f"MISMATCH {r.shown}: sha256 {r.actual_sha256}, manifest says {r.expected_sha256}. "
                "Fix: copy the file again from its source and re-run with --verify."
            )
    missing = [r.shown for r in rows if r.status == "missing" and r.used_by]
    if missing:
        lines.append(
            f"\n{len(missing)} file(s) the pipeline uses are missing; their steps will be recorded "
            "as skipped. See weights/README.md for where to get them."
        )
    nc = sorted({r.licence for r in rows if "non-commercial" in r.licence.lower() and r.used_by})
    if nc:
        lines.append(f"Licence: {'; '.join(nc)}: these weights may be used for non-commercial purposes only.")
    if not verify:
        lines.append("Run with --verify to compare sha256 checksums (reads every file).")
    return "\n".join(lines)
