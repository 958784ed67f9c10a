"""One run on the Dask backend: the client's side of it, in the caller's thread
(:class:`DaskRun`, with the functions beside it that gather results, name a failed task's error
and tear the run down).

::

    items ─► feeder ─► feed ─► [step 0 task] ─► [step 1 task] ─► ... ─► gather ─► reorder ─► caller
            (a pool   (a bounded  futures on the cluster: each task      (the caller's thread:
             thread)   channel)   takes the previous one's future:       results, progress; a
                                  the data stays on the workers)         batch step regroups here
                                                                         and sends the groups out)

A *chunk* is a batch of a segment's items (``_plan``: the steps between two batch steps) that
travels through the segment's steps as one Dask task per step (``_dask_tasks.run_step``). The
input is read lazily by the local backend's ``Feeder``, in chunks sized by ``_sizing`` from the
time the segment's slowest step took per item (so ~1 ms of per-task overhead on Dask stays ~2%
of a task). Each step's task for a chunk is submitted as soon as the step has room, with the
previous step's *future* as its argument: Dask runs it where that result is, and nothing comes
back to the client until the end of the segment (the caller's results, or a batch step's
regrouping). Bounds: at most ``workers`` tasks of a step in flight (submitted, not finished); at
most ``capacity`` of its finished chunks waiting for the next step; and, per segment, the
local backend's window (a few chunks per worker and queue slot) between the source and the
reorder point. So the input never runs ahead of the cluster, and client memory stays flat.

Everything on the client happens in the caller's thread (:meth:`DaskRun.released`), but reading
the input (a pool thread: an input may block in ``next()``). It waits on the condition that
Dask's ``as_completed`` notifies when a future finishes; the feeder and a cancelled context
notify it too. The first error (a stage's, rebuilt from ``_dask_tasks.TaskFailed`` as the same
type with the worker's frames; ``WorkerCrashed`` from Dask's ``KilledWorker``; the input's)
cancels the run's context; the run then cancels every future it holds (Dask forgets them: none
is left on the scheduler), tells every worker the run is over (``end_run``: stage code's
``current_context()`` is cancelled and the per-item loops stop) and re-raises the error.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Generator
from time import monotonic
from typing import TYPE_CHECKING, Any

from . import _output, _runtime
from ._backend import Progress, Source, fail_run
from ._batch import Batch
from ._context import Context, _current
from ._core import Channel
from ._dask_chunks import LANE_DEPTH, Flight, Lanes, Segment, key_name, sizeof, until_stopped
from ._dask_output import emit as emit_output
from ._dask_tasks import Chunk, Job, TaskFailed, end_run, load_step, run_step
from ._errors import ChannelClosed, WorkerCrashed
from ._feeder import Feeder
from ._plan import Plan
from ._pool import default_pool
from ._remote import rebuild
from ._sizing import CHUNK_BYTES
from ._tasks import Tasks

if TYPE_CHECKING:
    from distributed import Client, Future

__all__ = ["DaskRun"]

SUPERVISE_EVERY = 0.1  # how often the caller checks the deadline and a stalled input
ABANDON_GRACE = 0.1  # after Ctrl-C or a deadline, how long to wait for the feeder


class DaskRun:
    """One run of a plan on a Dask client. :meth:`released` is the caller's side."""

    def __init__(
        self, client: Client, plan: Plan, source: Source, ctx: Context, job: tuple[Any, bytes]
    ) -> None:
        import distributed

        self.distributed = distributed
        self.client = client
        self.plan = plan
        self.ctx = ctx
        self.total = source.total
        self.run_id = uuid.uuid4().hex[:12]
        self._job_parts = job
        self.job: Future | None = None
        self._stopped = False
        self._stop_flag = [False]
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self.segments = [
            Segment(plan, k, source.total, self.stopping) for k in range(plan.segments)
        ]
        self.pending = [0] * len(plan.steps)  # per step: its tasks submitted, not finished
        self.tasks_submitted = [0] * len(plan.steps)
        self.lanes = [Lanes(s.workers) for s in plan.steps]
        self.futures: dict[str, tuple[Future, Flight, int]] = {}  # key -> (future, chunk, pos)
        self.finished: list[tuple[Future, Flight]] = []  # segment ends to gather
        self.results: list[Any] = []  # released by the last segment, not yet yielded
        self._numbers = itertools.count()
        self._woken = False
        self.ac = distributed.as_completed(loop=client.loop)
        self.wake_cond: threading.Condition = self.ac.thread_condition
        items = source.items
        self.feed = Channel(2)
        self.tasks = Tasks(self._enter)
        self._feeder_id = -1
        first = self.segments[0].sizer
        self.feeder = Feeder(
            items if source.total is not None else until_stopped(items, self._stop_flag),
            source.total,
            first,
            self.segments[0].window,
            self.feed,
            self._send,
            self.stopping,
            self._fail,
        )

    # ----------------------------------------------------------------- threads meet here

    def stopping(self) -> bool:
        return self._stopped

    @property
    def stalled(self) -> bool:
        """Stopped, with the feeder blocked inside the input's ``next()`` (see ``_runtime``)."""
        return self._stopped and self.feeder.in_source

    @property
    def given_up(self) -> int:
        """How many of its tasks (the feeder) a Ctrl-C gave up still run (see ``_runtime``)."""
        return self.tasks.given_up_running()

    def waiting_for(self) -> dict[str, int]:
        """No thread-stage item runs in this process (see ``_runtime``)."""
        return {}

    def _enter(self) -> None:
        _current.set(self.ctx)

    def _wake(self) -> None:
        with self.wake_cond:
            self._woken = True
            self.wake_cond.notify_all()

    def _send(self, batch: Batch) -> bool:
        """The feeder's: a chunk of the input for the caller's thread to submit."""
        try:
            self.feed.send(batch)
        except ChannelClosed:
            return False
        self._wake()
        return True

    def _abort(self, _ctx: Context | None = None) -> None:
        """Stops the run (any thread): the caller's thread then cancels the futures."""
        self._stopped = True
        self._stop_flag[0] = True
        self.feed.close()
        for segment in self.segments:
            segment.window.wake()
        self._wake()

    def _fail(self, error: BaseException, where: str) -> None:
        """Records the first error and cancels the run (``_backend.fail_run``)."""
        fail_run(self, error, where)

    # ----------------------------------------------------------------- the caller's side

    def released(self, progress: Progress | None) -> Generator[list[Any], None, None]:
        """Starts the run and yields the results a list at a time; stops and cleans up
        however it is left."""
        finished = False
        interrupted = False
        out: list[Any] = []
        try:
            self._start()
            while not self._stopped:
                out = []
                self._step(out)
                if progress is not None:
                    progress(self.segments[0].window.completed)
                if out:
                    yield out
                    continue
                if self.segments[-1].done:
                    break
                self._wait()
            finished = not self._stopped
        except KeyboardInterrupt:
            interrupted = True
            raise
        except GeneratorExit:
            raise
        except BaseException as e:
            if self._error is None:
                self._fail(e, "the Dask backend's client")
        finally:
            out.clear()  # a closed Results gives nothing more
            stop_everything(self, interrupted, finished)
        if self._error is not None:
            raise self._error
        if not finished:
            raise self.ctx.error()
        self.ctx.cancel("the run finished")

    def _start(self) -> None:
        _runtime.track_run(self)
        self.ctx._on_cancel(self._abort)
        steps, functions = self._job_parts
        seconds_left = None
        if self.ctx.deadline is not None:
            seconds_left = max(0.0, self.ctx.deadline - monotonic())
        job = Job(
            self.run_id,
            steps,
            tuple(self.plan.may_skip),
            functions,
            seconds_left,
            _output.log_levels(),
        )
        if self.plan.steps:
            # Once to every worker: each task takes it as an argument (a future), not a copy.
            (self.job,) = self.client.scatter([job], broadcast=True, hash=False)
        self._feeder_id = self.tasks.submit(self.feeder.run)

    def _wait(self) -> None:
        """Until a future finishes, the feeder sends, the run stops, or a supervision is due."""
        with self.wake_cond:
            if not self._woken and not self.ac.has_ready():
                self.wake_cond.wait(SUPERVISE_EVERY)
            self._woken = False
        if self.ctx.cancelled:  # also fires a passed deadline (and so _abort)
            return
        self.feeder.flush_stalled()
        if self.client.status not in ("running", "connecting", "newly-created"):
            raise ConnectionError(
                f"the Dask client lost its scheduler (client status {self.client.status!r})"
            )

    def _step(self, out: list[Any]) -> None:
        """Takes what finished, then submits what has room; appends released results."""
        self._collect()
        if self._stopped:
            return
        for segment in reversed(self.segments):  # downstream first: it frees room upstream
            self._advance(segment)
            if self._stopped:
                return
        # After submitting: the workers compute while the results of the last come over.
        gather(self)
        if self._stopped:
            return
        for segment in reversed(self.segments):  # what the results freed (a batch step's)
            self._advance(segment)
            if self._stopped:
                return
        self._check_done()
        out.extend(self.results)
        self.results.clear()

    # ----------------------------------------------------------------- submitting

    def _room(self, segment: Segment, position: int) -> bool:
        """Whether the step at ``position`` of ``segment`` may take one more chunk."""
        index = segment.steps[position]
        step = self.plan.steps[index]
        if self.lanes[index].pick(position == 0 and segment.quick()) is None:
            return False
        if position + 1 < len(segment.steps):
            after = self.plan.steps[segment.steps[position + 1]]
            bound = LANE_DEPTH * step.workers + max(1, after.capacity)
            return len(segment.waiting[position]) < bound
        return True

    def _advance(self, segment: Segment) -> None:
        """Moves the segment's chunks on to their next step, then takes new ones in."""
        for position in range(len(segment.steps) - 2, -1, -1):
            waiting = segment.waiting[position]
            while waiting and self._room(segment, position + 1) and not self._stopped:
                chunk = next((c for c in waiting if c.done), waiting[0])
                waiting.remove(chunk)
                self._submit(segment, chunk, position + 1)
        while not self._stopped:
            batch = self._take(segment)
            if batch is None:
                return
            chunk = Flight(segment.index, next(self._numbers), batch)
            segment.in_flight += 1
            if not segment.steps:
                self._arrived(segment, chunk, Chunk(batch.keys, batch.values))
                continue
            self._submit(segment, chunk, 0)

    def _take(self, segment: Segment) -> Batch | None:
        """The segment's next chunk from its source, if its first step has room."""
        if segment.source_done or (segment.steps and not self._room(segment, 0)):
            return None
        if segment.index == 0:
            try:
                ok, batch = self.feed.try_recv()
            except ChannelClosed:
                segment.source_done = True
                return None
            return batch if ok else None
        return segment.take_inbox(self.segments[segment.index - 1].done)

    def _submit(self, segment: Segment, chunk: Flight, position: int) -> None:
        index = segment.steps[position]
        step = self.plan.steps[index]
        if position == 0:
            argument = chunk.source
            if sizeof(argument) > CHUNK_BYTES:  # large items go out of the task's graph
                (argument,) = self.client.scatter([argument], hash=False)
            chunk.source = argument
        else:
            argument = chunk.future
            if chunk.done:  # the new task holds it on the cluster now
                assert chunk.future is not None
                del self.futures[chunk.future.key]
        key = f"pipeflow-{key_name(step.name)}-{index}-{self.run_id}-{chunk.number}"
        # A lane is one of the step's ``workers``: its next task waits for the one before it
        # (given as an argument it ignores), on the scheduler, so that a Dask worker done with
        # one starts the next at once, without a round trip to the client; and no more than
        # ``workers`` of the step's tasks ever run at once.
        lanes = self.lanes[index]
        lane = lanes.pick(position == 0 and segment.quick())
        assert lane is not None  # _room said so
        before = lanes.before(lane)
        try:
            future = self.client.submit(
                run_step, self.job, index, argument, *before, key=key, pure=False, priority=index
            )
        except Exception as e:  # the items do not pickle (Dask serializes them here)
            where = self.plan.where(index, "dask", chunk.first_key())
            self._fail(e, f"{where} (its task's items could not be pickled to send to Dask)")
            return
        lanes.add(lane, future)
        self.futures[key] = (future, chunk, position)
        self.pending[index] += 1
        self.tasks_submitted[index] += 1
        chunk.at, chunk.future, chunk.done = position, future, False
        if position + 1 < len(segment.steps):
            segment.waiting[position].append(chunk)
        self.ac.add(future)

    # ----------------------------------------------------------------- taking results

    def _collect(self) -> None:
        """Takes the futures that finished: frees their step's room, or fails the run."""
        for future in self.ac.next_batch(block=False):
            entry = self.futures.get(future.key)
            if entry is None:
                continue
            _, chunk, position = entry
            segment = self.segments[chunk.segment]
            index = segment.steps[position]
            self.pending[index] -= 1
            self.lanes[index].remove(future)
            if future.status != "finished":
                self._failed(future, chunk, index)
                return
            if position == 0 and not isinstance(chunk.source, Chunk):
                chunk.source = None  # a scattered input: released once step 0 has it
            if chunk.future is future:
                chunk.done = True
                if position + 1 == len(segment.steps):
                    self.finished.append((future, chunk))
                    continue
            else:
                del self.futures[future.key]  # the next step has it (on the cluster)

    def _arrived(self, segment: Segment, chunk: Flight, data: Chunk) -> None:
        """A chunk done with its segment: its results, or the next segment's groups."""
        released, groups = segment.arrived(chunk, data)
        self.results.extend(released)
        if groups is not None:
            self.segments[segment.index + 1].inbox.append(groups)

    def _check_done(self) -> None:
        """Marks the segments that are done (source exhausted, nothing in flight), flushing
        a batch step's last, partial group into the next segment."""
        for segment in self.segments:
            if segment.done:
                continue
            if not (segment.source_done and segment.in_flight == 0):
                return
            if segment.index > 0 and segment.inbox:
                return
            load_unstarted(self, segment)
            segment.done = True
            last = segment.last_group()
            if last is not None:
                self.segments[segment.index + 1].inbox.append(last)
            self._wake()

    # ----------------------------------------------------------------- errors

    def output_label(self, index: int, worker: str) -> tuple[str, str]:
        """The worker label and stage name that a record printed or logged by step
        ``index``'s code on Dask ``worker`` carries (``_output.forward``)."""
        name = self.plan.steps[index].name
        return f"stage {index} ({name!r}, dask worker {worker})", name

    def _failed(self, future: Future, chunk: Flight | None, index: int) -> None:
        """Fails the run with the error of a task of step ``index`` over ``chunk``."""
        self._fail(*task_error(self, future, chunk, index))


