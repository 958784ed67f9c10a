"""The worker process's main: ``python -m pipeflow._worker IN_FD OUT_FD AT_FD ARENA_FD TAG PARENT``
(or forked by the fork server, ``_zygote``, which calls :func:`main`). It imports leaves only:
the wire format, the per-batch loops, the state, the arena; never the engine or the DSL.

It reads requests from the ring on IN_FD and writes replies to the ring on OUT_FD, one at a
time (``_wire``): a ``Setup`` (the step's op, function and init, cloudpickled), then ``Work``
requests, and another ``Setup`` when the parent reuses this warm worker for another step. Each
is answered by ``Ready`` / ``Done`` (the output batch) or ``Failed`` (the exception, its
traceback text and the index of the item that raised). Before running each item it writes the
item's index into the shared word on AT_FD, so that the parent can name the item if this process
dies. Large buffers come and go through the parent's shared-memory arena on ARENA_FD (``_shm``);
TAG names the blocks this process writes; PARENT is its parent's pid (this process's parent: the
fork server for a forked worker). It exits when the parent closes its input ring, or when the
parent dies.

Stage code's log records and prints go to the parent on the reply ring too, between the replies
(``_output``: one writer orders them; the parent's logging levels come with each ``Setup``).
"""

from __future__ import annotations

import os
import pickle
import signal
import sys
import threading
from time import perf_counter
from typing import Any

from . import _output, _shm, _state
from ._apply import Apply, worker_apply
from ._batch import Batch
from ._core import Ring, Word
from ._errors import ChannelClosed
from ._wire import (
    LOADING,
    RECEIVING,
    Done,
    Failed,
    Ready,
    Setup,
    Work,
    failure,
    first_unpicklable,
    recv_message,
)

PARENT_CHECK = 1.0


class WordSlot:
    """A worker's :class:`~pipeflow._batch.Slot`: the index of the item in hand goes into the
    word shared with the parent, which reads it if this process dies."""

    __slots__ = ("track", "word")

    def __init__(self, word: Word) -> None:
        self.word = word
        self.track = word.track  # the fast map's: stores each index as it takes the item

    @property
    def index(self) -> int:
        return self.word[0]

    @index.setter
    def index(self, i: int) -> None:
        self.word[0] = i


def _input_index(batch: Batch, out: Batch, j: int) -> int | None:
    """The index in ``batch`` of the item whose output ``j`` of ``out`` is (a flat_map gives
    some items several outputs, with child keys: see ``_batch.child_key``)."""
    if not isinstance(out.keys, list):
        return j  # one output per input
    index = {batch.key(i): i for i in range(len(batch))}
    key: Any = out.keys[j]
    while key not in index and isinstance(key, tuple):
        key = key[0] if len(key) == 3 else key[:-2]  # the parent of a child key
    return index.get(key)


def _watch_parent(parent: int) -> None:
    """Exits the process when the parent is gone (re-parented to another pid): at once if it
    died before this process got here."""
    while os.getppid() == parent:
        threading.Event().wait(PARENT_CHECK)
    os._exit(70)


# The functions (and inits) of the steps this worker loaded, unpickled, by key: the parent sends
# a key alone for one it knows is here, and says in each setup which to keep.
_kept: dict[bytes, Any] = {}


def _load(offered: tuple[bytes, bytes | None]) -> Any:
    key, data = offered
    if data is None:
        return _kept[key]
    obj = _kept[key] = pickle.loads(data)
    return obj


def _setup(message: Setup) -> tuple[Any, Apply]:
    """Loads a step: its function and loop; runs its init (replacing any earlier state)."""
    sys.path[:] = message.path
    fn, init = _load(message.fn), _load(message.init)
    for key in set(_kept) - set(message.keep):
        del _kept[key]
    _state.load(init)
    return fn, worker_apply(message.op)


