"""Webhook notifications: the JSON each one POSTs, and the queue rows that carry them.

A notification (``notifications:`` in the settings, :class:`processor.config.NotificationSettings`)
is told of three events, each one row of the durable send queue (:mod:`processor.state.deliveries`,
sent by the webhook sender of :mod:`processor.delivery` with its retries):

* ``failure``: an arrival that ended ``quarantined`` or ``failed`` (:func:`arrival_outbound`: the
  recorder's reject path, and intake's refusals), or a study whose ``processing_status`` is
  ``Failure`` (:func:`study_outbound`);
* ``pathology``: a study with ``pathology: 1`` (:func:`study_outbound`);
* ``daily``: a summary of the last whole local day (:func:`daily_outbound`, at ``daily_at``).

The rows of an arrival's end are made before, and inserted in, the transaction that records it
(the recorder's :meth:`~processor.state.State.finish`, intake's refusal), so a crash neither loses
a notification nor makes one twice. (The one exception: an input the crash cap sets aside at
start-up, :meth:`~processor.state.State.recover_in_flight`, is queued just after.)

Payloads carry no patient data unless ``include_phi: true``: every key is from a fixed list, and
every value is a number, a word of ctwatch's own closed vocabularies or a setting — never text
taken from a study, an input's name or a reason (which may name a ZIP member, itself often named
after the patient). Keys (absent ones are not sent; ``null`` is sent where a value is unknown)::

    event                         "failure" | "pathology" | "daily"
    ctwatch                       the notification's ``label`` setting (null when not set): which
                                  ctwatch this is, in the words its admin chose; never the host name
    time                          when the payload was made, ISO 8601 UTC ("2026-11-30T07:00:00+00:00")
    arrival_id                    the arrival (``python run.py status``, the receipts and Excel name it)
    state                         an arrival's final state: failed | quarantined
    processing_status             a study's: Success | Partial | Failure
    pathology                     a study's 0 | 1 | null
    probability_of_pathology      a study's fused probability, 0..1 | null
    most_dangerous_pathology_type a study's finding name (e.g. "Lung nodule"), the "No significant
                                  pathology" words, or null
    reason_kind                   why it failed (failure events), from :class:`ReasonKind` for an
                                  arrival, or the failed step's :class:`processor.vocab.StepProblem`
                                  for a study ("study", "withheld", "model_missing", "internal", …)
    step                          a failed study: the registered name of the step that failed it
                                  (``dicom.select_series``)
    day, from, to                 the daily summary: the local day (YYYY-MM-DD) and its bounds in UTC
    counts                        the daily summary's numbers (see :func:`daily_counts`)

With ``include_phi: true`` (and only then) a study event adds ``study_uid`` and ``accession``, and
every arrival or study event adds ``name`` (the input's file or folder name as ctwatch shows it) and
``reason`` (the full reason or the study's error, in ctwatch's words, which may name a member file).
The patient's name and ID are never sent: ctwatch does not keep them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum
from typing import Any

from processor.config import NotificationSettings
from processor.outputs.explain import Outcome, Rejection, rejection, step_outcomes, study_failure
from processor.state import Arrival, State
from processor.state.deliveries import Outbound
from processor.vocab import ArrivalState, StepProblem, StudyStatus, utcnow

__all__ = [
    "PAYLOAD_KEYS",
    "PHI_KEYS",
    "ReasonKind",
    "arrival_outbound",
    "daily_counts",
    "daily_outbound",
    "day_bounds",
    "enqueue_daily",
    "study_outbound",
    "summary_day",
]

WEBHOOK = "webhook"
FAILURE, PATHOLOGY, DAILY = "failure", "pathology", "daily"
FAILED_ARRIVAL_STATES = (ArrivalState.FAILED, ArrivalState.QUARANTINED)

#: Every key a PHI-free payload may hold (a test checks each payload against it).
PAYLOAD_KEYS = frozenset(
    {
        "event",
        "ctwatch",
        "time",
        "arrival_id",
        "state",
        "processing_status",
        "pathology",
        "probability_of_pathology",
        "most_dangerous_pathology_type",
        "reason_kind",
        "step",
        "day",
        "from",
        "to",
        "counts",
    }
)
#: The keys ``include_phi: true`` adds.
PHI_KEYS = frozenset({"study_uid", "accession", "name", "reason"})


class ReasonKind(StrEnum):
    """Why an arrival gave no result, as a failure payload's ``reason_kind`` says it."""

    NOT_TAKEN_IN = "not_taken_in"  # refused at intake: unreadable, not a file, could not be moved
    REJECTED = "rejected"  # quarantined: not readable as a CT study (not a ZIP, no DICOM, unsafe, too large)
    SET_ASIDE = "set_aside"  # quarantined: the worker died on it alone, ``limits.max_attempts`` times
    FAILED = "failed"  # ctwatch's fault (a bug, a crashed batch), not the input's: requeue it


