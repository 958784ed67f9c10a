"""What a wait for thread-stage items says, and what a Ctrl-C during it does (a leaf).

A thread cannot be killed, so some waits last as long as stage code does: a run's results closed
by a bare ``for`` loop that was left (the items in hand are finished first), and the
interpreter's exit, which must not finalize while a pool thread may re-enter it (items a Ctrl-C
or a deadline left running in the background). Each such wait goes through a :class:`Notice`:
once it has lasted ``NOTICE_AFTER`` seconds it says, once, on stderr, what it waits for and what
a Ctrl-C does now::

    pipeflow: waiting for 2 thread-stage items to finish (stage 1 'fetch'); press Ctrl-C again
    to quit now

A Ctrl-C during the wait *gives up* those items: nobody waits for them any more, neither the run
nor the exit. At exit that means quitting at once (``_runtime.quit_now``: the worker processes
and the fork server are stopped, then the process ends as an unhandled ``KeyboardInterrupt``
ends it); in a close, the ``KeyboardInterrupt`` goes on to the caller and the exit later quits
at once if a given-up item still runs then. A wait that ends before ``NOTICE_AFTER`` says
nothing: a quick exit stays quiet.
"""

from __future__ import annotations

import inspect
import sys
import time
from collections.abc import Callable
from types import FrameType

__all__ = ["NOTICE_AFTER", "Notice", "close_reaches_caller", "describe", "note_ctrl_c"]

NOTICE_AFTER = 1.0  # seconds of waiting before the wait says what it waits for

_ctrl_c_seen = False  # has a run of this process been stopped by a Ctrl-C?


def note_ctrl_c() -> None:
    """Records that a Ctrl-C stopped a run: the exit's message then says "press Ctrl-C again"."""
    global _ctrl_c_seen
    _ctrl_c_seen = True


def describe(items: dict[str, int], others: int = 0) -> str | None:
    """What a wait waits for, from the thread-stage items still running per stage (``items``, by
    the stage's label) and the count of other tasks; None when it waits for nothing.

    Example:
        >>> describe({"stage 1 'fetch'": 2})
        "2 thread-stage items to finish (stage 1 'fetch')"
        >>> describe({"stage 0 'a'": 1, "stage 2 'b'": 3}, others=1)
        "4 thread-stage items to finish (1 in stage 0 'a', 3 in stage 2 'b') and 1 other task"
    """
    items = {label: n for label, n in items.items() if n > 0}
    n = sum(items.values())
    parts = []
    if n:
        if len(items) == 1:
            where = next(iter(items))
        else:
            where = ", ".join(f"{k} in {label}" for label, k in items.items())
        parts.append(f"{n} thread-stage item{'s' if n != 1 else ''} to finish ({where})")
    if others > 0:
        word = "other task" if parts else "task"
        parts.append(f"{others} {word}{'s' if others != 1 else ''}")
        if not n:
            parts[-1] += " still running on the pool"
    return " and ".join(parts) if parts else None


def close_reaches_caller() -> bool:
    """Whether an exception raised by a results generator being closed now reaches a caller:
    the close came from ``Results.close`` (the user's, or the end of a ``with`` block), not from
    the finalizer of results dropped unclosed (a bare ``for`` loop left by ``break`` or by an
    exception), which Python reports as "Exception ignored" and drops. Called from the
    generator (or a plain function it calls): the first frame above the generators in the
    chain of frames (the backend's, a progress bar's) is the closer's.

    Example:
        >>> close_reaches_caller()  # called from no close at all
        False
    """
    # Not imported: this module is reached from the worker's side, which imports no engine (a
    # Results being closed means the module is loaded).
    results = sys.modules.get("pipeflow._results")
    close = getattr(getattr(results, "Results", None), "close", None)
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and not frame.f_code.co_flags & inspect.CO_GENERATOR:
        frame = frame.f_back  # the plain functions the generator called
    while frame is not None and frame.f_code.co_flags & inspect.CO_GENERATOR:
        frame = frame.f_back
    return frame is not None and close is not None and frame.f_code is close.__code__


class Notice:
    """Says once, on stderr, what a wait waits for, when :meth:`tick` finds that the wait has
    lasted ``NOTICE_AFTER`` seconds. ``what()`` names it (see :func:`describe`; None: say
    nothing yet); ``then`` is what a Ctrl-C does now ("quit now", "stop waiting").

    Example:
        >>> notice = Notice(lambda: describe({"stage 0 'f'": 1}), "quit now")
        >>> notice.tick()  # at once: nothing said
        False
    """

    def __init__(self, what: Callable[[], str | None], then: str) -> None:
        self._what = what
        self._then = then
        self._at = time.monotonic() + NOTICE_AFTER
        self.said = False

    def tick(self) -> bool:
        """Says it if the time has come and it was not said yet; returns whether it is said."""
        if self.said or time.monotonic() < self._at:
            return self.said
        text = self._what()
        if text is None:
            return False
        self.said = True
        again = "again " if _ctrl_c_seen else ""
        # One write: a Ctrl-C that lands right after it (the user read it) cuts no line short.
        sys.stderr.write(f"pipeflow: waiting for {text}; press Ctrl-C {again}to {self._then}\n")
        sys.stderr.flush()
        return True
