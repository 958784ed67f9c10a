"""The Dask backend on a real ``LocalCluster`` of worker processes: what the behaviour suite
(the ``dask`` way of ``conftest.way``) does not show on its own. Bounded, lazy and batched work,
data staying on the cluster, stage code's context and state on the workers, faults, the
clusters pipeflow starts itself, and that nothing is left on the scheduler or the workers.

Most tests share the session's cluster (``conftest.DaskCluster``) through a client of their
own; two start a cluster of their own, as ``backend="dask"`` does.
"""

from __future__ import annotations

import itertools
import os
import pathlib
import pickle
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

distributed = pytest.importorskip("distributed")

from conftest import DaskCluster, scheduler_tasks, wait_until  # noqa: E402
from test_properties import build, reference, step_strategy  # noqa: E402

import pipeflow as pf  # noqa: E402
from pipeflow import _dask_chunks, _dask_tasks  # noqa: E402


@pytest.fixture
def client(dask_cluster: DaskCluster | None) -> Iterator[Any]:
    """A client of the session's cluster; after the test, the scheduler holds no task and the
    workers no state of any run."""
    assert dask_cluster is not None  # distributed imports (see importorskip above)
    client = dask_cluster.client()
    try:
        yield client
        assert wait_until(lambda: not scheduler_tasks(client)), scheduler_tasks(client)
        assert wait_until(lambda: not any(client.run(_dask_tasks.worker_runs).values()))
    finally:
        client.close()


@pytest.fixture
def backend(client: Any) -> pf.DaskBackend:
    return pf.DaskBackend(client)


def inc(x: int) -> int:
    return x + 1


def _pid(x: int) -> int:
    return os.getpid()


# ------------------------------------------------------------------ bounded, lazy, batched


def _counted(read: list[int], n: int) -> Iterator[int]:
    for i in range(n):
        read[0] = i + 1
        yield i


def test_a_10m_item_generator_is_read_as_the_cluster_keeps_up(backend: pf.DaskBackend) -> None:
    read = [0]
    results = pf.Pipeline().stage(inc, workers=2).iter(_counted(read, 10_000_000), backend=backend)
    taken = list(itertools.islice(results, 50_000))
    assert taken == list(range(1, 50_001))
    time.sleep(0.3)  # room for anything that would run ahead
    ahead = read[0]
    results.close()
    # The window (2 chunks per worker and queue slot, of at most MAX_ITEMS items), the chunk
    # the feeder fills and the one in its channel: nowhere near the 10M.
    slots = 2 + 4
    assert ahead - 50_000 <= (2 * slots + 4) * _dask_chunks.MAX_ITEMS


def _interval(x: float) -> tuple[float, float]:
    start = time.monotonic()
    time.sleep(x)
    return start, time.monotonic()


def test_a_stages_workers_bound_its_tasks_running_at_once(backend: pf.DaskBackend) -> None:
    # Two Dask workers, but a stage of one worker: never two of its items at once.
    out = pf.Pipeline().stage(_interval, workers=1).run([0.05] * 12, backend=backend)
    spans = sorted(out)
    assert all(end <= nxt_start for (_, end), (nxt_start, _) in itertools.pairwise(spans))
    two = pf.Pipeline().stage(_interval, workers=2).run([0.2] * 4, backend=backend)
    (_, e0), (s1, _), *_ = sorted(two)
    assert s1 < e0  # and with two, both Dask workers run at once


def test_tiny_items_travel_thousands_to_a_task(backend: pf.DaskBackend, client: Any) -> None:
    with distributed.get_task_stream(client) as stream:
        out = pf.Pipeline().stage(inc, workers=2).run(range(100_000), backend=backend)
    assert out == list(range(1, 100_001))
    tasks = [t for t in stream.data if str(t["key"]).startswith("pipeflow-inc")]
    assert 3 <= len(tasks) <= 100  # not 100,000 (the first are single items: nothing is known)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(step_strategy, min_size=1, max_size=4),
    data=st.data(),
    items=st.lists(st.integers(-50, 50), max_size=120),
)
def test_random_ordered_pipelines_equal_the_sequential_reference(
    backend: pf.DaskBackend, steps: list[tuple[str, Any]], data: st.DataObject, items: list[int]
) -> None:
    # test_properties.py's pipelines and reference, on Dask (ordered: the result is fixed).
    n = len(steps)
    workers = data.draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    capacities = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    p = build(steps, workers, capacities, ordered=True)
    assert p.run(items, backend=backend) == reference(steps, items)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(step_strategy, min_size=1, max_size=3),
    items=st.lists(st.integers(), max_size=60),
)
def test_random_unordered_pipelines_give_every_item_once(
    backend: pf.DaskBackend, steps: list[tuple[str, Any]], items: list[int]
) -> None:
    # Unordered batch steps group items as they arrive: undone, they give the reference back.
    p = build(steps, [2] * len(steps), [1] * len(steps), ordered=False, flatten=True)
    assert sorted(p.run(items, backend=backend)) == sorted(reference(steps, items, flatten=True))


