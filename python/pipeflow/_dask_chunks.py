"""The client's bookkeeping of a run on the Dask backend (``_dask_run``): a chunk on its way
through a segment's steps (:class:`Flight`), a segment's source, sizing, window and reorder
point (:class:`Segment`), and a step's lanes (:class:`Lanes`).

A segment (``_plan``) is the stretch of steps between two batch steps. Its chunks are sized by
``_sizing`` from the time its slowest step took per item; its window (the local backend's rule:
a few chunks per worker and queue slot) bounds the items between its source and its reorder
point, where results are put back in order (``_ordering``) and, at a batch step, grouped into
the next segment's source. A step's *lanes* are its ``workers``: each a chain of its pending
tasks, so that no more than ``workers`` of them run at once.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import TYPE_CHECKING, Any

from ._batch import Batch, Key
from ._dask_tasks import Chunk
from ._ordering import Reorderer, Window
from ._plan import Plan
from ._sizing import QUEUE_SECONDS, Sizer, Traits, window_limit

if TYPE_CHECKING:
    from distributed import Future

__all__ = [
    "LANE_DEPTH",
    "TRAITS",
    "Flight",
    "Lanes",
    "Segment",
    "key_name",
    "sizeof",
    "until_stopped",
]

# A Dask task costs ~1 ms of scheduling: a chunk should take a worker ~50 ms (2%), more over a
# long input of known length (``_sizing.GROWTH``). A step's timeout is watched on the worker.
# Tiny items go up to MAX_ITEMS to a chunk: at 8,192 (the local backend's bound) a chunk of
# `x + 1` took a Dask worker ~2 ms, less than a round trip to the client.
MAX_ITEMS = 1 << 16
TRAITS = Traits(
    batch_seconds=0.05, grows=True, one_by_one=False, times_items=True, max_items=MAX_ITEMS
)
# Tasks of a step in flight per lane: one running, and one queued behind it once the segment's
# items are known to be quick (``Sizer.quick``: a queued task then waits 0.1 s at most, as a
# batch queued in a local worker process does); else one.
LANE_DEPTH = 2


def key_name(name: str) -> str:
    """A step's name as part of a Dask key (the dashboard groups tasks by their prefix)."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "step"


class Flight:
    """A chunk of a segment on its way through the segment's steps."""

    __slots__ = ("at", "count", "done", "future", "keys", "number", "segment", "source")

    def __init__(self, segment: int, number: int, batch: Batch) -> None:
        self.segment = segment
        self.number = number
        self.keys = batch.keys
        self.count = len(batch)
        self.source: Any = Chunk(batch.keys, batch.values)  # step 0's argument, or its future
        self.at = -1  # the position in the segment's steps of its latest task
        self.future: Future | None = None  # that task's
        self.done = False  # has that task finished?

    def first_key(self) -> Key:
        keys = self.keys
        return keys if isinstance(keys, int) else keys[0]


