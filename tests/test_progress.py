"""``progress=``: True / False, a dict of tqdm options, or a bar class, on every way of running a
stage; bad values fail before anything runs; no bar leaves a thread behind.

The bar in a Jupyter kernel (widget or text, and what the saved notebook keeps) is tested in a
real kernel by ``test_notebook``.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from tqdm._monitor import TMonitor
from tqdm.std import tqdm

import pipeflow as pf
from pipeflow._progress import QUIET_INTERVAL, open_bar


def inc(x: int) -> int:
    return x + 1


class Recorder:
    """A progress bar of our own: records what pipeflow tells it."""

    made: list[Recorder]

    def __init__(self, total: int | None, **options: Any) -> None:
        self.total = total
        self.options = options
        self.updates: list[int] = []
        self.closed = 0
        type(self).made.append(self)

    def update(self, n: int) -> None:
        self.updates.append(n)

    def close(self) -> None:
        self.closed += 1


@pytest.fixture
def recorder() -> type[Recorder]:
    """A fresh Recorder class: ``made`` lists the bars it made in this test."""
    return type("Recorder", (Recorder,), {"made": []})


def test_a_bar_class_gets_the_total_updates_summing_to_it_and_one_close(
    kind: str, recorder: type[Recorder]
) -> None:
    out = pf.Pipeline(kind=kind).stage(inc, workers=2).run(range(50), progress=recorder)  # type: ignore[arg-type]
    assert out == list(range(1, 51))
    (bar,) = recorder.made
    assert bar.total == 50 and bar.options == {"unit": "item"}
    assert sum(bar.updates) == 50 and all(n > 0 for n in bar.updates)
    assert bar.closed == 1


def test_iter_updates_the_bar_and_closes_it_when_left_early(
    kind: str, recorder: type[Recorder]
) -> None:
    results = pf.Pipeline(kind=kind).stage(inc).iter(itertools.count(), progress=recorder)  # type: ignore[arg-type]
    assert [next(results) for _ in range(5)] == [1, 2, 3, 4, 5]
    (bar,) = recorder.made
    assert bar.total is None  # an endless input has no length
    results.close()
    assert bar.closed == 1
    assert sum(bar.updates) >= 5  # at least the items taken are done


def test_a_failed_run_closes_its_bar(kind: str, recorder: type[Recorder]) -> None:
    def fail_at_3(x: int) -> int:
        if x == 3:
            raise ValueError(x)
        return x

    with pytest.raises(ValueError):
        pf.Pipeline(kind=kind).stage(fail_at_3).run(range(10), progress=recorder)  # type: ignore[arg-type]
    (bar,) = recorder.made
    assert bar.closed == 1 and sum(bar.updates) < 10


def test_a_factory_such_as_a_partial_is_called_like_a_class(recorder: type[Recorder]) -> None:
    bars = functools.partial(recorder, desc="rows")
    pf.Pipeline(kind="thread").stage(inc).run(range(7), progress=bars)
    (bar,) = recorder.made
    assert bar.options == {"desc": "rows", "unit": "item"} and sum(bar.updates) == 7


def test_tqdm_options_reach_the_bar(kind: str) -> None:
    out = io.StringIO()
    options = {"file": out, "desc": "work", "unit": "row"}
    pf.Pipeline(kind=kind).stage(inc).run(range(30), progress=options)  # type: ignore[arg-type]
    shown = out.getvalue()
    assert "work: 100%" in shown and "30/30" in shown and "row/s" in shown


def test_a_disabled_bar_and_no_bar_show_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    p = pf.Pipeline(kind="thread").stage(inc)
    assert p.run(range(20), progress={"disable": True, "file": out}) == list(range(1, 21))
    assert p.run(range(20), progress={"disable": True}) == list(range(1, 21))
    assert p.run(range(20), progress=False) == list(range(1, 21))
    assert out.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_a_tqdm_class_of_the_user_starts_no_monitor_thread() -> None:
    class Mine(tqdm):  # type: ignore[misc]  # tqdm's monitor_interval: 10 s, a thread
        pass

    seen: list[bool] = []

    def look(x: int) -> int:
        seen.append(any(isinstance(t, TMonitor) for t in threading.enumerate()))
        return x

    out = io.StringIO()
    bars = functools.partial(Mine, file=out)
    pf.Pipeline(kind="thread").stage(look).run(range(5), progress=bars)
    assert seen == [False] * 5
    assert "5/5" in out.getvalue()


def test_a_bar_on_a_stream_that_is_not_a_terminal_is_redrawn_rarely() -> None:
    """A log file or a pipe gets a line every few seconds, not tqdm's ten a second; a terminal
    keeps tqdm's default; an explicit ``mininterval`` wins."""
    log = io.StringIO()
    bar: Any = open_bar({"file": log}, 10)
    assert bar.mininterval == QUIET_INTERVAL
    bar.close()
    bar = open_bar({"file": log, "mininterval": 0.5}, 10)
    assert bar.mininterval == 0.5
    bar.close()
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        bar = open_bar({"file": terminal}, 10)
        assert bar.mininterval == 0.1  # tqdm's default
        bar.close()
    os.close(leader)


def _untouched() -> tuple[list[int], Iterator[int]]:
    read: list[int] = []

    def items() -> Iterator[int]:
        read.append(1)
        yield 1

    return read, items()


def no_bar(**_: Any) -> object:
    return object()


@pytest.mark.parametrize(
    ("progress", "error", "match"),
    [
        ("yes", TypeError, "progress must be True or False, a dict of tqdm options"),
        (1, TypeError, "progress must be True or False"),
        (None, TypeError, "or a progress bar class"),
        ({"colr": "red"}, ValueError, "tqdm has no option 'colr'; its options are .*colour"),
        ({1: True}, ValueError, "tqdm has no option 1"),
        (no_bar, TypeError, "made 'object', which has no update"),
    ],
)
@pytest.mark.parametrize("call", ["run", "iter"])
def test_bad_values_fail_before_anything_runs(
    progress: object, error: type[Exception], match: str, call: str
) -> None:
    ran: list[int] = []

    def stage(x: int) -> int:
        ran.append(x)
        return x

    read, items = _untouched()
    method: Callable[..., Any] = getattr(pf.Pipeline(kind="thread").stage(stage), call)
    with pytest.raises(error, match=match):
        method(items, progress=progress)
    assert read == [] and ran == []


def test_a_bar_class_that_raises_fails_the_call_with_a_note() -> None:
    class Broken:
        def __init__(self, **_: Any) -> None:
            raise RuntimeError("no screen")

    read, items = _untouched()
    with pytest.raises(RuntimeError, match="no screen") as info:
        pf.Pipeline(kind="thread").stage(inc).run(items, progress=Broken)  # type: ignore[arg-type]
    assert any("while making the progress bar" in n for n in info.value.__notes__)
    assert read == []
