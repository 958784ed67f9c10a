"""pipeflow: parallel pipelines of Python functions on a Rust core, with Go's discipline.

The layers, bottom up:

- ``_core`` (Rust, pyo3): :class:`Channel` and :func:`select`, and the work-stealing pool that
  runs every thread stage and group task.
- ``_context``, ``_group``: cancellation scopes (:class:`Context`) and errgroup (:class:`Group`).
- ``pipeline``, ``_engine``, ``_ordering``: the :class:`Pipeline` DSL and the engine that runs it
  with bounded workers, bounded channels, ordered results and first-error cancellation.
- ``_process``, ``_worker``, ``_shm``: process stages: worker processes fed through shared-memory
  rings, and large buffers (numpy arrays) through a shared-memory arena, without copies.

Example:
    >>> import pipeflow as pf
    >>> pf.Pipeline(kind="thread").stage(lambda x: x + 1, workers=4).run(range(5))
    [1, 2, 3, 4, 5]
"""

from ._context import Context as Context
from ._context import current_context as current_context
from ._core import Channel as Channel
from ._core import select as select
from ._engine import Results as Results
from ._engine import worker_state as worker_state
from ._errors import Cancelled as Cancelled
from ._errors import ChannelClosed as ChannelClosed
from ._errors import DeadlineExceeded as DeadlineExceeded
from ._errors import PipeflowError as PipeflowError
from ._errors import WorkerCrashed as WorkerCrashed
from ._group import Group as Group
from ._group import Task as Task
from ._shm import arena_size as arena_size
from ._shm import empty as empty
from ._shm import set_arena_size as set_arena_size
from .pipeline import Pipeline as Pipeline
from .pipeline import StageOptions as StageOptions

__all__ = [
    "Cancelled",
    "Channel",
    "ChannelClosed",
    "Context",
    "DeadlineExceeded",
    "Group",
    "PipeflowError",
    "Pipeline",
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
