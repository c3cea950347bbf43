"""The project's one concurrency helper: a read → compute → write thread pipeline under a byte budget.

    with Pipeline(items, read, compute, write, workers=2, cost=size_of, limit=2 * largest) as run:
        for item in run:          # each item once written, in completion order
            report(item)

One reader thread calls read(item) in the items' order (after reserving cost(item) bytes of the
budget), `workers` threads call compute(item, value), one writer thread calls write(item, result)
and then frees the item's bytes. Disk reads, arithmetic and writes overlap because file I/O and torch
release the GIL. The budget bounds what is in flight (an item larger than the limit still runs, alone).
Leaving the block waits for every thread; the first error of any thread stops the others and is
raised in the caller, and so is a Ctrl-C. `torch_threads(1)` keeps torch's own pool out of the way
of these threads (small memory-bound blocks: see docs/merge.md for the measurement).

Two smaller shapes of the same idea: `Prefetch` reads the first items in the background while the
caller does something slow that needs no disk (extract: `import torch`), and `ordered_map` runs a
function over items on `workers` threads and yields the results in order (the probe's windows).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


class Budget:
    """Bytes in flight; acquire waits until `n` more fit (or nothing is held: one item always fits)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.condition = threading.Condition()
        self.cancelled = False

    def acquire(self, n: int) -> None:
        with self.condition:
            while self.used and self.used + n > self.limit and not self.cancelled:
                self.condition.wait(0.1)
            self.used += n

    def release(self, n: int) -> None:
        with self.condition:
            self.used -= n
            self.condition.notify_all()

    def cancel(self) -> None:
        with self.condition:
            self.cancelled = True
            self.condition.notify_all()


class Pipeline:
    """read(item) in a reader thread → compute(item, value) in `workers` threads → write(item, result)
    in a writer thread (write=None: the computed result is what iteration yields, with its item).
    At most `depth` (default: `workers`) values wait between two stages."""

    _END = object()

    def __init__(
        self,
        items: Iterable,
        read: Callable,
        compute: Callable,
        write: Callable | None = None,
        *,
        workers: int = 1,
        cost: Callable | None = None,
        limit: int | None = None,
        depth: int | None = None,
        name: str = "pipeline",
    ):
        self.items = list(items)
        self.read, self.compute, self.write = read, compute, write
        self.workers = max(1, workers)
        self.cost = cost
        self.budget = Budget(limit) if cost is not None and limit is not None else None
        self.stop = threading.Event()
        self.error: BaseException | None = None
        depth = depth or self.workers  # values waiting between two stages
        self.read_queue: queue.Queue = queue.Queue(maxsize=depth)
        self.write_queue: queue.Queue = queue.Queue(maxsize=depth)
        self.done_queue: queue.Queue = queue.Queue()
        self.threads = [
            threading.Thread(target=self._reader, name=f"{name}-reader", daemon=True),
            *(
                threading.Thread(target=self._computer, name=f"{name}-{i}", daemon=True)
                for i in range(self.workers)
            ),
            threading.Thread(target=self._writer, name=f"{name}-writer", daemon=True),
        ]

    def __enter__(self) -> Pipeline:
        try:
            for thread in self.threads:
                thread.start()
        except BaseException as error:  # Ctrl-C between two starts: stop what runs, then re-raise
            self._fail(error)
            self._join()
            raise
        return self

    def __iter__(self):
        for _ in self.items:
            value = self._get(self.done_queue)
            if value is self._END:
                return
            yield value

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._fail(exc)
        interrupted = self._join()
        if exc_type is None and interrupted is not None:
            raise interrupted
        if exc_type is None and self.error is not None:
            raise self.error

    def _join(self) -> BaseException | None:
        # The threads must be gone before the caller removes temporary files and before the process
        # exits (a thread still inside torch at exit aborts it), so a second Ctrl-C or SIGTERM
        # while waiting only makes them stop sooner.
        interrupted = None
        for thread in self.threads:
            while thread.is_alive():
                try:
                    thread.join()
                except KeyboardInterrupt as error:
                    interrupted = interrupted or error
                    self._fail(error)
        return interrupted

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self.stop.set()
        if self.budget is not None:
            self.budget.cancel()  # wake a reader waiting for memory

    def _put(self, q: queue.Queue, value) -> None:
        while not self.stop.is_set():
            try:
                q.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue):
        while True:
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                if self.stop.is_set():
                    if threading.current_thread() is threading.main_thread() and self.error is not None:
                        raise self.error from None
                    return self._END

    def _reader(self) -> None:
        try:
            for item in self.items:
                if self.stop.is_set():
                    return
                if self.budget is not None:
                    self.budget.acquire(self.cost(item))
                self._put(self.read_queue, (item, self.read(item)))
            for _ in range(self.workers):
                self._put(self.read_queue, self._END)
        except BaseException as error:  # handed to the main thread
            self._fail(error)

    def _computer(self) -> None:
        try:
            while True:
                value = self._get(self.read_queue)
                if value is self._END:
                    self._put(self.write_queue, self._END)
                    return
                item, data = value
                result = self.compute(item, data)
                del value, data  # the input may be a large tensor: do not hold it while waiting
                self._put(self.write_queue, (item, result))
        except BaseException as error:
            self._fail(error)

    def _writer(self) -> None:
        try:
            finished = 0
            while finished < self.workers:
                value = self._get(self.write_queue)
                if value is self._END:
                    finished += 1
                    continue
                item, result = value
                if self.write is not None:
                    self.write(item, result)
                    result = None
                if self.budget is not None:
                    self.budget.release(self.cost(item))
                self.done_queue.put(item if self.write is not None else (item, result))
                del value, result
        except BaseException as error:
            self._fail(error)


class Prefetch:
    """read(item) for the first items, in a background thread, while the caller's block runs.

        with Prefetch(items, read, cost=size_of, limit=n) as early:
            slow_thing_without_disk()
        value = early.take(item)  # read in time, or None: the caller reads it itself

    It stops at the first item that would pass `limit` (cost units), when the block ends, and at the
    first error, which it drops: the caller reads that item again and reports the error properly.
    `take` hands each value out once.
    """

    def __init__(
        self, items: Iterable, read: Callable, *, cost: Callable, limit: int, name: str = "prefetch"
    ):
        self.items, self.read, self.cost, self.limit = list(items), read, cost, limit
        self.values: dict = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def __enter__(self) -> Prefetch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        used = 0
        for item in self.items:
            used += self.cost(item)
            if self.stop.is_set() or used > self.limit:
                return
            try:
                value = self.read(item)
            except Exception:
                return
            with self.lock:
                self.values[item] = value

    def take(self, item):
        with self.lock:
            return self.values.pop(item, None)


def ordered_map(function: Callable, items: Iterable, workers: int, name: str = "map") -> Iterator:
    """function(item) for each item on `workers` threads, yielded in the items' order; at most
    `workers` results are computed ahead of the consumer (each may be large: a window's logits)."""
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@contextmanager
def torch_threads(n: int | None):
    """torch on `n` intra-op threads inside the block (None: leave torch's count alone, e.g. on a GPU).

    The commands' own threads are the parallelism; their kernels are small (blocks of a merge, QRs of
    (d, r), r × r SVDs, one matrix's spectrum), and OpenMP workers spinning between tiny parallel
    regions slow a busy machine down many times over (docs/merge.md, docs/extract.md)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def one_blas_thread():
    """numpy's BLAS on one thread inside (linalg.gram's spectra): the callers already run one matrix per core."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
