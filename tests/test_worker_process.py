"""Worker processes over shared-memory rings: results, errors, crashes, timeouts, cleanup.

This is the layer under process stages, driven through the runner the engine uses
(``_process_stage.ProcessRunner``, the ``StageRunner`` protocol), on its own (conftest checks
after every test that no child process is left).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

import pipeflow as pf
from pipeflow import _shm
from pipeflow._batch import Batch, Slot
from pipeflow._core import Ring
from pipeflow._plan import Step
from pipeflow._process import WorkerProcess
from pipeflow._process_stage import ProcessRunner
from pipeflow._runners import Duty, Once
from pipeflow._wire import recv_message, send_message


@contextlib.contextmanager
def runner(
    fn: Callable[[Any], Any],
    init: Callable[[], Any] | None = None,
    label: str = "s",
    timeout: float | None = None,
) -> Iterator[ProcessRunner]:
    """A started process runner for a one-worker map step; closed on the way out."""
    step = Step("map", fn, "s", 1, "process", 2, True, init, timeout)
    duty = Duty(step, False, label, lambda key: f"input item {key}", [False], lambda: False, Once())
    r = ProcessRunner(duty)
    try:
        r.start()
        yield r
    finally:
        r.close()


def run_batch(
    r: ProcessRunner, values: list[object], slot: Slot | None = None
) -> tuple[Batch, int]:
    """One batch through the runner, as the engine's loop sends it: submit, then receive."""
    slot = Slot() if slot is None else slot
    r.submit(Batch(0, values), slot)
    out, n, _, _ = r.receive(slot)
    return out, n


def test_messages_larger_than_a_frame_are_split() -> None:
    ring = Ring(256)
    big = {"data": bytes(range(256)) * 20, "n": 7}
    # The message is larger than the whole ring: a reader must drain while it is written.
    import threading

    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(recv_message(ring, timeout=10)))
    t.start()
    send_message(ring, big, timeout=10)
    t.join()
    assert got == [big]


def test_a_lambda_runs_in_a_worker_process() -> None:
    offset = 10
    with runner(lambda x: x + offset, label="stage 0 ('add')") as r:
        assert run_batch(r, [1, 2, 3]) == (Batch(0, [11, 12, 13]), 3)
        assert r.worker.pid != os.getpid()
        assert (r.counters.batches, r.counters.items_in, r.counters.items_out) == (1, 3, 3)


def test_init_state_is_reachable_in_the_worker() -> None:
    with runner(lambda x: (x, pf.worker_state()), lambda: "model") as r:
        assert run_batch(r, [5])[0] == Batch(0, [(5, "model")])


def test_an_exception_comes_back_with_its_type_key_item_and_traceback() -> None:
    def boom(x: int) -> int:
        if x == 3:
            raise KeyError("three")
        return x

    slot = Slot()
    with runner(boom) as r:
        with pytest.raises(KeyError, match="three") as info:
            run_batch(r, [1, 2, 3, 4], slot)
        assert slot.index == 2
        assert slot.shown == "3"  # the item's repr, from the worker
        # The worker's frames, as this process's traceback: down to the line that raised.
        last = info.traceback[-1]
        assert (last.name, last.path, str(last.statement).strip()) == (
            "boom",
            Path(__file__),
            'raise KeyError("three")',
        )
        # The worker goes on after an exception.
        assert run_batch(r, [7], slot)[0] == Batch(0, [7])


