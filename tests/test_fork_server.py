"""The fork server (``_zygote``): workers forked from a single-threaded process started once."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import psutil
import pytest
from conftest import wait_until

import pipeflow as pf
from pipeflow import WorkerCrashed, _process, _zygote


def parent_of(_: object) -> int:
    return os.getppid()


def slow_parent_of(x: int) -> tuple[int, int]:
    time.sleep(0.3)
    return x, os.getppid()


def test_workers_are_forked_by_a_single_threaded_server_that_outlives_the_run() -> None:
    _process.shutdown_idle()
    parents = set(pf.Pipeline().stage(parent_of, workers=2).run(range(20)))
    server = _zygote.server_pid()
    assert server is not None and parents == {server}
    assert psutil.Process(server).num_threads() == 1  # forking it is safe
    _process.shutdown_idle()  # the workers go; the server stays, for the next run's workers
    assert _zygote.server_pid() == server
    assert set(pf.Pipeline().stage(parent_of, workers=2).run(range(20))) == {server}


def test_spawn_starts_each_worker_as_a_child_of_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PIPEFLOW_START_METHOD", "spawn")
    _process.shutdown_idle()
    assert set(pf.Pipeline().stage(parent_of, workers=2).run(range(20))) == {os.getpid()}


def test_an_unknown_start_method_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIPEFLOW_START_METHOD", "fork")
    _process.shutdown_idle()
    with pytest.raises(ValueError, match="PIPEFLOW_START_METHOD='fork': set it to 'forkserver'"):
        pf.Pipeline().stage(abs).run([1])


def environment(_: object) -> tuple[str | None, str]:
    return os.environ.get("PIPEFLOW_TEST_VALUE"), os.getcwd()


def test_a_new_worker_sees_the_environment_and_directory_of_now(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # The server started long before: a worker must not see the server's copies of them.
    _zygote.server()
    monkeypatch.setenv("PIPEFLOW_TEST_VALUE", "42")
    monkeypatch.chdir(tmp_path)
    _process.shutdown_idle()
    assert pf.Pipeline().stage(environment).run([0]) == [("42", str(tmp_path))]


def shout(x: int) -> int:
    print(f"worker says {x}", flush=True)
    print(f"worker warns {x}", file=sys.stderr, flush=True)
    return x


def test_a_workers_output_goes_where_this_process_writes_now(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # capfd points fds 1 and 2 elsewhere for this test only: so must the worker's.
    _process.shutdown_idle()
    assert pf.Pipeline().stage(shout).run([7]) == [7]
    out, err = capfd.readouterr()
    assert "worker says 7" in out
    assert "worker warns 7" in err


def test_a_dead_server_fails_its_workers_items_clearly_then_is_replaced() -> None:
    _process.shutdown_idle()
    _zygote.server()
    server = _zygote.server_pid()
    assert server is not None
    pipeline = pf.Pipeline().stage(slow_parent_of, workers=2)
    with (
        pytest.raises(WorkerCrashed, match="the fork server that started it died") as info,
        pipeline.iter(range(100)) as results,
    ):
        next(results)
        os.kill(server, signal.SIGKILL)  # its workers follow it within a second
        for _ in results:
            pass
    assert "input item" in str(info.value)
    # The next run starts another server.
    assert pf.Pipeline().stage(parent_of).run([0]) == [_zygote.server_pid()]
    assert _zygote.server_pid() not in (None, server)


def test_with_retries_a_dead_server_loses_no_item() -> None:
    _process.shutdown_idle()
    _zygote.server()
    server = _zygote.server_pid()
    assert server is not None
    pipeline = pf.Pipeline().stage(slow_parent_of, workers=2, retries=2)
    out = []
    with pipeline.iter(range(12)) as results:
        for x, parent in results:
            out.append((x, parent))
            if x == 1:
                os.kill(server, signal.SIGKILL)
    assert [x for x, _ in out] == list(range(12))
    assert _zygote.server_pid() not in (None, server)
    assert out[-1][1] == _zygote.server_pid()  # the last items ran on the new server's workers


KILLED_PARENT = """
    import os, sys, time, pipeflow as pf
    from pipeflow import _zygote
    def hold(x):
        print("worker", os.getpid(), flush=True)
        time.sleep(60)
    print("server", _zygote.server().pid, flush=True)
    pf.Pipeline().stage(hold, workers=2).run(range(2))
"""


def test_the_server_and_its_workers_go_when_the_parent_is_killed() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_PARENT)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    lines: list[str] = []
    try:
        while len(lines) < 3:  # the server's pid, then each worker's, in whatever order
            line = child.stdout.readline()
            assert line, f"the child ended early, after {lines}"
            if line.split()[:1] in (["server"], ["worker"]):
                lines.append(line)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    pids = [int(line.split()[1]) for line in lines]
    assert wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), timeout=10), (
        f"left running: {[p for p in pids if psutil.pid_exists(p)]}"
    )


EXITING_PARENT = """
    import os, pipeflow as pf
    from pipeflow import _zygote
    assert pf.Pipeline().stage(abs, workers=2).run([-1, -2]) == [1, 2]
    print(_zygote.server_pid(), flush=True)
