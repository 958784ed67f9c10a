"""Ctrl-C with thread stages: what a wait for their items says, and the second Ctrl-C.

Each test runs a script in a child process of its own session (``start_new_session``), as a
terminal runs a foreground job, and sends SIGINT as a terminal does (``os.killpg``: the parent
and every worker process) or to the parent only. Items sleep 60 s; every wait below has a
generous limit (``GUARD``) that only guards against a hang: nothing is timed.

What the user sees, exactly:

- the first Ctrl-C: the ``KeyboardInterrupt`` and its traceback at once; then, if the exit waits
  for thread-stage items, once: ``pipeflow: waiting for 2 thread-stage items to finish (stage 0
  'fetch'); press Ctrl-C again to quit now``;
- the second Ctrl-C: nothing more; the process ends as an unhandled ``KeyboardInterrupt`` ends
  it (killed by SIGINT), with no process of its session left and nothing in /dev/shm;
- results closed by a bare ``for`` loop that was left wait for the items in hand, and say so
  (``... press Ctrl-C to stop waiting``); a Ctrl-C then stops that wait, and the exit does not
  wait for those items either.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

GUARD = 20.0  # seconds: a hang guard, not a timing assertion (the items take 60 s)

# A child started from a background job inherits SIGINT ignored, and Python then installs no
# KeyboardInterrupt handler: install it, so that these tests run the same from any shell.
_SIGINT_DEFAULT = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"

QUIT_NOW = (
    "pipeflow: waiting for 2 thread-stage items to finish (stage {}); "
    "press Ctrl-C again to quit now"
)
STOP_WAITING = (
    "pipeflow: waiting for 2 thread-stage items to finish (stage 0 'fetch'); "
    "press Ctrl-C to stop waiting"
)


class Child:
    """A script in a session of its own; reads its stdout and stderr as they come."""

    def __init__(self, code: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SIGINT_DEFAULT + textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own session and process group, as a terminal's job
        )
        self.sid = self.proc.pid
        self.shm_before = set(os.listdir("/dev/shm"))
        self._text = {"out": b"", "err": b""}

    @property
    def out(self) -> str:
        return self._text["out"].decode()

    @property
    def err(self) -> str:
        return self._text["err"].decode()

    def _pump(self, timeout: float) -> bool:
        """Reads what is there within ``timeout``; False at the end of both streams."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        streams = {self.proc.stdout.fileno(): "out", self.proc.stderr.fileno(): "err"}
        open_fds = [fd for fd, name in streams.items() if not self._closed(name)]
        if not open_fds:
            return False
        ready, _, _ = select.select(open_fds, [], [], timeout)
        for fd in ready:
            data = os.read(fd, 65536)
            name = streams[fd]
            if data:
                self._text[name] += data
            else:
                self._text[name + " closed"] = b"1"
        return True

    def _closed(self, name: str) -> bool:
        return name + " closed" in self._text

    def wait_for(self, what: str, predicate: Callable[[], bool]) -> None:
        """Reads until ``predicate()`` holds (the hang guard fails the test otherwise)."""
        deadline = time.monotonic() + GUARD
        while not predicate():
            left = deadline - time.monotonic()
            more = left > 0 and self._pump(min(left, 0.1))
            if not more and not predicate():
                self._kill()
                pytest.fail(f"no {what}; stdout {self.out!r}, stderr {self.err!r}")

    def ctrl_c(self, to: str) -> None:
        """SIGINT as a terminal sends it (the whole process group) or to the parent alone."""
        if to == "group":
            os.killpg(self.proc.pid, signal.SIGINT)
        else:
            self.proc.send_signal(signal.SIGINT)

    def end(self) -> int:
        """Waits for the end (hang guard), reading everything; returns the exit status."""
        self.wait_for("exit", lambda: self._closed("out") and self._closed("err"))
        try:
            return self.proc.wait(GUARD)
        except subprocess.TimeoutExpired:
            self._kill()
            pytest.fail(f"the child did not exit; stderr {self.err!r}")
        finally:
            self._close()

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.proc.stdout.close()
        self.proc.stderr.close()

    def cleanup(self) -> None:
        """After the test, whatever it found: nothing of the child's session lives on."""
        for proc in self.left_behind():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if self.proc.poll() is None:
            self._kill()
        self._close()

    def left_behind(self) -> list[psutil.Process]:
        """The processes of its session still there (its workers, its fork server)."""
        left = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.sid:
                    left.append(proc)
            except OSError:
                pass  # gone meanwhile
        return left

    def shm_left(self) -> set[str]:
        return set(os.listdir("/dev/shm")) - self.shm_before