def test_an_exception_in_init_fails_the_start() -> None:
    def init() -> None:
        raise ImportError("no model")

    with pytest.raises(ImportError, match="no model"), runner(abs, init) as r:
        r.finish()  # a worker that got no batch still says whether its step loaded


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("os._exit(3)", "exited with code 3"),
        ("os.kill(os.getpid(), signal.SIGKILL)", "SIGKILL"),
        ("os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV"),
    ],
)
def test_a_dying_worker_is_reported_not_a_hang(code: str, expected: str) -> None:
    def die(x: int) -> int:
        import os  # noqa: F401  (names for the exec below)
        import signal  # noqa: F401

        if x == 1:
            exec(code)
        return x

    t0 = time.monotonic()
    slot = Slot()
    with runner(die, label="stage 2 ('die')") as r:
        with pytest.raises(pf.WorkerCrashed, match=expected) as info:
            run_batch(r, [0, 1, 2], slot)
        assert "stage 2 ('die')" in str(info.value)
        assert "while running input item 1 (item 1 of a batch of 3)" in str(info.value)
        assert slot.index == 1  # the parent knows which item the worker held
        assert time.monotonic() - t0 < 1.0


def test_a_stuck_worker_is_killed_at_the_timeout() -> None:
    with runner(lambda x: time.sleep(x), timeout=0.2) as r:
        with pytest.raises(TimeoutError, match="was killed"):
            run_batch(r, [30])
        assert r.worker.proc.poll() == -signal.SIGKILL


def test_an_orphaned_worker_exits_by_itself(tmp_path: object) -> None:
    # A parent that dies without stopping its worker: the worker notices and exits.
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os
        from pipeflow._process import WorkerProcess
        w = WorkerProcess("map", abs, None, "s")
        print(w.pid, flush=True)
        os._exit(0)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.strip())
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_second_run_reuses_warm_workers_with_the_new_step() -> None:
    from pipeflow import _process

    _process.shutdown_idle()
    pf.Pipeline().stage(lambda x: os.getpid(), workers=2).run(range(50))
    warm = {w.pid for w in _process._idle}
    assert len(warm) == 2  # both workers went back to the warm set
    second = pf.Pipeline().stage(lambda x: (os.getpid(), x * 3), init=lambda: 1).run(range(4))
    assert {pid for pid, _ in second} <= warm  # no new interpreter
    assert [v for _, v in second] == [0, 3, 6, 9]  # but the new function


def test_a_worker_left_idle_by_a_failed_run_stays_warm() -> None:
    from pipeflow import _process

    _process.shutdown_idle()
    started = time.monotonic()

    def fail_or_hang(x: int) -> int:
        if x == 0:
            raise ValueError("item 0")
        time.sleep(60)  # item 1: its worker holds it when the run stops
        return x

    with pytest.raises(ValueError, match="item 0"):
        pf.Pipeline().stage(fail_or_hang, workers=2).run(range(2))
    assert time.monotonic() - started < 30  # a worker holding item 1 is killed, not waited for
    assert len(_process._idle) == 1  # the failed item's worker answered and went back
    idle = _process._idle[0].pid
    assert pf.Pipeline().stage(lambda x: os.getpid()).run([0]) == [idle]


def test_idle_workers_exit_with_the_interpreter() -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import os, pipeflow as pf
        print(*set(pf.Pipeline().stage(lambda x: os.getpid(), workers=2).run(range(20))))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split()]
    assert pids and not any(psutil.pid_exists(p) for p in pids)


class OnlyInWorkers:
    """A value that refuses to be unpickled in the process ``parent``."""

    def __init__(self, value: int, parent: int) -> None:
        self.value = value
        self.parent = parent

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_only_in_workers, (self.value, self.parent))


def _rebuild_only_in_workers(value: int, parent: int) -> OnlyInWorkers:
    if os.getpid() == parent:
        raise RuntimeError("unpickled in the parent")
    return OnlyInWorkers(value, parent)


def _make(item: tuple[int, int]) -> OnlyInWorkers:
    return OnlyInWorkers(*item)


def _use(o: OnlyInWorkers) -> int:
    return o.value * 2


