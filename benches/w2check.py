"""W2 ~100 us items, two checks that do not depend on this machine's speed holding still.

Run as ``python -m benches.w2check`` (``--quick`` for a smoke run). On a shared VM the same
``spin(100)`` can take 190 or 340 us from one second to the next, so a speedup over a serial run
measured a few seconds apart moves by more than the gap between contenders. These two checks are
robust to that:

- **Alternation.** pipeflow and ``Pool.map`` (forkserver, default chunks), both warm, run the same
  items one right after the other, several times; each pair gives a ratio, and their median is
  printed with their spread.
- **Utilization.** Over one pipeflow run, the CPU time of its worker processes (read from
  ``/proc`` through psutil, before and after) over ``workers x wall time``: the share of the run
  the workers spent working. The speedup pipeflow gives over one of its own workers is that share
  times the number of workers; what is lost is the parent's per-batch work, the ramp and the tail.
  The parent's own CPU time over the run is printed too (it shares the cores with the workers).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time

import psutil

import pipeflow as pf
from benches.peers import WORKERS, spin
from pipeflow import _process, _zygote


def _workers() -> list[psutil.Process]:
    """pipeflow's worker processes: the fork server's children (or this process's, with
    ``PIPEFLOW_START_METHOD=spawn``)."""
    server = _zygote.server_pid()
    parent = psutil.Process(server) if server is not None else psutil.Process()
    return [p for p in parent.children() if p.pid != server]


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        t = p.cpu_times()
        total += t.user + t.system
    return total


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.w2check")
    parser.add_argument("--quick", action="store_true", help="2,000 items, two pairs")
    args = parser.parse_args(argv)
    n, pairs = (2_000, 2) if args.quick else (20_000, 5)
    items = [100] * n
    pipeline = pf.Pipeline().stage(spin, workers=WORKERS)
    _process.shutdown_idle()
    assert pipeline.run(items[:1000]) == [spin(x) for x in items[:1000]]  # warm workers
    print(f"# W2 checks: spin(100) x {n:,}, {WORKERS} workers\n")

    workers = _workers()
    cpu0, own0, t0 = _cpu(workers), _own_cpu(), time.perf_counter()
    out = pipeline.run(items)
    wall = time.perf_counter() - t0
    cpu, own = _cpu(workers) - cpu0, _own_cpu() - own0
    assert out == [spin(x) for x in items[:1]] * n
    print(
        f"Utilization: pipeflow's workers were busy **{cpu / (WORKERS * wall):.1%}** of "
        f"{WORKERS} x {wall:.2f} s (so {WORKERS * cpu / (WORKERS * wall):.2f}x one worker's "
        f"speed); the parent used {own / wall:.1%} of a core.\n"
    )

    ratios = []
    with mp.get_context("forkserver").Pool(WORKERS) as pool:
        pool.map(spin, items[:1000])
        for i in range(pairs):
            t0 = time.perf_counter()
            ours = pipeline.run(items)
            a = time.perf_counter() - t0
            t0 = time.perf_counter()
            theirs = pool.map(spin, items)
            b = time.perf_counter() - t0
            assert ours == theirs
            ratios.append(b / a)
            print(f"- pair {i + 1}: pipeflow {a:.2f} s, Pool.map {b:.2f} s: {b / a:.2f}x")
    print(
        f"\nAlternation: pipeflow vs `Pool.map` (forkserver, default chunks), both warm: median "
        f"**{statistics.median(ratios):.2f}x** over {pairs} pairs "
        f"(from {min(ratios):.2f}x to {max(ratios):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
