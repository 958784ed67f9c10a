"""W3 (issue 4): 4 MiB numpy arrays through process stages, GB/s against the memcpy limit.

Run as ``python -m benches.arrays`` (``--quick`` for a smoke run: a tenth of the arrays, once).
2 workers, every contender in the same run, round-robin, median of 3; every result is checked.
The peers and the harness are in ``benches.peers``. An array is 524,288 float64 values (4 MiB);
a GB is 10^9 bytes.

- W3a, arrays out: 200 tasks, task i returning ``np.full(524288, float(i))`` (cheap to make, so
  transport dominates); the caller takes each result as it comes (``imap`` where the peer has one,
  pipeflow's ``.iter``; ``Pool.map`` hands over its whole list at the end), checks its shape,
  dtype and first and last value, and drops it. GB/s delivered to the parent.
- W3b, two process stages, 100 items: stage 1 makes the array, stage 2 doubles it in place and
  returns it, so each array crosses twice (stage to stage, then to the parent); the peers chain a
  pool per stage, the second fed lazily by the first. GB/s delivered to the parent. Chained
  ``Pool.imap``, slow here (about 0.03 GB/s), is measured on half the items (``slow=2``).
- W3c, arrays in: the parent sends 100 distinct arrays (made before the clock) to workers that
  return their size and end values. GB/s sent.

W3b and W3c take 100 items rather than 200 so that the whole run stays within a few minutes on
two cores (the slowest peers deliver about 0.1 GB/s there).

The reference is the physical limit, a memcpy of the same bytes in one process: ``np.copyto``
into a preallocated array, from sources that do not fit the CPU caches (a ring of 128 MiB in W3a
and W3b, the very input arrays in W3c), once per crossing (twice an item in W3b). It is measured
in the same rounds as the peers. Each table is followed by pipeflow's ratio to the best
pipe-based peer (in W3c, joblib is not one: see below) and its fraction of the reference.

The question is transport, not start-up, so every pool is warm: made, and every worker started,
before the first measurement, and the function mapped over ``WARMUP`` items before each run
(joblib and loky keep their reusable executor between runs, pipeflow its warm set). joblib
memory-maps an input array over 1 MB to a file in shared memory (``max_nbytes="1M"``, its
default) instead of pickling it down a pipe. ``multiprocessing.Pool``'s figures moved the most
from run to run (0.02-0.18 GB/s for ``imap``) while the machine was busy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from benches.peers import (
    ROUNDS,
    WARMUP,
    WORKERS,
    Executor,
    Fn,
    Joblib,
    Loky,
    Mpire,
    MpPool,
    Peer,
    Pipeflow,
    Row,
    best_peer,
    markdown_table,
    measured,
    pipeflow_figures,
    rows,
)

SIZE = 1 << 19  # float64 values an array: 4 MiB
NBYTES = SIZE * 8
N = 200  # W3a's tasks, as issue 4 states it
N_MORE = 100  # W3b's items and W3c's inputs: fewer, so that the whole run stays within minutes
QUICK = 10  # --quick: a tenth of each, once
RING = 32  # source arrays of the reference: 128 MiB, four times the L3 cache

Array = NDArray[np.float64]
Verify = Callable[[str, int, Any], None]

# ------------------------------------------------------------------ what the workers run
# Module-level, found by reference by every worker: ``main`` runs from ``benches.arrays`` (see the
# end of this file), so they pickle as ``benches.arrays.make``, not as ``__main__.make``.


def make(i: int) -> Array:
    """Task ``i``'s 4 MiB array: every value ``i``."""
    return np.full(SIZE, float(i))


def twice(a: Array) -> Array:
    """The array doubled in place, and returned: it crosses again."""
    a *= 2
    return a


def ends(a: Array) -> tuple[int, float, float]:
    """A small result for a 4 MiB input: its size and end values."""
    return a.size, float(a[0]), float(a[-1])


# ------------------------------------------------------------------ the peers, as results come


