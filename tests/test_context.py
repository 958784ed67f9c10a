"""Context behaviour, after Go's context package: cancel flows down, deadlines, current context."""

from __future__ import annotations

import threading
import time

import pytest

import pipeflow as pf


def test_cancel_once_with_reason() -> None:
    ctx = pf.Context()
    assert not ctx.cancelled
    assert ctx.reason is None
    assert ctx.cancel("stop")
    assert not ctx.cancel("again")
    assert ctx.cancelled and ctx.reason == "stop"
    with pytest.raises(pf.Cancelled, match="stop"):
        ctx.raise_if_cancelled()


def test_children_are_cancelled_with_the_parent_not_the_other_way() -> None:
    parent = pf.Context()
    child = pf.Context(parent=parent)
    grandchild = pf.Context(parent=child)
    child2 = pf.Context(parent=parent)
    child2.cancel()
    assert not parent.cancelled
    parent.cancel("root")
    assert child.cancelled and grandchild.cancelled
    assert grandchild.reason == "root"


def test_child_of_a_cancelled_parent_starts_cancelled() -> None:
    parent = pf.Context()
    parent.cancel("gone")
    assert pf.Context(parent=parent).cancelled


def test_deadline_cancels_as_deadline_exceeded() -> None:
    ctx = pf.Context(timeout=0.05)
    assert ctx.deadline is not None
    assert not ctx.cancelled
    assert ctx.wait(timeout=5)
    assert ctx.expired
    with pytest.raises(pf.DeadlineExceeded) as info:
        ctx.raise_if_cancelled()
    assert isinstance(info.value, TimeoutError)
    assert isinstance(info.value, pf.Cancelled)


def test_child_inherits_an_earlier_parent_deadline() -> None:
    parent = pf.Context(timeout=0.05)
    child = pf.Context(timeout=60, parent=parent)
    assert child.deadline == parent.deadline
    assert child.wait(timeout=5)
    assert child.expired


def test_wait_times_out_when_not_cancelled() -> None:
    t0 = time.monotonic()
    assert not pf.Context().wait(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04


def test_wait_wakes_on_cancel_from_another_thread() -> None:
    ctx = pf.Context()
    threading.Timer(0.05, ctx.cancel).start()
    assert ctx.wait(timeout=5)


def test_current_context_defaults_to_a_background_context() -> None:
    bg = pf.current_context()
    assert not bg.cancelled
    with pf.Context() as ctx:
        assert pf.current_context() is ctx
    assert pf.current_context() is bg


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_bad_timeout(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        pf.Context(timeout=bad)


def test_bad_parent() -> None:
    with pytest.raises(TypeError, match="parent"):
        pf.Context(parent="nope")  # type: ignore[arg-type]


def test_a_context_can_be_entered_again_nested_and_in_threads() -> None:
    ctx = pf.Context()
    with ctx:
        with ctx:
            assert pf.current_context() is ctx
        assert pf.current_context() is ctx
    seen: list[pf.Context] = []

    def enter() -> None:
        with ctx:
            seen.append(pf.current_context())

    threads = [threading.Thread(target=enter) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [ctx] * 4
