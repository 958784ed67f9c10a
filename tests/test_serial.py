"""The serial backend: every step in the caller's thread, one item at a time, for debugging.

The behaviour suite (``test_pipeline``, ``test_faults``, the properties) runs on it too, through
the ``way`` fixture; these are what only it promises."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Generator
from typing import Any

import pytest

import pipeflow as pf
from pipeflow._backend import Source
from pipeflow._context import Context
from pipeflow._plan import Plan
from pipeflow._serial import SerialBackend


def where(x: int) -> tuple[int, int, int]:
    return x, os.getpid(), threading.get_ident()


def test_every_step_runs_in_the_callers_thread_also_for_process_stages() -> None:
    p = pf.Pipeline().stage(where, workers=4).filter(lambda t: t[0] % 2 == 0, workers=2)
    out = p.run(range(10), backend="serial")
    assert [x for x, _, _ in out] == [0, 2, 4, 6, 8]
    assert {(pid, tid) for _, pid, tid in out} == {(os.getpid(), threading.get_ident())}


def test_print_in_stage_code_reaches_the_callers_output(capsys: pytest.CaptureFixture[str]) -> None:
    def shout(x: int) -> int:
        print(f"item {x}")
        return x

    assert pf.Pipeline().stage(shout).run(range(3), backend="serial") == [0, 1, 2]
    assert capsys.readouterr().out == "item 0\nitem 1\nitem 2\n"


PDB_CHILD = """
    import pipeflow as pf
    def scale(x):
        y = x * 10
        breakpoint()
        return y
    print(pf.Pipeline().stage(scale).run([1, 2], backend="serial"), flush=True)
"""


def test_a_pdb_breakpoint_in_stage_code_stops_there() -> None:
    env = {**os.environ, "PYTHONBREAKPOINT": "pdb.set_trace"}
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(PDB_CHILD)],
        input="p y + 1\ncontinue\np y + 2\ncontinue\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert child.returncode == 0, child.stderr
    assert "11\n" in child.stdout and "22\n" in child.stdout  # the locals of each item's frame
    assert child.stdout.rstrip().endswith("[10, 20]")


def test_results_are_in_input_order_also_when_unordered() -> None:
    def jitter(x: int) -> int:
        time.sleep(0.001 * (x % 3))
        return x

    p = pf.Pipeline(ordered=False).stage(jitter, workers=4).batch(3)
    assert p.run(range(8), backend="serial") == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_an_exception_keeps_the_stage_codes_own_frames() -> None:
    def check(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(ValueError, match="three") as info:
        pf.Pipeline().stage(abs).stage(check, name="check").run(range(5), backend="serial")
    assert info.value.__cause__ is None  # no remote traceback: the frames are right here
    assert info.traceback[-1].name == "check"
    assert (
        info.value.__notes__[-1]
        == "pipeflow: raised in stage 1 ('check', serial) on input item 3: 3"
    )


def test_positions_after_a_batch_and_in_a_flat_map_are_named_as_locally() -> None:
    def fail_on_9(x: int) -> int:
        if x == 9:
            raise KeyError(x)
        return x

    p = pf.Pipeline().flat_map(lambda x: [x, x + 5]).batch(2).stage(sum).stage(fail_on_9)
    with pytest.raises(KeyError) as info:
        p.run(range(4), backend="serial")
    # [0, 5], [1, 6], [2, 7], ...: sums 5, 7, 9: batch 2 of the batch step.
    assert (
        "stage 3 ('fail_on_9', serial) on batch 2 of stage 1 ('batch(2)'): 9"
        in (info.value.__notes__[-1])
    )
    with pytest.raises(ZeroDivisionError) as info:
        pf.Pipeline().flat_map(lambda x: [1, 1, 0]).stage(lambda v: 1 // v).run(
            [7], backend="serial"
        )
    assert "input item 0, flat_map output 2 (3 outputs): 0" in info.value.__notes__[-1]


def test_init_runs_once_per_step_before_any_item() -> None:
    calls: list[str] = []

    def init() -> str:
        calls.append("init")
        return "state"

    def use(x: int) -> str:
        calls.append(f"item {x}")
        return f"{pf.worker_state()} {x}"

    p = pf.Pipeline().stage(use, init=init).stage(str.upper, init=lambda: None)
    assert p.run(range(3), backend="serial") == ["STATE 0", "STATE 1", "STATE 2"]
    assert calls == ["init", "item 0", "item 1", "item 2"]
    with pytest.raises(LookupError):  # the state stays the step's: none outside
        pf.worker_state()


def test_an_item_past_its_timeout_fails_the_run_when_it_returns() -> None:
    ran: list[int] = []

    def slow_2(x: int) -> int:
        ran.append(x)
        if x == 2:
            time.sleep(0.3)
        return x

    with pytest.raises(TimeoutError, match="cannot interrupt an item") as info:
        pf.Pipeline().stage(slow_2, timeout=0.1).run(range(10), backend="serial")
    assert "input item 2" in info.value.__notes__[-1]
    assert ran == [0, 1, 2]  # nothing after it


def test_stage_code_sees_the_run_context_and_a_cancel_stops_before_the_next_item() -> None:
    seen: list[Context] = []

    def stop_at_3(x: int) -> int:
        ctx = pf.current_context()
        seen.append(ctx)
        if x == 3:
            ctx.cancel("enough")
        return x

    outer = pf.Context()
    with pytest.raises(pf.Cancelled, match="enough"):
        pf.Pipeline().stage(stop_at_3).run(range(100), backend="serial", context=outer)
    assert len(seen) == 4 and all(c is seen[0] for c in seen)
    assert seen[0]._parent is outer and not outer.cancelled


def test_leaving_early_reads_no_more_of_the_input() -> None:
    pulled = itertools.count()

    def source() -> Generator[int, None, None]:
        for i in itertools.count():
            next(pulled)
            yield i

    with pf.Pipeline().stage(lambda x: x * 2).iter(source(), backend="serial") as results:
        assert [next(results) for _ in range(5)] == [0, 2, 4, 6, 8]
    assert next(pulled) == 5  # the five it yielded, and no read-ahead


def test_pipeflow_backend_selects_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEFLOW_BACKEND", "serial")
    assert pf.Pipeline().stage(where).run([1])[0][1:] == (os.getpid(), threading.get_ident())
    monkeypatch.setenv("PIPEFLOW_BACKEND", "elsewhere")
    with pytest.raises(ValueError, match="PIPEFLOW_BACKEND='elsewhere' names no backend"):
        pf.Pipeline().stage(abs).run([1])


class CountingBackend(SerialBackend):
    """A backend object of one's own: here the serial one, counting its runs."""

    def __init__(self) -> None:
        self.runs = 0

    def stream(
        self, plan: Plan, source: Source, ctx: Context, progress: Any
    ) -> Generator[list[Any], None, None]:
        self.runs += 1
        return super().stream(plan, source, ctx, progress)


def test_a_backend_object_runs_the_pipeline() -> None:
    backend = CountingBackend()
    p = pf.Pipeline().stage(lambda x: x + 1)
    assert p.run(range(3), backend=backend) == [1, 2, 3]
    assert list(p.iter(range(2), backend=backend)) == [1, 2]
    assert backend.runs == 2
