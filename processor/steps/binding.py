"""Provenance that binds: a fitted model runs only on outputs of the checkpoints it was trained on.

The fit commands write what a model was trained on into its card:

* head card (``fit-head``): ``"trained_on": {"latent": "ctclip", "model_sha256": "<sha256>"}`` — the
  CT-CLIP checkpoint whose latents trained it;
* fusion card (``fit-fusion``): ``"trained_on": {"feature_models": {"<feature>": "<sha256>" | null}}``
  — the checkpoint behind each feature (null: weight-free, e.g. ``lungs.*``, or unknown).

``ctclip.head`` and ``fusion.lightgbm`` compare these with the checkpoints this pipeline's earlier
steps use, twice: at compile time (``Step.bind``: ``check-config`` and the daemon's start refuse a
mismatch, with the fix) and for every study at run time (a StepError: the companion values
``latent_models`` / ``feature_models`` of :mod:`processor.steps.ports` say which checkpoint each
value came from). A card without ``trained_on`` (fitted before provenance was recorded) still runs,
with a warning in the study's result that its provenance is unknown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from processor.pipeline.step import Step, bound_output


def sha12(sha256: str | None) -> str:
    """A model identity for a message: the sha256's first 12 digits, plus its precision suffix
    (``+bf16``/``+fp16``, see :func:`processor.steps.ports.model_identity`)."""
    if not sha256:
        return "unknown"
    digest, _, precision = sha256.partition("+")
    return digest[:12] + (f" at {precision}" if precision else "")


def read_card(path: Path) -> dict[str, Any] | None:
    """A card.json as a dict, or None when it is absent or unreadable (reported where it is loaded)."""
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return card if isinstance(card, dict) else None


def trained_on(card: Mapping[str, Any]) -> dict[str, Any] | None:
    value = card.get("trained_on")
    return value if isinstance(value, dict) else None


# ---------------------------------------------------------------------------------------- head
LATENT_PORTS = {"ctclip": "ctclip_latent"}  # trained_on.latent → the port that carries it


def head_trained_sha(card: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """(latent name, sha256 of the checkpoint it was trained on) from a head card; None without
    ``trained_on`` (an older fit)."""
    found = trained_on(card)
    if found is None:
        return None
    sha = found.get("model_sha256")
    return str(found.get("latent") or "ctclip"), (str(sha) if sha else None)


def head_message(folder: Path, trained: str, current: str, where: str = "") -> str:
    return (
        f"the head in {folder} was trained on latents of CT-CLIP checkpoint {sha12(trained)} but this "
        f"pipeline's is {sha12(current)}{where}. Fix: refit the head (fit-head) on latents of this "
        "checkpoint, or point the ctclip step at the checkpoint it was trained with."
    )


def head_unknown(folder: Path) -> str:
    return (
        f"provenance unknown: the card.json of the head in {folder} does not name the CT-CLIP "
        "checkpoint whose latents trained it (fitted by an older ctwatch, or on latents stored before "
        "ctwatch recorded their checkpoint), so it cannot be checked against this pipeline's. Fix: "
        "process the labelled studies again and refit the head (fit-head)."
    )


def head_bind(folder: Path, card: Mapping[str, Any] | None, earlier: Sequence[Step]) -> list[str]:
    """Compile time: the head's card against the first earlier step that gives its latent."""
    found = head_trained_sha(card) if card is not None else None
    if found is None:
        return []
    latent, trained = found
    if trained is None or latent not in LATENT_PORTS:
        return []
    source = bound_output(earlier, LATENT_PORTS[latent])
    if source is None or source[1] == trained:
        return []
    return [head_message(folder, trained, source[1], f" (step {source[0].step_id!r})")]


# ---------------------------------------------------------------------------------------- fusion
@dataclass(frozen=True)
class Mismatch:
    """Features of one prefix whose checkpoint differs from the one the fusion was trained on."""

    prefix: str
    trained: str
    current: str
    names: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.prefix}.* trained on {sha12(self.trained)}, this pipeline's is {sha12(self.current)}"


def fusion_trained(card: Mapping[str, Any]) -> dict[str, str | None] | None:
    """``trained_on.feature_models`` of a fusion card; None without ``trained_on`` (an older fit)."""
    found = trained_on(card)
    if found is None:
        return None
    models = found.get("feature_models") or {}
    return {str(k): (str(v) if v else None) for k, v in models.items()}


def mismatches(
    trained: Mapping[str, str | None], current: Mapping[str, str | None], names: Sequence[str]
) -> list[Mismatch]:
    """The features in ``names`` whose ``current`` checkpoint is known and differs from the
    non-null ``trained`` one, grouped by prefix and checkpoint pair."""
    grouped: dict[tuple[str, str, str], list[str]] = {}
    for name in names:
        was, now = trained.get(name), current.get(name)
        if was is not None and now is not None and was != now:
            grouped.setdefault((name.split(".", 1)[0], was, now), []).append(name)
    return [Mismatch(p, was, now, tuple(n)) for (p, was, now), n in grouped.items()]


def fusion_message(model: Path, found: Sequence[Mismatch]) -> str:
    return (
        f"the fusion model {model} was trained on features of other checkpoints than this "
        f"pipeline's: {'; '.join(map(str, found))}. Fix: refit the fusion (fit-fusion) on features "
        "of these checkpoints, or point those steps at the checkpoints it was trained with."
    )


def fusion_unknown(model: Path) -> str:
    return (
        f"provenance unknown: the card.json of the fusion model {model} does not name the "
        "checkpoints that made (some of) its features (fitted by an older ctwatch, or on features "
        "stored before ctwatch recorded them), so they cannot be checked against this pipeline's. "
        "Fix: process the labelled studies again and refit the fusion (fit-fusion)."
    )


def fusion_bind(model: Path, card: Mapping[str, Any], earlier: Sequence[Step]) -> list[str]:
    """Compile time: each trained feature's checkpoint against the earlier step giving its prefix."""
    trained = fusion_trained(card)
    if not trained:
        return []
    sources: dict[str, tuple[Step, str] | None] = {}
    current: dict[str, str | None] = {}
    for name, sha in trained.items():
        if sha is None:
            continue
        prefix = name.split(".", 1)[0]
        if prefix not in sources:
            sources[prefix] = bound_output(earlier, prefix)
        source = sources[prefix]
        current[name] = source[1] if source is not None else None
    found = mismatches(trained, current, sorted(current))
    return [fusion_message(model, found)] if found else []
