"""W6 (issue 3): faults. A worker that dies, and a stage function that raises.

Run as ``python -m benches.faults`` (``--quick`` for a smoke run). Every measurement runs in a
fresh interpreter in its own process group (``python -m benches.faults --one NAME --case CASE``):
it opens the contender's pool and warms it up on a few items (so start-up is not in the clock),
then maps the faulty function over the items. A contender that has not answered 5 s later is
reported as hanging, and its whole process group is killed. A contender that hangs is not run
again; the others are run 3 times, round-robin, medians reported.

- (a) ``exit``: over 100 items (~1 ms each), item 10 calls ``os._exit(1)``: the time until the
  caller gets an error, whether it names item 10, the results delivered; ``exit-once`` crashes only
  on its first attempt (a marker file), so pipeflow with ``retries=1`` must deliver all 100.
- (b) ``raise``: over 1000 items (~1 ms each), item 5 raises ``ValueError``: the time to re-raise,
  how many items ran in all (each call appends a byte to a file, O_APPEND; counted after the pool
  is closed, the way its ``with`` block closes it), whether the worker's traceback came back.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from benches.peers import (
    ROUNDS,
    WORKERS,
    Executor,
    Joblib,
    Loky,
    Mpire,
    MpPool,
    Pebble,
    Peer,
    Pipeflow,
    Pypeln,
    by_name,
    check,
    child_report,
    child_started,
    inc,
    isolated,
    markdown_table,
    ms,
)

HANG_AFTER = 5.0
TALLY = "PIPEFLOW_BENCH_FAULTS_DIR"  # the child's temp dir, inherited by its workers

# ------------------------------------------------------------------ the faulty functions


def _tally() -> str:
    """Counts a call (one byte appended to a file) and returns the directory."""
    folder = os.environ[TALLY]
    fd = os.open(os.path.join(folder, "calls"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    return folder


def exit_at_10(x: int) -> int:
    _tally()
    time.sleep(0.001)
    if x == 10:
        os._exit(1)
    return x


def exit_once_at_10(x: int) -> int:
    folder = _tally()
    time.sleep(0.001)
    if x == 10:
        try:
            os.close(os.open(os.path.join(folder, "crashed"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return x  # the second attempt
        os._exit(1)
    return x


def raise_at_5(x: int) -> int:
    _tally()
    time.sleep(0.001)
    if x == 5:
        raise ValueError("a bad item")  # no number: whether the item is named is pipeflow's note
    return x


# name: (function, items, the failing item)
CASES: dict[str, tuple[Callable[[int], int], int, int]] = {
    "exit": (exit_at_10, 100, 10),
    "exit-once": (exit_once_at_10, 100, 10),
    "raise": (raise_at_5, 1000, 5),
}

PEERS = by_name(
    [
        Pipeflow(),
        Pipeflow(retries=1),
        MpPool("map"),
        MpPool("imap"),
        MpPool("map", method="fork"),
        Executor(1),
        Joblib(),
        Loky(1),
        Mpire(),
        Pypeln(),
        Pebble(1),
    ]
)
P0, P1 = Pipeflow().name, Pipeflow(retries=1).name
CRASH_ROWS = [(P0, "exit"), (P1, "exit"), (P1, "exit-once")] + [
    (name, "exit") for name in PEERS if not name.startswith("pipeflow")
]
RAISE_ROWS = [(name, "raise") for name in PEERS if name != P1]
CRASH_COLUMNS = ["outcome", "t_error", "names", "delivered", "ran"]
RAISE_COLUMNS = ["outcome", "t_error", "ran", "traceback", "names"]

# ------------------------------------------------------------------ the child


def _collect(peer: Peer, pool: Any, case: str) -> dict[str, Any]:
    """Maps the case's function over its items the way a user maps a list with this peer; after
    an error, goes on only through an iterator that goes on (pebble's)."""
    f, n, bad = CASES[case]
    delivered, error, t_error = 0, None, None
    t0 = time.perf_counter()
    try:
        results: Iterator[Any] = iter(peer.map(pool, f, list(range(n))))
        while True:
            try:
                next(results)
            except StopIteration:
                break
            except Exception as e:
                if error is None:
                    error, t_error = e, time.perf_counter() - t0
                if not isinstance(peer, Pebble):
                    break
            else:
                delivered += 1
    except Exception as e:  # an eager map raises here
        error, t_error = e, time.perf_counter() - t0
    report: dict[str, Any] = {"delivered": delivered, "t_error": t_error, "error": None}
    if error is not None:
        text = str(error) + "".join(f"\n{note}" for note in getattr(error, "__notes__", ()))
        full = "".join(traceback.format_exception(error)) + str(getattr(error, "traceback", ""))
        full = re.sub(r"\x1b\[[0-9;]*m", "", full)  # mpire colours the worker's traceback
        report.update(
            error=type(error).__name__,
            message=" ".join(text.split())[:200],
            names_item=re.search(rf"\b(item|index|position)\W{{0,3}}{bad}\b", text) is not None,
            remote_tb=re.search(rf"line \d+, in {f.__name__}\b", full) is not None,
        )
    return report


def one(name: str, case: str) -> None:
    """The child: one contender, one case; ``TALLY`` names the directory the calls are counted
    in (the parent's, so it can count them even when this process is killed)."""
    peer = PEERS[name]
    pool = peer.open()
    check(name, list(peer.map(pool, inc, list(range(8)))), list(range(1, 9)), peer.ordered)
    child_started()
    report = _collect(peer, pool, case)
    child_report(report)  # the parent keeps it if closing the pool then hangs
    peer.close(pool)
    peer.reset()


# ------------------------------------------------------------------ the parent

Key = tuple[str, str]  # (contender, case)


def _measure(key: Key) -> dict[str, Any]:
    """One run of a contender in a child process: its report, plus ``hung`` and ``ran``."""
    with tempfile.TemporaryDirectory() as folder:
        args = ["--one", key[0], "--case", key[1]]
        outcome = isolated("benches.faults", args, HANG_AFTER, env={TALLY: folder})
        calls = os.path.join(folder, "calls")
        ran = os.path.getsize(calls) if os.path.exists(calls) else 0
    if outcome.result is None and not outcome.hung:
        raise RuntimeError(f"{key}: the child failed:\n{''.join(outcome.stderr)}")
    if outcome.strays:
        raise RuntimeError(f"{key}: {outcome.strays} processes outlived the child")
    return {**(outcome.result or {}), "hung": outcome.hung, "ran": ran}


def _cells(runs: list[dict[str, Any]], n: int) -> dict[str, str]:
    """The table cells of one contender's runs (medians; yes/no/sometimes for the checks)."""

    def median(key: str, fmt: Callable[[float], str]) -> str:
        values = [r[key] for r in runs if r.get(key) is not None]
        return fmt(statistics.median(values)) if values else "-"

    def yes(key: str) -> str:
        seen = [bool(r.get(key)) for r in runs]
        return "yes" if all(seen) else "no" if not any(seen) else "sometimes"

    last = runs[-1]
    if last.get("error") is None:
        got = last.get("delivered", 0)
        outcome = f"**hangs** (killed after {HANG_AFTER:.0f} s)" if last["hung"] else "no error"
        outcome += f", {got} of {n} results" if got else ""
    else:
        outcome = f"{last['error']}: {last['message'][:100]}".replace("|", "\\|")
        if last["hung"]:
            outcome += f"; then closing the pool **hangs** (killed after {HANG_AFTER:.0f} s)"
    return {
        "outcome": outcome,
        "t_error": median("t_error", ms),
        "names": yes("names_item") if last.get("error") else "-",
        "traceback": yes("remote_tb") if last.get("error") else "-",
        "delivered": median("delivered", lambda v: f"{v:.0f}"),
        "ran": median("ran", lambda v: f"{v:.0f}"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benches.faults")
    parser.add_argument("--quick", action="store_true", help="each contender once, not 3 times")
    parser.add_argument("--one", choices=list(PEERS), help="(the child) run this contender")
    parser.add_argument("--case", choices=list(CASES), default="exit")
    args = parser.parse_args(argv)
    if args.one:
        one(args.one, args.case)
        return 0
    rounds = 1 if args.quick else ROUNDS
    keys = CRASH_ROWS + RAISE_ROWS
    runs: dict[Key, list[dict[str, Any]]] = {key: [] for key in keys}
    for _ in range(rounds):
        for key in keys:
            if not any(r["hung"] for r in runs[key]):  # a hang is not run again
                runs[key].append(_measure(key))
    print(
        f"# Faults (W6): {WORKERS} workers, pools warmed up before the clock, a fresh interpreter "
        f"per run, median of {rounds} (a contender that hangs: once)"
    )
    cells = {key: _cells(rs, CASES[key[1]][1]) for key, rs in runs.items()}
    markdown_table(
        "W6a item 10 of 100 calls os._exit(1) (items ~1 ms)",
        ["contender", "function", "outcome", "time to error", "names item 10", "results", "calls"],
        (
            [name, CASES[case][0].__name__] + [cells[name, case][k] for k in CRASH_COLUMNS]
            for name, case in CRASH_ROWS
        ),
        left=3,
    )
    markdown_table(
        "W6b item 5 of 1000 raises ValueError (items ~1 ms)",
        ["contender", "outcome", "time to re-raise", "calls in all", "remote traceback", "names 5"],
        ([name] + [cells[name, case][k] for k in RAISE_COLUMNS] for name, case in RAISE_ROWS),
    )
    crash, retried, raised = cells[P0, "exit"], cells[P1, "exit-once"], cells[P0, "raise"]
    print(
        f"pipeflow: a dead worker reported in {crash['t_error']} (names item 10: {crash['names']}; "
        f"target 0.2 s); with retries=1 and a crash on the first attempt only, "
        f"{retried['delivered']} of 100 results; a raise re-raised in {raised['t_error']} "
        f"(target 50 ms), {raised['ran']} calls of 1000 in all"
    )
    return 0


if __name__ == "__main__":
    from benches import faults  # the importable module, so its functions pickle by reference

    sys.exit(faults.main())
