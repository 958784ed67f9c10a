"""Contexts: cancellation scopes with optional deadlines, after Go's ``context`` package.

A :class:`Context` is cancelled once, by :meth:`Context.cancel`, by its deadline passing, or by
its parent being cancelled; cancellation flows down to children, never up. Code running in a
pipeline stage or a group task finds the context of its run with :func:`current_context`.
Deadlines are checked lazily (by ``cancelled``, ``wait`` and the engine's supervision), so a
context costs no thread.
"""

from __future__ import annotations

import contextvars
import threading
import time
import weakref
from collections.abc import Callable
from types import TracebackType

from ._errors import Cancelled, DeadlineExceeded

__all__ = ["Context", "current_context"]

_DEADLINE_REASON = "deadline exceeded"


class Context:
    """A cancellation scope: ``cancel()``, ``cancelled``, ``raise_if_cancelled()``, ``wait()``.

    Args:
        timeout: seconds from now after which the context cancels itself (None: no deadline).
        parent: a context whose cancellation (and deadline) this one inherits.

    Example:
        >>> import pipeflow as pf
        >>> parent = pf.Context()
        >>> child = pf.Context(timeout=60, parent=parent)
        >>> parent.cancel("shutting down")
        True
        >>> child.cancelled, child.reason
        (True, 'shutting down')
    """

    _deadline: float | None
    _parent: Context | None

    def __init__(self, timeout: float | None = None, parent: Context | None = None) -> None:
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float)
        ):
            raise TypeError(f"timeout must be a number of seconds >= 0 or None, got {timeout!r}")
        if timeout is not None and not (timeout >= 0):
            raise ValueError(f"timeout must be seconds >= 0 or None, got {timeout!r}")
        if parent is not None and not isinstance(parent, Context):
            raise TypeError(f"parent must be a pipeflow.Context, got {type(parent).__name__}")
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._reason: str | None = None
        self._expired = False
        self._children: weakref.WeakSet[Context] = weakref.WeakSet()
        self._callbacks: list[Callable[[Context], None]] = []
        self._tokens = threading.local()
        deadline = None if timeout is None else time.monotonic() + timeout
        if parent is not None and parent._deadline is not None:
            deadline = parent._deadline if deadline is None else min(deadline, parent._deadline)
        self._deadline = deadline
        self._parent = parent
        if parent is not None:
            parent._adopt(self)

    def _adopt(self, child: Context) -> None:
        with self._lock:
            if not self._event.is_set():
                self._children.add(child)
                return
        child._cancel(self._reason or "parent cancelled", self._expired)

    @property
    def deadline(self) -> float | None:
        """The deadline on the ``time.monotonic()`` clock, or None."""
        return self._deadline

    @property
    def reason(self) -> str | None:
        """Why the context was cancelled, or None while it is not."""
        return self._reason if self.cancelled else None

    @property
    def cancelled(self) -> bool:
        """True once the context is cancelled (or its deadline has passed)."""
        if self._event.is_set():
            return True
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._cancel(_DEADLINE_REASON, expired=True)
            return True
        return False

    @property
    def expired(self) -> bool:
        """True if the context was cancelled by a deadline (its own or a parent's)."""
        return self.cancelled and self._expired

    def cancel(self, reason: str = "cancelled") -> bool:
        """Cancels this context and its children. Returns True if this call cancelled it.

        The background context (what :func:`current_context` gives outside any run, group or
        ``with ctx:``) cannot be cancelled, as Go's ``context.Background()`` cannot: every
        later run and group derives from it."""
        if self is _BACKGROUND:
            raise RuntimeError(
                "the background context cannot be cancelled (every later run and group would "
                "start cancelled); make a pipeflow.Context() of your own and run under it"
            )
        return self._cancel(reason, expired=False)

    def _cancel(self, reason: str, expired: bool) -> bool:
        with self._lock:
            if self._event.is_set():
                return False
            self._reason = reason
            self._expired = expired
            self._event.set()
            children = list(self._children)
            callbacks, self._callbacks = self._callbacks, []
        for child in children:
            child._cancel(reason, expired)
        for callback in callbacks:
            callback(self)
        return True

    def _on_cancel(self, callback: Callable[[Context], None]) -> None:
        """Calls ``callback(self)`` once, when the context is cancelled (now, if it is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback(self)

    def raise_if_cancelled(self) -> None:
        """Raises :class:`Cancelled` (:class:`DeadlineExceeded` for a deadline) if cancelled."""
        if self.cancelled:
            raise self.error()

    def error(self) -> Cancelled:
        """The exception that describes this context's cancellation."""
        if self._expired:
            return DeadlineExceeded(self._reason or _DEADLINE_REASON)
        return Cancelled(self._reason or "cancelled")

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the context is cancelled or ``timeout`` seconds pass.

        Returns True if it is cancelled. Interruptible by Ctrl-C in the main thread.
        """
        end = None if timeout is None else time.monotonic() + timeout
        while not self.cancelled:
            now = time.monotonic()
            limits = [t - now for t in (end, self._deadline) if t is not None]
            if end is not None and now >= end:
                return False
            self._event.wait(max(0.0, min(limits)) if limits else None)
        return True

    def __enter__(self) -> Context:
        # A stack per thread: the same context may be entered again, nested or in threads.
        stack = self._tokens.__dict__.setdefault("stack", [])
        stack.append(_current.set(self))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _current.reset(self._tokens.stack.pop())

    def __repr__(self) -> str:
        state = f"cancelled: {self._reason!r}" if self.cancelled else "active"
        return f"<pipeflow.Context {state}>"


_BACKGROUND = Context()
_current: contextvars.ContextVar[Context] = contextvars.ContextVar(
    "pipeflow_context", default=_BACKGROUND
)


def current_context() -> Context:
    """The context of the code that is running: a stage's run, a group's, or a ``with ctx:``.

    Outside any of them, a background context that is never cancelled.

    Example:
        >>> import pipeflow as pf
        >>> def slow_step(x):
        ...     for _ in range(1000):
        ...         pf.current_context().raise_if_cancelled()
        ...     return x
    """
    return _current.get()