@pytest.fixture
def start() -> Iterator[Callable[..., Child]]:
    """Starts a :class:`Child`; kills what is left of it after the test, pass or fail."""
    children: list[Child] = []

    def start(code: str, *args: str) -> Child:
        child = Child(code, *args)
        children.append(child)
        return child

    yield start
    for child in children:
        child.cleanup()


def _one_keyboard_interrupt_traceback(lines: list[str]) -> None:
    """``lines`` are one traceback, of a KeyboardInterrupt, and nothing else."""
    assert lines[0] == "Traceback (most recent call last):", lines
    assert lines[-1] == "KeyboardInterrupt", lines
    assert sum(line.startswith("Traceback") for line in lines) == 1, lines
    assert not any(line.startswith(("Exception ignored", "During handling")) for line in lines)


# ------------------------------------------------------------------ thread stages alone

THREAD_ITEMS = """
    import sys, time, pipeflow as pf
    mode = sys.argv[1]

    def fetch(x):
        if x == 0:
            return x  # the first result comes at once: the caller gets into its loop's body
        print("started", flush=True)
        time.sleep(60)
        return x

    p = pf.Pipeline().stage(fetch, workers=2, kind="thread", name="fetch")
    if mode == "run":
        p.run(range(10))
    elif mode == "next":  # Ctrl-C inside next()
        for x in p.iter(range(10)):
            pass
    elif mode == "with-next":
        with p.iter(range(10)) as results:
            for x in results:
                pass
    elif mode == "with-body":  # Ctrl-C in the caller's own code between results
        with p.iter(range(10)) as results:
            for x in results:
                print("ready", flush=True)
                time.sleep(60)
    elif mode == "body":  # the same in a bare loop: the results close as the exception leaves
        for x in p.iter(range(10)):
            print("ready", flush=True)
            time.sleep(60)
"""


@pytest.mark.parametrize(
    ("mode", "to"),
    [
        ("run", "group"),
        ("run", "parent"),
        ("next", "group"),
        ("with-next", "group"),
        ("with-body", "group"),
        ("with-body", "parent"),
    ],
)
def test_the_exit_says_what_it_waits_for_and_a_second_ctrl_c_quits_at_once(
    start: Callable[..., Child], mode: str, to: str
) -> None:
    child = start(THREAD_ITEMS, mode)
    ready = mode.endswith("body")
    child.wait_for(
        "items in hand",
        lambda: child.out.count("started") == 2 and ("ready" in child.out or not ready),
    )
    child.ctrl_c(to)
    message = QUIT_NOW.format("0 'fetch'")
    child.wait_for("message", lambda: message in child.err)
    child.ctrl_c(to)
    status = child.end()
    assert status == -signal.SIGINT, child.err
    lines = child.err.splitlines()
    # The KeyboardInterrupt's traceback first (the exit comes after it), then the message, once.
    assert lines[-1] == message, child.err
    _one_keyboard_interrupt_traceback(lines[:-1])
    assert child.left_behind() == []


