"""Plain words for the workbooks: what ran for a study, and its notes.

Everything here reads one study's stored result document (``studies.result_json``: the ``steps``
records, ``warnings``, ``lungs``) and never the log. "What ran" comes from each step's status and
reason — ``done``, ``skipped`` with the ``missing`` weight files (not installed), ``skipped`` for
another reason (withheld, or an input an earlier skipped step did not provide), ``failed``,
``not_run`` after a failure. The study's ``error`` only says which failed step failed the study
(the runner appends "(in step <id>)" to it); the other failed steps were optional (or out of
memory), and the study went on without them.

A reason longer than a cell should hold is shortened (:func:`short_reason`): its start and the
"Hint:"/"Fix:" part that ctwatch's messages end with; the JSON keeps the whole text.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from processor.state import crash_reason
from processor.state.arrival import placement_of
from processor.vocab import ArrivalState, Placement, StepProblem, StepStatus, StudyStatus

WEIGHTS_HINT = "see `python run.py weights`"
BULLET = "• "

# A step's name for a radiographer, by its registered ``uses`` name (unknown ones show their id).
STEP_WORDS: dict[str, str] = {
    "dicom.select_series": "series selection",
    "ct.volume": "image volume",
    "quantify.lungs": "lung measurements",
    "render.key_slices": "key images",
    "caption.image_to_text": "captioning",
    "ctclip.zero_shot": "CT-CLIP zero-shot",
    "ctclip.classify": "CT-LiPro classifier",
    "ctclip.head": "supervised head",
    "anomaly.diffusion": "anomaly detector",
    "fusion.lightgbm": "fusion",
    "decision.pathology": "decision",
    "util.delay": "delay",
}
DECISION = "decision.pathology"  # writes probability_of_pathology and pathology (from fusion's output)
FUSION = "fusion.lightgbm"  # the only source of the probability the decision step passes on
REASON_KEEP = 300  # a reason up to this many characters shows whole in a cell
REASON_HEAD = 200  # of a longer one: this many characters from its start, then " … " and its hint
HINT_KEEP = 300  # the hint of a long reason, at most
_HINT = re.compile(r"\b(?:Hint|Fix):")
_IN_STEP = re.compile(r"\(in step ([^;)]+)")  # the runner's suffix of a study's error


class Outcome(StrEnum):
    """How one step ended, in the words of the "What ran" column (and the Summary's counts)."""

    DONE = "ran"
    NOT_INSTALLED = "model not installed"
    NOT_RUN = "did not run"
    FAILED = "failed"


@dataclass(frozen=True)
class StepOutcome:
    """One step of one study: its id, ``uses`` name, words, how it ended, why (in its words, whole)
    and the category of a failure (:class:`processor.vocab.StepProblem`, when recorded)."""

    step_id: str
    uses: str
    words: str
    outcome: Outcome
    reason: str | None
    problem: str | None = None


def step_words(step: Mapping[str, Any]) -> str:
    return STEP_WORDS.get(str(step.get("uses")), str(step.get("step_id") or step.get("uses") or "step"))


def step_outcomes(result: Mapping[str, Any]) -> list[StepOutcome]:
    """Each recorded step of a result document, in pipeline order; ``not_run`` steps (after a
    failure) are left out: the failure says why nothing after it ran. Steps of one pipeline whose
    words are the same (two ``ctclip.zero_shot`` steps) are told apart by their id, as the status
    page does: "CT-CLIP zero-shot (clip_b)"."""
    steps = result.get("steps")
    records = [s for s in (steps if isinstance(steps, list) else []) if isinstance(s, Mapping)]
    shared = Counter(step_words(s) for s in records)
    out = []
    for step in records:
        status, words = str(step.get("status")), step_words(step)
        step_id = str(step.get("step_id") or "")
        if shared[words] > 1 and step_id and step_id != words:
            words = f"{words} ({step_id})"
        # a skipped step's reason: ``reason`` where recorded, else the older ``error`` field
        reason = step.get("reason") or step.get("error")
        reason = str(reason) if reason else None
        problem = str(step["problem"]) if step.get("problem") else None
        uses = str(step.get("uses"))
        if status == StepStatus.DONE:
            out.append(StepOutcome(step_id, uses, words, Outcome.DONE, None))
        elif status == StepStatus.SKIPPED and step.get("missing"):
            out.append(StepOutcome(step_id, uses, words, Outcome.NOT_INSTALLED, reason, problem))
        elif status == StepStatus.SKIPPED:
            out.append(StepOutcome(step_id, uses, words, Outcome.NOT_RUN, reason, problem))
        elif status == StepStatus.FAILED:
            hint = f" — {WEIGHTS_HINT}" if step.get("missing") else ""
            reason = (reason or "no reason recorded") + hint
            out.append(StepOutcome(step_id, uses, words, Outcome.FAILED, reason, problem))
    return out


def what_ran(
    result: Mapping[str, Any], *, status: str | None, error: str | None, probability: float | None
) -> str | None:
    """The "What ran" cell: one line per kind of outcome, the study's failure first.

    ``status``: the study's ``processing_status``; ``error``: its failure, whose "(in step <id>)"
    names the failed step that failed the study (used as the reason when no failed step carries
    one, e.g. an interrupted study); ``probability``: ``probability_of_pathology``. Failed steps the
    study went on without follow as "Failed (optional)". None when the document records no steps
    and no failure.
    """
    outcomes = step_outcomes(result)
    recorded = result.get("steps")
    steps: list[Any] = recorded if isinstance(recorded, list) else []
    lines: list[str] = []
    failures = [o for o in outcomes if o.outcome == Outcome.FAILED]
    if status == StudyStatus.FAILURE:
        cause = study_failure(failures, error)
        if cause is not None:
            failures.remove(cause)
            lines.append(f"Not analysed: {cause.words} failed — {short_reason(cause.reason)}")
        else:
            lines.append(f"Not analysed: {short_reason(error) or 'no reason was recorded'}")
    done = [o.words for o in outcomes if o.outcome == Outcome.DONE and o.uses != DECISION]
    installed = [o.words for o in outcomes if o.outcome == Outcome.NOT_INSTALLED]
    others = [o for o in outcomes if o.outcome == Outcome.NOT_RUN]
    if done:
        everything = status != StudyStatus.FAILURE and all(
            isinstance(s, Mapping) and s.get("status") == StepStatus.DONE for s in steps
        )
        lines.append(f"{'All steps ran' if everything else 'Ran'}: {', '.join(done)}")
    if installed:
        lines.append(f"AI models not installed: {', '.join(installed)} — {WEIGHTS_HINT}")
    for reason, words in _grouped(others).items():
        lines.append(f"Did not run: {', '.join(words)} — {reason}")
    lines += [f"{_went_on_without(o)}: {o.words} — {short_reason(o.reason)}" for o in failures]
    if status != StudyStatus.FAILURE and probability is None and steps:
        lines.append("No probability of pathology: " + _no_probability(steps))
    return "\n".join(lines) or None


def study_failure(failures: list[StepOutcome], error: str | None) -> StepOutcome | None:
    """The failed step that failed the study: the one its error names, else the last failed one
    (the runner runs nothing after it); None when no step failed (e.g. interrupted)."""
    named = _IN_STEP.findall(error or "")
    for outcome in failures:
        if named and outcome.step_id == named[-1].strip():
            return outcome
    return failures[-1] if failures and not named else None


def _went_on_without(outcome: StepOutcome) -> str:
    """How a failed step that did not fail the study is introduced: optional, or out of memory
    (the runner lets a study go on without a step that ran out of GPU memory even alone)."""
    if outcome.problem == StepProblem.OUT_OF_MEMORY or (outcome.reason or "").startswith("out of memory"):
        return "Failed (out of memory; the study went on without it)"
    return "Failed (optional)"


def _grouped(outcomes: Sequence[StepOutcome]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for o in outcomes:
        grouped.setdefault(short_reason(o.reason) or "no reason recorded", []).append(o.words)
    return grouped


def _no_probability(steps: Sequence[Any]) -> str:
    """Why a study that was analysed has no probability of pathology, from its step records: the
    decision step writes it, from the fusion step's output."""
    records = [s for s in steps if isinstance(s, Mapping)]
    fusion = [s for s in records if s.get("uses") == FUSION]
    decision = [s for s in records if s.get("uses") == DECISION]
    fused = bool(fusion) and all(s.get("status") == StepStatus.DONE for s in fusion)
    if not decision:
        if fused:
            return "the pipeline has no decision step (fusion's own output is in the JSON's fusion section)"
        return "the pipeline has no decision step"
    if any(s.get("status") == StepStatus.FAILED for s in decision):
        return "the decision step failed"
    if not all(s.get("status") == StepStatus.DONE for s in decision):
        return "the decision step did not run"
    if not fusion:
        return "the pipeline has no fusion step"
    if not fused:
        return "needs fusion"
    return "the decision gave none (its reason is in the JSON's decision section)"


def short_reason(text: str | None) -> str | None:
    """``text`` on one line; longer than :data:`REASON_KEEP` characters: its first
    :data:`REASON_HEAD` (cut at a word), " … ", and its last "Hint:" or "Fix:" part — the fix that
    ctwatch's messages end with (a library's multi-paragraph error sits before it)."""
    if text is None:
        return None
    flat = " ".join(str(text).split())
    if len(flat) <= REASON_KEEP:
        return flat
    hints = list(_HINT.finditer(flat))
    start = hints[-1].start() if hints else len(flat)
    body, hint = flat[:start].rstrip(), flat[start:]
    if len(body) > REASON_HEAD:
        body = _cut(body, REASON_HEAD)
    if len(hint) > HINT_KEEP:
        hint = _cut(hint, HINT_KEEP)
    return f"{body} {hint}".strip()


def _cut(text: str, n: int) -> str:
    cut = text[:n]
    if " " in cut[n // 2 :]:
        cut = cut.rsplit(" ", 1)[0]
    return cut.rstrip(" ,;:(") + " …"


class Rejection(StrEnum):
    """How an arrival that produced no study ended, as its "Status" cell says it."""

    REJECTED = "Rejected"  # quarantined: ctwatch cannot read it as a CT study (IngestError)
    SET_ASIDE = "Set aside"  # quarantined: the worker died on it alone, ``crashes`` times
    FAILED = "Failed"  # failed: ctwatch's fault (a bug, a crashed batch), not the file's


def rejection(row: Mapping[str, Any]) -> Rejection:
    """Which :class:`Rejection` a ``State.report_rejections`` row is: its ``state``, and for a
    quarantined one whether its ``error`` is the crash cap's (``crash_reason(crashes)``)."""
    if row.get("state") != ArrivalState.QUARANTINED:
        return Rejection.FAILED
    crashes = int(row.get("crashes") or 0)
    return (
        Rejection.SET_ASIDE if crashes and row.get("error") == crash_reason(crashes) else Rejection.REJECTED
    )


def rejection_what_ran(row: Mapping[str, Any]) -> str:
    """The "What ran" cell of an arrival that produced no study (a ``State.report_rejections`` row):
    why, where the file is now (an inbox's quarantine folder, or left where it is when it was named
    on the command line) and, when it is not the file's fault, how to run it again."""
    reason = (short_reason(row.get("error")) or "no reason was recorded").rstrip(". ")
    where = _where(row)
    again = f"`python run.py requeue {row.get('arrival_id')}`"
    ended = rejection(row)
    if ended == Rejection.SET_ASIDE:
        times = _times(int(row.get("crashes") or 0))
        return (
            f"Not analysed: set aside — ctwatch's worker died {times} while it processed only this "
            f"file (out of memory, or a decoder fault), so the others go on. {where} Check the log; "
            f"once the cause is fixed: {again}."
        )
    if ended == Rejection.REJECTED:
        return f"Not analysed: the file was rejected — {reason}. {where}"
    return (
        f"Not analysed: ctwatch could not process the file (not the file's fault) — {reason}. {where} "
        f"To try again: {again}."
    )


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _where(row: Mapping[str, Any]) -> str:
    if placement_of(row.get("kind")) == Placement.IN_PLACE:
        return "The file was left where it is (it was named on the command line)."
    moved = "is being moved" if row.get("placed") == 0 else "was moved"
    return f"It {moved} to the inbox's .ctwatch/quarantine folder, the reason beside it in a .error.txt file."


def notes(result: Mapping[str, Any]) -> list[str]:
    """The study's warnings in the order they arose, with the lung step's flag codes replaced by its
    notes in plain words (``lungs.notes``): "Lung numbers — use with care: …"."""
    lungs = result.get("lungs")
    lung_words = _lung_note(lungs) if isinstance(lungs, Mapping) else None
    out = []
    warnings = result.get("warnings")
    for warning in warnings if isinstance(warnings, list) else []:
        text = str(warning).strip()
        if lung_words and text.startswith("lungs:"):  # the lungs step's warning names flag codes
            out.append(lung_words)
            lung_words = None
        elif text:
            out.append(text)
    if lung_words:
        out.append(lung_words)
    return out


def _lung_note(lungs: Mapping[str, Any]) -> str | None:
    if lungs.get("plausible") is not False:
        return None
    notes = [str(n) for n in lungs.get("notes") or [] if str(n).strip()]
    flags = [str(f).replace("_", " ") for f in lungs.get("flags") or []]
    return "Lung numbers — use with care: " + ("; ".join(notes or flags) or "not plausible")


def bullets(texts: Sequence[str]) -> str | None:
    """Texts as one cell, a bullet per text on its own line; None for none."""
    return "\n".join(BULLET + t for t in texts) or None
