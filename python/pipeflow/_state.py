"""Per-worker state: what a stage's ``init`` returned, as :func:`worker_state` gives it (a leaf).

Each worker (a thread of a thread stage, a worker process, the serial backend's turn at a step)
sets the state of its own step in its own ``contextvars`` context, so a nested pipeline's
stage without ``init`` does not see the outer stage's state.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

__all__ = ["load", "worker_state"]

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


def load(init: Callable[[], Any] | None) -> None:
    """Runs ``init`` (if any) and makes its value this worker's state; a step without ``init``
    has no state, whatever the caller's context carried."""
    _worker_state.set(init() if init is not None else _NO_STATE)
