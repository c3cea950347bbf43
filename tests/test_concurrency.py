"""lorasurgery.concurrency: the read → compute → write pipeline, its byte budget and its errors; the
prefetcher and the ordered map."""

from __future__ import annotations

import threading
import time

import pytest

from lorasurgery.concurrency import Budget, Pipeline, Prefetch, ordered_map, torch_threads


def test_every_item_is_read_computed_and_written_once():
    written = []
    pipeline = Pipeline(
        range(50), lambda i: i * 10, lambda i, v: v + 1, lambda i, r: written.append((i, r)), workers=3
    )
    with pipeline:
        done = list(pipeline)
    assert sorted(done) == list(range(50))
    assert sorted(written) == [(i, i * 10 + 1) for i in range(50)]


def test_without_a_writer_iteration_yields_the_results():
    pipeline = Pipeline(["a", "bb", "ccc"], len, lambda item, n: n * 2, workers=2)
    with pipeline:
        results = dict(pipeline)
    assert results == {"a": 2, "bb": 4, "ccc": 6}


def test_the_budget_bounds_what_is_in_flight_and_one_item_always_fits():
    lock = threading.Lock()
    in_flight = peak = 0
    sizes = {i: (7 if i == 3 else 2) for i in range(12)}  # item 3 alone exceeds the limit

    def read(i):
        nonlocal in_flight, peak
        with lock:
            in_flight += sizes[i]
            peak = max(peak, in_flight)
        return i

    def write(i, _):
        nonlocal in_flight
        time.sleep(0.002)
        with lock:
            in_flight -= sizes[i]

    pipeline = Pipeline(range(12), read, lambda i, v: v, write, workers=2, cost=sizes.get, limit=5)
    with pipeline:
        assert len(list(pipeline)) == 12
    assert peak <= 7  # the oversized item ran alone; the others stayed within 5


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_an_error_in_any_stage_stops_the_others_and_is_raised(stage):
    seen = []

    def fail(i, where):
        if where == stage and i == 5:
            raise ValueError(f"{stage} failed")
        return i

    pipeline = Pipeline(
        range(1000),
        lambda i: fail(i, "read"),
        lambda i, v: fail(i, "compute"),
        lambda i, r: seen.append(fail(i, "write")),
        workers=2,
    )
    with pytest.raises(ValueError, match=f"{stage} failed"):
        with pipeline:
            for _ in pipeline:
                pass
    assert len(seen) < 1000
    assert not any(t.is_alive() for t in pipeline.threads)


def test_budget_cancel_wakes_a_waiting_reader():
    budget = Budget(4)
    budget.acquire(3)
    woke = threading.Event()

    def wait():
        budget.acquire(3)
        woke.set()

    thread = threading.Thread(target=wait)
    thread.start()
    assert not woke.wait(0.2)
    budget.cancel()
    assert woke.wait(2)
    thread.join()


def test_torch_threads_sets_and_restores_the_count():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        with torch_threads(None):  # None leaves the count alone (a GPU run)
            assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("restored on errors too")
    assert torch.get_num_threads() == before


def test_prefetch_reads_in_order_up_to_its_limit_and_hands_each_value_out_once():
    read = []
    with Prefetch(range(10), lambda i: read.append(i) or i * i, cost=lambda i: 3, limit=10) as early:
        pass
    assert read == [0, 1, 2]  # a fourth would pass 10
    assert [early.take(i) for i in range(4)] == [0, 1, 4, None]
    assert early.take(1) is None  # taken already: the caller reads it itself


def test_prefetch_stops_at_the_first_error_and_when_its_block_ends():
    def read(i):
        if i == 2:
            raise OSError("unreadable")  # dropped: the caller reads it again and reports it
        return i

    with Prefetch(range(5), read, cost=lambda i: 1, limit=100) as early:
        pass
    assert [early.take(i) for i in range(5)] == [0, 1, None, None, None]

    release, started = threading.Event(), threading.Event()

    def slow(i):
        started.set()
        release.wait(5)
        return i

    timer = threading.Timer(0.2, release.set)  # item 0 finishes only after the block has ended
    with Prefetch(range(5), slow, cost=lambda i: 1, limit=100) as early:
        assert started.wait(5)
        timer.start()
    assert early.take(0) == 0 and all(early.take(i) is None for i in range(1, 5))


@pytest.mark.parametrize("workers", [1, 3])
def test_ordered_map_yields_in_order_with_a_bounded_lead(workers):
    running, most = 0, 0
    lock = threading.Lock()

    def work(i):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01 * ((7 * i) % 5))  # finish out of order
        with lock:
            running -= 1
        return i * 10

    results = []
    for value in ordered_map(work, range(12), workers):
        results.append(value)
    assert results == [10 * i for i in range(12)]
    assert most <= workers
    with pytest.raises(ZeroDivisionError):
        list(ordered_map(lambda i: 1 / (i - 5), range(8), workers))
