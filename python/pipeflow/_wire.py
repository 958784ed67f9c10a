"""What crosses between the parent and a worker process: typed messages, their framing on a
ring, the shared word's values, and the remote traceback of an exception (a leaf).

::

    parent ──► worker   Setup(op, fn, init, path, keep, logging)
                                                    load a step (again, for a warm worker)
                        Work(keys, payload, descs)  run it over a batch
    worker ──► parent   Ready()                     the step loaded, init ran
                        Done(keys, size, payload, n, descs, lent, busy)
                        Failed(error, item, shown)
                        Log(record)                 stage code logged (any time: see _output)
                        Output(parts, flush)        stage code printed (any time: see _output)

Each message is pickled (protocol 5) and pushed as one or more frames of at most the ring's
``max_frame`` bytes, each led by a byte that says whether more follow. ``payload`` is a batch's
values pickled apart (``_shm.dumps``: their large buffers in arena blocks named by ``descs``), so
the parent can forward a worker's results to the next process stage without unpickling them.
While it runs a batch, the worker keeps the index of the item in hand in a word it shares with
the parent (``RECEIVING`` and ``LOADING`` between items), so that the parent can name the item
if the worker dies. A ``Failed`` carries the exception with its chain and frames as
``_remote`` exports them: the parent raises it as the same type, with the worker's traceback.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ._core import Ring

__all__ = [
    "LOADING",
    "POLL",
    "RECEIVING",
    "Done",
    "Failed",
    "Log",
    "Output",
    "Ready",
    "Setup",
    "Work",
    "failure",
    "first_unpicklable",
    "raise_failure",
    "recv_message",
    "send_bytes",
    "send_message",
]

# The shared word's values when the worker holds no item (else: the item's index in its batch;
# the batch's length once it is sending the results).
RECEIVING = -1  # waiting for a request, or reading one
LOADING = -2  # loading a step: its function and init
POLL = 0.05  # how often a waiting side looks at its peer
_MORE, _LAST = b"\x01", b"\x00"

Desc = tuple[int, int, int, int]


class Setup(NamedTuple):
    """Load a step: its op (``_apply.worker_op``), function and init (each its key, and its
    pickle unless the worker kept it from an earlier setup), the parent's ``sys.path``, so that
    functions pickled by reference import in the child, the keys the worker is to keep,
    and the parent's logging levels (``_output.log_levels``: None, forward every record)."""

    op: str
    fn: tuple[bytes, bytes | None]
    init: tuple[bytes, bytes | None]
    path: list[str]
    keep: list[bytes]
    logging: tuple[int, int, dict[str, int]] | None = None


class Work(NamedTuple):
    """Run the step over a batch: its keys, its values pickled, their blocks' descriptors."""

    keys: Any
    payload: bytes
    descs: list[Desc]


class Ready(NamedTuple):
    """The step loaded, and its init ran."""


class Done(NamedTuple):
    """A batch's output: ``size`` values in ``payload`` (blocks ``descs``; those at the indices
    ``lent`` are the parent's own, handed back), ``n`` items run, ``busy`` seconds it took."""

    keys: Any
    size: int
    payload: bytes
    n: int
    descs: list[Desc]
    lent: list[int]
    busy: float


class Failed(NamedTuple):
    """An exception (``_remote.export``: its chain and frames), the index in the batch of the
    item it concerns (None: none, or unknown), and a short repr of that item."""

    error: bytes
    item: int | None
    shown: str | None


class Log(NamedTuple):
    """A log record of stage code, as ``_output`` re-emits it in the parent: the record's
    attributes, its message formatted and its exception's traceback as text (``exc_text``)."""

    record: dict[str, Any]


class Output(NamedTuple):
    """What stage code wrote to ``sys.stdout`` (stream 1) and ``sys.stderr`` (2), in the order
    written; ``flush``: it asked for a flush, which the parent's stream gets too."""

    parts: list[tuple[int, str]]
    flush: bool


def send_message(ring: Ring, message: Any, timeout: float | None = None) -> None:
    """Pickles ``message`` and pushes it as one or more frames."""
    send_bytes(ring, pickle.dumps(message, protocol=5), timeout)


def send_bytes(
    ring: Ring,
    data: bytes,
    timeout: float | None = None,
    check: Callable[[], None] | None = None,
) -> None:
    """Pushes a pickled message as one or more frames. With ``check``, a push that waits for
    room waits in ``POLL`` slices and calls ``check()`` between them (it raises to give up: the
    reader died, the run stopped)."""
    step = ring.max_frame - 1
    for start in range(0, max(len(data), 1), step):
        frame = (_MORE if start + step < len(data) else _LAST) + data[start : start + step]
        if check is None:
            ring.push(frame, timeout)
            continue
        while True:
            try:
                ring.push(frame, POLL)
                break
            except TimeoutError:
                check()


def recv_message(ring: Ring, timeout: float | None = None, parts: list[bytes] | None = None) -> Any:
    """Pops frames until a whole message is in, and unpickles it. ``parts`` keeps the frames of
    a message begun when a ``TimeoutError`` comes, for the next call to go on with."""
    parts = [] if parts is None else parts
    while True:
        frame = ring.pop(timeout)
        lead = frame[:1]
        if lead != _MORE and lead != _LAST:  # not made by send_bytes: the message is lost
            parts.clear()
            raise ValueError(f"a frame that is no part of a pipeflow message (led by {lead!r})")
        parts.append(frame[1:])
        if lead == _LAST:
            data = b"".join(parts)
            parts.clear()
            return pickle.loads(data)


def failure(error: BaseException, index: int | None = None, values: Any = None) -> Failed:
    """The message for ``error``, about the item at ``index`` of ``values`` (if known)."""
    from . import _remote  # only now: a worker that never fails never imports cloudpickle

    shown = None
    if index is not None and values is not None and 0 <= index < len(values):
        shown = _remote.item_repr(values[index])
    return Failed(_remote.export(error), index, shown)


def raise_failure(message: Failed) -> None:
    """Raises the exception of ``message`` as the same type, with the worker's traceback."""
    from . import _remote

    raise _remote.rebuild(message.error)


def first_unpicklable(values: list[Any]) -> int | None:
    """The index of the first value that does not pickle (for error messages only)."""
    import cloudpickle

    for i, value in enumerate(values):
        try:
            cloudpickle.dumps(value, protocol=5)
        except Exception:
            return i
    return None
