"""Stage runners: the one protocol through which the local backend drives a worker of any kind,
and the thread stage's runner.

A runner is one worker of one step. The engine's loop for it is the same for every kind::

    runner.start()                          # get a worker: run init, or lease a process
    while the run goes on:
        if runner.wants():                  # room for another batch (pipelining depth)
            runner.submit(next batch, slot)
        elif runner.pending:
            out, n, busy, nbytes = runner.receive(slot)   # the oldest batch's output
            ... measure, send out downstream
        else:
            runner.finish()                 # input drained: raises what init raised
    runner.close()                          # always; runner.interrupt() at a stop, any thread

A runner says what its batches are like (:meth:`traits`: how long a batch should take, whether
it times items itself...), so the engine never asks what kind a step is. It keeps ``slot`` at the
batch and item in hand, so that an error names its item, and counts what it did in its
:class:`Counters` (the engine's per-stage figures sum those of a stage's runners).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from time import perf_counter
from typing import Any, NamedTuple, Protocol

from . import _state
from ._apply import apply_for, step_function
from ._batch import Batch, Key, Slot
from ._plan import Step
from ._sizing import Traits

__all__ = ["Counters", "Duty", "StageRunner", "ThreadRunner"]


class Duty(NamedTuple):
    """What a runner is given: one worker's share of one step of a run."""

    step: Step
    may_skip: bool  # can a value reaching the step be SKIP?
    label: str  # names this worker in messages: "stage 1 ('f', process worker 0)"
    position: Callable[[Key], str]  # names an item of the step's segment: "input item 7"
    stop: list[bool]  # set at a stop; read between items
    quick: Callable[[], bool]  # are the step's items known to be quick (``Sizer.quick``)?
    once: Once  # what the step's runners of this run make once and share (its pickled function)


class Once:
    """Values made once per step of a run, by whichever of its workers asks first (the others
    wait for it), and shared by all of them."""

    __slots__ = ("_lock", "_values")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, Any] = {}

    def get(self, key: str, make: Callable[[], Any]) -> Any:
        """The value for ``key``, made by ``make()`` the first time (not kept if it raises)."""
        with self._lock:
            if key not in self._values:
                self._values[key] = make()
            return self._values[key]


class Counters:
    """What one worker did, written by its runner alone (no lock: one writer), read by
    whoever reports on the run."""

    __slots__ = ("batches", "busy", "items_in", "items_out")

    def __init__(self) -> None:
        self.batches = 0
        self.items_in = 0  # items run (a filter's or flat_map's input)
        self.items_out = 0  # values out (SKIP included)
        self.busy = 0.0  # seconds spent on batches

    def record(self, items_in: int, items_out: int, busy: float) -> None:
        self.batches += 1
        self.items_in += items_in
        self.items_out += items_out
        self.busy += busy


class StageRunner(Protocol):
    """One worker of one step, as the engine drives it (see the module's doc)."""

    counters: Counters

    @staticmethod
    def traits(step: Step) -> Traits:
        """What this kind of runner's batches are like, for ``step``."""
        ...

    @property
    def pending(self) -> int:
        """Batches submitted whose output was not received yet."""
        ...

    def start(self) -> None:
        """Gets the worker ready: runs ``init``, or leases a worker process loaded with the
        step (:meth:`interrupt` stops a start in progress)."""

    def wants(self) -> bool:
        """Whether to :meth:`submit` another batch now, before receiving."""
        ...

    def submit(self, batch: Batch, slot: Slot) -> None:
        """Hands the worker a batch (``slot`` names an item that cannot be sent)."""

    def receive(self, slot: Slot) -> tuple[Batch, int, float, int]:
        """The output of the oldest batch submitted: the output batch, how many items ran,
        the seconds the worker spent on it, and how many bytes its items or results came to.
        Raises what the step raised, ``slot`` naming the item."""
        ...

    def finish(self) -> None:
        """The input is drained and nothing is pending: raises what ``init`` raised, also for
        a worker that got no batch."""

    def interrupt(self) -> None:
        """At a stop, from any thread: wakes the worker's waits at once."""

    def close(self) -> None:
        """Lets the worker go (after a stop too): always called, once."""


class ThreadRunner:
    """A thread stage's worker: runs the step's function over each batch in the calling thread
    (a task of the run on the pool), when :meth:`receive` asks for its output."""

    @staticmethod
    def traits(step: Step) -> Traits:
        # A thread step's batch costs a few microseconds: 5 ms batches keep its workers
        # balanced. The run's supervision watches each item's timeout.
        return Traits(batch_seconds=0.005, grows=False, one_by_one=False, times_items=False)

    def __init__(self, duty: Duty) -> None:
        self.duty = duty
        self.counters = Counters()
        self._batch: Batch | None = None
        self._fn: Callable[[Any], Any] = abs
        self._apply = apply_for(duty.step, duty.may_skip)
        self._timed = duty.step.timeout is not None

    @property
    def pending(self) -> int:
        return 0 if self._batch is None else 1

    def start(self) -> None:
        _state.load(self.duty.step.init)
        self._fn = step_function(self.duty.step)

    def wants(self) -> bool:
        return self._batch is None

    def submit(self, batch: Batch, slot: Slot) -> None:
        self._batch = batch

    def receive(self, slot: Slot) -> tuple[Batch, int, float, int]:
        batch = self._batch
        assert batch is not None, "submit() first"
        self._batch = None
        slot.batch = batch
        t0 = perf_counter()
        out, n = self._apply(self._fn, batch, slot, self._timed, self.duty.stop)
        busy = perf_counter() - t0
        self.counters.record(n, len(out), busy)
        return out, n, busy, 0

    def finish(self) -> None:
        pass

    def interrupt(self) -> None:
        pass  # the loops see the stop between items

    def close(self) -> None:
        pass
