"""The Dask backend: a plan's steps run as tasks on Dask's distributed scheduler, with the local
backend's semantics (order, errors, cancellation, bounded in-flight work).

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

Everything on the client happens in the caller's thread (:meth:`_DaskRun.released`), but reading
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
import re
import socket
import threading
import uuid
from collections.abc import Generator
from time import monotonic, perf_counter
from typing import TYPE_CHECKING, Any

from . import _runtime
from ._backend import Progress, Source, register
from ._batch import Batch, Key
from ._context import Context, _current
from ._core import Channel
from ._dask_tasks import Chunk, Job, TaskFailed, end_run, load_step, pack_functions, run_step
from ._errors import ChannelClosed, WorkerCrashed
from ._feeder import Feeder
from ._ordering import Reorderer, Window
from ._plan import Plan
from ._pool import default_pool
from ._remote import rebuild
from ._sizing import CHUNK_BYTES, MAX_CHUNK, QUEUE_SECONDS, Sizer, Traits
from ._tasks import Tasks

if TYPE_CHECKING:
    from distributed import Client, Future, LocalCluster

__all__ = ["TRAITS", "DaskBackend"]

# A Dask task costs ~1 ms of scheduling: a chunk should take a worker ~50 ms (2%), more over a
# long input of known length (``_sizing.GROWTH``). A step's timeout is watched on the worker.
TRAITS = Traits(batch_seconds=0.05, grows=True, one_by_one=False, times_items=True)
SUPERVISE_EVERY = 0.1  # how often the caller checks the deadline and a stalled input
WINDOW_BATCHES = 2  # the in-flight bound of a segment, in chunks per worker and queue slot
# Tasks of a step in flight per lane: one running, and one queued behind it once the segment's
# items are known to be quick (``Sizer.quick``: a queued task then waits 0.1 s at most, as a
# batch queued in a local worker process does); else one.
LANE_DEPTH = 2
ABANDON_GRACE = 0.1  # after Ctrl-C or a deadline, how long to wait for the feeder


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise ImportError(
            "the Dask backend needs Dask's distributed scheduler: pip install 'pipeflow[dask]' "
            "(or dask[distributed])"
        ) from e
    return distributed


class DaskBackend:
    """Runs a pipeline's steps as tasks on a Dask cluster, with the semantics of the local
    backend (see docs/dask.md).

    Args:
        client: a ``distributed.Client`` to run on (it stays open after the run).
        address: the address of a running Dask scheduler (``"tcp://host:8786"``) to connect
            to; an unreachable one fails the run at once, naming it.
        n_workers: with neither, the worker processes of the ``LocalCluster`` this backend
            starts (default: Dask's, one per core), each with one thread.
        dashboard: with neither, whether that cluster serves Dask's dashboard (False), or
            the address it serves it on (``":8787"``).
        connect_timeout: seconds to wait for the scheduler at ``address``.

    With neither ``client`` nor ``address``, a run uses the current Dask client if there is one
    (as ``dask.compute`` does: the last ``Client`` made, or that of a ``with Client():``
    block); else it starts a ``LocalCluster`` of worker processes for the run and closes it
    after. Used as a context manager (or after :meth:`start`), the backend keeps what it
    connected or started for every run until :meth:`close`.

    Example:
        >>> import pipeflow as pf
        >>> backend = pf.DaskBackend(address="tcp://127.0.0.1:8786")  # doctest: +SKIP
        >>> pf.Pipeline().stage(abs).run([-1, 2], backend=backend)  # doctest: +SKIP
        [1, 2]
        >>> with pf.DaskBackend(n_workers=2) as backend:  # doctest: +SKIP
        ...     pf.Pipeline().stage(abs).run([-3], backend=backend)
        [3]
    """

    name = "dask"

    def __init__(
        self,
        client: Client | None = None,
        address: str | None = None,
        *,
        n_workers: int | None = None,
        dashboard: bool | str = False,
        connect_timeout: float = 10.0,
    ) -> None:
        if client is not None and address is not None:
            raise TypeError("give DaskBackend a client or an address, not both")
        if client is not None and not isinstance(client, _distributed().Client):
            raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string such as 'tcp://host:8786', got {address!r}")
        if n_workers is not None and (
            isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1
        ):
            raise ValueError(f"n_workers must be an int >= 1 or None, got {n_workers!r}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, int | float):
            raise TypeError(f"connect_timeout must be a number of seconds, got {connect_timeout!r}")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.client = client
        self.address = address
        self.n_workers = n_workers
        self.dashboard = dashboard
        self.connect_timeout = float(connect_timeout)
        self._kept: tuple[Client, LocalCluster | None] | None = None  # start() made them
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = self.address or (self.client and self.client.scheduler.address) or "local"
        return f"<pipeflow.DaskBackend {where}>"

    # ----------------------------------------------------------------- what a run runs on

    def start(self) -> DaskBackend:
        """Connects (``address``) or starts the ``LocalCluster`` now, and keeps it for every
        run until :meth:`close`; a given ``client`` is used as it is. Returns the backend."""
        with self._lock:
            if self.client is None and self._kept is None:
                self._kept = self._open()
        return self

    def close(self) -> None:
        """Closes what :meth:`start` connected or started (never a client it was given)."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            _close(*kept)

    def __enter__(self) -> DaskBackend:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _check_reachable(self) -> None:
        """Fails at once, naming the address, if nothing listens there (a refused connection
        fails now, not after Dask's retries until its connect timeout)."""
        if self.address is None:
            return
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            scheme, location = parse_address(self.address)
            host, port = parse_host_port(location)
        except Exception as e:
            raise ValueError(f"not a Dask scheduler address: {self.address!r} ({e})") from None
        if scheme not in ("tcp", "tls") or port is None:
            return  # another transport: Dask's own connect says what went wrong
        try:
            with socket.create_connection((host, port), timeout=self.connect_timeout):
                pass
        except OSError as e:
            raise ConnectionError(
                f"the Dask scheduler at {self.address} cannot be reached: {e}"
            ) from None

    def _open(self) -> tuple[Client, LocalCluster | None]:
        """A client to run on, and the cluster it started (None: not ours to close)."""
        distributed = _distributed()
        if self.address is not None:
            self._check_reachable()
            try:
                client = distributed.Client(
                    self.address, timeout=self.connect_timeout, set_as_default=False
                )
            except OSError as e:
                raise ConnectionError(
                    f"could not connect to the Dask scheduler at {self.address}: {e}"
                ) from e
            return client, None
        dashboard = None if self.dashboard is False else self.dashboard
        if dashboard is True:
            dashboard = ":8787"
        cluster = distributed.LocalCluster(
            n_workers=self.n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard,
            # Without a dashboard the scheduler still serves HTTP (health, metrics): on a port
            # of its own, not 8787 (which another cluster may hold: a warning, then another).
            scheduler_kwargs={} if dashboard is not None else {"dashboard_address": ":0"},
        )
        try:
            client = distributed.Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        return client, cluster

    def _acquire(self) -> tuple[Client, tuple[Client, LocalCluster | None] | None]:
        """The client of a run, and what the run opened for itself (closed after it)."""
        if self.client is not None:
            return self.client, None
        with self._lock:
            kept = self._kept
        if kept is not None:
            return kept[0], None
        if self.address is None:
            try:
                return _distributed().default_client(), None
            except ValueError:
                pass  # no current client: a cluster for this run
        opened = self._open()
        return opened[0], opened

    # ----------------------------------------------------------------- the Backend protocol

    def stream(
        self, plan: Plan, source: Source, ctx: Context, progress: Progress | None
    ) -> Generator[list[Any], None, None]:
        _distributed()
        if self._kept is None and self.client is None:
            self._check_reachable()
        try:
            steps, functions = pack_functions(plan.steps)
        except Exception as e:
            raise TypeError(
                f"a step's function (or init) could not be pickled to send to Dask: {e}; define "
                "it at the top level of a module the workers can import, or make what it "
                "refers to picklable"
            ) from e
        job = (steps, functions)
        return self._released(plan, source, ctx, progress, job)

    def _released(
        self,
        plan: Plan,
        source: Source,
        ctx: Context,
        progress: Progress | None,
        job: tuple[Any, bytes],
    ) -> Generator[list[Any], None, None]:
        try:
            client, opened = self._acquire()
        except BaseException as e:
            ctx.cancel(f"the run raised {type(e).__name__}")
            raise
        try:
            yield from _DaskRun(client, plan, source, ctx, job).released(progress)
        finally:
            if opened is not None:
                _close(*opened)


register("dask", DaskBackend)


def _close(client: Client, cluster: LocalCluster | None) -> None:
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _key_name(name: str) -> str:
    """A step's name as part of a Dask key (the dashboard groups tasks by their prefix)."""
    return re.sub(r"[^0-9A-Za-z_]+", "_", name).strip("_") or "step"


class _Chunk:
    """A chunk of a segment on its way through the segment's steps (see the module's doc)."""

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


class _Segment:
    """The client's side of one segment: its steps, source, sizing, window and reorder point."""

    def __init__(self, run: _DaskRun, index: int) -> None:
        plan = run.plan
        self.index = index
        self.steps = plan.segment_steps(index)
        self.end = plan.batchers()[index] if index < len(plan.batchers()) else None
        first = plan.steps[self.steps[0]] if self.steps else None
        grows = index == 0 and run.total is not None
        self.sizer = Sizer(first, TRAITS, grows=grows) if first is not None else None
        self.window = Window(self._limit(plan), run.stopping)
        self.reorder = Reorderer(plan.segment_ordered(index), plan.segment_may_skip(index))
        self.inbox: list[Batch] = []  # a later segment's source: the groups made so far
        self.waiting: list[list[_Chunk]] = [[] for _ in self.steps]  # per position: at it
        self.in_flight = 0  # chunks between the source and the reorder point
        self.source_done = False
        self.done = False
        self.group: list[Any] = []  # the batch step ending it: the group being filled
        self.groups_made = 0

    def _limit(self, plan: Plan) -> Any:
        """The local backend's window: a few chunks per worker and queue slot, of the size the
        segment asks for now (one chunk per worker while the size is still ramping up)."""
        steps = [plan.steps[i] for i in self.steps]
        slots = max(1, sum(s.workers + s.capacity for s in steps))
        sizer = self.sizer
        if sizer is None:
            return lambda: WINDOW_BATCHES * slots * MAX_CHUNK
        workers = steps[0].workers

        def limit() -> int:
            size = sizer.chunk()
            if 2 * sizer.largest < size:
                return workers * size
            return WINDOW_BATCHES * slots * size

        return limit


class _DaskRun:
    """One run of a plan on a Dask client. :meth:`released` is the caller's side."""

    def __init__(
        self, client: Client, plan: Plan, source: Source, ctx: Context, job: tuple[Any, bytes]
    ) -> None:
        distributed = _distributed()
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
        self.segments = [_Segment(self, k) for k in range(plan.segments)]
        self.pending = [0] * len(plan.steps)  # per step: its tasks submitted, not finished
        self.tasks_submitted = [0] * len(plan.steps)
        # Per step, ``workers`` lanes: each a chain of its pending tasks (see _submit).
        self.lanes: list[list[list[Future]]] = [[[] for _ in range(s.workers)] for s in plan.steps]
        self.lane_of: dict[str, int] = {}  # pending task's key -> its lane
        self.submitted_at: dict[str, float] = {}  # pending task's key -> when
        self.futures: dict[str, tuple[Future, _Chunk, int]] = {}  # key -> (future, chunk, pos)
        self.finished: list[tuple[Future, _Chunk]] = []  # segment ends to gather
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
            items if source.total is not None else _until_stopped(items, self._stop_flag),
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
        """Records the first error and cancels the run; later errors are dropped."""
        if isinstance(error, StopIteration | StopAsyncIteration):
            wrapped = RuntimeError(f"{type(error).__name__} raised in {where}")
            wrapped.__cause__ = error
            error = wrapped
        with self._lock:
            if self._error is not None:
                return
            self._error = error
        error.add_note(f"pipeflow: raised in {where}")
        self.ctx.cancel(f"{where} raised {type(error).__name__}: {error}")

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
            self._stop_everything(interrupted, finished)
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
        self._gather()
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

    def _room(self, segment: _Segment, position: int) -> bool:
        """Whether the step at ``position`` of ``segment`` may take one more chunk."""
        index = segment.steps[position]
        step = self.plan.steps[index]
        if self._lane(segment, index, position) is None:
            return False
        if position + 1 < len(segment.steps):
            after = self.plan.steps[segment.steps[position + 1]]
            bound = LANE_DEPTH * step.workers + max(1, after.capacity)
            return len(segment.waiting[position]) < bound
        return True

    def _lane(self, segment: _Segment, index: int, position: int) -> int | None:
        """The lane of step ``index`` the next task goes to: an idle one; else, for quick
        items, the one whose task was submitted last, if that was under ``QUEUE_SECONDS`` ago
        (not behind a task that turns out slow); None: the step has no room. Only a segment's
        first step queues tasks in its lanes: its tasks take their items from the client, so
        waiting for the one before (whose result Dask then keeps where it is) moves no data;
        a later step's task is already queued behind its chunk's previous step."""
        lanes = self.lanes[index]
        idle = next((k for k, lane in enumerate(lanes) if not lane), None)
        quick = segment.sizer is not None and segment.sizer.quick()
        if idle is not None or position > 0 or not quick:
            return idle
        now = perf_counter()
        best, newest = None, now - QUEUE_SECONDS
        for k, lane in enumerate(lanes):
            if len(lane) < LANE_DEPTH:
                since = self.submitted_at[lane[-1].key]
                if since > newest:
                    best, newest = k, since
        return best

    def _advance(self, segment: _Segment) -> None:
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
            chunk = _Chunk(segment.index, next(self._numbers), batch)
            segment.in_flight += 1
            if not segment.steps:
                self._arrived(segment, chunk, Chunk(batch.keys, batch.values))
                continue
            self._submit(segment, chunk, 0)

    def _take(self, segment: _Segment) -> Batch | None:
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
        inbox = segment.inbox
        if not inbox:
            if self.segments[segment.index - 1].done:
                segment.source_done = True
            return None
        head = inbox[0]
        size = segment.sizer.chunk() if segment.sizer is not None else MAX_CHUNK
        piece = head if len(head) <= size else head.piece(0, size)
        if not segment.window.try_acquire(len(piece)):
            return None
        if piece is head:
            inbox.pop(0)
        else:
            inbox[0] = head.piece(size, len(head))
        return piece

    def _submit(self, segment: _Segment, chunk: _Chunk, position: int) -> None:
        index = segment.steps[position]
        step = self.plan.steps[index]
        if position == 0:
            argument = chunk.source
            if _sizeof(argument) > CHUNK_BYTES:  # large items go out of the task's graph
                (argument,) = self.client.scatter([argument], hash=False)
            chunk.source = argument
        else:
            argument = chunk.future
            if chunk.done:  # the new task holds it on the cluster now
                assert chunk.future is not None
                del self.futures[chunk.future.key]
        key = f"pipeflow-{_key_name(step.name)}-{index}-{self.run_id}-{chunk.number}"
        # A lane is one of the step's ``workers``: its next task waits for the one before it
        # (given as an argument it ignores), on the scheduler, so that a Dask worker done with
        # one starts the next at once, without a round trip to the client; and no more than
        # ``workers`` of the step's tasks ever run at once.
        lanes = self.lanes[index]
        lane = self._lane(segment, index, position)
        assert lane is not None  # _room said so
        before = lanes[lane][-1:]
        try:
            future = self.client.submit(
                run_step, self.job, index, argument, *before, key=key, pure=False, priority=index
            )
        except Exception as e:  # the items do not pickle (Dask serializes them here)
            where = self.plan.where(index, "dask", chunk.first_key())
            self._fail(e, f"{where} (its task's items could not be pickled to send to Dask)")
            return
        lanes[lane].append(future)
        self.lane_of[key] = lane
        self.submitted_at[key] = perf_counter()
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
            self.submitted_at.pop(future.key, None)
            lane = self.lane_of.pop(future.key, None)
            if lane is not None:
                self.lanes[index][lane].remove(future)
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

    def _gather(self) -> None:
        """Brings the results of the chunks done with their segment to the client."""
        if not self.finished:
            return
        finished, self.finished = self.finished, []
        try:
            chunks = self.client.gather([f for f, _ in finished])
        except Exception as e:  # say which (one at a time): lost, or its result cannot travel
            for future, chunk in finished:
                index = self.segments[chunk.segment].steps[-1]
                if future.status != "finished":
                    self._failed(future, chunk, index)
                    return
                try:
                    future.result()
                except Exception as error:
                    where = self.plan.where(index, "dask", chunk.first_key())
                    self._fail(error, f"{where} (its task's results could not come back)")
                    return
            self._fail(e, "the Dask backend's client (gathering results)")
            return
        for (future, chunk), data in zip(finished, chunks, strict=True):
            del self.futures[future.key]
            self._arrived(self.segments[chunk.segment], chunk, data)

    def _arrived(self, segment: _Segment, chunk: _Chunk, data: Chunk) -> None:
        """A chunk done with its segment: measured, reordered, grouped or released."""
        keys, values, stats = data.keys, data.values, data.stats
        segment.in_flight -= 1
        if segment.sizer is not None and stats:
            seconds = max(s[1] for s in stats)
            nbytes = max(s[3] for s in stats)
            segment.sizer.measure(seconds, chunk.count, nbytes)
        released: list[Any] = []
        segment.reorder.push_batch(Batch(keys, values), released)
        segment.window.completed_to(segment.reorder.completed)
        if segment.end is None:
            self.results.extend(released)
            return
        size = self.plan.steps[segment.end].size
        groups = []
        for value in released:
            segment.group.append(value)
            if len(segment.group) == size:
                groups.append(segment.group)
                segment.group = []
        if groups:
            self.segments[segment.index + 1].inbox.append(Batch(segment.groups_made, groups))
            segment.groups_made += len(groups)

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
            self._load_unstarted(segment)
            segment.done = True
            if segment.end is not None and segment.group:
                nxt = self.segments[segment.index + 1]
                nxt.inbox.append(Batch(segment.groups_made, [segment.group]))
                segment.group = []
            self._wake()

    def _load_unstarted(self, segment: _Segment) -> None:
        """A step with an ``init`` that ran no task still says whether it loads."""
        unstarted = [
            i
            for i in segment.steps
            if self.tasks_submitted[i] == 0 and self.plan.steps[i].init is not None
        ]
        if not unstarted or self.job is None:
            return
        futures = [
            self.client.submit(
                load_step, self.job, i, pure=False, key=f"pipeflow-init-{i}-{self.run_id}"
            )
            for i in unstarted
        ]
        for future in futures:
            self.futures[future.key] = (future, _Chunk(segment.index, -1, Batch(0, [])), 0)
        self.client.gather(futures, errors="skip")
        for i, future in zip(unstarted, futures, strict=True):
            if future.status != "finished":
                self._failed(future, None, i)
                return  # the futures are cancelled with the rest
            del self.futures[future.key]

    # ----------------------------------------------------------------- errors

    def _failed(self, future: Future, chunk: _Chunk | None, index: int) -> None:
        """Fails the run with the error of a task of step ``index`` over ``chunk``."""
        error = future.exception() if future.status == "error" else None
        key = chunk.first_key() if chunk is not None and chunk.count else None
        if isinstance(error, TaskFailed):
            worker = f"dask worker {error.worker}"
            where = self.plan.where(error.step, worker, error.key, error.shown)
            self._fail(rebuild(error.exported), where)
            return
        where = self.plan.where(index, "dask", key)
        if isinstance(error, self.distributed.KilledWorker):
            entry = self.futures.get(error.task)  # the task that died (its lane's next failed)
            if entry is not None:
                _, chunk, position = entry
                index = self.segments[chunk.segment].steps[position]
                where = self.plan.where(index, "dask", chunk.first_key() if chunk.count else None)
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
            self._fail(crash, where)
            return
        if error is None:
            error = RuntimeError(
                f"the Dask task of {where} was {future.status} (by another client, or a lost "
                "scheduler?)"
            )
        self._fail(error, where)

    # ----------------------------------------------------------------- tear-down

    def _stop_everything(self, interrupted: bool, finished: bool) -> None:
        """Cancels every future of the run, tells the workers it is over, waits for the
        feeder; the same however the run ended."""
        self._abort()
        if not finished:
            self.ctx.cancel("the caller stopped consuming results")
        if self._on_its_own_thread():
            # Finalized by the garbage collector on the feeder's or Dask's own thread: it must
            # not wait for itself. Another thread cleans up.
            default_pool().submit(self._release_cluster)
            return
        self._release_cluster()
        grace = ABANDON_GRACE if interrupted or self.ctx.expired else None
        self.tasks.join(lambda: {self._feeder_id} if self.stalled else set(), grace)

    def _on_its_own_thread(self) -> bool:
        """Whether this is the feeder's thread, or the Dask client's event loop's."""
        if self.tasks.on_own_thread():
            return True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is getattr(self.client.loop, "asyncio_loop", None)

    def _release_cluster(self) -> None:
        """Cancels the run's futures and drops every reference to them: Dask forgets a task
        once no client holds its future (a finished one, only then).

        One future at a time, the most downstream first (later steps, then later chunks):
        Dask's cancel also cancels a task's dependents, and asserts that each is wanted by a
        client, which a task this run dropped (its chunk moved on) is not; cancelled from the
        leaves up, such a task is forgotten before the one it depends on is cancelled. The job
        is dropped, not cancelled: it is data every task depends on."""
        held = sorted(self.futures.values(), key=lambda e: (e[2], e[1].number), reverse=True)
        futures = [f for f, _, _ in held]
        del held
        self.futures.clear()
        self.finished.clear()
        self.lanes = [[[] for _ in lanes] for lanes in self.lanes]
        self.lane_of.clear()
        self.submitted_at.clear()
        for segment in self.segments:
            segment.waiting = [[] for _ in segment.steps]
        self.ac.clear()
        job, self.job = self.job, None
        client = self.client
        if client.status != "running":
            return
        try:
            for future in futures:
                client.cancel([future], reason="the pipeflow run stopped")
            del futures
            if job is not None:
                del job
                client.run(end_run, self.run_id, on_error="ignore")
        except Exception:  # the cluster is gone: nothing is left on it to cancel
            pass


def _until_stopped(source: Any, stop: list[bool]) -> Any:
    """``source``, ending as soon as ``stop[0]`` is set: no ``next()`` after a stop."""
    for value in source:
        yield value
        if stop[0]:
            return


def _sizeof(value: Any) -> int:
    from dask.sizeof import sizeof

    try:
        return int(sizeof(value))
    except Exception:
        return 0
