"""``bench/gpu_check.py`` section 7: the daemon end to end on the device, with random-weight models.

A throw-away installation under a temp folder: ``weights/`` in the layout of
``weights/manifest.yaml`` (``ct_clip/CT_VocabFine_v2.pt`` and ``CT_LiPro_v2.pt`` as state dicts of
the full CT-CLIP v2 with random weights, a ``vocab.txt`` with CXR-BERT's layout and size,
``caption/blip2-opt-2.7b/`` written by ``save_pretrained`` from section 5's random BLIP-2 OPT-2.7B,
``anomaly/`` written by ``save_anomaly_model``), the shipped ``pipelines/chest-ct.yaml`` without the
steps that need models fitted on a site's own studies (``ctclip.head``, ``fusion.lightgbm``,
``decision.pathology``) and with ``on_missing_weights: fail``, and ``device: cuda``. So the daemon
(``python run.py run``, a child process) loads every model with its own loading code.

K synthetic studies (``bench/generate.py``: 300 slices of 512², a scout and a 5 mm series; each its
own UIDs and noise, so no caption comes from the content cache) are made in parallel processes while
the weights are written, then moved into the inbox at once. Figures:

* ``studies_per_hour``: (n − 1) studies over the time from the first result JSON to the last (the
  first study pays the model loads, reported apart as ``first_study_s``);
* ``gpu_idle_fraction``: 1 − mean GPU utilisation over that window, sampled every 0.1 s by NVML
  (``torch.cuda.utilization``; ``nvidia-smi`` when pynvml is missing). NVML's utilisation is the
  share of its sample period in which any kernel ran, so a small kernel counts as busy;
* ``gpu_step_wall_fraction``: the seconds the studies of that window spent in GPU steps (their
  result JSON's ``steps``) over the window: the worker's share of time on the GPU stage, host work
  inside those steps included;
* the daemon's CPU seconds per study (its process and children, from /proc).

``--tiny``: the small reference CT-CLIP, the tiny BLIP-2 and UNet, three 24-slice 64² studies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
FITTED_ON_SITE = ("ctclip.head", "fusion.lightgbm", "decision.pathology")
LOG_KEEP = 2 * 2**20


def make_study(spec: dict[str, Any], path: str) -> str:
    """One synthetic study as an uncompressed ZIP (runs in a worker process: no torch)."""
    from bench.generate import StudySpec, study_datasets, write_variant

    study = StudySpec(**spec)
    write_variant(Path(path), study_datasets(study), "uncompressed", seed=study.seed)
    return path


def write_vocab(path: Path, size: int) -> None:
    """A vocabulary with CXR-BERT's layout (specials at 0–4, distinct tokens) and ``size`` entries;
    the prompts' words are in it, the rest are fillers."""
    from processor.models.ctclip import CTRATE_FINDINGS

    words = sorted({w for f in CTRATE_FINDINGS for w in f.lower().split()} | {"is", "not", "present", "."})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tokens += [f"w{i}" for i in range(size - len(tokens))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(tokens[:size]) + "\n", encoding="utf-8")


def write_weights(check: Any, weights: Path) -> dict[str, float]:
    """Random-weight models saved where the shipped pipeline reads them; seconds per model."""
    import torch

    from bench.gpu_ctclip import ctclip_config, random_ctclip
    from bench.gpu_models import blip2_opt, caption_dtype, unet_shape
    from bench.gpu_timing import free_device_memory
    from processor.models.diffusion import build_scheduler, build_unet, save_anomaly_model

    seconds = {}
    began = time.perf_counter()
    cfg = ctclip_config(check)
    write_vocab(weights / "ct_clip" / "vocab.txt", int(cfg.bert["vocab_size"]))
    model = random_ctclip(cfg, check.device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    del model
    torch.save(state, weights / "ct_clip" / "CT_VocabFine_v2.pt")
    lipro = {f"trained_model.{k}": v for k, v in state.items()}
    generator = torch.Generator().manual_seed(1)
    lipro["classifier.weight"] = torch.randn(18, cfg.dim_latent, generator=generator) * 0.05
    lipro["classifier.bias"] = torch.zeros(18)
    torch.save(lipro, weights / "ct_clip" / "CT_LiPro_v2.pt")
    del state, lipro
    free_device_memory(check.device)
    seconds["ctclip"] = time.perf_counter() - began
    began = time.perf_counter()
    caption, processor = blip2_opt(check, caption_dtype(check))
    folder = weights / "caption" / "blip2-opt-2.7b"
    caption.save_pretrained(folder)
    processor.save_pretrained(folder)
    del caption
    free_device_memory(check.device)
    seconds["captioner"] = time.perf_counter() - began
    began = time.perf_counter()
    size, channels = unet_shape(check)
    torch.manual_seed(0)
    card = {
        "kind": "anomaly.diffusion",
        "image_size": size,
        "window": {"width": 1500.0, "level": -600.0},
        "defaults": {"slices": 16, "noise_level": 0.3, "ddim_steps": 50},
        "date": "random weights (bench/gpu_check.py)",
    }
    save_anomaly_model(weights / "anomaly", build_unet(size, channels), build_scheduler(), card)
    seconds["anomaly"] = time.perf_counter() - began
    return {k: round(v, 2) for k, v in seconds.items()}


def write_project(check: Any, root: Path) -> Path:
    """config.yaml and pipeline.yaml of the throw-away installation; returns the config."""
    import yaml

    shipped = yaml.safe_load((REPO / "pipelines" / "chest-ct.yaml").read_text(encoding="utf-8"))
    steps = [s for s in shipped["steps"] if s["uses"] not in FITTED_ON_SITE]
    if check.tiny:
        from bench.gpu_ctclip import FIX, SMALL_TARGET_XYZ

        for step in steps:
            if step["uses"].startswith("ctclip."):
                step["with"].update(config=str(FIX / "small_config.json"), target_xyz=list(SMALL_TARGET_XYZ))
    pipeline = {"name": "gpu-check", "version": 1, "on_missing_weights": "fail", "steps": steps}
    (root / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False), encoding="utf-8")
    (root / "inbox").mkdir()
    settings = {
        "root": ".",
        "inbox": {
            "dirs": ["inbox"],
            "stable_seconds": 1,
            "folder_stable_seconds": 2,
            "scan_interval_seconds": 0.5,
        },
        "outbox": "outbox",
        "state": "state/ctwatch.db",
        "pipeline": "pipeline.yaml",
        "weights": "weights",
        "device": str(check.device),
        "status": {"enabled": False},
        "reports": {"enabled": False},
        "disk": {"min_free_gb": 1},
    }
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return config


