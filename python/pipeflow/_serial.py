"""The serial backend: every step in the caller's thread, one item at a time, for debugging.

``backend="serial"`` (or ``PIPEFLOW_BACKEND=serial``) runs the same plan with the same semantics
as the local backend, but with no worker at all: each input item goes through every step before
the next is read, so ``pdb`` breakpoints and ``print`` work inside stage code, exceptions come
with the stage code's own frames, and results are deterministic (in input order, also for
``ordered=False``). Each step runs in a ``contextvars`` context of its own, as a worker would:
its ``init`` runs once, before the first item, and ``worker_state()`` gives what it returned;
``current_context()`` is the run's context. ``retries`` retry in place; a per-item ``timeout``
cannot interrupt an item here, so an item that took longer fails the run when it returns.
Cancelling the run's context (or its deadline passing) stops it between two calls.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable, Generator
from time import perf_counter
from typing import Any

from . import _state
from ._apply import step_function
from ._backend import Progress, Source, register
from ._batch import Key, child_key
from ._context import Context, _current
from ._errors import ItemTimeout
from ._plan import Plan, Step
from ._remote import item_repr

__all__ = ["SerialBackend"]


class SerialBackend:
    """Runs every step in the caller's thread (see the module's doc)."""

    name = "serial"

    def stream(
        self, plan: Plan, source: Source, ctx: Context, progress: Progress | None
    ) -> Generator[list[Any], None, None]:
        return _SerialRun(plan, source, ctx).released(progress)


register("serial", SerialBackend)


class _StepWorker:
    """One step's only worker: its function, in a contextvars context of its own."""

    def __init__(self, step: Step, ctx: Context) -> None:
        self.step = step
        self.vars = contextvars.copy_context()
        self.vars.run(self._enter, ctx)
        self.fn = step_function(step) if step.fn is not None else None
        self.group: list[Any] = []  # a batch step's group so far
        self.seq = 0  # a batch step's groups so far: the key of the next

    def _enter(self, ctx: Context) -> None:
        _current.set(ctx)
        _state.load(self.step.init)

    def call(self, value: Any) -> Any:
        """``fn(value)`` as the op needs it: the result, its truth, or the list it yields."""
        op, fn, timeout = self.step.op, self.fn, self.step.timeout
        assert fn is not None
        t0 = perf_counter() if timeout is not None else 0.0
        if op == "map":
            result = self.vars.run(fn, value)
        elif op == "filter":
            result = bool(self.vars.run(fn, value))
        else:
            result = self.vars.run(_listed, fn, value)
        if timeout is not None and perf_counter() - t0 > timeout:
            raise ItemTimeout(
                f"an item took longer than timeout={timeout} s (the serial backend cannot "
                "interrupt an item: it fails the run when the item returns)"
            )
        return result


class _SerialRun:
    def __init__(self, plan: Plan, source: Source, ctx: Context) -> None:
        self.plan = plan
        self.source = source
        self.ctx = ctx
        self.workers: list[_StepWorker] = []

    def released(self, progress: Progress | None) -> Generator[list[Any], None, None]:
        """Yields the outputs of each input item as a list (none: nothing is yielded)."""
        ctx = self.ctx
        try:
            for index, step in enumerate(self.plan.steps):  # each init once, before any item
                worker = self._guard(index, None, functools.partial(_StepWorker, step, ctx))
                self.workers.append(worker)
            items = self.source.items
            index = 0
            while True:
                self._check()
                try:
                    value = next(items)
                except StopIteration:
                    break
                except Exception as e:
                    _note(e, f"the input iterable (at item {index})")
                    raise
                out: list[Any] = []
                self._push(0, index, value, out)
                index += 1
                if progress is not None:
                    progress(index)
                if out:
                    yield out
            out = []
            for k in self.plan.batchers():  # the last, partial groups, in step order
                worker = self.workers[k]
                if worker.group:
                    group, worker.group = worker.group, []
                    self._push(k + 1, worker.seq, group, out)
            if out:
                yield out
        except GeneratorExit:
            ctx.cancel("the caller stopped consuming results")
            raise
        except BaseException as e:
            ctx.cancel(f"the run raised {type(e).__name__}")
            raise
        ctx.cancel("the run finished")

    def _check(self) -> None:
        """Raises if the run's context was cancelled (or its deadline passed)."""
        if self.ctx.cancelled:
            raise self.ctx.error()

    def _push(self, index: int, key: Key, value: Any, out: list[Any]) -> None:
        """Takes ``value`` (its key ``key`` in the segment of step ``index``) through the steps
        from ``index`` on; what reaches the end goes into ``out``."""
        if index == len(self.workers):
            out.append(value)
            return
        worker = self.workers[index]
        step = worker.step
        if step.op == "batch":
            worker.group.append(value)
            if len(worker.group) == step.size:
                group, worker.group = worker.group, []
                worker.seq += 1
                self._push(index + 1, worker.seq - 1, group, out)
            return
        self._check()
        result = self._guard(index, key, lambda: worker.call(value), value)
        if step.op == "map":
            self._push(index + 1, key, result, out)
        elif step.op == "filter":
            if result:
                self._push(index + 1, key, value, out)
        elif len(result) == 1:
            self._push(index + 1, key, result[0], out)
        else:
            for j, child in enumerate(result):
                self._push(index + 1, child_key(key, j, len(result)), child, out)

    def _guard(
        self, index: int, key: Key | None, call: Callable[[], Any], value: Any = None
    ) -> Any:
        """``call()``, an exception noted with the stage, the item's position and repr."""
        try:
            return call()
        except Exception as e:
            shown = None if key is None else item_repr(value)
            where = self.plan.where(index, "serial", key, shown)
            if isinstance(e, StopIteration):  # it cannot travel through a generator (PEP 479)
                wrapped = RuntimeError(f"StopIteration raised in {where}")
                _note(wrapped, where)
                raise wrapped from e
            _note(e, where)
            raise


def _listed(fn: Callable[[Any], Any], value: Any) -> list[Any]:
    return list(fn(value))


def _note(error: BaseException, where: str) -> None:
    error.add_note(f"pipeflow: raised in {where}")