# ------------------------------------------------------------------ data stays on the cluster


class Marked:
    """Records the pid of every process that unpickles it (in ``folder``)."""

    def __init__(self, folder: str, payload: bytes) -> None:
        self.folder = folder
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickled, (self.folder, self.payload))


def _unpickled(folder: str, payload: bytes) -> Marked:
    pathlib.Path(folder, str(os.getpid())).touch()
    return Marked(folder, payload)


def _make(arg: tuple[int, str]) -> Marked:
    i, folder = arg
    return Marked(folder, bytes([i % 256]) * 100_000)


def _size(marked: Marked) -> int:
    return len(marked.payload)


def test_data_between_stages_never_reaches_the_client(
    backend: pf.DaskBackend, tmp_path: pathlib.Path
) -> None:
    items = [(i, str(tmp_path)) for i in range(40)]
    p = pf.Pipeline().stage(_make, workers=2).stage(_size, workers=2)
    assert p.run(items, backend=backend) == [100_000] * 40
    unpickled_in = {int(f.name) for f in tmp_path.iterdir()}
    assert os.getpid() not in unpickled_in  # the next stage's task took the future, not bytes


# ------------------------------------------------------------------ stage code on the workers


def _worker_state_and_pid(x: int) -> tuple[int, str]:
    return os.getpid(), pf.worker_state()


def _token() -> str:
    return os.urandom(8).hex()


def test_init_runs_once_per_dask_worker_process(backend: pf.DaskBackend) -> None:
    p = pf.Pipeline().stage(_worker_state_and_pid, workers=2, init=_token)
    out = p.run(range(300), backend=backend)
    tokens: dict[int, set[str]] = {}
    for pid, token in out:
        tokens.setdefault(pid, set()).add(token)
    assert os.getpid() not in tokens
    assert all(len(t) == 1 for t in tokens.values())  # once per process, not per task
    again = {pid: token for pid, token in p.run(range(50), backend=backend)}
    assert not set(again.values()) & {t for ts in tokens.values() for t in ts}  # once a run


def test_thread_and_process_stages_both_run_on_the_workers(backend: pf.DaskBackend) -> None:
    p = pf.Pipeline().stage(_pid, kind="thread").stage(lambda pid: (pid, os.getpid()))
    pids = set(itertools.chain.from_iterable(p.run(range(20), backend=backend)))
    assert pids and os.getpid() not in pids


def _waits_for_the_stop(arg: tuple[int, str]) -> int:
    x, folder = arg
    if x == 0:
        pathlib.Path(folder, "started").touch()
        if pf.current_context().wait(timeout=30):
            pathlib.Path(folder, "stopped early").touch()
        return x
    deadline = time.monotonic() + 30
    while not pathlib.Path(folder, "started").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    raise ValueError("fail fast")


def test_stage_code_on_a_worker_sees_the_run_cancelled(
    backend: pf.DaskBackend, tmp_path: pathlib.Path
) -> None:
    items = [(x, str(tmp_path)) for x in range(2)]
    with pytest.raises(ValueError, match="fail fast"):
        pf.Pipeline().stage(_waits_for_the_stop, workers=2).run(items, backend=backend)
    assert wait_until(lambda: (tmp_path / "stopped early").exists(), 10)


def _logged(arg: tuple[int, str]) -> int:
    x, folder = arg
    if x == 5:
        raise RuntimeError("stop here")
    time.sleep(0.01)
    pathlib.Path(folder, str(x)).touch()
    return x