def task_error(
    run: DaskRun, future: Future, chunk: Flight | None, index: int
) -> tuple[BaseException, str]:
    """The error of a failed task of step ``index`` over ``chunk``, as the caller gets it (a
    stage's own, rebuilt; ``WorkerCrashed`` for Dask's ``KilledWorker``; Dask's), and where."""
    error = future.exception() if future.status == "error" else None
    key = chunk.first_key() if chunk is not None and chunk.count else None
    if isinstance(error, TaskFailed):
        emit_output(error.output, run.output_label)
        worker = f"dask worker {error.worker}"
        where = run.plan.where(error.step, worker, error.key, error.shown)
        return rebuild(error.exported), where
    where = run.plan.where(index, "dask", key)
    if isinstance(error, run.distributed.KilledWorker):
        entry = run.futures.get(error.task)  # the task that died (its lane's next failed)
        if entry is not None:
            _, chunk, position = entry
            index = run.segments[chunk.segment].steps[position]
            where = run.plan.where(index, "dask", chunk.first_key() if chunk.count else None)
        what = ""
        if chunk is not None and chunk.count > 1:
            what = f" (the first of the {chunk.count} items of its task)"
        crash = WorkerCrashed(
            f"Dask workers died while running {where}{what}: Dask ran the task on "
            f"{error.allowed_failures + 1} workers, and each died (the cluster's "
            "distributed.scheduler.allowed-failures is "
            f"{error.allowed_failures}); a segmentation fault or excessive memory use "
            "could do that: see the workers' logs"
        )
        crash.__cause__ = error
        return crash, where
    if error is None:
        error = RuntimeError(
            f"the Dask task of {where} was {future.status} (by another client, or a lost "
            "scheduler?)"
        )
    return error, where


