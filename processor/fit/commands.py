"""The ``fit-head``, ``fit-fusion``, ``fit-anomaly`` and ``evaluate`` commands: arguments and entry points.

Kept light (no torch/lightgbm import) because the CLI builds its parser on every start. Each
command reads SQLite (or a folder of normal studies), writes under ``settings.weights`` (or
``--out``), prints a metrics table on stdout and shows progress bars on stderr.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from processor.fit.evaluate import add_evaluate_parser, cmd_evaluate

if TYPE_CHECKING:
    from processor.config import Settings
    from processor.state import State

EXIT_OK, EXIT_FAILED = 0, 1


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r}: write comma-separated whole numbers, e.g. 32,64,64"
        ) from exc


def add_fit_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "fit-head",
        parents=[common],
        help="train the supervised head on stored CT-CLIP latents from a labels CSV",
    )
    p.add_argument("--labels", type=Path, required=True, help="CSV: study_uid or accession + 0/1 per finding")
    p.add_argument("--findings", nargs="+", default=None, help="label columns to train (default: all)")
    p.add_argument("--hidden", type=int, default=0, help="hidden units (0 = linear head)")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <weights>/head)")
    p.add_argument(
        "--allow-ungrouped",
        action="store_true",
        help="fit on studies processed before patients were recorded, each as a patient of its own",
    )

    p = sub.add_parser(
        "fit-fusion",
        parents=[common],
        help="train the LightGBM fusion on stored model features from a labels CSV",
    )
    p.add_argument(
        "--labels",
        type=Path,
        required=True,
        help="CSV: study_uid or accession, pathology 0/1, optional 0/1 columns per finding",
    )
    p.add_argument(
        "--features",
        nargs="+",
        default=None,
        help="feature names or patterns to use, e.g. 'zs.*' anomaly.score (default: all stored)",
    )
    p.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="choose the threshold reaching this sensitivity (default: Youden's J)",
    )
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=200, help="boosting rounds")
    p.add_argument("--learning-rate", type=float, default=0.05)
    p.add_argument("--num-leaves", type=int, default=7)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="install the model even when no better than chance")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <weights>/fusion)")
    p.add_argument(
        "--head", type=Path, default=None, help="the installed head's folder (default: <weights>/head)"
    )
    p.add_argument(
        "--anomaly",
        type=Path,
        default=None,
        help="the installed anomaly model's folder (default: <weights>/anomaly)",
    )
    p.add_argument(
        "--allow-ungrouped",
        action="store_true",
        help="fit on studies processed before patients were recorded, each as a patient of its own",
    )

    p = sub.add_parser(
        "fit-anomaly",
        parents=[common],
        help="train the diffusion anomaly detector on a folder of normal studies",
    )
    p.add_argument("--normals", type=Path, default=None, help="folder of ZIPs / DICOM folders read as normal")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in <out>/checkpoint")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument(
        "--channels", type=_ints, default=(32, 64, 64), help="UNet widths per level, e.g. 32,64,64"
    )
    p.add_argument("--slices-per-study", type=int, default=16)
    p.add_argument("--steps", type=int, default=3000, help="training steps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument(
        "--noise-level", type=float, default=0.3, help="default for the step: fraction of DDIM steps"
    )
    p.add_argument("--ddim-steps", type=int, default=50, help="default for the step: DDIM steps")
    p.add_argument(
        "--validation-fraction",
        type=float,
        default=0.15,
        help="share of patients held out to measure the loss on (0 = none; grouped by PatientID)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's device)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <weights>/anomaly)")

    add_evaluate_parser(sub, common)


@contextmanager
def _stored_state(settings: Settings) -> Iterator[State]:
    """The database the fit commands read; a clear error when no study was processed yet."""
    from processor.errors import ConfigError
    from processor.state import State

    if not settings.state.exists():
        raise ConfigError(
            f"no state database at {settings.state}: process the labelled studies first "
            "(`python run.py process ...` or the daemon), then fit."
        )
    state = State(settings.state)
    try:
        yield state
    finally:
        state.close()


def cmd_fit_head(settings: Settings, args: argparse.Namespace) -> int:
    from processor.fit.fit_head import HeadOptions, fit_head, report_text

    opts = HeadOptions(
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        folds=args.folds,
        seed=args.seed,
        findings=tuple(args.findings) if args.findings else None,
        allow_ungrouped=args.allow_ungrouped,
    )
    with _stored_state(settings) as state:
        fit = fit_head(state, args.labels, args.out or settings.weights / "head", opts)
    print(report_text(fit))
    return EXIT_OK


def cmd_fit_fusion(settings: Settings, args: argparse.Namespace) -> int:
    from processor.fit.fit_fusion import FusionOptions, fit_fusion, report_text

    opts = FusionOptions(
        folds=args.folds,
        seed=args.seed,
        rounds=args.rounds,
        learning_rate=args.learning_rate,
        num_leaves=args.num_leaves,
        target_sensitivity=args.target_sensitivity,
        features=tuple(args.features) if args.features else None,
        force=args.force,
        head=args.head or settings.weights / "head",
        anomaly=args.anomaly or settings.weights / "anomaly",
        allow_ungrouped=args.allow_ungrouped,
    )
    with _stored_state(settings) as state:
        fit = fit_fusion(state, args.labels, args.out or settings.weights / "fusion", opts)
    print(report_text(fit))
    return EXIT_OK if fit.installed else EXIT_FAILED


def cmd_fit_anomaly(settings: Settings, args: argparse.Namespace) -> int:
    from processor.fit.fit_anomaly import AnomalyOptions, fit_anomaly, report_text

    opts = AnomalyOptions(
        image_size=args.image_size,
        channels=args.channels,
        slices_per_study=args.slices_per_study,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        checkpoint_every=args.checkpoint_every,
        noise_level=args.noise_level,
        ddim_steps=args.ddim_steps,
        validation_fraction=args.validation_fraction,
        seed=args.seed,
        device=args.device or settings.device,
    )
    out = args.out or settings.weights / "anomaly"
    if settings.state.exists():  # name the training patients as fit-fusion and evaluate see them
        with _stored_state(settings) as state:
            fit = fit_anomaly(
                args.normals,
                out,
                opts,
                resume=args.resume,
                patient_key=state.patient_key,
                patient_key_fingerprint=state.patient_key_fingerprint(),
            )
    else:
        fit = fit_anomaly(args.normals, out, opts, resume=args.resume)
    print(report_text(fit))
    return EXIT_OK


FIT_COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], int]] = {
    "fit-head": cmd_fit_head,
    "fit-fusion": cmd_fit_fusion,
    "fit-anomaly": cmd_fit_anomaly,
    "evaluate": cmd_evaluate,
}
