"""The backend seam: where a plan's steps run. The :class:`Backend` protocol, and the registry
of backends by name.

A backend is given the whole plan (every step, with its options) and the input, and streams the
results back as lists, in order; it owns its workers, their errors and their clean-up. The
caller's side (``Results``, ``run``'s list, the progress bar, the run's ``Context``) is the same
for every backend (``_results``, ``pipeline``). Two are built in: ``"local"`` (``_local``: worker
threads and processes on this machine) and ``"serial"`` (``_serial``: every step in the caller's
thread, one item at a time, for debugging). README "Adding a backend" says what one must do.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ._context import Context
    from ._plan import Plan

__all__ = ["Backend", "Progress", "Source", "fail_run", "names", "register", "resolve"]

Progress = Callable[[int], None]  # told how many input items are done so far


class _Failing(Protocol):
    """A backend's run, as :func:`fail_run` sees it."""

    ctx: Context
    _lock: threading.Lock
    _error: BaseException | None


def fail_run(run: _Failing, error: BaseException, where: str) -> None:
    """Every backend's rule for an error of a run: the first is kept (``run._error``), noted
    with ``where`` it was raised, and cancels the run; later ones are dropped. A
    ``StopIteration`` is wrapped: it cannot travel through a results generator (PEP 479)."""
    if isinstance(error, StopIteration | StopAsyncIteration):
        wrapped = RuntimeError(f"{type(error).__name__} raised in {where}")
        wrapped.__cause__ = error
        error = wrapped
    with run._lock:
        if run._error is not None:
            return
        run._error = error
    error.add_note(f"pipeflow: raised in {where}")
    run.ctx.cancel(f"{where} raised {type(error).__name__}: {error}")


class Source(NamedTuple):
    """A run's input: an iterator, read lazily, and its length if known."""

    items: Iterator[Any]
    total: int | None


@runtime_checkable
class Backend(Protocol):
    """Runs a plan's steps over a source, streaming the results back."""

    name: str

    def stream(
        self, plan: Plan, source: Source, ctx: Context, progress: Progress | None
    ) -> Generator[list[Any], None, None]:
        """Checks at once that this backend can run ``plan`` (raising before any worker
        starts), and returns a generator that starts the run on its first ``next()`` and yields
        the results as lists, in input order (but for the steps with ``ordered=False``). Every
        step's semantics hold: its op, ``init`` once a worker, ``worker_state()``, ``timeout``,
        ``retries``, ``current_context()`` being ``ctx`` in stage code.

        The first error of the run is raised from the generator as the same exception, with a
        note naming the stage and the item's position (``Plan.where``), after every worker was
        stopped. Cancelling ``ctx`` (or its deadline passing) stops the run: the generator then
        raises ``ctx.error()``. Closing the generator (an early ``break``, or ``Ctrl-C`` thrown
        into it) stops the run and leaves nothing running. However the run ends, the backend
        cancels ``ctx`` (a child of the caller's context, made for this run) when it is over.
        ``progress(n)`` is called, when given, with the number of input items done so far."""
        ...


_registry: dict[str, Callable[[], Backend]] = {}
# Backends registered by their module, imported when a run first names one: name -> module.
_lazy: dict[str, str] = {"dask": "pipeflow._dask"}


def register(name: str, factory: Callable[[], Backend]) -> None:
    """Makes ``backend=name`` run on ``factory()`` (called at each run that names it)."""
    _registry[name] = factory


def names() -> list[str]:
    return sorted({*_registry, *_lazy})


def _factory(name: str) -> Callable[[], Backend] | None:
    """The registered factory of ``name``, importing its module first if it registers lazily."""
    if name not in _registry and name in _lazy:
        import importlib

        importlib.import_module(_lazy[name])  # it registers itself
    return _registry.get(name)


def resolve(backend: str | Backend | None) -> Backend:
    """The backend a run names: a registered name, a backend object, or None for the default
    (``PIPEFLOW_BACKEND`` if set, else ``"local"``)."""
    if backend is None:
        backend = os.environ.get("PIPEFLOW_BACKEND") or "local"
        if backend not in names():
            raise ValueError(
                f"PIPEFLOW_BACKEND={backend!r} names no backend; set it to one of {names()}"
            )
    if isinstance(backend, str):
        factory = _factory(backend)
        if factory is None:
            raise ValueError(
                f"backend must be one of {names()} or a backend object, got {backend!r}"
            )
        return factory()
    if not isinstance(backend, Backend):
        raise TypeError(
            f"backend must be one of {names()} or an object with a stream() method (see "
            f"pipeflow's README, 'Adding a backend'), got {type(backend).__name__}"
        )
    return backend
