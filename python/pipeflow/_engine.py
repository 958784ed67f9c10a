"""The local engine: runs a pipeline's steps on the work-stealing pool.

::

                 ch[0]            ch[1]                 ch[2]          ch[3]
    items ─► feeder ─► [step 0 workers x N] ─► [batch step] ─► [step 2 workers] ─► caller
              │  ▲       (fan-out, fan-in)      reorders,          (fan-out)       reorders,
              │  └──────────── window 0 ──────── groups ◄─ window 1 ──────────────── yields
              └ reads the input lazily

Every arrow is a bounded ``pipeflow.Channel`` of *batches* (:class:`~pipeflow._ordering.Batch`:
a column of keys, usually just the first of a run, and a list of values). A batch is sized for
the step that receives it, from that step's measured time per item, so tiny items travel
thousands to a batch and slow ones one at a time. The feeder and
each batch step are the *source* of a segment; the next batch step or the caller is its
*reorder point*, and a :class:`~pipeflow._ordering.Window` between them bounds what is in flight.

Every task (feeder, each worker, each batch step) runs on the pool. The producer closes: the last
worker of a step to finish closes that step's output channel. The first error (a stage's
exception, a bad input iterator, an item past its ``timeout``) is recorded once, cancels the run's
context, and the cancellation closes every channel, which wakes every blocked task; the caller
re-raises the error after every task has finished. The caller also supervises: each
``SUPERVISE_EVERY`` seconds it checks deadlines and per-item timeouts.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import operator
import threading
import weakref
from collections import deque
from collections.abc import Callable, Generator, Iterator
from time import perf_counter
from typing import Any

from . import _pool, _shm
from ._context import Context, _current, current_context
from ._core import Channel
from ._errors import ChannelClosed, WorkerCrashed
from ._ordering import SKIP, Batch, Key, Reorderer, Window, child_key
from ._pool import default_pool
from ._process import QUEUE_BYTES, Stopped, WorkerProcess, WorkerTimeout, give_back, lease
from .pipeline import Step

__all__ = ["Results", "Run", "worker_state"]

MAX_CHUNK = 8192  # the most items in one batch
# Aim for batches that take a worker about this long. A batch costs a process step's parent a few
# hundred microseconds of CPU (pickling, waking threads and the worker), which on a machine whose
# cores the workers fill is taken from them: 40 ms keeps that near 1%. A thread step's batch
# costs a few microseconds: 5 ms batches keep its workers balanced.
CHUNK_SECONDS = {"thread": 0.005, "process": 0.04}
# The first step of a pipeline whose input has a known length gets batches that shrink near its
# end (see _StepState.chunk). If it is a process step, its batches grow with the run meanwhile,
# to an eighth of the run's time so far, at most GROWN_SECONDS: a long run then costs the parent
# fewer batches, each of whose wake-ups preempts a worker when the workers fill the cores.
GROWTH = 1 / 8
GROWN_SECONDS = 0.25
TAIL_SECONDS = 0.002  # near the end of an input of known length, batches shrink to this
CHUNK_BYTES = 1 << 20  # and whose items or results come to about this much (large ones go alone)
SOURCE_HOLD = 0.005  # the feeder sends a partial batch once its first item waited this long
SOURCE_PIECE = 1024  # the most items the feeder pulls between two looks at the clock
SUPERVISE_EVERY = 0.1
ABANDON_GRACE = 0.1  # after Ctrl-C or a deadline, how long to wait for items in hand
WINDOW_BATCHES = 2  # in-flight bound, in batches per worker and queue slot
PROCESS_DEPTH = 2  # batches queued in a worker process: one running, one waiting
QUEUE_SECONDS = 0.1  # how long a batch may wait behind another in a worker process

_worker_state: contextvars.ContextVar[Any] = contextvars.ContextVar("pipeflow_worker_state")
_NO_STATE = object()


def worker_state() -> Any:
    """The value the stage's ``init`` returned, for the worker that is running.

    Example:
        >>> import pipeflow as pf
        >>> def load_model():
        ...     return {"scale": 10}
        >>> def score(x):
        ...     return x * pf.worker_state()["scale"]
        >>> pf.Pipeline(kind="thread").stage(score, init=load_model).run([1, 2])
        [10, 20]
    """
    state = _worker_state.get(_NO_STATE)
    if state is _NO_STATE:
        raise LookupError(
            "worker_state() is only available inside a stage function whose stage has init="
        )
    return state


class _StepState:
    """What the engine tracks for one step while it runs."""

    def __init__(self, step: Step, index: int, segment: int) -> None:
        self.step = step
        self.index = index
        self.segment = segment
        self.seconds_per_item: float | None = None
        self._seconds = 0.0  # decayed sums of measured batches (see measure)
        self._items = 0.0
        self._bytes = 0.0
        self.largest = 0  # the most items in a batch measured
        self.grows = False  # do its batches grow with the run (see GROWTH)?
        self.started = perf_counter()
        self.workers_left = step.workers
        # Per worker: [index in its batch of the item in hand or None, when it started, batch].
        self.slots: list[list[Any]] = [[None, 0.0, None] for _ in range(step.workers)]
        self.task_ids: list[int] = []
        self.may_skip = False  # can a batch for this step hold SKIP values?

    def chunk(self, remaining: int | None = None) -> int:
        """How many items a batch for this step should hold. With ``remaining``, the number of
        items still to come from an input of known length, batches shrink near its end (to
        ``TAIL_SECONDS`` of work) so that the workers finish together, as in guided
        scheduling: each takes at most a ``2 * workers``-th of what is left."""
        if self.step.op == "batch":
            return MAX_CHUNK
        if self.one_by_one:
            return 1
        spi = self.seconds_per_item
        if spi is None:
            return 1
        spi = max(spi, 1e-9)
        by_time = int(self.seconds() / spi)
        by_size = int(CHUNK_BYTES / max(self._bytes / self._items, 1e-9))
        size = min(MAX_CHUNK, by_time, by_size)
        if remaining is not None and remaining > 0:
            share = -(-remaining // (2 * self.step.workers))
            size = min(size, max(share, int(TAIL_SECONDS / spi)))
        return max(1, size)

    @property
    def one_by_one(self) -> bool:
        """A process step with a per-item ``timeout`` takes batches of one item: its worker
        process is timed per batch."""
        return self.step.kind == "process" and self.step.timeout is not None

    def seconds(self) -> float:
        """How long a batch for this step should take a worker now."""
        seconds = CHUNK_SECONDS[self.step.kind]
        if self.grows:
            seconds = min(GROWN_SECONDS, max(seconds, (perf_counter() - self.started) * GROWTH))
        return seconds

    def quick(self) -> bool:
        """Whether the step's items are known to take at most ``QUEUE_SECONDS`` each: then a
        batch may wait behind another in a worker process. It waits ``QUEUE_SECONDS`` at most
        (a batch of quick items takes ``CHUNK_SECONDS``), or ``GROWN_SECONDS`` in a long run over
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


