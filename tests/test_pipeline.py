"""Pipeline behaviour, run once per way of running a stage (the ``kind`` fixture)."""

from __future__ import annotations

import functools
import itertools
import os
import pathlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import pipeflow as pf
from pipeflow import _local, _sizing
from pipeflow._process_stage import ProcessRunner


def inc(x: int) -> int:
    return x + 1


def square(x: int) -> int:
    return x * x


def is_even(x: int) -> bool:
    return x % 2 == 0


def test_stage_keeps_input_order(kind: str) -> None:
    p = pf.Pipeline(kind=kind).stage(inc, workers=4)  # type: ignore[arg-type]
    assert p.run(range(1000)) == [x + 1 for x in range(1000)]


def test_multi_stage_with_filter_flat_map_and_batch(kind: str) -> None:
    p = (
        pf.Pipeline(kind=kind)  # type: ignore[arg-type]
        .stage(square, workers=3)
        .filter(is_even, workers=2)
        .flat_map(lambda x: [x, -x] if x else [], workers=2)
        .batch(4)
        .stage(sum, workers=2)
    )
    expected_items = [
        v for x in range(50) if (x * x) % 2 == 0 for v in ([x * x, -x * x] if x else [])
    ]
    expected = [sum(expected_items[i : i + 4]) for i in range(0, len(expected_items), 4)]
    assert p.run(range(50)) == expected


def test_empty_input(kind: str) -> None:
    assert pf.Pipeline(kind=kind).stage(inc).batch(3).run([]) == []  # type: ignore[arg-type]


def test_pipeline_without_steps_passes_items_through() -> None:
    assert pf.Pipeline().run(iter(range(5))) == [0, 1, 2, 3, 4]


def test_unordered_returns_every_result(kind: str) -> None:
    def jitter(x: int) -> int:
        time.sleep(0.001 * (x % 3))
        return x

    p = pf.Pipeline(kind=kind, ordered=False).stage(jitter, workers=4)  # type: ignore[arg-type]
    assert sorted(p.run(range(100))) == list(range(100))


@pytest.mark.concurrent
def test_unordered_yields_in_completion_order(kind: str) -> None:
    def slow_first(x: int) -> int:
        if x == 0:
            time.sleep(0.3)
        return x

    p = pf.Pipeline(kind=kind, ordered=False).stage(slow_first, workers=2)  # type: ignore[arg-type]
    out = p.run(range(6))
    assert sorted(out) == list(range(6))
    assert out[-1] == 0


def test_ordered_batch_groups_consecutive_items(kind: str) -> None:
    def jitter(x: int) -> int:
        time.sleep(0.0005 * (x % 4))
        return x

    p = pf.Pipeline(kind=kind).stage(jitter, workers=4).batch(5)  # type: ignore[arg-type]
    assert p.run(range(23)) == [list(range(i, min(i + 5, 23))) for i in range(0, 23, 5)]


def test_flat_map_nested_keeps_order(kind: str) -> None:
    p = (
        pf.Pipeline(kind=kind)  # type: ignore[arg-type]
        .flat_map(lambda n: range(n), workers=3)
        .flat_map(lambda m: [m] * (m % 3), workers=3)
    )
    expected = [v for n in range(12) for m in range(n) for v in [m] * (m % 3)]
    assert p.run(range(12)) == expected


def _endless(pulled: Iterator[int]) -> Iterator[int]:
    """0, 1, 2, ... without end, counting in ``pulled`` how many were read."""
    for i in itertools.count():
        next(pulled)
        yield i


def test_iter_is_lazy_on_an_endless_input(kind: str) -> None:
    pulled = itertools.count()
    source = functools.partial(_endless, pulled)

    results = pf.Pipeline(kind=kind).stage(square, workers=2).iter(source())  # type: ignore[arg-type]
    first = [next(results) for _ in range(10)]
    assert first == [i * i for i in range(10)]
    time.sleep(0.1)
    read_ahead = next(pulled)
    results.close()
    # Bounded read-ahead: the source was not drained without limit. The bound: the window (a
    # few batches per worker and queue slot), the batch being filled, and what the caller was
    # handed but did not take (a batch, and those held back behind it: one per worker).
    slots = 2 + 4  # workers + the default capacity
    bound = (_sizing.WINDOW_BATCHES * slots + 4) * _sizing.MAX_CHUNK
    assert read_ahead < bound


def test_memory_stays_bounded_behind_a_slow_stage(kind: str) -> None:
    pulled = itertools.count()
    source = functools.partial(_endless, pulled)

    def slow(x: int) -> int:
        time.sleep(0.01)
        return x

    results = pf.Pipeline(kind=kind).stage(slow, workers=2).iter(source())  # type: ignore[arg-type]
    assert next(results) == 0
    time.sleep(0.3)
    read_ahead = next(pulled)
    results.close()
    assert read_ahead < 5_000  # backpressure reached the input iterator


def _identity_init() -> tuple[tuple[int, int], str]:
    return (os.getpid(), threading.get_ident()), uuid.uuid4().hex