class MpireImap(Mpire):
    """``mpire.WorkerPool(2).imap(f, items, chunk_size=1)``: results as they come, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.name = f"mpire WorkerPool.imap ({self.method}, chunk_size=1)"


class JoblibGenerator(Joblib):
    """``joblib.Parallel(n_jobs=2, return_as="generator")``: results as they come, in order."""

    name = 'joblib.Parallel (loky backend, auto batches, return_as="generator")'


def peers() -> list[Peer]:
    """The contenders of W3a and W3c: each takes results as they come but ``Pool.map``."""
    return [
        Pipeflow(),
        MpPool("imap"),
        MpPool("map"),
        Executor(1),
        Loky(1),
        MpireImap(),
        JoblibGenerator(),
    ]


def chained_peers() -> list[Peer]:
    """The contenders of W3b: those that chain a pool per stage, lazily (``Executor.map`` of the
    second stage submits the first stage's results as they come, then yields). Chained
    ``Pool.imap``, the slowest by far (about 0.03 GB/s), streams half the items."""
    return [Pipeflow(), MpPool("imap", slow=2), Executor(1), MpireImap()]


def _stream(peer: Peer, pools: Sequence[Any], fs: Sequence[Fn], items: Iterable[Any]) -> Any:
    """The results of the stages ``fs`` (a warm pool each in ``pools``) over ``items``."""
    if isinstance(peer, Pipeflow):
        return peer.pipeline(fs).iter(items)
    if isinstance(peer, MpPool) and peer.how == "map":  # eager: the whole list, at the end
        (pool,), (f,) = pools, fs
        return peer.map(pool, f, list(items))
    stream = items
    for pool, f in zip(pools, fs, strict=True):
        stream = peer.imap(pool, f, stream)
    return stream


def _take(label: str, stream: Any, n: int, verify: Verify) -> None:
    """Takes the ``n`` results of ``stream`` one by one, checks each, and drops it."""
    count = 0
    try:
        for k, y in enumerate(stream):
            verify(label, k, y)
            count += 1
    finally:
        getattr(stream, "close", lambda: None)()  # a generator cut short: stop the run
    if count != n:
        raise AssertionError(f"{label}: {count} results, {n} expected")


# ------------------------------------------------------------------ measuring


def measure(
    rows: Sequence[Row],
    fs: Sequence[Fn],
    items: Sequence[Any],
    verify: Verify,
    reference: Callable[[], float],
    rounds: int,
) -> tuple[dict[Row, float], float]:
    """The median seconds an item of each row streaming ``items`` (the first
    ``len(items) // row.peer.slow``) through the stages ``fs``, and of the ``reference`` (the
    seconds of its run over ``len(items)``), round-robin. A warm row's pools are made before the
    clock, and ``WARMUP`` items go through before each run; a cold row makes and closes its pools
    in the clock."""
    pools = {row: [row.peer.open() for _ in fs] for row in rows if row.warm}
    seconds: dict[Row, list[float]] = {row: [] for row in rows}
    ref: list[float] = []

    def warm_up(row: Row) -> None:
        w = items[:WARMUP]
        _take(row.label, _stream(row.peer, pools[row], fs, w), len(w), verify)

    try:
        for row in pools:  # every warm pool started before the first measurement
            warm_up(row)
        for _ in range(rounds):
            ref.append(reference() / len(items))
            for row in rows:
                peer, n = row.peer, len(items) // row.peer.slow
                if row.warm:
                    warm_up(row)
                else:
                    peer.reset()
                t0 = time.perf_counter()
                opened = pools[row] if row.warm else [peer.open() for _ in fs]
                try:
                    _take(row.label, _stream(peer, opened, fs, items[:n]), n, verify)
                finally:
                    if not row.warm:
                        for pool in opened:
                            peer.close(pool)
                seconds[row].append((time.perf_counter() - t0) / n)
    finally:
        for row, opened in pools.items():
            for pool in opened:
                row.peer.close(pool)
        for row in rows:
            row.peer.reset()
    return {row: statistics.median(ts) for row, ts in seconds.items()}, statistics.median(ref)


def copies(sources: Sequence[Array], n: int) -> Callable[[], float]:
    """The reference: the seconds of ``n`` copies of 4 MiB, source after source (round the ring),
    into one preallocated array (its pages already touched)."""
    dst = np.full(SIZE, np.nan)

    def run() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            np.copyto(dst, sources[i % len(sources)])
        seconds = time.perf_counter() - t0
        assert dst[0] == sources[(n - 1) % len(sources)][0]
        return seconds

    return run


def gbs(per_item: float) -> float:
    """GB/s of an array every ``per_item`` seconds."""
    return NBYTES / per_item / 1e9


def report(
    title: str,
    n: int,
    figures: dict[Row, float],
    ref: float,
    reference: str,
    what: str,
    not_pipe: tuple[type[Peer], ...] = (),
) -> None:
    """The table of one workload, then pipeflow against the best pipe-based peer (any peer but
    those of the classes ``not_pipe``), the best peer if it is another, and the reference."""
    limit = gbs(ref)
    markdown_table(
        title,
        [
            "contender",
            "pool start-up",
            "arrays measured",
            f"GB/s {what}",
            "fraction of the np.copyto reference",
        ],
        [["np.copyto reference: " + reference, "-", f"{n:,}", f"{limit:.2f}", "1.00"]]
        + [
            [
                row.label,
                row.start_up,
                measured(n, row.peer),
                f"{gbs(v):.2f}",
                f"{gbs(v) / limit:.3f}",
            ]
            for row, v in figures.items()
        ],
    )
    ours = gbs(pipeflow_figures(figures)[True])
    pipes = {row: v for row, v in figures.items() if not isinstance(row.peer, not_pipe)}
    row, best = best_peer(pipes, warm=True)
    print(
        f"pipeflow vs the best pipe-based peer ({row.label}, {gbs(best):.2f} GB/s): "
        f"**{ours / gbs(best):.2f}x**  "
    )
    other, v = best_peer(figures, warm=True)
    if other != row:
        print(
            f"pipeflow vs the best peer ({other.label}, {gbs(v):.2f} GB/s): {ours / gbs(v):.2f}x  "
        )
    print(
        f"pipeflow vs the np.copyto reference ({limit:.2f} GB/s): **{ours / limit:.3f}** of it "
        "(target: at least 0.5 of it, 10x the pipe-based peers)  "
    )


# ------------------------------------------------------------------ the workloads


def _array_of(factor: float) -> Verify:
    def verify(label: str, k: int, a: Any) -> None:
        if not (
            isinstance(a, np.ndarray)
            and a.shape == (SIZE,)
            and a.dtype == np.float64
            and a[0] == a[-1] == factor * k
        ):
            raise AssertionError(f"{label}: result {k} is not the array of {factor * k}")

    return verify


def _ends(label: str, k: int, y: Any) -> None:
    if tuple(y) != (SIZE, float(k), float(k)):
        raise AssertionError(f"{label}: result {k} is {y!r}")


def w3a(n: int, rounds: int, ring: Sequence[Array]) -> None:
    figures, ref = measure(
        rows([], peers()), [make], list(range(n)), _array_of(1), copies(ring, n), rounds
    )
    report(
        f"W3a arrays out: {n} tasks each returning a 4 MiB float64 array, taken as they come "
        f"({WORKERS} workers, median of {rounds})",
        n,
        figures,
        ref,
        f"{n} copies of 4 MiB, one process",
        "delivered",
    )


def w3b(n: int, rounds: int, ring: Sequence[Array]) -> None:
    figures, ref = measure(
        rows([], chained_peers()),
        [make, twice],
        list(range(n)),
        _array_of(2),
        copies(ring, 2 * n),
        rounds,
    )
    report(
        f"W3b two process stages: make a 4 MiB array, then double it in place and return it "
        f"(each array crosses twice), {n} items ({WORKERS} workers a stage, median of {rounds})",
        n,
        figures,
        ref,
        f"{2 * n} copies of 4 MiB (two an item), one process",
        "delivered",
    )


def w3c(n: int, rounds: int) -> None:
    inputs = [make(i) for i in range(n)]
    figures, ref = measure(rows([], peers()), [ends], inputs, _ends, copies(inputs, n), rounds)
    report(
        f"W3c arrays in: {n} distinct 4 MiB float64 arrays sent to workers that return "
        f"(size, first, last) ({WORKERS} workers, median of {rounds})",
        n,
        figures,
        ref,
        f"the {n} input arrays copied, one process",
        "sent",
        not_pipe=(Joblib,),  # its inputs over 1 MB go through memory-mapped files
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.arrays")
    parser.add_argument("--quick", action="store_true", help=f"1/{QUICK} of the arrays, once")
    args = parser.parse_args(argv)
    scale, rounds = (QUICK, 1) if args.quick else (1, ROUNDS)
    print(
        f"# Large arrays through process stages (W3): {WORKERS} workers, every contender in the "
        f"same run, round-robin, median of {rounds}, results checked; 4 MiB = {NBYTES:,} bytes, "
        "GB = 10^9 bytes"
    )
    ring = [make(i) for i in range(RING)]
    w3a(N // scale, rounds, ring)
    w3b(N_MORE // scale, rounds, ring)
    w3c(N_MORE // scale, rounds)
    return 0


if __name__ == "__main__":
    from benches.arrays import main as run  # the worker functions pickle as benches.arrays.*

    sys.exit(run())
