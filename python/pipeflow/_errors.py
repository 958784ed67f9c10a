"""pipeflow's exceptions, all under :class:`PipeflowError`.

They are defined in Python, not in the extension, so that they pickle across processes and show
their public module path (``pipeflow.ChannelClosed``).
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "ChannelClosed",
    "DeadlineExceeded",
    "PipeflowError",
    "WorkerCrashed",
]


class PipeflowError(Exception):
    """The base of every exception pipeflow raises on its own account."""


class ChannelClosed(PipeflowError):
    """A send on a closed channel, or a receive from a channel that is closed and drained.

    Example:
        >>> import pipeflow as pf
        >>> ch = pf.Channel(1)
        >>> ch.close()
        True
        >>> ch.send(1)
        Traceback (most recent call last):
        ...
        pipeflow.ChannelClosed: send on a closed channel
    """


class Cancelled(PipeflowError):
    """Work stopped because its :class:`~pipeflow.Context` was cancelled.

    Example:
        >>> import pipeflow as pf
        >>> ctx = pf.Context()
        >>> ctx.cancel("user asked")
        True
        >>> ctx.raise_if_cancelled()
        Traceback (most recent call last):
        ...
        pipeflow.Cancelled: user asked
    """


class DeadlineExceeded(Cancelled, TimeoutError):
    """Work stopped because its context's deadline passed (also a :class:`TimeoutError`)."""


class WorkerCrashed(PipeflowError):
    """A worker process died (a signal or an exit code) while it held an item."""


for _cls in (PipeflowError, ChannelClosed, Cancelled, DeadlineExceeded, WorkerCrashed):
    _cls.__module__ = "pipeflow"
