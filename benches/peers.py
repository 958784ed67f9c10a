"""The peers of issue 3's side-by-side benchmarks, and the harness that measures every contender.

Each benchmark module (``processes``, ``memory``, ``faults``, ``startup``) builds its rows from
the classes here, so each library is driven one way only:

- a :class:`Peer` opens a pool of ``WORKERS`` processes (``open``), maps a function over items
  with it, eagerly (``map``) or as it comes (``imap``), chains stages (``pipe``) and closes it
  (``close``, what its ``with`` block does); ``reset`` stops the workers a library keeps between
  runs (pipeflow's warm set, joblib's and loky's reusable executors), for a cold start;
- :func:`compare` measures rows round-robin (every contender in the same run, median of
  ``ROUNDS``) and checks every result, so a broken contender cannot win;
- :func:`isolated` runs one measurement in a fresh interpreter in a process group of its own,
  optionally sampling the memory of that group; past its timeout the whole group is killed, and
  any process the group leaves behind is killed and counted.

Start methods: the ``multiprocessing``-based peers (Pool, ProcessPoolExecutor, mpire, pebble) use
"forkserver", the thread-safe method, unless a row says "fork"; joblib and loky start fresh
interpreters their own way; pypeln always uses the default context (fork on Linux); pipeflow
starts fresh interpreters and keeps a warm set of idle workers between runs.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pipeflow as pf

WORKERS = 2
ROUNDS = 3
FORKSERVER = "forkserver"
WARMUP = 4 * WORKERS  # items a warm pool maps before each timed run (every worker starts)

Fn = Callable[[Any], Any]

# ------------------------------------------------------------------ what the workers run
# Module-level functions, so that every start method (fork, forkserver, spawn, loky, pipeflow's
# fresh interpreters) finds them by reference.


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def spin(n: int) -> int:
    """About ``n`` microseconds of pure-Python work."""
    total = 0
    for i in range(n * 46):  # ~22 ns an iteration on this machine
        total += i & 7
    return total


def whoami(x: int) -> tuple[int, int]:
    """``x`` and the pid that ran it: a start-up check that the work left this process."""
    return x, os.getpid()


# ------------------------------------------------------------------ the peers


class Peer:
    """One library driven one way. ``slow`` > 1 marks a per-item peer that is measured on
    ``len(items) // slow`` items (its rate scaled); ``ordered`` is False for a peer that yields
    results as they complete (they are checked sorted)."""

    name = "?"
    ordered = True
    method = ""  # the multiprocessing start method, when the peer uses one

    def __init__(self, *, slow: int = 1) -> None:
        self.slow = slow

    def reset(self) -> None:
        """Stops the workers the library keeps between runs (before a cold start)."""

    def open(self) -> Any:
        """The pool, ready for ``map``/``imap`` (``None`` for a library without one)."""
        return None

    def map(self, pool: Any, f: Fn, items: Sequence[Any]) -> Iterable[Any]:
        """All of ``f`` over ``items``, the way a user maps a list with this library."""
        return self.imap(pool, f, items)

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        """``f`` over ``items``, results as they come (lazily, when the library can)."""
        raise NotImplementedError

    def close(self, pool: Any) -> None:
        """What leaving the pool's ``with`` block does."""

    @contextmanager
    def pipe(self, fs: Sequence[Fn], items: Iterable[Any]) -> Iterator[Iterator[Any]]:
        """The stages ``fs`` one after the other, a pool of ``WORKERS`` each, fed lazily."""
        pools: list[Any] = []
        try:
            stream: Iterable[Any] = items
            for f in fs:
                pools.append(self.open())
                stream = self.imap(pools[-1], f, stream)
            yield iter(stream)
        finally:
            for pool in pools:
                self.close(pool)


class Pipeflow(Peer):
    """``pf.Pipeline().stage(f, workers=2).run(items)``; ``imap`` is ``.iter``."""

    def __init__(self, *, slow: int = 1, **stage: Any) -> None:
        super().__init__(slow=slow)
        self.stage = stage
        opts = ", ".join(f"{k}={v!r}" for k, v in stage.items()) or "defaults"
        self.name = f"pipeflow ({opts})"

    def pipeline(self, fs: Sequence[Fn]) -> pf.Pipeline:
        p = pf.Pipeline()
        for f in fs:
            p = p.stage(f, workers=WORKERS, **self.stage)
        return p

    def reset(self) -> None:
        from pipeflow._process import shutdown_idle

        shutdown_idle()

    def map(self, pool: Any, f: Fn, items: Sequence[Any]) -> Iterable[Any]:
        return self.pipeline([f]).run(items)

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        return self.pipeline([f]).iter(items)

    @contextmanager
    def pipe(self, fs: Sequence[Fn], items: Iterable[Any]) -> Iterator[Iterator[Any]]:
        stream = self.pipeline(fs).iter(items)
        try:
            yield stream
        finally:
            getattr(stream, "close", lambda: None)()  # a generator: stop the run