def _tag(x: int) -> tuple[int, tuple[tuple[int, int], str]]:
    return x, pf.worker_state()


def test_init_runs_once_per_worker(kind: str) -> None:
    out = pf.Pipeline(kind=kind).stage(_tag, workers=3, init=_identity_init).run(range(200))  # type: ignore[arg-type]
    assert [x for x, _ in out] == list(range(200))
    tokens: dict[tuple[int, int], set[str]] = {}
    for _, (worker, token) in out:
        tokens.setdefault(worker, set()).add(token)
    assert 1 <= len(tokens) <= 3  # at most one state per worker...
    assert all(len(t) == 1 for t in tokens.values())  # ...made once, not per item


def test_worker_state_outside_a_stage_says_why() -> None:
    with pytest.raises(LookupError, match="init="):
        pf.worker_state()


def test_stage_code_sees_the_run_context() -> None:
    # Threads only: a context does not cross into a worker process (a process worker is
    # stopped by killing it instead).
    seen: list[pf.Context] = []

    def grab(x: int) -> int:
        seen.append(pf.current_context())
        return x

    with pf.Context() as outer:
        pf.Pipeline(kind="thread").stage(grab).run(range(3))
    assert seen and all(c is seen[0] for c in seen)
    assert seen[0] is not outer
    assert seen[0]._parent is outer


def _flaky(arg: tuple[int, str]) -> int:
    x, folder = arg
    marker = pathlib.Path(folder, str(x))
    attempts = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(attempts))
    if x % 5 == 0 and attempts < 3:
        raise ConnectionError("transient")
    return x


def test_retries_rerun_a_failing_item(kind: str, tmp_path: pathlib.Path) -> None:
    p = pf.Pipeline(kind=kind).stage(_flaky, workers=2, retries=2)  # type: ignore[arg-type]
    assert p.run([(x, str(tmp_path)) for x in range(20)]) == list(range(20))
    assert (tmp_path / "5").read_text() == "3"
    assert (tmp_path / "6").read_text() == "1"


def test_retries_exhausted_raise_with_a_note(kind: str) -> None:
    def always(x: int) -> int:
        raise ConnectionError("down")

    p = pf.Pipeline(kind=kind).stage(always, retries=2)  # type: ignore[arg-type]
    with pytest.raises(ConnectionError) as info:
        p.run([1])
    assert any("failed 3 times" in n for n in info.value.__notes__)


def test_progress_bar_counts_items(kind: str, capsys: pytest.CaptureFixture[str]) -> None:
    pf.Pipeline(kind=kind).stage(inc).run(range(50), progress=True)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "50/50" in err


def test_pipelines_are_immutable_and_reusable(kind: str) -> None:
    base = pf.Pipeline(kind=kind).stage(inc)  # type: ignore[arg-type]
    a = base.stage(square)
    b = base.filter(is_even)
    assert len(base.steps) == 1
    assert a.run(range(4)) == [1, 4, 9, 16]
    assert b.run(range(4)) == [2, 4]
    assert a.run(range(2)) == [1, 4]


def test_to_mermaid() -> None:
    p = pf.Pipeline(kind="thread").stage(inc, workers=8, name="resize").filter(is_even).batch(32)
    assert p.to_mermaid() == "\n".join(
        [
            "flowchart LR",
            '    input([input]) --> s0["resize<br/>map · thread x 8"]',
            '    s0 --> s1["is_even<br/>filter · thread x 1"]',
            '    s1 --> s2["batch(32)<br/>batch of 32"]',
            "    s2 --> output([output])",
        ]
    )


def _interval(x: int) -> tuple[int, float, float]:
    start = time.monotonic()
    time.sleep(0.005)
    return x, start, time.monotonic()


@pytest.mark.concurrent
def test_many_workers_fan_out_and_in(kind: str) -> None:
    out = pf.Pipeline(kind=kind).stage(_interval, workers=8).run(range(64))  # type: ignore[arg-type]
    assert [x for x, _, _ in out] == list(range(64))
    # Peak concurrency from the intervals (CLOCK_MONOTONIC is shared by processes).
    events = sorted([(s, 1) for _, s, _ in out] + [(e, -1) for _, _, e in out])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 2 <= peak <= 8  # bounded by workers, and really concurrent


def test_a_nested_stage_without_init_does_not_see_the_outer_state(kind: str) -> None:
    def inner(x: int) -> bool:
        try:
            pf.worker_state()
        except LookupError:
            return False
        return True

    def outer(x: int) -> list[bool]:
        return pf.Pipeline(kind=kind).stage(inner).run([x])  # type: ignore[arg-type]

    p = pf.Pipeline(kind=kind).stage(outer, init=lambda: "OUTER")  # type: ignore[arg-type]
    assert p.run([1, 2]) == [[False], [False]]


def test_iter_gives_results_that_close(kind: str) -> None:
    results = pf.Pipeline(kind=kind).stage(abs).iter(itertools.count())  # type: ignore[arg-type]
    assert isinstance(results, pf.Results)  # itertools.chain.from_iterable kept the subclass
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    results.close()  # stops the endless run; the leak check after the test sees nothing left
    with pytest.raises(StopIteration):
        next(results)


