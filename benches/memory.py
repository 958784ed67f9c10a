"""W5 (issue 3): memory of a long stream through two process stages, consumed one item at a time.

Run as ``python -m benches.memory`` (``--quick`` for a smoke run). A generator of N ints goes
through ``inc`` then ``double``, each stage with 2 workers (a pool per stage for the peers), and
the caller takes the results one by one. Each measurement runs in a fresh interpreter
(``python -m benches.memory --one NAME --n N``), so peaks don't mix: it imports and warms up its
library on a few items, stops the workers that kept, resets its peak RSS (``/proc/self/
clear_refs``), then streams. Reported: the rise of the parent's peak RSS (VmHWM) over its RSS
before the stream, the items/s (worker start-up included, for every contender), and the peak of
the whole process group's summed PSS (parent, workers, servers), sampled every 0.1 s from outside.
Round-robin, median of 3.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator

from benches.peers import (
    ROUNDS,
    WORKERS,
    Executor,
    MpPool,
    Pipeflow,
    Pypeln,
    by_name,
    check,
    child_report,
    child_started,
    double,
    inc,
    isolated,
    markdown_table,
    measured,
    mib,
)

N, QUICK_N = 5_000_000, 200_000
PEERS = by_name(
    [
        Pipeflow(),
        MpPool("imap", 1000),  # two pools, the second's imap fed by the first's (lazy)
        Executor(1000),  # two executors: each map submits its whole input first (eager)
        Pypeln(slow=250),  # ~4,000 items/s: a 250 times shorter stream
    ]
)


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _source(n: int) -> Iterator[int]:
    yield from range(n)


def one(name: str, n: int) -> None:
    """The child: streams ``n`` ints through ``PEERS[name]`` and reports."""
    peer = PEERS[name]
    with peer.pipe([inc, double], _source(10)) as warm_up:  # imports, lazy set-up
        check(name, list(warm_up), [(x + 1) * 2 for x in range(10)], peer.ordered)
    peer.reset()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    before = _status("VmRSS")
    count = total = 0
    in_order = True
    child_started()
    t0 = time.perf_counter()
    with peer.pipe([inc, double], _source(n)) as stream:
        for y in stream:
            count += 1
            total += y
            in_order = in_order and y == 2 * count
    seconds = time.perf_counter() - t0
    peer.reset()
    child_report(
        {
            "seconds": seconds,
            "peak": _status("VmHWM") - before,
            "ok": count == n and total == n * (n + 1) and (in_order or not peer.ordered),
        }
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.memory")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_N:,} items, once")
    parser.add_argument("--one", choices=list(PEERS), help="(the child) measure this contender")
    parser.add_argument("--n", type=int, default=N)
    args = parser.parse_args(argv)
    if args.one:
        one(args.one, args.n)
        return 0
    n, rounds = (QUICK_N, 1) if args.quick else (N, ROUNDS)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in PEERS}
    for _ in range(rounds):
        for name, peer in PEERS.items():
            size = n // peer.slow
            outcome = isolated("benches.memory", ["--one", name, "--n", str(size)], 900, True)
            if outcome.result is None or not outcome.result["ok"] or outcome.strays:
                raise RuntimeError(f"{name}: {outcome}")
            runs[name].append({**outcome.result, "rate": size / outcome.result["seconds"]})
            runs[name][-1]["group"] = outcome.group_peak
    med = {
        name: {k: statistics.median(r[k] for r in rs) for k in ("rate", "peak", "group")}
        for name, rs in runs.items()
    }
    markdown_table(
        f"W5 memory: a generator of {n:,} ints through x+1 then x*2, {WORKERS} workers a stage, "
        f"consumed one by one (median of {rounds}, a fresh interpreter each)",
        ["contender", "items", "items/s", "parent peak RSS rise", "process group peak PSS"],
        (
            [
                name,
                measured(n, PEERS[name]),
                f"{m['rate']:,.0f}",
                mib(m["peak"]),
                f"{m['group'] / (1 << 20):,.0f} MiB",
            ]
            for name, m in med.items()
        ),
    )
    for name, m in med.items():
        size = n // PEERS[name].slow
        if size < n:
            print(
                f"{name} ran {size:,} items: +{m['peak'] / size:,.0f} bytes of parent peak an "
                f"item; where that grows with N (an unbounded queue), {n:,} items would be about "
                f"{mib(m['peak'] / size * n)} (extrapolated, not measured).  "
            )
    ours = med[Pipeflow().name]
    imap = med[MpPool("imap", 1000).name]
    best = max(m["rate"] for name, m in med.items() if name != Pipeflow().name)
    print(
        f"pipeflow: parent peak {mib(ours['peak'])} (target under +20 MiB); "
        f"throughput **{ours['rate'] / imap['rate']:.2f}x** Pool.imap's (target 2x), "
        f"**{ours['rate'] / best:.2f}x** the best peer's"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