def _chunks(chunksize: int | None) -> str:
    return "default chunks" if chunksize is None else f"chunksize={chunksize}"


class MpPool(Peer):
    """``multiprocessing.Pool``: ``pool.map`` (``how="map"``) or ``pool.imap``; ``imap`` (and
    so ``pipe``) always uses ``pool.imap``, lazy and ordered."""

    def __init__(
        self,
        how: str = "map",
        chunksize: int | None = None,
        method: str = FORKSERVER,
        *,
        slow: int = 1,
    ) -> None:
        super().__init__(slow=slow)
        self.how, self.chunksize, self.method = how, chunksize, method
        self.name = f"multiprocessing.Pool.{how} ({method}, {_chunks(chunksize)})"

    def open(self) -> Any:
        return mp.get_context(self.method).Pool(WORKERS)

    def map(self, pool: Any, f: Fn, items: Sequence[Any]) -> Iterable[Any]:
        if self.how == "map":
            return pool.map(f, items, self.chunksize)  # type: ignore[no-any-return]
        return self.imap(pool, f, items)

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        return pool.imap(f, items, self.chunksize or 1)  # type: ignore[no-any-return]

    def close(self, pool: Any) -> None:
        pool.terminate()  # what `with Pool(...)` does; it joins the workers


class Ceiling(MpPool):
    """The machine's ceiling for items that all cost the same: ``Pool.map`` with one chunk a
    worker, so each process maps its share with no scheduling at all. No library splits such
    items better, so its speedup over serial is the most any contender can show in that run on
    this machine (a reference, not a peer: one slow item would hold up its whole share, and
    nothing comes back before the end)."""

    def __init__(self) -> None:
        super().__init__("map")
        self.name = "ceiling: multiprocessing.Pool.map, one chunk a worker (a reference)"

    def map(self, pool: Any, f: Fn, items: Sequence[Any]) -> Iterable[Any]:
        return pool.map(f, items, -(-len(items) // WORKERS))  # type: ignore[no-any-return]


class Executor(Peer):
    """``concurrent.futures.ProcessPoolExecutor.map``: it submits every chunk at once (eager)."""

    def __init__(self, chunksize: int = 1, method: str = FORKSERVER, *, slow: int = 1) -> None:
        super().__init__(slow=slow)
        self.chunksize, self.method = chunksize, method
        self.name = f"ProcessPoolExecutor.map ({method}, chunksize={chunksize})"

    def open(self) -> Any:
        return ProcessPoolExecutor(WORKERS, mp_context=mp.get_context(self.method))

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        return pool.map(f, items, chunksize=self.chunksize)  # type: ignore[no-any-return]

    def close(self, pool: Any) -> None:
        pool.shutdown(wait=True)


class Joblib(Peer):
    """``joblib.Parallel(n_jobs=2)(delayed(f)(x) for x in items)`` (loky, batch_size="auto");
    joblib keeps its loky workers between calls, like pipeflow."""

    name = "joblib.Parallel (loky backend, auto batches)"

    def reset(self) -> None:
        from joblib.externals.loky import reusable_executor  # type: ignore[import-untyped]

        if reusable_executor._executor is not None:
            reusable_executor._executor.shutdown(wait=True, kill_workers=True)
            reusable_executor._executor = None

    def map(self, pool: Any, f: Fn, items: Sequence[Any]) -> Iterable[Any]:
        import joblib  # type: ignore[import-untyped]

        return joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(f)(x) for x in items)  # type: ignore[no-any-return]

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        import joblib

        parallel = joblib.Parallel(n_jobs=WORKERS, return_as="generator")
        return parallel(joblib.delayed(f)(x) for x in items)  # type: ignore[no-any-return]


class Loky(Peer):
    """``loky.get_reusable_executor(max_workers=2).map(f, items, chunksize=...)``: the executor
    (and its workers) outlive a call."""

    def __init__(self, chunksize: int = 1, *, slow: int = 1) -> None:
        super().__init__(slow=slow)
        self.chunksize = chunksize
        self.name = f"loky reusable executor .map (chunksize={chunksize})"

    def reset(self) -> None:
        from loky import reusable_executor  # type: ignore[import-untyped]

        executor = reusable_executor._executor_storage.executor
        if executor is not None:
            executor.shutdown(wait=True, kill_workers=True)
            reusable_executor._executor_storage.executor = None

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        import loky

        executor = loky.get_reusable_executor(max_workers=WORKERS)  # the current one, or a new one
        return executor.map(f, items, chunksize=self.chunksize)  # type: ignore[no-any-return]


class Mpire(Peer):
    """``mpire.WorkerPool(2).map`` (keep_alive=True, so a warm pool is reused)."""

    def __init__(
        self, chunk_size: int | None = None, method: str = FORKSERVER, *, slow: int = 1
    ) -> None:
        super().__init__(slow=slow)
        self.chunk_size, self.method = chunk_size, method
        self.name = f"mpire WorkerPool.map ({method}, {_chunks(chunk_size)})"

    def open(self) -> Any:
        from mpire.pool import WorkerPool

        return WorkerPool(WORKERS, start_method=self.method, keep_alive=True)

    def map(self, pool: Any, f: Fn, items: Sequence[Any]) -> Iterable[Any]:
        return pool.map(f, items, chunk_size=self.chunk_size)  # type: ignore[no-any-return]

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        return pool.imap(f, items, chunk_size=self.chunk_size or 1)  # type: ignore[no-any-return]

    def close(self, pool: Any) -> None:
        pool.terminate()


class Pypeln(Peer):
    """``pypeln.process.map(f, items, workers=2)``: a process per worker, started per run
    (fork), queues unbounded by default (maxsize=0); results in completion order."""

    name = "pypeln.process.map (fork, unbounded queues)"
    ordered = False
    method = "fork"

    def reset(self) -> None:
        from pypeln.process import utils  # type: ignore[import-untyped]

        if utils.MANAGER is not None:  # the Manager process pypeln starts at its first use
            utils.MANAGER.shutdown()
            utils.MANAGER = None

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        import pypeln  # type: ignore[import-untyped]

        return pypeln.process.map(f, items, workers=WORKERS)  # type: ignore[no-any-return]


class Pebble(Peer):
    """``pebble.ProcessPool(2).map(f, items, chunksize=...).result()``: every chunk is scheduled
    at once; a failed item raises when its result is reached, and the iterator goes on."""

    def __init__(self, chunksize: int = 1, method: str = FORKSERVER, *, slow: int = 1) -> None:
        super().__init__(slow=slow)
        self.chunksize, self.method = chunksize, method
        self.name = f"pebble ProcessPool.map ({method}, chunksize={chunksize})"

    def open(self) -> Any:
        from pebble import ProcessPool

        return ProcessPool(max_workers=WORKERS, context=mp.get_context(self.method))

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        return pool.map(f, items, chunksize=self.chunksize).result()  # type: ignore[no-any-return]

    def close(self, pool: Any) -> None:
        pool.close()  # what `with ProcessPool()` does
        pool.join()


class Serial(Peer):
    """A plain loop in this process: the baseline of a speedup, not a peer to beat."""

    name = "serial (a loop in this process)"

    def imap(self, pool: Any, f: Fn, items: Iterable[Any]) -> Iterable[Any]:
        return [f(x) for x in items]


def by_name(peers: Iterable[Peer]) -> dict[str, Peer]:
    """The peers by name (the names are what a child process is told to run)."""
    out: dict[str, Peer] = {}
    for peer in peers:
        assert peer.name not in out, f"two peers named {peer.name!r}"
        out[peer.name] = peer
    return out


# ------------------------------------------------------------------ measuring in this process


@dataclass(frozen=True)
class Row:
    """A peer measured cold (its pool started, and closed, inside the clock, as a ``with`` block
    per run) or warm (the pool made once before the clock, and the function mapped over the first
    ``WARMUP`` items before each run)."""

    peer: Peer
    warm: bool = False

    @property
    def label(self) -> str:
        return f"{self.peer.name}{' **warm**' if self.warm else ''}"

    @property
    def start_up(self) -> str:
        if isinstance(self.peer, Serial):
            return "-"
        if isinstance(self.peer, Pipeflow):
            return "warm set from the previous run" if self.warm else "in the clock (cold)"
        return "before the clock (warm)" if self.warm else "in the clock (cold)"


def rows(cold: Sequence[Peer], warm: Sequence[Peer]) -> list[Row]:
    """The rows of a table: each of ``cold`` measured cold, then each of ``warm`` warm."""
    return [Row(peer) for peer in cold] + [Row(peer, warm=True) for peer in warm]


def check(label: str, out: list[Any], expected: list[Any], ordered: bool = True) -> None:
    """Raises unless ``out`` is ``expected`` (in any order when not ``ordered``)."""
    if (out if ordered else sorted(out)) != expected:
        raise AssertionError(f"{label}: wrong result ({len(out)} values, {len(expected)} expected)")


def compare(
    rows: Sequence[Row],
    f: Fn,
    items: Sequence[Any],
    rounds: int = ROUNDS,
    *,
    first: bool = False,
    verify: Callable[[Row, list[Any], list[Any]], None] | None = None,
    paced: int = 0,
) -> dict[Row, float]:
    """The median seconds per item of each row mapping ``f`` over ``items``, round-robin. With
    ``first``, the seconds until the first result of ``imap`` (the rest is taken, and a cold pool
    closed, after the clock). Every result is checked: against ``f`` run here, or by ``verify``.

    With ``paced``, each measurement is bracketed by two pace runs, right before and right
    after it: ``f`` over the first ``paced`` items in this process; their mean is the
    measurement's pace. On a machine whose clock speed drifts from minute to minute (this one's:
    the same loop takes 190 to 340 us), the figure is then the median of each measurement's
    ratio to its pace, times the median pace: rows measured minutes apart compare as if measured
    at one speed, and a ratio of two rows is a ratio of paired medians."""
    expected = [f(x) for x in items]
    judge = verify or (lambda row, out, exp: check(row.label, out, exp, row.peer.ordered))
    pools = {row: row.peer.open() for row in rows if row.warm}
    per_item: dict[Row, list[float]] = {row: [] for row in rows}
    paces: list[float] = []
    try:
        for _ in range(rounds):
            for row in rows:
                n = len(items) // row.peer.slow
                if row.warm:  # the same function: mpire, for one, restarts its workers for another
                    w = min(n, WARMUP)
                    judge(row, list(row.peer.map(pools[row], f, items[:w])), expected[:w])
                before = _pace(f, items[:paced]) if paced else 1.0
                seconds, out = _timed(row, pools.get(row), f, items[:n], first)
                pace = (before + _pace(f, items[:paced])) / 2 if paced else 1.0
                per_item[row].append(seconds / (1 if first else n) / pace)
                paces.append(pace)
                judge(row, out, expected[:n])
    finally:
        for row, pool in pools.items():
            row.peer.close(pool)
        for row in rows:
            row.peer.reset()
    scale = statistics.median(paces)
    return {row: statistics.median(ts) * scale for row, ts in per_item.items()}


def _pace(f: Fn, items: Sequence[Any]) -> float:
    """Seconds per item of ``f`` over ``items`` in this process: the machine's speed now."""
    t0 = time.perf_counter()
    for x in items:
        f(x)
    return (time.perf_counter() - t0) / len(items)


def _timed(
    row: Row, pool: Any, f: Fn, items: Sequence[Any], first: bool
) -> tuple[float, list[Any]]:
    """One measurement of ``row`` (its warm ``pool``, or ``None`` to start one in the clock)."""
    peer = row.peer
    if not row.warm:
        peer.reset()
    t0 = time.perf_counter()
    if not row.warm:
        pool = peer.open()
    try:
        if first:
            stream = iter(peer.imap(pool, f, items))
            out = [next(stream)]
            seconds = time.perf_counter() - t0
            out.extend(stream)
        else:
            out = list(peer.map(pool, f, items))
    finally:
        if not row.warm:
            peer.close(pool)
    if not first:
        seconds = time.perf_counter() - t0
    return seconds, out


def pipeflow_figures(figures: dict[Row, float]) -> dict[bool, float]:
    """pipeflow's figures, warm (True) and cold (False)."""
    return {row.warm: v for row, v in figures.items() if isinstance(row.peer, Pipeflow)}


def best_peer(
    figures: dict[Row, float], warm: bool | None = None, forks: bool | None = None
) -> tuple[Row, float]:
    """The row (not pipeflow's, nor a reference: serial, the ceiling) with the lowest figure; only
    warm (or cold) rows if ``warm`` is given, only rows whose workers are forked (or not) from
    this process if ``forks`` is."""
    return min(
        (
            (row, v)
            for row, v in figures.items()
            if not isinstance(row.peer, Pipeflow | Serial | Ceiling)
            and warm in (None, row.warm)
            and forks in (None, row.peer.method == "fork")
        ),
        key=lambda rv: rv[1],
    )


def versus(figures: dict[Row, float], show: Callable[[float], str]) -> None:
    """Prints pipeflow's ratio to the best peer (above 1: pipeflow is faster), warm to warm,
    cold to cold, and cold to the best cold peer that does not fork this process."""
    ours = pipeflow_figures(figures)
    for warm, forks, what in (
        (True, None, "warm peer"),
        (False, None, "cold peer"),
        (False, False, "cold peer that does not fork this process (thread-safe)"),
    ):
        row, v = best_peer(figures, warm, forks)
        print(
            f"pipeflow {'warm' if warm else 'cold'} vs the best {what} ({row.label}, {show(v)}): "
            f"**{v / ours[warm]:.2f}x**  "
        )


# ------------------------------------------------------------------ Markdown


def markdown_table(
    title: str, header: Sequence[str], lines: Iterable[Sequence[str]], left: int = 2
) -> None:
    """Prints a Markdown table; the columns after the first ``left`` are right-aligned."""
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|")
    for line in lines:
        print("| " + " | ".join(line) + " |")
    print()


def measured(n: int, peer: Peer) -> str:
    """How many of ``n`` items ``peer`` was measured on."""
    return f"{n // peer.slow:,}" + (f" (N/{peer.slow})" if peer.slow > 1 else "")


def rate(per_item: float) -> str:
    return f"{1 / per_item:,.0f}"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def mib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 20):+,.1f} MiB"


