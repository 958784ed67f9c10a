"""Errors, cancellation, early exit and Ctrl-C: the run stops promptly and leaves nothing behind.

The autouse ``no_leaks`` fixture checks threads, pool jobs and fds after every test here.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest

import pipeflow as pf


def test_first_error_is_reraised_with_stage_and_position(kind: str) -> None:
    def boom(x: int) -> int:
        if x == 7:
            raise ValueError("seven is not allowed")
        return x

    p = pf.Pipeline(kind=kind).stage(abs).stage(boom, workers=3, name="check")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seven is not allowed") as info:
        p.run(range(100))
    note = info.value.__notes__[-1]
    assert "stage 1 ('check'" in note
    assert "input item 7" in note
    # The worker's frames are in the traceback.
    assert "boom" in "".join(traceback.format_exception(info.value))


def test_error_stops_other_workers_promptly(kind: str) -> None:
    processed = []

    def work(x: int) -> int:
        if x == 5:
            raise RuntimeError("stop here")
        time.sleep(0.01)
        processed.append(x)
        return x

    t0 = time.monotonic()
    with pytest.raises(RuntimeError):
        pf.Pipeline(kind=kind).stage(work, workers=4).run(range(10_000))  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5
    assert len(processed) < 200  # the rest was cancelled, not run


def test_error_in_a_later_stage_position_refers_to_the_input(kind: str) -> None:
    def fail_on_49(x: int) -> int:
        if x == 49:
            raise KeyError(x)
        return x

    p = pf.Pipeline(kind=kind).stage(lambda x: x * x, workers=2).stage(fail_on_49)  # type: ignore[arg-type]
    with pytest.raises(KeyError) as info:
        p.run(range(20))
    assert "input item 7" in info.value.__notes__[-1]


def test_error_after_a_batch_names_the_batch(kind: str) -> None:
    def fail(batch: list[int]) -> int:
        if 10 in batch:
            raise ValueError("bad batch")
        return sum(batch)

    p = pf.Pipeline(kind=kind).batch(4).stage(fail)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        p.run(range(20))
    assert "batch 2 of stage 0 ('batch(4)'): [8, 9, 10, 11]" in info.value.__notes__[-1]


def test_error_in_flat_map_child_names_the_output(kind: str) -> None:
    def fail(x: int) -> int:
        if x == 102:
            raise ValueError("child")
        return x

    p = pf.Pipeline(kind=kind).flat_map(lambda x: [x * 100 + i for i in range(3)]).stage(fail)  # type: ignore[arg-type]
    with pytest.raises(ValueError) as info:
        p.run(range(3))
    assert "input item 1, flat_map output 2 (3 outputs): 102" in info.value.__notes__[-1]


def test_error_from_the_input_iterable(kind: str) -> None:
    def source():  # type: ignore[no-untyped-def]
        yield 1
        yield 2
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone") as info:
        pf.Pipeline(kind=kind).stage(abs).run(source())  # type: ignore[arg-type]
    assert "the input iterable (at item 2)" in info.value.__notes__[-1]


def test_error_in_init(kind: str) -> None:
    def init() -> None:
        raise ImportError("no model file")

    with pytest.raises(ImportError, match="no model file"):
        pf.Pipeline(kind=kind).stage(abs, init=init).run(range(3))  # type: ignore[arg-type]
    with pytest.raises(ImportError, match="no model file"):  # also with nothing to run
        pf.Pipeline(kind=kind).stage(abs, init=init).run([])  # type: ignore[arg-type]


def test_warm_workers_that_ran_nothing_load_the_next_step_cleanly() -> None:
    # A worker's setup is answered after the first batch is queued behind it; a worker that got
    # no batch reads that answer before going back to the warm set, so the next run's setup
    # answer is its own.
    def tagged(tag: str) -> pf.Pipeline:
        return pf.Pipeline().stage(lambda x: (x, pf.worker_state()), workers=2, init=lambda: tag)

    assert tagged("a").run([]) == []
    assert tagged("b").run([1]) == [(1, "b")]  # one worker of two ran nothing
    assert tagged("c").run(range(4)) == [(i, "c") for i in range(4)]


def test_early_break_stops_and_cleans_up(kind: str) -> None:
    started = []

    def work(x: int) -> int:
        started.append(x)
        time.sleep(0.001)
        return x

    it = pf.Pipeline(kind=kind).stage(work, workers=4).iter(range(1_000_000))  # type: ignore[arg-type]
    for x in it:
        if x == 10:
            break
    it.close()
    n = len(started)
    time.sleep(0.05)
    assert len(started) == n  # nothing runs after the loop is left
    assert n < 10_000


def test_abandoned_iterator_is_cleaned_up_by_gc(kind: str) -> None:
    it = pf.Pipeline(kind=kind).stage(abs, workers=2).iter(range(10**9))  # type: ignore[arg-type]
    assert next(it) == 0
    del it  # CPython finalizes the generator at once: the run stops


def test_exception_in_the_consumer_loop_cleans_up(kind: str) -> None:
    with pytest.raises(ZeroDivisionError):
        for x in pf.Pipeline(kind=kind).stage(abs, workers=2).iter(range(10**9)):  # type: ignore[arg-type]
            if x == 100:
                1 / 0  # noqa: B018


def test_context_cancel_stops_the_run(kind: str) -> None:
    ctx = pf.Context()
    threading.Timer(0.1, ctx.cancel, args=("user pressed stop",)).start()

    def slow(x: int) -> int:
        time.sleep(0.01)
        return x

    t0 = time.monotonic()
    with pytest.raises(pf.Cancelled, match="user pressed stop"):
        pf.Pipeline(kind=kind).stage(slow, workers=2).run(range(100_000), context=ctx)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5


def test_run_timeout_raises_deadline_exceeded(kind: str) -> None:
    def slow(x: int) -> int:
        time.sleep(0.01)
        return x

    with pytest.raises(pf.DeadlineExceeded):
        pf.Pipeline(kind=kind).stage(slow).run(range(100_000), timeout=0.2)  # type: ignore[arg-type]


def test_stage_code_can_stop_early_on_cancellation() -> None:
    # Threads only: process workers are stopped by killing them (see the next test).
    kind = "thread"
    stopped_early = threading.Event()
    started = threading.Event()

    def long_item(x: int) -> int:
        ctx = pf.current_context()
        if x == 0:
            started.set()
            if ctx.wait(timeout=10):
                stopped_early.set()
            return x
        started.wait(10)  # fail only once item 0 is in hand (else it is never started)
        raise ValueError("fail fast")

    with pytest.raises(ValueError, match="fail fast"):
        pf.Pipeline(kind=kind).stage(long_item, workers=2).run(range(2))  # type: ignore[arg-type]
    assert stopped_early.is_set()


def test_an_error_kills_a_long_item_in_another_worker_process() -> None:
    def work(x: int) -> int:
        if x == 0:
            time.sleep(30)
        time.sleep(0.2)
        raise ValueError("fail fast")

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="fail fast"):
        pf.Pipeline(kind="process").stage(work, workers=2).run(range(2))
    assert time.monotonic() - t0 < 10  # not the 30 s of item 0: its worker was killed


@pytest.mark.leaky  # the timed-out thread finishes its sleep in the background
@pytest.mark.concurrent  # the serial backend cannot interrupt an item (test_serial.py)
def test_item_timeout(kind: str) -> None:
    def stuck(x: int) -> int:
        if x == 3:
            time.sleep(1.0)
        return x

    t0 = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        pf.Pipeline(kind=kind).stage(stuck, workers=2, timeout=0.2).run(range(10))  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 0.9
    assert "input item 3" in info.value.__notes__[-1]
    time.sleep(1.0)


# A child started from a background job inherits SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: install it, so that these tests run the same from any shell.
_SIGINT_DEFAULT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"


def _run_child(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _SIGINT_DEFAULT + textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _interrupt_child(code: str, settle: float) -> tuple[subprocess.Popen[str], float]:
    """Starts ``code``, waits for its "ready" line and ``settle`` s, sends SIGINT; returns the
    child and the moment the signal was sent."""
    child = _run_child(code)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    time.sleep(settle)
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    return child, sent


CTRL_C_CHILD = """
    import sys, time, pipeflow as pf
    def slow(x):
        time.sleep(0.01)
        return x
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        pf.Pipeline(kind="thread").stage(slow, workers=2).run(range(10**9))
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - t0, 3), flush=True)
        pool = pf._pool.default_pool()
        end = time.monotonic() + 1.0  # the last job returns to Rust just after the join
        while pool.running and time.monotonic() < end:
            time.sleep(0.001)
        print("pool", pool.running, flush=True)
        sys.exit(0)
    sys.exit(3)