def test_values_between_adjacent_process_stages_are_not_unpickled_in_the_parent() -> None:
    items = [(x, os.getpid()) for x in range(20)]
    # timeout= keeps batches at one item in both stages, so no batch is re-cut in the parent.
    p = pf.Pipeline().stage(_make, workers=2, timeout=60).stage(_use, workers=2, timeout=60)
    assert p.run(items) == [2 * x for x in range(20)]
    # Through a thread stage the parent must unpickle them: this object says so, and the error
    # names the stage that made them, and where in the input its batch began.
    with pytest.raises(RuntimeError, match="unpickled in the parent") as info:
        pf.Pipeline().stage(_make).stage(_use, kind="thread").run(items)
    assert re.search(
        r"the results of stage 0 \('_make', process worker \d\) \(a batch of \d+ item\(s\) "
        r"from input item \d+\) could not be unpickled in the parent",
        info.value.__notes__[0],
    )
    with pytest.raises(RuntimeError, match="unpickled in the parent") as info:
        pf.Pipeline().stage(_make).run(items)  # read by the caller
    assert "the results of stage 0 ('_make', process worker" in info.value.__notes__[0]


def test_a_message_paused_between_frames_is_not_torn() -> None:
    ring = Ring(4096)
    message = bytes(range(256)) * 40  # several frames
    data = __import__("pickle").dumps(message, protocol=5)
    from pipeflow._wire import _LAST, _MORE

    step = ring.max_frame - 1
    ring.push(_MORE + data[:step])
    parts: list[bytes] = []
    with pytest.raises(TimeoutError):
        recv_message(ring, 0.05, parts)  # the writer pauses mid-message
    assert len(parts) == 1  # kept for the next call
    import threading

    def rest() -> None:
        for start in range(step, len(data), step):
            more = start + step < len(data)
            ring.push((_MORE if more else _LAST) + data[start : start + step], timeout=10)

    t = threading.Thread(target=rest)
    t.start()
    assert recv_message(ring, 10, parts) == message
    t.join()


def test_sending_a_large_batch_to_a_dead_worker_raises_instead_of_hanging(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_shm, "BIG_PICKLE", 1 << 40)  # as when the arena is full: by the ring
    w = WorkerProcess("map", len, None, "stage 0 ('len')")
    try:
        w.proc.kill()
        w.proc.wait()
        big = Batch(0, [bytes(4 << 20)])  # larger than the ring: the push must wait for room
        with pytest.raises(pf.WorkerCrashed, match=r"SIGKILL.*while sending a batch"):
            w.send(w.encode(big, Slot())[0])
    finally:
        w.stop()


class OnlyInParent:
    """A value that refuses to be unpickled anywhere but in the process ``parent``."""

    def __init__(self, parent: int) -> None:
        self.parent = parent

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_only_in_parent, (self.parent,))


def _rebuild_only_in_parent(parent: int) -> OnlyInParent:
    if os.getpid() != parent:
        raise RuntimeError("unpickled outside the parent")
    return OnlyInParent(parent)


def test_an_item_that_does_not_unpickle_in_the_worker_is_an_error_not_a_crash() -> None:
    items: list[object] = [*range(20), OnlyInParent(os.getpid())]
    with pytest.raises(RuntimeError, match="unpickled outside the parent") as info:
        pf.Pipeline().stage(abs).run(items)
    assert "could not unpickle a batch" in "".join(info.value.__notes__)


def _explode(x: int) -> list[object]:
    import threading

    return [threading.Lock()] if x == 500 else [x, x, x]


def test_an_unpicklable_flat_map_output_names_its_input_item() -> None:
    with pytest.raises(TypeError) as info:
        pf.Pipeline().flat_map(_explode).run(range(1000))
    assert "on input item 500" in info.value.__notes__[-1]


def _count_and_time_out(arg: tuple[int, str]) -> int:
    x, log = arg
    with open(log, "a") as f:
        f.write(f"{x}\n")
    if x == 500:
        raise TimeoutError("the stage's own timeout")
    return x


def test_a_timeout_error_raised_by_the_stage_is_retried_like_any_exception(
    tmp_path: object,
) -> None:
    import collections
    import pathlib

    log = str(pathlib.Path(str(tmp_path), "calls"))
    with pytest.raises(TimeoutError, match="the stage's own timeout"):
        pf.Pipeline().stage(_count_and_time_out, retries=2).run([(x, log) for x in range(1000)])
    calls = collections.Counter(pathlib.Path(log).read_text().split())
    assert calls["500"] == 3  # retried in place, by the worker
    assert all(n == 1 for k, n in calls.items() if k != "500")  # no batch was sent again


