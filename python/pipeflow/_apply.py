"""The per-batch loops: a step's function over the values of one batch, in a thread stage's
worker, a worker process, or the serial backend.

One loop serves map, filter and flat_map (:func:`_run_items`); two fast paths serve a map over a
batch with no ``SKIP`` value, the common case: a list comprehension in a thread, and one over a
shared word's ``track`` in a worker process. Each returns the output batch and how many items it
ran, and keeps ``slot.index`` at the index of the item in hand (``slot.since``: since when, if
``timed``), so that an error, a crash or a timeout names its item. A stop (``stop[0]``) lands
between items.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable
from time import perf_counter
from typing import Any

from ._batch import SKIP, Batch, Key, child_key
from ._context import current_context
from ._plan import Op, Step

__all__ = ["Apply", "Retrying", "apply_for", "step_function", "worker_apply", "worker_op"]

# (fn, batch, slot, timed, stop) -> (output batch, items run)
Apply = Callable[[Callable[[Any], Any], Batch, Any, bool, list[bool]], tuple[Batch, int]]


def _run_items(
    op: Op, fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    """The loop of every op: a map keeps ``fn``'s result, a filter the value itself or SKIP, a
    flat_map every value ``fn`` yields (two or more split the item's key into child keys)."""
    keep = op == "filter"
    flat = op == "flat_map"
    keys: list[Key] = []  # flat_map only: a key per output
    out: list[Any] = []
    split = False  # did an item give two or more values (so the keys are no longer a run)?
    n = 0
    for i, value in enumerate(batch.values):
        if stop[0]:
            break
        if value is not SKIP:
            if timed:  # the start first: the supervisor never pairs this item with an older one's
                slot.since = perf_counter()
            slot.index = i
            value = fn(value) if not keep else (value if fn(value) else SKIP)
            n += 1
            if flat:
                values = list(value)
                if len(values) >= 2:
                    split = True
                    key = batch.key(i)
                    keys.extend(child_key(key, j, len(values)) for j in range(len(values)))
                    out.extend(values)
                    continue
                value = values[0] if values else SKIP
        if flat:
            keys.append(batch.key(i))
        out.append(value)
    return Batch(keys if split else batch.keys, out), n


def _map_fast(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    """A map over a batch with no SKIP value and no per-item timeout to watch: a list
    comprehension; on an exception the list iterator's position names the failing item."""
    values = batch.values
    items = iter(values)
    try:
        out = [fn(value) for value in items if not stop[0]]
    except BaseException:
        slot.index = len(values) - operator.length_hint(items) - 1
        raise
    return Batch(batch.keys, out), len(out)


def _map_tracked(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    """A map in a worker process over a batch with no SKIP value: ``slot.track`` (the shared
    word's) stores each item's index as the comprehension takes it (a stop kills the process
    instead)."""
    values = batch.values
    return Batch(batch.keys, [fn(value) for value in slot.track(values)]), len(values)


_FUNCTION_OPS: tuple[Op, ...] = ("map", "filter", "flat_map")
_LOOPS: dict[str, Apply] = {op: functools.partial(_run_items, op) for op in _FUNCTION_OPS}


def apply_for(step: Step, may_skip: bool) -> Apply:
    """The loop for a step run in this process (a thread stage, the serial backend)."""
    if step.op == "map" and step.timeout is None and not may_skip:
        return _map_fast
    return _LOOPS[step.op]


def worker_op(step: Step, may_skip: bool) -> str:
    """What a worker process is told to run: the step's op, or ``map_plain`` for a map whose
    batches hold no SKIP (see :func:`worker_apply`)."""
    return "map_plain" if step.op == "map" and not may_skip else step.op


def worker_apply(op: str) -> Apply:
    """The loop a worker process runs for the op :func:`worker_op` named."""
    return _map_tracked if op == "map_plain" else _LOOPS[op]


class Retrying:
    """``fn`` with ``retries`` more tries when it raises an ``Exception`` (picklable, so that a
    process stage's worker retries in place)."""

    def __init__(self, fn: Callable[[Any], Any], retries: int) -> None:
        self.fn = fn
        self.retries = retries

    def __call__(self, item: Any) -> Any:
        for _ in range(self.retries):
            try:
                return self.fn(item)
            except Exception:
                if current_context().cancelled:
                    raise
        try:
            return self.fn(item)
        except Exception as e:
            e.add_note(
                f"pipeflow: the item failed {self.retries + 1} times (retries={self.retries})"
            )
            raise


def step_function(step: Step) -> Callable[[Any], Any]:
    """The step's function, with its retries."""
    assert step.fn is not None
    return Retrying(step.fn, step.retries) if step.retries else step.fn
