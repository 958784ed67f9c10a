"""The caller's side of a run, the same for every backend: :class:`Results` (what ``iter``
returns), the list ``run`` returns, and the progress bar around a run (``_progress``).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ._progress import Bar, ProgressSpec, open_bar

if TYPE_CHECKING:
    from ._backend import Backend, Source
    from ._context import Context
    from ._plan import Plan

from ._remote import shown

__all__ = ["Results", "collect", "released", "shown_errors"]


class Results(itertools.chain):  # type: ignore[type-arg]
    """What :meth:`Pipeline.iter` returns: the results one by one, in input order.

    It walks the lists of results the run releases at C speed (an ``itertools.chain``), so
    taking an item costs no Python frame. ``close()`` stops the run and waits for its workers,
    as closing a generator does; so does leaving a ``with`` block over it, and dropping the last
    reference to it.

    Example:
        >>> import itertools, pipeflow as pf
        >>> results = pf.Pipeline(kind="thread").stage(str).iter(itertools.count())
        >>> next(results), next(results)
        ('0', '1')
        >>> results.close()  # stops reading the endless input; nothing is left running
        >>> with pf.Pipeline(kind="thread").stage(str).iter(itertools.count()) as results:
        ...     next(results)
        '0'
    """

    _released: Generator[list[Any], None, None]

    @classmethod
    def over(cls, released: Generator[list[Any], None, None]) -> Results:
        # from_iterable makes an instance of ``cls`` (typeshed says chain): see the test.
        results: Results = cls.from_iterable(released)  # type: ignore[assignment]
        results._released = released
        return results

    def close(self) -> None:
        """Stops the run (if it is still going) and waits until nothing of it is left."""
        self._released.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C in the block's body stops the run as Ctrl-C inside next() does: without
            # waiting for the items in hand (they finish in the background).
            with contextlib.suppress(KeyboardInterrupt, StopIteration):
                self._released.throw(KeyboardInterrupt())
        self.close()


def shown_errors(
    stream: Generator[list[Any], None, None],
) -> Generator[list[Any], None, None]:
    """``stream``, its error raised as the caller is shown it (``_remote.shown``)."""
    __tracebackhide__ = True  # pytest's and IPython's tracebacks skip this frame
    try:
        yield from stream
    except GeneratorExit:
        raise
    except BaseException as error:
        shown(error)  # its traceback: the caller's frames and the stage's, not pipeflow's
        raise


def collect(released: Generator[list[Any], None, None]) -> list[Any]:
    """Every result of a run, in a list built a list at a time."""
    out: list[Any] = []
    for values in released:
        out.extend(values)
    return out


def released(
    backend: Backend, plan: Plan, source: Source, progress: ProgressSpec, ctx: Context
) -> Generator[list[Any], None, None]:
    """The backend's stream of a run (checked at once), with the progress bar around it: made
    once the backend took the run, updated by the backend's progress callback, closed however
    the run ends."""
    if progress is False:
        return backend.stream(plan, source, ctx, None)
    ticker = _Ticker()
    stream = backend.stream(plan, source, ctx, ticker)
    try:
        ticker.bar = open_bar(progress, source.total)
    except BaseException:
        stream.close()
        raise
    return _with_bar(stream, ticker)


class _Ticker:
    """The backend's progress callback: tells the bar how many more items are done (the
    backend says how many are done so far)."""

    def __init__(self) -> None:
        self.bar: Bar | None = None
        self.done = 0

    def __call__(self, done: int) -> None:
        if done > self.done and self.bar is not None:
            self.bar.update(done - self.done)
            self.done = done

    def close(self) -> None:
        bar, self.bar = self.bar, None
        if bar is not None:
            bar.close()


def _with_bar(
    stream: Generator[list[Any], None, None], ticker: _Ticker
) -> Generator[list[Any], None, None]:
    try:
        yield from stream
    finally:
        try:
            stream.close()  # at once, also when this generator is dropped before it started
        finally:
            ticker.close()