# ---------------------------------------------------------------------------------------- events
def study_outbound(
    notifications: Sequence[NotificationSettings], arrival: Arrival, documents: Sequence[Mapping[str, Any]]
) -> list[Outbound]:
    """The rows for an arrival's analysed studies: per notification ``on`` ``pathology``, one per
    study document with ``pathology == 1``; ``on`` ``failure``, one per study whose
    ``processing_status`` is ``Failure``. A result kept out (``superseded_by`` set: it does not
    replace the study's current one) tells no pathology. ``documents``: the result documents as recorded (the
    result JSON's fields, :mod:`processor.outputs.result`)."""
    rows = []
    for notification in notifications:
        for document in documents:
            events = []
            current = not document.get("superseded_by")  # a kept-out version changes no result
            if PATHOLOGY in notification.on and document.get("pathology") == 1 and current:
                events.append(PATHOLOGY)
            if FAILURE in notification.on and document.get("processing_status") == StudyStatus.FAILURE:
                events.append(FAILURE)
            for event in events:
                payload = _study_payload(notification, event, arrival, document)
                rows.append(_row(notification, event, arrival.id, document.get("study_uid"), payload))
    return rows


def arrival_outbound(
    notifications: Sequence[NotificationSettings],
    arrival: Arrival,
    state: str,
    reason: str | None,
    *,
    kind: ReasonKind | None = None,
) -> list[Outbound]:
    """The rows for an arrival that ended ``state`` with ``reason`` (one per notification ``on``
    ``failure``; none unless ``state`` is ``failed`` or ``quarantined``). ``kind``: the payload's
    ``reason_kind`` when the caller knows it (intake: :attr:`ReasonKind.NOT_TAKEN_IN`), else
    :func:`reason_kind`."""
    if state not in FAILED_ARRIVAL_STATES:
        return []
    kind = kind or reason_kind(arrival, state, reason)
    rows = []
    for notification in notifications:
        if FAILURE not in notification.on:
            continue
        payload = _base(notification, FAILURE) | {
            "arrival_id": arrival.id,
            "state": str(state),
            "reason_kind": str(kind),
        }
        if notification.include_phi:
            payload |= {"name": arrival.name, "reason": reason}
        rows.append(_row(notification, FAILURE, arrival.id, None, payload))
    return rows


def reason_kind(arrival: Arrival, state: str, reason: str | None) -> ReasonKind:
    """The :class:`ReasonKind` of an arrival the worker ended ``state`` with ``reason``, as the
    workbook's "Status" cell tells them apart (:func:`processor.outputs.explain.rejection`: the
    crash cap's reason is ``set_aside``)."""
    ended = rejection({"state": state, "crashes": arrival.crashes, "error": reason})
    if ended == Rejection.FAILED:
        return ReasonKind.FAILED
    return ReasonKind.SET_ASIDE if ended == Rejection.SET_ASIDE else ReasonKind.REJECTED


def _study_payload(
    notification: NotificationSettings, event: str, arrival: Arrival, document: Mapping[str, Any]
) -> dict[str, Any]:
    payload = _base(notification, event) | {
        "arrival_id": arrival.id,
        "processing_status": _word(document.get("processing_status"), StudyStatus),
        "pathology": _number(document.get("pathology")),
        "probability_of_pathology": _number(document.get("probability_of_pathology")),
        "most_dangerous_pathology_type": _finding(document.get("most_dangerous_pathology_type")),
    }
    if event == FAILURE:
        problem, uses = _failed_step(document)
        payload |= {"reason_kind": problem, "step": uses}
    if notification.include_phi:
        payload |= {
            "study_uid": document.get("study_uid"),
            "accession": document.get("accession"),
            "name": arrival.name,
            "reason": document.get("error"),
        }
    return payload


def _failed_step(document: Mapping[str, Any]) -> tuple[str, str | None]:
    """The failed study's cause: the :class:`StepProblem` of the step that failed it and that step's
    registered name (``unrecorded`` and None when no step record says)."""
    failures = [o for o in step_outcomes(document) if o.outcome == Outcome.FAILED]
    cause = study_failure(failures, _text(document.get("error")))
    if cause is None:
        return str(StepProblem.UNRECORDED), None
    return _word(cause.problem, StepProblem) or str(StepProblem.UNRECORDED), cause.uses


# ---------------------------------------------------------------------------------------- daily
def day_bounds(day: date) -> tuple[str, str]:
    """The local ``day`` as ``[start, end)`` in UTC ISO text (the form every stored time has), by the
    machine's time zone (a day of a clock change is 23 or 25 hours)."""
    start = datetime.combine(day, time()).astimezone()
    end = datetime.combine(day + timedelta(days=1), time()).astimezone()
    return _iso(start), _iso(end)


