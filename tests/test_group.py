"""errgroup behaviour, after Go's golang.org/x/sync/errgroup and its SetLimit/TryGo."""

from __future__ import annotations

import threading
import time

import pytest

import pipeflow as pf


def test_wait_returns_when_all_tasks_finish() -> None:
    results: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> None:
        time.sleep(0.01)
        with lock:
            results.append(i)

    with pf.Group() as g:
        for i in range(20):
            g.go(work, i)
    assert sorted(results) == list(range(20))


def test_task_handles_give_results_and_kwargs_pass_through() -> None:
    with pf.Group() as g:
        t = g.go(lambda a, b=0: a + b, 2, b=3)
    assert t.done()
    assert t.result() == 5
    assert t.exception() is None


def test_first_error_is_reraised_and_cancels_the_context() -> None:
    started = threading.Event()
    saw_cancel = threading.Event()

    def fails() -> None:
        started.wait(5)
        raise KeyError("first")

    def watches(g: pf.Group) -> None:
        started.set()
        if g.context.wait(timeout=5):
            saw_cancel.set()

    with pytest.raises(KeyError, match="first") as info, pf.Group() as g:
        g.go(watches, g)
        g.go(fails)
    assert saw_cancel.is_set()
    assert g.context.cancelled
    assert "KeyError" in (g.context.reason or "")
    # The traceback reaches into the task's own frame.
    frames = []
    tb = info.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_name)
        tb = tb.tb_next
    assert "fails" in frames


def test_later_errors_are_attached_not_lost() -> None:
    barrier = threading.Barrier(3)

    def fail(i: int) -> None:
        barrier.wait(5)
        raise ValueError(f"task {i}")

    with pytest.raises(ValueError) as info, pf.Group() as g:
        for i in range(3):
            g.go(fail, i)
    assert len(g.errors) == 3
    assert g.errors[0] is info.value
    assert "2 other task(s) also failed" in info.value.__notes__[0]


def test_limit_bounds_concurrency() -> None:
    running = 0
    peak = 0
    lock = threading.Lock()

    def work() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.01)
        with lock:
            running -= 1

    with pf.Group(limit=3) as g:
        for _ in range(30):
            g.go(work)
    assert 1 <= peak <= 3


def test_try_go_returns_false_at_the_limit() -> None:
    release = threading.Event()
    with pf.Group(limit=1) as g:
        first = g.try_go(release.wait, 5)
        assert first
        assert g.try_go(lambda: None) is False
        release.set()
    assert first is not False and first.result() is True


def test_go_after_failure_starts_nothing() -> None:
    ran = threading.Event()
    g = pf.Group()
    g.go(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        g.wait()
    t = g.go(ran.set)
    assert t.done()
    with pytest.raises(pf.Cancelled):
        t.result()
    assert not ran.is_set()


def test_wait_without_errors_and_reusable_wait() -> None:
    g = pf.Group()
    release = threading.Event()
    task = g.go(lambda: release.wait(5) and 7)
    threading.Timer(0.05, release.set).start()
    g.wait()  # returns only once the task did, and raises nothing
    assert task.done() and task.result() == 7
    assert g.errors == []
    assert g.context.cancelled  # as errgroup's Wait: the group's context is done after it
    late = g.go(lambda: pf.current_context().cancelled)  # still runs, and sees that
    g.wait()  # waits for the late task too, and again raises nothing
    assert late.done() and late.result() is True


def test_body_exception_cancels_tasks_and_propagates() -> None:
    stopped = threading.Event()

    def loop(ctx: pf.Context) -> None:
        ctx.wait(timeout=5)
        stopped.set()

    with pytest.raises(RuntimeError, match="body"), pf.Group() as g:
        g.go(loop, g.context)
        raise RuntimeError("body")
    assert stopped.is_set()


def test_tasks_see_the_group_context_as_current() -> None:
    with pf.Group() as g:
        t = g.go(pf.current_context)
    assert t.result() is g.context


def test_nested_groups_inside_tasks() -> None:
    def inner(n: int) -> int:
        with pf.Group() as g:
            ts = [g.go(lambda i=i: i * i) for i in range(n)]
        return sum(t.result() for t in ts)

    with pf.Group(limit=2) as g:
        outer = [g.go(inner, n) for n in range(6)]
    assert [t.result() for t in outer] == [sum(i * i for i in range(n)) for n in range(6)]


def test_parent_context_cancellation_reaches_the_group() -> None:
    parent = pf.Context()
    g = pf.Group(context=parent)
    parent.cancel("outer shutdown")
    assert g.context.cancelled
    assert g.context.reason == "outer shutdown"


def test_task_result_timeout() -> None:
    release = threading.Event()
    with pf.Group() as g:
        t = g.go(release.wait, 5)
        with pytest.raises(TimeoutError):
            t.result(timeout=0.01)
        release.set()


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_limit(bad: int) -> None:
    with pytest.raises(ValueError, match="limit must be >= 1"):
        pf.Group(limit=bad)


def test_go_needs_a_callable() -> None:
    with pf.Group() as g, pytest.raises(TypeError, match="needs a callable"):
        g.go(42)  # type: ignore[call-overload]


def test_context_is_done_after_a_successful_wait_and_the_group_still_runs_tasks() -> None:
    g = pf.Group()
    g.go(lambda: None)
    g.wait()
    assert g.context.cancelled  # as errgroup.WithContext after Wait
    assert g.go(lambda: 7).result(timeout=5) == 7
    g.wait()


def test_tasks_started_after_the_parent_context_is_cancelled_do_not_pass_for_done() -> None:
    ran: list[int] = []
    parent = pf.Context()
    with pytest.raises(pf.Cancelled, match="shutdown"), pf.Group(context=parent) as g:
        g.go(ran.append, 1).result()
        parent.cancel("shutdown")
        skipped = g.go(ran.append, 2)
    assert ran == [1]
    assert isinstance(skipped.exception(), pf.Cancelled)


def test_the_background_context_cannot_be_cancelled() -> None:
    with pytest.raises(RuntimeError, match="background context cannot be cancelled"):
        pf.current_context().cancel("oops")
    assert not pf.current_context().cancelled
    assert pf.Pipeline(kind="thread").stage(abs).run([-1, 2]) == [1, 2]
