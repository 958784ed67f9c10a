"""The per-batch loop (``_apply``): one loop for map, filter and flat_map, driven directly."""

from __future__ import annotations

import time

import pytest

from pipeflow._apply import apply_for, worker_op
from pipeflow._batch import SKIP, Batch, Slot, child_key
from pipeflow._plan import Step


def _step(op: str, timeout: float | None = None) -> Step:
    return Step(op, abs, "s", 1, "thread", 2, True, timeout=timeout)  # type: ignore[arg-type]


def run(
    op: str, fn: object, batch: Batch, *, may_skip: bool = True, timed: bool = False
) -> tuple[Batch, int, Slot]:
    step = _step(op, 1.0 if timed else None)._replace(fn=fn)  # type: ignore[arg-type]
    slot = Slot()
    out, n = apply_for(step, may_skip)(step.fn, batch, slot, timed, [False])  # type: ignore[arg-type]
    return out, n, slot


def test_map_keeps_keys_and_skips() -> None:
    out, n, _ = run("map", lambda x: x * 10, Batch(5, [1, SKIP, 3]))
    assert (out, n) == (Batch(5, [10, SKIP, 30]), 2)


def test_filter_turns_rejected_values_into_skip() -> None:
    out, n, _ = run("filter", lambda x: x % 2, Batch(0, [1, 2, SKIP, 3]))
    assert (out, n) == (Batch(0, [1, SKIP, SKIP, 3]), 3)


def test_flat_map_splits_keys_only_for_two_or_more_outputs() -> None:
    out, n, _ = run("flat_map", lambda x: range(x), Batch(7, [1, 0, SKIP]))
    assert (out, n) == (Batch(7, [0, SKIP, SKIP]), 2)  # still a run of keys
    out, n, _ = run("flat_map", lambda x: range(x), Batch(7, [2, 1, SKIP, 0]))
    assert out.keys == [child_key(7, 0, 2), child_key(7, 1, 2), 8, 9, 10]
    assert out.values == [0, 1, 0, SKIP, SKIP]
    assert n == 3


@pytest.mark.parametrize("op", ["map", "filter", "flat_map"])
def test_an_exception_leaves_the_slot_on_the_failing_item(op: str) -> None:
    def fail_on_4(x: int) -> list[int]:
        if x == 4:
            raise ValueError(x)
        return [x]

    slot = Slot()
    step = _step(op)._replace(fn=fail_on_4)
    with pytest.raises(ValueError):
        apply_for(step, True)(fail_on_4, Batch(0, [SKIP, 3, 4, 5]), slot, False, [False])
    assert slot.index == 2


def test_a_timed_loop_stamps_each_item_and_a_stop_lands_between_items() -> None:
    stop = [False]
    slot = Slot()

    def halt_after(x: int) -> int:
        stop[0] = x == 1
        return x

    before = time.perf_counter()
    step = _step("map", 1.0)._replace(fn=halt_after)
    out, n = apply_for(step, False)(halt_after, Batch(0, [0, 1, 2, 3]), slot, True, stop)
    assert (out.values, n) == ([0, 1], 2)
    assert slot.since >= before


def test_a_worker_runs_the_plain_map_only_without_skips() -> None:
    assert worker_op(_step("map"), may_skip=False) == "map_plain"
    assert worker_op(_step("map"), may_skip=True) == "map"
    assert worker_op(_step("filter"), may_skip=False) == "filter"
