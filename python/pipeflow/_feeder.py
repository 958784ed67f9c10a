"""The local backend's feeder: reads the input lazily and numbers its items, in batches sized
for the first step; and what the run's supervision sends for it when the input stalls.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

from ._batch import Batch
from ._core import Channel
from ._errors import ChannelClosed
from ._ordering import Window
from ._sizing import MAX_CHUNK, Sizer

__all__ = ["SOURCE_HOLD", "Feeder"]

SOURCE_HOLD = 0.005  # the feeder sends a partial batch once its first item waited this long
SOURCE_PIECE = 1024  # the most items the feeder pulls between two looks at the clock


class Feeder:
    """Reads ``source`` into ``channel`` (see :meth:`run`), ``window`` bounding what is in
    flight. ``send(batch)`` sends a batch in pieces sized for the first step (False: the run
    stopped); ``stopped()`` says whether the run stopped; ``fail(error, where)`` reports an
    error of the input."""

    def __init__(
        self,
        source: Iterator[Any],
        total: int | None,
        first: Sizer | None,
        window: Window,
        channel: Channel,
        send: Callable[[Batch], bool],
        stopped: Callable[[], bool],
        fail: Callable[[BaseException, str], None],
    ) -> None:
        self.source = source
        self.total = total
        self.first = first
        self.window = window
        self.channel = channel
        self.send = send
        self.stopped = stopped
        self.fail = fail
        self.in_source = False  # inside the input's next()
        # The batch being filled, shared with flush_stalled: under _lock.
        self._lock = threading.Lock()
        self._start = 0
        self._filling: list[Any] | None = None
        self._filling_since = 0.0

    def run(self) -> None:
        """Reads the input lazily, numbering items, in batches sized for step 0.

        Items are pulled at C speed (``enumerate`` + ``islice``) in pieces of at most
        ``SOURCE_PIECE``, and a batch is sent as soon as it is as large as step 0 wants or its
        first item has waited ``SOURCE_HOLD``. ``cap`` bounds a piece by how many items the input
        yields within ``SOURCE_HOLD``, so a slow input is sent item by item. An input that stalls
        right after a fast burst (an event queue) leaves this task inside ``next()`` with part of
        a batch read: the caller's supervision sends that part (:meth:`flush_stalled`), so no
        item waits for the input's next one. While this task is inside ``next()`` (which may
        block for good), a stopped run does not wait for it; it exits as soon as ``next()``
        returns. When the input's length is known (``total``), the batches shrink near its end:
        see :meth:`Sizer.chunk`.

        What the supervision may change meanwhile is under ``_lock``: it takes the items read so
        far from the front of ``values`` and advances ``_start`` (the key of ``values[0]``) by
        as many, so ``_start + len(values)`` (the items read) holds.
        """
        first, source, total, lock = self.first, self.source, self.total, self._lock
        cap = 1
        pulled = 0  # items read so far: the key of the next one
        exhausted = False
        try:
            while not (exhausted or self.stopped()):
                left = None if total is None or pulled >= total else total - pulled
                want = first.chunk(left) if first else MAX_CHUNK
                values: list[Any] = []
                t0 = perf_counter()
                with lock:
                    self._start = pulled
                    self._filling, self._filling_since = values, t0
                while len(values) < want and not self.stopped():
                    piece = min(want - len(values), cap, SOURCE_PIECE)
                    with lock:
                        self.in_source = True
                    try:
                        values.extend(itertools.islice(source, piece))
                    finally:  # what extend appended stays, also when next() raised mid-way
                        with lock:
                            self.in_source = False
                            got = self._start + len(values) - pulled
                            pulled += got
                    elapsed = perf_counter() - t0
                    if got < piece:
                        exhausted = True
                        break
                    fast = elapsed < SOURCE_HOLD / 2
                    cap = min(MAX_CHUNK, 2 * cap) if fast else max(1, cap // 2)
                    if elapsed >= SOURCE_HOLD:
                        break
                if not values:
                    if exhausted:
                        break
                    continue  # the supervision sent them all
                batch = Batch(self._start, values)
                if not self.window.acquire(len(values)) or not self.send(batch):
                    return
        except BaseException as e:
            if not self.stopped():
                self.fail(e, f"the input iterable (at item {pulled})")
        finally:
            with lock:
                self._filling = None
            self.channel.close()

    def flush_stalled(self) -> None:
        """Sends the items the feeder has read of a batch while it waits inside the input's
        ``next()`` for the rest, once the first of them has waited ``SOURCE_HOLD``: an input
        that yields a burst and then blocks (an event queue) does not hold back the burst. It
        never blocks the caller, nor exceeds the in-flight bound: if the window or step 0's
        queue is full, the items stay (a batch at most) and the next supervision tries again."""
        with self._lock:
            values = self._filling
            if not self.in_source or not values:
                return
            if perf_counter() - self._filling_since < SOURCE_HOLD:
                return
            n = len(values)  # the feeder may append meanwhile (at the end): take these only
            if not self.window.try_acquire(n):
                return
            try:
                sent = self.channel.try_send(Batch(self._start, values[:n]))
            except ChannelClosed:
                sent = False  # the run stopped
            if not sent:
                self.window.release(n)
                return
            del values[:n]
            self._start += n
