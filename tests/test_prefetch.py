"""processor.prefetch.Prefetcher: order, the in-flight bound, per-job errors, clean shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from processor.prefetch import PrefetchClosed, Prefetched, Prefetcher


class Gauge:
    """Counts prepare() calls running and prepared results not yet consumed, under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held = 0  # prepared or preparing, not yet taken by the consumer
        self.max_held = 0
        self.started: list[int] = []

    def enter(self, job: int) -> None:
        with self.lock:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
            self.started.append(job)

    def consumed(self) -> None:
        with self.lock:
            self.held -= 1


def _prepare_with(gauge: Gauge, release: threading.Event | None = None):  # noqa: ANN202 - a closure
    def prepare(job: int) -> int:
        gauge.enter(job)
        if release is not None:
            assert release.wait(10), "test did not release the worker"
        if job % 7 == 3:
            raise ValueError(f"bad study {job}")
        return job * job

    return prepare


@pytest.mark.parametrize(("max_inflight", "workers"), [(1, 1), (2, 1), (3, 2), (4, 4)])
def test_results_in_job_order_and_bound_never_exceeded(max_inflight: int, workers: int) -> None:
    gauge = Gauge()
    seen_inflight = []
    jobs = list(range(40))
    with Prefetcher(_prepare_with(gauge), max_inflight=max_inflight, workers=workers) as pool:
        results: list[Prefetched[int, int]] = []
        for item in pool.map(iter(jobs)):
            seen_inflight.append(pool.inflight)
            results.append(item)
            gauge.consumed()  # the consumer has taken it: no longer counted against the bound
    assert [r.job for r in results] == jobs
    assert [r.value for r in results if r.ok] == [j * j for j in jobs if j % 7 != 3]
    assert gauge.max_held <= max_inflight + 1  # + the one handed over and not yet marked consumed
    assert max(seen_inflight) <= max_inflight
    assert pool.inflight == 0


def test_bound_holds_while_the_consumer_is_slow() -> None:
    """Workers run ahead of a slow consumer up to max_inflight jobs, and never further."""
    gauge = Gauge()
    ahead = []
    with Prefetcher(_prepare_with(gauge), max_inflight=2, workers=3) as pool:
        for item in pool.map(range(12)):
            # wait (with a timeout, no bare sleep) until the workers have taken all they may
            expected = min(item.job + 1 + 2, 12)
            assert wait_until(lambda e=expected: len(gauge.started) >= e), gauge.started
            with gauge.lock:
                ahead.append(len(gauge.started) - (item.job + 1))
            assert pool.inflight <= 2
            gauge.consumed()
    assert max(ahead) == 2  # it did prefetch, and never further than the bound
    assert gauge.max_held <= 3


def wait_until(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001 - a callable
    """Poll ``predicate`` on an Event wait until it holds or ``timeout`` passes."""
    tick = threading.Event()
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.005)
    return True


def test_an_exception_is_delivered_with_its_job_and_the_rest_go_on() -> None:
    with Prefetcher(_prepare_with(Gauge()), max_inflight=2) as pool:
        items = list(pool.map([1, 2, 3, 4, 10]))
    assert [i.job for i in items] == [1, 2, 3, 4, 10]
    bad = [i for i in items if not i.ok]
    assert [i.job for i in bad] == [3, 10]
    assert isinstance(bad[0].error, ValueError) and "bad study 3" in str(bad[0].error)
    with pytest.raises(ValueError, match="bad study 10"):
        bad[1].get()
    assert items[0].get() == 1 and items[3].get() == 16


def test_an_error_in_the_job_iterable_propagates() -> None:
    def jobs():  # noqa: ANN202 - a generator
        yield 1
        raise OSError("queue unreadable")

    with Prefetcher(lambda j: j, max_inflight=2) as pool, pytest.raises(OSError, match="queue unreadable"):
        list(pool.map(jobs()))
    assert pool.inflight == 0