def test_the_first_error_cancels_the_pending_tasks(
    backend: pf.DaskBackend, client: Any, tmp_path: pathlib.Path
) -> None:
    items = [(x, str(tmp_path)) for x in range(10_000)]
    with pytest.raises(RuntimeError, match="stop here") as info:
        pf.Pipeline().stage(_logged, workers=2).run(items, backend=backend)
    assert "input item 5" in info.value.__notes__[-1]
    assert "_logged" in "".join(traceback.format_exception(info.value))  # the worker's frame
    time.sleep(0.3)
    ran = len(list(tmp_path.iterdir()))
    assert ran < 500  # the rest never ran
    # The client fixture then checks that the scheduler holds no task of the run.


def test_leaving_iter_early_leaves_nothing_on_the_scheduler(
    backend: pf.DaskBackend, client: Any
) -> None:
    p = pf.Pipeline().stage(inc, workers=2).stage(inc, workers=2)
    results = p.iter(itertools.count(), backend=backend)
    assert [next(results) for _ in range(1000)] == list(range(2, 1002))
    assert scheduler_tasks(client)  # the run is going: its tasks are there
    results.close()
    assert wait_until(lambda: not scheduler_tasks(client))
    assert wait_until(lambda: not any(client.run(_dask_tasks.worker_runs).values()))


def _slow(x: int) -> int:
    time.sleep(0.05)
    return x


def test_a_run_timeout_and_a_context_stop_the_run(backend: pf.DaskBackend) -> None:
    with pytest.raises(pf.DeadlineExceeded):
        pf.Pipeline().stage(_slow, workers=2).run(range(10_000), timeout=0.5, backend=backend)
    ctx = pf.Context()
    results = (
        pf.Pipeline().stage(_slow, workers=2).iter(range(10_000), context=ctx, backend=backend)
    )
    assert next(results) == 0
    ctx.cancel("enough")
    with pytest.raises(pf.Cancelled, match="enough"):
        list(results)


def test_a_stage_timeout_names_the_item(backend: pf.DaskBackend) -> None:
    with pytest.raises(pf.ItemTimeout, match=r"timeout=0\.2") as info:
        pf.Pipeline().stage(time.sleep, timeout=0.2).run([0.0, 2.0], backend=backend)
    assert "input item 1: 2.0" in info.value.__notes__[-1]
    time.sleep(2.0)  # the item's thread finishes on the worker


# ------------------------------------------------------------------ faults


def _dies_once(arg: tuple[int, str]) -> int:
    x, folder = arg
    marker = pathlib.Path(folder, f"died-{x}")
    if x == 3 and not marker.exists():
        marker.write_text("1")
        os.kill(os.getpid(), signal.SIGKILL)  # the Dask worker process dies holding item 3
    time.sleep(0.02)
    return x


