"""The process stage's runner: the parent's proxy of one worker process (a ``StageRunner``).

It keeps up to ``PROCESS_DEPTH`` batches queued in the worker over quick items, so that the
worker never waits for the parent between batches; slow batches go one at a time (one queued
behind a slow item would wait while another worker may be free). A batch too large to queue
behind another waits until the worker is free (the ring must have room for it: see
``_process.QUEUE_BYTES``), and with a per-item ``timeout``, batches go one at a time (a batch's
clock starts when it is sent). A worker that dies, or holds a batch past the step's ``timeout``,
is replaced and the batches it had are sent again, up to ``retries`` times; then the run fails
with ``WorkerCrashed`` or ``TimeoutError``. At the end an idle worker goes back to the warm set.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from . import _shm
from ._apply import step_function, worker_op
from ._batch import Batch, Key, Slot
from ._errors import ItemTimeout, WorkerCrashed
from ._plan import Step
from ._process import QUEUE_BYTES, Stopped, WorkerProcess, give_back, lease
from ._runners import Counters, Duty
from ._shipping import Packed, pack
from ._sizing import Traits

__all__ = ["PROCESS_DEPTH", "ProcessRunner"]

PROCESS_DEPTH = 2  # batches queued in a worker process: one running, one waiting


class _Pending:
    """A batch on its way to a worker process: its encoded request, the shared-memory blocks of
    the request's large buffers (held until the worker answered)."""

    __slots__ = ("batch", "keep", "request")

    def __init__(self, batch: Batch, request: bytes, keep: list[Any]) -> None:
        self.batch = batch
        self.request = request
        self.keep = keep

    @property
    def nbytes(self) -> int:
        """The request's size, its shared-memory buffers included."""
        return len(self.request) + sum(len(b) for b in self.keep)


