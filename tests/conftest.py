"""Shared fixtures: every test must leave no thread, task, file descriptor, child process or
shared-memory block behind."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pipeflow import _pool, _process, _shm, _zygote

# Every way of running a stage: the behaviour suite runs once per way. A backend joins the
# suite by adding its way here (and to ``way`` below): ``PIPEFLOW_BACKEND`` selects it for every
# run of the test that names no backend.
WAYS = ["thread", "process", "serial", "dask"]

# Long-lived helper processes the tests share, as they share the fork server: the Dask test
# cluster (its scheduler and workers are its descendants). The leak check leaves them out.
_services: list[int] = []


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> list[psutil.Process]:
    """This process's descendants but the fork server (it stays, as the pool's threads do; its
    children, the workers it forked, count)."""
    server = _zygote.server_pid()
    shared = {server}
    for pid in _services:
        try:
            service = psutil.Process(pid)
            shared |= {pid, *(p.pid for p in service.children(recursive=True))}
        except psutil.NoSuchProcess:
            pass
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in shared]


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


class DaskCluster:
    """A Dask ``LocalCluster`` of 2 worker processes (one thread each) for the whole session,
    started at first use in a helper process of its own (so that this process holds nothing of
    it between tests: each test's client is made and closed by the test). Its workers can import
    the tests' modules (functions defined there travel by reference, as a user's modules do)."""

    SCRIPT = textwrap.dedent(
        """
        import ctypes, os, signal, sys, threading
        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: gone with the tests
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if os.getppid() != parent:
            sys.exit(0)
        from distributed import LocalCluster
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
            scheduler_kwargs={"dashboard_address": ":0"},
        )
        with open(sys.argv[1] + ".part", "w") as f:
            f.write(cluster.scheduler_address)
        os.rename(sys.argv[1] + ".part", sys.argv[1])
        while not stop.wait(0.5):
            pass
        cluster.close()
        """
    )

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        self._proc: subprocess.Popen[bytes] | None = None
        self._address: str | None = None

    @property
    def address(self) -> str:
        """The scheduler's address (the cluster starts at the first call; no pipe to it is
        kept open: the leak check counts this process's file descriptors)."""
        if self._address is None:
            tests = Path(__file__).parent
            paths = [str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
            env.pop("PIPEFLOW_BACKEND", None)
            where = self._folder / "scheduler-address"
            self._proc = subprocess.Popen(
                [sys.executable, "-c", self.SCRIPT, str(where)],
                stdin=subprocess.DEVNULL,
                env=env,
            )
            _services.append(self._proc.pid)
            assert wait_until(lambda: where.exists() or self._proc.poll() is not None, 60)
            assert where.exists(), "the Dask test cluster did not start"
            self._address = where.read_text()
        return self._address

    def client(self) -> Any:
        """A client of the cluster, the current one (as ``Client()`` makes it), once its two
        workers are up."""
        import distributed

        client = distributed.Client(self.address, timeout=30)
        client.wait_for_workers(2, timeout=60)
        return client

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()  # the helper closes the cluster on SIGTERM
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            _services.remove(self._proc.pid)


@pytest.fixture(scope="session")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaskCluster | None]:
    """The session's Dask test cluster (started at first use). Set up before any test's leak
    check counts: what Dask and numpy start once per process and keep is made here (numpy's BLAS
    threads at its import, Dask's offload thread at its first use, and the resource tracker
    that ``multiprocessing`` starts for the first ``LocalCluster`` a test makes in this process),
    as the fork server is started first for the same reason."""
    try:
        import distributed
    except ImportError:  # without the dask extra: the other ways still run
        yield None
        return
    import multiprocessing.resource_tracker as tracker

    import numpy  # noqa: F401

    distributed.utils._offload_executor.submit(int).result()
    tracker.ensure_running()
    _services.append(tracker._resource_tracker._pid)  # type: ignore[attr-defined]
    cluster = DaskCluster(tmp_path_factory.mktemp("dask"))
    yield cluster
    cluster.close()


def scheduler_tasks(client: Any) -> list[str]:
    """The keys the Dask scheduler holds (for any client)."""
    return list(client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks)))


# Tests of the behaviour suite that do not apply to the Dask backend, and why.
_NOT_ON_DASK = {
    "test_the_note_shows_a_short_repr_of_the_item": "a Dask worker is named by its address",
}


@pytest.fixture(params=WAYS)
def way(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    dask_cluster: DaskCluster | None,
) -> Iterator[str]:
    """Every way of running a stage: the local backend's threads and worker processes, the
    serial backend (on which the tests marked ``concurrent`` are skipped: they count workers
    running at once, or time how soon an item in hand is given up), and the Dask backend on the
    session's cluster, through a client of the test's own (closed after it, once the scheduler
    holds no task of it: no future left behind)."""
    way = str(request.param)
    if way == "serial":
        if request.node.get_closest_marker("concurrent") is not None:
            pytest.skip("needs workers apart from the caller; the serial backend has none")
        monkeypatch.setenv("PIPEFLOW_BACKEND", "serial")
    if way != "dask":
        yield way
        return
    if dask_cluster is None:
        pytest.skip("needs the dask extra (dask[distributed])")
    name = request.node.originalname
    if name in _NOT_ON_DASK:
        pytest.skip(_NOT_ON_DASK[name])
    monkeypatch.setenv("PIPEFLOW_BACKEND", "dask")
    client = dask_cluster.client()
    try:
        yield way
        assert wait_until(lambda: not scheduler_tasks(client)), (
            f"futures left on the Dask scheduler: {scheduler_tasks(client)}"
        )
    finally:
        client.close()


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