def daily_counts(state: State, day: date, now: datetime) -> dict[str, Any]:
    """The daily summary's ``counts`` for the local ``day``:

    ``arrivals``: arrivals that ended that day by final state (``done``, ``failed``,
    ``quarantined``, ``duplicate``, ``ignored``, each present, 0 when none); ``studies``: results
    recorded that day by ``processing_status`` (``Success``, ``Partial``, ``Failure``); ``pathology``:
    of those, how many with ``pathology: 1``; ``failures``: studies that failed plus arrivals that
    ended failed or quarantined (what the ``failure`` events of that day said); ``deliveries``: per
    destination and notification name (from the send queue), ``pending`` (now), ``sent`` and
    ``failed`` (given up) that day, daily summaries left out; ``waiting``: arrivals
    in the queue ``now``, and ``oldest_waiting_seconds``: how long the oldest of them has waited
    (null when none)."""
    start, end = day_bounds(day)
    found = state.day_counts(start, end)
    arrivals = {str(s): int(found["arrivals"].get(s, 0)) for s in _ENDED}
    studies = {str(s): int(found["studies"].get(s, 0)) for s in StudyStatus}
    oldest = found.get("oldest_waiting")
    waited = None
    if oldest:
        waited = max(0, int((now - datetime.fromisoformat(oldest)).total_seconds()))
    return {
        "arrivals": arrivals,
        "studies": studies,
        "pathology": int(found.get("pathology") or 0),
        "failures": studies[StudyStatus.FAILURE]
        + arrivals[ArrivalState.FAILED]
        + arrivals[ArrivalState.QUARANTINED],
        "deliveries": {
            str(name): {k: int(v.get(k, 0)) for k in ("pending", "sent", "failed")}
            for name, v in sorted(found.get("deliveries", {}).items())
        },
        "waiting": int(found.get("waiting") or 0),
        "oldest_waiting_seconds": waited,
    }


def daily_outbound(
    notifications: Sequence[NotificationSettings],
    state: State,
    day: date,
    *,
    now: datetime | None = None,
) -> list[Outbound]:
    """The summary of the local ``day``: one row per notification ``on`` ``daily``
    (:func:`daily_counts`; ``now``, aware, default the current time: the waiting arrivals' age).
    Queued once per day by :func:`enqueue_daily`."""
    wanted = [n for n in notifications if DAILY in n.on]
    if not wanted:
        return []
    start, end = day_bounds(day)
    counts = daily_counts(state, day, now or datetime.now(UTC))
    rows = []
    for notification in wanted:
        payload = _base(notification, DAILY) | {
            "day": day.isoformat(),
            "from": start,
            "to": end,
            "counts": counts,
        }
        rows.append(_row(notification, DAILY, None, None, payload))
    return rows


def summary_day(now: datetime) -> date:
    """The day a summary made at ``now`` (local) reports: the last whole local day, yesterday."""
    return now.astimezone().date() - timedelta(days=1)


def enqueue_daily(
    state: State, notifications: Sequence[NotificationSettings], now: datetime
) -> list[Outbound]:
    """Queue the summary of :func:`summary_day` for each notification ``on`` ``daily`` that has none
    for that day yet (pending, sent or failed: a restart or a second firing the same day queues
    nothing); returns the rows queued. Called by one thread only (the daemon's housekeeping)."""
    day = summary_day(now)
    rows = [
        row
        for row in daily_outbound(notifications, state, day, now=now)
        if not state.daily_queued(row.destination, day.isoformat())
    ]
    state.enqueue(rows)
    return rows


_ENDED = (
    ArrivalState.DONE,
    ArrivalState.FAILED,
    ArrivalState.QUARANTINED,
    ArrivalState.DUPLICATE,
    ArrivalState.IGNORED,
)


# ---------------------------------------------------------------------------------------- parts
def _base(notification: NotificationSettings, event: str) -> dict[str, Any]:
    return {"event": event, "ctwatch": notification.label, "time": utcnow()}


def _row(
    notification: NotificationSettings,
    event: str,
    arrival_id: int | None,
    study_uid: Any,
    payload: dict[str, Any],
) -> Outbound:
    allowed = PAYLOAD_KEYS | (PHI_KEYS if notification.include_phi else frozenset())
    assert set(payload) <= allowed, sorted(set(payload) - allowed)
    return Outbound(
        destination=notification.name,
        event=event,
        arrival_id=arrival_id,
        study_uid=str(study_uid) if study_uid and event != DAILY else None,
        items=({"kind": WEBHOOK, "payload": payload},),
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds")


def _number(value: Any) -> float | int | None:
    """A finite number, else None (a boolean, text, NaN or infinity is not passed on: JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return value


def _word(value: Any, words: type[StrEnum]) -> str | None:
    """``value`` when it is one of ``words``' values, else None."""
    return str(value) if value is not None and str(value) in {str(w) for w in words} else None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _finding(value: Any) -> str | None:
    """A finding name (from a model's vocabulary or the pipeline's severity order, never from the
    study) or the decision's "No significant pathology"; anything but text is None."""
    return value if isinstance(value, str) else None
