"""Log records and prints of stage code reach the caller's logging and streams, as if the stage
ran in the caller: from process workers (forwarded on the reply ring, on every start method),
thread stages and the serial backend alike; promptly, in order, and also from a worker that dies
right after.

Scripts run as real programs (``subprocess``, their stdout and stderr to files, without the
``PYTHONUNBUFFERED`` of this machine's environment, as a user runs them); the rest runs here,
with the conftest's leak checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import wait_until

import pipeflow as pf
from pipeflow import _output, _process, _shm, _zygote

LOGGER = "pipeflow.tests.worker_output"
log = logging.getLogger(LOGGER)

# ---------------------------------------------------------------------------- real scripts

FORMAT = "%(levelname)s|%(process)d|%(processName)s|%(name)s|%(message)s"

LOGGING_SCRIPT = """
import logging, os, sys
import pipeflow as pf

log = logging.getLogger("app")

def work(x):
    log.debug("hidden %d", x)
    log.info("info %d", x)
    log.warning("warning %d", x)
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("failed on %d", x)
    print("printed", x, os.getpid())
    print("to stderr", x, file=sys.stderr)
    return os.getpid()

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    (pid,) = pf.Pipeline().stage(work, workers=1, kind=KIND).run([1])
    print("after the run", os.getpid(), pid)
"""

CRASH_SCRIPT = """
import logging, os, signal, sys
import pipeflow as pf

log = logging.getLogger("app")

def hello(x):
    print("hello", x)
    return os.getpid()

def crash(x):
    print("last words", x)
    print("to stderr", x, file=sys.stderr)
    log.warning("dying %d", x)
    if HOW == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=FORMAT)
    (pid,) = pf.Pipeline().stage(hello, workers=1).run([0])  # the worker stays warm
    try:
        pf.Pipeline().stage(crash, workers=1).run([7])
    except pf.WorkerCrashed as e:
        print("crashed:", e)
    print("warm worker", pid)
"""


def run_script(tmp_path: Path, text: str, method: str | None = None) -> tuple[str, str]:
    """Runs ``text`` as a script (``python script.py``, in ``tmp_path``) with its stdout and
    stderr to files, as a user would; returns what they hold."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(text))
    env = dict(os.environ)
    env.pop("PYTHONUNBUFFERED", None)  # a user's stdout to a file is block-buffered
    env.pop("PIPEFLOW_BACKEND", None)
    if method is not None:
        env["PIPEFLOW_START_METHOD"] = method
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        done = subprocess.run(
            [sys.executable, str(script)], cwd=tmp_path, env=env, stdout=out, stderr=err, timeout=50
        )
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert done.returncode == 0, stderr
    return stdout, stderr


WAYS = [("process", "forkserver"), ("process", "spawn"), ("thread", None)]


@pytest.mark.parametrize(("kind", "method"), WAYS)
def test_a_scripts_logging_config_formats_the_records_of_its_stages(
    tmp_path: Path, kind: str, method: str | None
) -> None:
    text = f"FORMAT = {FORMAT!r}\nKIND = {kind!r}\n" + textwrap.dedent(LOGGING_SCRIPT)
    stdout, stderr = run_script(tmp_path, text, method)
    printed, after = stdout.splitlines()
    parent, worker = map(int, after.split()[-2:])
    assert (worker != parent) == (kind == "process")
    # The worker's print, before the parent's line after the run (both block-buffered).
    assert printed == f"printed 1 {worker}"
    name = "stage 0 ('work', process worker 0)" if kind == "process" else "MainProcess"
    head = f"|{worker}|{name}|app|"
    lines = stderr.splitlines()
    assert lines[:3] == [f"INFO{head}info 1", f"WARNING{head}warning 1", f"ERROR{head}failed on 1"]
    # log.exception's traceback, formatted in the worker: the script's file, line and source.
    assert lines[3] == "Traceback (most recent call last):"
    line = text.splitlines().index("        1 / 0") + 1
    assert lines[4:6] == [f'  File "{tmp_path / "script.py"}", line {line}, in work', "    1 / 0"]
    assert lines[-2:] == ["ZeroDivisionError: division by zero", "to stderr 1"]
    assert "hidden" not in stderr  # below the parent's level


