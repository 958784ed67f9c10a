"""What a Dask worker runs for the Dask backend (``_dask``): one step over one chunk of items, as
one Dask task (a leaf: a Dask worker imports this module and pipeflow's leaves, never the DSL
nor an engine).

A run ships a :class:`Job` once (scattered to every worker): the checked steps, their functions
and inits pickled once (``_shipping``, so tracebacks keep the user's file names), the run's id
and what was left of its deadline. Each task is :func:`run_step` ``(job, index, chunk)``, and
its result a chunk again, which stays on the worker where it was made until the next step's
task (given this task's future as its argument) or the client asks for it.

A :class:`Chunk` holds ``keys``, ``values`` and ``stats``: ``keys`` and ``values`` as in
``_batch.Batch`` (an int for a run of keys, else a list; ``SKIP`` for a value filtered out),
and ``stats``, one ``(step, seconds, items, nbytes)`` per step run on it so far: what the
client's batch sizing (``_sizing``) measures, which reaches the client with the segment's
results.

Per worker process and run, a :class:`_WorkerRun` holds the loaded functions, each step's
``init`` value (made once per process, under a lock: a Dask worker may run tasks in several
threads), the :class:`Context` stage code sees as ``current_context()`` and the stop flag the
per-item loops read (``_apply``). The client ends it with :func:`end_run`, broadcast to every
worker when the run is over: the context is cancelled, the flag set, and a task of that run that
arrives late stops at once. A stage's exception leaves the task as :class:`TaskFailed`, which
carries it exported with its frames (``_remote.export``), the step and the item's key and repr:
the client rebuilds it as the same type with the worker's traceback.
"""

from __future__ import annotations

import contextvars
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable
from time import perf_counter
from typing import Any, NamedTuple

from . import _state
from ._apply import apply_for, step_function
from ._batch import Batch, Key, Slot
from ._context import Context, _current
from ._dask_output import Kept
from ._dask_output import install as install_output
from ._dask_output import kept as kept_output
from ._errors import ItemTimeout
from ._output import Levels
from ._plan import Step
from ._remote import export

__all__ = [
    "Chunk",
    "Job",
    "TaskFailed",
    "end_run",
    "load_step",
    "pack_functions",
    "run_step",
    "worker_runs",
]

Stats = tuple[tuple[int, float, int, int], ...]


class Chunk:
    """Items on their way through a segment's steps (see the module's doc). An object, not a
    tuple: Dask walks every element of a task's tuple and list arguments looking for futures
    (at 8192 items a chunk, most of the client's time), and treats an object as one value."""

    __slots__ = ("keys", "output", "stats", "values")

    def __init__(self, keys: Any, values: list[Any], stats: Stats = (), output: Kept = ()) -> None:
        self.keys = keys
        self.values = values
        self.stats = stats
        self.output = output  # what stage code printed and logged (``_dask_output``)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Chunk, (self.keys, self.values, self.stats, self.output))


def _register_sizeof() -> None:
    """Dask's estimate of a chunk's size (for its memory accounting): its values'."""
    try:
        from dask.sizeof import sizeof
    except ImportError:  # pragma: no cover - the Dask backend needs dask
        return
    sizeof.register(Chunk)(lambda chunk: sizeof(chunk.values))


_register_sizeof()
ENDED_KEPT = 256  # runs ended on this worker that are still recognised (a late task stops)


class Job(NamedTuple):
    """One run, as every task of it is given it (scattered once to the workers)."""

    run_id: str
    steps: tuple[Step, ...]  # without their functions: those are in ``functions``
    may_skip: tuple[bool, ...]
    functions: bytes  # pickled list, per step: (function with its retries, init) or None
    seconds_left: float | None  # of the run's deadline, when the job was made
    levels: Levels | None = None  # the client's logging levels (``_output.log_levels``)


class TaskFailed(Exception):
    """A stage's exception on its way back to the client: ``step``, the item's ``key`` (None
    for an ``init``) and short repr, the exception exported with its frames, and the Dask
    worker that ran it; ``output``: what stage code printed and logged on the chunk until then."""

    def __init__(
        self,
        step: int,
        key: Key | None,
        shown: str | None,
        exported: bytes,
        worker: str,
        output: Kept = (),
    ) -> None:
        super().__init__(step, key, shown, exported, worker, output)
        self.step = step
        self.key = key
        self.shown = shown
        self.exported = exported
        self.worker = worker
        self.output = output

    def __str__(self) -> str:
        at = "in its init" if self.key is None else f"on the item with key {self.key!r}"
        return f"pipeflow: stage {self.step} raised {at} (on Dask worker {self.worker})"

    def __repr__(self) -> str:  # Dask's worker logs it: the bytes would be noise
        return f"TaskFailed({self})"


class _Watched:
    """``fn`` with a per-item ``timeout``: the item runs in a thread of its own and the task
    gives up on it past the timeout (a thread cannot be killed: it finishes in the background,
    as a thread stage's item does)."""

    def __init__(self, fn: Callable[[Any], Any], timeout: float) -> None:
        self.fn = fn
        self.timeout = timeout

    def __call__(self, value: Any) -> Any:
        box: list[tuple[bool, Any]] = []
        done = threading.Event()
        item_vars = contextvars.copy_context()  # worker_state() and current_context() too

        def item() -> None:
            try:
                box.append((True, item_vars.run(self.fn, value)))
            except BaseException as e:
                box.append((False, e))
            finally:
                done.set()

        threading.Thread(target=item, name="pipeflow-dask-item", daemon=True).start()
        if not done.wait(self.timeout):
            raise ItemTimeout(
                f"an item took longer than timeout={self.timeout} s; the Dask worker's thread "
                "running it cannot be stopped and finishes it in the background"
            )
        ok, result = box[0]
        if ok:
            return result
        raise result