class GpuSampler:
    """GPU utilisation (%) and memory in use (GB), every ``period`` s, in a thread."""

    def __init__(self, device: Any, period: float = 0.1) -> None:
        self.device, self.period = device, period
        self.samples: list[tuple[float, float, float | None]] = []  # (time.time(), util %, used GB)
        self.source = "none (no CUDA)"
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._smi: subprocess.Popen[str] | None = None

    def start(self) -> GpuSampler:
        if self.device.type == "cuda":
            import torch

            try:
                torch.cuda.utilization(self.device)
                self.source = "NVML (torch.cuda.utilization)"
            except Exception as exc:  # no pynvml, or NVML refuses (pynvml.NVMLError): try nvidia-smi
                self.error = f"NVML: {type(exc).__name__}: {exc}"
                if shutil.which("nvidia-smi"):
                    self.source = "nvidia-smi"
            if self.source != "none (no CUDA)":
                self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self._sample()
        except Exception as exc:  # recorded in the figures; the daemon run goes on unsampled
            self.error = f"sampling stopped: {type(exc).__name__}: {exc}"

    def _sample(self) -> None:
        import torch

        if self.source == "nvidia-smi":
            index = str(self.device.index or 0)
            query = ["--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            cmd = ["nvidia-smi", "-i", index, *query, f"--loop-ms={int(self.period * 1000)}"]
            self._smi = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert self._smi.stdout is not None
            for line in self._smi.stdout:
                util, used = (float(v) for v in line.split(","))
                self.samples.append((time.time(), util, used / 1024))
            return
        while not self._stop.wait(self.period):
            free, total = torch.cuda.mem_get_info(self.device)
            self.samples.append(
                (time.time(), float(torch.cuda.utilization(self.device)), (total - free) / 1e9)
            )

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait(10)
        if self._thread.is_alive():
            self._thread.join(10)

    def window(self, start: float, end: float) -> dict[str, Any]:
        inside = [s for s in self.samples if start <= s[0] <= end]
        if not inside:
            return {"source": self.source, "samples": 0, "gpu_idle_fraction": None, "error": self.error}
        utils = [s[1] for s in inside]
        used = [s[2] for s in inside if s[2] is not None]
        return {
            "source": self.source,
            "samples": len(inside),
            "gpu_busy_percent_mean": round(statistics.fmean(utils), 1),
            "gpu_idle_fraction": round(1 - statistics.fmean(utils) / 100, 4),
            "samples_at_zero_fraction": round(sum(u == 0 for u in utils) / len(utils), 4),
            "device_memory_used_gb_max": round(max(used), 2) if used else None,
            "error": self.error,
        }


def tree_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, its live descendants and its waited-for children."""
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                text = (entry / "stat").read_text()
            except OSError:
                continue
            stats[int(entry.name)] = text[text.rindex(")") + 2 :].split()
    if pid not in stats:
        return None
    tree, grew = {pid}, True
    while grew:
        more = {p for p, f in stats.items() if int(f[1]) in tree} - tree
        tree |= more
        grew = bool(more)
    total = sum(int(stats[p][11]) + int(stats[p][12]) for p in tree)  # utime, stime
    total += int(stats[pid][13]) + int(stats[pid][14])  # cutime, cstime
    return total / ticks


def _results(outbox: Path) -> list[Path]:
    return sorted(p for p in outbox.glob("*/*.json") if p.parent.name not in ("receipts", "reports"))


def _wait_for(
    predicate: Any, check: Any, what: str, daemon: subprocess.Popen[bytes], log: Path, reserve: float = 15.0
) -> Any:
    """Poll ``predicate`` until it is true; RuntimeError when the daemon exits, TimeoutError when
    less than ``reserve`` seconds of the section are left (kept for stopping the daemon)."""
    while check.left() > reserve:
        value = predicate()
        if value:
            return value
        if daemon.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:]
            raise RuntimeError(
                f"the daemon exited ({daemon.returncode}) before {what}; its log ends:\n{tail}"
            )
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
    raise TimeoutError(f"the section's time ran out waiting for {what}; daemon log ends:\n{tail}")


def daemon_section(check: Any) -> dict[str, Any]:
    from bench.generate import FULL, SMOKE
    from processor.steps import default_registry

    registry = default_registry()
    spec = SMOKE if check.tiny else FULL
    k = check.studies
    result: dict[str, Any] = {
        "studies_dropped": k,
        "study": f"{spec.slices} slices of {spec.size}² (+ scout, thick series)",
    }
    with tempfile.TemporaryDirectory(prefix="ctwatch-gpu-check-") as tmp:
        root = Path(tmp)
        (root / "staging").mkdir()
        config = write_project(check, root)
        workers = max(1, min(k, (os.cpu_count() or 2) // 2))
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            began = time.perf_counter()
            futures = [
                pool.submit(make_study, {**asdict(spec), "seed": i}, str(root / "staging" / f"study-{i}.zip"))
                for i in range(1, k + 1)
            ]
            result["weights_written_s"] = write_weights(check, root / "weights")
            zips = [Path(f.result()) for f in futures]
            result["setup_s"] = round(time.perf_counter() - began, 2)
        check.say(f"  weights and {k} studies ready in {result['setup_s']} s; starting the daemon")
        log = root / "daemon.log"
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        if check.tiny and not check.cuda:
            env["OMP_NUM_THREADS"] = "1"  # tiny tensors, as in this process (gpu_check.main)
        with log.open("a") as sink:
            daemon = subprocess.Popen(
                [sys.executable, str(REPO / "run.py"), "run", "--config", str(config)],
                stdout=sink, stderr=subprocess.STDOUT, cwd=root, env=env,
            )  # fmt: skip
        sampler = GpuSampler(check.device)
        try:
            started = "daemon.started"
            _wait_for(lambda: started in log.read_text(errors="replace"), check, "it started", daemon, log)
            sampler.start()
            dropped = time.time()
            for path in zips:
                os.replace(path, root / "inbox" / path.name)
            outbox = root / "outbox"
            try:
                _wait_for(lambda: len(_results(outbox)) >= k, check, f"{k} result JSONs", daemon, log)
            except TimeoutError as exc:
                result["stopped_early"] = str(exc).splitlines()[0]
            result["daemon_cpu_s"] = tree_cpu_seconds(daemon.pid)
        finally:
            sampler.stop()
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait(10)
            text = log.read_bytes()
            (check.out / "daemon.log").write_bytes(text[-LOG_KEEP:])
        docs = sorted(
            ((p.stat().st_mtime, json.loads(p.read_text())) for p in _results(outbox)), key=lambda d: d[0]
        )
    result.update(_figures(docs, dropped, sampler, registry))
    if result.get("daemon_cpu_s") is not None and docs:
        result["daemon_cpu_s_per_study"] = round(result["daemon_cpu_s"] / len(docs), 2)
    result["daemon_exit_code"] = daemon.returncode
    problems = [
        f"study {d['study_uid'][-12:]}: {d['processing_status']} ({d.get('error')})"
        for _, d in docs
        if d["processing_status"] != "Success"
    ]
    if len(docs) < 2:
        problems.append(f"{len(docs)} of {k} studies finished: too few to measure studies per hour")
    result["problems"] = problems
    return result


def _figures(
    docs: list[tuple[float, dict]], dropped: float, sampler: GpuSampler, registry: Any
) -> dict[str, Any]:
    if not docs:
        return {"studies_done": 0}
    first, last = docs[0][0], docs[-1][0]
    out: dict[str, Any] = {"studies_done": len(docs), "first_study_s": round(first - dropped, 2)}
    steps: dict[str, list[float]] = {}
    for _, doc in docs[1:]:
        for step in doc["steps"]:
            steps.setdefault(step["uses"], []).append(float(step["seconds"]))
    out["step_seconds_median"] = {uses: round(statistics.median(s), 3) for uses, s in steps.items()}
    if len(docs) >= 2 and last > first:
        window = last - first
        gpu = sum(sum(s) for uses, s in steps.items() if getattr(registry.get(uses), "device", "") == "gpu")
        out["steady_window_s"] = round(window, 2)
        out["studies_per_hour"] = round((len(docs) - 1) / window * 3600, 1)
        out["studies_per_hour_incl_loads"] = round(len(docs) / (last - dropped) * 3600, 1)
        out["gpu_step_wall_fraction"] = round(gpu / window, 4)
        out["gpu_utilisation"] = sampler.window(first, last)
    return out