@pytest.mark.parametrize("to", ["group", "parent"])
def test_ctrl_c_in_the_body_of_a_bare_loop_waits_saying_so_and_a_second_one_quits(
    start: Callable[..., Child], to: str
) -> None:
    # The results close as the KeyboardInterrupt leaves the loop, from their finalizer: they do
    # not know it is a Ctrl-C, so they wait for the items in hand (use `with` for long items),
    # but say so; the second Ctrl-C stops that wait (no "Exception ignored" from the finalizer),
    # the KeyboardInterrupt goes on, and the exit does not wait for those items again.
    child = start(THREAD_ITEMS, "body")
    child.wait_for(
        "items in hand", lambda: child.out.count("started") == 2 and "ready" in child.out
    )
    child.ctrl_c(to)
    child.wait_for("message", lambda: STOP_WAITING in child.err)
    child.ctrl_c(to)
    status = child.end()
    assert status == -signal.SIGINT, child.err
    lines = child.err.splitlines()
    assert lines[0] == STOP_WAITING, child.err
    _one_keyboard_interrupt_traceback(lines[1:])
    assert child.left_behind() == []


ITEMS_THAT_END_SOON = """
    import time, pipeflow as pf

    def fetch(x):
        print("started", flush=True)
        time.sleep(2)  # soon after the Ctrl-C: the exit waits for it, and then ends by itself
        return x

    pf.Pipeline().stage(fetch, workers=2, kind="thread", name="fetch").run(range(4))
"""


def test_items_that_end_soon_after_ctrl_c_need_no_second_one(start: Callable[..., Child]) -> None:
    child = start(ITEMS_THAT_END_SOON)
    child.wait_for("items in hand", lambda: child.out.count("started") == 2)
    child.ctrl_c("group")
    status = child.end()  # no second Ctrl-C
    assert status == -signal.SIGINT, child.err
    # The message may come first if the machine is slow: it is the one other line allowed.
    lines = [line for line in child.err.splitlines() if line != QUIT_NOW.format("0 'fetch'")]
    _one_keyboard_interrupt_traceback(lines)
    assert child.out.count("started") == 2  # the items were not taken further
    assert child.left_behind() == []


def test_a_quick_exit_says_nothing(start: Callable[..., Child]) -> None:
    child = start("""
        import pipeflow as pf
        print(pf.Pipeline().stage(abs, workers=2, kind="thread").run(range(-3, 0)), flush=True)
    """)
    assert child.end() == 0, child.err
    assert child.out == "[3, 2, 1]\n"
    assert child.err == ""


# ------------------------------------------------------------------ a wait in a close

LEFT_LOOPS = """
    import os, sys, threading, time, pipeflow as pf
    mode = sys.argv[1]
    started = threading.Semaphore(0)

    def fetch(x):
        if x > 0:
            started.release()
            time.sleep(60)
        return x

    def two_in_hand():
        started.acquire()
        started.acquire()

    p = pf.Pipeline().stage(fetch, workers=2, kind="thread", name="fetch")
    if mode == "with-break":  # the end of the block closes the results: a caller gets the error
        try:
            with p.iter(range(10)) as results:
                for x in results:
                    two_in_hand()
                    break
        except KeyboardInterrupt as e:
            print("interrupted", repr(e.__context__), flush=True)
    elif mode.startswith("break"):  # dropped unclosed: their finalizer closes them; no caller
        for x in p.iter(range(10), progress=mode == "break-bar"):
            two_in_hand()
            break
        print("left the loop", flush=True)
    elif mode == "error":  # the run's error waits for the other worker's item
        def check(x):
            if x == 0:
                while not os.path.exists(sys.argv[2]):
                    time.sleep(0.01)
                raise ValueError("bad item")
            open(sys.argv[2], "w").write("started")
            print("started", flush=True)
            time.sleep(60)
        pf.Pipeline().stage(check, workers=2, kind="thread", name="fetch").run(range(2))
"""


def test_ctrl_c_while_a_with_block_closes_stops_the_wait_and_reaches_the_caller(
    start: Callable[..., Child],
) -> None:
    child = start(LEFT_LOOPS, "with-break")
    child.wait_for("message", lambda: STOP_WAITING in child.err)
    child.ctrl_c("group")
    status = child.end()
    assert child.out.splitlines()[-1] == "interrupted None"  # raised by the close; no context
    # The script then ends: the exit does not wait for the items given up, it quits at once.
    assert status == -signal.SIGINT, child.err
    assert child.err.splitlines() == [STOP_WAITING]
    assert child.left_behind() == []