"""


def test_ctrl_c_interrupts_a_run_and_cleans_up() -> None:
    child, sent = _interrupt_child(CTRL_C_CHILD, 0.3)
    out, err = child.communicate(timeout=20)
    elapsed = time.monotonic() - sent
    assert child.returncode == 0, err
    assert "interrupted" in out
    assert "pool 0" in out  # every worker had stopped when the KeyboardInterrupt arrived
    assert elapsed < 5


CTRL_C_CHANNEL_CHILD = """
    import time, pipeflow as pf
    ch = pf.Channel(0)
    print("ready", flush=True)
    t0 = None
    try:
        ch.recv()
    except KeyboardInterrupt:
        print("interrupted", flush=True)
"""


TERMINAL_CTRL_C_CHILD = """
    import time, pipeflow as pf
    from pipeflow import _process
    def slow(x):
        time.sleep(0.5)
        return x
    print(pf.Pipeline().stage(abs, workers=3).run(range(-3, 3)), flush=True)  # 3 warm workers
    print("ready", flush=True)
    try:
        pf.Pipeline().stage(slow, workers=1).run(range(20))
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    time.sleep(0.5)
    print("idle", [w.proc.poll() for w in _process._idle], flush=True)
    print(pf.Pipeline().stage(abs, workers=3).run(range(-3, 3)), flush=True)
