"""The project's one concurrency helper: a read → compute → write thread pipeline under a byte budget.

    with Pipeline(items, read, compute, write, workers=2, cost=size_of, limit=2 * largest) as run:
        for item in run:          # each item once written, in completion order
            report(item)

One reader thread calls read(item) in the items' order (after reserving cost(item) bytes of the
budget), `workers` threads call compute(item, value), one writer thread calls write(item, result)
and then frees the item's bytes. Disk reads, arithmetic and writes overlap because file I/O and torch
release the GIL. The budget bounds what is in flight (an item larger than the limit still runs, alone).
Leaving the block waits for every thread; the first error of any thread stops the others and is
raised in the caller, and so is a Ctrl-C. `one_torch_thread()` keeps torch's own pool out of the way
of these threads (small memory-bound blocks: see docs/merge.md for the measurement).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
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
    in a writer thread (write=None: the computed result is what iteration yields, with its item)."""

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
        name: str = "pipeline",
    ):
        self.items = list(items)
        self.read, self.compute, self.write = read, compute, write
        self.workers = max(1, workers)
        self.cost = cost
        self.budget = Budget(limit) if cost is not None and limit is not None else None
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.read_queue: queue.Queue = queue.Queue(maxsize=self.workers)
        self.write_queue: queue.Queue = queue.Queue(maxsize=self.workers)
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


@contextmanager
def one_torch_thread():
    """torch on one thread inside the block: the pipeline's threads are the parallelism, and OpenMP
    workers spinning between tiny parallel regions slow a busy machine down (docs/merge.md)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