@pytest.mark.parametrize("mode", ["break", "break-bar"])
def test_ctrl_c_while_dropped_results_close_stops_the_wait_quietly(
    start: Callable[..., Child], mode: str
) -> None:
    child = start(LEFT_LOOPS, mode)
    child.wait_for("message", lambda: STOP_WAITING in child.err)
    child.ctrl_c("group")
    status = child.end()
    # The finalizer cannot raise to anyone: the Ctrl-C stops the wait, and the script goes on
    # (no "Exception ignored" traceback, also when a progress bar's generator wraps the run's);
    # the exit then quits without waiting for the items.
    assert child.out.splitlines()[-1] == "left the loop"
    assert status == -signal.SIGINT, child.err
    if mode == "break":
        assert child.err.splitlines() == [STOP_WAITING]
    else:  # the bar's lines around it
        assert child.err.count(STOP_WAITING) == 1
        assert "Traceback" not in child.err and "Exception ignored" not in child.err, child.err
    assert child.left_behind() == []


def test_ctrl_c_while_a_failed_run_waits_for_an_item_keeps_the_error_as_context(
    start: Callable[..., Child], tmp_path: Path
) -> None:
    child = start(LEFT_LOOPS, "error", str(tmp_path / "flag"))
    one = STOP_WAITING.replace("2 thread-stage items", "1 thread-stage item")
    child.wait_for("message", lambda: one in child.err)
    child.ctrl_c("group")
    status = child.end()
    assert status == -signal.SIGINT, child.err
    lines = child.err.splitlines()
    assert lines[0] == one
    assert lines[-1] == "KeyboardInterrupt"
    assert "ValueError: bad item" in lines
    assert "During handling of the above exception, another exception occurred:" in lines
    assert not any(line.startswith("Exception ignored") for line in lines)


# ------------------------------------------------------------------ process and thread stages

PROCESS_THEN_THREAD = """
    import os, sys, time, pipeflow as pf
    held = sys.argv[1]

    def work(x):  # a process stage: its workers hold items 2 and up when the Ctrl-C comes
        if x >= 2:
            open(os.path.join(held, str(os.getpid())), "w").close()
            time.sleep(60)
        return x

    def fetch(x):  # a thread stage: items 0 and 1
        print("started", flush=True)
        time.sleep(60)
        return x

    p = (
        pf.Pipeline()
        .stage(work, workers=2, name="work")
        .stage(fetch, workers=2, kind="thread", name="fetch")
    )
    p.run(range(10))
"""


@pytest.mark.parametrize("to", ["group", "parent"])
def test_process_and_thread_stages_second_ctrl_c_leaves_no_process_or_memory(
    start: Callable[..., Child], tmp_path: Path, to: str
) -> None:
    child = start(PROCESS_THEN_THREAD, str(tmp_path))
    child.wait_for(
        "items in hand", lambda: child.out.count("started") == 2 and any(tmp_path.iterdir())
    )
    holders = [int(p.name) for p in tmp_path.iterdir()]
    child.ctrl_c(to)
    message = QUIT_NOW.format("1 'fetch'")
    child.wait_for("message", lambda: message in child.err)
    # The first Ctrl-C stops the process stage at once, as before: its busy workers are killed
    # (the thread stage's items are what the exit waits for).
    assert _wait_until(lambda: not any(_alive(pid) for pid in holders)), holders
    assert child.proc.poll() is None  # still waiting for the thread-stage items
    child.ctrl_c(to)
    status = child.end()
    assert status == -signal.SIGINT, child.err
    lines = child.err.splitlines()
    assert lines[-1] == message, child.err
    _one_keyboard_interrupt_traceback(lines[:-1])
    # Nothing left: the workers and the fork server were stopped and reaped before the end (an
    # orphaned worker would live on for a second), and so their memfds are gone with them.
    assert child.left_behind() == []
    assert child.shm_left() == set()


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _wait_until(predicate: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + GUARD
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True
