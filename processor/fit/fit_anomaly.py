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

import hashlib
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
from processor.fit.data import data_hash, now_iso, patient_tag, study_key
from processor.models.diffusion import (
    LUNG_WINDOW,
    build_scheduler,
    build_unet,
    prepare_slices,
    save_anomaly_model,
)
from processor.provenance import software_versions

log = logging.getLogger(__name__)

PatientKey = Callable[[str | None, str | None], str | None]
"""``State.patient_key``: (PatientID, IssuerOfPatientID) → the database's pseudonym."""


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
    validation_fraction: float = 0.15  # share of patients held out to measure the loss on


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
    folder: Path, count: int, size: int, progress: bool = True, patient_key: PatientKey | None = None
) -> NormalSet:
    """Slices of every readable study under ``folder`` (:class:`NormalSet`). A patient group is the
    database's pseudonym (``patient_key``) or else sha256 of IssuerOfPatientID and PatientID kept in
    memory only (never written); a study without a PatientID is a group of its own."""
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
    images, uids, patients, skipped = [], [], [], []
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
                    patients.append(_patient_group(study, patient_key))
        except (CtwatchError, OSError) as exc:
            skipped.append(f"{entry.name}: {exc}")
    if not images:
        raise ConfigError(
            f"--normals {folder}: no usable study found ({len(skipped)} skipped: "
            f"{'; '.join(skipped[:3])}). Fix: put ZIPs or folders of chest-CT DICOM there."
        )
    counts = [len(block) for block in images]
    return NormalSet(
        np.concatenate(images).astype(np.float32),
        uids,
        patients,
        skipped,
        np.repeat(np.arange(len(uids)), counts),
    )


@dataclass
class NormalSet:
    """What ``read_normals`` found: ``images`` (N, 1, S, S), one study UID and patient group per
    study, the skipped inputs with reasons, and the study index of every slice."""

    images: np.ndarray
    uids: list[str]
    patients: list[str]
    skipped: list[str]
    study_of_slice: np.ndarray


def _patient_group(study: Any, patient_key: PatientKey | None) -> str:
    """``patient:<pseudonym>`` (the state database's keyed hash when given, else a sha256 kept in
    memory only), or ``study:<uid>`` when the study has no PatientID."""
    pid = (study.patient_id or "").strip()
    if not pid:
        return f"study:{study.uid}"
    issuer = (study.issuer_of_patient_id or "").strip()
    if patient_key is not None:
        return f"patient:{patient_key(pid, issuer)}"
    return "patient:" + hashlib.sha256(f"{issuer}\x00{pid}".encode("utf-8", "surrogatepass")).hexdigest()


