"""What is installed and stored, as ``evaluate`` sees it: the model cards (thresholds, training
sets), the stored studies (features, fused probability, result), and which models' training sets
must be kept out of which score's figures (the leakage guard)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from processor.state import State

FUSED = "fused"  # the score name of the fused probability_of_pathology
SOURCES = ("head", "lipro", "zs")  # per-finding sources, as feature prefixes
CARDS = {"fusion": "fusion/card.json", "head": "head/card.json", "anomaly": "anomaly/card.json"}
TRAINED = {"fusion": "the fusion", "head": "the head", "anomaly": "the anomaly model"}
WEIGHTS = {
    "fusion": "model.txt",
    "head": "head.pt",
    "anomaly": "unet/diffusion_pytorch_model.safetensors",
}


@dataclass
class Card:
    """An installed model card (``data`` None when absent or unreadable)."""

    model: str
    path: Path
    data: dict[str, Any] | None = None
    _sha: str | None = None

    @property
    def weights_sha256(self) -> str | None:
        """sha256 of the installed weights file beside the card (None when absent)."""
        from processor.models.cache import sha256_file

        path = self.path.parent / WEIGHTS[self.model]
        if self.data is None or not path.is_file():
            return None
        if self._sha is None:
            self._sha = sha256_file(path)
        return self._sha

    @property
    def training_keys(self) -> frozenset[str] | None:
        """Keys of the studies it was trained on; None when the card does not list them."""
        if self.data is None or "training_keys" not in self.data:
            return None
        return frozenset(self.data["training_keys"] or ())


def read_cards(weights: Path, warnings: list[str]) -> dict[str, Card]:
    cards = {}
    for model, relative in CARDS.items():
        card = Card(model, weights / relative)
        if card.path.is_file():
            try:
                card.data = json.loads(card.path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                warnings.append(f"{card.path}: unreadable ({exc}); treated as not installed.")
        cards[model] = card
    return cards


def stored_studies(state: State) -> list[dict[str, Any]]:
    """Every stored study: the features of its current result (``State.study_features``) and the
    fused probability and result of that ``studies`` row (``State.latest_study_rows``)
    (``fused``: a number or None, ``result``: the result JSON as a dict, ``study_arrival_id``)."""
    by_uid: dict[str, dict[str, Any]] = {
        row["study_uid"]: {**row, "fused": None, "result": {}, "study_arrival_id": row["arrival_id"]}
        for row in state.study_features()
    }
    for row in state.latest_study_rows():
        entry = by_uid.setdefault(
            row["study_uid"],
            {
                "study_uid": row["study_uid"],
                "accession": row["accession"],
                "arrival_id": row["arrival_id"],
                "patient_key": row["patient_key"],
                "features": {},
                "models": {},
            },
        )
        entry["study_arrival_id"] = row["arrival_id"]
        entry["accession"] = entry.get("accession") or row["accession"]
        entry["patient_key"] = entry.get("patient_key") or row["patient_key"]
        p = row["probability_of_pathology"]
        entry["fused"] = float(p) if p is not None else None
        entry["result"] = json.loads(row["result_json"]) if row["result_json"] else {}
    return list(by_uid.values())


def threshold_from_results(rows: Sequence[dict[str, Any]], label: str, score: str) -> tuple[Any, str] | None:
    """The threshold the studies were decided with (most common), from their ``decision`` section."""
    values: Counter[tuple[float, str]] = Counter()
    for row in rows:
        decision = (row.get("result") or {}).get("decision") or {}
        if score == FUSED:
            t, origin = decision.get("threshold"), "decision.threshold"
        else:
            found = (decision.get("findings") or {}).get(label) or {}
            if found.get("source") != score:
                continue
            t, origin = found.get("threshold"), f"decision.findings, {found.get('threshold_from')}"
        if isinstance(t, int | float):
            values[(float(t), origin)] += 1
    if not values:
        return None
    (t, origin), count = values.most_common(1)[0]
    spread = f"; {len(values)} different values, the most common used" if len(values) > 1 else ""
    return t, f"study results: {origin}, {count} of {sum(values.values())} studies{spread}"


def installed_threshold(
    cards: dict[str, Card], rows: Sequence[dict[str, Any]], label: str, score: str
) -> tuple[float | None, str | None, list[str]]:
    """(threshold, where it came from, the models whose training sets it was fitted on)."""
    fusion, head = cards["fusion"].data, cards["head"].data
    if score == FUSED and fusion is not None and "threshold" in fusion:
        return float(fusion["threshold"]), f"fusion card ({cards['fusion'].path})", ["fusion"]
    if score not in (FUSED, "anomaly.score"):
        # the decision step's selection: the fusion card's threshold for this very feature, else
        # the head card's; one whose card says "no better than chance" calls nothing
        entry = ((fusion or {}).get("finding_thresholds") or {}).get(label) or {}
        if entry.get("feature") == score and entry.get("threshold") is not None:
            if entry.get("better_than_chance", True) is False:
                return None, f"none: the fusion card ({cards['fusion'].path}) says no better than chance", []
            return float(entry["threshold"]), f"fusion card ({cards['fusion'].path})", ["fusion"]
        own = ((head or {}).get("thresholds") or {}).get(label)
        if score.startswith("head.") and own is not None:
            per_finding = ((head or {}).get("cv") or {}).get("per_finding") or {}
            if (per_finding.get(label) or {}).get("better_than_chance", True) is False:
                return None, f"none: the head card ({cards['head'].path}) says no better than chance", []
            return float(own), f"head card ({cards['head'].path})", ["head"]
    recorded = threshold_from_results(rows, label, score)
    if recorded is None:
        return None, None, []
    return recorded[0], recorded[1], []


def score_models(cards: dict[str, Card], score: str) -> list[str]:
    """The fitted models whose training studies must not be scored for ``score``."""
    if score == FUSED:
        names = (cards["fusion"].data or {}).get("feature_names")
        inputs = [
            m for m in ("head", "anomaly") if names is None or any(n.startswith(f"{m}.") for n in names)
        ]
        return ["fusion", *inputs]
    prefix = score.split(".", 1)[0]
    return [prefix] if prefix in ("head", "anomaly") else []


def producer(score: str) -> str | None:
    """The fitted model whose output ``score`` is (None: zero-shot or LiPro, not fitted here)."""
    if score == FUSED:
        return "fusion"
    prefix = score.split(".", 1)[0]
    return prefix if prefix in ("head", "anomaly") else None


def checkpoint_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Warnings for each source whose stored values come from more than one checkpoint."""
    out = []
    for prefix in (*SOURCES, "anomaly"):
        shas = {
            sha
            for row in rows
            for name, sha in (row.get("models") or {}).items()
            if name.startswith(f"{prefix}.") and sha is not None
        }
        if len(shas) > 1:
            out.append(
                f"{prefix}.* values of these studies come from {len(shas)} different checkpoints: the "
                "figures mix models. Process the studies again with the installed model for one set."
            )
    return out
