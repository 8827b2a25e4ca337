"""Settings: YAML file → validated, path-resolved pydantic model.

Every error names the file, the dotted key, the bad value and a fix. Relative paths resolve
against ``root``, which is itself relative to the folder of the config file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from processor.errors import ConfigError
from processor.redact import redact_url
from processor.vocab import LateSeries

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def _parse_quantity(value: Any, units: Mapping[str, float], what: str, examples: str) -> float:
    """A number, or a number with one of ``units`` (``"8GiB"``, ``"5m"``), in the base unit."""
    if isinstance(value, bool):
        raise ValueError(f"a {what} must be a number or a string like {examples}")
    if isinstance(value, int | float):
        return float(value)
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"cannot read {value!r} as a {what}; write e.g. {examples}")
    return float(match.group(1)) * units[match.group(2).lower()]


def parse_size(value: Any) -> int:
    """``"8GiB"`` / ``"500 MB"`` / ``1024`` → bytes."""
    return int(_parse_quantity(value, _SIZE_UNITS, "size", "500MB, 8GiB or a number of bytes"))


ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""A size in bytes; YAML may say ``8GiB``, ``500 MB`` or a number."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


FOLDER_STABLE_SECONDS = 60.0  # a folder's default quiet period
FOLDER_QUIET_FACTOR = 6  # an unset folder quiet period is this many file quiet periods


class InboxSettings(_Section):
    dirs: list[Path] = Field(default_factory=lambda: [Path("inbox")], min_length=1)
    night_dirs: list[Path] = Field(default_factory=lambda: [Path("inbox/night")])
    urgent_dirs: list[Path] = Field(default_factory=lambda: [Path("inbox/urgent")])
    stable_seconds: float = Field(default=10, ge=0)
    # A folder's quiet period: network copies pause between files (mercure's series quiet time is
    # 60 s). Unset: six times stable_seconds (60 s by default); set shorter than stable_seconds: refused.
    folder_stable_seconds: float = Field(default=FOLDER_STABLE_SECONDS, ge=0)
    scan_interval_seconds: float = Field(default=5, gt=0)
    use_watchdog: bool = True

    @field_validator("folder_stable_seconds")
    @classmethod
    def _folder_quiet(cls, value: float, info: ValidationInfo) -> float:
        file_quiet = info.data.get("stable_seconds")
        if file_quiet is not None and value < file_quiet:
            raise PydanticCustomError(
                "folder_quiet_too_short",
                "is shorter than inbox.stable_seconds ({file_quiet}): a folder would be taken after less "
                "quiet than a single file, although a folder copy pauses between its files",
                {"file_quiet": f"{file_quiet:g}"},
            )
        return value

    @model_validator(mode="after")
    def _folder_quiet_default(self) -> InboxSettings:
        if "folder_stable_seconds" not in self.model_fields_set:
            # Six file quiet periods: 60 s with the default 10 s (mercure's series quiet time); a site
            # that shortened the file's (a local disk) gets folders in proportion.
            self.folder_stable_seconds = FOLDER_QUIET_FACTOR * self.stable_seconds
        return self


class StatusSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)


class LimitSettings(_Section):
    max_members: int = Field(default=20_000, gt=0)
    max_total_bytes: ByteSize = 8 * 2**30
    max_ratio: float = Field(default=200, gt=1)
    max_attempts: int = Field(default=3, ge=1)
    max_seconds_per_arrival: float = Field(default=600, gt=0)
    # How long a write waits for another program's lock on the state database (SQLite's busy timeout)
    # before the finish is retried later or the arrival goes back to the queue, uncharged.
    database_busy_seconds: float = Field(default=30, gt=0)


# models.precision bf16/fp16 ran CT-CLIP under autocast; refused since, with the fix (docs/precision.md).
REMOVED_PRECISIONS = ("bf16", "fp16")
PRECISION_REMOVED = (
    "no longer exists: it ran CT-CLIP under {value} autocast, which moved the reference model's "
    "probabilities by up to 0.12 and flipped VQ codes (docs/precision.md); CT-CLIP steps now run fp32 "
    "on every device unless a step opts in, and the captioner's `dtype: auto` is already bf16 on CUDA"
)
PRECISION_FIX = (
    "remove models.precision (or set auto), and add `precision: bf16` (or fp16) to the `with:` of "
    "each ctclip step that should trade accuracy for speed"
)


class ModelSettings(_Section):
    capacity: int = Field(default=4, ge=1)
    gpu_memory_budget_gb: float | None = Field(default=None, gt=0)
    # auto: each model's documented default (CT-CLIP fp32; the captioner's `dtype: auto` bf16 on
    # CUDA); fp32: float32 for every model that follows it. A CT-CLIP step's own `precision` wins.
    precision: Literal["auto", "fp32"] = "auto"

    @field_validator("precision", mode="before")
    @classmethod
    def _removed_precision(cls, value: Any) -> Any:
        if value in REMOVED_PRECISIONS:
            raise PydanticCustomError("precision_removed", PRECISION_REMOVED, {"value": value})
        return value


class ReportSettings(_Section):
    enabled: bool = True
    dir: Path = Path("outbox/reports")
    rolling_days: int = Field(default=7, ge=1)
    debounce_seconds: float = Field(default=30, ge=0)
    threshold: float = Field(default=0.5, ge=0, le=1)


_CLOCK = r"([01][0-9]|2[0-3]):[0-5][0-9]"  # HH:MM, 24-hour local time


class ScheduleSettings(_Section):
    night_window: str = "01:00-06:00"
    night_run_on: bool = False

    @field_validator("night_window")
    @classmethod
    def _window(cls, value: str) -> str:
        if not re.fullmatch(f"{_CLOCK}-{_CLOCK}", value):
            raise ValueError("night_window must look like 01:00-06:00 (24-hour local time)")
        return value


class RetentionSettings(_Section):
    keep_days: int | None = Field(default=None, ge=1)


class DiskSettings(_Section):
    min_free_gb: float = Field(default=5, ge=0)


class WorkerSettings(_Section):
    # On SIGTERM/SIGINT: ``step`` finishes the running step and puts the study back to pending;
    # ``study`` finishes the running study (and still stops before the next one).
    shutdown: Literal["step", "study"] = "step"
    # Night arrivals are taken up to this many at a time and run model-major (each model over all of
    # them before the next loads); day arrivals always run one at a time, first come first served.
    night_batch: int = Field(default=4, ge=1, le=64)
    # Batches whose CPU stage (reading, decoding, CPU steps) runs ahead in a prefetch thread while
    # the GPU stage of the current one runs; bounds the studies held in memory. 0 turns it off.
    max_inflight_studies: int = Field(default=2, ge=0, le=16)
    # Processes that run the CPU stage (reading, decoding, the CPU steps) beside the worker, which
    # keeps the GPU; at most ``max_inflight_studies`` (at least 1) of them work at once. Unset: the
    # machine's cores − 1, at least 1 — or all its cores when no model step can run at start (every
    # one lacks weight files): the worker then has almost nothing to do. 0: the CPU stage runs in
    # this process (prefetch thread).
    cpu_workers: int | None = Field(default=None, ge=0, le=64)

    def cpu_processes(self, models_can_run: bool = True) -> int:
        """How many CPU pool processes to start: ``cpu_workers``; unset: cores − 1 (at least 1),
        keeping a core for the worker that runs the models, or every core when ``models_can_run``
        is False; no more than can work at once (``max_inflight_studies``, at least 1); 0 when off."""
        if self.cpu_workers is not None:
            wanted = self.cpu_workers
        else:
            wanted = max(1, usable_cores() - (1 if models_can_run else 0))
        return min(wanted, max(1, self.max_inflight_studies))


class DaskLocalCluster(_Section):
    """A :class:`distributed.LocalCluster` the daemon starts inside itself (one box)."""

    n_workers: int = Field(default=1, ge=1, le=64)
    threads_per_worker: int = Field(default=1, ge=1, le=64)
    # What each worker declares; tasks ask for {"GPU": 1}, so a worker runs one batch at a time.
    resources: dict[str, float] = Field(default_factory=lambda: {"GPU": 1.0})


class DaskSettings(_Section):
    """``executor: {dask: …}``: the pipeline runs on Dask workers (:mod:`processor.executor_dask`).

    Exactly one of ``scheduler`` (``tcp://host:8786``, workers started with ``python run.py worker``)
    and ``local`` (a LocalCluster started by the daemon)."""

    scheduler: str | None = None
    local: DaskLocalCluster | None = None
    # How a worker reads an input: ``path`` (the same file on a shared filesystem, through
    # ``path_map``) or ``bytes`` (the coordinator reads the DICOM and sends it with the task).
    inputs: Literal["path", "bytes"] = "path"
    # Coordinator path prefix → the same folder as the workers see it (``path`` inputs only).
    path_map: dict[str, str] = Field(default_factory=dict)
    # A batch whose task killed more workers than this is set aside (LocalCluster only; an outside
    # scheduler keeps its own ``distributed.scheduler.allowed-failures``).
    allowed_failures: int = Field(default=2, ge=0, le=10)
    # How long to wait for a first worker before processing pauses with the reason on /health.
    connect_seconds: float = Field(default=60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _one_cluster(self) -> DaskSettings:
        if (self.scheduler is None) == (self.local is None):
            raise ValueError(
                "executor.dask needs exactly one of scheduler (tcp://host:8786, workers started with "
                "`python run.py worker`) and local ({n_workers: …}: a cluster inside the daemon)"
            )
        if self.scheduler is not None and not re.fullmatch(r"(tcp|tls)://[^\s/]+:[0-9]+", self.scheduler):
            raise ValueError("executor.dask.scheduler must look like tcp://host:8786")
        return self

    def worker_path(self, path: Path) -> str:
        """``path`` as the workers see it: the longest ``path_map`` prefix replaced (unchanged when
        none matches)."""
        text = str(path)
        for prefix in sorted(self.path_map, key=len, reverse=True):
            base = prefix.rstrip("/")
            if text == base or text.startswith(base + "/"):
                return self.path_map[prefix].rstrip("/") + text[len(base) :]
        return text


class ExecutorSettings(_Section):
    """``executor: local`` (the default) or ``executor: {dask: {…}}``."""

    dask: DaskSettings | None = None

    @model_validator(mode="before")
    @classmethod
    def _word(cls, value: Any) -> Any:
        if value == "local" or value is None:
            return {}
        if value == "dask":
            raise ValueError(
                "executor: dask needs its settings: {dask: {local: {n_workers: 2}}} or "
                "{dask: {scheduler: tcp://host:8786}}"
            )
        return value


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


_DURATION_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(value: Any) -> float:
    """``"5m"`` / ``"2d"`` / ``"30s"`` / ``90`` → seconds."""
    return _parse_quantity(value, _DURATION_UNITS, "duration", "30s, 5m, 2h, 2d or a number of seconds")


class SourceAuth(_Section):
    bearer_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class SourceSettings(_Section):
    """One URL to poll. Durations are stored in seconds; credentials only by environment variable name."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["http", "dicomweb"]
    url: str
    every: float = Field(default=300, ge=1)
    query: dict[str, str] = Field(default_factory=dict)
    lookback: float | None = Field(default=None, gt=0)
    page_size: int = Field(default=500, ge=1, le=10_000)
    auth: SourceAuth | None = None

    @field_validator("every", "lookback", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return None if value is None else parse_duration(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        from urllib.parse import urlsplit

        parts = urlsplit(value)
        if parts.scheme.lower() not in ("http", "https"):
            raise ValueError(
                f"only http:// and https:// URLs can be polled, not {parts.scheme or 'no'} "
                "scheme; copy files into the inbox instead of using file://"
            )
        if not parts.hostname:
            raise ValueError("the URL has no host; write e.g. https://pacs.example.org/dicom-web")
        if parts.username or parts.password:
            raise ValueError(
                "credentials must not be written into the URL; put the token in an "
                "environment variable and name it in auth.bearer_env"
            )
        return value

    @field_validator("query")
    @classmethod
    def _query(cls, value: dict[str, str]) -> dict[str, str]:
        reserved = sorted(k for k in value if k.lower() in ("limit", "offset", "includefield"))
        if reserved:
            raise ValueError(f"{', '.join(reserved)} are set by ctwatch itself (paging); remove them")
        return value

    @model_validator(mode="after")
    def _dicomweb_only(self) -> SourceSettings:
        if self.kind != "dicomweb" and (self.query or self.lookback is not None):
            raise ValueError(
                "query and lookback apply only to kind: dicomweb; remove them from this http source"
            )
        return self


class FetchSettings(_Section):
    timeout_seconds: float = Field(default=60, gt=0)
    max_bytes: ByteSize = Field(default=4 * 2**30, gt=0)
    allow_hosts: list[str] = Field(default_factory=lambda: ["127.0.0.1", "localhost"])
    retries: int = Field(default=5, ge=0)
    backoff_seconds: float = Field(default=2, ge=0)

    @field_validator("allow_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        bad = [h for h in value if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", h) or h.count(":") == 1]
        if bad:
            raise ValueError(
                f"allow_hosts takes bare host names or IP addresses (no scheme, port or path): {bad!r}"
            )
        return [h.lower().strip("[]") for h in value]


_NAME = r"^[A-Za-z0-9_.-]+$"
ReportObject = Literal["html", "pdf", "sr", "sc"]
NotifyEvent = Literal["failure", "pathology", "daily"]
_ENV = r"^[A-Za-z_][A-Za-z0-9_]*$"
_AE_TITLE = r"^[ -[\]-~]{1,16}$"  # 16 characters of the DICOM default repertoire, no backslash


def _http_url(value: str, what: str) -> str:
    """``value`` if it is an http(s) URL with a host and no credentials in it (ValueError otherwise)."""
    from urllib.parse import urlsplit

    parts = urlsplit(value)
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{what} must be an http:// or https:// URL, not {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise ValueError(f"{what} has no host; write e.g. https://pacs.example.org/dicom-web")
    if parts.username or parts.password:
        raise ValueError(
            f"credentials must not be written into the {what}; put the token in an environment "
            "variable and name it in bearer_env"
        )
    return value


class StudyReportSettings(_Section):
    """What ctwatch writes beside each study JSON even when no destination asks for it.

    ``make``: any of ``html`` (a self-contained page for people), ``pdf`` (the same page as PDF),
    ``sr`` (DICOM Comprehensive 3D SR, TID 1500) and ``sc`` (the key slices as DICOM Secondary
    Capture images with a burned-in "AI-generated" banner). A destination's ``send`` adds to it.
    """

    make: list[ReportObject] = Field(default_factory=lambda: list[ReportObject](["html"]))
    institution: str | None = Field(default=None, max_length=64)  # shown on the report; None: not shown


class DicomWebTarget(_Section):
    """STOW-RS to ``url`` (the DICOMweb root, e.g. https://pacs/dicom-web); its host must be in
    ``fetch.allow_hosts``; the bearer token is read from the environment variable ``bearer_env``
    at each send, never from this file."""

    url: str
    bearer_env: str | None = Field(default=None, pattern=_ENV)
    timeout_seconds: float = Field(default=60, gt=0)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value, "dicomweb.url")


class DimseTarget(_Section):
    """C-STORE to a DICOM node (PS3.7 / PS3.8): ``called_aet`` at ``host``:``port``, as ``calling_aet``."""

    host: str
    port: int = Field(ge=1, le=65535)
    called_aet: str = Field(default="ANY-SCP", pattern=_AE_TITLE)
    calling_aet: str = Field(default="CTWATCH", pattern=_AE_TITLE)
    timeout_seconds: float = Field(default=30, gt=0)


class FolderTarget(_Section):
    """Copies into ``path`` (one folder per study), written atomically."""

    path: Path


class RetrySettings(_Section):
    """Back-off while a destination is down: ``first_seconds``, doubling up to ``max_seconds``;
    a send still failing after ``give_up_after`` (a duration) ends ``failed`` (``resend`` takes it again)."""

    first_seconds: float = Field(default=30, gt=0)
    max_seconds: float = Field(default=3600, gt=0)
    give_up_after: float = Field(default=3 * 86400, gt=0)

    @field_validator("give_up_after", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)


class DestinationSettings(_Section):
    """Where results go back: exactly one of ``dicomweb``, ``dimse``, ``folder``.

    ``send``: which objects (``sr``, ``sc``, ``pdf`` — as Encapsulated PDF over DICOM —, and for a
    folder also ``html``); ``when``: ``every_study``, ``pathology`` (only ``pathology: 1``) or
    ``failures`` (only studies that could not be analysed).
    """

    name: str = Field(pattern=_NAME)
    dicomweb: DicomWebTarget | None = None
    dimse: DimseTarget | None = None
    folder: FolderTarget | None = None
    send: list[ReportObject] = Field(default_factory=lambda: list[ReportObject](["sr", "sc"]), min_length=1)
    when: Literal["every_study", "pathology", "failures"] = "every_study"
    retry: RetrySettings = RetrySettings()

    @property
    def kind(self) -> Literal["dicomweb", "dimse", "folder"]:
        return "dicomweb" if self.dicomweb else "dimse" if self.dimse else "folder"

    @model_validator(mode="after")
    def _one_target(self) -> DestinationSettings:
        given = [k for k in ("dicomweb", "dimse", "folder") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "a destination takes exactly one of dicomweb, dimse or folder"
                + (f" (this one has {', '.join(given)})" if given else "")
            )
        if "html" in self.send and self.kind != "folder":
            raise ValueError("html can be sent to a folder only; a PACS takes sr, sc and pdf")
        return self


class NotificationSettings(_Section):
    """A webhook: a JSON POST to ``url`` (host in ``fetch.allow_hosts``) ``on`` failure (an arrival
    or a study that could not be analysed), ``pathology`` (a study with ``pathology: 1``) and
    ``daily`` (a summary at ``daily_at``, local time). PHI-free unless ``include_phi: true``."""

    name: str = Field(pattern=_NAME)
    url: str
    bearer_env: str | None = Field(default=None, pattern=_ENV)
    on: list[NotifyEvent] = Field(
        default_factory=lambda: list[NotifyEvent](["failure", "daily"]), min_length=1
    )
    daily_at: str = "07:00"
    include_phi: bool = False
    # Which ctwatch sent it, in the admin's words (the payload's ``ctwatch``; never the host name).
    label: str | None = Field(default=None, min_length=1, max_length=100)
    timeout_seconds: float = Field(default=15, gt=0)
    retry: RetrySettings = RetrySettings()

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        """YAML 1.1 reads a bare ``on:`` key as the boolean true: take it as ``on``."""
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if key is True else key): value for key, value in data.items()}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value, "url")

    @field_validator("daily_at")
    @classmethod
    def _daily_at(cls, value: str) -> str:
        if not re.fullmatch(_CLOCK, value):
            raise ValueError("daily_at must look like 07:00 (24-hour local time)")
        return value


