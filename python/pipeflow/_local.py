"""The local backend: runs a plan's steps on this machine, on the work-stealing pool (thread
stages) and on worker processes fed through shared-memory rings (process stages).

::

                 ch[0]            ch[1]                 ch[2]          ch[3]
    items ─► feeder ─► [step 0 workers x N] ─► [batch step] ─► [step 2 workers] ─► caller
              │  ▲       (fan-out, fan-in)      reorders,          (fan-out)       reorders,
              │  └──────────── window 0 ──────── groups ◄─ window 1 ──────────────── yields
              └ reads the input lazily

Every arrow is a bounded ``pipeflow.Channel`` of *batches* (``_batch.Batch``: a column of keys,
usually just the first of a run, and a list of values). A batch is sized for the step that
receives it (``_sizing``), from that step's measured time per item, so tiny items travel
thousands to a batch and slow ones one at a time. The feeder and each batch step are the
*source* of a segment; the next batch step or the caller is its *reorder point*, and a
``_ordering.Window`` between them bounds what is in flight.

The walk of one item, room by room (a process stage)::

    _feeder.Feeder.run        reads it from the input into a batch, numbered, sent on ch[0]
    Run._work / _drive        a task of step 0 takes the batch from ch[0]: one loop per worker,
                              the same for every kind, through its runner (``_runners``)
    _process_stage.ProcessRunner.submit / receive
                              encodes the batch (``_wire.Work``) onto the worker's ring, and
                              takes the reply (``_wire.Done``) from the other
    _worker.main              in the worker process: ``_apply``'s loop runs the function
    Run._send_chunks          the output, still pickled, goes on ch[1] in pieces sized for the
                              next step; the last step sends to the caller's channel
    Run.released              the caller reorders (``_ordering.Reorderer``), yields a list,
                              and the window lets the feeder read further

A thread stage's runner (``_runners.ThreadRunner``) runs ``_apply``'s loop in the task itself.
Every task (feeder, each worker, each batch step) runs on the pool (``_tasks``). The producer
closes: the last worker of a step to finish closes that step's output channel. The first error
(a stage's exception, a bad input iterator, an item past its ``timeout``) is recorded once,
cancels the run's context, and the cancellation closes every channel, which wakes every blocked
task; the caller re-raises the error after every task has finished. The caller also supervises:
each ``SUPERVISE_EVERY`` seconds it checks deadlines and per-item timeouts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from time import perf_counter
from typing import Any

from . import _interrupt, _pool, _runtime
from ._backend import Progress, Source, fail_run, register
from ._batch import Batch, Slot
from ._context import Context, _current
from ._core import Channel
from ._errors import ChannelClosed, ItemTimeout
from ._feeder import Feeder
from ._ordering import Reorderer, Window
from ._plan import Plan
from ._pool import default_pool
from ._process_stage import ProcessRunner
from ._runners import Duty, Once, StageRunner, ThreadRunner
from ._sizing import MAX_CHUNK, Sizer, window_limit
from ._tasks import Tasks

__all__ = ["RUNNERS", "LocalBackend", "Run"]

# The runner of each kind of step: the one place a kind is looked at.
RUNNERS: dict[str, type[StageRunner]] = {"thread": ThreadRunner, "process": ProcessRunner}
SUPERVISE_EVERY = 0.1
ABANDON_GRACE = 0.1  # after Ctrl-C or a deadline, how long to wait for items in hand


class LocalBackend:
    """The default backend: this machine's threads and worker processes."""

    name = "local"

    def stream(
        self, plan: Plan, source: Source, ctx: Context, progress: Progress | None
    ) -> Generator[list[Any], None, None]:
        return Run(plan, source, ctx).released(progress)


register("local", LocalBackend)


def _until_stopped(source: Iterator[Any], stop: list[bool]) -> Iterator[Any]:
    """``source``, ending as soon as ``stop[0]`` is set: no ``next()`` after a stop."""
    for value in source:
        yield value
        if stop[0]:
            return


