"""errgroup: run tasks on the pool, wait for all, get the first error, cancel the rest.

After Go's ``golang.org/x/sync/errgroup``. What the caller sees, by design:

- The first task to raise wins (decided under a lock) and cancels ``group.context`` at once with a
  reason naming the task; :meth:`Group.wait` (and leaving the ``with`` block) re-raises that same
  exception object, with the task's traceback, after every task has finished.
- Later exceptions are not lost: they are kept in :attr:`Group.errors` and summarised in a note on
  the first one.
- Once the group has failed, ``go`` starts nothing more: it returns a task already cancelled.
  So it does once its context was cancelled from outside (the parent's); :meth:`Group.wait`
  then raises that cancellation, so that tasks that never ran are not taken for done.
- Ctrl-C while waiting cancels the context and propagates at once (threads cannot be killed;
  tasks that check the context stop soon after).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Literal, ParamSpec, TypeVar

from ._context import Context, _current, current_context
from ._pool import default_pool
from ._remote import shown

__all__ = ["Group", "Task"]

T = TypeVar("T")
P = ParamSpec("P")


class Task(Generic[T]):
    """A handle on one task of a :class:`Group`: ``done()``, ``result()``, ``exception()``."""

    __slots__ = ("_done", "_error", "_name", "_tb", "_value")

    def __init__(self, name: str) -> None:
        self._name = name
        self._done = threading.Event()
        self._value: T | None = None
        self._error: BaseException | None = None
        self._tb: TracebackType | None = None  # the error's, as the task raised it

    def done(self) -> bool:
        """True once the task has finished (returned, raised or was cancelled)."""
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> T:
        """The task's return value, waiting up to ``timeout`` seconds; re-raises its exception."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"task {self._name} did not finish within {timeout} s")
        if self._error is not None:
            try:
                raise self._error.with_traceback(self._tb)
            except BaseException as error:
                shown(error)  # its traceback: the caller's frames and the task's, not pipeflow's
                raise
        return self._value  # type: ignore[return-value]

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The task's exception (None if it returned), waiting up to ``timeout`` seconds."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"task {self._name} did not finish within {timeout} s")
        return self._error

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._error else "done")
        return f"<pipeflow.Task {self._name} {state}>"


