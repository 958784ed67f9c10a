"""Putting results back in input order, and bounding how far the input runs ahead.

Keys (see ``_batch``) name each item's place in the input. A key is *complete* when it arrived,
or all its children (a flat_map's outputs) are.

:class:`Reorderer` takes ``(key, value)`` records in any order and releases values in key order
(or at once, unordered), counting the top-level keys completed. :class:`Window` uses that count to
hold the source back: at most ``limit`` top-level items between issued and completed, so that a
slow item cannot make the reorder buffer grow without bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ._batch import SKIP, Batch, Key

__all__ = ["Reorderer", "Window"]


class _Split:
    """A key split into ``n`` children: those arrived so far, and how far release has got."""

    __slots__ = ("children", "done", "n", "next")

    def __init__(self, n: int) -> None:
        self.n = n
        self.children: dict[int, Any] = {}
        self.next = 0  # ordered: the first child not yet released
        self.done = 0  # unordered: children complete


class Reorderer:
    """Releases values in key order (``ordered``) or as they come, and counts completed keys.

    A batch whose keys are a run (see :class:`Batch`) moves whole, at C speed: released at once
    when it is next in order, else held until it is. ``may_skip`` says whether values can be
    :data:`SKIP` (a filter or flat_map ran), which then are dropped on release.
    """

    def __init__(self, ordered: bool, may_skip: bool = True) -> None:
        self.ordered = ordered
        self.may_skip = may_skip
        self.completed = 0  # top-level keys complete (ordered: also the next key to release)
        self._top: dict[int, Any] = {}
        self._runs: dict[int, list[Any]] = {}  # ordered: first key -> a run's values, held back

    @property
    def buffered(self) -> int:
        """Top-level keys (or runs of them) held back, waiting for an earlier one."""
        return len(self._top) + len(self._runs)

    def push_batch(self, batch: Batch, out: list[Any]) -> None:
        """Takes a batch; appends every value it releases to ``out``."""
        first, values = batch.keys, batch.values
        if isinstance(first, int):
            if not self.ordered or (first == self.completed and not self._top):
                self._extend(out, values)
                self.completed += len(values)
                if self._runs:
                    self._release(out)
            else:
                self._runs[first] = values
                if first == self.completed:
                    self._release(out)
            return
        # Not strict: a batch cut short by a stop has fewer values than keys.
        for key, value in zip(first, values, strict=False):
            self.push(key, value, out)

    def _extend(self, out: list[Any], values: list[Any]) -> None:
        if self.may_skip:
            out.extend([v for v in values if v is not SKIP])
        else:
            out.extend(values)

    def push(self, key: Key, value: Any, out: list[Any]) -> None:
        """Takes one record; appends every value it releases to ``out``."""
        if isinstance(key, int):
            if not self.ordered:
                if value is not SKIP:
                    out.append(value)
                self.completed += 1
                return
            self._top[key] = value
        elif self.ordered:
            self._insert(key, value)
        else:
            self._insert_unordered(key, value, out)
            return
        self._release(out)

    def _release(self, out: list[Any]) -> None:
        """Releases, in order, everything complete from ``completed`` on."""
        top, runs = self._top, self._runs
        while True:
            run = runs.pop(self.completed, None) if runs else None
            if run is not None:
                self._extend(out, run)
                self.completed += len(run)
                continue
            if self.completed not in top:
                return
            node = top[self.completed]
            if type(node) is _Split:
                if not _drain(node, out):
                    return
            elif node is not SKIP:
                out.append(node)
            del top[self.completed]
            self.completed += 1

    def _insert(self, key: tuple[int, ...], value: Any) -> None:
        parent, index, _ = self._walk(key)
        parent[index] = value

    def _insert_unordered(self, key: tuple[int, ...], value: Any, out: list[Any]) -> None:
        if value is not SKIP:
            out.append(value)
        _, _, path = self._walk(key)
        # The leaf is complete: count it in its parent, and every parent it completes in turn.
        for parent, index, node in reversed(path):
            node.done += 1
            if node.done < node.n:
                return
            del parent[index]
        self.completed += 1

    def _walk(
        self, key: tuple[int, ...]
    ) -> tuple[dict[int, Any], int, list[tuple[dict[int, Any], int, _Split]]]:
        """Finds (making split nodes as needed) the dict and index where ``key``'s leaf goes,
        and the path of ``(dict, index, node)`` split nodes above it."""
        path: list[tuple[dict[int, Any], int, _Split]] = []
        parent: dict[int, Any] = self._top
        index = key[0]
        for j in range(1, len(key), 2):
            node = parent.get(index)
            if node is None:
                node = parent[index] = _Split(key[j + 1])
            path.append((parent, index, node))
            parent, index = node.children, key[j]
        return parent, index, path


def _drain(node: _Split, out: list[Any]) -> bool:
    """Releases ``node``'s children in order as far as they are complete; True if all are."""
    children = node.children
    while node.next < node.n:
        child = children.get(node.next)
        if child is None:
            return False
        if type(child) is _Split:
            if not _drain(child, out):
                return False
        elif child is not SKIP:
            out.append(child)
        del children[node.next]
        node.next += 1
    return True


class Window:
    """At most ``limit`` top-level items in flight between a source and its reorder point.

    ``limit()`` is read at each wait, so the bound can follow the batch size as it adapts.
    The source calls :meth:`acquire` with each batch it is about to send; the reorder point
    calls :meth:`completed_to` with its running count. ``stopped()`` lets a waiting source give up
    when the run is cancelled.
    """

    def __init__(self, limit: Callable[[], int], stopped: Callable[[], bool]) -> None:
        self.limit = limit
        self._stopped = stopped
        self._issued = 0
        self._completed = 0
        self._cond = threading.Condition()

    def _full(self, n: int) -> bool:
        """Whether ``n`` more items would exceed the limit (one batch always fits in an empty
        window, however large)."""
        return self._issued > self._completed and self._issued + n - self._completed > self.limit()

    def acquire(self, n: int) -> bool:
        """Waits until ``n`` more items fit; False if the run stopped meanwhile."""
        with self._cond:
            while self._full(n):
                if self._stopped():
                    return False
                self._cond.wait(0.05)
            self._issued += n
            return True

    def try_acquire(self, n: int) -> bool:
        """Counts ``n`` more items in flight if they fit now; never waits."""
        with self._cond:
            if self._full(n):
                return False
            self._issued += n
            return True

    def release(self, n: int) -> None:
        """Takes back ``n`` items acquired but not sent after all."""
        with self._cond:
            self._issued -= n
            self._cond.notify_all()

    @property
    def completed(self) -> int:
        """How many top-level items completed."""
        return self._completed

    def completed_to(self, count: int) -> None:
        """Records that ``count`` top-level items are complete in all."""
        if count != self._completed:
            with self._cond:
                self._completed = count
                self._cond.notify_all()

    def wake(self) -> None:
        """Wakes a waiting source (to notice a stop)."""
        with self._cond:
            self._cond.notify_all()
