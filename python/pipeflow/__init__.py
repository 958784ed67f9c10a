"""pipeflow: parallel pipelines of Python functions on a Rust core, with Go's discipline.

A :class:`Pipeline` chains stages, each with its own pool of worker processes or threads and a
bounded queue in front of it; ``run`` returns the results in input order, ``iter`` streams them.
The first error cancels the run and is re-raised, and no run leaves anything behind. The
primitives underneath are there to use on their own: :class:`Channel` and :func:`select`,
:class:`Group` (errgroup) and :class:`Context` (cancellation). ``help(pipeflow.Pipeline.stage)``
lists a stage's options; the README is the guide, ``docs/`` the API reference and the internals.

Example:
    >>> import pipeflow as pf
    >>> pf.Pipeline(kind="thread").stage(lambda x: x + 1, workers=4).run(range(5))
    [1, 2, 3, 4, 5]

The layers, bottom up (dependencies point one way; see ``docs/internals.md``):

- ``_core`` (Rust, pyo3): :class:`Channel` and :func:`select`, the work-stealing pool that runs
  every thread stage and group task, and the shared-memory rings, words and arena.
- ``_context``, ``_group``: cancellation scopes (:class:`Context`) and errgroup (:class:`Group`).
- ``_plan``, ``_batch``, ``_apply``, ``_state``, ``_wire``: leaves that both sides of a process
  stage share: the steps, batches, the per-batch loops, :func:`worker_state`, the messages.
- ``_worker``, ``_zygote``: a worker process's main and the fork server (leaves only).
- ``_backend``: the backend seam; ``_local`` (threads and worker processes on this machine:
  ``_runners``, ``_process_stage``, ``_process``, ``_feeder``, ``_sizing``, ``_ordering``,
  ``_tasks``, ``_shm``) and ``_serial`` (the caller's thread, for debugging).
- ``pipeline``, ``_results``: the :class:`Pipeline` DSL, and what a run gives back.

:class:`Pipeline`, :class:`StageOptions` and :class:`Results` are imported on first use, so
that a worker process, which imports this package to reach ``_worker``, loads neither the DSL
nor an engine. ``dir(pipeflow)`` lists the public names only, not the submodules.
"""

import types as _types
import typing as _typing

from ._context import Context as Context
from ._context import current_context as current_context
from ._core import Channel as Channel
from ._core import select as select
from ._errors import Cancelled as Cancelled
from ._errors import ChannelClosed as ChannelClosed
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import ItemTimeout as ItemTimeout
from ._errors import PipeflowError as PipeflowError
from ._errors import RemoteError as RemoteError
from ._errors import WorkerCrashed as WorkerCrashed
from ._group import Group as Group
from ._group import Task as Task
from ._shm import arena_size as arena_size
from ._shm import empty as empty
from ._shm import set_arena_size as set_arena_size
from ._state import worker_state as worker_state

if _typing.TYPE_CHECKING:
    from ._dask import DaskBackend as DaskBackend
    from ._results import Results as Results
    from .pipeline import Pipeline as Pipeline
    from .pipeline import StageOptions as StageOptions

__all__ = [
    "Cancelled",
    "Channel",
    "ChannelClosed",
    "Context",
    "DaskBackend",
    "DeadlineExceeded",
    "Group",
    "ItemTimeout",
    "PipeflowError",
    "Pipeline",
    "RemoteError",
    "Results",
    "StageOptions",
    "Task",
    "WorkerCrashed",
    "arena_size",
    "current_context",
    "empty",
    "select",
    "set_arena_size",
    "worker_state",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> _typing.Any:
    """The names imported on first use (see the module's doc)."""
    if name in ("Pipeline", "StageOptions"):
        from . import pipeline as module
    elif name == "Results":
        from . import _results as module  # type: ignore[no-redef]
    elif name == "DaskBackend":
        from . import _dask as module  # type: ignore[no-redef]
    else:
        raise AttributeError(f"module 'pipeflow' has no attribute {name!r}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names and the module's dunders: not the submodules that importing binds here
    (``pipeflow.pipeline`` and the private ones stay importable, as pickles of pipelines need)."""
    names = {n for n, v in globals().items() if not isinstance(v, _types.ModuleType)}
    return sorted({*names, *__all__})