class Settings(_Section):
    root: Path = Path(".")
    inbox: InboxSettings = InboxSettings()
    outbox: Path = Path("outbox")
    state: Path = Path("state/ctwatch.db")
    pipeline: Path = Path("pipelines/chest-ct.yaml")
    weights: Path = Path("weights")
    device: str = "auto"
    status: StatusSettings = StatusSettings()
    limits: LimitSettings = LimitSettings()
    models: ModelSettings = ModelSettings()
    reports: ReportSettings = ReportSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    retention: RetentionSettings = RetentionSettings()
    disk: DiskSettings = DiskSettings()
    worker: WorkerSettings = WorkerSettings()
    executor: ExecutorSettings = ExecutorSettings()
    sources: list[SourceSettings] = Field(default_factory=list)
    fetch: FetchSettings = FetchSettings()
    study_report: StudyReportSettings = StudyReportSettings()
    destinations: list[DestinationSettings] = Field(default_factory=list)
    notifications: list[NotificationSettings] = Field(default_factory=list)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Images of a study already analysed from an earlier arrival (processor.vocab.LateSeries).
    late_series: LateSeries = LateSeries.NEW_VERSION
    config_file: Path | None = Field(default=None, exclude=True)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", value):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return value

    @field_validator("late_series", mode="before")
    @classmethod
    def _late_series(cls, value: Any) -> Any:
        if value not in tuple(LateSeries):
            raise ValueError(
                "late_series must be new_version (a study whose images arrive in several parts is "
                "analysed again with all of them, and the new result supersedes the earlier one) or "
                "ignore (the later parts are not analysed; their receipt says why)"
            )
        return value

    @model_validator(mode="after")
    def _outbound(self) -> Settings:
        """Destination and notification names are unique; every URL host is allow-listed."""
        from urllib.parse import urlsplit

        names = [d.name for d in self.destinations] + [n.name for n in self.notifications]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"destination and notification names must be unique: {', '.join(twice)}")
        urls = [(f"destination {d.name}", d.dicomweb.url) for d in self.destinations if d.dicomweb]
        urls += [(f"notification {n.name}", n.url) for n in self.notifications]
        hosts = [(what, (urlsplit(url).hostname or "").lower()) for what, url in urls]
        hosts += [(f"destination {d.name}", d.dimse.host.lower()) for d in self.destinations if d.dimse]
        for what, host in hosts:
            if host not in self.fetch.allow_hosts:
                raise ValueError(
                    f"{what}: host {host} is not in fetch.allow_hosts. Fix: add {host} to "
                    "fetch.allow_hosts if it is trusted"
                )
        return self

    def resolve(self, base: Path) -> Settings:
        """Return a copy with every relative path made absolute against ``root``."""
        root = (base / self.root).resolve()

        def absolute(path: Path) -> Path:
            return path if path.is_absolute() else (root / path).resolve()

        inbox = self.inbox.model_copy(
            update={
                "dirs": [absolute(p) for p in self.inbox.dirs],
                "night_dirs": [absolute(p) for p in self.inbox.night_dirs],
                "urgent_dirs": [absolute(p) for p in self.inbox.urgent_dirs],
            }
        )
        return self.model_copy(
            update={
                "root": root,
                "inbox": inbox,
                "outbox": absolute(self.outbox),
                "state": absolute(self.state),
                "pipeline": absolute(self.pipeline),
                "weights": absolute(self.weights),
                "reports": self.reports.model_copy(update={"dir": absolute(self.reports.dir)}),
                "destinations": [
                    d.model_copy(update={"folder": FolderTarget(path=absolute(d.folder.path))})
                    if d.folder
                    else d
                    for d in self.destinations
                ],
            }
        )

    def absolute(self, path: str | Path) -> Path:
        path = Path(path)
        return path if path.is_absolute() else (self.root / path).resolve()


