"""ctwatch's own path from ZIP bytes to the HU volume and the CT-CLIP input, called as the daemon calls it.

``fast_tensor`` = ``open_arrival`` (in-memory ZIP members) → ``scan_members`` (headers only,
``stop_before_pixels``) → series selection (``series_facts`` + ``evaluate``, default rules) →
``load_volume`` (chosen series only, one preallocated volume, decode thread pool) →
``ctrate_xyz_from_dicom`` → ``preprocess_volume`` at the official (480, 480, 240).

``stage_breakdown`` times the same code one stage at a time inside one open arrival, so the
stages add up to the fast path: opening the ZIP (central directory), the header scan
(reads headers in place, or inflates only their prefix), series selection, and reading + CRC-32
check + decoding the chosen series into the HU volume (the only stage that touches pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.timing import Clock, Samples, timed
from processor.deflate import crc32
from processor.dicom.scan import ScanResult, Series, scan_members
from processor.dicom.select import SelectionRules, evaluate, series_facts
from processor.dicom.volume import Volume, load_volume
from processor.intake.archive import Contents, Limits, open_arrival

if TYPE_CHECKING:
    import torch

LIMITS = Limits()
RULES = SelectionRules()


def choose_series(scan: ScanResult) -> Series:
    study = scan.studies[0]
    verdicts = evaluate([series_facts(s) for s in study.series.values()], RULES)
    if not verdicts or not verdicts[0].eligible:
        raise RuntimeError(f"no eligible series: {[v.reason for v in verdicts]}")
    return study.series[verdicts[0].facts.uid]


def fast_volume(zip_path: Path, *, imagecodecs: bool = True) -> Volume:
    """ZIP → chosen series' HU volume, exactly as the ``dicom.select_series`` + ``ct.volume`` steps do
    (``imagecodecs=False``: compressed frames through pydicom's decoders only, the reference)."""
    with _opened(zip_path) as contents:
        series = choose_series(_scan(contents.members))
        return load_volume(series, imagecodecs=imagecodecs)


@dataclass
class FastRun:
    tensor: torch.Tensor
    volume: Volume
    ingest: tuple[float, float]  # (wall, cpu) ZIP → HU volume
    preprocess: tuple[float, float]  # (wall, cpu) HU volume → CT-CLIP tensor


def fast_tensor(zip_path: Path, target_xyz: tuple[int, int, int] | None = None) -> FastRun:
    """ZIP → HU volume → CT-CLIP input at ``target_xyz`` (default the official (480, 480, 240)).

    torch is imported here, not with the module, so that ``fast_volume`` in a fresh process
    (bench/tools.py) pays no torch import."""
    from processor.models.ctclip_preprocess import TARGET_SHAPE_XYZ, ctrate_xyz_from_dicom, preprocess_volume

    clock = Clock()
    volume = fast_volume(zip_path)
    ingest = clock.lap()
    hu_xyz, spacing_xyz = ctrate_xyz_from_dicom(volume.hu, volume.spacing_zyx, volume.affine)
    tensor = preprocess_volume(hu_xyz, spacing_xyz, target_xyz or TARGET_SHAPE_XYZ)
    return FastRun(tensor, volume, ingest, clock.lap())


STAGES = (
    "open ZIP (central directory)",
    "header scan",
    "select series",
    "read + CRC + decode → HU volume",
)


def stage_breakdown(zip_path: Path, samples: dict[str, Samples]) -> Volume:
    """One pass over the ingest stages, each timed on its own (see the module docstring)."""
    clock = Clock()
    with _opened(zip_path) as contents:
        samples.setdefault(STAGES[0], Samples()).add(*clock.lap())
        scan, _, _ = timed(lambda: _scan(contents.members), samples.setdefault(STAGES[1], Samples()))
        series, _, _ = timed(lambda: choose_series(scan), samples.setdefault(STAGES[2], Samples()))
        volume, _, _ = timed(lambda: load_volume(series), samples.setdefault(STAGES[3], Samples()))
    return volume


def crc_of_chosen_series(zip_path: Path) -> Callable[[], int]:
    """A callable that CRC-32-checks the chosen series' zero-copy members (the check inside the decode,
    with the library it uses: :func:`processor.deflate.crc32`)."""
    with open_arrival(zip_path, LIMITS) as contents:
        names = {i.member.name for i in choose_series(_scan(contents.members)).instances}

    def check() -> int:
        with open_arrival(zip_path, LIMITS) as contents:
            views = [m for m in contents.members if m.name in names and m.viewer is not None]
            return sum(crc32(m.viewer()) == m.crc for m in views)

    return check


@contextmanager
def _opened(zip_path: Path) -> Iterator[Contents]:
    """``open_arrival`` as the executor opens an input: with the cyclic collector paused while it
    reads the central directory (:func:`processor.executor_read.open_input`)."""
    from processor.gcpause import gc_paused

    with ExitStack() as stack:
        with gc_paused():
            contents = stack.enter_context(open_arrival(zip_path, LIMITS))
        yield contents


def _scan(members):  # type: ignore[no-untyped-def]
    """``scan_members`` as the executor runs it: with the cyclic collector paused."""
    from processor.gcpause import gc_paused

    with gc_paused():
        return scan_members(members)
