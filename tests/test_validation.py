"""Bad arguments fail at once, before any worker starts, with a message saying what to do."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import pipeflow as pf

P = pf.Pipeline(kind="thread")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"workers": 0}, ValueError, "workers must be >= 1"),
        ({"workers": -2}, ValueError, "workers must be >= 1"),
        ({"workers": 1.5}, TypeError, "workers must be an int"),
        ({"workers": True}, TypeError, "workers must be an int"),
        ({"kind": "fiber"}, ValueError, "kind must be 'thread' or 'process'"),
        ({"kind": ""}, ValueError, "kind must be 'thread' or 'process'"),
        ({"kind": 0}, ValueError, "kind must be 'thread' or 'process'"),
        ({"capacity": -1}, ValueError, "capacity must be >= 0"),
        ({"capacity": 2**62}, ValueError, "capacity must be <= "),
        ({"ordered": "yes"}, TypeError, "ordered must be True or False"),
        ({"init": 3}, TypeError, "init must be a callable"),
        ({"timeout": 0}, ValueError, "timeout must be seconds > 0"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds"),
        ({"retries": -1}, ValueError, "retries must be >= 0"),
        ({"name": 5}, TypeError, "name must be a str"),
    ],
)
def test_bad_stage_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        P.stage(abs, **kwargs)


def test_non_callable_stage() -> None:
    with pytest.raises(TypeError, match="map needs a callable, got int"):
        P.stage(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="filter needs a callable"):
        P.filter("x")  # type: ignore[arg-type]


def test_a_function_that_cannot_go_to_a_process_names_itself() -> None:
    lock = threading.Lock()

    def holds_a_lock(x: int) -> object:
        return lock

    with pytest.raises(TypeError, match=r"'.*holds_a_lock' of this map step cannot be sent"):
        pf.Pipeline().stage(holds_a_lock)
    with pytest.raises(TypeError, match="the init"):
        pf.Pipeline().stage(abs, init=lambda: lock)
    # Threads need no pickling.
    assert pf.Pipeline(kind="thread").stage(holds_a_lock).run([1]) == [lock]


def test_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="size must be >= 1"):
        P.batch(0)


def test_non_iterable_items() -> None:
    with pytest.raises(TypeError, match="items must be iterable, got int"):
        P.stage(abs).run(5)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"timeout": -1}, ValueError, "timeout must be seconds > 0"),
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds"),
        ({"context": "ctx"}, TypeError, "context must be a pipeflow.Context"),
        (
            {"backend": "nowhere"},
            ValueError,
            r"backend must be one of \[('dask', )?'local', 'serial'\]",
        ),
        ({"backend": 3}, TypeError, "an object with a stream"),
        ({"progress": "yes"}, TypeError, "progress must be True or False"),
    ],
)
def test_bad_run_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        P.stage(abs).run([1], **kwargs)


def test_bad_pipeline_arguments() -> None:
    with pytest.raises(ValueError, match="kind must be"):
        pf.Pipeline(kind="gpu")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="ordered must be True or False"):
        pf.Pipeline(ordered=1)  # type: ignore[arg-type]


def test_validation_starts_nothing() -> None:
    from pipeflow import _pool

    running = _pool.default_pool().running
    with pytest.raises(TypeError):
        P.stage(abs).run(None)  # type: ignore[arg-type]
    assert _pool.default_pool().running == running


def test_more_thread_workers_than_the_pool_can_hold() -> None:
    from pipeflow import _pool

    p = P.stage(abs, workers=_pool.MAX_THREADS)
    with pytest.raises(ValueError, match="use fewer workers"):
        p.run([1])


def test_misspelt_option_is_named() -> None:
    with pytest.raises(TypeError, match=r"unexpected option\(s\) worker; valid: workers"):
        P.stage(abs, worker=4)  # type: ignore[call-arg]


def test_a_context_timeout_must_be_a_number() -> None:
    with pytest.raises(TypeError, match="timeout must be a number of seconds"):
        pf.Context(timeout="5")  # type: ignore[arg-type]