class ProcessRunner:
    """The proxy of one worker process (see the module's doc)."""

    @staticmethod
    def traits(step: Step) -> Traits:
        # A batch costs the parent a few hundred microseconds of CPU (pickling, waking threads
        # and the worker), which on a machine whose cores the workers fill is taken from them:
        # 40 ms keeps that near 1%. A per-item timeout times the worker per batch: one item each.
        return Traits(
            batch_seconds=0.04, grows=True, one_by_one=step.timeout is not None, times_items=True
        )

    def __init__(self, duty: Duty) -> None:
        self.duty = duty
        self.counters = Counters()
        self.busy = 0  # requests the worker has not answered
        self._inflight: deque[_Pending] = deque()  # sent, oldest first
        self._held: _Pending | None = None  # encoded, not sent yet (too large to queue)
        self._queue = duty.step.timeout is None  # may batches queue behind one another?
        self._lock = threading.Lock()  # interrupt() against close()
        self._closed = False
        self._worker: WorkerProcess | None = None
        self._starting: WorkerProcess | None = None
        self._busy = False  # counted in _shm.busy(): freed blocks kept for reuse meanwhile
        self._dead = False  # the worker died while a request was being sent (see _send)

    @property
    def worker(self) -> WorkerProcess:
        assert self._worker is not None, "start() first"
        return self._worker

    @property
    def pending(self) -> int:
        return len(self._inflight) + (self._held is not None)

    def stopping(self) -> bool:
        return self.duty.stop[0]

    # ----------------------------------------------------------------- the worker's life

    def start(self) -> None:
        _shm.busy()
        self._busy = True
        self._worker = self._lease()

    def _lease(self) -> WorkerProcess:
        duty = self.duty
        op = worker_op(duty.step, duty.may_skip)
        try:
            fn, init = duty.once.get("packed", self._pack)  # pickled once for the run's workers
            return lease(op, fn, init, duty.label, self.stopping, self._attach)
        finally:
            self._starting = None

    def _pack(self) -> tuple[Packed, Packed]:
        step = self.duty.step
        where = f"stage {step.name!r}"
        return pack(step_function(step), where), pack(step.init, where)

    def _attach(self, worker: WorkerProcess) -> None:
        self._starting = worker
        worker.stage = self.duty.step.name  # in the log records it forwards
        if self.stopping():  # a stop that came before: interrupt() did not see this worker
            worker.interrupt()

    def finish(self) -> None:
        self.worker.confirm()

    def interrupt(self) -> None:
        """Wakes this proxy at once if it waits for its worker, which then is killed (it may
        hold a long item, or be starting)."""
        with self._lock:
            if self._closed:
                return  # its worker may be back in the warm set, or another run's already
            starting, worker = self._starting, self._worker
            if starting is not None:
                starting.interrupt()
            elif worker is not None and self.busy:  # None: being replaced after a crash
                worker.interrupt()

    def close(self) -> None:
        """Returns an idle worker to the warm set, also after a stop (an exception in a step
        leaves its worker idle and sound); kills one a stop left holding a batch."""
        with self._lock:
            self._closed = True
        try:
            if self._worker is None:
                return  # it did not start
            if self.busy:
                self.worker.kill()
                self.worker.stop()
            else:
                give_back(self.worker)
        finally:
            self._inflight.clear()
            self._held = None
            if self._busy:
                self._busy = False
                _shm.idle()

    # ----------------------------------------------------------------- batches

    def wants(self) -> bool:
        depth = PROCESS_DEPTH if self._queue and self.duty.quick() else 1
        return self._held is None and len(self._inflight) < depth

    def submit(self, batch: Batch, slot: Slot) -> None:
        slot.batch = batch
        self._held = _Pending(batch, *WorkerProcess.encode(batch, slot))
        self._flush()

    def _flush(self) -> None:
        """Sends the held request if it may go now: to an idle worker, or small enough to
        queue behind the ones in flight."""
        held = self._held
        if held is not None and (not self._inflight or len(held.request) <= QUEUE_BYTES):
            self._held = None
            self._send(held.request)
            self._inflight.append(held)

    def _send(self, request: bytes) -> None:
        """Queues a request for the worker. A worker that dies meanwhile (a large request waits
        for room in its ring) is not reported here: the request counts as sent, and
        :meth:`receive` finds the death, where ``retries`` apply, after it has read what the
        worker answered before it died (the exception its ``init`` raised, say)."""
        self.busy += 1
        if self._dead:
            return
        try:
            self.worker.send(request)
        except WorkerCrashed:
            self._dead = True

    def receive(self, slot: Slot) -> tuple[Batch, int, float, int]:
        first = self._inflight[0]
        slot.batch = first.batch
        out, n, busy = self._receive(slot)
        self._inflight.popleft()
        self.counters.record(n, len(out), busy)
        self._flush()
        return out, n, busy, max(first.nbytes, out.nbytes)

    def _receive(self, slot: Slot) -> tuple[Batch, int, float]:
        """The output of the oldest batch in flight: see :meth:`WorkerProcess.receive`. A crash
        or a timeout replaces the worker and sends the batches in flight again, until one item
        has taken a worker down more than ``retries`` times (each item has its own count: in a
        large batch, several may fail once each)."""
        step = self.duty.step
        downs: dict[Key | None, int] = {}  # per item of the batch (None: between items)
        while True:
            batch = self._inflight[0].batch
            try:
                out = self.worker.receive(batch, step.timeout, slot, self._namer(batch))
            except (WorkerCrashed, ItemTimeout):  # not a TimeoutError the step raised
                key = None if slot.index is None else batch.key(slot.index)
                downs[key] = downs.get(key, 0) + 1
                if downs[key] > step.retries or self.stopping():
                    raise
                self.worker.stop()
                self._worker = None
                self._worker = self._lease()
                self._dead = False
                self.busy = 0
                for p in self._inflight:
                    self._send(p.request)
                continue
            except Stopped:
                raise
            except BaseException:
                self.busy -= 1  # an exception in the step: the worker answered, and goes on
                raise
            self.busy -= 1
            first = self.duty.position(batch.key(0))
            out[0].came_from(f"{self.duty.label} (a batch of {len(batch)} item(s) from {first})")
            return out

    def _namer(self, batch: Batch) -> Callable[[int], str]:
        """Names the ``i``-th item of ``batch`` ("input item 7")."""
        return lambda i: self.duty.position(batch.key(i))