def test_classes_defined_in_a_scripts_main_cross_as_items_results_and_errors(
    tmp_path: object,
) -> None:
    import pathlib
    import subprocess
    import sys
    import textwrap

    script = pathlib.Path(str(tmp_path), "script.py")
    script.write_text(
        textwrap.dedent(
            """
            import dataclasses
            import pipeflow as pf

            @dataclasses.dataclass
            class Point:
                x: int

            class Odd(Exception):
                pass

            def move(p):
                if p.x == 7_777:
                    raise Odd(p.x)
                return Point(p.x + 1)

            if __name__ == "__main__":
                items = (Point(i) for i in range(5000))
                out = pf.Pipeline().stage(move, workers=2).stage(move, workers=2).run(items)
                assert out == [Point(i + 2) for i in range(5000)]
                assert all(type(p) is Point for p in out)
                try:
                    pf.Pipeline().stage(move).run(Point(i) for i in range(10_000))
                except Odd as e:
                    print("raised Odd;", e.__notes__[-1])
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "raised Odd; pipeflow: raised in stage 0 ('move', process worker" in out.stdout
    assert "on input item 7777" in out.stdout


def test_a_pipeline_inside_a_multiprocessing_child_sends_the_scripts_functions(
    tmp_path: object,
) -> None:
    # A spawn or forkserver child runs the script as __mp_main__, which our workers cannot import.
    import pathlib
    import subprocess
    import sys
    import textwrap

    script = pathlib.Path(str(tmp_path), "script.py")
    script.write_text(
        textwrap.dedent(
            """
            import multiprocessing as mp
            import pipeflow as pf

            def inc(x):
                return x + 1

            def run_pipeline(n):
                return pf.Pipeline().stage(inc, workers=2).run(range(n))

            if __name__ == "__main__":
                with mp.get_context("forkserver").Pool(1) as pool:
                    print(pool.apply(run_pipeline, (5,)))
            """
        )
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1, 2, 3, 4, 5]"


def cloudpickle_loaded(_: object) -> bool:
    import sys

    return "cloudpickle" in sys.modules


def make_adder(n: int) -> object:
    return lambda x: x + n  # a closure: only cloudpickle can send it back


def test_a_worker_running_an_importable_function_never_imports_cloudpickle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its function comes by reference and its results pickle plainly: the ~40 ms import of
    # cloudpickle stays out of a fresh interpreter's start (a forked worker has it already).
    from pipeflow import _process

    monkeypatch.setenv("PIPEFLOW_START_METHOD", "spawn")
    _process.shutdown_idle()  # fresh workers: a warm one may have needed it before
    assert pf.Pipeline().stage(cloudpickle_loaded, workers=2).run(range(10)) == [False] * 10


def test_results_that_need_cloudpickle_still_cross() -> None:
    adders = pf.Pipeline().stage(make_adder).run([1, 2, 3])
    assert [add(10) for add in adders] == [11, 12, 13]  # type: ignore[operator]


def _dies_once_at(arg: tuple[int, str, frozenset[int]]) -> int:
    import pathlib

    x, folder, fatal = arg
    marker = pathlib.Path(folder, f"died-{x}")
    if x in fatal and not marker.exists():
        marker.write_text("1")
        os._exit(1)
    return x


def test_each_item_of_a_batch_has_its_own_crash_retries(tmp_path: object) -> None:
    # Quick items go thousands to a batch: three of one batch each take a worker down once.
    # Each is retried once, as retries=1 promises per item: not once for the whole batch.
    fatal = frozenset({5000, 5001, 5002})
    items = [(x, str(tmp_path), fatal) for x in range(10_000)]
    got = pf.Pipeline().stage(_dies_once_at, workers=2, retries=1).run(items)
    assert got == list(range(10_000))


def _always_dies_at_7(arg: tuple[int, str]) -> int:
    import pathlib

    x, folder = arg
    if x == 7:
        with pathlib.Path(folder, "attempts").open("a") as f:
            f.write("x")
        os._exit(2)
    return x


def test_an_item_that_always_crashes_fails_after_its_retries(tmp_path: object) -> None:
    import pathlib

    items = [(x, str(tmp_path)) for x in range(20)]
    with pytest.raises(pf.WorkerCrashed, match=r"exited with code 2 .*input item 7"):
        pf.Pipeline().stage(_always_dies_at_7, workers=2, retries=2).run(items)
    assert pathlib.Path(str(tmp_path), "attempts").read_text() == "xxx"


def _two_each(x: int) -> list[int]:
    return [x, x]


def _sleep_04(x: int) -> int:
    time.sleep(0.4)
    return x


def test_a_timed_process_stage_gets_one_item_a_batch_from_a_process_stage() -> None:
    # The flat_map's output comes back from its worker as one encoded batch of two items. The
    # timed stage must not take both under one clock: 0.8 s against timeout=0.7 would fail.
    p = pf.Pipeline().flat_map(_two_each).stage(_sleep_04, workers=2, timeout=0.7)
    assert p.run(range(2)) == [0, 0, 1, 1]


def _slow_init() -> str:
    time.sleep(1.0)
    return "loaded"


def _state_of(x: int) -> str:
    return f"{pf.worker_state()} {x}"


def test_init_has_no_time_limit_only_the_start_up_has(monkeypatch: pytest.MonkeyPatch) -> None:
    # START_TIMEOUT bounds how long a new worker takes to read its setup, not its init (loading
    # a model may take minutes).
    from pipeflow import _process

    monkeypatch.setattr(_process, "START_TIMEOUT", 0.3)
    p = pf.Pipeline().stage(_state_of, init=_slow_init, workers=1)
    assert p.run(range(2)) == ["loaded 0", "loaded 1"]


def _failing_init() -> None:
    time.sleep(0.2)  # the parent is pushing the first request by then
    raise ValueError("cannot load the model")


def _init_dies_once(folder: str) -> None:
    import pathlib

    marker = pathlib.Path(folder, "init")
    time.sleep(0.2)
    if not marker.exists():
        marker.write_text("1")
        os._exit(9)


def test_a_worker_that_ends_while_a_large_request_waits_for_room(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    # A request larger than the ring (as when the arena is full) waits for the worker to read.
    # The worker ends meanwhile: what it answered first (its init's error) is what is raised,
    # and a crash is retried like any other.
    import functools

    monkeypatch.setattr(_shm, "BIG_PICKLE", 1 << 40)
    big = [bytes(2 << 20)]
    with pytest.raises(ValueError, match="cannot load the model"):
        pf.Pipeline().stage(len, init=_failing_init).run(big)
    init = functools.partial(_init_dies_once, str(tmp_path))
    assert pf.Pipeline().stage(len, init=init, retries=1).run(big) == [2 << 20]


def _inner_dies(x: int) -> int:
    os._exit(1)


def _outer_keeps_its_array(x: int) -> tuple[float, float, bool]:
    mine = pf.empty(100_000)  # in the arena, this worker's block
    mine[:] = x
    with contextlib.suppress(pf.WorkerCrashed):
        # A pipeline of its own, whose worker dies and is stopped: that frees what the inner
        # worker was writing, and nothing of this one's.
        pf.Pipeline().stage(_inner_dies).run(range(1))
    other = pf.empty(100_000)
    other[:] = -1.0
    shared = other.__array_interface__["data"][0] == mine.__array_interface__["data"][0]
    return float(mine.min()), float(mine.max()), shared


def test_a_worker_running_a_pipeline_of_its_own_keeps_its_shared_memory() -> None:
    out = pf.Pipeline().stage(_outer_keeps_its_array, workers=1).run([5, 6])
    assert out == [(5.0, 5.0, False), (6.0, 6.0, False)]
