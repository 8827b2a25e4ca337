"""A GPU proof in one command: ``python bench/gpu_check.py --out DIR`` (issue 18, item 6).

No weights needed: every model is either the small reference CT-CLIP of ``tests/fixtures`` or
built with random weights at its real size. Seven sections, each guarded (a failure is recorded
with its reason and the next section runs) and written to ``DIR/gpu_check.json`` as soon as it
ends (the file is rewritten after each; progress goes to stdout, flushed, and to
``DIR/gpu_check.log``; section 7 adds ``DIR/daemon.log``):

1. environment: GPU, driver, CUDA, cuDNN, torch, Python, CPUs, SDPA switches, TF32 state;
2. the small CT-CLIP fixture on the device, float32 and bf16, against the CPU goldens
   (``bench/gpu_ctclip.py``);
3. the full-size CT-CLIP v2 with random weights on a 1 × 1 × 240 × 480 × 480 input at batch 1/2/4;
4. pinned against pageable host-to-device copies of that input;
5. a BLIP-2-OPT-2.7B-shaped captioner generating 40 tokens for 6 and 16 images
   (``bench/gpu_models.py``);
6. the diffusion UNet scoring 16 slices;
7. the daemon end to end with ``device: cuda`` on synthetic studies: studies/hour and GPU idle
   fraction (``bench/gpu_daemon.py``).

Time: ``--budget`` seconds in all (default 420, inside the 8 minutes a GPU machine gives one
call). Each section has its own budget (its repeats stop there) and a least time it needs; a
section that would not fit in what is left is skipped, and the JSON says so. ``--device cuda`` (the
default) without CUDA is a configuration error (exit 2), never a silent run on the CPU;
``--device cpu --tiny`` runs the same code with tiny shapes (``tests/test_gpu_check.py``).
Exit status: 0 when every section ran (or was skipped for time), 1 when one failed, 2 on a
configuration error. float32 runs with TF32 off (``resolve_device``); bf16 only where a section
compares it (docs/precision.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the daemon and study makers are child processes

import torch  # noqa: E402

from bench.gpu_ctclip import copy_section, fixture_section, full_ctclip_section  # noqa: E402
from bench.gpu_daemon import daemon_section  # noqa: E402
from bench.gpu_models import captioner_section, diffusion_section  # noqa: E402
from bench.gpu_timing import Check, free_device_memory  # noqa: E402
from processor.atomic import write_bytes_atomic  # noqa: E402
from processor.errors import ConfigError  # noqa: E402
from processor.models.device import resolve_device, tf32_enabled  # noqa: E402

log = logging.getLogger("gpu_check")


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    run: Callable[[Check], dict[str, Any]]
    budget_s: float  # the section's repeats stop here
    least_s: float  # skipped when less than this is left


def environment_section(check: Check) -> dict[str, Any]:
    import numpy
    import transformers

    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_build": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "device": str(check.device),
        "tf32_in_use": tf32_enabled() if check.cuda else None,
        "git_commit": _git_commit(),
    }
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError as exc:
        info["diffusers"] = f"missing ({exc})"
    if check.cuda:
        props = torch.cuda.get_device_properties(check.device)
        info.update(
            gpu=props.name,
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            driver=_driver_version(),
            sdpa_enabled={
                "flash": torch.backends.cuda.flash_sdp_enabled(),
                "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                "math": torch.backends.cuda.math_sdp_enabled(),
            },
        )
    info["problems"] = ["TF32 is on: float32 figures would not be float32"] if info["tf32_in_use"] else []
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    if not (REPO / ".git").exists() or not shutil.which("git"):
        return None
    done = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def _driver_version() -> str | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception as exc:  # no pynvml, or NVML refuses (pynvml.NVMLError): ask nvidia-smi
        log.info("driver version from NVML: %s: %s", type(exc).__name__, exc)
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        done = subprocess.run(query, capture_output=True, text=True)
        return done.stdout.strip().splitlines()[0] if done.stdout.strip() else None
    return None


SECTIONS = (
    Section("environment", "1. environment", environment_section, 20, 2),
    Section(
        "ctclip_fixture", "2. small CT-CLIP fixture vs CPU goldens (fp32, bf16)", fixture_section, 30, 10
    ),
    Section(
        "ctclip_full", "3. full-size CT-CLIP v2, random weights, batch 1/2/4", full_ctclip_section, 100, 40
    ),
    Section("host_to_device", "4. pinned vs pageable host-to-device copy", copy_section, 20, 5),
    Section(
        "captioner", "5. BLIP-2 OPT-2.7B shape, 40 new tokens, 6 and 16 images", captioner_section, 100, 45
    ),
    Section("diffusion", "6. diffusion UNet scoring 16 slices", diffusion_section, 25, 10),
    Section("daemon", "7. the daemon end to end (studies/hour, GPU idle)", daemon_section, 240, 120),
)


class Report:
    """The JSON document, rewritten (atomically) after every section."""

    def __init__(self, path: Path, head: dict[str, Any]) -> None:
        self.path = path
        self.doc: dict[str, Any] = {**head, "sections": {}}
        self.write()

    def record(self, key: str, entry: dict[str, Any]) -> None:
        self.doc["sections"][key] = entry
        self.write()

    def write(self) -> None:
        text = json.dumps(self.doc, indent=2, ensure_ascii=False, default=str, allow_nan=True)
        write_bytes_atomic(self.path, (text + "\n").encode("utf-8"))


def run_section(section: Section, check: Check, ends: float) -> dict[str, Any]:
    """Run one section under its budget; the entry to record (ok, failed or skipped)."""
    left = ends - time.monotonic()
    if left < section.least_s:
        return {
            "status": "skipped",
            "reason": f"{left:.0f} s of the run's budget left; this section needs at least {section.least_s:.0f} s",
        }
    check.deadline = time.monotonic() + min(section.budget_s, left)
    began = time.perf_counter()
    entry: dict[str, Any]
    try:
        result = section.run(check)
        problems = result.get("problems") or []
        entry = {"status": "failed" if problems else "ok", "result": result}
        if problems:
            entry["error"] = "; ".join(str(p) for p in problems)
    except Exception as exc:  # a failed section is recorded and the next one runs
        log.error("section %s failed:\n%s", section.key, traceback.format_exc())
        entry = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        free_device_memory(check.device)
    entry["seconds"] = round(time.perf_counter() - began, 2)
    return entry


HEADLINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "environment": lambda r: (
        f"{r.get('gpu', 'no GPU')}, driver {r.get('driver')}, torch {r['torch']}, "
        f"CUDA {r['cuda_build']}, Python {r['python']}, {r['cpu_count']} CPUs"
    ),
    "ctclip_fixture": lambda r: (
        f"fp32 matches goldens: {r['fp32']['matches_reference']}; bf16 Δp "
        f"{r['bf16']['zero_shot_max_dp']:.3g}, VQ flips {r['bf16']['vq_codes_flipped']}/{r['bf16']['vq_codes']}"
    ),
    "ctclip_full": lambda r: (
        "per study ms fp32/bf16: "
        + ", ".join(
            f"b{b} {r['encode_image'][f'fp32_batch{b}'].get('per_study_ms')}/{r['encode_image'][f'bf16_batch{b}'].get('per_study_ms')}"
            for b in (1, 2, 4)
        )
        + f"; bf16 VQ agreement {r['fp32_vs_bf16']['vq_agreement']}, cosine {r['fp32_vs_bf16']['latent_cosine_min']}"
    ),
    "host_to_device": lambda r: (
        f"pageable {r['pageable_to_device']['gb_per_s']} GB/s, pinned "
        f"{(r.get('pinned_to_device') or {}).get('gb_per_s')} GB/s"
    ),
    "captioner": lambda r: (
        f"6 images {r['images_6']['median_s']} s, 16 images {r['images_16']['median_s']} s "
        f"({r['images_16']['new_tokens_per_call']} tokens)"
    ),
    "diffusion": lambda r: f"16 slices {r['study']['median_ms']} ms ({r['unet_forwards']} forwards)",
    "daemon": lambda r: (
        f"{r.get('studies_done')} studies, {r.get('studies_per_hour')}/h, GPU idle "
        f"{(r.get('gpu_utilisation') or {}).get('gpu_idle_fraction')}, GPU-step share {r.get('gpu_step_wall_fraction')}"
    ),
}


def headline(key: str, entry: dict[str, Any]) -> str:
    if entry["status"] != "ok":
        return str(entry.get("error") or entry.get("reason") or "")[:160]
    try:
        return HEADLINES[key](entry["result"])
    except (KeyError, TypeError) as exc:
        return f"(no headline: {exc!r})"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.log, daemon.log"
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: the same code paths in seconds, for CI")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    p.add_argument("--studies", type=int, help="studies dropped into the daemon (default 8; tiny 3)")
    p.add_argument(
        "--only",
        help="comma-separated section numbers or keys to run (e.g. 3,5); the others are recorded as not run",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.monotonic()
    try:
        device = resolve_device(args.device)
    except ConfigError as exc:
        print(f"gpu_check: configuration error: {exc}", file=sys.stderr, flush=True)
        return 2
    if device.type != "cuda" and not args.tiny:
        print(
            f"gpu_check: configuration error: device {device} runs only with --tiny (the full-size models "
            "need a GPU). Fix: add --tiny, or run on a machine with CUDA.",
            file=sys.stderr,
            flush=True,
        )
        return 2
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny tensors: with more threads, OpenMP barriers stall under load (20x)
    args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        handlers=[logging.FileHandler(args.out / "gpu_check.log", mode="w", encoding="utf-8")],
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def say(text: str) -> None:
        line = f"[{time.monotonic() - started:6.1f} s] {text}"
        print(line, flush=True)
        log.info("%s", text)

    wanted = {s.strip() for s in (args.only or "").split(",") if s.strip()}
    check = Check(device, args.tiny, args.out, say, studies=args.studies or (3 if args.tiny else 8))
    ends = started + args.budget
    report = Report(
        args.out / "gpu_check.json",
        {
            "tool": "bench/gpu_check.py",
            "argv": sys.argv[1:] if argv is None else argv,
            "device": str(device),
            "tiny": args.tiny,
            "budget_s": args.budget,
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    say(f"gpu_check on {device}{' (tiny)' if args.tiny else ''}, budget {args.budget:.0f} s, out {args.out}")
    for number, section in enumerate(SECTIONS, 1):
        if wanted and str(number) not in wanted and section.key not in wanted:
            report.record(section.key, {"status": "not run", "reason": "not in --only"})
            continue
        say(f"{section.title} ...")
        entry = run_section(section, check, ends)
        report.record(section.key, entry)
        say(
            f"{section.title}: {entry['status']} in {entry.get('seconds', 0)} s — {headline(section.key, entry)}"
        )
    report.doc["seconds"] = round(time.monotonic() - started, 1)
    report.doc["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    report.write()
    sections = report.doc["sections"]
    say(f"summary ({report.doc['seconds']} s; {args.out / 'gpu_check.json'}):")
    for key, entry in sections.items():
        print(f"  {key:<16} {entry['status']:<8} {headline(key, entry)}", flush=True)
    return 1 if any(e["status"] == "failed" for e in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
