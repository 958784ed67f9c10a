"""Large buffers between processes through a shared-memory arena (``_core.Arena``).

Pickle protocol 5 hands a pickler's out-of-band buffers (numpy arrays, ``PickleBuffer``) to a
callback: :func:`dumps` writes each one of at least :data:`THRESHOLD` bytes into a block of the
arena and puts the block's descriptor in the message instead of the bytes. The receiver
unpickles with the blocks as the buffers (:func:`loads`): a numpy array comes back as a view on
its block, writable, kept alive by its ``base``; the block is freed, and its pages returned to
the OS, when the last view dies, also long after the run and its workers are gone. An array made
with :func:`empty` lives in the arena from the start and crosses without any copy.

Whose reference is whose. A descriptor in a worker's reply carries one reference, which the
parent adopts at once (:func:`adopt`), before it even unpickles the batch. The descriptors of a
request stay the parent's until the reply comes (the pending batch holds their blocks); the
worker only borrows them (:func:`borrow`), and takes a reference of its own just before it
answers if stage code kept an input array (:func:`keep_used`). So a worker killed while it holds
a batch (a crash, a stop, Ctrl-C) leaks nothing: a block it was writing, or sent in a reply
nobody read, is freed by ``reclaim``; one it borrowed is the parent's.

When the arena is full, or a buffer is small, the bytes go in the pickle as usual: slower, never
stuck.

Example:
    >>> import numpy as np
    >>> from pipeflow import _shm
    >>> data, descs = _shm.dumps({"a": np.arange(100_000.0)})
    >>> len(data) < 1000, len(descs)
    (True, 1)
    >>> out = _shm.loads(data, _shm.adopt(descs))["a"]
    >>> float(out[-1]), out.flags.writeable
    (99999.0, True)
"""

from __future__ import annotations

import io
import math
import os
import pickle
import sys
import threading
from typing import Any, Literal, cast

from . import _runtime
from ._core import Arena, Block

__all__ = [
    "THRESHOLD",
    "adopt",
    "arena",
    "arena_size",
    "attach",
    "borrow",
    "dumps",
    "empty",
    "keep_used",
    "loads",
    "owner",
    "reclaim",
    "set_arena_size",
    "stats",
]

THRESHOLD = 64 << 10  # smaller buffers travel inside the pickle: a block costs a page or more
BIG_PICKLE = 4 * THRESHOLD  # a pickle this large goes into a block whole
DEFAULT_MAX = 4 << 30

Desc = tuple[int, int, int, int]

_arena: Arena | None = None
_owner = 0  # this process's tag: 0 in the parent, the worker's number in a worker process
_size: int | None = None
_lock = threading.Lock()