"""


def test_ctrl_c_at_a_terminal_leaves_idle_worker_processes_warm_and_quiet() -> None:
    # A terminal's Ctrl-C signals the whole process group: the workers too, not only the parent.
    # The parent stops the run; the workers leave that to it (no traceback from each of them),
    # and the idle ones stay warm for the next run.
    child = subprocess.Popen(
        [sys.executable, "-c", _SIGINT_DEFAULT + textwrap.dedent(TERMINAL_CTRL_C_CHILD)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "[3, 2, 1, 0, 1, 2]"
    assert child.stdout.readline().strip() == "ready"
    time.sleep(0.8)
    os.killpg(child.pid, signal.SIGINT)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    assert out.splitlines() == ["interrupted", "idle [None, None]", "[3, 2, 1, 0, 1, 2]"], err
    assert "Traceback" not in err, err


@pytest.mark.parametrize(
    "code",
    [
        CTRL_C_CHANNEL_CHILD,
        CTRL_C_CHANNEL_CHILD.replace("ch.recv()", "ch.send(1)"),
        CTRL_C_CHANNEL_CHILD.replace("ch.recv()", "pf.select([ch, pf.Channel(1)])"),
        CTRL_C_CHANNEL_CHILD.replace("ch.recv()", "pf.Context().wait()"),
    ],
    ids=["recv", "send", "select", "context-wait"],
)
def test_ctrl_c_interrupts_blocking_calls_quickly(code: str) -> None:
    child, sent = _interrupt_child(code, 0.2)
    out, err = child.communicate(timeout=10)
    assert "interrupted" in out, err
    # The ~100 ms promise, with room for a loaded CI machine (interpreter exit included).
    assert time.monotonic() - sent < 2.0


FORK_CHILD = """
    import os, pipeflow as pf
    assert pf.Pipeline(kind="thread").stage(abs, workers=2).run(range(-3, 0)) == [3, 2, 1]
    pid = os.fork()
    if pid == 0:
        # In the child the parent's pool threads do not exist: a fresh pool must serve.
        ok = pf.Pipeline(kind="thread").stage(abs, workers=2).run(range(-3, 0)) == [3, 2, 1]
        with pf.Group() as g:
            t = g.go(lambda: 42)
        os._exit(0 if ok and t.result() == 42 else 1)
    _, status = os.waitpid(pid, 0)
    print("child", os.waitstatus_to_exitcode(status), flush=True)