class Group:
    """Runs tasks concurrently; the first error cancels the others and is re-raised.

    Args:
        limit: at most this many tasks run at once; ``go`` blocks while the limit is reached
            (Go's ``SetLimit``). None: no limit.
        context: the parent of the group's context (default: the current context).

    Example:
        >>> import pipeflow as pf
        >>> with pf.Group(limit=4) as g:
        ...     tasks = [g.go(pow, n, 2) for n in range(10)]
        >>> [t.result() for t in tasks][:4]
        [0, 1, 4, 9]
    """

    def __init__(self, limit: int | None = None, *, context: Context | None = None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
            raise TypeError(f"limit must be an int >= 1 or None, got {limit!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None (no limit), got {limit}")
        self._limit = limit
        self._slots = threading.Semaphore(limit) if limit is not None else None
        self._ctx = Context(parent=context if context is not None else current_context())
        self._cond = threading.Condition()
        self._pending = 0
        self._errors: list[BaseException] = []
        # The first error's traceback as it was raised (raising it again would lengthen it).
        self._first_tb: TracebackType | None = None
        self._noted = False
        self._done_ok = False  # a wait() returned without error (the context is done then)

    @property
    def context(self) -> Context:
        """Cancelled when the first task fails (or the ``with`` block raises)."""
        return self._ctx

    @property
    def errors(self) -> list[BaseException]:
        """Every exception the tasks raised so far, first one first."""
        with self._cond:
            return list(self._errors)

    def go(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Task[T]:
        """Starts ``fn(*args, **kwargs)`` on the pool, blocking while ``limit`` tasks run."""
        _check_callable(fn)
        if self._slots is not None:
            self._slots.acquire()
        return self._start(fn, args, kwargs)

    def try_go(
        self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs
    ) -> Task[T] | Literal[False]:
        """Like :meth:`go`, but returns False instead of blocking when ``limit`` tasks run."""
        _check_callable(fn)
        if self._slots is not None and not self._slots.acquire(blocking=False):
            return False
        return self._start(fn, args, kwargs)

    def _start(self, fn: Callable[..., T], args: Any, kwargs: Any) -> Task[T]:
        task: Task[T] = Task(getattr(fn, "__qualname__", repr(fn)))
        if self._ctx.cancelled and not self._done_ok:
            task._error = error = self._ctx.error()
            task._done.set()
            self._release()
            with self._cond:
                if not self._errors:
                    # Cancelled from outside (the parent context), not by a failed task: this
                    # task does not run, and wait() must say so rather than return as if it had.
                    self._errors.append(error)
            return task
        with self._cond:
            self._pending += 1
        caller_vars = contextvars.copy_context()

        def run() -> None:
            caller_vars.run(self._run, task, fn, args, kwargs)

        try:
            default_pool().submit(run)
        except BaseException:
            self._finish()
            raise
        return task

    def _run(self, task: Task[T], fn: Callable[..., T], args: Any, kwargs: Any) -> None:
        _current.set(self._ctx)
        try:
            task._value = fn(*args, **kwargs)
        except BaseException as e:
            task._error = shown(e)  # without pipeflow's frames: the task's own
            task._tb = e.__traceback__
            self._fail(task, e)
        finally:
            task._done.set()
            self._finish()

    def _fail(self, task: Task[Any], error: BaseException) -> None:
        with self._cond:
            self._errors.append(error)
            first = len(self._errors) == 1
            if first:
                self._first_tb = error.__traceback__
        if first:
            self._ctx.cancel(f"task {task._name} raised {type(error).__name__}: {error}")

    def _release(self) -> None:
        if self._slots is not None:
            self._slots.release()

    def _finish(self) -> None:
        self._release()
        with self._cond:
            self._pending -= 1
            if self._pending == 0:
                self._cond.notify_all()

    def wait(self) -> None:
        """Waits for every task; re-raises the first exception any of them raised."""
        try:
            with self._cond:
                while self._pending:
                    self._cond.wait()
        except BaseException:
            self._ctx.cancel("the caller was interrupted while waiting")
            raise
        try:
            self._raise_first()
            self._done_ok = True
        except BaseException as error:
            shown(error)  # its traceback: the caller's frames and the task's, not pipeflow's
            raise
        finally:
            # As errgroup.WithContext: once Wait returns, the group's context is done (tasks
            # started later still run, as in Go, and see it done).
            self._ctx.cancel("the group finished")

    def _raise_first(self) -> None:
        with self._cond:
            if not self._errors:
                return
            first, others = self._errors[0], self._errors[1:]
            if others and not self._noted:
                self._noted = True
                listed = "; ".join(f"{type(e).__name__}: {e}" for e in others[:5])
                more = f" (+{len(others) - 5} more)" if len(others) > 5 else ""
                first.add_note(
                    f"pipeflow.Group: {len(others)} other task(s) also failed: {listed}{more}"
                    " (all in Group.errors)"
                )
        raise first.with_traceback(self._first_tb)

    def __enter__(self) -> Group:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            self._ctx.cancel(f"the with block raised {type(exc).__name__}: {exc}")
            if isinstance(exc, KeyboardInterrupt):
                return  # Ctrl-C must not wait for tasks that ignore the context
            # The block's own exception propagates; task errors stay in .errors.
            with contextlib.suppress(BaseException):
                self.wait()
            return
        try:
            self.wait()
        except BaseException as error:
            shown(error)  # its traceback: the caller's frames and the task's, not pipeflow's
            raise


def _check_callable(fn: object) -> None:
    if not callable(fn):
        raise TypeError(f"Group.go needs a callable, got {type(fn).__name__}: {fn!r}")
