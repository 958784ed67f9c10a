"""Issue 16: pipeflow on Dask against the same work written by hand the way a Dask user would.

Run as ``python -m benches.dask_bench`` (``--quick`` for a smoke run). One ``LocalCluster`` of 2
worker processes (one thread each, no dashboard) serves every measurement; each contender runs
``ROUNDS`` times, alternating, and the medians are reported.

- **CPU** (~5 ms x 400 items of pure-Python work): ``client.map`` + ``as_completed``, against
  ``Pipeline().stage(spin, workers=2)`` on ``pf.DaskBackend(client)``. Target: within 10%.
- **Tiny** (``x + 1`` x 200k): ``client.submit`` per item with a bounded window (4 tasks a
  worker thread; measured over 3,000 items: the rate is what counts), and hand-made batches of
  10,000 items (``client.map`` over the batches, ``as_completed``), against a pipeflow stage.
  Targets: at least 5x the per-item rate, and within 20% of the batches (boxed: see
  :func:`inc_batch_boxed`).
- **Arrays** (100 arrays of 4 MiB through two stages: make, then double): pipeflow's ``iter()``,
  taking each result and dropping it, against the hand-written chain (``client.map(make)``, then
  ``client.map(double, futures)``, gathered with ``as_completed``) and the naive version that
  brings each intermediate array back to the client. Measured: the client process's peak RSS
  above its level before the run (sampled every 5 ms; the scheduler runs in this process too),
  and the bytes the workers sent (their ``transfer_outgoing_bytes_total``: to each other and to
  the client), against the bytes of the final results. Target: flat memory, and only the
  final results reach the client.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import psutil

import pipeflow as pf

ROUNDS = 3
MIB = 1 << 20


def spin(x: int) -> int:
    """~5 ms of pure-Python work (calibrated once: :data:`SPIN_LOOPS`)."""
    total = 0
    for i in range(SPIN_LOOPS):
        total += i ^ x
    return total


def _calibrate(seconds: float = 0.005) -> int:
    n = 10_000
    while True:
        t0 = time.perf_counter()
        total = 0
        for i in range(n):
            total += i ^ 1
        took = time.perf_counter() - t0
        if took > 0.05:
            return max(1, int(n * seconds / took))
        n *= 2


SPIN_LOOPS = _calibrate()


def inc(x: int) -> int:
    return x + 1


def inc_batch(xs: list[int]) -> list[int]:
    return [x + 1 for x in xs]


def inc_batch_boxed(xs: list[int]) -> tuple[list[int]]:
    """``inc_batch``, its list returned inside a tuple: Dask serializes a task's result that is
    a list of 10,000 ints some 30 times slower than the same list inside a tuple (measured
    here: 0.3 s against 0.01 s), so a Dask user who knows it boxes the list."""
    return ([x + 1 for x in xs],)


def make(i: int) -> np.ndarray:
    return np.full(MIB // 2, float(i))  # 4 MiB of float64


def double(a: np.ndarray) -> np.ndarray:
    return a * 2


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ------------------------------------------------------------------ CPU-heavy


def cpu_hand(client: Any, n: int) -> float:
    from distributed import as_completed

    def run() -> None:
        futures = client.map(spin, range(n), pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        out: dict[int, int] = {}
        for future, result in as_completed(futures, with_results=True):
            out[index[future.key]] = result
        assert len(out) == n and [out[i] for i in range(3)] == [spin(i) for i in range(3)]

    return _timed(run)


def cpu_pipeflow(backend: pf.DaskBackend, n: int) -> float:
    def run() -> None:
        out = pf.Pipeline().stage(spin, workers=2).run(range(n), backend=backend)
        assert len(out) == n and out[:3] == [spin(i) for i in range(3)]

    return _timed(run)


# ------------------------------------------------------------------ tiny items


def tiny_hand_per_item(client: Any, n: int, window: int) -> float:
    from distributed import as_completed

    def run() -> None:
        items = iter(range(n))
        results: dict[int, int] = {}
        ac = as_completed()
        keys: dict[str, int] = {}
        for i in range(window):
            future = client.submit(inc, next(items), pure=False)
            keys[future.key] = i
            ac.add(future)
        nxt = window
        for future in ac:
            results[keys.pop(future.key)] = future.result()
            if nxt < n:
                new = client.submit(inc, next(items), pure=False)
                keys[new.key] = nxt
                ac.add(new)
                nxt += 1
        assert [results[i] for i in range(n)] == list(range(1, n + 1))

    return _timed(run)


def tiny_hand_batches(client: Any, n: int, size: int, boxed: bool) -> float:
    from distributed import as_completed

    def run() -> None:
        batches = [list(range(i, min(i + size, n))) for i in range(0, n, size)]
        futures = client.map(inc_batch_boxed if boxed else inc_batch, batches, pure=False)
        index = {f.key: i for i, f in enumerate(futures)}
        got: dict[int, list[int]] = {}
        for future, result in as_completed(futures, with_results=True):
            got[index[future.key]] = result[0] if boxed else result
        assert [x for i in range(len(batches)) for x in got[i]] == list(range(1, n + 1))

    return _timed(run)


def tiny_pipeflow(backend: pf.DaskBackend, n: int) -> float:
    def run() -> None:
        out = pf.Pipeline().stage(inc, workers=2).run(range(n), backend=backend)
        assert out == list(range(1, n + 1))

    return _timed(run)


# ------------------------------------------------------------------ arrays


class _Peak:
    """The process's peak RSS above its level at the start, sampled every 5 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> _Peak:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def above(self) -> int:
        return self.peak - self.base


