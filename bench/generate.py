"""Synthetic chest-CT studies for the benchmark, cached under ``bench/out/``.

One study = a scout (one LOCALIZER image), the thin axial series the pipeline should choose
(``slices`` × ``size``² int16, 1 mm, lung kernel) and a second, thick (5 mm) soft-tissue series
made of every 5th slice — all real DICOM files built from pydicom's CT_small.dcm by
``tests/dicomgen.py``. Pixels are ``tests.dicomgen.chest_phantom`` plus Gaussian noise (σ =
``noise_hu``), so DEFLATE and the JPEG codecs see CT-like entropy rather than flat regions.

Variants (same pixels, lossless):

==============  ===================================  =============
variant         DICOM transfer syntax                ZIP method
==============  ===================================  =============
uncompressed    Explicit VR Little Endian (native)   STORED
deflated        Explicit VR Little Endian (native)   DEFLATED
jpeg-ls         JPEG-LS Lossless                     STORED
jpeg2000        JPEG 2000 Lossless                   STORED
==============  ===================================  =============

ZIP members are shuffled (fixed seed), as exports often are. Files are written once per
(spec, variant) and reused; ``meta.json`` next to them records the spec.
"""

from __future__ import annotations

import json
import random
import sys
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import dicomgen  # noqa: E402 - the repo's own DICOM generator

OUT = Path(__file__).resolve().parent / "out"
VARIANTS = ("uncompressed", "deflated", "jpeg-ls", "jpeg2000")
_ENCODING = {"uncompressed": "native", "deflated": "native", "jpeg-ls": "jpeg-ls", "jpeg2000": "jpeg2000"}
_ZIP_METHOD = {
    "uncompressed": zipfile.ZIP_STORED,
    "deflated": zipfile.ZIP_DEFLATED,
    "jpeg-ls": zipfile.ZIP_STORED,
    "jpeg2000": zipfile.ZIP_STORED,
}
GENERATOR_VERSION = 1


@dataclass(frozen=True)
class StudySpec:
    slices: int = 300
    size: int = 512
    slice_mm: float = 1.0
    pixel_mm: float = 0.7
    thick_every: int = 5  # the second series takes every n-th slice (5 mm)
    noise_hu: float = 15.0
    seed: int = 0

    @property
    def tag(self) -> str:
        return f"s{self.slices}x{self.size}-n{self.noise_hu:g}-seed{self.seed}-v{GENERATOR_VERSION}"

    @property
    def pixel_bytes(self) -> int:
        """Uncompressed pixel bytes of the chosen (thin) series."""
        return self.slices * self.size * self.size * 2


FULL = StudySpec()
SMOKE = StudySpec(slices=24, size=64, pixel_mm=5.6, slice_mm=1.0, thick_every=4)


def stored_pixels(spec: StudySpec) -> np.ndarray:
    """(slices, size, size) int16 stored values: chest phantom HU + noise, + 1024 (intercept −1024)."""
    hu, _ = dicomgen.chest_phantom((spec.slices, spec.size, spec.size))
    rng = np.random.default_rng(spec.seed)
    for k in range(spec.slices):  # slice by slice: bounded temporaries at full size
        hu[k] += rng.normal(0.0, spec.noise_hu, hu[k].shape).astype(np.float32)
    return np.clip(np.rint(hu + 1024.0), -2048, 4095).astype(np.int16)


def study_datasets(spec: StudySpec) -> list:
    """The study's datasets (scout, thin series, thick series) with native pixels."""
    stored = stored_pixels(spec)
    study_uid = generate_uid()
    scout = dicomgen.make_scout(study_uid=study_uid, series_number=1)
    thin = dicomgen.make_series(
        spec.slices,
        study_uid=study_uid,
        spacing=spec.slice_mm,
        series_number=2,
        description=f"CHEST {spec.slice_mm:g} LUNG",
        kernel="LUNG",
        stored=stored,
        pixel_spacing=spec.pixel_mm,
    )
    thick_stored = stored[:: spec.thick_every]
    thick = dicomgen.make_series(
        len(thick_stored),
        study_uid=study_uid,
        spacing=spec.slice_mm * spec.thick_every,
        series_number=3,
        description="CHEST 5 SOFT",
        kernel="STANDARD",
        stored=thick_stored,
        pixel_spacing=spec.pixel_mm,
    )
    return [*scout, *thin, *thick]


def write_variant(path: Path, datasets: list, variant: str, seed: int = 0) -> Path:
    encoding = _ENCODING[variant]
    items = [
        (
            f"EXPORT/SE{int(ds.SeriesNumber):02d}/IM{int(ds.InstanceNumber):05d}",
            dicomgen.to_bytes(dicomgen.encode(ds, encoding)),
        )
        for ds in datasets
    ]
    random.Random(seed).shuffle(items)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=_ZIP_METHOD[variant], compresslevel=6) as zf:
        for name, data in items:
            zf.writestr(name, data)
    tmp.replace(path)
    return path


def ensure_studies(
    spec: StudySpec, variants: tuple[str, ...] = VARIANTS, out: Path = OUT, say: object = print
) -> dict[str, Path]:
    """Paths of the study ZIPs for ``spec``, generating the missing ones."""
    folder = out / spec.tag
    paths = {v: folder / f"{v}.zip" for v in variants}
    missing = [v for v, p in paths.items() if not p.exists()]
    if missing:
        say(
            f"generating {spec.slices} slices of {spec.size}x{spec.size} ({', '.join(missing)}) "  # type: ignore[operator]
            f"into {folder} ..."
        )
        datasets = study_datasets(spec)
        for variant in missing:
            write_variant(paths[variant], datasets, variant, seed=spec.seed)
        (folder / "meta.json").write_text(
            json.dumps(
                {"spec": asdict(spec), "tag": spec.tag, "files": {v: p.name for v, p in paths.items()}},
                indent=2,
            )
        )
    return paths
