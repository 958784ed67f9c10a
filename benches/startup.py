"""W7 (issue 3): start-up, from creating the pipeline (or pool) to the first result of a trivial f.

Run as ``python -m benches.startup`` (``--quick`` for a smoke run). Cold rows make a new pool in
the clock each time (pipeflow: after ``pipeflow._process.shutdown_idle()``, its workers forked by
its fork server, which stays, as forkserver pools reuse theirs; joblib and loky: after their
reusable executor is shut down); warm rows are a second run in the same process (pipeflow,
joblib, loky) or a pool made before the clock. The clock stops at the first result; the pool is
closed after it. f(x) returns x and its pid, so every first result is checked to come from another
process. Round-robin, median of 5; 2 workers. Spawned workers import this program's ``__main__``
(this module, with pipeflow), as a user's would.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import sys
import time
from typing import Any

from benches.peers import (
    WORKERS,
    Executor,
    Joblib,
    Loky,
    Mpire,
    MpPool,
    Pebble,
    Pipeflow,
    Row,
    compare,
    markdown_table,
    ms,
    pipeflow_figures,
    rows,
    versus,
    whoami,
)

ROUNDS = 5


def w7_rows() -> list[Row]:
    pool_fs, ppe_fs, joblib, loky = MpPool("imap"), Executor(1), Joblib(), Loky(1)
    mpire_fs, pebble_fs, ours = Mpire(), Pebble(1), Pipeflow()
    return rows(
        [
            ours,
            MpPool("imap", method="fork"),
            pool_fs,
            MpPool("imap", method="spawn"),
            Executor(1, method="fork"),
            ppe_fs,
            joblib,
            loky,
            Mpire(method="fork"),
            mpire_fs,
            Pebble(1, method="fork"),
            pebble_fs,
        ],
        [ours, pool_fs, ppe_fs, joblib, loky, mpire_fs, pebble_fs],
    )


def _elsewhere(row: Row, out: list[Any], expected: list[Any]) -> None:
    if [x for x, _ in out] != [x for x, _ in expected] or out[0][1] == os.getpid():
        raise AssertionError(f"{row.label}: {out} (this process is {os.getpid()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.startup")
    parser.add_argument("--quick", action="store_true", help="each contender once")
    args = parser.parse_args(argv)
    rounds = 1 if args.quick else ROUNDS
    t0 = time.perf_counter()
    with mp.get_context("forkserver").Pool(1) as pool:  # starts the server: once per process
        assert pool.apply(whoami, (0,))[1] != os.getpid()
    server = time.perf_counter() - t0
    t0 = time.perf_counter()  # pipeflow's fork server, likewise
    with contextlib.closing(Pipeflow().pipeline([whoami]).iter([0])) as results:
        assert next(results)[1] != os.getpid()
        ours_first = time.perf_counter() - t0
    figures = compare(w7_rows(), whoami, [0], rounds, first=True, verify=_elsewhere)
    markdown_table(
        f"W7 start-up: creating the pipeline or pool to the first result of f(x)=(x, pid) "
        f"({WORKERS} workers, median of {rounds})",
        ["contender", "pool", "first result after"],
        ([row.label, row.start_up, ms(v)] for row, v in figures.items()),
    )
    ours = pipeflow_figures(figures)
    print(
        f"The rows reuse the forkserver's server: the first forkserver pool of this process, "
        f"server start-up included, gave its first result after {ms(server)}. pipeflow's cold "
        f"rows reuse its own fork server likewise: its first run of this process, server "
        f"start-up included, gave its first result after {ms(ours_first)}.  \n"
        f"pipeflow: **{ms(ours[True])}** warm (target 10 ms), **{ms(ours[False])}** cold "
        "(target 70 ms).  "
    )
    versus(figures, ms)
    return 0


if __name__ == "__main__":
    sys.exit(main())
