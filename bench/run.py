"""ctwatch benchmark: ``python bench/run.py [--smoke] [--json FILE] [--repeat N] [--studies K]``.

``python bench/run.py --side-by-side [--json FILE]``: only issue 18's ratios to other code in one
run (``process`` against today's code, ingest against dcm2niix / SimpleITK / pydicom, the daemon
against today's daemon): bench/side_by_side.py.

Generates (once, cached in bench/out/) synthetic chest-CT studies, times every stage N times and
prints medians and the ratios of issue 9, each measured side by side in this run; see
bench/README.md for what each figure means and the figures of one full run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import math
import mmap
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# torch's OpenMP threads spin after each parallel region (libgomp's default wait policy); time.process_time
# counts that spin as work, and under load it takes the core from the thread that works (30 small
# CT-CLIP calls: 0.3-9 CPU-s spinning, 0.09 passive). PASSIVE lets idle threads sleep, so CPU seconds
# here are work (issue 18, item 7); set OMP_WAIT_POLICY yourself to measure another policy.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import engine, fast, ingest_memcpy, latency, naive  # noqa: E402
from bench.generate import FULL, OUT, SMOKE, VARIANTS, StudySpec, ensure_studies  # noqa: E402
from bench.timing import Samples, repeat, timed  # noqa: E402

HEADLINE_KEYS = (
    "ingest_vs_memcpy_ratio",
    "fast_vs_naive_cpu_ratio",
    "zeroshot_vs_encode_ratio",
    "studies_per_hour_overlap_on",
    "studies_per_hour_overlap_off",
)


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import pydicom

    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pydicom": pydicom.__version__,
        "platform": platform.platform(),
        "loadavg_at_start": [round(v, 2) for v in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------- sections
TENSOR_VARIANTS = ("uncompressed", "deflated")  # ZIP → CT-CLIP tensor; the others stop at the HU volume


def per_variant(paths: dict[str, Path], n: int, say: Any) -> tuple[dict[str, dict[str, Samples]], Any]:
    """Fast and naive ZIP → HU volume (→ CT-CLIP tensor for TENSOR_VARIANTS), and the ingest stages.

    Preprocessing from the HU volume on is the same code on the same voxels for every variant, so
    the JPEG variants stop at the HU volume (their decode is what differs) to keep the run short.
    """
    stages: dict[str, dict[str, Samples]] = {}
    kept_volume = None
    for variant, path in paths.items():
        to_tensor = variant in TENSOR_VARIANTS or variant == next(iter(paths))
        say(
            f"  {variant}: fast path, naive path{' (to the CT-CLIP tensor)' if to_tensor else ''}, stages x{n} ..."
        )
        s: dict[str, Samples] = {}
        for _ in range(n):
            _compare(path, variant, to_tensor, s)
            if kept_volume is None:
                gc.collect()
                kept_volume = fast.fast_volume(path)
            gc.collect()
            fast.stage_breakdown(path, s)
        stages[variant] = {k: s[k] for k in (*fast.STAGES, *[k for k in s if k not in fast.STAGES])}
    return stages, kept_volume


def _compare(path: Path, variant: str, to_tensor: bool, s: dict[str, Samples]) -> None:
    """One fast and one naive run; their outputs must agree exactly (the inputs are lossless)."""
    gc.collect()
    if to_tensor:
        mine = fast.fast_tensor(path)
        s.setdefault("fast: ZIP → HU volume", Samples()).add(*mine.ingest)
        s.setdefault("fast: ZIP → CT-CLIP tensor", Samples()).add(*_sum(mine.ingest, mine.preprocess))
        mine_out: Any = mine.tensor
        del mine
        gc.collect()
        theirs = naive.naive_tensor(path)
        s.setdefault("naive: ZIP → HU volume (float64)", Samples()).add(*theirs.ingest)
        s.setdefault("naive: ZIP → CT-CLIP tensor", Samples()).add(*_sum(theirs.ingest, theirs.preprocess))
        same = torch.equal(mine_out, theirs.tensor)
    else:
        volume = timed(lambda: fast.fast_volume(path), s.setdefault("fast: ZIP → HU volume", Samples()))[0]
        gc.collect()
        theirs_volume = timed(
            lambda: naive.naive_volume(path), s.setdefault("naive: ZIP → HU volume (float64)", Samples())
        )[0]
        same = np.array_equal(volume.hu.astype(np.float64), theirs_volume.hu)
    if not same:
        raise RuntimeError(f"{variant}: the fast and naive paths disagree on a lossless input")


def _sum(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return a[0] + b[0], a[1] + b[1]


CODEC_VARIANTS = ("jpeg-ls", "jpeg2000")  # issue 18 item 4: compressed ingest, imagecodecs vs pydicom
CODEC_PATHS = {"imagecodecs": True, "pydicom only": False}


def codec_ingest(paths: dict[str, Path], n: int, say: Any) -> tuple[dict[str, dict[str, Samples]], dict]:
    """Compressed ZIP → HU volume with imagecodecs (GIL released: the decode threads run side by
    side) and with pydicom's decoders only, interleaved (order alternated), ``n`` each per variant.

    Returns the samples per variant and the figures: CPU s, wall s and wall ÷ CPU of each path
    (goal for imagecodecs: ≤ 0.6 on 2 cores), the wall speed-up and the CPU ratio between them.
    Both volumes must be equal voxel for voxel, else ``RuntimeError``.
    """
    stages: dict[str, dict[str, Samples]] = {}
    figs: dict[str, Any] = {"decode_threads": min(4, os.cpu_count() or 1)}  # ct.volume's default pool
    for variant in (v for v in CODEC_VARIANTS if v in paths):
        say(f"  {variant}: compressed ingest, imagecodecs vs pydicom only, interleaved x{n} ...")
        s = {label: Samples() for label in CODEC_PATHS}
        first: dict[str, Any] = {}
        for i in range(n):
            for label in list(CODEC_PATHS)[:: 1 if i % 2 == 0 else -1]:
                gc.collect()
                flag, path = CODEC_PATHS[label], paths[variant]
                volume = timed(
                    lambda flag=flag, path=path: fast.fast_volume(path, imagecodecs=flag), s[label]
                )[0]
                first.setdefault(label, volume)
                del volume
        a, b = (first[label] for label in CODEC_PATHS)
        if not (a.hu.dtype == b.hu.dtype and np.array_equal(a.hu, b.hu)):
            raise RuntimeError(f"{variant}: imagecodecs and pydicom decode different volumes")
        fast_s, ref_s = s["imagecodecs"], s["pydicom only"]
        figs[variant] = {
            "imagecodecs_cpu_s": round(fast_s.cpu_median, 3),
            "imagecodecs_wall_s": round(fast_s.wall_median, 3),
            "imagecodecs_wall_over_cpu": _finite(fast_s.wall_median / fast_s.cpu_median),
            "pydicom_cpu_s": round(ref_s.cpu_median, 3),
            "pydicom_wall_s": round(ref_s.wall_median, 3),
            "pydicom_wall_over_cpu": _finite(ref_s.wall_median / ref_s.cpu_median),
            "wall_speedup": _finite(ref_s.wall_median / fast_s.wall_median),
            "cpu_ratio_imagecodecs_vs_pydicom": _finite(fast_s.cpu_median / ref_s.cpu_median),
            "decoders": {label: first[label].provenance["decoder"] for label in CODEC_PATHS},
            "identical_volumes": True,
        }
        stages[variant] = {f"{label}: ZIP → HU volume": s[label] for label in CODEC_PATHS}
        del first, a, b
    return stages, figs


def codecs_only(args: argparse.Namespace, paths: dict[str, Path], n: int, about: dict, say: Any) -> int:
    """``--codecs-only``: the compressed ingest comparison alone, printed and (``--json``) written."""
    say("\ncompressed ingest, imagecodecs vs pydicom only")
    stages, figs = codec_ingest(paths, n, say)
    print_codecs(stages, figs, say)
    about["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    if args.json:
        document = {"codec_ingest": figs, **about, "mode": "codecs-only", "repeat": n}
        document["stages"] = {f"codecs/{v}": _stage_dict(s) for v, s in stages.items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0


def side_by_side_only(
    args: argparse.Namespace, spec: StudySpec, n: int, about: dict, started: float, say: Any
) -> int:
    """``--side-by-side``: issue 18's ratios to today's code and to other tools alone (see
    bench/side_by_side.py), printed and (``--json``) written."""
    from bench import side_by_side

    zip_path = ensure_studies(spec, ("uncompressed",), args.out, say)["uncompressed"]
    count = args.daemon or (3 if args.smoke else 20)
    figs = side_by_side.run(
        zip_path, spec, n, baseline=True, other_tools=True, daemon=count, daemon_rounds=args.daemon_rounds,
        out=args.out, say=say, ceiling_pairs=1 if args.smoke else 3,
    )  # fmt: skip
    side_by_side.print_figures(figs, say)
    about["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    seconds = time.perf_counter() - started
    say(f"\nbench finished in {seconds:.0f} s")
    if args.json:
        document = {
            "side_by_side": figs,
            **about,
            "mode": "side-by-side",
            "repeat": n,
            "bench_seconds": round(seconds, 1),
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0


def dask_only(args: argparse.Namespace, spec: StudySpec, about: dict, started: float, say: Any) -> int:
    """``--dask``: the Dask executor against the local one alone (bench/dask_rate.py), printed and
    (``--json``) written."""
    from bench import dask_rate

    n = args.dask or (2 if args.smoke else dask_rate.STUDIES)
    rounds = args.throughput_runs or (1 if args.smoke else 2)
    repeats = args.repeat or (1 if args.smoke else 3)
    modes = "; ".join(m.name for m in dask_rate.MODES)
    again = "; ".join(m.name for m in dask_rate.AGAIN)
    say(f"\n[dask] the real daemon, {n} studies dropped at once per run: {modes}; then {rounds - 1} more "
        f"round(s) of {again}, reversed")  # fmt: skip
    figs, runs, single = dask_rate.run(spec, n, rounds, repeats, args.out, say)
    dask_rate.print_figures(figs, say)
    about["machine"]["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    seconds = time.perf_counter() - started
    say(f"\nbench finished in {seconds:.0f} s")
    if args.json:
        document = {"dask": figs, **about, "mode": "dask", "runs": runs, "single_study": single}
        document["bench_seconds"] = round(seconds, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 1 if figs["failures"] else 0


def print_codecs(stages: dict[str, dict[str, Samples]], figs: dict, say: Any) -> None:
    for variant, samples in stages.items():
        print_table(f"{variant}: compressed ingest, imagecodecs vs pydicom only — medians", samples, say)
        f = figs[variant]
        say(
            f"  wall/CPU imagecodecs {f['imagecodecs_wall_over_cpu']} (goal ≤ 0.6 on 2 cores), pydicom "
            f"{f['pydicom_wall_over_cpu']}; wall speed-up {f['wall_speedup']}x; CPU ratio "
            f"{f['cpu_ratio_imagecodecs_vs_pydicom']}; {figs['decode_threads']} decode threads"
        )


MEMORY_READS = (
    "copy into new memory (page faults included)",
    "copy into touched memory (memcpy)",
    "numpy int16 sum (read only)",
)


def memory_read(volume: Any, n: int) -> dict[str, Samples]:
    """Plain memory reads of the chosen series' uncompressed pixel bytes (int16, as stored).

    The headline reference copies them into a fresh anonymous mapping, so every page is faulted in
    as it is for the new HU volume of a study; whether ``bytes(view)`` gets fresh pages depends on
    the allocator's state (one run measured 2.2 GB/s, another 7.2 GB/s), so it is not used.
    """
    src = (volume.hu.astype(np.int32) + 1024).astype(np.int16).ravel()
    buf = src.tobytes()
    touched = np.ones_like(src)  # written once: its pages are in place
    out = {name: Samples() for name in MEMORY_READS}
    for _ in range(max(5, n)):
        fresh = mmap.mmap(-1, src.nbytes)
        dst = np.frombuffer(fresh, np.int16)
        timed(lambda dst=dst: np.copyto(dst, src), out[MEMORY_READS[0]])
        del dst
        fresh.close()
        timed(lambda: np.copyto(touched, src), out[MEMORY_READS[1]])
        timed(lambda: np.frombuffer(buf, np.int16).sum(), out[MEMORY_READS[2]])
    return out


LABEL_SCIPY = "lung mask 3-D labelling, scipy.ndimage.label (reference)"
LABEL_CC3D = "lung mask 3-D labelling, connected-components-3d (used)"


def volume_stages(volume: Any, n: int, zip_path: Path) -> dict[str, Samples]:
    """Parts of the decode timed alone (CRC-32 check, HU rescale) and the stages that start from
    the HU volume (same for every variant)."""
    from processor.dicom.decode import _rescale_into
    from processor.models.ctclip_preprocess import ctrate_xyz_from_dicom, preprocess_volume

    stored = (volume.hu.astype(np.int32) + 1024).astype(np.int16)
    out_hu = np.empty(stored.shape, volume.hu.dtype)

    def rescale() -> None:
        for k in range(stored.shape[0]):  # as decode_into does it, slice by slice
            _rescale_into(out_hu[k], stored[k], 1.0, -1024.0)

    s: dict[str, Samples] = {}
    repeat(
        fast.crc_of_chosen_series(zip_path),
        n,
        s.setdefault("CRC-32 check of the chosen series only (inside decode)", Samples()),
    )
    repeat(
        rescale,
        n,
        s.setdefault(f"HU rescale only (stored int16 → {volume.hu.dtype} HU, inside decode)", Samples()),
    )
    xyz, spacing = repeat(
        lambda: ctrate_xyz_from_dicom(volume.hu, volume.spacing_zyx, volume.affine),
        n,
        s.setdefault("orientation (ctrate_xyz_from_dicom)", Samples()),
    )[0]
    repeat(
        lambda: preprocess_volume(xyz, spacing),
        n,
        s.setdefault("CT-CLIP preprocessing (preprocess_volume → 480×480×240)", Samples()),
    )
    from scipy import ndimage

    from processor.dicom.components import label_3d

    air = volume.hu < -320  # the lung mask's air threshold (LungSettings.threshold_hu)
    for _ in range(n):  # interleaved, the same mask: scipy's labelling against the one the mask uses
        repeat(lambda: ndimage.label(air), 1, s.setdefault(LABEL_SCIPY, Samples()))
        repeat(lambda: label_3d(air), 1, s.setdefault(LABEL_CC3D, Samples()))
    return s


DEFLATE_CRC = ("CRC-32 of every member, zlib (reference)", "CRC-32 of every member, {lib} (used)")
DEFLATE_INFLATE = (
    "raw inflate of every member, zlib (reference)",
    "raw inflate of every member, {lib} (used)",
)
DEFLATE_READS = ("ZIP read through ctwatch (all members verified)", "ZIP read through zipfile")


def deflate_backends(zip_path: Path, n: int) -> tuple[dict[str, Samples], dict[str, Any]]:
    """CRC-32 and raw DEFLATE of every member of the deflated study: zlib against the library the
    daemon uses (:mod:`processor.deflate`: ISA-L), interleaved in one run (order alternated), ``n``
    each, the inflation 64 KiB of output at a time as the member reader asks for it; and the whole
    ZIP read through ctwatch (every member inflated, size and CRC-32 checked) and through
    :mod:`zipfile`. Both libraries must give the central directory's CRC-32s and zipfile's bytes,
    else ``RuntimeError``. Returns the samples and the figures for ``details``."""
    import zipfile
    import zlib

    from processor import deflate
    from processor.intake.archive import Limits, open_arrival
    from processor.intake.inflate import CHUNK

    lib = "ISA-L" if deflate.BACKEND.startswith("ISA-L") else "zlib"
    with zipfile.ZipFile(zip_path) as zf, zip_path.open("rb") as fh:
        infos = [i for i in zf.infolist() if i.compress_type == zipfile.ZIP_DEFLATED]
        packed = []
        for info in infos:  # the member's compressed bytes, after its local header
            fh.seek(info.header_offset + 26)
            name_len, extra_len = int.from_bytes(fh.read(2), "little"), int.from_bytes(fh.read(2), "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            packed.append(fh.read(info.compress_size))
        plain = [zf.read(info) for info in infos]

    def inflate_all(inflater: Any) -> list[bytes]:
        out = []
        for data in packed:
            d, pieces = inflater(), []
            pieces.append(d.decompress(data, CHUNK))
            while not d.eof:
                piece = d.decompress(d.unconsumed_tail, CHUNK)
                if not piece and not d.unconsumed_tail:
                    raise RuntimeError(f"{zip_path.name}: a member's stream ends short")
                pieces.append(piece)
            out.append(b"".join(pieces))
        return out

    crcs = [info.CRC for info in infos]
    runs = {
        DEFLATE_CRC[0]: lambda: [zlib.crc32(data) for data in plain],
        DEFLATE_CRC[1].format(lib=lib): lambda: [deflate.crc32(data) for data in plain],
        DEFLATE_INFLATE[0]: lambda: inflate_all(lambda: zlib.decompressobj(-zlib.MAX_WBITS)),
        DEFLATE_INFLATE[1].format(lib=lib): lambda: inflate_all(deflate.inflater),
    }
    for label, run in runs.items():  # checked once, outside the timing
        if run() != (crcs if label.startswith("CRC") else plain):
            raise RuntimeError(f"{label}: not the bytes or checksums zipfile reads")

    def through_ctwatch() -> int:
        with open_arrival(zip_path, Limits()) as contents:
            return sum(len(m.read()) for m in contents.members)

    def through_zipfile() -> int:
        with zipfile.ZipFile(zip_path) as zf:
            return sum(len(zf.read(info)) for info in zf.infolist())

    runs[DEFLATE_READS[0]] = through_ctwatch
    runs[DEFLATE_READS[1]] = through_zipfile
    s = {label: Samples() for label in runs}
    for i in range(n):
        for label in list(runs)[:: 1 if i % 2 == 0 else -1]:
            repeat(runs[label], 1, s[label])
    key = lib.lower().replace("-", "")
    labels = list(s)
    figs = {
        "deflate_library": deflate.BACKEND,
        f"crc32_{key}_vs_zlib_cpu_ratio": _finite(s[labels[1]].cpu_median / s[labels[0]].cpu_median),
        f"inflate_{key}_vs_zlib_cpu_ratio": _finite(s[labels[3]].cpu_median / s[labels[2]].cpu_median),
        "zip_read_ctwatch_vs_zipfile_cpu_ratio": _finite(s[labels[4]].cpu_median / s[labels[5]].cpu_median),
        "deflated_members_mb": {
            "compressed": round(sum(map(len, packed)) / 1e6, 1),
            "inflated": round(sum(i.file_size for i in infos) / 1e6, 1),
        },
    }
    return s, figs


def ctclip_ratio(volume: Any, reps: int) -> dict[str, Samples]:
    from processor.models.ctclip import load_ctclip
    from processor.models.ctclip_preprocess import ctrate_xyz_from_dicom, preprocess_volume

    clip = engine.CT_CLIP
    model = load_ctclip(clip / "small_ctclip.pt", clip / "vocab.txt", clip / "small_config.json")
    xyz, spacing = ctrate_xyz_from_dicom(volume.hu, volume.spacing_zyx, volume.affine)
    tensor = preprocess_volume(xyz, spacing, (32, 32, 24))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one intra-op thread, no OpenMP barrier stalls under load
    try:
        return engine.zero_shot_vs_encode(model, tensor, reps)
    finally:
        torch.set_num_threads(threads)


def throughput(
    path: Path, k: int, runs: int, max_inflight: int, out: Path
) -> dict[str, list[engine.Throughput]]:
    with engine.scratch("ctwatch-bench-") as tmp:
        flow = engine.StudyFlow(engine.bench_env(tmp), tmp)
        jobs = [(i, path) for i in range(1, k + 1)]
        off, on = engine.interleave(
            runs,
            lambda: engine.run_sequential(flow, jobs),
            lambda: engine.run_overlapped(flow, jobs, max_inflight),
        )
    return {"off": off, "on": on}


# ---------------------------------------------------------------------------------------------- report
def _row(label: str, s: Samples, width: int = 58) -> str:
    return f"  {label:<{width}} {s.cpu_median:>9.3f} {s.wall_median:>9.3f} {s.n:>3}"


def print_table(title: str, stages: dict[str, Samples], say: Any) -> None:
    say(f"\n{title}\n  {'stage':<58} {'CPU s':>9} {'wall s':>9} {'n':>3}")
    for label, s in stages.items():
        say(_row(label, s))


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise RuntimeError(f"non-finite figure {value}")
    return round(value, 4)


def figures(
    spec: StudySpec,
    variants: dict[str, dict[str, Samples]],
    headline: str,
    mem: dict[str, Samples],
    zs: dict[str, Samples],
    tp: dict[str, list[engine.Throughput]],
) -> dict[str, Any]:
    mb = spec.pixel_bytes / 1e6
    copy_mbps = mb / mem[MEMORY_READS[0]].cpu_median
    h = variants[headline]
    ingest_mbps = {v: round(mb / s["fast: ZIP → HU volume"].cpu_median, 1) for v, s in variants.items()}
    on = sorted(t.per_hour for t in tp["on"])
    off = sorted(t.per_hour for t in tp["off"])
    return {
        "ingest_fraction_of_memory_read": _finite(ingest_mbps[headline] / copy_mbps),
        "fast_vs_naive_cpu_ratio": _finite(
            h["fast: ZIP → CT-CLIP tensor"].cpu_median / h["naive: ZIP → CT-CLIP tensor"].cpu_median
        ),
        "zeroshot_vs_encode_ratio": _finite(
            zs["zero_shot (18 findings)"].cpu_median / zs["encode_image"].cpu_median
        ),
        "studies_per_hour_overlap_on": _finite(float(np.median(on))),
        "studies_per_hour_overlap_off": _finite(float(np.median(off))),
        "details": {
            "headline_variant": headline,
            "pixel_mb_of_chosen_series": round(mb, 3),
            "memory_read_reference": "the chosen series' int16 pixel bytes copied into a fresh anonymous "
            "mapping (page faults included, as for a new HU volume)",
            "memory_read_mb_per_cpu_s": round(copy_mbps, 1),
            "memcpy_touched_mb_per_cpu_s": round(mb / mem[MEMORY_READS[1]].cpu_median, 1),
            "numpy_int16_sum_mb_per_cpu_s": round(mb / mem[MEMORY_READS[2]].cpu_median, 1),
            "ingest_mb_per_cpu_s": ingest_mbps,
            "ingest_fraction_of_memcpy_touched": round(
                ingest_mbps[headline] * mem[MEMORY_READS[1]].cpu_median / mb, 4
            ),
            "ingest_fraction_of_numpy_sum": round(
                ingest_mbps[headline] * mem[MEMORY_READS[2]].cpu_median / mb, 4
            ),
            "fast_vs_naive_cpu_ratio_by_variant": {
                v: round(
                    s["fast: ZIP → CT-CLIP tensor"].cpu_median / s["naive: ZIP → CT-CLIP tensor"].cpu_median,
                    4,
                )
                for v, s in variants.items()
                if "fast: ZIP → CT-CLIP tensor" in s
            },
            "fast_vs_naive_ingest_cpu_ratio_by_variant": {
                v: round(
                    s["fast: ZIP → HU volume"].cpu_median / s["naive: ZIP → HU volume (float64)"].cpu_median,
                    4,
                )
                for v, s in variants.items()
            },
            "fast_vs_naive_ingest_wall_ratio_by_variant": {
                v: round(
                    s["fast: ZIP → HU volume"].wall_median
                    / s["naive: ZIP → HU volume (float64)"].wall_median,
                    4,
                )
                for v, s in variants.items()
            },
            "zeroshot_vs_encode_wall_ratio": round(
                zs["zero_shot (18 findings)"].wall_median / zs["encode_image"].wall_median, 4
            ),
            "official_loop_vs_encode_ratio": round(
                zs["official loop (re-encode per finding)"].cpu_median / zs["encode_image"].cpu_median, 2
            ),
            "throughput_runs_on": [round(v, 1) for v in on],
            "throughput_runs_off": [round(v, 1) for v in off],
            "overlap_speedup": round(float(np.median(on) / np.median(off)), 4),
            "prefetch_max_inflight_seen": max(t.max_inflight_seen for t in tp["on"]),
        },
    }


def _median(values: list[float]) -> float:
    return float(np.median(values))


def print_latency(lat: dict[str, list[latency.Latency]], say: Any) -> None:
    say(f"\ndrop → JSON latency, s after the copy ended (medians; {next(iter(lat.values()))[0].filesystem})")
    say(f"  {'drop':<24} {'→ taken':>9} {'→ JSON':>9} {'n':>3}")
    for mode, runs in lat.items():
        taken, json_s = _median([r.taken_s for r in runs]), _median([r.json_s for r in runs])
        say(f"  {mode:<24} {taken:>9.2f} {json_s:>9.2f} {len(runs):>3}")


def latency_figures(lat: dict[str, list[latency.Latency]]) -> dict[str, Any]:
    json_s = {mode: round(_median([r.json_s for r in runs]), 3) for mode, runs in lat.items()}
    taken_s = {mode: round(_median([r.taken_s for r in runs]), 3) for mode, runs in lat.items()}
    close, quiet = latency.MODES[0], latency.MODES[1]
    return {
        "drop_to_json_s": json_s,
        "drop_to_taken_s": taken_s,
        "drop_to_json_close_vs_quiet_ratio": _finite(json_s[close] / json_s[quiet]),
        "drop_to_taken_close_vs_quiet_ratio": _finite(taken_s[close] / taken_s[quiet]),
    }


def _stage_dict(stages: dict[str, Samples]) -> dict[str, Any]:
    return {k: v.as_dict() for k, v in stages.items()}


# ---------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="tiny study (24 slices of 64x64), N=1: checks the bench runs"
    )
    p.add_argument("--json", type=Path, help="also write the figures and per-stage medians to this file")
    p.add_argument("--repeat", "-n", type=int, help="runs per stage (default 3; smoke 1)")
    p.add_argument("--studies", "-k", type=int, help="studies per throughput run (default 3; smoke 2)")
    p.add_argument(
        "--throughput-runs", type=int, help="throughput runs per mode, alternated (default 2; smoke 1)"
    )
    p.add_argument(
        "--max-inflight", type=int, default=2, help="prefetch bound for the overlap run (default 2)"
    )
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--no-caption", action="store_true", help="skip the tiny BLIP-2 caption step")
    p.add_argument(
        "--no-latency", action="store_true", help="skip the drop → JSON latency (about 2 min in a full run)"
    )
    p.add_argument(
        "--daemon",
        nargs="?",
        type=int,
        const=0,
        metavar="N",
        help="also the real daemon's studies/hour, CPU and peak RSS per study, pool off / 1 / 2 processes, "
        "N studies (default 20, about 4 min; smoke 3): bench/daemon_rate.py",
    )
    p.add_argument(
        "--dask",
        nargs="?",
        type=int,
        const=0,
        metavar="N",
        help="only the Dask executor against the local one: the real daemon's studies/hour with a LocalCluster "
        "of 1 and 2 workers, inputs by path and by bytes, N studies per run (default 10; smoke 2), the overhead "
        "per study and the bytes a study moves (about 8 min on 2 cores; --throughput-runs R: R rounds of "
        "the local executor and Dask 1 worker path, alternated, default 2; --repeat: single-study runs "
        "per executor, default 3): bench/dask_rate.py",
    )
    p.add_argument(
        "--codecs-only",
        action="store_true",
        help="only the compressed ingest, imagecodecs vs pydicom (JPEG-LS, JPEG 2000; about 2 min full size)",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also issue 18's 'today' (commit bc513e6, a git worktree made under bench/out/): `process` of the ZIP "
        "old vs new, ABBA (bench/process_cpu.py), and with --daemon today's daemon as a first mode",
    )
    p.add_argument(
        "--tools",
        action="store_true",
        help="also ingest against unzip + dcm2niix, SimpleITK and plain pydicom (bench/tools.py; a tool not "
        "installed is skipped)",
    )
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="only --baseline, --tools and --daemon (today's daemon, pool off / 1 / 2), in one run (about 12 min "
        "full size on 2 cores with --daemon-rounds 1): bench/side_by_side.py",
    )
    p.add_argument(
        "--daemon-rounds", type=int, default=1, help="rounds over the daemon modes (the 2nd reversed)"
    )
    p.add_argument(
        "--out", type=Path, default=OUT, help="cache folder for generated studies (default bench/out)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    started = time.perf_counter()
    spec = SMOKE if args.smoke else FULL
    n = args.repeat or (1 if args.smoke else 3)
    k = args.studies or (2 if args.smoke else 3)
    runs = args.throughput_runs or (1 if args.smoke else 2)

    def say(text: str) -> None:
        print(text, flush=True)

    machine = machine_info()
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    say(f"ctwatch bench — {date} — {'smoke' if args.smoke else 'full'}")
    say("machine: " + ", ".join(f"{key}={value}" for key, value in machine.items()))
    if args.dask is not None:
        return dask_only(args, spec, {"machine": machine, "date": date, "spec": spec.__dict__}, started, say)
    if args.side_by_side:
        return side_by_side_only(
            args, spec, n, {"machine": machine, "date": date, "spec": spec.__dict__}, started, say
        )
    wanted = [v for v in args.variants if v in CODEC_VARIANTS or not args.codecs_only]
    paths = ensure_studies(spec, tuple(wanted), args.out, say)
    headline = "uncompressed" if "uncompressed" in paths else next(iter(paths))
    say(
        f"study: {spec.slices} slices of {spec.size}x{spec.size} + scout + {spec.slices // spec.thick_every}-slice "
        f"5 mm series; {spec.pixel_bytes / 1e6:.1f} MB pixels in the chosen series; N={n}"
    )

    if args.codecs_only:
        return codecs_only(args, paths, n, {"machine": machine, "date": date, "spec": spec.__dict__}, say)
    say("\n[1/6] ZIP → HU volume → CT-CLIP input, per variant")
    variants, volume = per_variant(paths, n, say)
    codec_stages, codec_figs = codec_ingest(paths, n, say)
    say("[2/6] memory read reference, volume stages")
    mem = memory_read(volume, n)
    ingest_mem, ingest_sizes = ingest_memcpy.measure(paths[headline], n)  # interleaved, this run
    vol_stages = volume_stages(volume, n, paths[headline])
    dfl_stages, dfl_figs = deflate_backends(paths["deflated"], n) if "deflated" in paths else ({}, {})
    say("[3/6] pipeline steps through the engine (small reference models)")
    caption = None if (args.smoke or args.no_caption) else engine.tiny_caption_model(args.out)
    with engine.scratch("ctwatch-bench-") as tmp:
        env = engine.bench_env(tmp)
        pipeline = engine.compile_pipeline(engine.WEIGHT_FREE + engine.model_steps(caption), env)
        steps = engine.time_steps(paths[headline], pipeline, n, tmp)
        assert steps.ctx is not None
        steps.samples["write (result JSON, atomic)"] = engine.time_write(steps.ctx, max(n, 3))
    say("[4/6] CT-CLIP zero-shot vs one image encode (32×32×24 reference model)")
    zs = ctclip_ratio(volume, 10 if args.smoke else 30)
    del volume
    gc.collect()
    tp_path = paths.get("deflated", paths[headline])
    say(f"[5/6] throughput, weight-free pipeline, {k} studies ({tp_path.stem}), overlap off/on x{runs}")
    tp = throughput(tp_path, k, runs, args.max_inflight, args.out)
    lat: dict[str, list[latency.Latency]] = {}
    if not args.no_latency:
        quiet = latency.SMOKE_QUIET if args.smoke else latency.DEFAULTS
        say(
            f"[6/6] drop → JSON latency ({paths[headline].stem}): one daemon, a new study per drop; quiet periods "
            f"{quiet.stable:g} s (file) / {quiet.folder:g} s (folder), scan every {quiet.scan:g} s"
        )
        lat = latency.measure(paths[headline], quiet, repeats=n)  # quiet-period drops once each
    daemon: tuple[dict[str, Any], list[dict[str, Any]]] | None = None
    if args.daemon is not None:
        from bench import daemon_rate

        count = args.daemon or (3 if args.smoke else 20)
        modes = [daemon_rate.BASELINE] * args.baseline + list(daemon_rate.WORKERS)
        say(
            f"[daemon] the real daemon, {count} studies dropped at once: {', '.join(map(daemon_rate.label, modes))}"
        )
        daemon = daemon_rate.run(
            spec, count, modes, args.daemon_rounds, args.out, say, 1 if args.smoke else 3
        )
    side: dict[str, Any] = {}
    if args.baseline or args.tools:
        from bench import side_by_side

        side = side_by_side.run(
            paths[headline], spec, n, baseline=args.baseline, other_tools=args.tools, daemon=None,
            daemon_rounds=1, out=args.out, say=say,
        )  # fmt: skip

    for variant, stages in variants.items():
        print_table(f"{variant} ({paths[variant].stat().st_size / 1e6:.1f} MB ZIP) — medians", stages, say)
    print_codecs(codec_stages, codec_figs, say)
    print_table("memory read of the same pixel bytes", mem, say)
    print_table("ingest against a memcpy of the ZIP's DICOM bytes (interleaved)", ingest_mem, say)
    print_table(f"from the HU volume ({headline})", vol_stages, say)
    if dfl_stages:
        print_table(
            "CRC-32 and DEFLATE, zlib against the library used (deflated study, all members)", dfl_stages, say
        )
    print_table(
        "pipeline steps through the engine (model steps: first run, with the load, excluded)",
        steps.samples,
        say,
    )
    say(
        "  model steps, first run (wall s, incl. model load): "
        + ", ".join(f"{key}={value:.2f}" for key, value in steps.first.items())
    )
    print_table("CT-CLIP 32×32×24 reference model", zs, say)
    for mode in ("off", "on"):
        say(
            f"  throughput overlap {mode}: "
            + ", ".join(
                f"{t.studies} studies in {t.wall_s:.1f} s wall / {t.cpu_s:.1f} s CPU = {t.per_hour:.0f}/h"
                for t in tp[mode]
            )
        )

    figs = figures(spec, variants, headline, mem, zs, tp)
    memcpy_figs = ingest_memcpy.figures(ingest_mem, ingest_sizes)
    figs["ingest_vs_memcpy_ratio"] = _finite(memcpy_figs["ingest_vs_memcpy_ratio"])
    figs["details"]["ingest_vs_memcpy"] = memcpy_figs["details"]
    old_reference = figs.pop("ingest_fraction_of_memory_read")  # issue 9's headline, now a detail
    figs["details"]["ingest_fraction_of_memory_read"] = old_reference
    figs["details"]["codec_ingest"] = codec_figs
    figs["details"]["lung_labelling_cc3d_vs_scipy_cpu_ratio"] = _finite(
        vol_stages[LABEL_CC3D].cpu_median / vol_stages[LABEL_SCIPY].cpu_median
    )
    figs["details"].update(dfl_figs)
    if lat:
        print_latency(lat, say)
        figs["details"].update(latency_figures(lat))
    if daemon is not None:
        daemon_rate.print_figures(daemon[0], say)
        figs["details"]["daemon"] = daemon[0]
    if side:
        if daemon is not None:
            side["daemon"] = daemon[0]
            side["goals"] = side_by_side.goals(side)
        side_by_side.print_figures({k: v for k, v in side.items() if k != "daemon"}, say)
        figs["details"]["side_by_side"] = {k: v for k, v in side.items() if k != "daemon"}
    machine["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    say("\nfigures (headline variant: " + headline + ")")
    goals = {
        "ingest_vs_memcpy_ratio": "goal ≥ 0.2 (memcpy CPU s ÷ ingest CPU s)",
        "fast_vs_naive_cpu_ratio": "goal ≤ 0.35",
        "zeroshot_vs_encode_ratio": "goal ≤ 1.1",
        "studies_per_hour_overlap_on": "must beat off",
        "studies_per_hour_overlap_off": "",
    }
    for key in HEADLINE_KEYS:
        say(f"  {key:<34} {figs[key]:>10}   {goals[key]}")
    for key, value in figs["details"].items():
        say(f"  {key}: {value}")
    seconds = time.perf_counter() - started
    say(f"\nbench finished in {seconds:.0f} s")
    if args.json:
        document = {key: figs[key] for key in HEADLINE_KEYS}
        document.update(
            {
                "details": figs["details"],
                "machine": machine,
                "date": date,
                "mode": "smoke" if args.smoke else "full",
                "repeat": n,
                "spec": spec.__dict__,
                "stages": {
                    **{f"ingest/{v}": _stage_dict(s) for v, s in variants.items()},
                    "memory_read": _stage_dict(mem),
                    "ingest_vs_memcpy": _stage_dict(ingest_mem),
                    "volume": _stage_dict(vol_stages),
                    "deflate": _stage_dict(dfl_stages),
                    **{f"codecs/{v}": _stage_dict(s) for v, s in codec_stages.items()},
                    "steps": _stage_dict(steps.samples),
                    "ctclip_small": _stage_dict(zs),
                },
                "steps_first_run_wall_s": {key: round(value, 4) for key, value in steps.first.items()},
                "throughput": {
                    mode: [t.__dict__ | {"per_hour": round(t.per_hour, 2)} for t in ts]
                    for mode, ts in tp.items()
                },
                "latency": {mode: [r.__dict__ for r in runs] for mode, runs in lat.items()},
                "daemon_runs": daemon[1] if daemon else [],
                "bench_seconds": round(seconds, 1),
            }
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