def split_by_patient(patients: list[str], fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) study indices; every study of a patient on one side
    (``sklearn.model_selection.GroupShuffleSplit``). No validation when ``fraction`` is 0 or there
    are fewer than 4 patients."""
    from sklearn.model_selection import GroupShuffleSplit

    everything = np.arange(len(patients))
    if fraction <= 0 or len(set(patients)) < 4:
        return everything, everything[:0]
    splitter = GroupShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
    train, validation = next(splitter.split(everything, groups=patients))
    return np.sort(train), np.sort(validation)


@torch.no_grad()
def noise_prediction_loss(unet: Any, scheduler: Any, images: np.ndarray, seed: int, batch: int = 64) -> float:
    """The DDPM training loss (MSE of the predicted noise) on ``images`` at fixed, seeded timesteps
    and noise, so the training and validation figures are measured the same way."""
    device = next(unet.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(images)
    n_train = scheduler.config.num_train_timesteps
    noise = torch.randn(data.shape, generator=gen)
    t = torch.randint(0, n_train, (data.shape[0],), generator=gen)
    total = 0.0
    for start in range(0, data.shape[0], batch):
        x = data[start : start + batch].to(device)
        eps, steps = noise[start : start + batch].to(device), t[start : start + batch].to(device)
        pred = unet(scheduler.add_noise(x, eps, steps), steps).sample
        total += float(F.mse_loss(pred, eps, reduction="sum"))
    return total / float(np.prod(images.shape))


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
    normals: Path | None,
    out: Path,
    opts: AnomalyOptions = AnomalyOptions(),
    *,
    resume: bool = False,
    patient_key: PatientKey | None = None,
    patient_key_fingerprint: str | None = None,
) -> AnomalyFit:
    """Train on ``normals`` (or resume). ``patient_key``: the state database's pseudonym function,
    so the card can name the training patients (``training_groups``) as fit-fusion and evaluate
    see them; without it only the training studies are listed."""
    checkpoint_dir = out / "checkpoint"
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    cache = checkpoint_dir / "slices.npz"
    if resume and cache.exists():
        saved = np.load(cache)
        data, uids = saved["images"], [str(u) for u in saved["uids"]]
        study_of_slice, groups = saved["study_of_slice"], [int(g) for g in saved["groups"]]
        tags = [str(g) for g in saved["tags"]]
        # were the patients named with the state database's pseudonyms when the slices were read?
        named = bool(saved["named"]) if "named" in saved.files else False
        # the pseudonyms' database is the one of the first run, whatever database is present now
        patient_key_fingerprint = str(saved["fingerprint"]) if "fingerprint" in saved.files else None
        # the split the checkpoint was trained with, whatever --seed/--validation-fraction say now
        train_studies, validation_studies = saved["train_studies"], saved["validation_studies"]
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
        found = read_normals(normals, opts.slices_per_study, opts.image_size, opts.progress, patient_key)
        named = patient_key is not None
        data, uids, patients, skipped = found.images, found.uids, found.patients, found.skipped
        study_of_slice = found.study_of_slice
        first: dict[str, int] = {}  # patients by first appearance: no hash of a PatientID on disk
        groups = [first.setdefault(g, len(first)) for g in patients]
        # card tags of the database's pseudonyms (never a plain hash of a PatientID)
        tags = [
            (patient_tag(g.removeprefix("patient:")) or "")
            if patient_key and g.startswith("patient:")
            else ""
            for g in patients
        ]
        train_studies, validation_studies = split_by_patient(
            [str(g) for g in groups], opts.validation_fraction, opts.seed
        )
        tmp = checkpoint_dir / ".slices.tmp.npz"
        np.savez(
            tmp,
            images=data,
            uids=np.asarray(uids),
            study_of_slice=study_of_slice,
            groups=np.asarray(groups),
            tags=np.asarray(tags),
            train_studies=train_studies,
            validation_studies=validation_studies,
            named=np.asarray(patient_key is not None),
            fingerprint=np.asarray(patient_key_fingerprint or ""),
        )
        os.replace(tmp, cache)
        (checkpoint_dir / "state.pt").unlink(missing_ok=True)  # a fresh run never resumes a stale one
    train_rows = np.isin(study_of_slice, train_studies)
    started = time.monotonic()
    unet, scheduler, loss = train(data[train_rows], opts, checkpoint_dir, resume=resume)
    validation: dict[str, Any] = {"patients": 0, "studies": 0}
    if validation_studies.size:
        held_out = data[~train_rows]
        seen = data[train_rows][: held_out.shape[0] * 4]  # a sample of the training slices
        validation = {
            "patients": len({groups[i] for i in validation_studies}),
            "studies": int(validation_studies.size),
            "slices": int(held_out.shape[0]),
            "rule": "noise-prediction MSE at seeded timesteps and noise; patients held out by GroupShuffleSplit",
            "loss": round(noise_prediction_loss(unet, scheduler, held_out, opts.seed), 6),
            "training_loss_same_protocol": round(noise_prediction_loss(unet, scheduler, seen, opts.seed), 6),
        }
    trained_uids = [uids[i] for i in train_studies]
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
            "studies": len(trained_uids),
            "slices": int(train_rows.sum()),
            "final_ema_loss": round(loss, 6),
            "seconds_this_run": round(time.monotonic() - started, 1),
            "skipped": skipped,
        },
        "validation": validation,
        # the studies it trained on: their anomaly scores are in-sample, so fit-fusion will not
        # stack on them (the held-out validation studies are not among them)
        "training_keys": sorted({study_key(u) for u in trained_uids}),
        # None: the patients could not be named as the database names them (no state database,
        # or slices read without it); fit-fusion and evaluate then refuse to trust other scans
        "training_groups": sorted({tags[i] for i in train_studies if tags[i]}) if named else None,
        "patient_key_fingerprint": patient_key_fingerprint if named else None,
        "software": software_versions(),
        "data_hash": data_hash(sorted(uids), data),
        "date": now_iso(),
    }
    unet.to("cpu")
    save_anomaly_model(out, unet, scheduler, card)
    log.info(
        "fit_anomaly.done folder=%s studies=%d slices=%d loss=%.4f validation=%s",
        out,
        len(trained_uids),
        int(train_rows.sum()),
        loss,
        validation.get("loss"),
    )
    return AnomalyFit(out, len(trained_uids), int(train_rows.sum()), opts.steps, loss, skipped, card)


def report_text(fit: AnomalyFit) -> str:
    from processor.fit.metrics import format_table

    rows = [
        ["studies", fit.studies],
        ["slices", fit.slices],
        ["training steps", fit.steps],
        ["final loss (EMA)", fit.final_loss],
    ]
    validation = fit.card.get("validation") or {}
    if validation.get("studies"):
        rows += [
            ["validation patients (held out)", validation["patients"]],
            ["validation loss", validation["loss"]],
            ["training loss, same protocol", validation["training_loss_same_protocol"]],
        ]
    lines = [format_table(["metric", "value"], rows)]
    if fit.skipped:
        lines += ["", f"skipped {len(fit.skipped)}:", *(f"  {s}" for s in fit.skipped)]
    lines.append(f"wrote {fit.folder}/unet, {fit.folder}/scheduler and {fit.folder}/card.json")
    return "\n".join(lines)
