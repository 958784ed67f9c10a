"""Log records and prints of stage code in a worker process, forwarded to the parent's logging
and streams as if the stage ran there (a leaf: the worker's side and the parent's).

::

    worker: stage code, any thread                        parent: the worker's proxy thread
      log.info(...) ──► the root logger's _Forward ──┐      Log ──► getLogger(name).handle(record)
      print(...)    ──► sys.stdout / sys.stderr    ──┼──► reply ring ──► Output ──► sys.stdout/err
      the main loop: Ready, Done, Failed           ──┘      (the rest: the reply waited for)

**In the worker** (:func:`install`, called by ``_worker.main``), one :class:`Outbox` is the only
writer of the reply ring: its lock orders the main loop's replies and whatever stage code's
threads log or print, and the text written so far goes before any other message. The root logger
gets a handler that sends every record reaching it as a ``_wire.Log``: its message formatted
(``getMessage``: the arguments need not pickle), the exception's traceback formatted into
``exc_text`` (``exc_info`` is dropped: a traceback cannot cross), values that do not pickle as
their ``repr``. The worker's loggers take the parent's levels, sent in each ``Setup``
(:func:`log_levels`, :func:`apply_levels`), so that a record the parent would drop is not even
made. ``sys.stdout`` and ``sys.stderr`` become streams (:class:`_Stream`) that keep what is
written, in order across both, each thread's line apart (a ``print`` is several writes: another
thread's cannot cut its line), and send it as one ``_wire.Output`` at the end of a thread's line
(``\\n`` or ``\\r``), at ``flush()`` (the parent's stream is flushed too), past ``MAX_TEXT``
characters kept, before a log record (that thread's text), before a reply of the main loop (every
thread's: at the latest, a batch's text goes when it ends) and when the worker stops. So a printed
line is in the ring before the next statement of the stage runs, and a worker that dies later
loses none of it: the parent drains a dead worker's ring before reporting the crash. Nothing runs
per item: the hooks are a handler and two stream objects. Text written to fds 1 and 2 directly
(C code, subprocesses) goes to the inherited fds, as before.

**In the parent** (:func:`forward`, called by ``_process.WorkerProcess`` wherever it reads the
ring), a ``Log`` becomes a ``LogRecord`` again and goes to the logger of its name if that logger
is enabled for its level (the parent is the judge: its levels may have changed since the setup);
the parent's filters, handlers and formats apply. The record keeps the worker's pid in
``process``; ``processName`` is the worker's label (``stage 1 ('parse', process worker 0)``) and
``pipeflow_stage`` the stage's name (a record from a nested pipeline's worker keeps the innermost
ones). An ``Output``'s text goes to the parent's ``sys.stdout`` / ``sys.stderr`` as they are at
that moment (a terminal, a file, a Jupyter kernel's stream, a pytest capture, a ``StringIO``).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import logging
import pickle
import sys
import threading
import traceback
from typing import TYPE_CHECKING, Any, TextIO

from ._errors import ChannelClosed
from ._wire import Log, Output, send_bytes

if TYPE_CHECKING:
    from ._core import Ring

__all__ = ["MAX_TEXT", "Outbox", "apply_levels", "forward", "install", "log_levels"]

STDOUT, STDERR = 1, 2
MAX_TEXT = 1 << 16  # characters kept before they are sent, line or not
Levels = tuple[int, int, dict[str, int]]  # the root's level, logging.disable's, named loggers'


# ---------------------------------------------------------------------------- the worker's side


class Outbox:
    """The worker's end of its reply ring: every message goes through :meth:`send`, after the
    text written before it (see the module's doc)."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        # Re-entrant: a signal handler that prints while this thread sends must not deadlock
        # (what it sends waits in _later, for the send in progress to finish).
        self._lock = threading.RLock()
        self._text: list[tuple[int, str]] = []  # whole lines (and more) to send, in order
        # Each thread's text since its last end of line: a print of several pieces from one
        # thread is not cut by another thread's (each is a write of its own).
        self._lines: dict[int, list[tuple[int, str]]] = {}
        self._size = 0  # characters kept in both
        self._later: list[bytes] = []
        self._sending = False
        self._written: set[int] = set()  # streams written to since their last flush()

    def send(self, message: Any) -> None:
        """Sends a reply of the main loop; raises ``ChannelClosed`` if the parent closed the
        ring (it is stopping this worker)."""
        self.send_bytes(pickle.dumps(message, protocol=5))

    def send_bytes(
        self, data: bytes | None, flush: int | None = None, everyone: bool = True
    ) -> None:
        """Sends the text written so far, then ``data`` (a pickled message) if any. ``flush``:
        the stream whose ``flush()`` asked for it (the parent flushes its own). ``everyone``:
        every thread's unfinished line too (else this thread's only: a log record)."""
        with self._lock:
            self._take_lines(everyone)
            if self._sending:  # re-entered by this thread: the send in progress takes it
                if data is not None:
                    self._later.append(data)
                return
            self._sending = True
            try:
                self._send_text(flush)
                while data is not None:
                    send_bytes(self.ring, data)
                    data = self._later.pop(0) if self._later else None
            finally:
                self._sending = False

    def _take_lines(self, everyone: bool) -> None:
        """Moves this thread's unfinished line (``everyone``: every thread's) to the text to
        send."""
        if everyone:
            for line in self._lines.values():
                self._text.extend(line)
            self._lines.clear()
        else:
            self._text.extend(self._lines.pop(threading.get_ident(), ()))

    def _send_text(self, flush: int | None) -> None:
        text, self._text = self._text, []
        self._size = sum(len(chunk) for line in self._lines.values() for _, chunk in line)
        parts: list[tuple[int, str]] = []
        for stream, chunk in text:  # runs of one stream joined
            if parts and parts[-1][0] == stream:
                parts[-1] = (stream, parts[-1][1] + chunk)
            else:
                parts.append((stream, chunk))
        self._written.update(stream for stream, _ in parts)
        if flush is not None:
            if flush not in self._written:
                flush = None  # nothing written since its last flush: nothing to ask
            else:
                self._written.discard(flush)
                if all(stream != flush for stream, _ in parts):
                    parts.append((flush, ""))
        if parts:
            message = Output(parts, flush is not None)
            send_bytes(self.ring, pickle.dumps(message, protocol=5))

    def write(self, stream: int, text: str) -> None:
        """Keeps ``text`` of ``stream``; sends this thread's line at its end (and everything
        kept past ``MAX_TEXT``)."""
        with self._lock:
            self._lines.setdefault(threading.get_ident(), []).append((stream, text))
            self._size += len(text)
            if self._size >= MAX_TEXT:
                everyone = True
            elif "\n" in text or "\r" in text:
                everyone = False
            else:
                return
        self.flush(None, everyone)

    def flush(self, stream: int | None = None, everyone: bool = True) -> None:
        """Sends the text kept, unless the parent stopped listening (stage code's prints
        must not raise because of that: the worker is being stopped)."""
        with contextlib.suppress(ChannelClosed, OSError):
            self.send_bytes(None, stream, everyone)


class _Stream(io.TextIOBase):
    """A worker's ``sys.stdout`` or ``sys.stderr``: text goes to the parent's (see the module's
    doc); ``fileno()`` and ``isatty()`` are the inherited fd's."""

    def __init__(self, outbox: Outbox, number: int, original: TextIO | None) -> None:
        super().__init__()
        self._outbox = outbox
        self._number = number
        self._original = original
        self._binary: _Binary | None = None

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if text:
            self._outbox.write(self._number, text)
        return len(text)

    def flush(self) -> None:
        self._outbox.flush(self._number)

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        if self._original is None:
            raise io.UnsupportedOperation("fileno")
        return self._original.fileno()

    def isatty(self) -> bool:
        try:
            return self._original is not None and self._original.isatty()
        except (OSError, ValueError):
            return False

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str:  # type: ignore[override]
        return getattr(self._original, "errors", None) or "strict"

    @property
    def name(self) -> str:
        return "<stdout>" if self._number == STDOUT else "<stderr>"

    @property
    def line_buffering(self) -> bool:
        return True

    def reconfigure(self, **_options: Any) -> None:
        """``TextIOWrapper.reconfigure``: nothing to change (text crosses as text, whole
        lines), accepted so that code that calls it on ``sys.stdout`` runs."""

    @property
    def buffer(self) -> _Binary:
        if self._binary is None:
            self._binary = _Binary(self)
        return self._binary


class _Binary(io.RawIOBase):
    """A forwarding stream's ``buffer``: bytes are decoded (by the stream's encoding) and go
    the same way as its text."""

    def __init__(self, text: _Stream) -> None:
        super().__init__()
        self._text = text
        self._decoder = codecs.getincrementaldecoder(text.encoding)("replace")

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        chunk = bytes(data)
        self._text.write(self._decoder.decode(chunk))
        return len(chunk)

    def flush(self) -> None:
        self._text.flush()


class _Forward(logging.Handler):
    """The worker's root logger's handler: each record to the parent (see the module's doc)."""

    def __init__(self, outbox: Outbox) -> None:
        super().__init__()
        self.outbox = outbox

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = _pickled(record)
            self.outbox.send_bytes(data, everyone=False)  # after this thread's text
        except (ChannelClosed, OSError):
            pass  # the parent stopped listening: this worker is being stopped
        except Exception:
            self.handleError(record)


_EXCEPTIONS = logging.Formatter()  # formats tracebacks as the parent's default formatter does


def _pickled(record: logging.LogRecord) -> bytes:
    """``record`` as a pickled ``Log``: its message formatted, its traceback as text."""
    attrs = dict(record.__dict__)
    attrs["msg"] = record.getMessage()
    attrs["args"] = None
    if record.exc_info and not record.exc_text:
        attrs["exc_text"] = _EXCEPTIONS.formatException(record.exc_info)
    attrs["exc_info"] = None
    try:
        return pickle.dumps(Log(attrs), protocol=5)
    except Exception:  # an attribute from extra= that does not pickle: its repr
        for key, value in attrs.items():
            try:
                pickle.dumps(value, protocol=5)
            except Exception:
                attrs[key] = _repr(value)
        return pickle.dumps(Log(attrs), protocol=5)


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<{type(value).__name__} object (its repr failed)>"


_handler: _Forward | None = None
_originals: tuple[Any, Any] = (None, None)
_levels_set: set[str] = set()  # the named loggers whose level apply_levels set


def install(outbox: Outbox) -> None:
    """Forwards this worker's log records and prints through ``outbox`` (until
    :func:`uninstall`)."""
    global _handler, _originals
    _originals = (sys.stdout, sys.stderr)
    sys.stdout = _Stream(outbox, STDOUT, sys.stdout)
    sys.stderr = _Stream(outbox, STDERR, sys.stderr)
    _handler = _Forward(outbox)
    apply_levels(None)


def uninstall(outbox: Outbox) -> None:
    """Sends what is left of the text written, and puts the original streams back (a worker's
    last words, once the ring is closed, go to the inherited fds)."""
    global _handler
    outbox.flush()
    if _handler is not None:
        logging.getLogger().removeHandler(_handler)
        _handler = None
    if isinstance(sys.stdout, _Stream):
        sys.stdout = _originals[0]
    if isinstance(sys.stderr, _Stream):
        sys.stderr = _originals[1]


def apply_levels(levels: Levels | None) -> None:
    """Gives this worker's loggers the parent's levels (None: the root's at NOTSET, every
    record goes to the parent), and puts the forwarding handler back on the root logger if stage
    code removed it (``basicConfig(force=True)``)."""
    global _levels_set
    root = logging.getLogger()
    if _handler is not None and _handler not in root.handlers:
        root.addHandler(_handler)
    if levels is None:
        root.setLevel(logging.NOTSET)
        return
    root_level, disable, named = levels
    if root.level != root_level:
        root.setLevel(root_level)
    if logging.root.manager.disable != disable:
        logging.disable(disable)
    for name in _levels_set - named.keys():  # set for an earlier step, not the parent's now
        logging.getLogger(name).setLevel(logging.NOTSET)
    for name, level in named.items():
        logger = logging.getLogger(name)
        if logger.level != level:
            logger.setLevel(level)
    _levels_set = set(named)


# ---------------------------------------------------------------------------- the parent's side


def log_levels() -> Levels:
    """The parent's logging levels, for a worker's ``Setup``: the root logger's,
    ``logging.disable``'s, and those of the loggers that have one of their own."""
    manager = logging.Logger.manager
    named = {
        name: logger.level
        for name, logger in list(manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    }
    return logging.getLogger().level, manager.disable, named


def forward(message: Any, label: str, stage: str | None) -> bool:
    """Re-emits ``message`` in this process if it is a worker's output (``Log`` or ``Output``)
    and says so; ``label`` and ``stage`` name the worker (see the module's doc)."""
    kind = type(message)
    if kind is Output:
        _write(message)
        return True
    if kind is Log:
        _emit(message.record, label, stage)
        return True
    return False


def _write(message: Output) -> None:
    for stream, text in message.parts:
        target = sys.stdout if stream == STDOUT else sys.stderr
        try:
            if text:
                target.write(text)
            if message.flush:
                target.flush()
        except Exception:  # None, closed, or it cannot encode: the run goes on, as it would
            pass  # have had the worker printed to an fd that failed


def _start() -> float | None:
    """When this process's logging started, in seconds (``relativeCreated`` counts from it)."""
    start = getattr(logging, "_startTime", None)  # a float before 3.13, nanoseconds since
    if isinstance(start, int):
        return start / 1e9
    return start if isinstance(start, float) else None


def _record(attrs: dict[str, Any]) -> logging.LogRecord:
    """A record with ``attrs``: made by the record factory if the program set one of its own
    (its attributes then exist, as on every record here), else as is, without calling
    ``LogRecord.__init__``, which would ask ``threading.current_thread()`` and so register a
    ``_DummyThread`` for the pool thread that re-emits it."""
    if logging.getLogRecordFactory() is not logging.LogRecord:
        return logging.makeLogRecord(attrs)
    record = logging.LogRecord.__new__(logging.LogRecord)
    record.__dict__.update(attrs)
    return record


def _emit(attrs: dict[str, Any], label: str, stage: str | None) -> None:
    record = _record(attrs)
    start = _start()
    if start is not None:
        record.relativeCreated = (record.created - start) * 1000
    if not hasattr(record, "pipeflow_stage"):  # else: from a nested pipeline's worker
        record.processName = label
        record.pipeflow_stage = stage
    logger = logging.getLogger(None if record.name == "root" else record.name)
    try:
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
    except Exception:  # a filter of the parent's raised: say so, as logging does for a handler
        if logging.raiseExceptions:
            traceback.print_exc(file=sys.stderr)