def _default_size() -> int:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return 1 << 30
    return min(DEFAULT_MAX, max(ram // 4, 64 << 20))


def arena_size() -> int:
    """The arena's size in bytes: set by :func:`set_arena_size` or ``PIPEFLOW_ARENA_BYTES``,
    else a quarter of the machine's memory, at most 4 GiB."""
    if _size is not None:
        return _size
    env = os.environ.get("PIPEFLOW_ARENA_BYTES")
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value <= 0:
            raise ValueError(f"PIPEFLOW_ARENA_BYTES must be a positive int of bytes, got {env!r}")
        return value
    return _default_size()


def set_arena_size(nbytes: int) -> None:
    """Sets the size of the shared-memory arena that carries large buffers (numpy arrays)
    between processes. Memory is used only by live blocks; what does not fit goes the slow way,
    pickled through the rings. Call it before the first process stage runs.

    Example:
        >>> import pipeflow as pf
        >>> pf.set_arena_size(pf.arena_size())  # the same size: always allowed
    """
    global _size
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes <= 0:
        raise ValueError(f"nbytes must be a positive int, got {nbytes!r}")
    with _lock:
        if _arena is not None and _arena.size != _round_pages(nbytes):
            raise RuntimeError(
                f"the arena already exists with {_arena.size} bytes (process stages started); "
                "call pipeflow.set_arena_size() before the first process stage runs"
            )
        _size = nbytes


def _round_pages(n: int) -> int:
    return -(-n // 4096) * 4096


def arena() -> Arena:
    """The arena: in a worker, the parent's; in the parent, made on first use."""
    global _arena
    if _arena is None:
        with _lock:
            if _arena is None:
                _arena = Arena(arena_size())
    return _arena


def current() -> Arena | None:
    """The arena if this process has one, without making it."""
    return _arena


def attach(fd: int, tag: int) -> None:
    """In a worker process: maps the parent's arena; ``tag`` names this process's blocks."""
    global _arena, _owner
    _arena = Arena.open(fd)
    _owner = tag


def owner() -> int:
    return _owner


CACHE_BYTES = 256 << 20  # freed blocks kept resident for reuse while process stages run
_busy = 0


def busy() -> None:
    """A process stage's worker starts work: freed blocks stay resident (up to
    :data:`CACHE_BYTES`) so that the next ones reuse their pages instead of faulting in fresh
    ones (6 ms for 4 MiB of fresh shared memory here, against 0.5 ms to reuse resident pages).
    Only the arena's creator sets its cache: in a worker process that runs a pipeline of its
    own (on its parent's arena), this does nothing, and :func:`idle` does not trim."""
    global _busy
    if _owner != 0:
        return
    a = arena()
    with _lock:
        _busy += 1
        if _busy == 1:
            a.set_cache_limit(CACHE_BYTES)


def idle() -> None:
    """The end of :func:`busy`; when no worker is busy, every freed block's pages go back to
    the OS, and later frees return theirs at once."""
    global _busy
    if _owner != 0:
        return
    with _lock:
        _busy -= 1
        if _busy == 0 and _arena is not None:
            _arena.set_cache_limit(0)
            _arena.trim()


def reclaim(tag: int) -> None:
    """Frees the blocks a dead worker (``tag``) was writing."""
    if _arena is not None:
        _arena.reclaim(tag)


def stats() -> dict[str, int]:
    """The arena's live bytes and blocks, and its resident memory (zeros without an arena)."""
    if _arena is None:
        return {"live_bytes": 0, "blocks": 0, "resident_bytes": 0}
    return _arena.stats()


def _rebuild_buffer(buffer: Any, kind: str) -> Any:
    """A ``bytearray`` or ``memoryview`` from what :func:`_override` sent (a block, or bytes)."""
    if kind == "bytearray":
        return bytearray(buffer)
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _override(obj: Any) -> Any:
    """The pickler's ``reducer_override`` for what it sends out of band beyond plain pickle's:
    any ``memoryview`` (which plain pickle refuses), and a large non-contiguous numpy array
    (numpy pickles those in band; a contiguous copy goes out of band instead). ``None`` for the
    rest. ``bytes`` and ``bytearray`` never reach this hook (the C pickler writes them itself):
    a large pickle goes into a block whole instead."""
    t = type(obj)
    if t is memoryview:
        flat = obj if obj.c_contiguous else memoryview(obj.tobytes())
        return _rebuild_buffer, (pickle.PickleBuffer(flat.cast("B")), "memoryview")
    elif t.__name__ == "ndarray":
        np = sys.modules.get("numpy")
        if (
            np is not None
            and t is np.ndarray
            and not (obj.flags.c_contiguous or obj.flags.f_contiguous)
            and not obj.dtype.hasobject
            and obj.nbytes >= THRESHOLD
        ):
            return obj.copy(order="C").__reduce_ex__(5)
    return None


_picklers: dict[bool, type[pickle.Pickler]] = {}


def _pickler(by_value: bool) -> type[pickle.Pickler]:
    """The pickler class: cloudpickle's (functions and classes of ``__main__``, lambdas and
    closures by value) or plain pickle's (everything by reference: a worker process's results
    need no more, and it then never imports cloudpickle, ~40 ms of its start here), with
    :func:`_override`. Made on first use."""
    cls = _picklers.get(by_value)
    if cls is not None:
        return cls
    if by_value:
        import cloudpickle

        class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
            def reducer_override(self, obj: Any) -> Any:
                reduced = _override(obj)
                return super().reducer_override(obj) if reduced is None else reduced

        cls = _CloudPickler
    else:

        class _PlainPickler(pickle.Pickler):
            def reducer_override(self, obj: Any) -> Any:
                reduced = _override(obj)
                return NotImplemented if reduced is None else reduced

        cls = _PlainPickler
    _picklers[by_value] = cls
    return cls


def dumps(
    obj: Any, lent: set[tuple[int, int]] | None = None, *, by_value: bool = True
) -> tuple[bytes, list[Desc]]:
    """``obj`` pickled (protocol 5), its large buffers in arena blocks: the pickle and the
    blocks' descriptors, each carrying one reference for the message, but for blocks in
    ``lent`` (``(slot, gen)``: the receiver's own, which it holds until it takes the message;
    it adds the reference then, see :func:`adopt`).

    ``by_value``: with cloudpickle, which the parent needs (its ``__main__`` is the user's
    script or notebook, whose functions and classes a worker cannot import). Without, plain
    pickle is tried first, and cloudpickle only if that fails (a lambda in a result, an instance
    of a class that came by value): plain pickle pickles a function or class by reference only
    after checking that the reference leads back to the same object, so what it makes unpickles
    the same."""
    if not by_value:
        try:
            return _dumps(obj, lent, _pickler(False))
        except Exception:
            pass  # it needs cloudpickle: the second try says why if it fails too
    return _dumps(obj, lent, _pickler(True))


def _dumps(
    obj: Any, lent: set[tuple[int, int]] | None, pickler: type[pickle.Pickler]
) -> tuple[bytes, list[Desc]]:
    a = _arena
    out = io.BytesIO()
    if a is None:
        pickler(out, protocol=5).dump(obj)
        return out.getvalue(), []
    descs: list[Desc] = []
    tag = _owner

    def place(buffer: pickle.PickleBuffer) -> bool:
        raw = buffer.raw()
        if raw.nbytes < THRESHOLD:
            return True  # in band
        desc = a.put(raw, tag, lent)
        if desc is None:
            return True  # the arena is full: in band
        descs.append(desc)
        return False

    try:
        pickler(out, protocol=5, buffer_callback=place).dump(obj)
        data = out.getvalue()
        if len(data) >= BIG_PICKLE:  # large bytes, str, many values: the pickle itself
            desc = a.put(data, tag)
            if desc is not None:
                descs.append(desc)
                return b"", descs  # an empty pickle: it is in the last block
    except BaseException:
        adopt(descs, lent_of(descs, lent))  # dropped at once: the references go
        raise
    return data, descs


def lent_of(descs: list[Desc], lent: set[tuple[int, int]] | None) -> list[int]:
    """The indices in ``descs`` of the blocks in ``lent`` (which carry no reference)."""
    if not lent:
        return []
    return [i for i, d in enumerate(descs) if (d[0], d[1]) in lent]


def adopt(descs: list[Desc], lent: list[int] | None = None) -> list[Block]:
    """Blocks holding the references of a message's descriptors; those at the indices ``lent``
    carried none (they were this process's own: see :func:`dumps`), so new ones are taken. A
    descriptor that names no live block raises ``ValueError``."""
    if not descs:
        return []
    a = arena()
    if not lent:
        return [a.adopt(d) for d in descs]
    taken = set(lent)
    return [a.adopt(d, i in taken) for i, d in enumerate(descs)]


def borrow(descs: list[Desc]) -> list[Block]:
    """Blocks for a request's descriptors that hold no reference: the parent keeps the blocks
    until it has the answer. Call :func:`keep_used` before answering."""
    if not descs:
        return []
    a = arena()
    return [a.borrow(d) for d in descs]


def keep_used(blocks: list[Block]) -> None:
    """Takes a reference for each borrowed block something still uses once a request was
    answered (stage code that kept an input array): the parent then lets its own go. A worker
    that dies holds no reference but those."""
    for block in blocks:
        if sys.getrefcount(block) > 3:  # the list, the loop variable, getrefcount's argument
            block.keep()


def loads(data: bytes, blocks: list[Block]) -> Any:
    """Unpickles what :func:`dumps` made, its buffers views on ``blocks``."""
    if not blocks:
        return pickle.loads(data)
    if not data:
        return pickle.loads(blocks[-1], buffers=blocks[:-1])  # type: ignore[arg-type]
    return pickle.loads(data, buffers=blocks)


def empty(shape: int | tuple[int, ...], dtype: Any = float, order: Literal["C", "F"] = "C") -> Any:
    """A new numpy array in shared memory, uninitialised like ``np.empty``'s: a stage that
    fills it and returns it hands it to the next stage, or to the caller, without any copy.

    Once returned, the array belongs to the receiver (it gets a writable view of the same
    memory): the stage must not write to it again. Below 64 KiB (such arrays are pickled with
    the rest), without room in the arena, or for an object dtype, it is an ordinary array.

    Example:
        >>> import pipeflow as pf
        >>> a = pf.empty((256, 1024), dtype="int32")
        >>> a[:] = 7
        >>> int(a.sum()), a.shape, a.dtype
        (1835008, (256, 1024), dtype('int32'))
    """
    import numpy as np

    dt = np.dtype(dtype)
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if order not in ("C", "F"):
        raise ValueError(f"order must be 'C' or 'F', got {order!r}")
    count = math.prod(shape)
    if dt.hasobject or count * dt.itemsize < THRESHOLD:  # it would be pickled in band anyway
        return np.empty(shape, dt, order=order)
    block = arena().empty(count * dt.itemsize, _owner)
    if block is None:
        return np.empty(shape, dt, order=order)
    return np.frombuffer(cast(Any, block), dt, count=count).reshape(shape, order=order)


def _forget_after_fork() -> None:
    """In a forked child: the parent's arena is the parent's (the child's copies of its blocks
    hold no reference); the child makes its own if it runs process stages."""
    global _arena, _busy, _lock, _owner
    _arena = None
    _busy = 0
    _owner = 0
    _lock = threading.Lock()


_runtime.after_fork("arena", _forget_after_fork)