"""


def test_pool_survives_fork() -> None:
    child = _run_child(FORK_CHILD)
    out, err = child.communicate(timeout=30)
    assert "child 0" in out, err


def test_no_leftover_threads_after_pool_shutdown() -> None:
    from pipeflow import _pool

    # Earlier tests leave pool threads (they retire after KEEP_ALIVE): shut the pool first, so
    # that ``before`` counts none of them, and the run below must start threads of its own.
    assert _pool.shutdown_default_pool(timeout=5)
    before = len(os.listdir("/proc/self/task"))
    workers = threading.Barrier(6, timeout=10)  # six tasks at once: six pool threads for sure
    pf.Pipeline(kind="thread").stage(lambda x: workers.wait(), workers=6).run(range(6))
    assert _pool.default_pool().threads >= 6
    assert len(os.listdir("/proc/self/task")) >= before + 6
    assert _pool.shutdown_default_pool(timeout=5)
    assert len(os.listdir("/proc/self/task")) == before  # every one of them exited


SLOW_ITEMS_CTRL_C_CHILD = """
    import time, pipeflow as pf
    print("ready", flush=True)
    t0 = time.monotonic()
    try:
        pf.Pipeline(kind="thread").stage(lambda x: time.sleep(3), workers=2).run(range(4))
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - t0, 3), flush=True)
"""


def test_ctrl_c_does_not_wait_for_slow_items_and_exit_is_clean() -> None:
    child, sent = _interrupt_child(SLOW_ITEMS_CTRL_C_CHILD, 0.5)
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.startswith("interrupted"), line
    assert time.monotonic() - sent < 2.0  # not the 3 s the items take
    _, err = child.communicate(timeout=30)
    # At exit the interpreter waits for the items in hand instead of aborting (SIGABRT).
    assert child.returncode == 0, err
    # It says what it waits for (the items' 3 s), once.
    assert err.count("pipeflow: waiting for 2 thread-stage items to finish") == 1, err


def test_cancel_lands_between_items_not_between_batches(kind: str) -> None:
    def work(x: int) -> int:
        if x >= 20_000:
            time.sleep(0.02)  # fast first, so batches grow large, then slow
        return x

    ctx = pf.Context()
    threading.Timer(1.0, ctx.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(pf.Cancelled):
        pf.Pipeline(kind=kind).stage(work, workers=2).run(range(10**6), context=ctx)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 5  # a whole batch of slow items would take ~20 s


@pytest.mark.concurrent  # the serial backend checks the deadline between items
def test_deadline_does_not_wait_for_slow_items(kind: str) -> None:
    t0 = time.monotonic()
    with pytest.raises(pf.DeadlineExceeded):
        pf.Pipeline(kind=kind).stage(lambda x: time.sleep(3)).run(range(3), timeout=0.3)  # type: ignore[arg-type]
    assert time.monotonic() - t0 < 2.0  # not the 3 s the item in hand takes
    time.sleep(3)  # the item in hand finishes in the background; the leak check follows


def test_stop_iteration_from_a_stage_is_reported_not_swallowed(kind: str) -> None:
    def f(x: int) -> int:
        if x == 3:
            raise StopIteration
        return x

    with pytest.raises(RuntimeError, match="StopIteration raised in stage 0") as info:
        pf.Pipeline(kind=kind).stage(f).run(range(10))  # type: ignore[arg-type]
    assert isinstance(info.value.__cause__, StopIteration)
    assert "input item 3" in info.value.__notes__[-1]


def test_input_error_position_counts_every_item_read(kind: str) -> None:
    def source():  # type: ignore[no-untyped-def]
        yield from range(3000)
        raise OSError("read error")

    with pytest.raises(OSError) as info:
        pf.Pipeline(kind=kind).stage(abs).run(source())  # type: ignore[arg-type]
    assert "(at item 3000)" in info.value.__notes__[-1]


@pytest.mark.leaky  # the feeder stays inside the blocked next() until the queue yields
def test_break_returns_while_the_input_blocks(kind: str) -> None:
    import queue

    q: queue.Queue[int | None] = queue.Queue()
    for i in range(5):
        q.put(i)

    def events():  # type: ignore[no-untyped-def]
        while (item := q.get()) is not None:
            yield item

    t0 = time.monotonic()
    try:
        for r in pf.Pipeline(kind=kind).stage(abs).iter(events()):  # type: ignore[arg-type]
            if r == 4:  # the whole burst came out, while the feeder waits in next()
                break
        assert time.monotonic() - t0 < 2
    finally:
        q.put(None)  # let the feeder's next() return; it sees the stop and exits


@pytest.mark.parametrize("kind", ["thread", "process"])  # the local backend's feeder
def test_an_input_that_stalls_often_loses_and_repeats_nothing(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each stall leaves part of a batch in the feeder's hands, which the supervision sends while
    # the feeder goes on appending to the same list: every item must come out once, in order.
    from pipeflow._ordering import Window

    flushed: list[int] = []
    try_acquire = Window.try_acquire

    def counted(self: Window, n: int) -> bool:
        taken = try_acquire(self, n)
        if taken:
            flushed.append(n)
        return taken

    monkeypatch.setattr(Window, "try_acquire", counted)
    stalls = set(random.Random(7).sample(range(1, 4000), 6))

    def source():  # type: ignore[no-untyped-def]
        for i in range(4000):
            if i in stalls:
                time.sleep(0.15)
            yield i

    p = pf.Pipeline(kind=kind).stage(abs).stage(str, ordered=False)  # type: ignore[arg-type]
    assert sorted(p.run(source()), key=int) == [str(i) for i in range(4000)]
    assert flushed  # the path under test ran


def test_a_stalled_input_holds_nothing_back(kind: str) -> None:
    release = threading.Event()

    def source():  # type: ignore[no-untyped-def]
        yield from range(3000)
        release.wait(10)
        yield 3000

    out: list[int] = []
    it = pf.Pipeline(kind=kind).stage(abs).iter(source())  # type: ignore[arg-type]
    threading.Timer(2.0, release.set).start()
    for r in it:
        out.append(r)
        if not release.is_set():
            seen_while_stalled = r
    assert out == list(range(3001))
    # Everything the input gave before it stalled came out during the stall, also the part of
    # a batch the feeder had read when next() blocked (the caller's supervision sent it).
    assert seen_while_stalled == 2999


def _dies_once(arg: tuple[int, str]) -> int:
    import os
    import pathlib

    x, folder = arg
    marker = pathlib.Path(folder, f"died-{x}")
    if x == 3 and not marker.exists():
        marker.write_text("1")
        os._exit(1)  # the worker process dies holding item 3, once
    return x


def test_a_crashed_worker_is_replaced_and_its_items_rerun(tmp_path: object) -> None:
    items = [(x, str(tmp_path)) for x in range(10)]
    p = pf.Pipeline(kind="process").stage(_dies_once, workers=2, retries=1)
    assert p.run(items) == list(range(10))


def test_a_crash_without_retries_names_stage_item_and_exit(tmp_path: object) -> None:
    items = [(x, str(tmp_path)) for x in range(10)]
    t0 = time.monotonic()
    with pytest.raises(pf.WorkerCrashed, match="exited with code 1") as info:
        pf.Pipeline(kind="process").stage(_dies_once, workers=2).run(items)
    assert time.monotonic() - t0 < 5  # noticed, never a hang
    assert "stage 0 ('_dies_once', process worker" in str(info.value)
    assert "input item 3" in info.value.__notes__[-1]


def _dies_at_40000(x: int) -> int:
    import os

    if x == 40_000:
        os._exit(3)
    return x


def test_a_crash_deep_in_a_large_batch_names_the_exact_item() -> None:
    # Quick items travel thousands to a batch; the worker's shared word says which it held.
    pattern = r"exited with code 3 .* while running input item 40000 \(item \d+ of a batch of \d+\)"
    with pytest.raises(pf.WorkerCrashed, match=pattern) as info:
        pf.Pipeline().stage(_dies_at_40000, workers=2).run(range(60_000))
    assert "on input item 40000" in info.value.__notes__[-1]


def test_a_crash_deep_in_a_large_batch_is_retried(tmp_path: object) -> None:
    items = [(x, str(tmp_path)) for x in range(30_000)]
    items[20_000] = (3, str(tmp_path))  # _dies_once kills the worker at its first 3
    got = pf.Pipeline().stage(_dies_once, workers=2, retries=1).run(items)
    assert got == [x for x, _ in items]


def test_unpicklable_items_and_results_are_reported(kind: str) -> None:
    if kind == "thread":
        pytest.skip("threads do not pickle")
    items: list[object] = list(range(5000))
    items[3000] = threading.Lock()
    with pytest.raises(TypeError) as info:
        pf.Pipeline().stage(abs).run(items)
    notes = "".join(info.value.__notes__)
    assert "could not be pickled" in notes
    assert "input item 3000" in notes
    with pytest.raises(TypeError) as info:
        pf.Pipeline().stage(lambda x: threading.Lock() if x == 4000 else x).run(range(5000))
    notes = "".join(info.value.__notes__)
    assert "result of this batch could not be pickled" in notes
    assert "input item 4000" in notes


def test_results_collected_as_garbage_on_one_of_the_runs_own_threads_stop_the_run() -> None:
    # Results dropped in a reference cycle are finalized by the garbage collector, on whichever
    # thread collects: here one of the run's own workers. It must not wait for itself.
    import gc
    import itertools

    collect = threading.Event()

    def work(x: int) -> int:
        if collect.is_set():
            gc.collect()  # finalizes the dropped results on this very thread
        time.sleep(0.001)
        return x

    gc.disable()  # the main thread must not collect first
    try:
        results = pf.Pipeline(kind="thread").stage(work, workers=2).iter(itertools.count())
        next(results)
        holder: dict[str, object] = {"results": results}
        holder["self"] = holder  # a cycle: only the collector can free it
        del results, holder
        collect.set()
        pool = pf._pool.default_pool()
        deadline = time.monotonic() + 10
        while pool.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pool.running == 0, "the run did not stop"
    finally:
        gc.enable()


CTRL_C_IN_A_WITH_BLOCK = """
    import time, pipeflow as pf
    def slow(x):
        if x > 0:
            time.sleep(6)
        return x
    t0 = None
    try:
        with pf.Pipeline(kind="thread").stage(slow, workers=2).iter(range(4)) as results:
            next(results)
            print("ready", flush=True)
            t0 = time.monotonic()
            time.sleep(30)  # the caller's own work: Ctrl-C lands here, not inside next()
    except KeyboardInterrupt:
        print("interrupted", round(time.monotonic() - t0, 1), flush=True)
