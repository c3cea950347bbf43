"""lorasurgery.concurrency: the read → compute → write pipeline, its byte budget and its errors."""

from __future__ import annotations

import threading
import time

import pytest

from lorasurgery.concurrency import Budget, Pipeline, one_torch_thread


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


def test_one_torch_thread_restores_the_count():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    with one_torch_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
