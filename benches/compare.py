"""Side-by-side comparison of pipeflow with its peers, measured in the same run.

Run as ``python -m benches.compare`` (``--quick`` for a fast smoke run with smaller inputs).

For each workload every contender runs once per repetition, round-robin (the order rotates each
repetition), after one untimed warm-up on a tenth of the input; the figure is the median of the
repetitions, with the min-max spread. Every run's result is checked, so a broken contender fails
loudly instead of winning. Each workload prints a Markdown table and pipeflow's ratio to the best
peer (references, such as the serial loop, are shown but are not peers).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pipeflow as pf
from benches import _workloads as w

PIPEFLOW = "pipeflow"


@dataclass
class Contender:
    name: str
    run: Callable[[int], float]  # size -> seconds (it checks its own result)
    reference: bool = False  # shown for context, not a peer
    seconds: list[float] = field(default_factory=list)

    @property
    def is_pipeflow(self) -> bool:
        return self.name.startswith(PIPEFLOW)


@dataclass
class Sizes:
    messages: int
    tiny_items: int
    buffers: int
    reps: int


FULL = Sizes(messages=200_000, tiny_items=200_000, buffers=200, reps=5)
QUICK = Sizes(messages=20_000, tiny_items=20_000, buffers=20, reps=3)


def measure(contenders: Sequence[Contender], size: int, reps: int) -> None:
    """Warms every contender up, then runs them round-robin ``reps`` times."""
    for c in contenders:
        c.run(max(1, size // 10))
    k = len(contenders)
    for rep in range(reps):
        order = [contenders[(rep + i) % k] for i in range(k)]
        for c in order:
            gc.collect()
            c.seconds.append(c.run(size))


def machine() -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    gil = "GIL" if getattr(sys, "_is_gil_enabled", lambda: True)() else "free-threaded"
    return "\n".join(
        [
            "## Machine",
            "",
            f"- cpus: {cpus} (usable by this process: {usable})",
            f"- python: {platform.python_implementation()} {sys.version.split()[0]} ({gil})",
            f"- platform: {platform.platform()} ({platform.machine()})",
            f"- pipeflow: {pf.__version__}",
            f"- load average at start: {load_average()} (other work on the machine skews figures)",
        ]
    )


def load_average() -> str:
    """The 1-minute load average, or "n/a" where the OS has none."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "n/a"


def _rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.1f}"


def rate_table(
    title: str, unit: str, work: int, contenders: Sequence[Contender], target: tuple[str, float]
) -> str:
    """A table of rates (``work`` units per run / seconds); higher is better."""
    pipeflow = next(c for c in contenders if c.is_pipeflow)
    pf_rate = work / statistics.median(pipeflow.seconds)
    lines = [
        f"## {title}",
        "",
        f"| contender | {unit} (median) | min - max | pipeflow / contender |",
        "|---|---:|---:|---:|",
    ]
    rates = {}
    for c in contenders:
        med = work / statistics.median(c.seconds)
        rates[c.name] = med
        lo, hi = work / max(c.seconds), work / min(c.seconds)
        name = f"{c.name} (reference)" if c.reference else c.name
        ratio = "-" if c.is_pipeflow else f"{pf_rate / med:.2f}x"
        lines.append(f"| {name} | {_rate(med)} | {_rate(lo)} - {_rate(hi)} | {ratio} |")
    peers = [c for c in contenders if not c.is_pipeflow and not c.reference]
    best = max(peers, key=lambda c: rates[c.name])
    lines += ["", f"pipeflow vs best peer ({best.name}): **{pf_rate / rates[best.name]:.2f}x**"]
    target_name, target_ratio = target
    got = pf_rate / rates[target_name]
    verdict = "met" if got >= target_ratio else "MISSED"
    lines.append(f"target: pipeflow >= {target_ratio:g}x {target_name}: {got:.2f}x ({verdict})")
    return "\n".join(lines)


