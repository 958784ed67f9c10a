"""pipeflow's exceptions, all under :class:`PipeflowError`.

They are defined in Python, not in the extension, so that they pickle across processes and show
their public module path (``pipeflow.ChannelClosed``).
"""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "ChannelClosed",
    "DeadlineExceeded",
    "ItemTimeout",
    "PipeflowError",
    "RemoteError",
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


class ItemTimeout(PipeflowError, TimeoutError):
    """An item took longer than its stage's ``timeout=`` (also a :class:`TimeoutError`).

    A process stage's worker that held it is killed (and replaced); a thread cannot be
    stopped, so a thread stage's item finishes in the background. A ``TimeoutError`` that the
    stage's own code raises comes back as it is, not as this.

    Example:
        >>> import time, pipeflow as pf
        >>> try:
        ...     pf.Pipeline(kind="thread").stage(time.sleep, timeout=0.05).run([0.0, 0.5])
        ... except pf.ItemTimeout as e:
        ...     print("timed out:", isinstance(e, TimeoutError))
        timed out: True
    """


class RemoteError(PipeflowError):
    """Stands for an exception a worker process raised that could not be made again in this
    process (its class does not unpickle here: a module the worker imported but this process
    cannot). ``type_name`` is the original's ``module.qualname``; the message is its text."""

    type_name: str = ""


for _cls in (
    PipeflowError,
    ChannelClosed,
    Cancelled,
    DeadlineExceeded,
    WorkerCrashed,
    ItemTimeout,
    RemoteError,
):
    _cls.__module__ = "pipeflow"
