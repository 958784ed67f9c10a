"""Putting results back in input order, and bounding how far the input runs ahead.

Keys. Every item carries a key naming its place in the input. The source numbers items
0, 1, 2, ...; map and filter steps keep the key of their input; a flat_map step that turns the
item with key ``k`` into ``n >= 2`` items gives them keys ``k + (i, n)`` (``k`` as a tuple), for
``i`` in ``0..n``, so nested flat_maps make keys like ``(7, 0, 3, 1, 2)``. Each key reaches the
end exactly once: as a value, or as :data:`SKIP` (filtered out, or a flat_map with no output),
or split into its children. A key is *complete* when it arrived, or all its children are.

:class:`Reorderer` takes ``(key, value)`` records in any order and releases values in key order
(or at once, unordered), counting the top-level keys completed. :class:`Window` uses that count to
hold the source back: at most ``limit`` top-level items between issued and completed, so that a
slow item cannot make the reorder buffer grow without bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

__all__ = ["SKIP", "Reorderer", "Window", "child_key"]


class _Skip:
    """The value of a record that carries a key but no item."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIP"

    def __reduce__(self) -> str:
        return "SKIP"  # unpickles as this module's singleton: identity survives a process hop


SKIP: Any = _Skip()

Key = int | tuple[int, ...]


def child_key(key: Key, i: int, n: int) -> tuple[int, ...]:
    """The key of output ``i`` of ``n`` of the item with ``key``."""
    return (key, i, n) if isinstance(key, int) else (*key, i, n)


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

    Batches are contiguous in key order (the source numbers consecutive items into a batch,
    every step keeps a batch's order and emits a record for every key, and re-chunking cuts a
    batch into contiguous slices). So a batch whose first and last keys are ints ``a`` and
    ``b`` with ``b - a == len(batch) - 1`` is the run ``a..b`` of plain keys: :meth:`push_batch`
    moves such runs whole, which is the common case, at C speed.
    """

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self.completed = 0  # top-level keys complete (ordered: also the next key to release)
        self._top: dict[int, Any] = {}
        self._runs: dict[int, list[Any]] = {}  # ordered: first key -> a whole run, held back

    @property
    def buffered(self) -> int:
        """Top-level keys (or runs of them) held back, waiting for an earlier one."""
        return len(self._top) + len(self._runs)

    def push_batch(self, batch: list[Any], out: list[Any]) -> None:
        """Takes a batch of records; appends every value it releases to ``out``."""
        first, last = batch[0][0], batch[-1][0]
        if type(first) is int and type(last) is int and last - first == len(batch) - 1:
            if not self.ordered or (first == self.completed and not self._top):
                out.extend([v for _, v in batch if v is not SKIP])
                self.completed += len(batch)
                if self.ordered and self._runs:
                    self._release(out)
            else:
                self._runs[first] = batch
                if first == self.completed:
                    self._release(out)
            return
        for key, value in batch:
            self.push(key, value, out)

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
                out.extend([v for _, v in run if v is not SKIP])
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

    def acquire(self, n: int) -> bool:
        """Waits until ``n`` more items fit; False if the run stopped meanwhile."""
        with self._cond:
            while (
                self._issued > self._completed and self._issued + n - self._completed > self.limit()
            ):
                if self._stopped():
                    return False
                self._cond.wait(0.05)
            self._issued += n
            return True

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