def _sent_by_workers(client: Any) -> int:
    def sent(dask_worker: Any) -> int:
        return int(dask_worker.transfer_outgoing_bytes_total)

    return sum(client.run(sent).values())


def arrays_run(client: Any, how: str, n: int, backend: pf.DaskBackend) -> tuple[float, int, int]:
    """One run of the array workload: seconds, peak client RSS growth, bytes workers sent."""
    from distributed import as_completed

    def check(i: int, a: np.ndarray) -> None:
        assert a.nbytes == 4 * MIB and a[0] == 2.0 * i and a[-1] == 2.0 * i

    def pipeflow_run() -> None:
        p = pf.Pipeline().stage(make, workers=2).stage(double, workers=2)
        for i, a in enumerate(p.iter(range(n), backend=backend)):
            check(i, a)
            del a

    def hand_run() -> None:
        made = client.map(make, range(n), pure=False)
        doubled = client.map(double, made, pure=False)
        del made
        index = {f.key: i for i, f in enumerate(doubled)}
        for future in as_completed(doubled):
            check(index[future.key], future.result())
            future.release()

    def naive_run() -> None:
        for i in range(n):
            a = client.submit(make, i, pure=False).result()
            check(i, client.submit(double, a, pure=False).result())

    run = {"pipeflow": pipeflow_run, "hand": hand_run, "naive": naive_run}[how]
    before = _sent_by_workers(client)
    with _Peak() as peak:
        seconds = _timed(run)
    return seconds, peak.above, _sent_by_workers(client) - before


# ------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, one round")
    args = parser.parse_args()
    from distributed import Client, LocalCluster

    rounds = 1 if args.quick else ROUNDS
    quick = (40, 20_000, 500, 10)
    cpu_n, tiny_n, per_item_n, arrays_n = quick if args.quick else (400, 200_000, 3_000, 100)
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},
        ) as cluster,
        Client(cluster) as client,
    ):
        client.wait_for_workers(2)
        backend = pf.DaskBackend(client)
        client.run(_calibrate)  # warm the workers' imports
        pf.Pipeline().stage(inc).run(range(10), backend=backend)
        print(f"# pipeflow on Dask (issue 16): LocalCluster of 2 worker processes, {rounds} rounds")

        cpu: dict[str, list[float]] = {"hand": [], "pipeflow": []}
        tiny: dict[str, list[float]] = {"per item": [], "lists": [], "batches": [], "pipeflow": []}
        for _ in range(rounds):
            cpu["hand"].append(cpu_hand(client, cpu_n))
            cpu["pipeflow"].append(cpu_pipeflow(backend, cpu_n))
            tiny["per item"].append(tiny_hand_per_item(client, per_item_n, 8) / per_item_n)
            tiny["lists"].append(tiny_hand_batches(client, tiny_n, 10_000, False) / tiny_n)
            tiny["batches"].append(tiny_hand_batches(client, tiny_n, 10_000, True) / tiny_n)
            tiny["pipeflow"].append(tiny_pipeflow(backend, tiny_n) / tiny_n)
        hand, ours = _median(cpu["hand"]), _median(cpu["pipeflow"])
        print(
            f"CPU ~5 ms x {cpu_n}: client.map + as_completed {hand:.3f} s, pipeflow {ours:.3f} s: "
            f"pipeflow at {hand / ours:.2f}x the hand-written speed (target >= 0.90)"
        )
        rate = {k: 1 / _median(v) for k, v in tiny.items()}
        print(
            f"tiny x + 1 x {tiny_n}: per item (window 8) {rate['per item'] / 1e3:.1f} k items/s, "
            f"hand batches of 10,000 returning lists {rate['lists'] / 1e6:.3f} M/s, returning "
            f"them boxed in a tuple {rate['batches'] / 1e6:.2f} M/s, pipeflow "
            f"{rate['pipeflow'] / 1e6:.2f} M/s: {rate['pipeflow'] / rate['per item']:.0f}x per "
            f"item (target >= 5), {rate['pipeflow'] / rate['batches']:.2f}x the batches "
            "(target >= 0.80)"
        )
        final = arrays_n * 4 * MIB
        for how in ("pipeflow", "hand", "naive"):
            runs = [arrays_run(client, how, arrays_n, backend) for _ in range(rounds)]
            seconds = _median([r[0] for r in runs])
            rss = _median([r[1] for r in runs])
            sent = _median([r[2] for r in runs])
            print(
                f"arrays {arrays_n} x 4 MiB, two stages, {how}: {seconds:.2f} s, client peak RSS "
                f"+{rss / MIB:.0f} MiB, workers sent {sent / MIB:.0f} MiB "
                f"({sent / final:.2f}x the final results' {final / MIB:.0f} MiB)"
            )


if __name__ == "__main__":
    main()
