"""W2 ~100 us items, two checks that do not depend on this machine's speed holding still.

Run as ``python -m benches.w2check`` (``--quick`` for a smoke run). On a shared VM the same
``spin(100)`` can take 190 or 340 us from one second to the next, so a speedup over a serial run
measured a few seconds apart moves by more than the gap between contenders. These two checks are
robust to that:

- **Alternation.** pipeflow, ``Pool.map`` (forkserver, default chunks) and the machine's ceiling
  (``Pool.map`` with one chunk a worker: see ``peers.Ceiling``), all warm, run the same items one
  right after the other, in a rotating order, several times; each round gives ratios, and their
  medians are printed with their spread.
- **Utilization.** Over one pipeflow run, the CPU time of its worker processes (read from
  ``/proc`` through psutil, before and after) over ``workers x wall time``: the share of the run
  the workers spent working. The speedup pipeflow gives over one of its own workers is that share
  times the number of workers; what is lost is the parent's per-batch work, the ramp and the tail.
  The parent's own CPU time over the run is printed too (it shares the cores with the workers).
- **Bare hardware.** No library at all: one process loops over all the items, then two processes
  loop over half each, at once (started before the clock, released together, nothing crossing
  between them). The ratio of the two times is the most speedup this VM gives two processes
  in that minute, the ceiling's ceiling.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from typing import Any

import psutil

import pipeflow as pf
from benches.peers import WORKERS, Ceiling, _pace, spin
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


def _loop(n: int, ready: Any, done: Any) -> None:
    """A bare worker: waits at the barrier, runs ``spin(100)`` ``n`` times, reports its time."""
    ready.wait()
    t0 = time.perf_counter()
    for _ in range(n):
        spin(100)
    done.put(time.perf_counter() - t0)


def _bare(ctx: Any, parts: int, n: int) -> float:
    """Wall seconds for ``parts`` processes to loop over ``n / parts`` items each, at once."""
    ready, done = ctx.Barrier(parts + 1), ctx.SimpleQueue()
    procs = [ctx.Process(target=_loop, args=(n // parts, ready, done)) for _ in range(parts)]
    for p in procs:
        p.start()
    ready.wait()  # every process is started and waiting: the clock starts with their release
    t0 = time.perf_counter()
    for _ in procs:
        done.get()
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    return wall


def bare_hardware(n: int, rounds: int) -> list[float]:
    """Speedups of two bare processes over one (see the module docs), one per round."""
    ctx = mp.get_context("forkserver")
    speedups = []
    for i in range(rounds):
        one, two = _bare(ctx, 1, n), _bare(ctx, WORKERS, n)
        speedups.append(one / two)
        print(f"- round {i + 1}: one process {one:.2f} s, two {two:.2f} s: {one / two:.2f}x")
    return speedups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.w2check")
    parser.add_argument("--quick", action="store_true", help="2,000 items, three rounds")
    args = parser.parse_args(argv)
    n, rounds = (2_000, 3) if args.quick else (20_000, 9)
    items = [100] * n
    expected = [spin(100)] * n
    pipeline = pf.Pipeline().stage(spin, workers=WORKERS)
    _process.shutdown_idle()
    assert pipeline.run(items[:1000]) == [spin(x) for x in items[:1000]]  # warm workers
    print(f"# W2 checks: spin(100) x {n:,}, {WORKERS} workers\n")

    workers = _workers()
    cpu0, own0, t0 = _cpu(workers), _own_cpu(), time.perf_counter()
    out = pipeline.run(items)
    wall = time.perf_counter() - t0
    cpu, own = _cpu(workers) - cpu0, _own_cpu() - own0
    assert out == expected
    print(
        f"Utilization: pipeflow's workers were busy **{cpu / (WORKERS * wall):.1%}** of "
        f"{WORKERS} x {wall:.2f} s (so {WORKERS * cpu / (WORKERS * wall):.2f}x one worker's "
        f"speed); the parent used {own / wall:.1%} of a core.\n"
    )

    # Each round runs the three one right after the other, in a rotating order; a serial run of
    # a tenth of the items brackets each round, for the speedups.
    runs: dict[str, list[float]] = {"pipeflow": [], "Pool.map": [], "ceiling": []}
    serial: list[float] = []
    with mp.get_context("forkserver").Pool(WORKERS) as pool:
        pool.map(spin, items[:1000])
        run = {
            "pipeflow": lambda: pipeline.run(items),
            "Pool.map": lambda: pool.map(spin, items),
            "ceiling": lambda: Ceiling().map(pool, spin, items),
        }
        for i in range(rounds):
            order = list(run)[i % 3 :] + list(run)[: i % 3]
            pace = _pace(spin, items[: n // 10])
            for name in order:
                t0 = time.perf_counter()
                out = list(run[name]())
                runs[name].append(time.perf_counter() - t0)
                assert out == expected, name
            serial.append((pace + _pace(spin, items[: n // 10])) / 2 * n)
            print(
                f"- round {i + 1}: "
                + ", ".join(
                    f"{k} {v[-1]:.2f} s ({serial[-1] / v[-1]:.2f}x)" for k, v in runs.items()
                )
            )
    print(f"\nAlternation over {rounds} rounds, all warm (speedup over serial in the same round):")
    for name, times in runs.items():
        speedups = [s / t for s, t in zip(serial, times, strict=True)]
        print(f"- {name}: median speedup {statistics.median(speedups):.2f}x")
    for a, b in (("pipeflow", "Pool.map"), ("pipeflow", "ceiling"), ("Pool.map", "ceiling")):
        ratios = [tb / ta for ta, tb in zip(runs[a], runs[b], strict=True)]
        print(
            f"- {a} vs {b}: median **{statistics.median(ratios):.2f}x** "
            f"(from {min(ratios):.2f}x to {max(ratios):.2f}x)"
        )
    print(f"\nBare hardware, {WORKERS} processes sharing nothing over one, spin(100) x {n:,}:")
    bare = bare_hardware(n, max(3, rounds // 2))
    print(
        f"- median **{statistics.median(bare):.2f}x** (from {min(bare):.2f}x to {max(bare):.2f}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