"""


@pytest.mark.leaky  # the child's items finish in its background; the child itself exits
def test_ctrl_c_in_a_with_block_does_not_wait_for_the_items_in_hand() -> None:
    child, _ = _interrupt_child(CTRL_C_IN_A_WITH_BLOCK, 0.2)
    out, err = child.communicate(timeout=60)
    words = out.split()
    assert words[:1] == ["interrupted"], err
    assert float(words[1]) < 3.0, out  # not the 6 s of the items in hand


def test_a_task_that_gets_no_thread_fails_the_run_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The pool refuses a job when the OS refuses the thread it needs (tested in Rust): the run
    # must fail with that error, and stop the tasks that did start.
    from pipeflow import _pool

    real = _pool.default_pool()

    class Refusing:
        def __init__(self) -> None:
            self.submitted = 0

        def submit(self, func: object) -> None:
            self.submitted += 1
            if self.submitted > 3:
                raise RuntimeError("pipeflow could not start a thread for a task (test)")
            real.submit(func)

    refusing = Refusing()
    monkeypatch.setattr(_pool, "default_pool", lambda: refusing)  # the run's tasks (_tasks)
    with pytest.raises(RuntimeError, match="could not start a thread"):
        pf.Pipeline(kind="thread").stage(abs, workers=4).stage(abs, workers=4).run(range(100))


def test_a_stopped_run_takes_nothing_more_from_an_input_of_unknown_length() -> None:
    # An event queue with other readers: once the run is closed, the items put in afterwards
    # are left to them (but the one its reader was already waiting for).
    import queue

    q: queue.Queue[int] = queue.Queue()
    taken: list[int] = []

    def events() -> object:
        while True:
            item = q.get()
            taken.append(item)
            yield item

    for i in range(300):  # a fast burst first: the reader then asks for many items at a time
        q.put(i)
    results = pf.Pipeline(kind="thread").stage(abs, workers=2).iter(events())  # type: ignore[arg-type]
    for r in results:
        if r == 299:
            break
    results.close()
    for i in range(1000, 1040):
        q.put(i)
        time.sleep(0.005)
    assert [t for t in taken if t >= 1000] == [1000]
    assert q.qsize() == 39


EXIT_WITH_A_BLOCKED_INPUT = """
    import queue, pipeflow as pf
    q = queue.Queue()
    def events():
        while True:
            yield q.get()
    for i in range(10):
        q.put(i)
    for r in pf.Pipeline(kind="thread").stage(abs).iter(events()):
        if r == 9:
            break
    print("left the loop", flush=True)
"""


def test_exit_does_not_wait_for_a_stopped_runs_input_blocked_in_next() -> None:
    child = _run_child(EXIT_WITH_A_BLOCKED_INPUT)
    out, err = child.communicate(timeout=30)  # it used to wait for next() for good
    assert child.returncode == 0, err
    assert out.strip() == "left the loop"
    assert "pipeflow: waiting" not in err


PIPELINE_IN_A_LATE_ATEXIT_HANDLER = """
    import atexit
    def late():
        import pipeflow as pf
        try:
            pf.Pipeline(kind="thread").stage(abs).run([-1])
        except RuntimeError as e:
            print("refused:", e, flush=True)
    atexit.register(late)  # registered before pipeflow's own: runs after it
    import pipeflow as pf
    print(pf.Pipeline(kind="thread").stage(abs).run([-2]), flush=True)
"""


def test_a_pipeline_after_pipeflow_shut_down_at_exit_says_why() -> None:
    child = _run_child(PIPELINE_IN_A_LATE_ATEXIT_HANDLER)
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == "[2]"
    assert lines[1].startswith("refused: pipeflow cannot run now: the interpreter is exiting")