_HINTS = {
    "extra_forbidden": "remove this key or check its spelling against the README's config reference",
    "bool_parsing": "write true or false without quotes",
    "int_parsing": "write a whole number without quotes",
    "float_parsing": "write a number without quotes",
    "missing": "add this key",
    "precision_removed": PRECISION_FIX,
    "folder_quiet_too_short": "make inbox.folder_stable_seconds at least inbox.stable_seconds, or remove it "
    "(default: six times stable_seconds, 60 s with the default 10 s)",
}


def _format_errors(path: Path, exc: ValidationError) -> str:
    lines = [f"{path}: {exc.error_count()} problem(s) in the settings:"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        value = err.get("input")
        if isinstance(value, str) and "://" in value:  # a URL may hold a password or a signed query
            value = redact_url(value)
        hint = _HINTS.get(err["type"], "see the config reference in README.md")
        shown = "" if err["type"] == "missing" else f" (value: {value!r})"
        lines.append(f"  - {key}{shown}: {err['msg']}. Fix: {hint}.")
    return "\n".join(lines)


def load_settings(path: str | Path, overrides: dict[str, Any] | None = None) -> Settings:
    """Read, validate and resolve a settings file. Raises ConfigError with every problem at once."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the config file ({exc.strerror}). Fix: pass an existing file with --config."
        ) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}. Fix: check indentation and quotes.") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}.")
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value)
    try:
        settings = Settings.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from exc
    settings = settings.resolve(path.resolve().parent).model_copy(update={"config_file": path.resolve()})
    check_layout(settings)
    return settings


def check_layout(settings: Settings) -> None:
    """Refuse folders that overlap in ways that make the daemon eat its own output.

    An inbox is scanned for arrivals: anything ctwatch writes or reads as its own (outbox, reports,
    state database, weights, the pipeline and config files) must not lie inside one; no inbox may
    lie inside the outbox, inside another day inbox or inside a night or urgent folder. Night and
    urgent folders may lie inside a day inbox (the defaults ``inbox/night``, ``inbox/urgent``): the
    watcher keeps them apart; never inside each other or inside another of their kind. Raises a
    :class:`ConfigError` naming every overlap and its fix.
    """
    inboxes = [("inbox.dirs", d) for d in settings.inbox.dirs]
    inboxes += [("inbox.night_dirs", d) for d in settings.inbox.night_dirs]
    inboxes += [("inbox.urgent_dirs", d) for d in settings.inbox.urgent_dirs]
    written = [
        ("outbox", settings.outbox),
        ("reports.dir", settings.reports.dir),
        ("state", settings.state),
        ("weights", settings.weights),
        ("pipeline", settings.pipeline),
    ]
    if settings.config_file is not None:
        written.append(("the config file", settings.config_file))
    problems = []
    days = settings.inbox.dirs
    for i, day in enumerate(days):  # an inbox inside another would be taken in by the outer one
        for j, other in enumerate(days):
            if i != j and _within(day, other):
                problems.append(
                    f"  - inbox.dirs ({day}) lies inside another inbox folder ({other}): the outer one would "
                    "take the inner folder in as one arrival. Fix: list only the outer one, or give each "
                    "its own folder."
                )
        for night in settings.inbox.night_dirs:
            if _within(day, night):
                problems.append(
                    f"  - inbox.dirs ({day}) lies inside inbox.night_dirs ({night}): the night folder would "
                    "take it in. Fix: put night folders inside the day inbox (the default inbox/night), "
                    "never the other way round."
                )
    problems += _lane_overlaps(settings)
    for inbox_key, inbox in inboxes:
        for key, target in written:
            if _within(target, inbox):
                problems.append(
                    f"  - {key} ({target}) lies inside {inbox_key} ({inbox}): ctwatch would take its own "
                    f"files for arrivals. Fix: put it outside every inbox folder."
                )
        if _within(inbox, settings.outbox):
            problems.append(
                f"  - {inbox_key} ({inbox}) lies inside the outbox ({settings.outbox}): results and "
                "dropped studies would mix. Fix: give the inbox its own folder outside the outbox."
            )
    if problems:
        where = settings.config_file or "settings"
        raise ConfigError(f"{where}: folders overlap:\n" + "\n".join(problems))


def _lane_overlaps(settings: Settings) -> list[str]:
    """Urgent folders against day inboxes, night folders and each other (see :func:`check_layout`)."""
    problems = []
    urgents = settings.inbox.urgent_dirs
    for i, urgent in enumerate(urgents):
        lanes = [("inbox.night_dirs", d) for d in settings.inbox.night_dirs]
        lanes += [("inbox.urgent_dirs", d) for d in urgents[i + 1 :]]
        for day in settings.inbox.dirs:
            if _within(day, urgent):
                problems.append(
                    f"  - inbox.dirs ({day}) lies inside or is inbox.urgent_dirs ({urgent}): every drop "
                    "would be taken as urgent, or twice. Fix: put urgent folders inside the day inbox "
                    "(the default inbox/urgent), never the other way round."
                )
        for key, other in lanes:
            if _within(other, urgent) or _within(urgent, other):
                problems.append(
                    f"  - inbox.urgent_dirs ({urgent}) and {key} ({other}) overlap: a drop there would "
                    "be both (or taken in as a folder by the outer one). Fix: give each its own folder, "
                    "side by side."
                )
    return problems


def _within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (both absolute; symlinks resolved)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "config" / "default.yaml"