class Run:
    """One run of a plan on the local backend. :meth:`released` is the caller's side."""

    def __init__(self, plan: Plan, source: Source, ctx: Context) -> None:
        tasks = 1 + sum(step.workers for step in plan.steps)
        if tasks > _pool.MAX_THREADS:
            raise ValueError(
                f"this pipeline needs {tasks} threads at once (its thread workers, plus one), "
                f"more than the pool's {_pool.MAX_THREADS}; use fewer workers"
            )
        self.plan = plan
        self.ctx = ctx
        self._stop_flag = [False]  # read by the per-item loops: a stop lands between items
        self._stopped = False
        self.total = source.total
        # An input of unknown length may be an event queue with other readers: once the run
        # stops, no item more is taken from it. (One of known length is read at C speed.)
        items = source.items
        if source.total is None:
            items = _until_stopped(items, self._stop_flag)
        self.runner_types = [RUNNERS[step.kind] for step in plan.steps]
        self.sizers = [
            Sizer(step, kind.traits(step), grows=i == 0 and source.total is not None)
            for i, (step, kind) in enumerate(zip(plan.steps, self.runner_types, strict=True))
        ]
        self.slots = [[Slot() for _ in range(step.workers)] for step in plan.steps]
        self.once = [Once() for _ in plan.steps]
        self.task_ids: list[list[int]] = [[] for _ in plan.steps]
        self.workers_left = [step.workers for step in plan.steps]
        # channels[i] feeds step i; the last one feeds the caller.
        self.channels = [Channel(s.capacity) for s in plan.steps] + [Channel(4)]
        self.windows = [Window(self._window_limit(k), self._stopping) for k in range(plan.segments)]
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.runners: list[StageRunner] = []  # to wake at a stop; their counters
        self.tasks = Tasks(self._enter)  # each task runs with the run's context current
        self._feeder_id = -1
        first = self.sizers[0] if plan.steps else None
        self.feeder = Feeder(
            items,
            source.total,
            first,
            self.windows[0],
            self.channels[0],
            lambda batch: self._send_chunks(0, batch),
            self._stopping,
            self._fail,
        )

    # ----------------------------------------------------------------- set-up and tear-down

    def _window_limit(self, segment: int) -> Callable[[], int]:
        """The segment's in-flight bound (``_sizing.window_limit``)."""
        indices = self.plan.segment_steps(segment)
        first = self.sizers[indices[0]] if indices else None
        return window_limit([self.plan.steps[i] for i in indices], first, MAX_CHUNK)

    def _stopping(self) -> bool:
        return self._stopped

    def _enter(self) -> None:
        _current.set(self.ctx)

    @property
    def stalled(self) -> bool:
        """Stopped, with the feeder blocked inside the input's ``next()`` (see ``_runtime``)."""
        return self._stopped and self.feeder.in_source

    @property
    def given_up(self) -> int:
        """How many of its tasks a Ctrl-C gave up still run (see ``_runtime``)."""
        return self.tasks.given_up_running()

    def waiting_for(self, running: set[int] | None = None) -> dict[str, int]:
        """The thread-stage items still running (of ``running``; by default every task that is
        not given up), per stage label, for the message of a wait (see ``_interrupt``)."""
        if running is None:
            running = self.tasks.running()
        out: dict[str, int] = {}
        for i, step in enumerate(self.plan.steps):
            n = sum(1 for t in self.task_ids[i] if t in running) if step.kind == "thread" else 0
            if n:
                out[f"stage {i} {step.name!r}"] = n
        return out

    def _abort(self, _ctx: Context | None = None) -> None:
        """Stops everything: closes every channel, which wakes every blocked task."""
        self._stopped = True
        self._stop_flag[0] = True
        for ch in self.channels:
            ch.close()
        for w in self.windows:
            w.wake()
        with self._lock:
            runners = self.runners[:]
        for runner in runners:
            runner.interrupt()

    def _start(self) -> None:
        _runtime.track_run(self)
        self.ctx._on_cancel(self._abort)
        self._feeder_id = self.tasks.submit(self.feeder.run)
        for i, step in enumerate(self.plan.steps):
            if step.op == "batch":
                self.tasks.submit(self._batcher, i)
            else:
                self.task_ids[i] = [
                    self.tasks.submit(self._work, i, w) for w in range(step.workers)
                ]

    def _not_waited_for(self) -> set[int]:
        """A stopped run's feeder blocked in the input's ``next()``: it may never return."""
        return {self._feeder_id} if self.stalled else set()

    # ----------------------------------------------------------------- errors

    def _fail(self, error: BaseException, where: str) -> None:
        """Records the first error and cancels the run (``_backend.fail_run``)."""
        fail_run(self, error, where)

    def _where(self, index: int, worker: int, slot: Slot | None = None) -> str:
        """Names a worker of step ``index`` (and the item in hand in ``slot``) in a message."""
        kind = self.plan.steps[index].kind
        key = value = None
        if slot is not None:
            key, value = slot.key(), slot.value()
        return self.plan.where(index, f"{kind} worker {worker}", key, value)

    # ----------------------------------------------------------------- tasks

    def _send_chunks(self, index: int, batch: Batch) -> bool:
        """Sends ``batch`` into ``channels[index]`` in pieces sized for its step."""
        ch = self.channels[index]
        sizer = self.sizers[index] if index < len(self.sizers) else None
        size = sizer.chunk() if sizer is not None else MAX_CHUNK
        n = len(batch)
        # An encoded batch (a process step's output) goes on whole up to twice the size: cutting
        # it would cost an unpickle and two pickles here, more than a batch a little too large.
        # Not to a step that takes one item a batch.
        loose = batch.encoded_now and (sizer is None or not sizer.one_by_one)
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

    def _work(self, index: int, worker: int) -> None:
        """One worker of a map, filter or flat_map step, through its runner."""
        plan, slot = self.plan, self.slots[index][worker]
        segment = plan.segment_of[index]
        duty = Duty(
            plan.steps[index],
            plan.may_skip[index],
            self._where(index, worker),
            lambda key: plan.position(segment, key),
            self._stop_flag,
            self.sizers[index].quick,
            self.once[index],
        )
        runner: StageRunner | None = None
        try:
            runner = self.runner_types[index](duty)  # type: ignore[call-arg]
            with self._lock:
                self.runners.append(runner)
            runner.start()
            self._drive(index, runner, slot)
        except BaseException as e:
            if not self._stopped:  # after a stop, errors are side effects of the stop
                self._fail(e, self._where(index, worker, slot))
        finally:
            slot.clear()
            if runner is not None:
                runner.close()
            self._worker_done(index)

    def _drive(self, index: int, runner: StageRunner, slot: Slot) -> None:
        """The loop of every worker: takes batches while the runner wants them (a worker
        process may queue a few), and sends on the output of the oldest."""
        inq = self.channels[index]
        sizer = self.sizers[index]
        closed = False
        while not self._stopped:
            if not closed and runner.wants():
                try:
                    batch = inq.try_recv()[1] if runner.pending else inq.recv()
                except ChannelClosed:
                    closed, batch = True, None
                if batch is not None:
                    runner.submit(batch, slot)
                    continue
            if not runner.pending:
                # The input is closed and drained, and nothing is in flight. A worker that got
                # no batch still says whether its step loaded (an init that raises fails the run
                # also over an empty input).
                runner.finish()
                return
            out, n, busy, nbytes = runner.receive(slot)
            sizer.measure(busy, n, nbytes)
            slot.index = None
            if not self._send_chunks(index + 1, out):
                return

    def _worker_done(self, index: int) -> None:
        with self._lock:
            self.workers_left[index] -= 1
            last = self.workers_left[index] == 0
        if last:
            self.channels[index + 1].close()

    def _batcher(self, index: int) -> None:
        """A batch step: puts its segment back in order, groups, numbers the groups anew."""
        plan = self.plan
        size = plan.steps[index].size
        segment = plan.segment_of[index]
        reorder = Reorderer(plan.segment_ordered(segment), plan.segment_may_skip(segment))
        window_in, window_out = self.windows[segment], self.windows[segment + 1]
        group: list[Any] = []
        seq = 0
        released: list[Any] = []
        try:
            for batch in self.channels[index]:
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
                    sent = window_out.acquire(len(groups)) and self._send_chunks(index + 1, out)
                    if not sent:
                        break
            else:
                if group and window_out.acquire(1):
                    self._send_chunks(index + 1, Batch(seq, [group]))
        except BaseException as e:
            self._fail(e, self._where(index, 0))
        finally:
            self._worker_done(index)

    # ----------------------------------------------------------------- the caller's side

    def released(self, progress: Progress | None = None) -> Generator[list[Any], None, None]:
        """Starts the run and yields the results as the final reorder point releases them, a
        list at a time; stops and cleans up however it is left."""
        segment = len(self.windows) - 1
        reorder = Reorderer(self.plan.segment_ordered(segment), self.plan.segment_may_skip(segment))
        window = self.windows[segment]
        out_ch = self.channels[-1]
        finished = False
        interrupted = False
        closing = False
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
                    _supervise(self)
                    next_check = perf_counter() + SUPERVISE_EVERY
                if batch is None:
                    continue
                if self._stopped:
                    break
                released = []
                reorder.push_batch(batch, released)
                window.completed_to(reorder.completed)
                if progress is not None:
                    progress(self.windows[0].completed)
                if released:
                    yield released
            finished = True
        except KeyboardInterrupt:
            interrupted = True
            _interrupt.note_ctrl_c()
            raise
        except GeneratorExit:
            closing = True
            raise
        finally:
            if not finished:
                # Closed (or failed) while the caller was inside the list yielded last: what it
                # had not taken of it is dropped, so a closed Results gives nothing more.
                released.clear()
            if self.tasks.on_own_thread():
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
                if interrupted or self.ctx.expired:
                    self.tasks.join(self._not_waited_for, ABANDON_GRACE)
                else:
                    _join(self, closing)
        if self._error is not None:
            raise self._error
        if self.ctx.cancelled and self._stopped:
            raise self.ctx.error()
        self.ctx.cancel("the run finished")


