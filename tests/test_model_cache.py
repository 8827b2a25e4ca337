"""ModelCache (load once, LRU, thread safety, checksums) and the CUDA OOM back-off helper."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from processor.errors import ConfigError
from processor.models.cache import ModelCache, run_with_oom_backoff


class Loader:
    """A loader that builds a tiny real model and counts its calls."""

    def __init__(self, dim: int = 4, gate: threading.Event | None = None) -> None:
        self.calls = 0
        self.dim = dim
        self.gate = gate

    def __call__(self) -> nn.Module:
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(10), "test gate never opened"
        return nn.Linear(self.dim, 2)


def test_loads_once_and_returns_the_same_model() -> None:
    cache = ModelCache(capacity=2)
    loader = Loader()
    first = cache.get("a", loader)
    assert cache.get("a", loader) is first
    assert loader.calls == 1
    stats = cache.stats()
    assert (stats["loads"], stats["hits"], stats["evictions"], stats["resident"]) == (1, 1, 0, 1)
    [row] = cache.loaded()
    assert row["key"] == "a" and row["loads"] == 1 and row["hits"] == 1 and row["gpu_bytes"] == 0


def test_lru_eviction_capacity_one() -> None:
    cache = ModelCache(capacity=1)
    a, b = Loader(), Loader()
    cache.get("a", a)
    cache.get("b", b)
    assert "a" not in cache and "b" in cache
    cache.get("a", a)
    assert a.calls == 2 and b.calls == 1 and cache.stats()["evictions"] == 2
    assert [r["key"] for r in cache.loaded()] == ["a"]


def test_lru_evicts_least_recently_used_not_oldest_loaded() -> None:
    cache = ModelCache(capacity=2)
    loaders = {k: Loader() for k in "abc"}
    cache.get("a", loaders["a"])
    cache.get("b", loaders["b"])
    cache.get("a", loaders["a"])  # a is now the most recently used
    cache.get("c", loaders["c"])
    assert "b" not in cache and "a" in cache and "c" in cache
    assert [r["key"] for r in cache.loaded()] == ["a", "c"]
    cache.trim()  # a no-op on the CPU, must not fail
    assert cache.evict("a") and not cache.evict("a")


def test_concurrent_gets_load_once() -> None:
    cache = ModelCache(capacity=2)
    gate = threading.Event()
    loader = Loader(gate=gate)
    results: list[nn.Module] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(cache.get(("ctclip", "x"), loader)), name=f"ctwatch-test-{i}"
        )
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    # another key is not blocked while "x" is loading
    other = cache.get("other", Loader())
    assert isinstance(other, nn.Linear)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert loader.calls == 1
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert "ctclip:x" in [r["key"] for r in cache.loaded()]


def test_failed_load_is_not_cached() -> None:
    cache = ModelCache(capacity=1)

    def broken() -> nn.Module:
        raise OSError("disk gone")

    with pytest.raises(OSError):
        cache.get("a", broken)
    assert "a" not in cache
    assert isinstance(cache.get("a", Loader()), nn.Linear)


def test_settings_are_checked_and_precision_maps_to_autocast() -> None:
    with pytest.raises(ConfigError, match="models.capacity"):
        ModelCache(capacity=0)
    with pytest.raises(ConfigError, match="models.precision"):
        ModelCache(capacity=1, precision="int8")
    # what models whose `auto` follows the cache get (the captioner; CT-CLIP never reads it):
    # unchanged by CT-CLIP's fp32 default, bf16 on CUDA and exact float32 on the CPU
    assert ModelCache(1, "cpu").autocast_dtype() is None
    assert ModelCache(1, "cuda").autocast_dtype() is torch.bfloat16  # a name only: no CUDA needed
    assert ModelCache(1, "cpu", precision="fp32").autocast_dtype() is None
    assert ModelCache(1, "cuda", precision="fp32").autocast_dtype() is None
    # the old global low precision is refused with the per-step fix
    for removed in ("bf16", "fp16"):
        with pytest.raises(
            ConfigError, match=rf"models.precision '{removed}' no longer exists.*`precision: bf16`"
        ):
            ModelCache(1, "cpu", precision=removed)


def test_digest_is_computed_once_per_file_version(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = ModelCache(capacity=1)
    path = tmp_path / "w.pt"
    path.write_bytes(b"weights v1")
    caplog.set_level(logging.INFO, logger="processor.models.cache")
    assert cache.digest(path) == hashlib.sha256(b"weights v1").hexdigest()
    assert cache.digest(path) == hashlib.sha256(b"weights v1").hexdigest()
    assert caplog.text.count("models.sha256") == 1
    path.write_bytes(b"weights v2!")
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache.digest(path) == hashlib.sha256(b"weights v2!").hexdigest()
    assert caplog.text.count("models.sha256") == 2


# ---------------------------------------------------------------- OOM back-off
class OomAbove(nn.Module):
    """A tiny model that raises CUDA OOM for batches larger than ``limit``, recording batch sizes."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 2)
        self.limit = limit
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (test: batch {x.shape[0]} > {self.limit})")
        return self.linear(x)


def test_oom_error_is_constructible_without_cuda() -> None:
    error = torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert isinstance(error, RuntimeError)


def test_oom_backoff_halves_and_completes(caplog: pytest.LogCaptureFixture) -> None:
    model = OomAbove(limit=2)
    items = [torch.randn(3, generator=torch.Generator().manual_seed(i)) for i in range(11)]
    with torch.inference_mode():
        out = run_with_oom_backoff(lambda chunk: list(model(torch.stack(list(chunk)))), items, batch_size=8)
        expected = [model.linear(x) for x in items]
    assert model.sizes[:3] == [8, 4, 2]  # halved twice, then kept at 2 for the rest
    assert set(model.sizes[2:]) <= {1, 2} and sum(model.sizes[2:]) == 11
    assert len(out) == 11
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want)
    assert caplog.text.count("models.oom_backoff") == 2


def test_oom_backoff_reraises_at_batch_size_one() -> None:
    model = OomAbove(limit=0)
    with pytest.raises(torch.cuda.OutOfMemoryError), torch.inference_mode():
        run_with_oom_backoff(lambda chunk: list(model(torch.stack(list(chunk)))), [torch.zeros(3)] * 4, 4)
    assert model.sizes == [4, 2, 1]


def test_oom_backoff_leaves_other_errors_alone() -> None:
    calls = []

    def fn(chunk: list[int]) -> list[int]:
        calls.append(len(chunk))
        raise RuntimeError("not an OOM")

    with pytest.raises(RuntimeError, match="not an OOM"):
        run_with_oom_backoff(fn, [1, 2, 3, 4], 4)
    assert calls == [4]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_budget_evicts_least_recently_used() -> None:
    cache = ModelCache(capacity=4, device="cuda", gpu_memory_budget_gb=0.15)

    def big() -> torch.Tensor:
        return torch.zeros(25_000_000, device="cuda")  # 100 MB

    cache.get("a", big)
    cache.get("b", big)
    assert "a" not in cache and "b" in cache
    assert cache.loaded()[0]["gpu_bytes"] >= 100_000_000
    cache.clear()
