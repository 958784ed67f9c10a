"""W1 and W2 (issue 3): process stages against every peer, tiny items and CPU-heavy items.

Run as ``python -m benches.processes`` (``--quick`` for a smoke run). Every contender in the same
run, round-robin, median of 3, 2 workers; every result is checked. The peers and the harness are
in ``benches.peers``.

Each pool is measured twice where it matters: cold (``with Pool(2) as pool: pool.map(...)`` per
run, start-up and shutdown in the clock, as a user writes it) and warm (the pool made once, before
the clock). pipeflow's own default is warm from the second run on (its idle workers wait for the
next run), so "pipeflow (defaults)" is measured both ways too: cold after
``pipeflow._process.shutdown_idle()``, warm as a repeated ``run`` finds it.

W2's speedups are paired: each measurement is bracketed by two serial pace runs of a tenth of the
items, and the figures are medians of the ratios (see ``peers.compare``), because this machine's
speed drifts by a third from one minute to the next.
"""

from __future__ import annotations

import argparse
import sys

from benches.peers import (
    ROUNDS,
    WORKERS,
    Ceiling,
    Executor,
    Joblib,
    Loky,
    Mpire,
    MpPool,
    Pebble,
    Pipeflow,
    Pypeln,
    Row,
    Serial,
    best_peer,
    compare,
    inc,
    markdown_table,
    measured,
    pipeflow_figures,
    rate,
    rows,
    spin,
    versus,
)

__all__ = ["inc", "main", "spin"]

TUNED = 1000  # the chunk size a user would pick for tiny items


def w1_rows(slow: int) -> list[Row]:
    """Every peer at its defaults and at a tuned chunk size, cold; the pools warm as well.
    ``slow``: how much smaller a run the per-item peers get."""
    ours = Pipeflow()
    pool_map, pool_imap = MpPool("map"), MpPool("imap", TUNED)
    ppe, joblib, loky = Executor(TUNED), Joblib(), Loky(TUNED)
    mpire, pebble = Mpire(), Pebble(TUNED)
    return rows(
        [
            ours,
            pool_map,
            MpPool("map", method="fork"),
            pool_imap,
            Executor(1, slow=slow),
            ppe,
            joblib,
            loky,
            mpire,
            Pypeln(slow=2 * slow),
            Pebble(1, slow=slow),
            pebble,
        ],
        [ours, pool_map, pool_imap, ppe, joblib, loky, mpire, pebble],
    )


def w2_rows(n: int, slow: int) -> list[Row]:
    """Each peer as a user writes it (cold); the pools warm as well, with a chunk size that splits
    ``n`` items into four chunks a worker where the default is one item a task; and the machine's
    ceiling (see ``peers.Ceiling``). ``slow``: how much smaller a run the per-item peers get."""
    chunk = max(1, n // (4 * WORKERS))
    ours, pool_map, mpire = Pipeflow(), MpPool("map"), Mpire()
    return rows(
        [
            Serial(),
            ours,
            pool_map,
            Executor(1, slow=slow),
            mpire,
            Pypeln(slow=slow),
            Pebble(1, slow=slow),
        ],
        [
            Ceiling(),
            ours,
            pool_map,
            Executor(chunk),
            Joblib(),
            Loky(chunk),
            mpire,
            Pebble(chunk),
        ],
    )


def w1(n: int, slow: int, rounds: int) -> None:
    items = list(range(n))
    figures = compare(w1_rows(slow), inc, items, rounds)
    ours = pipeflow_figures(figures)
    markdown_table(
        f"W1 tiny items, f(x)=x+1 over {n:,} ints ({WORKERS} workers, median of {rounds})",
        [
            "contender",
            "pool start-up",
            "items measured",
            "items/s",
            "pipeflow ÷ this (same start-up)",
        ],
        (
            [
                row.label,
                row.start_up,
                measured(n, row.peer),
                rate(v),
                f"{v / ours[row.warm]:.2f}x",
            ]
            for row, v in figures.items()
        ),
    )
    versus(figures, lambda v: f"{rate(v)} items/s")


W2_ROUNDS = 5


def w2(title: str, micros: int, n: int, slow: int, rounds: int) -> None:
    # Each measurement is bracketed by serial pace runs of a tenth of the items (see compare): a
    # speedup is a ratio of paired medians, robust to this machine's drift.
    figures = compare(w2_rows(n, slow), spin, [micros] * n, rounds, paced=max(1, n // 10))
    serial = next(v for row, v in figures.items() if isinstance(row.peer, Serial))
    markdown_table(
        f"W2 CPU-heavy, {title} x {n:,} ({WORKERS} workers, median of {rounds}, each paired "
        f"with serial pace runs; serial {serial * n:.2f} s)",
        ["contender", "pool start-up", "items measured", "items/s", "speedup over serial"],
        (
            [row.label, row.start_up, measured(n, row.peer), rate(v), f"{serial / v:.2f}x"]
            for row, v in figures.items()
        ),
    )
    ours = pipeflow_figures(figures)
    row, best = best_peer(figures)
    ceiling = next(v for row, v in figures.items() if isinstance(row.peer, Ceiling))
    print(
        f"pipeflow speedup: **{serial / ours[True]:.2f}x** warm, {serial / ours[False]:.2f}x cold "
        f"(target 1.9x); best peer {row.label}: {serial / best:.2f}x; pipeflow (warm) vs best "
        f"peer: **{best / ours[True]:.2f}x**; the machine's ceiling in this run (one chunk a "
        f"worker): {serial / ceiling:.2f}x, pipeflow (warm) at **{ceiling / ours[True]:.2f}** of "
        f"it, the best peer at {ceiling / best:.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.processes")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1/10 of the items, once")
    args = parser.parse_args(argv)
    scale, rounds = (10, 1) if args.quick else (1, ROUNDS)
    print(
        f"# Process stages vs peers (W1, W2): {WORKERS} workers, every contender in the same run, "
        f"round-robin, median of {rounds}, results checked"
    )
    w1(200_000 // scale, 20, rounds)
    # ~100 us items: the figure most at the mercy of the machine's drift, so more rounds.
    w2("~100 us items", 100, 20_000 // scale, 4, 1 if args.quick else W2_ROUNDS)
    w2("~5 ms items", 5000, 400 // scale, 1, rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
