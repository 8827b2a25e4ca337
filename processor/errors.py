"""The one exception tree of ctwatch.

::

    CtwatchError
     ├── ConfigError      bad settings or pipeline YAML: exit 2 at start, message names file, key and fix
     ├── WeightsError     model files missing or corrupt: step skipped (or study failed, per pipeline)
     ├── IngestError      bad input (hostile ZIP, no DICOM, no usable series): quarantine, never retry
     ├── StepError        a pipeline step failed on this study: study fails, daemon lives
     │    ├── ResourceExhaustedError  out of memory even at batch 1: that step fails, study is Partial
     │    └── WithheldError  the input lacks what the step's output needs (e.g. pixel spacing for mm):
     │                       the step is skipped with the reason, study is Partial
     ├── TransientError   may succeed later (network, locked file): retry with backoff
     │    └── VersionConflict  another arrival of the same study was recorded while this one ran:
     │                         it goes back to the queue, uncharged, and runs again with that one
     ├── Deferred         an input cannot be taken in now for a reason not its own (the database busy,
     │                    the daemon stopping): it stays where it is and is tried again
     └── SendFailed       a send-back (PACS, folder, webhook) did not go through: ``retry`` says whether
                          the queue tries again with back-off or ends the row ``failed``

Chain with ``raise ... from exc``; log a traceback once, where the error is handled.
"""

from __future__ import annotations

from pathlib import Path


class CtwatchError(Exception):
    """Base of every error ctwatch raises on purpose."""


class ConfigError(CtwatchError):
    """Settings or pipeline definition are invalid; the message says where and how to fix it."""


class WeightsError(CtwatchError):
    """Model weights are missing, unreadable or of the wrong kind; ``path``: the file at fault, when
    one is known (shown to users relative to the weights folder, never quoted from the message)."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


class IngestError(CtwatchError):
    """The input itself is unusable; it goes to quarantine with this message."""


class StepError(CtwatchError):
    """A pipeline step failed for one study."""


class ResourceExhaustedError(StepError):
    """Out of (GPU) memory even at the smallest batch: the step's result is missing, the study Partial."""


class WithheldError(StepError):
    """The study lacks a quantity this step's output depends on (e.g. an unknown pixel spacing for a
    model that resamples to mm): the step is recorded as skipped with this reason, the study Partial."""


class TransientError(CtwatchError):
    """A failure that may pass; the caller retries with backoff."""


class Unavailable(TransientError):
    """Something every arrival needs cannot run for now, through no fault of the input (a CPU pool
    process that cannot be started again): the arrivals go back to the queue uncharged and claims
    pause with a back-off. Its text is plain words with nothing from outside (the status page shows it)."""


class VersionConflict(TransientError):
    """The results of a study changed while an arrival of it was processed (another arrival of the
    same study was recorded first): recording it would leave two current versions, or one that
    lacks the other's images. Nothing is recorded; the arrival goes back to the queue uncharged."""


class Deferred(CtwatchError):
    """An input cannot be taken in now for a reason that is not its own (the state database locked or
    full, the daemon stopping): it is left where it is, untouched, and tried again later."""


class SendFailed(CtwatchError):
    """A delivery of the send-back queue failed (:mod:`processor.delivery`). ``reason``: ctwatch's
    own words with the fix (stored and shown: never a token, a URL's query, a file name or a UID);
    ``retry``: True when it may pass (the destination down or busy), False when trying again cannot
    help until someone acts (then ``python run.py resend``)."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry = retry


def os_error_words(exc: OSError) -> str:
    """An OS error in plain words without its path or file name ("permission denied", "no space
    left on device"), for texts that must carry nothing from outside."""
    return (exc.strerror or type(exc).__name__).lower()
