"""``python run.py weights [--verify]``: the model files the configured pipeline uses, and whether they are there.

The list comes from the compiled pipeline: every step names the files it reads
(``Step.weight_files()``), and there is one row per file, or per model folder, in pipeline order —
nothing else. Where each comes from, its licence and its published sha256 come from
``weights/manifest.yaml`` (paths relative to the settings' ``weights`` folder), which lists exactly
the files the shipped pipelines (``pipelines/*.yaml``) use. A ``manifest.yaml`` inside the settings'
weights folder takes precedence over the shipped one, so a site can pin the checksums of its own
trusted copies, or describe the files of a pipeline of its own. Each row has a status:

* ``verified``: present and its sha256 matches the manifest (``--verify`` only);
* ``present-unverified``: present, not checked (no ``--verify``, no published sha256, or a folder);
* ``MISMATCH``: present, but the sha256 differs (``--verify``): a corrupt or different file;
* ``missing``: absent;
* ``UNREADABLE``: the model folder's weight index cannot be read, so the files it names cannot be
  known and the model cannot load (``problem`` says why): its steps fail on every study.

A manifest row ending in ``/`` (``caption/<model>/``) stands for a model folder and the files a step
names inside it: the folder gets one row, and a file missing from a folder that is there gets its
own. A file no manifest row names is still listed (the pipeline reads it), with the fix in place of
a source. :func:`pinned_sha256` hands the pinned checksums to the steps (``StepEnv.pinned_sha256``),
which refuse a pinned file whose sha256 differs, at ``check-config`` and when the model loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from processor.config import Settings
from processor.errors import ConfigError
from processor.models.cache import sha256_file

SHIPPED_MANIFEST = Path(__file__).resolve().parent.parent / "weights" / "manifest.yaml"
NOT_PUBLISHED = "not published"
UNREADABLE = "UNREADABLE"


class ManifestFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str
    description: str = ""
    steps: list[str] = Field(default_factory=list)
    # accepted from manifests copied before 2025-11 (required / optional / planned) and ignored: which
    # files are needed is what the configured pipeline's steps name, nothing else
    status: str | None = None
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
    """One file (or model folder) the configured pipeline uses.

    ``used_by``: ``"<step id> (<uses>)"`` of each step reading it, in pipeline order (never empty).
    ``entry``: the manifest row's ``path`` describing it (None: no row names it, ``in_manifest``
    False). ``expected_sha256``: the manifest's pinned sha256 (None: not published).
    ``actual_sha256``: computed by ``--verify`` for a present file. ``problem``: why the file
    cannot be read (status ``UNREADABLE``), in plain words; None otherwise.
    """

    path: Path
    shown: str
    used_by: list[str] = field(default_factory=list)
    status: str = "missing"
    source: str = ""
    licence: str = ""
    expected_sha256: str | None = None
    actual_sha256: str | None = None
    in_manifest: bool = True
    entry: str | None = None
    problem: str | None = None

    @property
    def sha256_text(self) -> str:
        """The published sha256, or the words saying there is none."""
        if self.expected_sha256:
            return self.expected_sha256
        if self.shown.endswith("/"):
            return f"{NOT_PUBLISHED} (a folder: compare each file with the SHA256 its model page lists)"
        return NOT_PUBLISHED


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


@dataclass
class PipelineWeights:
    """What a pipeline reads: ``used`` (resolved path → ["<step id> (<uses>)", ...], pipeline
    order), ``unreadable`` (resolved path of a weight index that cannot be read → why, in plain
    words; the path is also in ``used``) and the pipeline's ``on_missing_weights``."""

    used: dict[Path, list[str]]
    unreadable: dict[Path, str]
    on_missing_weights: str


def pipeline_weights(pipeline: Path, root: Path) -> PipelineWeights:
    """The files the pipeline YAML at ``pipeline`` reads, compiled with paths relative to ``root``.
    ``ConfigError`` if it does not compile; an unreadable weight index is a row, never an error."""
    from processor.pipeline.spec import load_pipeline
    from processor.pipeline.step import StepEnv
    from processor.pipeline.weightfiles import weight_files_now
    from processor.steps import default_registry

    # device "cpu": listing files needs no GPU, and a missing one must not hide the table
    compiled_pipeline = load_pipeline(pipeline, default_registry(), StepEnv(root, "cpu"))
    used: dict[Path, list[str]] = {}
    unreadable: dict[Path, str] = {}
    for compiled in compiled_pipeline.steps:
        files = weight_files_now(compiled.step)
        paths = list(files.files)
        if files.why is not None and files.unreadable is not None:
            paths.append(files.unreadable)
            unreadable[files.unreadable.resolve()] = files.why.removeprefix(f"{files.unreadable}: ")
        for path in paths:
            users = used.setdefault(path.resolve(), [])
            name = f"{compiled.id} ({compiled.uses})"
            if name not in users:
                users.append(name)
    return PipelineWeights(used, unreadable, compiled_pipeline.on_missing_weights)


def weight_files_of(pipeline: Path, root: Path) -> dict[Path, list[str]]:
    """Resolved weight path → ["<step id> (<uses>)", ...] for the pipeline YAML at ``pipeline``,
    compiled with paths relative to ``root``, in pipeline order. ``ConfigError`` if it does not compile."""
    return pipeline_weights(pipeline, root).used


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


@dataclass
class WeightTable:
    """The rows of ``python run.py weights`` and the pipeline's ``on_missing_weights``."""

    rows: list[WeightRow]
    on_missing_weights: str = "skip"