@pytest.mark.parametrize("how", ["exit", "kill"])
@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_what_a_worker_printed_before_it_died_reaches_the_caller(
    tmp_path: Path, method: str, how: str
) -> None:
    text = f"FORMAT = {FORMAT!r}\nHOW = {how!r}\n" + textwrap.dedent(CRASH_SCRIPT)
    stdout, stderr = run_script(tmp_path, text, method)
    lines = stdout.splitlines()
    assert lines[:2] == ["hello 0", "last words 7"]
    assert lines[2].startswith("crashed: stage 0 ('crash', process worker 0)")
    code = "exited with code 3" if how == "exit" else "was killed by SIGKILL"
    assert code in lines[2]
    # The warm worker of the first run ran the second: its prints of both runs arrive.
    pid = int(lines[3].split()[-1])
    assert f"(pid {pid})" in lines[2]
    assert stderr.splitlines()[:2] == [
        "to stderr 7",
        f"WARNING|{pid}|stage 0 ('crash', process worker 0)|app|dying 7",
    ]


# ---------------------------------------------------------------------------- in this process


class Records(logging.Handler):
    """Keeps the records it handles (a real handler of the caller's logging)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_thread_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records made here leave out the thread's name: ``threading.current_thread()`` in a pool
    thread (a thread stage's worker) registers a ``_DummyThread`` that Python keeps, and the
    leak check would count it."""
    monkeypatch.setattr(logging, "logThreads", False)


@pytest.fixture
def records() -> Iterator[Records]:
    """A handler on LOGGER (at INFO, not propagating: pytest's own capture stays out)."""
    handler = Records()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(logging.NOTSET)
        log.propagate = True


