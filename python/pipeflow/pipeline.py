"""The pipeline DSL: :class:`Pipeline` and its steps, argument checks, ``to_mermaid()``.

A pipeline is an immutable chain of steps; each method returns a new pipeline, so a common prefix
can be shared. Every argument is checked when the step is added, before any worker exists. A run
hands the steps, as a ``_plan.Plan``, to the backend it names (``_backend``): the local one
(``_local``) by default, or the serial one (``_serial``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from typing import Any, TypedDict, Unpack

from . import _local, _serial  # noqa: F401  (they register the "local" and "serial" backends)
from ._backend import Backend, Source, resolve
from ._context import Context, current_context
from ._core import Channel
from ._plan import KINDS, Kind, Op, Plan, Step
from ._progress import ProgressSpec, check_progress
from ._remote import shown
from ._results import Results, collect, released, shown_errors

__all__ = ["Pipeline", "StageOptions", "Step"]


class StageOptions(TypedDict, total=False):
    """The options of a stage, all keyword: :meth:`Pipeline.stage`, :meth:`Pipeline.filter` and
    :meth:`Pipeline.flat_map` take them. Each may be left out; its default is given below.

    Attributes:
        workers: how many workers run the function at once (fan-out; their outputs fan in).
            Default: ``1``.
        kind: ``"process"`` (worker processes: pure-Python CPU-bound code uses every core) or
            ``"thread"`` (threads: for I/O, or code that releases the GIL). Default: the
            pipeline's ``kind`` (``"process"`` unless ``Pipeline(kind=...)`` says otherwise).
        name: the stage's name in errors, progress and ``to_mermaid()``. Default: the
            function's ``__name__``.
        capacity: the bound of the queue feeding the stage, in batches. Default:
            ``2 * workers``.
        ordered: False lets items leave the stage as they complete. Default: the pipeline's
            ``ordered`` (True unless ``Pipeline(ordered=...)`` says otherwise).
        init: called once per worker, with no arguments, before its first item; what it
            returns is what :func:`~pipeflow.worker_state` gives the function. Default:
            ``None``.
        timeout: seconds one item may take; past it the run fails with a ``TimeoutError``.
            Default: ``None`` (no limit).
        retries: how many more times to try an item whose function raised (or whose worker
            process died). Default: ``0``.

    Example:
        >>> import pipeflow as pf
        >>> options = pf.StageOptions(workers=2, kind="thread")
        >>> pf.Pipeline().stage(str.upper, **options).run(["a", "b"])
        ['A', 'B']
    """

    workers: int
    kind: Kind | None
    name: str | None
    capacity: int | None
    ordered: bool | None
    init: Callable[[], Any] | None
    timeout: float | None
    retries: int


class Pipeline:
    """A chain of stages run by bounded worker pools, joined by bounded channels.

    A pipeline is immutable: :meth:`stage`, :meth:`filter`, :meth:`flat_map` and :meth:`batch`
    each return a new one with the step added, so a common prefix can be shared. Every argument
    is checked when its step is added, before any worker starts. :meth:`run` returns the
    results in a list; :meth:`iter` streams them.

    Example:
        >>> import pipeflow as pf
        >>> p = (pf.Pipeline(kind="thread")
        ...        .stage(lambda x: x * x, workers=4)
        ...        .filter(lambda x: x % 2 == 0)
        ...        .batch(3))
        >>> p.run(range(10))
        [[0, 4, 16], [36, 64]]
    """

    def __init__(self, *, ordered: bool = True, kind: Kind = "process") -> None:
        """An empty pipeline, with the defaults of the steps that will be added to it.

        Args:
            ordered: whether results come out in input order (True) or as they complete
                (False); a step's own ``ordered=`` overrides it.
            kind: where steps run: ``"process"`` (worker processes, for pure-Python CPU-bound
                code) or ``"thread"`` (threads, for I/O or code that releases the GIL); a
                step's own ``kind=`` overrides it.

        Raises:
            TypeError: ``ordered`` is not a bool.
            ValueError: ``kind`` is neither ``"process"`` nor ``"thread"``.

        Example:
            >>> import pipeflow as pf
            >>> pf.Pipeline(kind="thread", ordered=False)
            Pipeline([])
        """
        _check_bool("ordered", ordered)
        _check_kind(kind)
        self._ordered = ordered
        self._kind: Kind = kind
        self._steps: tuple[Step, ...] = ()

    @property
    def steps(self) -> tuple[Step, ...]:
        """The steps, in order."""
        return self._steps

    def _add(self, step: Step) -> Pipeline:
        p = Pipeline.__new__(Pipeline)
        p._ordered, p._kind = self._ordered, self._kind
        p._steps = (*self._steps, step)
        return p

    def _step(self, op: Op, fn: Callable[..., Any], options: StageOptions) -> Pipeline:
        """Checks ``fn`` and the options of one step, and returns the pipeline with it added."""
        if not callable(fn):
            raise TypeError(f"{op} needs a callable, got {type(fn).__name__}: {fn!r}")
        unknown = sorted(set(options) - set(StageOptions.__annotations__))
        if unknown:
            valid = ", ".join(StageOptions.__annotations__)
            raise TypeError(f"{op}() got unexpected option(s) {', '.join(unknown)}; valid: {valid}")
        workers = options.get("workers", 1)
        _check_int("workers", workers, minimum=1)
        kind = options.get("kind")
        kind = self._kind if kind is None else kind
        _check_kind(kind)
        capacity = options.get("capacity")
        if capacity is not None:
            _check_int("capacity", capacity, minimum=0)
            if capacity > Channel.MAX_CAPACITY:
                raise ValueError(f"capacity must be <= {Channel.MAX_CAPACITY}, got {capacity}")
        ordered = options.get("ordered")
        if ordered is not None:
            _check_bool("ordered", ordered)
        init = options.get("init")
        if init is not None and not callable(init):
            raise TypeError(f"init must be a callable taking no arguments, got {init!r}")
        timeout = options.get("timeout")
        _check_seconds("timeout", timeout)
        retries = options.get("retries", 0)
        _check_int("retries", retries, minimum=0)
        name = options.get("name")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {name!r}")
        if kind == "process":
            _check_sendable(op, fn, "function")
            if init is not None:
                _check_sendable(op, init, "init")
        return self._add(
            Step(
                op=op,
                fn=fn,
                name=name or str(getattr(fn, "__name__", type(fn).__name__)),
                workers=workers,
                kind=kind,
                capacity=2 * workers if capacity is None else capacity,
                ordered=self._ordered if ordered is None else ordered,
                init=init,
                timeout=timeout,
                retries=retries,
            )
        )

    def stage(self, fn: Callable[[Any], Any], /, **options: Unpack[StageOptions]) -> Pipeline:
        """Adds a stage that maps each item through ``fn``: ``fn(item)`` is the next item.

        Args:
            fn: called with one item, in a worker; with ``kind="process"`` it is sent to the
                worker processes with cloudpickle (lambdas and closures work).
            **options: the stage's options (:class:`StageOptions`), all keyword, below.

        Keyword Args:
            workers (int): how many workers run ``fn`` at once (fan-out; their outputs fan in).
                Default: ``1``.
            kind (str): ``"process"`` (worker processes: pure-Python CPU-bound code uses every
                core) or ``"thread"`` (threads: for I/O, or code that releases the GIL).
                Default: the pipeline's ``kind`` (``"process"`` unless
                ``Pipeline(kind=...)`` says otherwise).
            name (str): the stage's name in errors, progress and ``to_mermaid()``. Default:
                the function's ``__name__``.
            capacity (int): the bound of the queue feeding the stage, in batches. Default:
                ``2 * workers``.
            ordered (bool): False lets items leave the stage as they complete. Default: the
                pipeline's ``ordered`` (True unless ``Pipeline(ordered=...)`` says otherwise).
            init (Callable[[], Any]): called once per worker, with no arguments, before its
                first item; what it returns is what :func:`~pipeflow.worker_state` gives
                ``fn``. Default: ``None``.
            timeout (float): seconds one item may take; past it the run fails with a
                ``TimeoutError``. Default: ``None`` (no limit).
            retries (int): how many more times to try an item whose function raised (or whose
                worker process died). Default: ``0``.

        Returns:
            A new pipeline: this one with the stage added.

        Raises:
            TypeError: ``fn`` is not callable, an option is unknown or of the wrong type, or
                (for a process stage) ``fn`` or ``init`` cannot be pickled.
            ValueError: an option is out of range (``workers < 1``, ``retries < 0``, ...).

        Example:
            >>> import pipeflow as pf
            >>> pf.Pipeline(kind="thread").stage(str.upper, workers=2).run(["a", "b"])
            ['A', 'B']
        """
        return self._step("map", fn, options)

    def filter(self, fn: Callable[[Any], Any], /, **options: Unpack[StageOptions]) -> Pipeline:
        """Adds a stage that keeps the items for which ``fn(item)`` is true (options as for
        :meth:`stage`).

        Example:
            >>> import pipeflow as pf
            >>> pf.Pipeline(kind="thread").filter(lambda x: x > 1).run([0, 1, 2, 3])
            [2, 3]
        """
        return self._step("filter", fn, options)

    def flat_map(
        self, fn: Callable[[Any], Iterable[Any]], /, **options: Unpack[StageOptions]
    ) -> Pipeline:
        """Adds a stage where each item becomes any number of items: those ``fn(item)`` yields
        (options as for :meth:`stage`).

        Example:
            >>> import pipeflow as pf
            >>> pf.Pipeline(kind="thread").flat_map(range).run([1, 0, 3])
            [0, 0, 1, 2]
        """
        return self._step("flat_map", fn, options)

    def batch(
        self,
        size: int,
        *,
        name: str | None = None,
        capacity: int | None = None,
        ordered: bool | None = None,
    ) -> Pipeline:
        """Adds a step that groups items into lists of ``size`` (the last may be shorter).

        With ``ordered`` (the default) a batch holds consecutive items in input order;
        otherwise items are grouped as they arrive.

        Example:
            >>> import pipeflow as pf
            >>> pf.Pipeline(kind="thread").batch(2).run(range(5))
            [[0, 1], [2, 3], [4]]
        """
        _check_int("size", size, minimum=1)
        options = StageOptions(kind="thread", name=name or f"batch({size})")
        if capacity is not None:
            options["capacity"] = capacity
        if ordered is not None:
            options["ordered"] = ordered
        step = self._step("batch", list, options)._steps[-1]
        return self._add(step._replace(size=size))

    def run(
        self,
        items: Iterable[Any],
        *,
        progress: ProgressSpec = False,
        context: Context | None = None,
        timeout: float | None = None,
        backend: str | Backend | None = None,
    ) -> list[Any]:
        """Runs the pipeline over ``items`` and returns every result, in input order.

        Args:
            items: any iterable; it is read lazily, as the pipeline has room.
            progress: a progress bar of the input items done: ``True`` (tqdm's bar on stderr;
                in Jupyter the widget, or a text line without ipywidgets, that the saved
                notebook keeps in its final state), a dict of tqdm options (``{"desc": "files"}``,
                ``{"disable": True}``, ``{"file": sys.stdout}``, ``{"mininterval": 1}``), or a
                bar class such as ``tqdm.rich.tqdm`` (any callable ``cls(total=...,
                unit="item")`` returning an object with ``update(n)`` and ``close()``).
            context: cancelling this context stops the run (it raises ``pipeflow.Cancelled``).
            timeout: seconds for the whole run; past it the run stops and raises
                ``pipeflow.DeadlineExceeded`` (a ``TimeoutError``).
            backend: where the stages run: ``"local"`` (the default: this machine's threads and
                worker processes), ``"serial"`` (every step in the caller's thread, one item at a
                time: for ``pdb`` and ``print`` in stage code), or a backend object. None: the
                ``PIPEFLOW_BACKEND`` environment variable if set, else ``"local"``.

        Raises:
            Exception: the first exception a stage raised, as the same type, with a note naming
                the stage and the item's position; every other worker is stopped first.

        Example:
            >>> import pipeflow as pf
            >>> pf.Pipeline(kind="thread").stage(abs).run([-1, 2, -3])
            [1, 2, 3]
        """
        __tracebackhide__ = True  # pytest's and IPython's tracebacks skip this frame
        try:
            return collect(self._released(items, progress, context, timeout, backend))
        except BaseException as error:
            shown(error)  # its traceback: the caller's frames and the stage's, not pipeflow's
            raise

    def iter(
        self,
        items: Iterable[Any],
        *,
        progress: ProgressSpec = False,
        context: Context | None = None,
        timeout: float | None = None,
        backend: str | Backend | None = None,
    ) -> Results:
        """Runs the pipeline lazily: results stream out, memory stays bounded.

        Leaving the loop early (``break``, an exception, ``close()``) stops the workers and
        waits for the items they hold; nothing is left running. Arguments as for :meth:`run`.

        Example:
            >>> import itertools, pipeflow as pf
            >>> squares = pf.Pipeline(kind="thread").stage(lambda x: x * x).iter(itertools.count())
            >>> [next(squares) for _ in range(4)]
            [0, 1, 4, 9]
            >>> squares.close()
        """
        return Results.over(
            shown_errors(self._released(items, progress, context, timeout, backend))
        )

    def _released(
        self,
        items: Iterable[Any],
        progress: ProgressSpec,
        context: Context | None,
        timeout: float | None,
        backend: str | Backend | None,
    ) -> Generator[list[Any], None, None]:
        """Checks the arguments of :meth:`run` and :meth:`iter`, and hands the plan to the
        backend: the stream of the run's results, not started yet."""
        check_progress(progress)
        if context is not None and not isinstance(context, Context):
            raise TypeError(f"context must be a pipeflow.Context, got {type(context).__name__}")
        _check_seconds("timeout", timeout)
        runner = resolve(backend)
        try:
            source = iter(items)
        except TypeError:
            raise TypeError(
                f"items must be iterable, got {type(items).__name__}: {items!r}"
            ) from None
        total = None  # the progress bar's total; batches shrink near the end of a known length
        if hasattr(items, "__len__"):
            try:
                total = len(items)  # type: ignore[arg-type]
            except (OverflowError, TypeError):
                total = None
        ctx = Context(timeout=timeout, parent=context or current_context())
        return released(runner, Plan(self._steps), Source(source, total), progress, ctx)

    def to_mermaid(self) -> str:
        """The pipeline as a Mermaid flowchart (paste it into Markdown or a notebook).

        Example:
            >>> import pipeflow as pf
            >>> print(pf.Pipeline(kind="thread").stage(abs, workers=2).to_mermaid())
            flowchart LR
                input([input]) --> s0["abs<br/>map · thread x 2"]
                s0 --> output([output])
        """
        lines = ["flowchart LR"]
        prev = "input([input])"
        for i, s in enumerate(self._steps):
            label = f"{s.name}<br/>{s.op} · {s.kind} x {s.workers}"
            if s.op == "batch":
                label = f"{s.name}<br/>batch of {s.size}"
            label = label.replace('"', "#quot;")
            lines.append(f'    {prev} --> s{i}["{label}"]')
            prev = f"s{i}"
        lines.append(f"    {prev} --> output([output])")
        return "\n".join(lines)

    def __repr__(self) -> str:
        inner = ", ".join(f"{s.op}({s.name}, {s.kind} x {s.workers})" for s in self._steps)
        return f"Pipeline([{inner}])"


def _check_sendable(op: str, fn: object, what: str) -> None:
    """A process stage's function must pickle (cloudpickle: lambdas and closures do)."""
    import cloudpickle

    try:
        cloudpickle.dumps(fn)
    except Exception as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(
            f"the {what} {name!r} of this {op} step cannot be sent to a worker process "
            f"({type(e).__name__}: {e}); make what it refers to picklable (e.g. open "
            "connections or files inside it, or in init=), or use kind='thread'"
        ) from e


def _check_int(what: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{what} must be >= {minimum}, got {value}")


def _check_seconds(what: str, value: object) -> None:
    """None, or a number of seconds > 0."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{what} must be a number of seconds > 0 or None, got {value!r}")
    if not value > 0:
        raise ValueError(f"{what} must be seconds > 0 or None, got {value!r}")


def _check_bool(what: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{what} must be True or False, got {value!r}")


def _check_kind(kind: object) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'thread' or 'process', got {kind!r}")
