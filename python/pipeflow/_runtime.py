"""Process-wide state's life: the one ordered sequence of at-exit and after-fork steps (a leaf).

pipeflow keeps four kinds of process-wide state, each in the module that owns it: the thread pool
(``_pool``), the warm set of idle worker processes (``_process``), the fork server (``_zygote``)
and the shared-memory arena (``_shm``). Each registers its steps here by name, and this module
runs them in the order below, whatever the order the modules were imported in:

At exit (``EXIT_ORDER``):
  1. ``pool``: cancel the runs and groups of the background context, and wait for the pool's
     tasks (a run's proxies kill the worker processes that hold items, and give the idle ones
     back to the warm set);
  2. ``workers``: stop the idle worker processes, now that no run can give one back;
  3. ``fork server``: stop it, now that no run can ask it for a worker.

In a child made by ``os.fork()`` (``FORK_ORDER``), each forgets what is its parent's: the pool's
threads, the idle workers, the fork server, the arena. (The steps are independent; the order is
fixed all the same.)

It also knows the live runs: whose input reader is blocked inside the input's ``next()`` after a
stop (:func:`stalled_readers`), and whose tasks a Ctrl-C gave up (:func:`given_up_tasks`, see
``_interrupt``): the exit waits for neither (the first may never return; the user asked not to
wait for the second), and :func:`waiting_for` names the thread-stage items it does wait for.

A Ctrl-C during the exit's steps, or tasks given up still running when the pool step has
nothing else to wait for, end the process at once (:func:`quit_now`): the steps after ``pool``
still run, so no worker process or fork server is left behind.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import weakref
from collections.abc import Callable
from typing import NoReturn, Protocol

__all__ = [
    "EXIT_ORDER",
    "FORK_ORDER",
    "after_fork",
    "at_exit",
    "given_up_tasks",
    "quit_now",
    "stalled_readers",
    "track_run",
    "waiting_for",
]

EXIT_ORDER = ("pool", "workers", "fork server")
FORK_ORDER = ("pool", "workers", "fork server", "arena")

_exit_steps: dict[str, Callable[[], None]] = {}
_fork_steps: dict[str, Callable[[], None]] = {}


def at_exit(step: str, fn: Callable[[], None]) -> None:
    """Runs ``fn`` at interpreter exit, in the place of ``step`` in :data:`EXIT_ORDER`."""
    if step not in EXIT_ORDER:
        raise ValueError(f"unknown exit step {step!r}; one of {EXIT_ORDER}")
    _exit_steps[step] = fn


def after_fork(step: str, fn: Callable[[], None]) -> None:
    """Runs ``fn`` in a child made by ``os.fork()``, in the place of ``step`` in
    :data:`FORK_ORDER`."""
    if step not in FORK_ORDER:
        raise ValueError(f"unknown fork step {step!r}; one of {FORK_ORDER}")
    _fork_steps[step] = fn


def _run_exit_steps() -> None:
    try:
        for step in EXIT_ORDER:
            fn = _exit_steps.get(step)
            if fn is not None:
                fn()
    except KeyboardInterrupt:
        # A Ctrl-C while the exit waits (for thread-stage items, most often): quit now, with no
        # traceback from atexit.
        quit_now()


def quit_now() -> NoReturn:
    """Ends the process at once, as an unhandled ``KeyboardInterrupt`` ends it (killed by
    SIGINT: status 130 in a shell), without waiting for what still runs on the pool.

    The exit steps after ``pool`` run first (the idle worker processes and the fork server are
    stopped and reaped; workers that held items were killed by their runs' stop), and stdout,
    stderr and ``logging``'s handlers are flushed. Not run: the ``finally`` blocks of stage code
    still running in threads, and the atexit handlers registered before pipeflow was imported.
    A Ctrl-C more during these steps ends the process at once (SIGINT is back to its default).
    """
    main = threading.current_thread() is threading.main_thread()
    if main:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    for step in EXIT_ORDER[EXIT_ORDER.index("pool") + 1 :]:
        fn = _exit_steps.get(step)
        if fn is not None:
            with contextlib.suppress(Exception):
                fn()
    logging = sys.modules.get("logging")
    for flush in (getattr(logging, "shutdown", None), sys.stdout.flush, sys.stderr.flush):
        if flush is not None:
            with contextlib.suppress(Exception):
                flush()
    if main:
        os.kill(os.getpid(), signal.SIGINT)  # delivered before kill() returns: the end
    os._exit(128 + signal.SIGINT)  # not the main thread (it cannot reset the handler)


def _run_fork_steps() -> None:
    for step in FORK_ORDER:
        fn = _fork_steps.get(step)
        if fn is not None:
            fn()


class _Run(Protocol):
    @property
    def stalled(self) -> bool: ...

    @property
    def given_up(self) -> int: ...

    def waiting_for(self) -> dict[str, int]: ...


_runs: weakref.WeakSet[_Run] = weakref.WeakSet()


def track_run(run: _Run) -> None:
    """Counts ``run`` in :func:`stalled_readers` while it is alive."""
    _runs.add(run)


def stalled_readers() -> int:
    """How many stopped runs have their input reader blocked inside the input's ``next()``: it
    returns when the input yields, maybe never (the interpreter's exit does not wait for it)."""
    return sum(1 for run in list(_runs) if run.stalled)


def given_up_tasks() -> int:
    """How many tasks of live runs a Ctrl-C gave up are still running (see ``_interrupt``)."""
    return sum(run.given_up for run in list(_runs))


def waiting_for() -> dict[str, int]:
    """The thread-stage items still running that someone waits for, per stage label (of every
    live run; not those given up)."""
    out: dict[str, int] = {}
    for run in list(_runs):
        for label, n in run.waiting_for().items():
            out[label] = out.get(label, 0) + n
    return out


atexit.register(_run_exit_steps)
os.register_at_fork(after_in_child=_run_fork_steps)
