"""The model files one step reads, as they are on disk now: present, missing, or unknowable.

A step names its files with ``Step.weight_files()``. For most steps that is a fixed list; a model
folder names its shards in an index file (``model.safetensors.index.json``), and an index that
cannot be read raises :class:`~processor.errors.WeightsError`. :func:`weight_files_now` turns that
into a value every caller handles the same way — the runner (the step fails with
:attr:`~processor.vocab.StepProblem.MODEL_UNUSABLE`), ``python run.py weights`` (the row is marked
unreadable), the status plan and ``check-config`` — instead of an exception that stops them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from processor.errors import WeightsError

if TYPE_CHECKING:
    from processor.pipeline.step import Step


@dataclass(frozen=True)
class WeightFiles:
    """``files``: every file the step reads (empty when they cannot be known); ``missing``: those
    absent now; ``why``: why the list cannot be known, in plain words naming the file (None: it
    can); ``unreadable``: that file (the weight index), when the step named it."""

    files: tuple[Path, ...] = ()
    missing: tuple[Path, ...] = ()
    why: str | None = None
    unreadable: Path | None = None

    @property
    def unusable(self) -> bool:
        """True when the model cannot be loaded whatever else is there (its index is unreadable)."""
        return self.why is not None

    def changed_at(self) -> float | None:
        """The latest ``st_mtime`` or ``st_ctime`` (Unix seconds) of the present files and their
        folders — a copy, a rename into place or an edit moves it (ctime changes even when ``cp -p``
        keeps the mtime); None when nothing is there to look at."""
        paths = {*self.files, *(p.parent for p in self.files)}
        if self.unreadable is not None:
            paths |= {self.unreadable, self.unreadable.parent}
        latest: float | None = None
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                continue
            latest = max(latest or 0.0, st.st_mtime, st.st_ctime)
        return latest


def weight_files_now(step: Step) -> WeightFiles:
    """The files ``step`` reads and which are missing, or why they cannot be known (never raises
    :class:`WeightsError`)."""
    try:
        files = tuple(step.weight_files())
    except WeightsError as exc:
        return WeightFiles(why=str(exc), unreadable=exc.path)
    return WeightFiles(files, tuple(p for p in files if not p.exists()))