def test_leaving_a_with_block_over_results_stops_the_run(kind: str) -> None:
    p = pf.Pipeline(kind=kind).stage(abs)  # type: ignore[arg-type]
    with p.iter(itertools.count()) as results:
        assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(StopIteration):  # stopped; the leak check after the test sees nothing left
        next(results)
    with pytest.raises(KeyError), p.iter(itertools.count()) as results:
        next(results)
        raise KeyError("an error in the block stops the run too")


def test_a_closed_results_gives_nothing_more(kind: str) -> None:
    # Results are released a list at a time: close() also drops the rest of the list the
    # caller was in the middle of (thousands of items here, once the batches have grown).
    results = pf.Pipeline(kind=kind).stage(abs).iter(range(100_000))  # type: ignore[arg-type]
    assert [next(results) for _ in range(5000)] == list(range(5000))
    results.close()
    with pytest.raises(StopIteration):
        next(results)


@pytest.mark.parametrize("kind_", ["thread", "process"])
def test_batches_shrink_near_the_end_of_a_known_length(kind_: str) -> None:
    # Guided scheduling: a batch takes at most a 2 * workers-th of what is left, down to
    # TAIL_SECONDS of work, so that the workers finish together.
    (step,) = pf.Pipeline(kind=kind_).stage(inc, workers=2)._steps
    traits = _local.RUNNERS[kind_].traits(step)
    st = _sizing.Sizer(step, traits)
    st.measure(0.1, 100, 0)  # 1 ms an item
    full = round(traits.batch_seconds / 0.001)
    tail = round(_sizing.TAIL_SECONDS / 0.001)
    assert st.chunk() == st.chunk(10 * full) == full
    assert st.chunk(2 * full) == -(-2 * full // 4)
    assert st.chunk(1) == tail  # never below the tail size (the feeder takes what is left)
    assert [st.chunk(n) for n in range(1, 4 * full)] == sorted(
        st.chunk(n) for n in range(1, 4 * full)
    )


def test_a_process_steps_batches_grow_with_a_long_run_over_a_known_length(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Up to an eighth of the run so far, at most GROWN_SECONDS; and still shrinking at the end.
    (step,) = pf.Pipeline().stage(inc, workers=2)._steps
    traits = ProcessRunner.traits(step)
    st = _sizing.Sizer(step, traits)
    st.measure(0.1, 100, 0)  # 1 ms an item
    base = round(traits.batch_seconds / 0.001)
    clock = [st.started + 100.0]
    monkeypatch.setattr(_sizing, "perf_counter", lambda: clock[0])
    assert st.chunk() == base  # a step that does not grow
    st.grows = True
    assert st.chunk() == round(_sizing.GROWN_SECONDS / 0.001)
    clock[0] = st.started + 1.0
    assert st.chunk() == round(_sizing.GROWTH * 1.0 / 0.001)
    clock[0] = st.started + 0.01
    assert st.chunk() == base  # never below the usual size
    clock[0] = st.started + 100.0
    assert st.chunk(40) == -(-40 // 4)  # the guided tail
    assert st.quick()  # 1 ms items: a grown batch may still wait behind another


@pytest.mark.parametrize(
    ("kinds", "length", "grows"),
    [
        (("process",), True, [True]),
        (("process",), False, [False]),
        (("thread",), True, [False]),
        (("process", "process"), True, [True, False]),  # after a step, the count is unknown
    ],
)
def test_only_a_first_process_step_over_a_known_length_grows_its_batches(
    monkeypatch: pytest.MonkeyPatch, kinds: tuple[str, ...], length: bool, grows: list[bool]
) -> None:
    seen: list[list[bool]] = []
    released = _local.Run.released

    def spy(self: _local.Run, progress: Any = None) -> Any:
        seen.append([st.grows for st in self.sizers])
        return released(self, progress)

    monkeypatch.setattr(_local.Run, "released", spy)
    p = pf.Pipeline()
    for kind in kinds:
        p = p.stage(inc, kind=kind)
    items = list(range(10))
    assert p.run(items if length else iter(items)) == [x + len(kinds) for x in items]
    assert seen == [grows]


def test_the_feeder_tells_the_first_step_how_many_items_are_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[int | None] = []
    chunk = _sizing.Sizer.chunk

    def spy(self: _sizing.Sizer, remaining: int | None = None) -> int:
        asked.append(remaining)
        return chunk(self, remaining)

    monkeypatch.setattr(_sizing.Sizer, "chunk", spy)
    p = pf.Pipeline(kind="thread").stage(inc)
    assert p.run(list(range(500))) == list(range(1, 501))
    lefts = [n for n in asked if n is not None]
    assert lefts[0] == 500 and all(n > 0 for n in lefts)
    assert lefts == sorted(lefts, reverse=True)
    asked.clear()
    assert p.run(iter(range(500))) == list(range(1, 501))  # no length: no tail to plan
    assert asked and all(n is None for n in asked)
