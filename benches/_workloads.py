"""The workloads shared by the pytest-benchmark suites and ``benches.compare``.

Every function here runs one workload once, checks its result (so a broken contender can't win)
and returns the seconds it took, or its result for the pytest suites to check.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter
from typing import Any

import pipeflow as pf

CAPACITY = 1024
CHUNK = 1000
MIB = 1 << 20


class DequeQueue:
    """A bounded FIFO from a ``collections.deque`` and two conditions on one lock.

    The minimal hand-written alternative to ``queue.Queue``: no ``task_done``/``join``
    bookkeeping, no timeouts.
    """

    def __init__(self, maxsize: int) -> None:
        self._items: deque[Any] = deque()
        self._maxsize = maxsize
        lock = threading.Lock()
        self._not_empty = threading.Condition(lock)
        self._not_full = threading.Condition(lock)

    def put(self, item: Any) -> None:
        with self._not_full:
            while len(self._items) >= self._maxsize:
                self._not_full.wait()
            self._items.append(item)
            self._not_empty.notify()

    def get(self) -> Any:
        with self._not_empty:
            while not self._items:
                self._not_empty.wait()
            item = self._items.popleft()
            self._not_full.notify()
            return item


# ----------------------------------------------------------------------------- channels

# How each contender makes its queue; pipeflow ends with close(), the others with a sentinel
# (None) per consumer.
CHANNEL_KINDS: dict[str, Callable[[], Any]] = {
    "pipeflow.Channel(1024)": lambda: pf.Channel(CAPACITY),
    "queue.Queue(1024)": lambda: queue.Queue(maxsize=CAPACITY),
    "queue.SimpleQueue (unbounded)": queue.SimpleQueue,
    "deque+Condition(1024)": lambda: DequeQueue(CAPACITY),
}


def _consume_channel(ch: pf.Channel, out: list[int], j: int) -> None:
    total = count = 0
    for x in ch:
        total += x
        count += 1
    out[2 * j], out[2 * j + 1] = total, count


def _consume_sentinel(q: Any, out: list[int], j: int) -> None:
    get = q.get
    total = count = 0
    while True:
        x = get()
        if x is None:
            break
        total += x
        count += 1
    out[2 * j], out[2 * j + 1] = total, count


def channel_transfer(kind: str, producers: int, consumers: int, n: int) -> float:
    """Sends the ints ``0..n-1`` from ``producers`` threads to ``consumers`` threads through a
    ``kind`` queue; returns the seconds from the start signal until every consumer is done."""
    q = CHANNEL_KINDS[kind]()
    is_channel = isinstance(q, pf.Channel)
    put = q.send if is_channel else q.put
    out = [0] * (2 * consumers)
    start = threading.Barrier(producers + consumers + 1)

    def produce(k: int) -> None:
        start.wait()
        for i in range(k, n, producers):
            put(i)

    def consume(j: int) -> None:
        start.wait()
        if is_channel:
            _consume_channel(q, out, j)
        else:
            _consume_sentinel(q, out, j)

    threads_p = [threading.Thread(target=produce, args=(k,)) for k in range(producers)]
    threads_c = [threading.Thread(target=consume, args=(j,)) for j in range(consumers)]
    for t in threads_c + threads_p:
        t.start()
    start.wait()
    t0 = perf_counter()
    for t in threads_p:
        t.join()
    if is_channel:
        q.close()
    else:
        for _ in range(consumers):
            q.put(None)
    for t in threads_c:
        t.join()
    seconds = perf_counter() - t0
    got_sum, got_count = sum(out[0::2]), sum(out[1::2])
    if got_count != n or got_sum != n * (n - 1) // 2:
        raise AssertionError(
            f"{kind} {producers}P/{consumers}C delivered {got_count} messages summing to "
            f"{got_sum}, expected {n} summing to {n * (n - 1) // 2}"
        )
    return seconds


# ----------------------------------------------------------------------------- tiny items


def inc(x: int) -> int:
    return x + 1


def _apply_chunk(fn: Callable[[Any], Any], chunk: Iterable[Any]) -> list[Any]:
    return [fn(x) for x in chunk]


def map_pipeflow(fn: Callable[[Any], Any], items: Any, workers: int = 2) -> list[Any]:
    return pf.Pipeline(kind="thread").stage(fn, workers=workers).run(items)


def map_executor(fn: Callable[[Any], Any], items: Any, workers: int = 2) -> list[Any]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, items))


def map_executor_chunks(
    fn: Callable[[Any], Any], items: Any, workers: int = 2, chunk: int = CHUNK
) -> list[Any]:
    with ThreadPoolExecutor(workers) as ex:
        futures = [
            ex.submit(_apply_chunk, fn, items[i : i + chunk]) for i in range(0, len(items), chunk)
        ]
        return [y for f in futures for y in f.result()]


def map_serial(fn: Callable[[Any], Any], items: Any, workers: int = 1) -> list[Any]:
    return [fn(x) for x in items]


# ----------------------------------------------------------------------------- sha256


def sha256_digest(buf: bytes) -> bytes:
    return hashlib.sha256(buf).digest()


def sha256_buffers(count: int, distinct: int = 4) -> list[bytes]:
    """``count`` 1 MiB buffers, built from ``distinct`` random blocks (shared, not copied)."""
    blocks = [os.urandom(MIB) for _ in range(distinct)]
    return [blocks[i % distinct] for i in range(count)]


def timed(fn: Callable[[], Any], check: Callable[[Any], None]) -> float:
    """Runs ``fn()``, checks its result with ``check``, returns the seconds ``fn`` took."""
    t0 = perf_counter()
    result = fn()
    seconds = perf_counter() - t0
    check(result)
    return seconds


def expect(name: str, expected: list[Any]) -> Callable[[Any], None]:
    """A check that the result equals ``expected`` (reported by length and first mismatch)."""

    def check(result: Any) -> None:
        if result != expected:
            got = list(result) if result is not None else []
            bad = next(
                (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                min(len(got), len(expected)),
            )
            raise AssertionError(
                f"{name}: wrong result ({len(got)} items, expected {len(expected)}; "
                f"first difference at index {bad})"
            )

    return check