def weight_rows(settings: Settings, verify: bool = False) -> list[WeightRow]:
    """:func:`weight_table`'s rows."""
    return weight_table(settings, verify).rows


def weight_table(settings: Settings, verify: bool = False) -> WeightTable:
    """One row per file, or model folder, the configured pipeline uses (pipeline order), with the
    source, licence and sha256 its manifest row gives; ``verify`` hashes every present file.

    A model folder row (``caption/<model>/``) stands for the files a step names inside it; such a file
    gets its own row only when the folder is there but the file is not, or when it is the folder's
    weight index and cannot be read (``UNREADABLE``). ``ConfigError`` when the manifest or the
    pipeline cannot be read.
    """
    manifest = load_manifest(manifest_path(settings))
    reads = pipeline_weights(settings.pipeline, settings.root)
    rows: dict[str, WeightRow] = {}
    for path, steps in reads.used.items():
        entry = covering_row(path, manifest, settings.weights)
        if entry is None:
            row = WeightRow(
                path,
                _shown(path, settings.root),
                source=f"not listed in {manifest_path(settings)}: add a row with its source and licence",
                in_manifest=False,
            )
        elif entry.path.endswith("/"):
            folder = (settings.weights / entry.path).resolve()
            row = _row_for(entry, folder, _shown(folder, settings.root, True))
            _add_users(rows.setdefault(row.shown, row), steps)
            if path in reads.unreadable or (_present(folder) and not path.exists()):
                # an incomplete copy, or its index unreadable: name that file
                row = _row_for(entry, path, _shown(path, settings.root))
                row.source = f"part of {_shown(folder, settings.root, True)}: {entry.source}"
                row.expected_sha256 = None
            else:
                continue
        else:
            row = _row_for(entry, path, _shown(path, settings.root))
        _add_users(rows.setdefault(row.shown, row), steps)
    for row in rows.values():
        row.problem = reads.unreadable.get(row.path)
        _check(row, verify)
    return WeightTable(list(rows.values()), reads.on_missing_weights)


def _row_for(entry: ManifestFile, path: Path, shown: str) -> WeightRow:
    return WeightRow(
        path,
        shown,
        source=entry.source,
        licence=entry.licence,
        expected_sha256=entry.sha256,
        entry=entry.path,
    )


def _add_users(row: WeightRow, steps: list[str]) -> None:
    row.used_by += [s for s in steps if s not in row.used_by]


def _check(row: WeightRow, verify: bool) -> None:
    if not _present(row.path):
        row.status = "missing"
        return
    if row.problem is not None:
        row.status = UNREADABLE
        return
    row.status = "present-unverified"
    if verify and row.path.is_file():
        row.actual_sha256 = sha256_file(row.path)
        if row.expected_sha256 is not None:
            row.status = "verified" if row.actual_sha256 == row.expected_sha256 else "MISMATCH"


def exit_code(rows: list[WeightRow]) -> int:
    """1 when a file fails verification, cannot be read, or a file the pipeline uses is missing, else 0."""
    bad = any(r.status in ("MISMATCH", UNREADABLE) or (r.status == "missing" and r.used_by) for r in rows)
    return 1 if bad else 0


def format_table(
    rows: list[WeightRow], settings: Settings, verify: bool, on_missing_weights: str = "skip"
) -> str:
    """The ``weights`` command's text: a FILE / USED BY / STATUS line per row, then its source,
    licence and sha256 (or why it cannot be read) on indented lines, then what to do —
    ``on_missing_weights`` (the pipeline's setting) decides what missing files do to a study."""
    header = ("FILE", "USED BY (this pipeline)", "STATUS")
    cells = [(r.shown, ", ".join(r.used_by) or "-", r.status) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    lines = [
        f"weights folder: {settings.weights}   manifest: {manifest_path(settings)}   "
        f"pipeline: {settings.pipeline}",
        "",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
    ]
    for row, cell in zip(rows, cells, strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths, strict=True)).rstrip())
        if row.problem is not None:
            lines.append(f"    problem: {row.problem}")
        lines.append(f"    source:  {row.source or '-'}")
        if row.in_manifest:
            lines.append(f"    licence: {row.licence or '-'}")
            lines.append(f"    sha256:  {row.sha256_text}")
    if not rows:
        lines.append("(none: no step of this pipeline reads a model file)")
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
        effect = (
            "every study will fail at the first step that reads one (the pipeline sets "
            "on_missing_weights: fail)"
            if on_missing_weights == "fail"
            else "their steps will be recorded as skipped and studies come out Partial (the pipeline "
            "sets on_missing_weights: skip)"
        )
        lines.append(
            f"\n{len(missing)} file(s) the pipeline uses are missing: {effect}. "
            "See weights/README.md for where to get them."
        )
    unreadable = [r for r in rows if r.status == UNREADABLE]
    if unreadable:
        lines.append(
            f"{len(unreadable)} file(s) cannot be read: their steps fail on every study (a Partial study "
            "when the step is optional, a Failure otherwise). Fix: copy the model folder again from its "
            "source."
        )
    nc = sorted({r.licence for r in rows if "non-commercial" in r.licence.lower() and r.used_by})
    if nc:
        lines.append(f"Licence: {'; '.join(nc)}: these weights may be used for non-commercial purposes only.")
    if not verify:
        lines.append("Run with --verify to compare sha256 checksums (reads every file).")
    return "\n".join(lines)
