"""Items travelling together: :class:`Batch` (a column of keys, a column of values), the keys
that name an item's place in the input, :data:`SKIP`, and :class:`Slot`, where a worker is in
its batch.

Keys. Every item carries a key naming its place in the input. The source numbers items
0, 1, 2, ...; map and filter steps keep the key of their input; a flat_map step that turns the
item with key ``k`` into ``n >= 2`` items gives them keys ``k + (i, n)`` (``k`` as a tuple), for
``i`` in ``0..n``, so nested flat_maps make keys like ``(7, 0, 3, 1, 2)``. Each key reaches the
end exactly once: as a value, or as :data:`SKIP` (filtered out, or a flat_map with no output),
or split into its children.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _shm

if TYPE_CHECKING:
    from ._core import Block

__all__ = ["SKIP", "Batch", "Key", "Slot", "child_key"]


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


class Batch:
    """Items travelling together, as two columns: ``keys`` and ``values``.

    ``keys`` is an int ``k`` for the run of plain keys ``k, k+1, ...`` (the common case: the
    source numbers consecutive items into a batch, and map and filter keep keys), or a list of
    keys once a flat_map split an item. Steps work on the ``values`` list alone, at C speed where
    they can, and a process stage pickles the list without a tuple per item.

    A batch that came back from a worker process keeps its values pickled (:meth:`encoded`)
    until something reads ``values``: when the next step is a process stage too, the parent
    forwards the bytes as they are, and never unpickles and pickles them again. Its large
    buffers are in shared-memory blocks (``_shm``), which it holds until it is unpickled.
    """

    __slots__ = ("_blocks", "_count", "_origin", "_payload", "_values", "keys")

    def __init__(self, keys: int | list[Key], values: list[Any]) -> None:
        self.keys = keys
        self._values: list[Any] | None = values
        self._payload: bytes | None = None
        self._blocks: list[Block] = []
        self._count = len(values)
        self._origin: str | None = None

    @classmethod
    def encoded(
        cls,
        keys: int | list[Key],
        payload: bytes,
        count: int,
        blocks: list[Block] | None = None,
    ) -> Batch:
        """A batch of ``count`` values, pickled in ``payload``, their large buffers in
        ``blocks`` (see :meth:`encode`)."""
        batch = cls.__new__(cls)
        batch.keys = keys
        batch._values = None
        batch._payload = payload
        batch._blocks = blocks or []
        batch._count = count
        batch._origin = None
        return batch

    def came_from(self, origin: str) -> None:
        """Says where the values come from, for the error if they do not unpickle where they
        are read. (A string, not a function to make one: a batch waits in channels, which the
        garbage collector does not look into, so what it holds must not lead back to the run.)"""
        self._origin = origin

    @property
    def encoded_now(self) -> bool:
        """Whether the values are still pickled (:meth:`encoded`, not read yet)."""
        return self._values is None

    @property
    def nbytes(self) -> int:
        """The size of the pickled values and their shared-memory buffers (0 once unpickled)."""
        if self._payload is None:
            return 0
        return len(self._payload) + sum(len(b) for b in self._blocks)

    @property
    def values(self) -> list[Any]:
        """The values (unpickled on first use, for a batch made by :meth:`encoded`)."""
        if self._values is None:
            try:
                self._values = _shm.loads(self._payload, self._blocks)  # type: ignore[arg-type]
            except Exception as e:
                origin = self._origin or "a worker process"
                e.add_note(
                    f"pipeflow: the results of {origin} could not be unpickled in the parent "
                    "process (is their class importable here?)"
                )
                raise
            self._payload = None
            self._blocks = []  # the arrays that need them hold them now
        return self._values

    def encode(self) -> tuple[bytes, list[_shm.Desc], list[Block]]:
        """The values pickled for a worker process (protocol 5; cloudpickle, so that instances
        of classes defined in ``__main__`` cross too; as fast as pickle for plain values): the
        pickle, the descriptors of its large buffers' blocks, and the blocks that hold them
        until the worker answered (it takes references of its own)."""
        if self._payload is not None:
            return self._payload, [b.desc for b in self._blocks], self._blocks
        payload, descs = _shm.dumps(self._values)
        return payload, descs, _shm.adopt(descs)

    def __len__(self) -> int:
        return self._count

    def __reduce__(self) -> tuple[Any, ...]:
        return (Batch, (self.keys, self.values))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Batch):
            return NotImplemented
        return self.keys == other.keys and self.values == other.values

    def __repr__(self) -> str:
        return f"Batch({self.keys!r}, {self.values!r})"

    def key(self, i: int) -> Key:
        """The key of value ``i``."""
        keys = self.keys
        return keys + i if isinstance(keys, int) else keys[i]

    def piece(self, start: int, stop: int) -> Batch:
        """Values ``start:stop``, with their keys."""
        keys = self.keys
        if isinstance(keys, int):
            return Batch(keys + start, self.values[start:stop])
        return Batch(keys[start:stop], self.values[start:stop])


class Slot:
    """Where one worker is in its batch, for naming the item an error, a crash or a timeout
    concerns: ``index`` of the item in hand in ``batch`` (None between items), and ``since``,
    when it started (written only when a per-item ``timeout`` is watched). The per-batch loops
    (``_apply``) write ``index`` and ``since``; a worker process's slot writes ``index`` into the
    word it shares with its parent instead (``_worker``)."""

    __slots__ = ("batch", "index", "shown", "since")

    def __init__(self) -> None:
        self.index: int | None = None
        self.since = 0.0
        self.batch: Batch | None = None
        self.shown: str | None = None  # the item's repr, from whoever had it (a worker process)

    def key(self) -> Key | None:
        """The key of the item in hand, if any."""
        index, batch = self.index, self.batch
        if index is None or batch is None or not 0 <= index < len(batch):
            return None
        return batch.key(index)

    def value(self) -> str | None:
        """A short repr of the item in hand, if it can be had without unpickling a batch."""
        from ._remote import item_repr

        index, batch = self.index, self.batch
        if self.shown is not None or index is None or batch is None:
            return self.shown
        if batch.encoded_now or not 0 <= index < len(batch):
            return None
        return item_repr(batch.values[index])

    def clear(self) -> None:
        self.index = None
        self.batch = None
        self.shown = None
