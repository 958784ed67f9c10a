"""The process-wide work-stealing pool that runs thread stages and group tasks.

Created on first use. Threads start on demand and retire after ``KEEP_ALIVE`` seconds idle.
After ``os.fork()`` the child forgets the parent's pool (its threads do not exist there) and makes
a new one on first use; at interpreter exit the pool is shut down (the first of the exit steps:
see ``_runtime``).
"""

from __future__ import annotations

import threading

from . import _interrupt, _runtime
from ._context import _BACKGROUND
from ._core import Pool

__all__ = ["default_pool", "shutdown_default_pool"]

MAX_THREADS = 1024
KEEP_ALIVE = 10.0
EXIT_SLICE = 0.1  # the exit's wait for the pool checks what it waits for this often

_lock = threading.Lock()
_pool: Pool | None = None
_exited = False  # set by _at_exit: no new pool after it


def default_pool() -> Pool:
    """The shared pool, created on first use."""
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _exited:
                raise RuntimeError(
                    "pipeflow cannot run now: the interpreter is exiting and pipeflow has shut "
                    "down (an atexit handler registered before pipeflow was imported runs after "
                    "pipeflow's); run pipelines before exit, or import pipeflow first"
                )
            if _pool is None:
                _pool = Pool(max_threads=MAX_THREADS, keep_alive=KEEP_ALIVE)
            pool = _pool
    return pool


def shutdown_default_pool(timeout: float | None = None) -> bool:
    """Shuts the shared pool down, waiting up to ``timeout`` seconds for its threads to exit.

    Returns True if every thread exited. The next use creates a new pool.
    """
    global _pool
    with _lock:
        pool, _pool = _pool, None
    return True if pool is None else pool.shutdown(timeout)


def _after_fork_in_child() -> None:
    global _pool, _lock
    _lock = threading.Lock()
    if _pool is not None:
        _pool._abandon_after_fork()
        _pool = None


def _at_exit() -> None:
    """Stops what still runs on the pool, and waits for it: a pool thread that re-enters the
    interpreter while it finalizes would abort the process. Runs and groups that derive from the
    background context (all but those given a root ``Context`` of their own) are cancelled first,
    so their workers stop at the next item; code that ignores cancellation is waited for, as
    ``concurrent.futures`` waits for its threads, and a wait that lasts says what it waits for
    (``_interrupt.Notice``). Not waited for: a stopped run's input reader blocked in the input's
    ``next()``, which may never return. A Ctrl-C meanwhile (the exit steps turn it into
    ``_runtime.quit_now``), or tasks a Ctrl-C gave up with nothing else left to wait for, end
    the process at once."""
    global _exited, _pool
    _BACKGROUND._cancel("the interpreter is exiting", expired=False)
    with _lock:
        pool, _pool, _exited = _pool, None, True
    if pool is None:
        return
    notice = _interrupt.Notice(lambda: _waited_for(pool), "quit now")
    while not pool.shutdown(EXIT_SLICE):
        # Not waited for: a stopped run's input reader blocked in the input's next(). That may
        # never return (an event queue nobody feeds any more), and the exit would hang for good.
        stalled, given_up = _runtime.stalled_readers(), _runtime.given_up_tasks()
        if pool.running <= stalled + given_up:
            if given_up:
                _runtime.quit_now()  # the user said not to wait for those
            return
        notice.tick()


def _waited_for(pool: Pool) -> str | None:
    """What the exit waits for, in words (see ``_interrupt.describe``)."""
    items = _runtime.waiting_for()
    left = pool.running - _runtime.stalled_readers() - _runtime.given_up_tasks()
    text = _interrupt.describe(items, left - sum(items.values()))
    if text is not None and not items:
        # Not a stage's item: a group's task, or code of a run with a root context of its own.
        text += (
            " (threads cannot be killed; stage code can stop early with "
            "pipeflow.current_context().raise_if_cancelled())"
        )
    return text


_runtime.after_fork("pool", _after_fork_in_child)
_runtime.at_exit("pool", _at_exit)
