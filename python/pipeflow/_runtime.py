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

It also knows the live runs whose input reader is blocked inside the input's ``next()`` after a
stop (:func:`stalled_readers`): the exit does not wait for those, which may never return.
"""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["EXIT_ORDER", "FORK_ORDER", "after_fork", "at_exit", "stalled_readers", "track_run"]

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
    for step in EXIT_ORDER:
        fn = _exit_steps.get(step)
        if fn is not None:
            fn()


def _run_fork_steps() -> None:
    for step in FORK_ORDER:
        fn = _fork_steps.get(step)
        if fn is not None:
            fn()


class _Run(Protocol):
    @property
    def stalled(self) -> bool: ...


_runs: weakref.WeakSet[_Run] = weakref.WeakSet()


def track_run(run: _Run) -> None:
    """Counts ``run`` in :func:`stalled_readers` while it is alive."""
    _runs.add(run)


def stalled_readers() -> int:
    """How many stopped runs have their input reader blocked inside the input's ``next()``: it
    returns when the input yields, maybe never (the interpreter's exit does not wait for it)."""
    return sum(1 for run in list(_runs) if run.stalled)


atexit.register(_run_exit_steps)
os.register_at_fork(after_in_child=_run_fork_steps)
