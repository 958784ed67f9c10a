"""``python -m pipeflow demo``: the main job on built-in data, with its speedup over serial.

``demo`` runs a CPU-heavy pure-Python pipeline on process stages; ``demo-threads`` a
GIL-releasing one (sha256) on thread stages. Each says how much of the machine other programs
used meanwhile (from ``/proc/stat``), since a speedup over serial is only what the cores that
are free can give.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .pipeline import Pipeline

BUFFER = 1 << 20  # 1 MiB: hashlib releases the GIL for buffers this large


def _digest(buf: bytes) -> bytes:
    return hashlib.sha256(buf).digest()


def _leading_zero_bits(digest: bytes) -> int:
    value = int.from_bytes(digest[:4], "big")
    return 32 - value.bit_length()


def _primes_in(span: tuple[int, int]) -> int:
    """Counts the primes in ``[lo, hi)`` by trial division: pure Python, CPU-bound."""
    lo, hi = span
    count = 0
    for n in range(max(lo, 2), hi):
        if n % 2 == 0:
            count += n == 2
            continue
        d = 3
        while d * d <= n:
            if n % d == 0:
                break
            d += 2
        else:
            count += 1
    return count


def _label(count: int) -> str:
    return "many" if count > 145 else "few"


def _busy_cores() -> float | None:
    """The CPU time every process of the machine has used since boot, in core-seconds (None
    where ``/proc/stat`` cannot be read)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _others_busy(run: Callable[[], Any]) -> tuple[Any, float | None]:
    """``run()``'s result, and how many cores other programs kept busy meanwhile, on average:
    the machine's busy time less this process's own (None without ``/proc/stat``). Right for a
    run in this process only (a serial run, a sleep): it cannot see worker processes' time."""
    busy0, cpu0, t0 = _busy_cores(), time.process_time(), time.perf_counter()
    result = run()
    busy1, cpu1, elapsed = _busy_cores(), time.process_time(), time.perf_counter() - t0
    if busy0 is None or busy1 is None or elapsed <= 0:
        return result, None
    return result, max(0.0, (busy1 - busy0 - (cpu1 - cpu0)) / elapsed)


def _describe(pipeline: Pipeline) -> str:
    """``count primes (2 worker processes) -> label (1 worker process)``."""
    steps = []
    for s in pipeline.steps:
        unit = "worker process" if s.kind == "process" else "thread"
        plural = "" if s.workers == 1 else ("es" if s.kind == "process" else "s")
        steps.append(f"{s.name} ({s.workers} {unit}{plural})")
    return " -> ".join(steps)


def _race(
    title: str, serial: Callable[[], list[Any]], pipeline: Pipeline, items: Iterable[Any]
) -> list[Any] | None:
    """Times ``serial()`` against ``pipeline.run(items)``, prints both and the speedup, and
    returns the results (None, after saying so, if they differ).

    What other programs used of the machine, during the serial run and during a short pause
    after the pipeline's, is said when it is much: the speedup is then less than an idle
    machine gives."""
    print(f"pipeflow demo: {title}")
    print(f"  pipeline  {_describe(pipeline)}")
    t0 = time.perf_counter()
    expected, others_serial = _others_busy(serial)
    t_serial = time.perf_counter() - t0
    print(f"  serial    {t_serial:7.3f} s")
    t0 = time.perf_counter()
    got = pipeline.run(items)
    t_parallel = time.perf_counter() - t0
    if got != expected:
        print("pipeflow demo: results differ from the serial run", file=sys.stderr)
        return None
    cores = os.cpu_count() or 1
    print(f"  pipeflow  {t_parallel:7.3f} s  (worker start-up included)")
    print(f"  speedup   {t_serial / t_parallel:7.2f}x on {cores} cores")
    _, others_after = _others_busy(lambda: time.sleep(0.5))
    others = max((o for o in (others_serial, others_after) if o is not None), default=0.0)
    if others >= 0.25:
        print(
            f"  note: other programs kept about {others:.1f} of the {cores} cores busy; on an "
            "idle machine the speedup is higher"
        )
    return got


def demo(n_items: int, workers: int) -> int:
    """Counts primes over ``n_items`` spans of integers through a two-stage process pipeline
    (pure Python under the GIL: only processes scale it), against a serial run."""
    spans = [(1_000_000 + i * 2_000, 1_000_000 + (i + 1) * 2_000) for i in range(n_items)]
    pipeline = (
        Pipeline(kind="process")
        .stage(_primes_in, workers=workers, name="count primes")
        .stage(_label, name="label")
    )
    title = f"counting primes in {n_items} spans of 2,000 integers (pure Python, CPU-bound)"
    labels = _race(title, lambda: [_label(_primes_in(s)) for s in spans], pipeline, spans)
    if labels is None:
        return 1
    print(f"  results identical; spans with many primes: {labels.count('many')}")
    return 0


def demo_threads(n_items: int, workers: int) -> int:
    """Hashes ``n_items`` 1 MiB buffers through a two-stage thread pipeline, vs serially."""
    blocks = [os.urandom(BUFFER) for _ in range(8)]

    def items() -> Iterator[bytes]:
        for i in range(n_items):
            yield blocks[i % len(blocks)] + i.to_bytes(8, "little")

    pipeline = (
        Pipeline(kind="thread")
        .stage(_digest, workers=workers, name="sha256")
        .stage(_leading_zero_bits, name="score")
    )
    title = f"sha256 over {n_items} buffers of 1 MiB (hashlib releases the GIL)"
    scores = _race(
        title, lambda: [_leading_zero_bits(_digest(b)) for b in items()], pipeline, items()
    )
    if scores is None:
        return 1
    print(f"  results identical; most leading zero bits seen: {max(scores, default=0)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeflow")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="a CPU-heavy process pipeline: its speedup over serial")
    d.add_argument("--items", type=int, default=400)
    d.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    t = sub.add_parser("demo-threads", help="a GIL-releasing thread pipeline (sha256)")
    t.add_argument("--items", type=int, default=400)
    t.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args(argv)
    run = demo if args.command == "demo" else demo_threads
    return run(args.items, args.workers)


if __name__ == "__main__":
    sys.exit(main())