def test_close_joins_threads_and_drops_jobs_not_started() -> None:
    gauge = Gauge()
    pool = Prefetcher(_prepare_with(gauge), max_inflight=3, workers=2)
    taken = []
    with pytest.raises(PrefetchClosed):  # map() must not end silently when the pool is closed under it
        for item in pool.map(range(100)):
            taken.append(item.job)
            pool.close()  # e.g. the daemon shutting down while the consumer works
            assert not [t for t in threading.enumerate() if t.name.startswith("ctwatch-prefetch")]
    assert taken == [0]
    assert len(gauge.started) <= 1 + 3  # what was taken before close; the rest never started
    assert pool.inflight == 0
    with pytest.raises(PrefetchClosed):
        pool.map([1])
    pool.close()  # idempotent


def test_close_from_another_thread_while_the_consumer_waits() -> None:
    release = threading.Event()
    gauge = Gauge()
    pool = Prefetcher(_prepare_with(gauge, release), max_inflight=2, workers=1)
    outcome: list[object] = []

    def consume() -> None:
        try:
            outcome.extend(pool.map(range(10)))
        except PrefetchClosed as exc:
            outcome.append(exc)

    consumer = threading.Thread(target=consume, name="test-consumer")
    consumer.start()
    assert wait_until(lambda: len(gauge.started) == 1)  # the worker is inside prepare(0)
    closer = threading.Thread(target=pool.close, name="test-closer")
    closer.start()
    assert wait_until(lambda: pool._closed)  # noqa: SLF001 - close() has begun and is joining
    release.set()  # prepare(0) returns; job 1 is dropped
    closer.join(10)
    consumer.join(10)
    assert not closer.is_alive() and not consumer.is_alive()
    assert gauge.started == [0]
    assert isinstance(outcome[-1], PrefetchClosed)
    assert not [t for t in threading.enumerate() if t.name.startswith("ctwatch-prefetch")]


def test_breaking_out_waits_for_running_jobs_and_the_pool_can_map_again() -> None:
    gauge = Gauge()
    with Prefetcher(_prepare_with(gauge), max_inflight=3, workers=2) as pool:
        for item in pool.map(range(50)):
            if item.job == 4:
                break
        assert pool.inflight == 0
        assert len(gauge.started) <= 5 + 3
        again = [i.value for i in pool.map([5, 6])]
        assert again == [25, 36]
    assert not [t for t in threading.enumerate() if t.name.startswith("ctwatch-prefetch")]


def test_threads_are_named_and_started_lazily() -> None:
    names: list[str] = []

    def prepare(job: int) -> int:
        names.append(threading.current_thread().name)
        return job

    pool = Prefetcher(prepare, max_inflight=2, workers=2)
    assert not [t for t in threading.enumerate() if t.name.startswith("ctwatch-prefetch")]
    with pool:
        assert [i.value for i in pool.map(range(6))] == list(range(6))
    assert set(names) <= {"ctwatch-prefetch-0", "ctwatch-prefetch-1"}


@pytest.mark.parametrize(("max_inflight", "workers"), [(0, 1), (1, 0)])
def test_bad_sizes_are_refused(max_inflight: int, workers: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(lambda j: j, max_inflight=max_inflight, workers=workers)


def test_a_result_is_not_held_by_the_pool_once_the_consumer_lets_it_go() -> None:
    """A prepared study is hundreds of MB (issue 18, memory): once the consumer has dropped it, no
    worker thread keeps it while it waits for the next job — nor while the daemon is idle."""
    import weakref

    class Study:
        pass

    refs: list[weakref.ref[Study]] = []

    def prepare(job: int) -> Study:
        study = Study()
        refs.append(weakref.ref(study))
        return study

    with Prefetcher(prepare, max_inflight=2, workers=2) as pool:
        for item in pool.map(range(3)):
            assert item.value is not None
            del item
        gone = threading.Event()
        for _ in range(500):  # the worker thread lets go just after handing the result over
            if all(ref() is None for ref in refs):
                gone.set()
                break
            gone.wait(0.01)
        assert len(refs) == 3 and gone.is_set(), [ref() for ref in refs]
