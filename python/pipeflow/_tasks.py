"""A run's tasks on the shared pool: start them in the caller's contextvars, know which still
run and on which thread, wait for them (the local backend's).
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections.abc import Callable
from typing import Any

from . import _pool

__all__ = ["Tasks"]


class Tasks:
    """The tasks of one run. Each runs ``fn(*args)`` in a copy of the contextvars of the thread
    that submitted it, with ``setup()`` called first (the run sets its context there)."""

    def __init__(self, setup: Callable[[], None]) -> None:
        self._setup = setup
        self._cond = threading.Condition()
        self._running: set[int] = set()
        self.abandoned: set[int] = set()  # running past an item timeout: not waited for
        self.given_up: set[int] = set()  # a Ctrl-C gave them up: the exit does not wait either
        self.threads: dict[int, int] = {}  # running task -> the thread it runs on
        self._ids = itertools.count()

    def submit(self, fn: Callable[..., None], *args: Any) -> int:
        """Runs ``fn(*args)`` on the pool; returns the task's id."""
        task_vars = contextvars.copy_context()
        with self._cond:
            task_id = next(self._ids)
            self._running.add(task_id)

        def task() -> None:
            self.threads[task_id] = threading.get_ident()
            try:
                task_vars.run(self._in_context, fn, *args)
            finally:
                with self._cond:
                    self._running.discard(task_id)
                    del self.threads[task_id]
                    self._cond.notify_all()

        try:
            _pool.default_pool().submit(task)
        except BaseException:
            with self._cond:
                self._running.discard(task_id)
            raise
        return task_id

    def _in_context(self, fn: Callable[..., None], *args: Any) -> None:
        self._setup()
        fn(*args)

    def abandon(self, task_id: int) -> None:
        """Stops waiting for a task (a thread cannot be killed: it finishes in the background)."""
        with self._cond:
            self.abandoned.add(task_id)

    def on_own_thread(self) -> bool:
        """Whether the calling thread runs one of these tasks."""
        return threading.get_ident() in self.threads.values()

    def give_up(self) -> None:
        """Stops waiting for every task still running, for good: neither the run nor the
        interpreter's exit waits for them (see ``_interrupt``)."""
        with self._cond:
            self.abandoned |= self._running
            self.given_up |= self._running

    def running(self) -> set[int]:
        """The tasks still running, but those given up."""
        with self._cond:
            return self._running - self.given_up

    def waited_for(self) -> set[int]:
        """The tasks still running that the run waits for: not abandoned, nor given up."""
        with self._cond:
            return self._running - self.abandoned

    def given_up_running(self) -> int:
        """How many of the tasks given up still run."""
        with self._cond:
            return len(self._running & self.given_up)

    def join(self, skip: Callable[[], set[int]], timeout: float | None = None) -> bool:
        """Waits for every task but those abandoned and those ``skip()`` names; with
        ``timeout``, at most that long. Returns whether they all ended."""

        def done() -> bool:
            return not (self._running - self.abandoned - skip())

        with self._cond:
            return self._cond.wait_for(done, timeout)