def _until_stopped(source: Iterator[Any], stop: list[bool]) -> Iterator[Any]:
    """``source``, ending as soon as ``stop[0]`` is set: no ``next()`` after a stop."""
    for value in source:
        yield value
        if stop[0]:
            return


_live_runs: weakref.WeakSet[Run] = weakref.WeakSet()


def stalled_feeders() -> int:
    """How many stopped runs have their input reader blocked inside the input's ``next()``: it
    returns when the input yields, maybe never (the interpreter's exit does not wait for it)."""
    return sum(1 for run in list(_live_runs) if run._stopped and run._in_source)


class Run:
    """One run of a pipeline. :meth:`results` is the caller's side: a generator."""

    def __init__(
        self,
        steps: tuple[Step, ...],
        source: Iterator[Any],
        total: int | None,
        progress: bool,
        context: Context | None,
        timeout: float | None,
    ) -> None:
        tasks = 1 + sum(step.workers for step in steps)
        if tasks > _pool.MAX_THREADS:
            raise ValueError(
                f"this pipeline needs {tasks} threads at once (its thread workers, plus one), "
                f"more than the pool's {_pool.MAX_THREADS}; use fewer workers"
            )
        self._stop_flag = [False]  # read by the per-item loops: a stop lands between items
        # An input of unknown length may be an event queue with other readers: once the run
        # stops, no item more is taken from it. (One of known length is read at C speed.)
        self.source = source if total is not None else _until_stopped(source, self._stop_flag)
        self.total = total
        self.progress = progress
        self.ctx = Context(timeout=timeout, parent=context or current_context())
        self.states: list[_StepState] = []
        segment = 0
        skips = False  # a filter or flat_map earlier in the segment leaves SKIP values
        for i, step in enumerate(steps):
            st = _StepState(step, i, segment)
            st.may_skip = skips
            st.grows = i == 0 and total is not None and step.kind == "process"
            self.states.append(st)
            skips = step.op != "batch" and (skips or step.op in ("filter", "flat_map"))
            if step.op == "batch":
                segment += 1
        # channels[i] feeds step i; the last one feeds the caller.
        self.channels = [Channel(s.capacity) for s in steps] + [Channel(4)]
        self.windows = [
            Window(self._window_limit_of(k), self._stopping) for k in range(segment + 1)
        ]
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopped = False
        self._tasks_cond = threading.Condition()
        self._running: set[int] = set()
        self._abandoned: set[int] = set()
        self._task_threads: dict[int, int] = {}  # running task -> the thread it runs on
        self._ids = itertools.count()
        self._feeder_id = -1
        self._in_source = False  # the feeder is inside the input's next()
        # The batch the feeder is filling, shared with _flush_stalled (see _feed).
        self._feed_lock = threading.Lock()
        self._feed_start = 0
        self._filling: list[Any] | None = None
        self._filling_since = 0.0
        self._runners: list[_ProcessRunner] = []  # to wake at a stop

    # ----------------------------------------------------------------- set-up and tear-down

    def _segment_steps(self, segment: int) -> list[_StepState]:
        return [s for s in self.states if s.segment == segment and s.step.op != "batch"]

    def _window_limit_of(self, segment: int) -> Callable[[], int]:
        """The in-flight bound of a segment: a few batches per worker and queue slot, with
        batches as large as the segment's first step takes now. While that step asks for
        batches more than twice as large as any it has timed, one batch per worker: the first
        are single items (nothing is known yet), whose time (mostly the per-batch cost) sizes
        the next ones, larger, whose time is a better guide; so the size ramps up in a few
        batches instead of many being sent at a size soon out of date."""
        steps = self._segment_steps(segment)
        slots = max(1, sum(s.step.workers + s.step.capacity for s in steps))
        first = steps[0] if steps else None
        if first is None:
            return lambda: WINDOW_BATCHES * slots * MAX_CHUNK

        def limit() -> int:
            size = first.chunk()
            if 2 * first.largest < size:
                return first.step.workers * size
            return WINDOW_BATCHES * slots * size

        return limit

    def _segment_may_skip(self, segment: int) -> bool:
        """Whether values reaching the reorder point ending ``segment`` can be SKIP."""
        return any(s.step.op in ("filter", "flat_map") for s in self.states if s.segment == segment)

    def _segment_ordered(self, segment: int) -> bool:
        """Whether the reorder point ending ``segment`` restores input order."""
        ends = [s for s in self.states if s.segment == segment and s.step.op == "batch"]
        steps = self._segment_steps(segment) + ends
        return all(s.step.ordered for s in steps)

    def _stopping(self) -> bool:
        return self._stopped

    def _abort(self, _ctx: Context | None = None) -> None:
        """Stops everything: closes every channel, which wakes every blocked task."""
        self._stopped = True
        self._stop_flag[0] = True
        for ch in self.channels:
            ch.close()
        for w in self.windows:
            w.wake()
        with self._lock:
            runners = self._runners[:]
        for runner in runners:
            runner.interrupt()

    def _start(self) -> None:
        _live_runs.add(self)
        self.ctx._on_cancel(self._abort)
        self._feeder_id = self._submit(self._feed)
        for st in self.states:
            if st.step.op == "batch":
                self._submit(self._batcher, st)
            else:
                st.task_ids = [self._submit(self._work, st, w) for w in range(st.step.workers)]

    def _submit(self, fn: Callable[..., None], *args: Any) -> int:
        """Runs ``fn(*args)`` on the pool in a copy of the caller's contextvars; returns its id."""
        task_vars = contextvars.copy_context()
        with self._tasks_cond:
            task_id = next(self._ids)
            self._running.add(task_id)

        def task() -> None:
            self._task_threads[task_id] = threading.get_ident()
            try:
                task_vars.run(self._in_context, fn, *args)
            finally:
                with self._tasks_cond:
                    self._running.discard(task_id)
                    del self._task_threads[task_id]
                    self._tasks_cond.notify_all()

        try:
            default_pool().submit(task)
        except BaseException:
            with self._tasks_cond:
                self._running.discard(task_id)
            raise
        return task_id

    def _in_context(self, fn: Callable[..., None], *args: Any) -> None:
        _current.set(self.ctx)
        fn(*args)

    def _join(self, timeout: float | None = None) -> None:
        """Waits for every task but those abandoned past an item timeout (threads can't be
        killed), and but a stopped run's feeder blocked in the input's ``next()``; with
        ``timeout``, at most that long."""

        def done() -> bool:
            waiting = self._running - self._abandoned
            if self._stopped and self._in_source:
                waiting = waiting - {self._feeder_id}
            return not waiting

        with self._tasks_cond:
            self._tasks_cond.wait_for(done, timeout)

    # ----------------------------------------------------------------- errors

    def _fail(self, error: BaseException, where: str) -> None:
        """Records the first error and cancels the run; later errors are dropped."""
        if isinstance(error, StopIteration | StopAsyncIteration):
            # It cannot travel through the results generator (PEP 479): say what it was.
            wrapped = RuntimeError(f"{type(error).__name__} raised in {where}")
            wrapped.__cause__ = error
            error = wrapped
        with self._lock:
            if self._error is not None:
                return
            self._error = error
        error.add_note(f"pipeflow: raised in {where}")
        self.ctx.cancel(f"{where} raised {type(error).__name__}: {error}")

    @staticmethod
    def _slot_key(slot: list[Any]) -> Key | None:
        """The key of the item a worker holds (``slot``: index, start time, batch)."""
        index, batch = slot[0], slot[2]
        if index is None or batch is None or not 0 <= index < len(batch):
            return None
        return batch.key(index)  # type: ignore[no-any-return]

    def _where(self, st: _StepState, worker: int, key: Key | None) -> str:
        step = st.step
        text = f"stage {st.index} ({step.name!r}, {step.kind} worker {worker})"
        return text if key is None else f"{text} on {self._position(st.segment, key)}"

    def _position(self, segment: int, key: Key) -> str:
        top = key if isinstance(key, int) else key[0]
        if segment == 0:
            text = f"input item {top}"
        else:
            batcher = [s for s in self.states if s.step.op == "batch"][segment - 1]
            text = f"batch {top} of step {batcher.index} ({batcher.step.name!r})"
        if isinstance(key, tuple):
            # "N of M" counts from 1, as "2 of a batch of 5" does; "input item 7" is an index.
            path = ", ".join(f"{key[j] + 1} of {key[j + 1]}" for j in range(1, len(key), 2))
            text += f" (flat_map output {path})"
        return text

    # ----------------------------------------------------------------- sending

    def _send_chunks(self, index: int, batch: Batch) -> bool:
        """Sends ``batch`` into ``channels[index]`` in pieces sized for its step."""
        ch = self.channels[index]
        st = self.states[index] if index < len(self.states) else None
        size = st.chunk() if st is not None else MAX_CHUNK
        n = len(batch)
        # An encoded batch (a process step's output) goes on whole up to twice the size: cutting
        # it would cost an unpickle and two pickles here, more than a batch a little too large.
        # Not to a step that takes one item a batch.
        loose = batch.encoded_now and (st is None or not st.one_by_one)
        fits = n <= (2 * size if loose else size)
        try:
            if fits:
                if n:
                    ch.send(batch)
            else:
                for k in range(0, n, size):
                    ch.send(batch.piece(k, k + size))
        except ChannelClosed:
            return False
        return True

    # ----------------------------------------------------------------- tasks

    def _feed(self) -> None:
        """Reads the input lazily, numbering items, in batches sized for step 0.

        Items are pulled at C speed (``enumerate`` + ``islice``) in pieces of at most
        ``SOURCE_PIECE``, and a batch is sent as soon as it is as large as step 0 wants or its
        first item has waited ``SOURCE_HOLD``. ``cap`` bounds a piece by how many items the input
        yields within ``SOURCE_HOLD``, so a slow input is sent item by item. An input that stalls
        right after a fast burst (an event queue) leaves this task inside ``next()`` with part of
        a batch read: the caller's supervision sends that part (:meth:`_flush_stalled`), so no
        item waits for the input's next one. While this task is inside ``next()`` (which may
        block for good), a stopped run does not wait for it; it exits as soon as ``next()``
        returns. When the input's length is known (``total``), the batches shrink near its end:
        see :meth:`_StepState.chunk`.

        What the supervision may change meanwhile is under ``_feed_lock``: it takes the items
        read so far from the front of ``values`` and advances ``_feed_start`` (the key of
        ``values[0]``) by as many, so ``_feed_start + len(values)`` (the items read) holds.
        """
        window = self.windows[0]
        first = self.states[0] if self.states else None
        source = self.source
        total = self.total
        lock = self._feed_lock
        cap = 1
        pulled = 0  # items read so far: the key of the next one
        exhausted = False
        try:
            while not (exhausted or self._stopped):
                left = None if total is None or pulled >= total else total - pulled
                want = first.chunk(left) if first else MAX_CHUNK
                values: list[Any] = []
                t0 = perf_counter()
                with lock:
                    self._feed_start = pulled
                    self._filling, self._filling_since = values, t0
                while len(values) < want and not self._stopped:
                    piece = min(want - len(values), cap, SOURCE_PIECE)
                    with lock:
                        self._in_source = True
                    try:
                        values.extend(itertools.islice(source, piece))
                    finally:  # what extend appended stays, also when next() raised mid-way
                        with lock:
                            self._in_source = False
                            got = self._feed_start + len(values) - pulled
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
                batch = Batch(self._feed_start, values)
                if not window.acquire(len(values)) or not self._send_chunks(0, batch):
                    return
        except BaseException as e:
            if not self._stopped:
                self._fail(e, f"the input iterable (at item {pulled})")
        finally:
            with lock:
                self._filling = None
            self.channels[0].close()

    def _flush_stalled(self) -> None:
        """Sends the items the feeder has read of a batch while it waits inside the input's
        ``next()`` for the rest, once the first of them has waited ``SOURCE_HOLD``: an input
        that yields a burst and then blocks (an event queue) does not hold back the burst. It
        never blocks the caller, nor exceeds the in-flight bound: if the window or step 0's
        queue is full, the items stay (a batch at most) and the next supervision tries again."""
        with self._feed_lock:
            values = self._filling
            if not self._in_source or not values:
                return
            if perf_counter() - self._filling_since < SOURCE_HOLD:
                return
            n = len(values)  # the feeder may append meanwhile (at the end): take these only
            window = self.windows[0]
            if not window.try_acquire(n):
                return
            try:
                sent = self.channels[0].try_send(Batch(self._feed_start, values[:n]))
            except ChannelClosed:
                sent = False  # the run stopped
            if not sent:
                window.release(n)
                return
            del values[:n]
            self._feed_start += n

    def _work(self, st: _StepState, worker: int) -> None:
        """One worker of a map, filter or flat_map step: a thread, or the proxy of a process."""
        slot = st.slots[worker]
        runner: _ThreadRunner | _ProcessRunner | None = None
        try:
            if st.step.kind == "process":
                runner = _ProcessRunner(
                    st, self._where(st, worker, None), self._stopping, self._position
                )
                with self._lock:
                    self._runners.append(runner)
                runner.start()
                self._work_process(st, runner, slot)
            else:
                runner = _ThreadRunner(st, self._stop_flag)
                self._work_thread(st, runner, slot)
        except BaseException as e:
            if not self._stopped:  # after a stop, errors are side effects of the stop
                self._fail(e, self._where(st, worker, self._slot_key(slot)))
        finally:
            slot[0] = slot[2] = None
            if runner is not None:
                runner.close()
            self._worker_done(st)

    def _work_thread(self, st: _StepState, runner: _ThreadRunner, slot: list[Any]) -> None:
        for batch in self.channels[st.index]:
            if self._stopped:
                break
            t0 = perf_counter()
            slot[2] = batch
            out, n = runner.run(batch, slot)
            slot[0] = None
            st.measure(perf_counter() - t0, n)
            if not self._send_chunks(st.index + 1, out):
                break

    def _work_process(self, st: _StepState, runner: _ProcessRunner, slot: list[Any]) -> None:
        """The proxy's loop. Over quick batches (see :meth:`_StepState.quick`), it keeps up to
        ``PROCESS_DEPTH`` batches queued in the worker, so that the worker never waits for the
        parent between batches. Slow batches go one at a time: one queued behind a slow item
        would wait while another worker may be free. A batch too large to queue behind another
        waits for the worker to be free (the ring must have room for it: see
        ``_process.QUEUE_BYTES``), and with a per-item ``timeout``, batches go one at a time (a
        batch's clock starts when it is sent)."""
        inq = self.channels[st.index]
        queue = st.step.timeout is None
        pending: deque[_Pending] = deque()
        held: _Pending | None = None  # read, not yet sent
        closed = False
        while not self._stopped:
            depth = PROCESS_DEPTH if queue and st.quick() else 1
            if held is None and not closed and len(pending) < depth:
                try:
                    if pending:
                        _, batch = inq.try_recv()
                    else:
                        batch = inq.recv()
                except ChannelClosed:
                    closed, batch = True, None
                if batch is not None:
                    slot[2] = batch
                    held = _Pending(batch, *runner.encode(batch, slot))
            if held is not None and (not pending or len(held.request) <= QUEUE_BYTES):
                runner.send(held.request)
                pending.append(held)
                held = None
                continue
            if not pending:
                # The input is closed and drained, and nothing is in flight. A worker that got
                # no batch still says whether its step loaded (an init that raises fails the run
                # also over an empty input).
                runner.worker.confirm()
                return
            first = pending[0]
            slot[2] = first.batch
            out, n, busy = runner.receive(pending, slot)
            pending.popleft()
            st.measure(busy, n, max(first.nbytes, out.nbytes))
            slot[0] = None
            if not self._send_chunks(st.index + 1, out):
                return

    def _worker_done(self, st: _StepState) -> None:
        with self._lock:
            st.workers_left -= 1
            last = st.workers_left == 0
        if last:
            self.channels[st.index + 1].close()

    def _batcher(self, st: _StepState) -> None:
        """A batch step: puts its segment back in order, groups, numbers the groups anew."""
        size = st.step.size
        segment = st.segment
        reorder = Reorderer(self._segment_ordered(segment), self._segment_may_skip(segment))
        window_in, window_out = self.windows[segment], self.windows[segment + 1]
        group: list[Any] = []
        seq = 0
        released: list[Any] = []
        try:
            for batch in self.channels[st.index]:
                if self._stopped:
                    break
                reorder.push_batch(batch, released)
                window_in.completed_to(reorder.completed)
                groups = []
                for value in released:
                    group.append(value)
                    if len(group) == size:
                        groups.append(group)
                        group = []
                released.clear()
                if groups:
                    out = Batch(seq, groups)
                    seq += len(groups)
                    sent = window_out.acquire(len(groups)) and self._send_chunks(st.index + 1, out)
                    if not sent:
                        break
            else:
                if group and window_out.acquire(1):
                    self._send_chunks(st.index + 1, Batch(seq, [group]))
        except BaseException as e:
            self._fail(e, self._where(st, 0, None))
        finally:
            self._worker_done(st)

    # ----------------------------------------------------------------- the caller's side

    def results(self) -> Results:
        """Starts the run (on the first ``next``) and gives its results one by one; stops and
        cleans up however it is left."""
        return Results.over(self._released())

    def collect(self) -> list[Any]:
        """Starts the run and returns every result (a list built a batch at a time)."""
        out: list[Any] = []
        for values in self._released():
            out.extend(values)
        return out

    def _released(self) -> Generator[list[Any], None, None]:
        """Starts the run and yields the results as the final reorder point releases them, a
        list at a time; stops and cleans up however it is left."""
        segment = len(self.windows) - 1
        reorder = Reorderer(self._segment_ordered(segment), self._segment_may_skip(segment))
        window = self.windows[segment]
        out_ch = self.channels[-1]
        bar = _progress_bar(self.total) if self.progress else None
        finished = False
        interrupted = False
        released: list[Any] = []
        try:
            self._start()
            next_check = perf_counter() + SUPERVISE_EVERY
            while True:
                try:
                    batch = out_ch.recv(timeout=SUPERVISE_EVERY)
                except TimeoutError:
                    batch = None
                except ChannelClosed:
                    break
                if perf_counter() >= next_check or batch is None:
                    self._supervise()
                    next_check = perf_counter() + SUPERVISE_EVERY
                if batch is None:
                    continue
                if self._stopped:
                    break
                released = []
                reorder.push_batch(batch, released)
                window.completed_to(reorder.completed)
                if bar is not None:
                    bar.update(self.windows[0]._completed - bar.n)
                if released:
                    yield released
            finished = True
        except KeyboardInterrupt:
            interrupted = True
            raise
        finally:
            if not finished:
                # Closed (or failed) while the caller was inside the list yielded last: what it
                # had not taken of it is dropped, so a closed Results gives nothing more.
                released.clear()
            if threading.get_ident() in self._task_threads.values():
                # The garbage collector finalizes this generator (results dropped in a reference
                # cycle) on one of the run's own threads, in the middle of its work: it must not
                # wait for itself, nor take the run's locks, which it may hold. Another thread
                # stops the run; its tasks finish on their own.
                default_pool().submit(lambda: self.ctx.cancel("the results were dropped"))
            else:
                if not finished or self._error is not None:
                    self.ctx.cancel("the caller stopped consuming results")
                # Ctrl-C and a passed deadline must not wait for items in hand: threads cannot
                # be killed, so those finish in the background (and find every channel closed).
                self._join(ABANDON_GRACE if interrupted or self.ctx.expired else None)
                if bar is not None:
                    bar.close()
        if self._error is not None:
            raise self._error
        if self.ctx.cancelled and self._stopped:
            raise self.ctx.error()
        self.ctx.cancel("the run finished")

    def _supervise(self) -> None:
        """Checks the run's deadline and each in-hand item's timeout; sends what a stalled input
        left in the feeder's hands."""
        if self.ctx.cancelled:  # also fires a passed deadline
            return
        self._flush_stalled()
        now = perf_counter()
        for st in self.states:
            limit = st.step.timeout
            if limit is None or st.step.kind == "process":  # its proxy times it
                continue
            for w, slot in enumerate(st.slots):
                key = self._slot_key(slot)
                if key is not None and now - slot[1] > limit:
                    with self._tasks_cond:
                        self._abandoned.add(st.task_ids[w])
                    self._fail(
                        TimeoutError(
                            f"an item took longer than timeout={limit} s; the thread running "
                            "it cannot be stopped and finishes in the background"
                        ),
                        self._where(st, w, key),
                    )
                    return