def _join(run: Run, closing: bool) -> None:
    """Waits for the run's tasks (but a stopped input reader blocked in ``next()``) as the
    run ends or is closed (``closing``). Items of stage code that does not see the stop can
    make that long: the wait then says what it waits for (``_interrupt.Notice``), and a
    Ctrl-C gives them up (they finish in the background, and the exit does not wait for
    them either) and goes on to the caller as the ``KeyboardInterrupt``. But not from the
    finalizer of results dropped unclosed (a bare ``for`` loop left by ``break`` or an
    exception), which no caller would get: there the Ctrl-C only stops the wait."""

    def what() -> str | None:
        left = run.tasks.waited_for() - run._not_waited_for()
        items = run.waiting_for(left)
        return _interrupt.describe(items, len(left) - sum(items.values()))

    notice = _interrupt.Notice(what, "stop waiting")
    try:
        while not run.tasks.join(run._not_waited_for, SUPERVISE_EVERY):
            notice.tick()
    except KeyboardInterrupt as e:
        run.tasks.give_up()
        _interrupt.note_ctrl_c()
        if closing and not _interrupt.close_reaches_caller():
            return  # finalized: Python would print the exception and drop it
        e.__context__ = run._error  # not the GeneratorExit of a close; the error, if any
        raise


def _supervise(run: Run) -> None:
    """Checks the run's deadline and each in-hand item's timeout (for the runners that do
    not time items themselves); sends what a stalled input left in the feeder's hands."""
    if run.ctx.cancelled:  # also fires a passed deadline
        return
    run.feeder.flush_stalled()
    now = perf_counter()
    for index, step in enumerate(run.plan.steps):
        limit = step.timeout
        if limit is None or run.sizers[index].traits.times_items:
            continue
        for w, slot in enumerate(run.slots[index]):
            key = slot.key()
            if key is not None and now - slot.since > limit:
                run.tasks.abandon(run.task_ids[index][w])
                run._fail(
                    ItemTimeout(
                        f"an item took longer than timeout={limit} s; the thread running "
                        "it cannot be stopped and finishes in the background"
                    ),
                    run._where(index, w, slot),
                )
                return