class Segment:
    """The client's side of one segment: its steps, source, sizing, window and reorder point."""

    def __init__(
        self, plan: Plan, index: int, total: int | None, stopping: Callable[[], bool]
    ) -> None:
        self.index = index
        self.steps = plan.segment_steps(index)
        self.end = plan.batchers()[index] if index < len(plan.batchers()) else None
        self.group_size = plan.steps[self.end].size if self.end is not None else 0
        first = plan.steps[self.steps[0]] if self.steps else None
        grows = index == 0 and total is not None
        self.sizer = Sizer(first, TRAITS, grows=grows) if first is not None else None
        steps = [plan.steps[i] for i in self.steps]
        self.window = Window(window_limit(steps, self.sizer, MAX_ITEMS), stopping)
        self.reorder = Reorderer(plan.segment_ordered(index), plan.segment_may_skip(index))
        self.inbox: list[Batch] = []  # a later segment's source: the groups made so far
        self.waiting: list[list[Flight]] = [[] for _ in self.steps]  # per position: at it
        self.in_flight = 0  # chunks between the source and the reorder point
        self.source_done = False
        self.done = False
        self.group: list[Any] = []  # the batch step ending it: the group being filled
        self.groups_made = 0

    def quick(self) -> bool:
        """Whether the segment's items are known to be quick (see ``LANE_DEPTH``)."""
        return self.sizer is not None and self.sizer.quick()

    def take_inbox(self, previous_done: bool) -> Batch | None:
        """A later segment's next chunk of the groups made so far, if its window has room."""
        inbox = self.inbox
        if not inbox:
            if previous_done:
                self.source_done = True
            return None
        head = inbox[0]
        size = self.sizer.chunk() if self.sizer is not None else MAX_ITEMS
        piece = head if len(head) <= size else head.piece(0, size)
        if not self.window.try_acquire(len(piece)):
            return None
        if piece is head:
            inbox.pop(0)
        else:
            inbox[0] = head.piece(size, len(head))
        return piece

    def arrived(self, flight: Flight, data: Chunk) -> tuple[list[Any], Batch | None]:
        """A chunk done with the segment: measured, put in order; returns the values it
        releases (the last segment's results) and, at a batch step, the groups they complete,
        as a batch of the next segment."""
        self.in_flight -= 1
        if self.sizer is not None and data.stats:
            seconds = max(s[1] for s in data.stats)
            nbytes = max(s[3] for s in data.stats)
            self.sizer.measure(seconds, flight.count, nbytes)
        released: list[Any] = []
        self.reorder.push_batch(Batch(data.keys, data.values), released)
        self.window.completed_to(self.reorder.completed)
        if self.end is None:
            return released, None
        groups = []
        for value in released:
            self.group.append(value)
            if len(self.group) == self.group_size:
                groups.append(self.group)
                self.group = []
        if not groups:
            return [], None
        batch = Batch(self.groups_made, groups)
        self.groups_made += len(groups)
        return [], batch

    def last_group(self) -> Batch | None:
        """The batch step's last, partial group, once the segment is done."""
        if self.end is None or not self.group:
            return None
        batch = Batch(self.groups_made, [self.group])
        self.group = []
        return batch


class Lanes:
    """A step's lanes (its ``workers``): each a chain of its pending tasks. A new task goes to
    an idle lane; else, for quick items and a segment's first step, behind the task submitted
    last, if that was under ``QUEUE_SECONDS`` ago (not behind one that turns out slow): Dask
    starts it when the one before ends, without a round trip to the client. Only a first step
    queues so: its tasks take their items from the client, so waiting for the one before
    (whose result Dask keeps where it is) moves no data; a later step's task already waits
    behind its chunk's previous step."""

    def __init__(self, workers: int) -> None:
        self.lanes: list[list[Future]] = [[] for _ in range(workers)]
        self.lane_of: dict[str, int] = {}  # pending task's key -> its lane
        self.submitted_at: dict[str, float] = {}  # pending task's key -> when

    def pick(self, may_queue: bool) -> int | None:
        """The lane the next task goes to; None: the step has no room."""
        lanes = self.lanes
        idle = next((k for k, lane in enumerate(lanes) if not lane), None)
        if idle is not None or not may_queue:
            return idle
        best, newest = None, perf_counter() - QUEUE_SECONDS
        for k, lane in enumerate(lanes):
            if len(lane) < LANE_DEPTH:
                since = self.submitted_at[lane[-1].key]
                if since > newest:
                    best, newest = k, since
        return best

    def before(self, lane: int) -> list[Future]:
        """The task the next one of ``lane`` waits for (none if the lane is idle)."""
        return self.lanes[lane][-1:]

    def add(self, lane: int, future: Future) -> None:
        self.lanes[lane].append(future)
        self.lane_of[future.key] = lane
        self.submitted_at[future.key] = perf_counter()

    def remove(self, future: Future) -> None:
        """A task that finished leaves its lane."""
        self.submitted_at.pop(future.key, None)
        lane = self.lane_of.pop(future.key, None)
        if lane is not None:
            self.lanes[lane].remove(future)

    def clear(self) -> None:
        self.lanes = [[] for _ in self.lanes]
        self.lane_of.clear()
        self.submitted_at.clear()


def until_stopped(source: Iterator[Any], stop: list[bool]) -> Iterator[Any]:
    """``source``, ending as soon as ``stop[0]`` is set: no ``next()`` after a stop."""
    for value in source:
        yield value
        if stop[0]:
            return


def sizeof(value: Any) -> int:
    """Dask's estimate of a value's size."""
    from dask.sizeof import sizeof as dask_sizeof

    try:
        return int(dask_sizeof(value))
    except Exception:
        return 0