def _always_dies(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return x


def test_a_killed_dask_worker_is_replaced_and_its_task_rerun(
    backend: pf.DaskBackend, client: Any, tmp_path: pathlib.Path
) -> None:
    items = [(x, str(tmp_path)) for x in range(20)]
    try:
        assert pf.Pipeline().stage(_dies_once, workers=2).run(items, backend=backend) == list(
            range(20)
        )
        assert (tmp_path / "died-3").exists()
    finally:
        client.wait_for_workers(2, timeout=60)  # the nanny restarts it, for the next tests


def _set_allowed_failures(n: int) -> Any:
    def set_it(dask_scheduler: Any) -> int:
        old = dask_scheduler.allowed_failures
        dask_scheduler.allowed_failures = n
        return int(old)

    return set_it


def test_past_the_allowed_failures_the_run_raises_worker_crashed(
    backend: pf.DaskBackend, client: Any
) -> None:
    old = client.run_on_scheduler(_set_allowed_failures(0))  # the first death is the last
    try:
        with pytest.raises(pf.WorkerCrashed) as info:
            pf.Pipeline().stage(_always_dies, workers=2).run(range(20), backend=backend)
    finally:
        client.run_on_scheduler(_set_allowed_failures(old))
        client.wait_for_workers(2, timeout=60)
    assert isinstance(info.value.__cause__, distributed.KilledWorker)
    assert "stage 0 ('_always_dies', dask) on input item 3" in str(info.value)
    assert "input item 3" in info.value.__notes__[-1]


def test_an_unreachable_scheduler_fails_at_once_naming_it() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    backend = pf.DaskBackend(address=address, connect_timeout=300)
    with pytest.raises(ConnectionError, match=address):  # refused: not 300 s of retries
        pf.Pipeline().stage(inc).run(range(3), backend=backend)


def test_bad_arguments_say_what_to_do() -> None:
    with pytest.raises(TypeError, match="client or an address"):
        pf.DaskBackend(client=object(), address="tcp://x:1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"distributed\.Client"):
        pf.DaskBackend(client=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_workers"):
        pf.DaskBackend(n_workers=0)
    with pytest.raises(ValueError, match=r"one of .*'dask'"):
        pf.Pipeline().stage(inc).run([1], backend="dusk")


def test_a_function_that_does_not_pickle_fails_before_anything_runs(
    backend: pf.DaskBackend,
) -> None:
    import threading

    lock = threading.Lock()
    with pytest.raises(TypeError, match="could not be pickled to send to Dask"):
        pf.Pipeline(kind="thread").stage(lambda x: (lock, x)).run([1], backend=backend)


# ------------------------------------------------------------------ what pipeflow starts itself


@pytest.mark.usefixtures("dask_cluster")  # not its cluster: the threads Dask keeps, made first
def test_backend_dask_starts_a_local_cluster_for_the_run_and_closes_it() -> None:
    # No current client: the run starts its own LocalCluster (worker processes) and closes it;
    # the leak check after the test finds none of its processes, threads or sockets.
    with pytest.raises(ValueError):
        distributed.default_client()
    out = pf.Pipeline().stage(_pid, workers=2).run(range(8), backend="dask")
    assert len(set(out)) >= 1 and os.getpid() not in out


@pytest.mark.usefixtures("dask_cluster")
def test_a_backend_used_as_a_context_manager_keeps_its_cluster() -> None:
    with pf.DaskBackend(n_workers=1) as backend:
        first = pf.Pipeline().stage(_pid).run(range(3), backend=backend)
        second = pf.Pipeline().stage(_pid).run(range(3), backend=backend)
    assert len(set(first)) == 1 and set(first) == set(second)  # the same worker process


def test_importing_pipeflow_does_not_import_distributed() -> None:
    code = (
        "import sys, pipeflow as pf\n"
        "assert 'distributed' not in sys.modules\n"
        "assert pf.DaskBackend.name == 'dask'\n"
        "assert 'distributed' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_task_failed_pickles_small() -> None:
    # What a failing task sends back (Dask logs its repr on the worker: short).
    error = _dask_tasks.TaskFailed(1, 7, "7", b"x" * 1000, "tcp://w:1")
    again = pickle.loads(pickle.dumps(error))
    assert (again.step, again.key, again.shown, again.worker) == (1, 7, "7", "tcp://w:1")
    assert len(repr(again)) < 200


# ------------------------------------------------------------------ prints and log records


def _loud_init() -> int:
    print("init ran")
    return 0


def _prints_then_fails(x: int) -> int:
    print(f"item {x}")
    if x == 3:
        raise ValueError("three")
    return x


def _slow_print(x: int) -> int:
    print(f"timed {x}")
    return x


def test_prints_reach_the_client_before_the_error_they_came_with(
    backend: pf.DaskBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    p = pf.Pipeline().stage(_prints_then_fails, workers=1, init=_loud_init)
    with pytest.raises(ValueError, match="three"):
        p.run(range(5), backend=backend)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "init ran"
    assert "item 3" in out  # printed by the item that failed, in the task that failed
    assert "item 4" not in out


def test_prints_of_every_step_and_of_a_timed_item_reach_the_client(
    backend: pf.DaskBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    p = (
        pf.Pipeline()
        .stage(_slow_print, workers=2, timeout=30)  # each item in a thread of its own
        .stage(_prints_then_fails, workers=2)
        .filter(lambda x: False)
        .stage(_slow_print, init=_loud_init, workers=1)  # no item reaches it: its init runs
    )
    assert p.run(range(3), backend=backend) == []
    lines = capsys.readouterr().out.splitlines()
    assert sorted(line for line in lines if line.startswith("timed")) == [
        f"timed {x}" for x in range(3)
    ]
    assert sorted(line for line in lines if line.startswith("item")) == [
        f"item {x}" for x in range(3)
    ]
    assert "init ran" in lines


def test_a_dask_worker_keeps_what_is_printed_outside_pipeflow_tasks(client: Any) -> None:
    out = pf.Pipeline().stage(_slow_print).run([1], backend=pf.DaskBackend(client))
    assert out == [1]

    def outside() -> str:
        print("not ours")  # no pipeflow task runs: the worker's own stdout has it
        return type(sys.stdout).__name__

    assert set(client.run(outside).values()) == {"_Stream"}