@pytest.fixture(params=["forkserver", "spawn"])
def method(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Both start methods of process workers (no warm worker of the other one is reused; a
    fork server this starts, under an outer ``PIPEFLOW_START_METHOD=spawn``, is stopped)."""
    _process.shutdown_idle()
    server = _zygote.server_pid()
    monkeypatch.setenv("PIPEFLOW_START_METHOD", str(request.param))
    yield str(request.param)
    _process.shutdown_idle()
    if server is None:
        _zygote.shutdown()


def logs(x: int) -> int:
    log.debug("hidden %d", x)
    log.info("info %d", x)
    log.warning("warning %s", [x])
    try:
        {}[x]
    except KeyError:
        log.exception("failed on %d", x)
    return os.getpid()


def test_records_reach_the_callers_handlers_with_the_workers_pid_and_stage(
    way: str, kind: str, records: Records
) -> None:
    pids = pf.Pipeline().stage(logs, workers=1, kind=kind, name="logs").run([5, 6])
    assert [r.getMessage() for r in records.records] == [
        "info 5",
        "warning [5]",
        "failed on 5",
        "info 6",
        "warning [6]",
        "failed on 6",
    ]
    assert [r.levelno for r in records.records[:3]] == [logging.INFO, logging.WARNING, 40]
    assert {r.process for r in records.records} == set(pids)
    assert (pids[0] == os.getpid()) == (way not in ("process", "dask"))
    failed = records.records[2]
    text = logging.Formatter("%(message)s").format(failed)
    assert text.startswith("failed on 5\nTraceback (most recent call last):\n")
    assert "{}[x]" in text
    assert text.endswith("KeyError: 5")
    if way == "process":
        assert failed.processName == "stage 0 ('logs', process worker 0)"
    if way == "dask":
        assert failed.processName.startswith("stage 0 ('logs', dask worker tcp://")
    if way in ("process", "dask"):
        assert failed.pipeflow_stage == "logs"  # type: ignore[attr-defined]
        assert failed.exc_info is None  # a traceback cannot cross: its text did
    else:
        assert not hasattr(failed, "pipeflow_stage")


def enabled(x: int) -> tuple[bool, bool]:
    return log.isEnabledFor(logging.DEBUG), log.isEnabledFor(logging.INFO)


def test_the_callers_levels_reach_the_workers_with_each_run(method: str, records: Records) -> None:
    p = pf.Pipeline().stage(enabled, workers=1)
    assert p.run([0]) == [(False, True)]  # a record the caller would drop is not even made
    log.setLevel(logging.DEBUG)
    assert p.run([0]) == [(True, True)]  # the same warm worker, told again
    log.setLevel(logging.WARNING)
    assert p.run([0]) == [(False, False)]
    log.setLevel(logging.NOTSET)  # the root's level then: WARNING by default
    logging.getLogger().setLevel(logging.DEBUG)
    try:
        assert p.run([0]) == [(True, True)]
    finally:
        logging.getLogger().setLevel(logging.WARNING)


def test_the_caller_judges_each_record_by_its_own_filters(records: Records) -> None:
    records.addFilter(lambda r: "keep" in r.getMessage())
    stage = logging.Formatter("%(pipeflow_stage)s: %(message)s")
    pf.Pipeline().stage(lambda x: log.warning(x), name="say").run(["drop", "keep me"])
    assert [stage.format(r) for r in records.records] == ["say: keep me"]


def test_an_attribute_that_does_not_pickle_comes_as_its_repr(records: Records) -> None:
    def locked(x: int) -> None:
        log.warning("with %s", "a lock", extra={"lock": threading.Lock(), "n": x})

    pf.Pipeline().stage(locked).run([3])
    (record,) = records.records
    assert record.getMessage() == "with a lock"
    assert record.n == 3  # type: ignore[attr-defined]
    assert record.lock.startswith("<unlocked _thread.lock object")  # type: ignore[attr-defined]


def prints(x: int) -> int:
    print("out", x)
    print("err", x, file=sys.stderr)
    print("part", end="")
    print(f" {x}")
    return x


def test_prints_reach_a_callers_stdout_that_is_no_file(way: str, kind: str) -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert pf.Pipeline().stage(prints, workers=1, kind=kind).run(range(3)) == [0, 1, 2]
    assert out.getvalue() == "".join(f"out {x}\npart {x}\n" for x in range(3))
    assert err.getvalue() == "".join(f"err {x}\n" for x in range(3))


def test_prints_reach_pytest_capture(method: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert pf.Pipeline().stage(prints, workers=2).run(range(10)) == list(range(10))
    captured = capsys.readouterr()
    assert sorted(captured.out.splitlines()) == sorted(
        line for x in range(10) for line in (f"out {x}", f"part {x}")
    )
    assert sorted(captured.err.splitlines()) == sorted(f"err {x}" for x in range(10))


def interleaved(x: int) -> None:
    print("a")
    log.warning("b")
    print("c", end="")
    log.warning("d")
    print("e", file=sys.stderr)
    print("f", end="")  # no end of line: sent when the batch ends


def test_prints_and_records_of_a_worker_keep_their_order(kind: str) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    log.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            pf.Pipeline().stage(interleaved, workers=1, kind=kind).run([0, 1])
    finally:
        log.removeHandler(handler)
    assert out.getvalue() == "a\nb\ncd\ne\nfa\nb\ncd\ne\nf"


class Flushes(io.StringIO):
    """A caller's stdout that counts its flushes."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1


def test_a_flush_in_stage_code_flushes_the_callers_stream(way: str, kind: str) -> None:
    out = Flushes()
    with contextlib.redirect_stdout(out):
        pf.Pipeline().stage(print, workers=1, kind=kind).run(["x"])
        assert out.flushes == 0  # a line is written, not flushed: the caller's own buffering
        pf.Pipeline().stage(lambda x: print(x, flush=True), workers=1, kind=kind).run(["y"])
    assert out.getvalue() == "x\ny\n"
    assert out.flushes >= 1


LINES = 2000


def from_a_thread(x: int) -> int:
    done = threading.Event()

    def lines() -> None:
        for i in range(LINES):
            print("thread", x, i)  # five writes: no other thread's may come in between
        done.set()

    # daemon= given, and no join(): both would ask threading.current_thread() (no_thread_names).
    threading.Thread(target=lines, daemon=True).start()
    for i in range(LINES):
        print("main", x, i)
    done.wait()
    return x


def test_prints_from_threads_of_stage_code_arrive_whole_and_in_order(way: str, kind: str) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pf.Pipeline().stage(from_a_thread, workers=1, kind=kind).run([0])
    lines = out.getvalue().splitlines()
    if way not in ("process", "dask"):  # Python's streams: a thread's write may cut a print
        assert len(lines) == 2 * LINES
        return
    for who in ("thread", "main"):
        assert [line for line in lines if line.startswith(who)] == [
            f"{who} 0 {i}" for i in range(LINES)
        ]


BIG = 3 * (1 << 20)  # more than a worker's rings hold (512 KiB each way)


def print_a_lot() -> None:
    print("x" * BIG)


def test_output_larger_than_the_ring_while_a_large_batch_waits_to_be_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The init prints more than the reply ring holds, while the first batch, larger than the
    # request ring, waits behind the setup: the worker blocks writing, the caller sending,
    # unless the caller takes the output while it waits.
    monkeypatch.setattr(_shm, "BIG_PICKLE", 1 << 40)  # as when the arena is full: by the ring
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        (n,) = pf.Pipeline().stage(len, init=print_a_lot).run(["y" * BIG])
        assert pf.Pipeline().stage(prints).run([2]) == [2]  # the same worker, sound
    assert n == BIG
    assert out.getvalue() == "x" * BIG + "\nout 2\npart 2\n"


def print_forever(x: int) -> None:
    while True:
        print("again", x)


def test_a_worker_that_prints_without_end_is_still_timed_out_and_stopped() -> None:
    out = io.StringIO()
    pf.Pipeline().stage(abs).run([0])  # a warm worker: the item's clock is all printing
    with contextlib.redirect_stdout(out), pytest.raises(TimeoutError, match=r"timeout=3"):
        pf.Pipeline().stage(print_forever, timeout=3).run([1])
    assert out.getvalue().startswith("again 1\n")
    # A stop (the run's context cancelled) once the worker is seen printing.
    ctx = pf.Context()
    watcher = threading.Thread(
        target=lambda: wait_until(lambda: "again 2" in out.getvalue(), 30) and ctx.cancel()
    )
    watcher.start()
    try:
        with contextlib.redirect_stdout(out), pytest.raises(pf.Cancelled):
            pf.Pipeline().stage(print_forever).run([2], context=ctx)
    finally:
        ctx.cancel()
        watcher.join()
    assert "again 2\n" in out.getvalue()


def nested(x: int) -> list[int]:
    return pf.Pipeline().stage(prints, workers=1).run([x])


def test_prints_of_a_nested_pipelines_workers_reach_the_caller() -> None:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert pf.Pipeline().stage(nested, workers=1).run([4]) == [[4]]
    assert (out.getvalue(), err.getvalue()) == ("out 4\npart 4\n", "err 4\n")
    _process.shutdown_idle()


def print_later(folder: str) -> int:
    """Starts a thread that prints a partial line once ``folder/go`` exists, after this item's
    reply went, then makes ``folder/done``."""

    def later() -> None:
        while not os.path.exists(os.path.join(folder, "go")):
            threading.Event().wait(0.01)
        print("late", end="")
        open(os.path.join(folder, "done"), "w").close()

    threading.Thread(target=later, daemon=True).start()
    return os.getpid()


def test_a_worker_that_stops_sends_its_last_partial_line(tmp_path: Path) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pf.Pipeline().stage(print_later).run([str(tmp_path)])
        (tmp_path / "go").touch()
        assert wait_until(lambda: (tmp_path / "done").exists(), timeout=30)
        assert out.getvalue() == ""  # no end of line, no batch since: kept in the worker
        _process.shutdown_idle()  # it stops: its last words come first
    assert out.getvalue() == "late"


def test_the_worker_side_levels_are_the_callers(records: Records) -> None:
    root, disable, named = _output.log_levels()
    assert disable == logging.root.manager.disable
    assert root == logging.getLogger().level
    assert named[LOGGER] == logging.INFO
    assert all(level != logging.NOTSET for level in named.values())


def write_bytes(x: int) -> bool:
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    sys.stdout.buffer.write("bytes é\n".encode(sys.stdout.encoding))
    sys.stdout.flush()
    return sys.stdout.isatty() == os.isatty(sys.stdout.fileno())


def test_a_workers_stdout_has_a_buffer_and_the_inherited_fd() -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert pf.Pipeline().stage(write_bytes).run([0]) == [True]
    assert out.getvalue() == "bytes é\n"


NOTEBOOK = """
import json, sys
import nbclient, nbformat

source = sys.argv[1]
notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
nbclient.NotebookClient(notebook, timeout=50, kernel_name="python3").execute()
text = {}
for output in notebook.cells[0].outputs:
    if output.output_type == "stream":
        text[output.name] = text.get(output.name, "") + output.text
    else:
        text[output.output_type] = str(output)
print(json.dumps(text))
"""

NOTEBOOK_CELL = """
import logging, os
import pipeflow as pf
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(processName)s %(message)s")
def work(x):
    logging.getLogger("nb").info("info %d", x)
    print("printed", x)
    return os.getpid()
pids = pf.Pipeline().stage(work, workers=1).run([1, 2])
print("parent", pids[0] != os.getpid())
"""


def test_prints_and_records_of_a_notebooks_process_stage_show_in_its_cell(
    tmp_path: Path,
) -> None:
    pytest.importorskip("nbclient")
    # The notebook runs in a child (a kernel leaves sockets open in the process that drives it).
    done = subprocess.run(
        [sys.executable, "-c", NOTEBOOK, NOTEBOOK_CELL],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=55,
    )
    assert done.returncode == 0, done.stderr
    text = json.loads(done.stdout.splitlines()[-1])
    assert text["stdout"] == "printed 1\nprinted 2\nparent True\n"
    assert text["stderr"] == (
        "INFO stage 0 ('work', process worker 0) info 1\n"
        "INFO stage 0 ('work', process worker 0) info 2\n"
    )