# ------------------------------------------------------------------ measuring in a child process

START, RESULT = "START", "RESULT "


def child_started() -> None:
    """Called by a child just before what the parent times out (and samples)."""
    print(START, flush=True)


def child_report(result: dict[str, Any]) -> None:
    print(RESULT + json.dumps(result), flush=True)


@dataclass
class Outcome:
    """What :func:`isolated` saw: the child's report (None if it hung or failed), whether it was
    killed at the timeout, the peak of its process group's summed PSS while sampled (bytes), and
    how many processes of its group outlived it (killed)."""

    result: dict[str, Any] | None
    hung: bool = False
    group_peak: int = 0
    strays: int = 0
    stderr: list[str] = field(default_factory=list)


def _group(pgid: int) -> list[int]:
    """The pids whose process group is ``pgid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def isolated(
    module: str,
    args: Sequence[str],
    timeout: float,
    sample: bool = False,
    env: dict[str, str] | None = None,
) -> Outcome:
    """Runs ``python -m module *args`` (with ``env`` added to the environment) in a new session:
    a process group of its own. After the child prints ``START`` it has ``timeout`` seconds to
    print its ``RESULT`` line and exit, else the whole group is killed (``hung``). With
    ``sample``, the summed PSS of the group is sampled every 0.1 s from ``START`` on. Whatever of
    the group outlives the child by 3 s is killed and counted."""
    child = subprocess.Popen(
        [sys.executable, "-m", module, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    assert child.stdout is not None and child.stderr is not None
    lines: queue.Queue[str | None] = queue.Queue()
    err: list[str] = []

    def pump() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    readers = [
        threading.Thread(target=pump, daemon=True),
        threading.Thread(target=lambda: err.extend(child.stderr or ()), daemon=True),
    ]
    for reader in readers:
        reader.start()
    outcome = Outcome(None, stderr=err)
    deadline = time.monotonic() + 300.0  # imports and pool start-up, before START
    started = False
    try:
        while True:
            if sample and started:
                pss = sum(_pss(pid) for pid in _group(child.pid))
                outcome.group_peak = max(outcome.group_peak, pss)
            try:
                line = lines.get(timeout=max(0.0, min(0.1, deadline - time.monotonic())))
            except queue.Empty:
                if child.poll() is not None:  # exited (a process it left may hold its stdout)
                    break
                if time.monotonic() >= deadline:
                    outcome.hung = started
                    break
                continue
            if line is None:
                break
            if line == START and not started:
                started = True
                deadline = time.monotonic() + timeout
            elif line.startswith(RESULT):
                outcome.result = json.loads(line[len(RESULT) :])
            else:
                print(line)  # the child's own output, passed on
    finally:
        if outcome.hung or outcome.result is None:
            _kill_group(child.pid)
        child.wait()
        for reader in readers:
            reader.join(5)
        for _ in range(30):
            if not _group(child.pid):
                break
            time.sleep(0.1)
        strays = _group(child.pid)
        outcome.strays = len(strays)
        _kill_group(child.pid)
    return outcome
