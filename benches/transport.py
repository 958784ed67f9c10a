"""W4 (issue 3, first figure): one process to another, small messages one at a time.

Run as ``python -m benches.transport`` (``--quick`` for a smoke run). A child process sends N
messages (an int packed into 8 bytes, or a 100-byte payload) and the parent receives them, through
the pipeflow shared-memory ring and through the multiprocessing peers and faster-fifo (when the
``bench`` extra is installed), round-robin, median of 3.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import subprocess
import sys
import textwrap
from collections.abc import Callable
from time import perf_counter
from typing import Any

from pipeflow._core import Ring

RING_CHILD = """
    import sys
    from pipeflow._core import Ring
    ring = Ring.open(int(sys.argv[1]))
    n, size = int(sys.argv[2]), int(sys.argv[3])
    push = ring.push
    pad = b"x" * max(0, size - 8)
    for i in range(n):
        push(i.to_bytes(8, "little") + pad)
    ring.close_write()
"""


def _ring(n: int, size: int) -> float:
    ring = Ring(1 << 20)
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(RING_CHILD), str(ring.fd), str(n), str(size)],
        pass_fds=[ring.fd],
    )
    pop = ring.pop
    first = pop(timeout=60)  # the clock starts at the first message: start-up is not transport
    t0 = perf_counter()
    last = first
    for _ in range(n - 1):
        last = pop(timeout=60)
    dt = perf_counter() - t0
    assert int.from_bytes(last[:8], "little") == n - 1
    assert child.wait(timeout=60) == 0
    return dt


def _mp_sender(q: Any, n: int, size: int, method: str) -> None:
    pad = b"x" * max(0, size - 8)
    put = getattr(q, method)
    for i in range(n):
        put(i.to_bytes(8, "little") + pad)


def _mp(make: Callable[[], tuple[Any, Any]], put: str, get: str) -> Callable[[int, int], float]:
    def run(n: int, size: int) -> float:
        tx, rx = make()
        proc = mp.get_context("fork").Process(target=_mp_sender, args=(tx, n, size, put))
        proc.start()
        recv = getattr(rx, get)
        recv()
        t0 = perf_counter()
        last = b""
        for _ in range(n - 1):
            last = recv()
        dt = perf_counter() - t0
        assert int.from_bytes(last[:8], "little") == n - 1
        proc.join(60)
        return dt

    return run


def _queue() -> tuple[Any, Any]:
    q = mp.get_context("fork").Queue(maxsize=1024)
    return q, q


def _simple_queue() -> tuple[Any, Any]:
    q = mp.get_context("fork").SimpleQueue()
    return q, q


def _pipe() -> tuple[Any, Any]:
    rx, tx = mp.get_context("fork").Pipe(duplex=False)
    return tx, rx


def _faster_fifo() -> tuple[Any, Any]:
    from faster_fifo import Queue

    q = Queue(max_size_bytes=1 << 20)
    return q, q


MANY = 100  # messages per put_many / most per get_many


def _ff_many_sender(q: Any, n: int, size: int) -> None:
    pad = b"x" * max(0, size - 8)
    for start in range(0, n, MANY):
        q.put_many([i.to_bytes(8, "little") + pad for i in range(start, min(n, start + MANY))])


def _faster_fifo_many(n: int, size: int) -> float:
    """faster-fifo at its best: messages in lists of ``MANY`` (``put_many``/``get_many``)."""
    q, _ = _faster_fifo()
    proc = mp.get_context("fork").Process(target=_ff_many_sender, args=(q, n, size))
    proc.start()
    got = q.get_many(max_messages_to_get=MANY, timeout=60)
    t0 = perf_counter()
    count = len(got)
    last = got[-1]
    while count < n:
        got = q.get_many(max_messages_to_get=MANY, timeout=60)
        count += len(got)
        last = got[-1]
    dt = perf_counter() - t0
    assert int.from_bytes(last[:8], "little") == n - 1
    proc.join(60)
    return dt * n / (n - MANY)  # the clock missed the first list


CONTENDERS: dict[str, Callable[[int, int], float]] = {
    "pipeflow Ring (shared memory)": _ring,
    "multiprocessing.Queue": _mp(_queue, "put", "get"),
    "multiprocessing.SimpleQueue": _mp(_simple_queue, "put", "get"),
    "multiprocessing.Pipe": _mp(_pipe, "send_bytes", "recv_bytes"),
}
try:
    import faster_fifo  # noqa: F401  (the bench extra)

    CONTENDERS["faster_fifo.Queue (one at a time)"] = _mp(_faster_fifo, "put", "get")
    CONTENDERS[f"faster_fifo.Queue (put_many/get_many of {MANY})"] = _faster_fifo_many
except ImportError:
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.transport")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    n = 50_000 if args.quick else 1_000_000
    for size in (8, 100):
        times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
        for _ in range(3):
            for name, run in CONTENDERS.items():
                times[name].append(run(n, size))
        rates = {name: n / statistics.median(ts) for name, ts in times.items()}
        best_peer = max(v for k, v in rates.items() if not k.startswith("pipeflow"))
        print(f"\n## W4 transport, {n:,} messages of {size} bytes, process to process\n")
        print("| contender | msgs/s (median of 3) | pipeflow / contender |")
        print("|---|---:|---:|")
        ours = rates["pipeflow Ring (shared memory)"]
        for name, rate in rates.items():
            ratio = "-" if name.startswith("pipeflow") else f"{ours / rate:.2f}x"
            print(f"| {name} | {rate / 1e6:.2f} M | {ratio} |")
        print(f"\npipeflow vs best peer: **{ours / best_peer:.2f}x**")
    return 0


if __name__ == "__main__":
    sys.exit(main())
