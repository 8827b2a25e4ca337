"""The shared model cache: models load once, stay resident, and leave least-recently-used first.

* ``ModelCache(capacity, device, gpu_memory_budget_gb=None, precision="auto")``. ``get(key,
  loader)`` returns the resident model for ``key`` or calls ``loader()`` once (concurrent callers
  for the same key wait for that one load). Beyond ``capacity`` models, or beyond the GPU budget
  (``torch.cuda.memory_allocated`` on the cache's CUDA device), the least recently used model is
  dropped. ``loaded()`` describes what is resident (for /status), ``stats()`` counts loads, hits
  and evictions, ``trim()`` returns freed CUDA memory to the driver.
* ``autocast_dtype()`` turns the ``models.precision`` setting into the dtype of models whose own
  setting is ``auto`` and follows the cache (the captioner's ``dtype: auto``): ``auto`` = that
  model's default, bfloat16 on CUDA and exact float32 on the CPU; ``fp32`` = float32 everywhere.
  CT-CLIP steps never read it: they run at their own ``precision`` (fp32 unless a step opts in),
  and ``models.precision: bf16`` / ``fp16`` are refused with the fix (docs/precision.md).
* ``digest(path)``: sha256 of a weights file, computed once per (path, size, mtime).
* ``run_with_oom_backoff(fn, items, batch_size)``: micro-batches that halve on CUDA OOM.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from processor.config import PRECISION_FIX, PRECISION_REMOVED, REMOVED_PRECISIONS
from processor.errors import ConfigError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# models.precision: auto (each model's documented default) or fp32 (float32 for every model that
# follows the cache). bf16/fp16 (low precision for every model, CT-CLIP included) are refused: bf16
# moved CT-CLIP's probabilities by up to 0.12 (docs/precision.md). torch is imported only when a
# model runs, so a daemon whose pipeline needs no model starts without it.
PRECISIONS = ("auto", "fp32")
_HASH_CHUNK = 8 * 2**20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class _Entry:
    model: Any
    loaded_at: float
    load_seconds: float
    gpu_bytes: int
    last_used: float
    hits: int = 0


class ModelCache:
    """Capacity- and GPU-budget-bounded LRU of loaded models; safe to share between threads."""

    def __init__(
        self,
        capacity: int,
        device: str | torch.device = "cpu",
        gpu_memory_budget_gb: float | None = None,
        precision: str = "auto",
    ) -> None:
        if capacity < 1:
            raise ConfigError(
                f"models.capacity {capacity}: must be at least 1. Fix: set models.capacity: 1 or more."
            )
        if precision in REMOVED_PRECISIONS:
            raise ConfigError(
                f"models.precision {precision!r} {PRECISION_REMOVED.format(value=precision)}. "
                f"Fix: {PRECISION_FIX}."
            )
        if precision not in PRECISIONS:
            raise ConfigError(f"models.precision {precision!r}: use auto or fp32 (docs/precision.md).")
        self.capacity = capacity
        self.device_name = str(device)
        self.gpu_budget_bytes = None if gpu_memory_budget_gb is None else int(gpu_memory_budget_gb * 1e9)
        self.precision = precision
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}
        self._digests: dict[tuple[str, int, int], str] = {}
        self._digest_lock = threading.Lock()
        self.loads: dict[Hashable, int] = {}
        self.hits = 0
        self.evictions = 0

    # ---------------------------------------------------------------- models
    def get(self, key: Hashable, loader: Callable[[], T]) -> T:
        """The resident model for ``key``; ``loader()`` runs only when it is not resident."""
        with self._lock:
            entry = self._touch(key)
            if entry is not None:
                return entry.model  # type: ignore[no-any-return]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one load per key; other keys stay available meanwhile
            with self._lock:
                entry = self._touch(key)
                if entry is not None:
                    return entry.model  # type: ignore[no-any-return]
            before = self._gpu_allocated()
            started = time.perf_counter()
            model = loader()
            seconds = time.perf_counter() - started
            now = time.time()
            with self._lock:
                self._entries[key] = _Entry(model, now, seconds, max(self._gpu_allocated() - before, 0), now)
                self.loads[key] = self.loads.get(key, 0) + 1
                self._key_locks.pop(key, None)
                evicted = self._evict_over_limits(keep=key)
            log.info(
                "models.loaded key=%s seconds=%.2f resident=%d device=%s",
                _name(key),
                seconds,
                len(self._entries),
                self.device,
            )
            if evicted:
                self.trim()
            return model

    def _touch(self, key: Hashable) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.hits += 1
            entry.last_used = time.time()
            self.hits += 1
        return entry

    def _evict_over_limits(self, keep: Hashable) -> list[Hashable]:
        """Drop least recently used entries (never ``keep``) while over capacity or budget."""
        evicted = []
        while len(self._entries) > self.capacity:
            evicted.append(self._evict_oldest(keep, reason="capacity"))
        while self._over_budget() and len(self._entries) > 1:
            evicted.append(self._evict_oldest(keep, reason="gpu_memory_budget"))
            gc.collect()
        return evicted

    def _evict_oldest(self, keep: Hashable, reason: str) -> Hashable:
        key = next(k for k in self._entries if k != keep)
        del self._entries[key]
        self.evictions += 1
        log.info("models.evicted key=%s reason=%s resident=%d", _name(key), reason, len(self._entries))
        return key

    def _over_budget(self) -> bool:
        return self.gpu_budget_bytes is not None and self._gpu_allocated() > self.gpu_budget_bytes

    @property
    def device(self) -> torch.device:
        """The cache's device as a ``torch.device`` (imports torch)."""
        import torch

        return torch.device(self.device_name)

    @property
    def on_cuda(self) -> bool:
        return self.device_name.startswith("cuda")

    def _gpu_allocated(self) -> int:
        if not self.on_cuda:
            return 0
        import torch

        if not torch.cuda.is_available():
            return 0
        return int(torch.cuda.memory_allocated(self.device))

    def evict(self, key: Hashable) -> bool:
        """Drop one model; True when it was resident."""
        with self._lock:
            found = self._entries.pop(key, None) is not None
            if found:
                self.evictions += 1
        if found:
            self.trim()
        return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        self.trim()

    def trim(self) -> None:
        """Collect garbage and hand cached CUDA blocks back to the driver."""
        gc.collect()
        if self.on_cuda:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def loaded(self) -> list[dict[str, Any]]:
        """Resident models, most recently used last (for /status)."""
        with self._lock:
            return [
                {
                    "key": _name(key),
                    "loads": self.loads.get(key, 0),
                    "hits": e.hits,
                    "load_seconds": round(e.load_seconds, 3),
                    "gpu_bytes": e.gpu_bytes,
                    "loaded_at": e.loaded_at,
                    "last_used": e.last_used,
                }
                for key, e in self._entries.items()
            ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "resident": len(self._entries),
                "capacity": self.capacity,
                "loads": sum(self.loads.values()),
                "hits": self.hits,
                "evictions": self.evictions,
                "gpu_allocated_bytes": self._gpu_allocated(),
                "gpu_budget_bytes": self.gpu_budget_bytes,
            }

    # ---------------------------------------------------------------- precision, checksums
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype of models whose ``auto`` follows the cache (the captioner; never CT-CLIP).

        ``models.precision: auto`` = their default, bfloat16 on CUDA and float32 (None) on the CPU;
        ``fp32`` = float32 (None) everywhere.
        """
        from processor.models.device import default_autocast_dtype

        if self.precision == "auto":
            return default_autocast_dtype(self.device)
        return None

    def digest(self, path: str | Path) -> str:
        """sha256 of ``path``, computed once per (resolved path, size, mtime)."""
        resolved = Path(path).resolve()
        stat = resolved.stat()
        key = (str(resolved), stat.st_size, stat.st_mtime_ns)
        with self._digest_lock:
            known = self._digests.get(key)
            if known is None:
                started = time.perf_counter()
                known = self._digests[key] = sha256_file(resolved)
                log.info(
                    "models.sha256 file=%s bytes=%d seconds=%.2f",
                    resolved,
                    stat.st_size,
                    time.perf_counter() - started,
                )
            return known


def _name(key: Hashable) -> str:
    if isinstance(key, tuple):
        return ":".join(str(part) for part in key if part is not None)
    return str(key)


def run_with_oom_backoff(
    fn: Callable[[list[T]], Sequence[R]], items: Sequence[T], batch_size: int
) -> list[R]:
    """Apply ``fn`` to ``items`` in micro-batches; on CUDA OOM halve the batch and retry.

    ``fn`` takes a list (a slice of ``items``) and returns one result per item. The smaller batch size is
    kept for the remaining items. At batch size 1 the OutOfMemoryError is re-raised.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    import torch

    results: list[R] = []
    start, size = 0, batch_size
    while start < len(items):
        chunk = list(items[start : start + size])
        try:
            out = fn(chunk)
        except torch.cuda.OutOfMemoryError:
            if size == 1:
                raise
            size = max(size // 2, 1)
            log.warning("models.oom_backoff batch_size=%d items_left=%d", size, len(items) - start)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        if len(out) != len(chunk):
            raise ValueError(f"fn returned {len(out)} results for {len(chunk)} items")
        results.extend(out)
        start += len(chunk)
    return results