def _answer(
    fn: Any,
    apply: Apply,
    batch: Batch,
    slot: WordSlot,
    never: list[bool],
    lent: set[tuple[int, int]],
    since: float,
) -> Done | Failed:
    """Runs the step over ``batch``: ``Done`` with the results, or ``Failed``. ``lent``: the
    request's blocks (the parent's), which a result may hand back unchanged. ``since``: when
    the request was read (the reply says how long the batch took from then)."""
    try:
        out, n = apply(fn, batch, slot, False, never)  # it sets the word to each item's index
    except BaseException as e:
        return failure(e, slot.index, batch.values)
    slot.index = len(batch)
    try:
        # The values pickled apart: the parent can forward them to a next process stage without
        # unpickling them. The blocks' references go to the parent; a result that is (a view
        # of) an input carries none: the parent adds one, as it holds the input until then. A
        # worker killed before its answer is read so holds no reference.
        payload, descs = _shm.dumps(out.values, lent, by_value=False)
    except Exception as e:  # a result that does not pickle: report, don't die
        e.add_note("pipeflow: a result of this batch could not be pickled")
        bad = first_unpicklable(out.values)
        return failure(e, None if bad is None else _input_index(batch, out, bad), batch.values)
    lent_back = _shm.lent_of(descs, lent)
    return Done(out.keys, len(out), payload, n, descs, lent_back, perf_counter() - since)


def _ignore_interrupt(_signum: int, _frame: Any) -> None:
    """SIGINT's handler in a worker: a terminal's Ctrl-C reaches the whole process group, and
    is the parent's to handle (it stops the run, killing the workers that hold items; idle ones
    stay warm). A handler, not ``SIG_IGN``, so that programs the stage code starts get the
    default back at ``exec`` (Ctrl-C reaches them as it would without pipeflow)."""


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, _ignore_interrupt)
    inbox, ring = Ring.open(int(argv[0])), Ring.open(int(argv[1]))
    # The reply ring's one writer: the replies below, and what stage code logs and prints.
    outbox = _output.Outbox(ring)
    _output.install(outbox)
    at = Word.open(int(argv[2]))
    slot = WordSlot(at)
    _shm.attach(int(argv[3]), int(argv[4]))
    for fd in argv[:4]:
        os.close(int(fd))
    # The parent's pid comes from the parent: one that died before this process started has
    # no pid of its own to compare with.
    threading.Thread(target=_watch_parent, args=(int(argv[5]),), daemon=True).start()
    never = [False]  # the parent stops a worker by closing its ring, not between items
    fn: Any = None
    apply: Any = None
    try:
        while True:
            at[0] = RECEIVING  # a crash now is not any item's
            blocks: list[Any] = []
            batch: Batch | None = None
            try:
                message = recv_message(inbox)
                since = perf_counter()
                if type(message) is Work:
                    # Views on the parent's blocks, which it keeps until we answer.
                    blocks = _shm.borrow(message.descs)
                    batch = Batch(message.keys, _shm.loads(message.payload, blocks))
            except ChannelClosed:
                raise
            except Exception as e:  # the request was read whole, but does not unpickle here
                e.add_note(
                    "pipeflow: the worker process could not unpickle a batch sent to it "
                    "(are the items' classes importable from the worker, not only __main__?)"
                )
                outbox.send(failure(e))
                continue
            if type(message) not in (Setup, Work):  # whole, but no request: say so, go on
                error = TypeError(f"pipeflow: a worker got a {type(message).__name__}, no request")
                outbox.send(failure(error))
                continue
            if type(message) is Setup:  # the first request, and again for a warm worker reused
                at[0] = LOADING  # read: the parent's start-up timeout stops counting
                _output.apply_levels(message.logging)
                try:
                    fn, apply = _setup(message)
                except BaseException as e:
                    outbox.send(failure(e))
                    return 1
                outbox.send(Ready())
                continue
            assert batch is not None
            reply = _answer(fn, apply, batch, slot, never, {b.desc[:2] for b in blocks}, since)
            # Let go of the items before answering: an input array that stage code kept needs
            # a reference of its own, as the parent lets go of the request's once answered.
            message = batch = None
            _shm.keep_used(blocks)
            del blocks
            outbox.send(reply)  # after what the batch printed
    except ChannelClosed:
        return 0
    finally:
        _output.uninstall(outbox)
        ring.close_write()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