class _WorkerRun:
    """One run's state in this worker process (see the module's doc)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.stop = [False]  # read between items by the per-item loops
        self.ctx = Context(timeout=job.seconds_left)
        self._loaded: list[Any] | None = None
        self._states: dict[int, Any] = {}
        self._lock = threading.Lock()

    def loaded(self, index: int) -> tuple[Callable[[Any], Any], Callable[[], Any] | None]:
        """Step ``index``'s function and init (the job's functions unpickled on first use)."""
        with self._lock:
            if self._loaded is None:
                self._loaded = pickle.loads(self.job.functions)
            fn, init = self._loaded[index]
        return fn, init

    def state(self, index: int) -> Any:
        """The value of step ``index``'s init in this process, made on first use (once)."""
        _, init = self.loaded(index)
        with self._lock:  # held while init runs: the other threads wait for its value
            if index not in self._states:
                self._states[index] = init() if init is not None else None
            return self._states[index]

    def end(self, reason: str) -> None:
        self.stop[0] = True
        self.ctx.cancel(reason)


_runs: dict[str, _WorkerRun] = {}
_ended: OrderedDict[str, None] = OrderedDict()
_runs_lock = threading.Lock()


def _worker_run(job: Job) -> _WorkerRun:
    with _runs_lock:
        run = _runs.get(job.run_id)
        if run is None:
            run = _WorkerRun(job)
            if job.run_id in _ended:  # a task that arrived after the run was over
                run.end("the run is over")
            else:
                _runs[job.run_id] = run
        return run


def end_run(run_id: str, reason: str = "the run is over") -> None:
    """Ends a run on this worker (the client broadcasts it when the run is over)."""
    with _runs_lock:
        run = _runs.pop(run_id, None)
        _ended[run_id] = None
        while len(_ended) > ENDED_KEPT:
            _ended.popitem(last=False)
    if run is not None:
        run.end(reason)


def worker_runs() -> list[str]:
    """The runs this worker holds state for (for tests: none once every run is over)."""
    with _runs_lock:
        return list(_runs)


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except Exception:  # not inside a Dask worker (a test calling a task directly)
        return "(not a Dask worker)"


def _failed(
    index: int, key: Key | None, shown: str | None, error: BaseException, output: Kept = ()
) -> TaskFailed:
    return TaskFailed(index, key, shown, export(error), _worker_name(), output)


def _enter(run: _WorkerRun, index: int) -> None:
    """Sets the run's context and the step's state (its init's value) for stage code."""
    _current.set(run.ctx)
    _, init = run.loaded(index)
    value = run.state(index)
    _state.load((lambda: value) if init is not None else None)


def run_step(job: Job, index: int, chunk: Chunk, before: Any = None) -> Chunk:
    """Step ``index`` of ``job`` over one chunk: the task every step's work is made of.
    ``before`` is the result of the task before it in its lane, if that one was still running
    when this one was submitted: this task only waits for it (see ``_dask._DaskRun._submit``)."""
    run = _worker_run(job)
    step = job.steps[index]
    values = chunk.values
    batch = Batch(chunk.keys, values)
    slot = Slot()
    slot.batch = batch
    task_vars = contextvars.copy_context()  # what stage code sets stays in this task
    install_output(job.levels)
    output = list(chunk.output)
    failed: tuple[Key | None, str | None, Exception] | None = None
    with kept_output(index, _worker_name(), task_vars, output):
        try:
            task_vars.run(_enter, run, index)
        except Exception as e:
            failed = (None, None, e)
        if failed is None:
            fn, _ = run.loaded(index)
            if step.timeout is not None:
                fn = _Watched(fn, step.timeout)
            apply = apply_for(step._replace(timeout=None), job.may_skip[index])
            t0 = perf_counter()
            try:
                out, _ = task_vars.run(apply, fn, batch, slot, False, run.stop)
            except Exception as e:
                failed = (slot.key(), slot.value(), e)
            seconds = perf_counter() - t0
    if failed is not None:  # raised out of the except block: no __context__ to pickle
        raise _failed(index, *failed, tuple(output))
    stats = (*chunk.stats, (index, seconds, len(values), _sizeof(out.values)))
    return Chunk(out.keys, out.values, stats, tuple(output))


def load_step(job: Job, index: int) -> Kept:
    """Runs step ``index``'s init on this worker (a step that got no item still says whether it
    loads, as on the local backend); returns what it printed and logged."""
    run = _worker_run(job)
    install_output(job.levels)
    output: list[tuple[int, str, bytes]] = []
    task_vars = contextvars.copy_context()
    failed = None
    with kept_output(index, _worker_name(), task_vars, output):
        try:
            task_vars.run(_enter, run, index)
        except Exception as e:
            failed = e
    if failed is not None:
        raise _failed(index, None, None, failed, tuple(output))
    return tuple(output)


def _sizeof(values: list[Any]) -> int:
    """Dask's own estimate of the values' size (it samples long lists)."""
    from dask.sizeof import sizeof

    try:
        return int(sizeof(values))
    except Exception:
        return 0


def pack_functions(steps: tuple[Step, ...]) -> tuple[tuple[Step, ...], bytes]:
    """The steps without their functions, and the functions (with their retries) and inits
    pickled once, keeping their file names (``_shipping.dumps``)."""
    from ._shipping import dumps

    functions = [(step_function(s), s.init) if s.fn is not None else (None, None) for s in steps]
    bare = tuple(s._replace(fn=None, init=None) for s in steps)
    return bare, dumps(functions)