# The steps' loops over a batch. Each returns the output batch and how many items it ran, and
# keeps ``slot[0]`` at the index of the item in hand (``slot[1]``: since when, if ``timed``), so
# an error, a crash or a timeout names its item. A stop (``stop[0]``) lands between items.


class Results(itertools.chain):  # type: ignore[type-arg]
    """What :meth:`Pipeline.iter` returns: the results one by one, in input order.

    It walks the lists of results the run releases at C speed (an ``itertools.chain``), so
    taking an item costs no Python frame. ``close()`` stops the run and waits for its workers,
    as closing a generator does; so does leaving a ``with`` block over it, and dropping the last
    reference to it.

    Example:
        >>> import itertools, pipeflow as pf
        >>> results = pf.Pipeline(kind="thread").stage(str).iter(itertools.count())
        >>> next(results), next(results)
        ('0', '1')
        >>> results.close()  # stops reading the endless input; nothing is left running
        >>> with pf.Pipeline(kind="thread").stage(str).iter(itertools.count()) as results:
        ...     next(results)
        '0'
    """

    _released: Generator[list[Any], None, None]

    @classmethod
    def over(cls, released: Generator[list[Any], None, None]) -> Results:
        # from_iterable makes an instance of ``cls`` (typeshed says chain): see the test.
        results: Results = cls.from_iterable(released)  # type: ignore[assignment]
        results._released = released
        return results

    def close(self) -> None:
        """Stops the run (if it is still going) and waits until nothing of it is left."""
        self._released.close()

    def __enter__(self) -> Results:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            # Ctrl-C in the block's body stops the run as Ctrl-C inside next() does: without
            # waiting for the items in hand (they finish in the background).
            with contextlib.suppress(KeyboardInterrupt, StopIteration):
                self._released.throw(KeyboardInterrupt())
        self.close()


