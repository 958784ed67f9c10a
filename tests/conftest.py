"""Shared fixtures: every test must leave no thread, task, file descriptor, child process or
shared-memory block behind."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import psutil
import pytest

from pipeflow import _pool, _process, _shm, _zygote

# Every way of running a stage: the behaviour suite runs once per way. A backend joins the
# suite by adding its way here (and to ``way`` below): ``PIPEFLOW_BACKEND`` selects it for every
# run of the test that names no backend.
WAYS = ["thread", "process", "serial"]


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> list[psutil.Process]:
    """This process's descendants but the fork server (it stays, as the pool's threads do; its
    children, the workers it forked, count)."""
    server = _zygote.server_pid()
    return [p for p in psutil.Process().children(recursive=True) if p.pid != server]


def _non_pool_threads() -> int:
    return _os_threads() - _pool.default_pool().threads


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    """Polls ``predicate()`` until true or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        ok = bool(predicate())  # type: ignore[operator]
        if ok or time.monotonic() >= deadline:
            return ok
        time.sleep(0.01)


def assert_clean(threads_before: int, python_threads_before: int, fds_before: int) -> None:
    """No pool job running, no thread, fd or child process more than before (idle warm worker
    processes are a cache: they are stopped first, and must then be gone like the rest)."""
    _process.shutdown_idle()
    pool = _pool.default_pool()
    assert wait_until(lambda: pool.running == 0), f"pool jobs still running: {pool!r}"
    assert wait_until(lambda: _non_pool_threads() <= threads_before), (
        f"threads leaked: {_non_pool_threads()} now vs {threads_before} before ({pool!r})"
    )
    assert wait_until(lambda: threading.active_count() <= python_threads_before), (
        f"Python threads leaked: {threading.enumerate()}"
    )
    # A failed run's exception and its traceback form a reference cycle with the frames that
    # hold a worker's rings: the collector frees them (and their memfds), not refcounting.
    gc.collect()
    assert wait_until(lambda: _fds() <= fds_before), "file descriptors leaked"
    assert wait_until(lambda: not _children()), f"child processes left: {_children()}"
    assert wait_until(lambda: _shm.stats()["blocks"] == 0), (
        f"shared-memory blocks left: {_shm.stats()}"
    )


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: nothing left running (tests marked ``leaky`` opt out). The fork server
    is started first, if it is not running, so that its socket is not counted as a leak."""
    if _process.start_method() == "forkserver":
        _zygote.server()
    before = (_non_pool_threads(), threading.active_count(), _fds())
    yield
    if request.node.get_closest_marker("leaky") is None:
        assert_clean(*before)


@pytest.fixture(params=WAYS)
def way(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every way of running a stage: the local backend's threads and worker processes, and the
    serial backend (on which the tests marked ``concurrent`` are skipped: they count workers
    running at once, or time how soon an item in hand is given up)."""
    way = str(request.param)
    if way == "serial":
        if request.node.get_closest_marker("concurrent") is not None:
            pytest.skip("needs workers apart from the caller; the serial backend has none")
        monkeypatch.setenv("PIPEFLOW_BACKEND", "serial")
    return way


@pytest.fixture
def kind(way: str) -> str:
    """The stage kind of the way under test (the serial backend runs a thread pipeline)."""
    return "process" if way == "process" else "thread"


def pytest_configure(config: pytest.Config) -> None:
    # The arena lives as long as the process (one memfd): made first, so that no test counts it.
    _shm.arena()
    config.addinivalue_line("markers", "leaky: the test leaves threads running on purpose")
    config.addinivalue_line(
        "markers",
        "concurrent: the test needs workers apart from the caller, running at once or stopped "
        "mid-item (not on the serial backend)",
    )
