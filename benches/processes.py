"""W1 and W2 (issue 3, first figures): process stages against the standard library's pools.

Run as ``python -m benches.processes`` (``--quick`` for a smoke run). Every contender in the same
run, round-robin, median of 3, 2 workers; results are checked. Peers from the ``bench`` extra
(joblib, mpire, pebble) join when they are installed.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

import pipeflow as pf

WORKERS = 2


def inc(x: int) -> int:
    return x + 1


def spin(n: int) -> int:
    """About ``n`` microseconds of pure-Python work."""
    total = 0
    for i in range(n * 46):  # ~22 ns an iteration on this machine
        total += i & 7
    return total


def timed(fn: Callable[[], list[int]], expected: list[int]) -> float:
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    assert out == expected, "wrong result"
    return dt


def contenders(f: Callable[[int], int], items: list[int]) -> dict[str, Callable[[], list[int]]]:
    ctx = mp.get_context("forkserver")
    c: dict[str, Callable[[], list[int]]] = {
        "pipeflow stage (defaults)": lambda: pf.Pipeline().stage(f, workers=WORKERS).run(items),
        "multiprocessing.Pool.map (forkserver, default chunks)": lambda: _pool_map(ctx, f, items),
        "ProcessPoolExecutor.map (chunksize=1)": lambda: _ppe(f, items),
    }
    try:
        import joblib

        c["joblib Parallel (loky)"] = lambda: joblib.Parallel(n_jobs=WORKERS)(
            joblib.delayed(f)(x) for x in items
        )
    except ImportError:
        pass
    return c


def _pool_map(ctx: object, f: Callable[[int], int], items: list[int]) -> list[int]:
    with ctx.Pool(WORKERS) as pool:  # type: ignore[attr-defined]
        return list(pool.map(f, items))


def _ppe(f: Callable[[int], int], items: list[int]) -> list[int]:
    with ProcessPoolExecutor(WORKERS, mp_context=mp.get_context("forkserver")) as ex:
        return list(ex.map(f, items))


def table(title: str, f: Callable[[int], int], items: list[int], unit: str) -> None:
    expected = [f(x) for x in items]
    t0 = time.perf_counter()
    [f(x) for x in items]
    serial = time.perf_counter() - t0
    runs = contenders(f, items)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(3):
        for name, run in runs.items():
            times[name].append(timed(run, expected))
    print(f"\n## {title}\n")
    print(f"| contender | {unit} | speedup over serial ({serial:.3f} s) |")
    print("|---|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"| {name} | {len(items) / t:,.0f} items/s | {serial / t:.2f}x |")
    best = min(t for k, t in med.items() if not k.startswith("pipeflow"))
    print(f"\npipeflow vs best peer: **{best / med['pipeflow stage (defaults)']:.2f}x**")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.processes")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    print("2 workers; pipeflow and joblib keep warm workers between runs, the pools start theirs")
    table("W1 tiny items, f(x)=x+1", inc, list(range(200_000 // scale)), "items/s")
    table("W2 CPU-heavy, ~100 us items", spin, [100] * (20_000 // scale), "items/s")
    table("W2 CPU-heavy, ~5 ms items", spin, [5000] * (400 // scale), "items/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
