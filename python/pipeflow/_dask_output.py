"""Prints and log records of stage code in a Dask task, kept with the task's chunk and re-emitted
in the client as the local backend re-emits a worker process's (``_output``; a leaf: a Dask
worker imports it).

On a Dask worker, at its first pipeflow task, :func:`install` makes ``sys.stdout`` and
``sys.stderr`` ``_output``'s forwarding streams and gives the root logger ``_output``'s
forwarding handler, both writing to a :class:`_Dispatch`: it hands what is written to the
:class:`~pipeflow._output.Outbox` of the pipeflow task it belongs to, and passes anything else
through to the worker's own streams (what Dask and other tasks print is left alone; a record
from outside a task is the worker's own handlers' business). A task's outbox writes into a
:class:`_Kept` list instead of a ring, so the same rules hold as in a worker process: each
thread's line whole, the text before a record, a flush kept as one. Which task a write belongs
to: the one whose context it runs in (:data:`_task`, also set in the thread of an item with a
``timeout``); from a thread stage code started (which has no context of ours), the one task
running in this process, if there is just one (a ``LocalCluster`` pipeflow starts runs one
task at a time per process); else it goes to the worker's stdout.

The messages travel in the task's result (``_dask_tasks.Chunk.output``: ``(step, worker,
pickled message)``, in order, the earlier steps' first), and with a stage's error
(``TaskFailed.output``); the client re-emits them (:func:`emit`) when the chunk reaches it, or
before it raises the error. The loggers of a Dask worker take the client's levels with each run
(``Job.levels``), as a worker process does.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import pickle
import sys
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, TextIO

from . import _output

__all__ = ["Kept", "emit", "install", "kept"]

Kept = tuple[tuple[int, str, bytes], ...]  # (step, Dask worker, pickled Log or Output)

_task: ContextVar[_output.Outbox | None] = ContextVar("pipeflow_dask_task_output", default=None)
_active: list[_output.Outbox] = []  # the outboxes of the tasks running in this process
_lock = threading.Lock()
_installed: _Dispatch | None = None


class _Kept:
    """A ring, as far as an outbox is concerned, that keeps each message in a list."""

    max_frame = 1 << 62  # one frame a message

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def push(self, frame: bytes, _timeout: float | None = None) -> None:
        self.messages.append(frame[1:])  # the frame's lead byte says it is the last


class _Dispatch:
    """The outbox of a Dask worker's streams and root handler (see the module's doc)."""

    def __init__(self, originals: tuple[TextIO | None, TextIO | None]) -> None:
        self.originals = originals

    def _outbox(self) -> _output.Outbox | None:
        outbox = _task.get()
        if outbox is None and len(_active) == 1:
            with contextlib.suppress(IndexError):
                outbox = _active[0]
        return outbox

    def write(self, stream: int, text: str) -> None:
        outbox = self._outbox()
        if outbox is not None:
            outbox.write(stream, text)
            return
        original = self.originals[stream - 1]
        if original is not None:
            original.write(text)

    def flush(self, stream: int | None = None, everyone: bool = True) -> None:
        outbox = self._outbox()
        if outbox is not None:
            outbox.flush(stream, everyone)
            return
        for number, original in enumerate(self.originals, 1):
            if original is not None and stream in (None, number):
                original.flush()

    def send_bytes(
        self, data: bytes | None, flush: int | None = None, everyone: bool = True
    ) -> None:
        outbox = self._outbox()
        if outbox is not None:
            outbox.send_bytes(data, flush, everyone)


def install(levels: _output.Levels | None) -> None:
    """Makes this Dask worker's streams and root logger keep what pipeflow tasks write (once
    per process), and gives its loggers the client's ``levels``."""
    global _installed
    with _lock:
        if _installed is None:
            dispatch = _Dispatch((sys.stdout, sys.stderr))
            sys.stdout = _output._Stream(dispatch, _output.STDOUT, sys.stdout)  # type: ignore[arg-type]
            sys.stderr = _output._Stream(dispatch, _output.STDERR, sys.stderr)  # type: ignore[arg-type]
            logging.getLogger().addHandler(_output._Forward(dispatch))  # type: ignore[arg-type]
            _installed = dispatch
        if levels is not None:
            _output.apply_levels(levels)


@contextlib.contextmanager
def kept(
    step: int, worker: str, context: contextvars.Context, into: list[tuple[int, str, bytes]]
) -> Iterator[None]:
    """Keeps what stage code writes while it runs in ``context`` in this block (and from threads
    it starts, while no other task runs here), appended to ``into`` at the block's end, also
    when it raises."""
    ring = _Kept()
    outbox = _output.Outbox(ring)  # type: ignore[arg-type]
    context.run(_task.set, outbox)
    with _lock:
        _active.append(outbox)
    try:
        yield
    finally:
        with _lock:
            _active.remove(outbox)
        outbox.flush()  # every thread's unfinished line
        into.extend((step, worker, data) for data in ring.messages)


def emit(output: Kept, label_of: Any) -> None:
    """Re-emits a chunk's or an error's output in the client: ``label_of(step)`` gives the
    ``(label, stage name)`` of a step's worker, as ``_output.forward`` takes them."""
    for step, worker, data in output:
        message = pickle.loads(data)  # a Log's values are plain (or their repr), an Output's text
        label, stage = label_of(step, worker)
        _output.forward(message, label, stage)
