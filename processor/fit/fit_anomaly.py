"""``fit-anomaly``: train the 2-D diffusion anomaly detector on a folder of normal studies.

Each entry of ``--normals`` (a ZIP, a folder of DICOM or a DICOM file) is read like an arrival
(:func:`processor.intake.archive.open_arrival`, scan, the default series rules, HU volume,
weight-free lung mask, all on the CPU); ``slices_per_study`` axial slices evenly inside the lungs
become training images exactly as the ``anomaly.diffusion`` step prepares them. A study that
cannot be read is skipped and listed. Training: DDPM noise-prediction loss, AdamW, on the GPU when
present. Every ``checkpoint_every`` steps the run is saved to ``<out>/checkpoint/`` (model,
optimiser, step; the prepared slices once), so ``--resume`` continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from processor.errors import ConfigError, CtwatchError
from processor.fit.data import data_hash, now_iso
from processor.models.diffusion import (
    LUNG_WINDOW,
    build_scheduler,
    build_unet,
    prepare_slices,
    save_anomaly_model,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnomalyOptions:
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    slices_per_study: int = 16
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-4
    checkpoint_every: int = 250
    noise_level: float = 0.3
    ddim_steps: int = 50
    seed: int = 0
    device: str = "auto"
    progress: bool = True


@dataclass
class AnomalyFit:
    folder: Path
    studies: int
    slices: int
    steps: int
    final_loss: float
    skipped: list[str] = field(default_factory=list)
    card: dict[str, Any] = field(default_factory=dict)


def study_slices(hu: np.ndarray, mask: np.ndarray, count: int, size: int) -> np.ndarray:
    """(count, 1, S, S) training images of one volume, chosen as the step chooses them."""
    from processor.dicom.render import choose_levels

    levels, _ = choose_levels(count, hu.shape[0], mask)
    return prepare_slices(hu, mask, levels, size, LUNG_WINDOW).images


def read_normals(
    folder: Path, count: int, size: int, progress: bool = True
) -> tuple[np.ndarray, list[str], list[str]]:
    """Slices of every readable study under ``folder``; (images, study uids, skipped reasons)."""
    from processor.dicom.lungs import lung_mask
    from processor.dicom.scan import scan_members
    from processor.dicom.select import SelectionRules, evaluate, series_facts
    from processor.dicom.volume import load_volume
    from processor.intake.archive import Limits, open_arrival

    if not folder.is_dir():
        raise ConfigError(
            f"--normals {folder}: not a folder. Fix: pass a folder of ZIPs or DICOM folders of "
            "studies read as normal."
        )
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    images, uids, skipped = [], [], []
    for entry in tqdm(
        entries, desc="reading normals", unit="input", file=sys.stderr, disable=not progress, leave=False
    ):
        try:
            with open_arrival(entry, Limits()) as contents:
                for study in scan_members(contents.members).studies:
                    verdicts = evaluate([series_facts(s) for s in study.series.values()], SelectionRules())
                    if not verdicts or not verdicts[0].eligible:
                        skipped.append(f"{entry.name} study {study.uid}: no eligible series")
                        continue
                    volume = load_volume(study.series[verdicts[0].facts.uid])
                    mask = lung_mask(volume.hu)
                    if not mask.any():
                        skipped.append(f"{entry.name} study {study.uid}: no lung found")
                        continue
                    images.append(study_slices(volume.hu, mask, count, size))
                    uids.append(study.uid)
        except (CtwatchError, OSError) as exc:
            skipped.append(f"{entry.name}: {exc}")
    if not images:
        raise ConfigError(
            f"--normals {folder}: no usable study found ({len(skipped)} skipped: "
            f"{'; '.join(skipped[:3])}). Fix: put ZIPs or folders of chest-CT DICOM there."
        )
    return np.concatenate(images).astype(np.float32), uids, skipped


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train(
    data: np.ndarray,
    opts: AnomalyOptions,
    checkpoint_dir: Path,
    *,
    resume: bool,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[Any, Any, float]:
    """Train (or resume) the UNet on ``data`` (N, 1, S, S); returns (unet, scheduler, final EMA loss)."""
    from processor.models.device import resolve_device

    device = resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    unet = build_unet(opts.image_size, opts.channels, opts.layers_per_block).to(device)
    scheduler = build_scheduler()
    optimiser = torch.optim.AdamW(unet.parameters(), lr=opts.lr)
    start, ema = 0, float("nan")
    state_path = checkpoint_dir / "state.pt"
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location=device, weights_only=True)
        unet.load_state_dict(saved["unet"])
        optimiser.load_state_dict(saved["optimiser"])
        start, ema = int(saved["step"]), float(saved["ema_loss"])
        log.info("fit_anomaly.resumed step=%d", start)
    images = torch.from_numpy(data).to(device)
    n_train = scheduler.config.num_train_timesteps
    unet.train()
    with tqdm(
        total=opts.steps,
        initial=start,
        desc="fit-anomaly",
        unit="step",
        file=sys.stderr,
        disable=not opts.progress,
    ) as bar:
        for step in range(start, opts.steps):
            gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + step)  # resume-exact batches
            idx = torch.randint(0, images.shape[0], (min(opts.batch_size, images.shape[0]),), generator=gen)
            batch = images[idx.to(device)]
            noise = torch.randn(batch.shape, generator=gen).to(device)
            t = torch.randint(0, n_train, (batch.shape[0],), generator=gen).to(device)
            loss = F.mse_loss(unet(scheduler.add_noise(batch, noise, t), t).sample, noise)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            value = float(loss.detach())
            ema = value if np.isnan(ema) else 0.98 * ema + 0.02 * value
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}")
            if on_step is not None:
                on_step(step + 1, ema)
            if (step + 1) % opts.checkpoint_every == 0 or step + 1 == opts.steps:
                _save_atomic(
                    {
                        "unet": unet.state_dict(),
                        "optimiser": optimiser.state_dict(),
                        "step": step + 1,
                        "ema_loss": ema,
                    },
                    state_path,
                )
    return unet.eval(), scheduler, ema


def fit_anomaly(
    normals: Path | None, out: Path, opts: AnomalyOptions = AnomalyOptions(), *, resume: bool = False
) -> AnomalyFit:
    checkpoint_dir = out / "checkpoint"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    cache = checkpoint_dir / "slices.npz"
    if resume and cache.exists():
        saved = np.load(cache)
        data, uids = saved["images"], [str(u) for u in saved["uids"]]
        skipped: list[str] = []
        if data.shape[-1] != opts.image_size:
            raise ConfigError(
                f"{cache}: slices are {data.shape[-1]} px but --image-size is {opts.image_size}. "
                "Fix: resume with the same options, or start again without --resume."
            )
    else:
        if normals is None:
            raise ConfigError(
                f"fit-anomaly needs --normals DIR (or --resume with a checkpoint in {checkpoint_dir})."
            )
        data, uids, skipped = read_normals(normals, opts.slices_per_study, opts.image_size, opts.progress)
        tmp = checkpoint_dir / ".slices.tmp.npz"
        np.savez(tmp, images=data, uids=np.asarray(uids))
        os.replace(tmp, cache)
        (checkpoint_dir / "state.pt").unlink(missing_ok=True)  # a fresh run never resumes a stale one
    started = time.monotonic()
    unet, scheduler, loss = train(data, opts, checkpoint_dir, resume=resume)
    card = {
        "kind": "anomaly.diffusion",
        "image_size": opts.image_size,
        "window": {"width": LUNG_WINDOW[0], "level": LUNG_WINDOW[1]},
        "defaults": {
            "slices": opts.slices_per_study,
            "noise_level": opts.noise_level,
            "ddim_steps": opts.ddim_steps,
        },
        "training": {
            **{
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(opts).items()
                if k not in ("progress",)
            },
            "studies": len(uids),
            "slices": int(data.shape[0]),
            "final_ema_loss": round(loss, 6),
            "seconds_this_run": round(time.monotonic() - started, 1),
            "skipped": skipped,
        },
        "data_hash": data_hash(sorted(uids), data),
        "date": now_iso(),
    }
    unet.to("cpu")
    save_anomaly_model(out, unet, scheduler, card)
    log.info("fit_anomaly.done folder=%s studies=%d slices=%d loss=%.4f", out, len(uids), data.shape[0], loss)
    return AnomalyFit(out, len(uids), int(data.shape[0]), opts.steps, loss, skipped, card)


def report_text(fit: AnomalyFit) -> str:
    from processor.fit.metrics import format_table

    rows = [
        ["studies", fit.studies],
        ["slices", fit.slices],
        ["training steps", fit.steps],
        ["final loss (EMA)", fit.final_loss],
    ]
    lines = [format_table(["metric", "value"], rows)]
    if fit.skipped:
        lines += ["", f"skipped {len(fit.skipped)}:", *(f"  {s}" for s in fit.skipped)]
    lines.append(f"wrote {fit.folder}/unet, {fit.folder}/scheduler and {fit.folder}/card.json")
    return "\n".join(lines)