def load_unstarted(run: DaskRun, segment: Segment) -> None:
    """A step with an ``init`` that ran no task still says whether it loads."""
    unstarted = [
        i
        for i in segment.steps
        if run.tasks_submitted[i] == 0 and run.plan.steps[i].init is not None
    ]
    if not unstarted or run.job is None:
        return
    futures = [
        run.client.submit(load_step, run.job, i, pure=False, key=f"pipeflow-init-{i}-{run.run_id}")
        for i in unstarted
    ]
    for future in futures:
        run.futures[future.key] = (future, Flight(segment.index, -1, Batch(0, [])), 0)
    run.client.gather(futures, errors="skip")
    for i, future in zip(unstarted, futures, strict=True):
        if future.status != "finished":
            run._failed(future, None, i)
            return  # the futures are cancelled with the rest
        emit_output(future.result(), run.output_label)
        del run.futures[future.key]


def on_its_own_thread(run: DaskRun) -> bool:
    """Whether this is the feeder's thread, or the Dask client's event loop's."""
    if run.tasks.on_own_thread():
        return True
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        return False
    return running is getattr(run.client.loop, "asyncio_loop", None)


def release_cluster(run: DaskRun) -> None:
    """Cancels the run's futures and drops every reference to them: Dask forgets a task
    once no client holds its future (a finished one, only then).

    One future at a time, the most downstream first (later steps, then later chunks):
    Dask's cancel also cancels a task's dependents, and asserts that each is wanted by a
    client, which a task this run dropped (its chunk moved on) is not; cancelled from the
    leaves up, such a task is forgotten before the one it depends on is cancelled. The job
    is dropped, not cancelled: it is data every task depends on."""
    held = sorted(run.futures.values(), key=lambda e: (e[2], e[1].number), reverse=True)
    futures = [f for f, _, _ in held]
    del held
    run.futures.clear()
    run.finished.clear()
    for lanes in run.lanes:
        lanes.clear()
    for segment in run.segments:
        segment.waiting = [[] for _ in segment.steps]
    run.ac.clear()
    job, run.job = run.job, None
    client = run.client
    if client.status != "running":
        return
    try:
        for future in futures:
            client.cancel([future], reason="the pipeflow run stopped")
        del futures
        if job is not None:
            del job
            client.run(end_run, run.run_id, on_error="ignore")
    except Exception:  # the cluster is gone: nothing is left on it to cancel
        pass