"""


def _run_script(code: str) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter; its output, as text."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60
    )


def test_the_server_exits_with_the_interpreter() -> None:
    out = _run_script(EXITING_PARENT)
    assert out.returncode == 0, out.stderr
    server = int(out.stdout)
    assert not psutil.pid_exists(server)  # reaped before the interpreter exited
    assert "Warning" not in out.stderr, out.stderr


FORKED_PARENT = """
    import os, pipeflow as pf
    from pipeflow import _zygote
    def parent_of(_):
        return os.getppid()
    first = set(pf.Pipeline().stage(parent_of, workers=2).run(range(4)))
    assert first == {_zygote.server_pid()}
    pid = os.fork()
    if pid == 0:
        # The parent's server answers the parent only: the child starts its own.
        mine = set(pf.Pipeline().stage(parent_of, workers=2).run(range(4)))
        ok = mine == {_zygote.server_pid()} and not (mine & first)
        from pipeflow import _process
        _process.shutdown_idle()
        _zygote.shutdown()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    again = set(pf.Pipeline().stage(parent_of, workers=2).run(range(4)))
    print("child", os.waitstatus_to_exitcode(status), "same", again == first, flush=True)
"""


def test_a_forked_parent_starts_a_server_of_its_own() -> None:
    out = _run_script(FORKED_PARENT)
    assert "child 0 same True" in out.stdout, out.stderr


def test_without_a_fork_server_workers_start_as_fresh_interpreters(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _process.shutdown_idle()
    _zygote.shutdown()
    entry = _zygote._ENTRY
    monkeypatch.setattr(_zygote, "_ENTRY", "import sys; sys.exit(3)")  # a server that cannot start
    monkeypatch.setattr(_zygote, "_failed", None)
    monkeypatch.setattr(_process, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="fork server did not start.*fresh interpreters"):
        assert set(pf.Pipeline().stage(parent_of, workers=2).run(range(4))) == {os.getpid()}
    # Said once; and no second attempt at a server that failed, for a while.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert set(pf.Pipeline().stage(parent_of, workers=3).run(range(6))) == {os.getpid()}
    assert _zygote.server_pid() is None
    # Once it can start again, a later attempt (RETRY_AFTER on) uses it.
    _process.shutdown_idle()
    assert _zygote._failed is not None
    monkeypatch.setattr(_zygote, "_ENTRY", entry)
    monkeypatch.setattr(_zygote, "RETRY_AFTER", 0.0)
    assert set(pf.Pipeline().stage(parent_of, workers=2).run(range(4))) == {_zygote.server_pid()}
    assert _zygote._failed is None


def test_workers_are_watched_also_through_fds_above_1024() -> None:
    # select() cannot wait on an fd from 1024 up: the pidfds are polled instead.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the fd limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    null = os.open(os.devnull, os.O_RDONLY)
    fillers = [os.dup(null) for _ in range(1100)]
    try:
        _process.shutdown_idle()  # new workers: their pidfds get numbers above 1024
        assert pf.Pipeline().stage(slow_parent_of, workers=2).run(range(4)) == [
            (x, _zygote.server_pid()) for x in range(4)
        ]
        with pytest.raises(WorkerCrashed, match="SIGKILL"):
            pf.Pipeline().stage(kill_self, workers=2).run(range(4))
    finally:
        for fd in [*fillers, null]:
            os.close(fd)
        _process.shutdown_idle()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def kill_self(x: int) -> int:
    if x == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_a_fork_request_left_unanswered_stops_the_server_and_uses_new_rings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A child the server forks too late holds the request's rings: it must not share them with
    # the worker started instead, nor outlive its server.
    _process.shutdown_idle()
    old = _zygote.server()
    cmdline = psutil.Process(old.pid).cmdline()
    monkeypatch.setattr(_zygote, "FORK_TIMEOUT", 0.0)
    monkeypatch.setattr(_process, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="did not answer a fork request within 0 s"):
        assert pf.Pipeline().stage(parent_of).run(range(4)) == [os.getpid()] * 4
    assert old.proc.returncode == -signal.SIGKILL and not old.alive
    monkeypatch.undo()
    _process.shutdown_idle()
    parents = set(pf.Pipeline().stage(parent_of, workers=2).run(range(8)))
    server = _zygote.server_pid()
    assert server not in (None, old.pid) and parents == {server}  # a new server serves

    def orphans() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline", "ppid"])
            if p.info["cmdline"] == cmdline and server not in (p.pid, p.info["ppid"])
        ]

    assert wait_until(lambda: not orphans(), timeout=5), orphans()


def test_an_exit_notice_that_comes_too_late_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _zygote.server()
    monkeypatch.setattr(_zygote, "NOTICE_TIMEOUT", 0.0)
    assert server.exit_code(4_000_000) == _zygote.UNKNOWN_EXIT  # no notice in time
    server._file(("exit", 4_000_000, 0))  # it comes after all: nobody waits for it any more
    assert 4_000_000 not in server._exits and 4_000_000 not in server._late