def speedup_table(
    title: str, mib: int, serial: Contender, contenders: Sequence[Contender], target: float
) -> str:
    """A table of speedups over the serial contender (same run); higher is better."""
    serial_med = statistics.median(serial.seconds)
    pipeflow = next(c for c in contenders if c.is_pipeflow)
    pf_speedup = serial_med / statistics.median(pipeflow.seconds)
    lines = [
        f"## {title}",
        "",
        "| contender | seconds (median) | min - max | MiB/s | speedup over serial |",
        "|---|---:|---:|---:|---:|",
    ]
    speedups = {}
    for c in [serial, *contenders]:
        med = statistics.median(c.seconds)
        speedups[c.name] = serial_med / med
        lines.append(
            f"| {c.name} | {med:.4f} | {min(c.seconds):.4f} - {max(c.seconds):.4f} "
            f"| {mib / med:,.0f} | {serial_med / med:.2f}x |"
        )
    peers = [c for c in contenders if not c.is_pipeflow]
    best = max(peers, key=lambda c: speedups[c.name])
    lines += [
        "",
        f"pipeflow vs best peer ({best.name}): **{pf_speedup / speedups[best.name]:.2f}x**",
    ]
    verdict = "met" if pf_speedup >= target else "MISSED"
    lines.append(f"target: pipeflow >= {target:g}x serial: {pf_speedup:.2f}x ({verdict})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- workloads


def channels(sizes: Sizes, producers: int, consumers: int) -> str:
    contenders = [
        Contender(kind, partial(w.channel_transfer, kind, producers, consumers))
        for kind in w.CHANNEL_KINDS
    ]
    measure(contenders, sizes.messages, sizes.reps)
    tag = "C1" if (producers, consumers) == (1, 1) else "C2"
    title = (
        f"{tag}: channel messages/s, {producers} producer(s) / {consumers} consumer(s), "
        f"{sizes.messages:,} int messages"
    )
    return rate_table(title, "msgs/s", sizes.messages, contenders, ("queue.Queue(1024)", 3.0))


def tiny_items(sizes: Sizes) -> str:
    def contender(name: str, fn: Callable[..., list[Any]], reference: bool = False) -> Contender:
        def run(n: int) -> float:
            items = range(n)
            expected = list(range(1, n + 1))
            return w.timed(lambda: fn(w.inc, items), w.expect(name, expected))

        return Contender(name, run, reference)

    contenders = [
        contender("pipeflow thread stage (2 workers)", w.map_pipeflow),
        contender("ThreadPoolExecutor(2).map", w.map_executor),
        contender(f"ThreadPoolExecutor(2) chunks of {w.CHUNK}", w.map_executor_chunks),
        contender("serial list comprehension", w.map_serial, reference=True),
    ]
    measure(contenders, sizes.tiny_items, sizes.reps)
    title = f"T1: thread stage, tiny items f(x)=x+1, {sizes.tiny_items:,} ints, items/s"
    return rate_table(
        title, "items/s", sizes.tiny_items, contenders, ("ThreadPoolExecutor(2).map", 10.0)
    )


def sha256(sizes: Sizes) -> str:
    bufs = w.sha256_buffers(sizes.buffers)
    expected = [w.sha256_digest(b) for b in bufs]

    def contender(name: str, fn: Callable[..., list[Any]]) -> Contender:
        def run(n: int) -> float:
            return w.timed(lambda: fn(w.sha256_digest, bufs[:n]), w.expect(name, expected[:n]))

        return Contender(name, run)

    serial = contender("serial loop", w.map_serial)
    contenders = [
        contender("pipeflow thread stage (2 workers)", w.map_pipeflow),
        contender("ThreadPoolExecutor(2).map", w.map_executor),
    ]
    measure([serial, *contenders], sizes.buffers, sizes.reps)
    title = f"T2: sha256 over {sizes.buffers} x 1 MiB buffers (releases the GIL), 2 workers"
    return speedup_table(title, sizes.buffers, serial, contenders, 1.8)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.compare", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small inputs: a smoke run")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (at least 3)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.reps is not None:
        if args.reps < 3:
            parser.error("--reps must be at least 3")
        sizes.reps = args.reps
    print(f"# pipeflow comparison{' (--quick)' if args.quick else ''}\n")
    print(machine())
    print(
        f"\nMedian of {sizes.reps} repetitions per contender, round-robin, in this run. "
        "Higher is better.\n",
        flush=True,
    )
    for section in (
        lambda: channels(sizes, 1, 1),
        lambda: channels(sizes, 4, 4),
        lambda: tiny_items(sizes),
        lambda: sha256(sizes),
    ):
        print(section(), end="\n\n", flush=True)
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