def gather(run: DaskRun) -> None:
    """Brings the results of the chunks done with their segment to the client."""
    if not run.finished:
        return
    finished, run.finished = run.finished, []
    try:
        chunks = run.client.gather([f for f, _ in finished])
    except Exception as e:  # say which (one at a time): lost, or its result cannot travel
        for future, chunk in finished:
            index = run.segments[chunk.segment].steps[-1]
            if future.status != "finished":
                run._failed(future, chunk, index)
                return
            try:
                future.result()
            except Exception as error:
                where = run.plan.where(index, "dask", chunk.first_key())
                run._fail(error, f"{where} (its task's results could not come back)")
                return
        run._fail(e, "the Dask backend's client (gathering results)")
        return
    for (future, chunk), data in zip(finished, chunks, strict=True):
        del run.futures[future.key]
        emit_output(data.output, run.output_label)
        run._arrived(run.segments[chunk.segment], chunk, data)


def stop_everything(run: DaskRun, interrupted: bool, finished: bool) -> None:
    """Cancels every future of the run, tells the workers it is over, waits for the
    feeder; the same however the run ended."""
    run._abort()
    if not finished:
        run.ctx.cancel("the caller stopped consuming results")
    if on_its_own_thread(run):
        # Finalized by the garbage collector on the feeder's or Dask's own thread: it must
        # not wait for itself. Another thread cleans up.
        default_pool().submit(lambda: release_cluster(run))
        return
    release_cluster(run)
    grace = ABANDON_GRACE if interrupted or run.ctx.expired else None
    run.tasks.join(lambda: {run._feeder_id} if run.stalled else set(), grace)