def _apply_map(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    out = []
    n = 0
    for i, value in enumerate(batch.values):
        if stop[0]:
            break
        if value is SKIP:
            out.append(SKIP)
            continue
        if timed:  # the start first: the supervisor never pairs this item with an older one's
            slot[1] = perf_counter()
        slot[0] = i
        out.append(fn(value))
        n += 1
    return Batch(batch.keys, out), n


def _apply_map_fast(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    """``_apply_map`` for a batch with no SKIP value and no per-item timeout to watch: a list
    comprehension; on an exception the list iterator's position names the failing item."""
    values = batch.values
    items = iter(values)
    try:
        out = [fn(value) for value in items if not stop[0]]
    except BaseException:
        slot[0] = len(values) - operator.length_hint(items) - 1
        raise
    return Batch(batch.keys, out), len(out)


def _apply_filter(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    out = []
    n = 0
    for i, value in enumerate(batch.values):
        if stop[0]:
            break
        if value is not SKIP:
            if timed:  # the start first: the supervisor never pairs this item with an older one's
                slot[1] = perf_counter()
            slot[0] = i
            if not fn(value):
                value = SKIP
            n += 1
        out.append(value)
    return Batch(batch.keys, out), n


def _apply_flat_map(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    keys: list[Key] = []
    out: list[Any] = []
    split = False  # did an item give two or more values (so the keys are no longer a run)?
    n = 0
    for i, value in enumerate(batch.values):
        if stop[0]:
            break
        key = batch.key(i)
        if value is SKIP:
            keys.append(key)
            out.append(SKIP)
            continue
        if timed:  # the start first: the supervisor never pairs this item with an older one's
            slot[1] = perf_counter()
        slot[0] = i
        values = list(fn(value))
        n += 1
        if len(values) == 1:
            keys.append(key)
            out.append(values[0])
        elif not values:
            keys.append(key)
            out.append(SKIP)
        else:
            split = True
            count = len(values)
            keys.extend(child_key(key, j, count) for j in range(count))
            out.extend(values)
    return Batch(keys if split else batch.keys, out), n


def _apply_map_word(
    fn: Callable[[Any], Any], batch: Batch, slot: Any, timed: bool, stop: list[bool]
) -> tuple[Batch, int]:
    """``_apply_map`` in a worker process, for a batch with no SKIP value: ``slot`` is the
    worker's shared :class:`~pipeflow._core.Word`, whose ``track`` stores each item's index as
    the comprehension takes it (a stop kills the process instead)."""
    values = batch.values
    return Batch(batch.keys, [fn(value) for value in slot.track(values)]), len(values)


_APPLY = {"map": _apply_map, "filter": _apply_filter, "flat_map": _apply_flat_map}
# What a worker process runs for an op; "map_plain": a map step whose batches hold no SKIP.
_WORKER_APPLY = {**_APPLY, "map_plain": _apply_map_word}


class Retrying:
    """``fn`` with ``retries`` more tries when it raises an ``Exception`` (picklable, so that a
    process stage's worker retries in place)."""

    def __init__(self, fn: Callable[[Any], Any], retries: int) -> None:
        self.fn = fn
        self.retries = retries

    def __call__(self, item: Any) -> Any:
        for _ in range(self.retries):
            try:
                return self.fn(item)
            except Exception:
                if current_context().cancelled:
                    raise
        try:
            return self.fn(item)
        except Exception as e:
            e.add_note(
                f"pipeflow: the item failed {self.retries + 1} times (retries={self.retries})"
            )
            raise


def _step_function(step: Step) -> Callable[[Any], Any]:
    assert step.fn is not None
    return Retrying(step.fn, step.retries) if step.retries else step.fn


class _ThreadRunner:
    """Runs a thread step's function over batches, in the calling thread."""

    def __init__(self, st: _StepState, stop: list[bool]) -> None:
        step = st.step
        # A stage without init has no state, whatever the caller's context carried.
        _worker_state.set(step.init() if step.init is not None else _NO_STATE)
        self.apply = _APPLY[step.op]
        if step.op == "map" and step.timeout is None and not st.may_skip:
            self.apply = _apply_map_fast
        self.fn = _step_function(step)
        self.timed = step.timeout is not None
        self.stop = stop

    def run(self, batch: Batch, slot: list[Any]) -> tuple[Batch, int]:
        return self.apply(self.fn, batch, slot, self.timed, self.stop)

    def close(self) -> None:
        pass


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


class _ProcessRunner:
    """The proxy of one worker process. A worker that dies, or holds a batch past the step's
    ``timeout`` (batches are single items then), is replaced and the batches it had are sent
    again, up to ``retries`` times; then the run fails with ``WorkerCrashed`` or
    ``TimeoutError``."""

    def __init__(
        self,
        st: _StepState,
        label: str,
        stopping: Callable[[], bool],
        position: Callable[[int, Key], str],
    ) -> None:
        self.st = st
        self.label = label
        self.stopping = stopping
        self.position = position  # names a key in a message: "input item 7"
        self.busy = 0  # requests the worker has not answered
        self._lock = threading.Lock()  # interrupt() against close()
        self._closed = False
        self._worker: WorkerProcess | None = None
        self._starting: WorkerProcess | None = None
        self._busy = False  # counted in _shm.busy(): freed blocks kept for reuse meanwhile
        self._dead = False  # the worker died while a request was being sent (see send)

    @property
    def worker(self) -> WorkerProcess:
        assert self._worker is not None, "start() first"
        return self._worker

    def start(self) -> None:
        """Gets a worker (:meth:`interrupt` stops a start in progress)."""
        _shm.busy()
        self._busy = True
        self._worker = self._start()

    def _start(self) -> WorkerProcess:
        step = self.st.step
        op = "map_plain" if step.op == "map" and not self.st.may_skip else step.op
        try:
            return lease(
                op, _step_function(step), step.init, self.label, self.stopping, self._attach
            )
        finally:
            self._starting = None

    def _attach(self, worker: WorkerProcess) -> None:
        self._starting = worker
        if self.stopping():  # a stop that came before: interrupt() did not see this worker
            worker.interrupt()

    encode = staticmethod(WorkerProcess.encode)

    def send(self, request: bytes) -> None:
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

    def receive(self, pending: deque[_Pending], slot: list[Any]) -> tuple[Batch, int, float]:
        """The output of the oldest batch in flight, ``pending[0]``: see
        :meth:`WorkerProcess.receive`. A crash or a timeout replaces the worker and sends the
        batches in flight again, until one item has taken a worker down more than ``retries``
        times (each item has its own count: in a large batch, several may fail once each)."""
        downs: dict[Key | None, int] = {}  # per item of the batch (None: between items)
        while True:
            batch = pending[0].batch
            try:
                out = self.worker.receive(batch, self.st.step.timeout, slot, self._namer(batch))
            except (WorkerCrashed, WorkerTimeout):  # not a TimeoutError the step raised
                key = None if slot[0] is None else batch.key(slot[0])
                downs[key] = downs.get(key, 0) + 1
                if downs[key] > self.st.step.retries or self.stopping():
                    raise
                self.worker.stop()
                self._worker = None
                self._worker = self._start()
                self._dead = False
                self.busy = 0
                for p in pending:
                    self.send(p.request)
                continue
            except Stopped:
                raise
            except BaseException:
                self.busy -= 1  # an exception in the step: the worker answered, and goes on
                raise
            self.busy -= 1
            first = self.position(self.st.segment, batch.key(0))
            out[0].came_from(f"{self.label} (a batch of {len(batch)} item(s) from {first})")
            return out

    def _namer(self, batch: Batch) -> Callable[[int], str]:
        """Names the ``i``-th item of ``batch`` ("input item 7")."""
        return lambda i: self.position(self.st.segment, batch.key(i))

    def interrupt(self) -> None:
        """At a stop: wakes this proxy at once if it waits for its worker, which then is killed
        (it may hold a long item, or be starting)."""
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
            if self._busy:
                self._busy = False
                _shm.idle()


def _progress_bar(total: int | None) -> Any:
    """A tqdm bar (the notebook widget inside Jupyter) that starts no monitor thread: the
    engine updates it itself, and a run leaves no thread behind."""
    from tqdm.auto import tqdm

    class Bar(tqdm):  # type: ignore[misc]
        monitor_interval = 0

    return Bar(total=total, unit="item", dynamic_ncols=True)
