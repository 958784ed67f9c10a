"""How many items a batch for a step holds: sized from the step's measured time per item, so
that tiny items travel thousands to a batch and slow ones one at a time (a leaf).

Each step aims at batches that take a worker ``Traits.batch_seconds`` (its runner's: a process
step's batch costs the parent far more than a thread step's), and whose items or results come to
about ``CHUNK_BYTES``. Over an input of known length, the first step's batches shrink near its
end, as in guided scheduling, so that the workers finish together; a first step whose runner says
so (process steps) meanwhile gets batches that grow with the run (``GROWTH``), so a long run
costs the parent fewer batches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from time import perf_counter
from typing import NamedTuple

from ._plan import Step

__all__ = ["MAX_CHUNK", "WINDOW_BATCHES", "Sizer", "Traits", "window_limit"]

MAX_CHUNK = 8192  # the most items in one batch
# The first step of a pipeline whose input has a known length gets batches that shrink near its
# end (see Sizer.chunk). If its runner's batches grow (Traits.grows), they grow with the run
# meanwhile, to an eighth of the run's time so far, at most GROWN_SECONDS: a long run then costs
# the parent fewer batches, each of whose wake-ups preempts a worker when the workers fill the
# cores.
GROWTH = 1 / 8
GROWN_SECONDS = 0.25
TAIL_SECONDS = 0.002  # near the end of an input of known length, batches shrink to this
CHUNK_BYTES = 1 << 20  # and whose items or results come to about this much (large ones go alone)
QUEUE_SECONDS = 0.1  # items at most this long may wait behind a batch in a worker (see quick)
WINDOW_BATCHES = 2  # a segment's in-flight bound, in batches per worker and queue slot


class Traits(NamedTuple):
    """What a stage runner tells the engine about its batches (see ``_runners``)."""

    batch_seconds: float  # aim for batches that take a worker about this long
    grows: bool  # may a first step's batches grow with a long run over a known length?
    one_by_one: bool  # one item a batch (a worker process timed per batch)
    times_items: bool  # does the runner enforce the step's per-item timeout itself?
    max_items: int = MAX_CHUNK  # the most items in one of its batches


class Sizer:
    """The batch size of one step, from the batches its workers measured."""

    def __init__(self, step: Step, traits: Traits, grows: bool = False) -> None:
        self.step = step
        self.traits = traits
        self.grows = grows and traits.grows  # do its batches grow with the run (see GROWTH)?
        self.seconds_per_item: float | None = None
        self._seconds = 0.0  # decayed sums of measured batches (see measure)
        self._items = 0.0
        self._bytes = 0.0
        self.largest = 0  # the most items in a batch measured
        self.started = perf_counter()

    def chunk(self, remaining: int | None = None) -> int:
        """How many items a batch for this step should hold. With ``remaining``, the number of
        items still to come from an input of known length, batches shrink near its end (to
        ``TAIL_SECONDS`` of work) so that the workers finish together, as in guided
        scheduling: each takes at most a ``2 * workers``-th of what is left."""
        if self.step.op == "batch":
            return self.traits.max_items
        if self.traits.one_by_one:
            return 1
        spi = self.seconds_per_item
        if spi is None:
            return 1
        spi = max(spi, 1e-9)
        by_time = int(self.seconds() / spi)
        by_size = int(CHUNK_BYTES / max(self._bytes / self._items, 1e-9))
        size = min(self.traits.max_items, by_time, by_size)
        if remaining is not None and remaining > 0:
            share = -(-remaining // (2 * self.step.workers))
            size = min(size, max(share, int(TAIL_SECONDS / spi)))
        return max(1, size)

    @property
    def one_by_one(self) -> bool:
        """Whether the step takes batches of one item."""
        return self.traits.one_by_one

    def seconds(self) -> float:
        """How long a batch for this step should take a worker now."""
        seconds = self.traits.batch_seconds
        if self.grows:
            seconds = min(GROWN_SECONDS, max(seconds, (perf_counter() - self.started) * GROWTH))
        return seconds

    def quick(self) -> bool:
        """Whether the step's items are known to take at most ``QUEUE_SECONDS`` each: then a
        batch may wait behind another in a worker process. It waits ``QUEUE_SECONDS`` at most
        (a batch of quick items takes ``batch_seconds``), or ``GROWN_SECONDS`` in a long run over
        an input of known length, whose batches shrink again near its end."""
        spi = self.seconds_per_item
        return spi is not None and spi <= QUEUE_SECONDS

    def measure(self, seconds: float, items: int, nbytes: int = 0) -> None:
        """Takes the time a batch of ``items`` took, and how many bytes its items or its results
        came to, whichever is more (process steps). The estimates are ratios of decayed sums, so
        a large batch weighs more than a small one (whose time is mostly per-batch overhead):
        the batch size ramps from 1 to its best in a few batches, and a slowdown shows at once."""
        if items:
            self.largest = max(self.largest, items)
            self._seconds = 0.5 * self._seconds + seconds
            self._items = 0.5 * self._items + items
            self._bytes = 0.5 * self._bytes + nbytes
            self.seconds_per_item = self._seconds / self._items


def window_limit(steps: Sequence[Step], first: Sizer | None, most: int) -> Callable[[], int]:
    """The in-flight bound of a segment of ``steps`` (whose first step's sizer is ``first``):
    ``WINDOW_BATCHES`` batches per worker and queue slot, of the size that step asks for now
    (``most`` items a batch for a segment without steps). While that step asks for batches
    more than twice as large as any it has timed, one batch per worker: the first are single
    items (nothing is known yet), whose time (mostly the per-batch cost) sizes the next ones,
    larger, whose time is a better guide; so the size ramps up in a few batches instead of
    many being sent at a size soon out of date."""
    slots = max(1, sum(s.workers + s.capacity for s in steps))
    if first is None:
        return lambda: WINDOW_BATCHES * slots * most
    sizer, workers = first, steps[0].workers

    def limit() -> int:
        size = sizer.chunk()
        if 2 * sizer.largest < size:
            return workers * size
        return WINDOW_BATCHES * slots * size

    return limit
