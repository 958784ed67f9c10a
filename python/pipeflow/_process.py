"""One worker process, from the parent's side: start it, load a step, send batches, wait for
replies while watching it, stop it; and the warm set of idle workers.

::

    parent (a proxy thread per worker)            child: python -m pipeflow._worker IN OUT AT
      requests ──► Ring "in"  (parent writes) ──► loop: pop a request, run the step's
      replies  ◄── Ring "out" (child writes)  ◄──       function over a batch, push the reply
      reads on a crash ◄── word "at" (shared) ◄──       the index of the item in hand

Each direction is its own single-writer ring (``pipeflow._core.Ring``, a memfd: nothing to leak in
/dev/shm), so a worker killed at any instant cannot wedge or corrupt the parent's side. The
messages and their framing are ``_wire``'s (the step's function and ``init`` go cloudpickled, so
lambdas and notebook functions work). What to do with a crash or a timeout (retry, re-send) is
the process stage runner's (``_process_stage``).

What stage code logs and prints comes on the reply ring between the replies; the parent re-emits
it wherever it reads the ring (``_output.forward``), drains a dead worker's ring before reporting
the crash, and reads it while it waits to send (a worker blocked writing its output reads no
request) or for a stopped worker to exit.

The parent waits for a reply in slices and looks at the worker between them: a worker that died is
reported as :class:`~pipeflow.WorkerCrashed` with its exit code or signal and the item it held
(the worker writes the index of each item into a shared word before running it); one that holds
a batch past ``timeout`` is killed and reported as ``TimeoutError``. An exception in the worker
comes back as the same exception type, with the worker's traceback text as its ``__cause__``.

Workers are forked by a fork server (``_zygote``: a single-threaded process started once, with
pipeflow imported, so safe to fork whatever threads the parent runs), or started with
``subprocess`` as fresh interpreters (``PIPEFLOW_START_METHOD=spawn``, or if the server cannot
start). A worker exits when the parent closes its input ring, and on its own when it sees that
its parent died (it checks once a second), so no orphan outlives a killed run.

Warm set: a worker whose run ended cleanly goes back to an idle set (at most ``MAX_IDLE``), and
the next run loads its step into it (``lease``) instead of starting an interpreter. Idle workers
are stopped at exit, and exit by themselves if the parent dies.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from . import _output, _runtime, _shm, _zygote
from ._batch import Batch, Slot
from ._core import Block, Ring, Word
from ._errors import ChannelClosed, ItemTimeout, WorkerCrashed
from ._shipping import Packed, pack
from ._wire import (
    LOADING,
    POLL,
    RECEIVING,
    Done,
    Ready,
    Setup,
    Work,
    first_unpicklable,
    raise_failure,
    recv_message,
    send_bytes,
)

__all__ = [
    "QUEUE_BYTES",
    "Stopped",
    "WorkerProcess",
    "give_back",
    "lease",
    "shutdown_idle",
    "start_method",
]

RING_BYTES = 512 << 10
# A request may be queued behind one the worker is running only if it is at most this large: the
# worker reads a request whole before it runs it, so the ring then always has room for the
# queued one, and the parent never blocks in a push while the worker blocks pushing its reply.
QUEUE_BYTES = RING_BYTES // 4
# For a new worker to read its first setup (an interpreter's start). Loading the step after that
# (unpickling the function, which may import heavy modules, and running ``init``) has no limit.
START_TIMEOUT = 60.0
# A warm worker keeps the functions (and inits) of its last few steps, unpickled, so that a run
# of an unchanged function sends its key alone; within this many bytes of pickles (besides the
# step loaded now).
KEEP = 8
KEEP_BYTES = 1 << 30


class _ClosedRing:
    """Stands in for a released ring: every use says the worker is stopped."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise ChannelClosed("this worker process was stopped")


_CLOSED: Any = _ClosedRing()


class Stopped(Exception):
    """The run stopped while a worker held a batch (the worker was killed)."""


def _pickle_mp_main_by_value() -> None:
    """In a ``multiprocessing`` child started by spawn or forkserver, the script's functions and
    classes live in ``__mp_main__``, a module our workers cannot import: pickle them by value,
    as cloudpickle does for ``__main__``."""
    module = sys.modules.get("__mp_main__")
    if module is not None and module.__name__ == "__mp_main__":
        import cloudpickle

        cloudpickle.register_pickle_by_value(module)


def start_method() -> str:
    """How worker processes start: ``PIPEFLOW_START_METHOD``, ``forkserver`` by default."""
    method = os.environ.get("PIPEFLOW_START_METHOD", "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(
            f"PIPEFLOW_START_METHOD={method!r}: set it to 'forkserver' (the default: workers "
            "forked by a fork server) or 'spawn' (each worker a fresh interpreter)"
        )
    return method


def _start_process(
    method: str, fds: list[int], tag: int
) -> subprocess.Popen[bytes] | _zygote.Forked:
    """A worker process on ``fds`` (in, out, at, arena): forked by the fork server, or a fresh
    interpreter (``spawn``, or when the fork server cannot be had: a warning says why)."""
    if method == "forkserver":
        try:
            return _zygote.start(fds, tag)
        except _zygote.Abandoned:
            raise  # the caller starts one on new fds
        except OSError as e:
            _warn_fallback(str(e))
    return subprocess.Popen(
        [sys.executable, "-m", "pipeflow._worker", *map(str, fds), str(tag), str(os.getpid())],
        pass_fds=fds,
        stdin=subprocess.DEVNULL,
    )


_fallback_warned = False


def _warn_fallback(why: str) -> None:
    """Warns, once a process, that workers start as fresh interpreters, and why."""
    global _fallback_warned
    if not _fallback_warned:
        _fallback_warned = True
        import warnings

        warnings.warn(
            f"{why}; pipeflow starts its worker processes as fresh interpreters instead "
            "(slower to start)",
            RuntimeWarning,
            stacklevel=3,
        )


def _describe_exit(code: int) -> str:
    if code == _zygote.UNKNOWN_EXIT:
        return (
            "ended, with an exit status nobody could read (the fork server that started it "
            "died, or did not relay it within 5 s)"
        )
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        cause = {
            "SIGKILL": "killed (the out-of-memory killer, or someone's kill -9)",
            "SIGSEGV": "a crash in native code (segmentation fault)",
            "SIGABRT": "an abort in native code",
            "SIGBUS": "a bus error in native code (often a truncated memory-mapped file)",
        }.get(name, "a signal")
        return f"was killed by {name} ({cause})"
    return f"exited with code {code} (sys.exit or os._exit in the stage code?)"


class WorkerProcess:
    """One worker process running one step's function over batches of items."""

    def __init__(
        self,
        op: str,
        fn: Any,
        init: Any,
        label: str,
        stopping: Callable[[], bool] = lambda: False,
        attach: Callable[[WorkerProcess], None] | None = None,
        confirm: bool = True,
    ) -> None:
        """Starts a worker and loads the step; ``attach(self)`` is called first, so that the
        caller can :meth:`interrupt` a start in progress. ``confirm``: see :meth:`setup`."""
        method = start_method()
        # Names the blocks this worker writes in the arena: unique among every process on it
        # (a worker that runs a pipeline of its own starts workers on the same arena).
        self.tag = _shm.arena().new_tag()
        try:
            self.proc = _start_process(method, self._new_channels(), self.tag)
        except _zygote.Abandoned as e:
            # A late child of the stopped server may hold those rings: new ones, and a fresh
            # interpreter (the next worker tries a new server).
            _warn_fallback(str(e))
            self.proc = _start_process("spawn", self._new_channels(), self.tag)
        self.interrupted = False  # see interrupt
        self.unconfirmed = False  # a setup was sent whose answer is not read yet
        # The keys of the pickled functions (and inits) the worker keeps, and their sizes:
        # a warm worker is sent an unchanged function's key alone.
        self.holds: OrderedDict[bytes, int] = OrderedDict()
        self.stage: str | None = None  # the step's name, in its log records (attach sets it)
        if attach is not None:
            attach(self)
        self.setup(op, fn, init, label, stopping, confirm)

    def _new_channels(self) -> list[int]:
        """New rings and word for the worker; their fds, with the arena's, in the order
        ``_worker.main`` takes them."""
        self.to_child = Ring(RING_BYTES)
        self.from_child = Ring(RING_BYTES)
        # The index in its batch of the item the worker runs: -1 before the first, the batch's
        # length after the last. Read only after the worker died.
        self.at = Word()
        self.at[0] = RECEIVING
        self._parts: list[bytes] = []  # the frames of a reply begun (a writer may pause mid-reply)
        self._stash: deque[Any] = deque()  # replies read while sending (see _sending)
        return [self.to_child.fd, self.from_child.fd, self.at.fd, _shm.arena().fd]

    def setup(
        self,
        op: str,
        fn: Any,
        init: Any,
        label: str,
        stopping: Callable[[], bool],
        confirm: bool = True,
    ) -> None:
        """Loads a step into the worker (again, for a warm worker); stops it if that fails.
        Without ``confirm``, it does not wait for the worker's answer: batches can be queued
        behind the setup at once, and :meth:`confirm` (which :meth:`receive` and
        :func:`give_back` call first) reads the answer, raising what ``init`` raised."""
        self.label = label
        self.stopping = stopping
        try:
            fn = fn if isinstance(fn, Packed) else pack(fn, label)
            init = init if isinstance(init, Packed) else pack(init, label)
            # The parent's sys.path, so that functions pickled by reference (from modules the
            # parent imported: a test file, a package under development) import in the child.
            setup = Setup(
                op,
                self._offer(fn),
                self._offer(init),
                sys.path,
                self._kept(),
                _output.log_levels(),
            )
            send_bytes(
                self.to_child,
                pickle.dumps(setup, protocol=5),
                check=lambda: self._check_alive(lambda: "starting"),
            )
        except BaseException:
            self.stop()
            raise
        self.unconfirmed = True
        if confirm:
            self.confirm()

    def _offer(self, packed: Packed) -> tuple[bytes, bytes | None]:
        """What a setup says of a function: its key, and its bytes if the worker has not got
        them yet (a warm worker keeps the last few it was sent: :data:`KEEP`)."""
        held = self.holds
        if packed.key in held:
            held.move_to_end(packed.key)
            return packed.key, None
        held[packed.key] = len(packed.data)
        return packed.key, packed.data

    def _kept(self) -> list[bytes]:
        """Which functions the worker keeps after this setup (the others it drops): the last
        :data:`KEEP` it was offered, within :data:`KEEP_BYTES` but for the two of this setup."""
        held = self.holds
        while len(held) > KEEP or (
            len(held) > 2 and sum(held.values()) - sum(list(held.values())[-2:]) > KEEP_BYTES
        ):
            held.popitem(last=False)
        return list(held)

    def confirm(self) -> None:
        """Reads the worker's answer to the last setup, if not read yet: raises (and stops the
        worker) if loading the step or running ``init`` failed, or the worker died starting."""
        if not self.unconfirmed:
            return
        self.unconfirmed = False
        try:
            reply = self._wait_reply(
                START_TIMEOUT, what=self._starting, until_read=lambda: self.at[0] == RECEIVING
            )
            if type(reply) is not Ready:
                raise_failure(reply)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    @staticmethod
    def encode(batch: Batch, slot: Slot) -> tuple[bytes, list[Block]]:
        """The request for ``batch``, pickled, and the shared-memory blocks of its large
        buffers, to keep until the worker answered; an item that does not pickle is named in
        ``slot.index``."""
        try:
            # Pickled here, not in send_message: a failure's traceback then holds no ring.
            payload, descs, keep = batch.encode()
            return pickle.dumps(Work(batch.keys, payload, descs), protocol=5), keep
        except Exception as e:
            e.add_note("pipeflow: an item could not be pickled to be sent to the worker process")
            slot.index = first_unpicklable(batch.values)
            raise

    def send(self, request: bytes) -> None:
        """Queues an encoded request for the worker; it answers requests in order. A request
        larger than the room in the ring waits for the worker to read: if it dies meanwhile,
        this raises ``WorkerCrashed`` (or ``Stopped``, if the run stopped)."""
        send_bytes(self.to_child, request, check=self._sending)

    def _sending(self) -> None:
        """Between the waits of a request for room in the worker's ring: a worker blocked
        writing its output (an ``init`` that prints a lot) reads no request, so its output is
        taken meanwhile; replies read with it wait in the stash for :meth:`_wait_reply`."""
        self._check_alive(lambda: "sending a batch")
        while (reply := self._drain()) is not None:
            self._stash.append(reply)

    def _check_alive(self, what: Callable[[], str]) -> None:
        """Raises if the run stopped (killing the worker) or the worker died."""
        if self.stopping():
            self.kill()
            raise Stopped(f"{self.label}: the run stopped; the worker process was killed")
        code = self.proc.poll()
        if code is not None:
            raise WorkerCrashed(
                f"{self.label}: the worker process (pid {self.proc.pid}) "
                f"{_describe_exit(code)} while {what()}"
            )

    def receive(
        self,
        batch: Batch,
        timeout: float | None,
        slot: Slot,
        name: Callable[[int], str] | None = None,
    ) -> tuple[Batch, int, float]:
        """Waits for the reply to the oldest request (for ``batch``). Returns the output batch,
        the items run, and the seconds the worker spent on the batch (unpickling, running,
        pickling: its own clock, so waits in the rings and in the parent are not counted).
        ``name(i)`` says which item the ``i``-th of the batch is, for a crash or timeout
        message. On an error, ``slot.index`` is the index in ``batch`` of the item it concerns
        (for a crash or a timeout, the item the worker held)."""
        slot.index = None
        slot.shown = None
        self.confirm()
        try:
            reply = self._wait_reply(timeout, what=lambda: self._doing(len(batch), name))
        except (WorkerCrashed, TimeoutError):
            at = self.at[0]
            slot.index = at if 0 <= at < len(batch) else None
            raise
        if type(reply) is Done:
            blocks = _shm.adopt(reply.descs, reply.lent)
            return (
                Batch.encoded(reply.keys, reply.payload, reply.size, blocks),
                reply.n,
                reply.busy,
            )
        slot.index = reply.item
        slot.shown = reply.shown
        raise_failure(reply)
        raise AssertionError("unreachable")

    def _doing(self, n: int, name: Callable[[int], str] | None) -> str:
        """What the worker was doing, from its shared word (read after it died or was killed)."""
        at = self.at[0]
        if 0 <= at < n:
            if name is None:
                return f"running item {at} of a batch of {n}"
            return f"running {name(at)}" + (f" (item {at} of a batch of {n})" if n > 1 else "")
        if at == n:
            return f"sending the results of a batch of {n} item(s)"
        return f"receiving a batch of {n} item(s)"

    def _starting(self) -> str:
        if self.at[0] == LOADING:
            return "loading the step (unpickling its function, running its init)"
        return "starting"

    def _wait_reply(
        self,
        timeout: float | None,
        what: Callable[[], str],
        until_read: Callable[[], bool] | None = None,
    ) -> Any:
        """The worker's next reply. Past ``timeout``, the worker is killed (``ItemTimeout``);
        with ``until_read``, only while ``until_read()`` holds: the timeout stops counting once
        the worker has read the request (it then loads the step, for as long as that takes)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._stash:
                return self._stash.popleft()
            try:
                reply = self._next(POLL)
                if reply is not None:
                    return reply
                # Output, forwarded: the checks still run (a worker that prints without end
                # is watched, timed and stopped all the same).
            except TimeoutError:
                pass
            except ChannelClosed:
                # The child closed its end (it is exiting: its status will say why), or a stop
                # interrupted this wait. Either way, do not spin on the closed ring.
                if not self.stopping():
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(POLL)
            if not self.stopping() and self.proc.poll() is not None:
                # What the worker sent before it died is still in the ring: its output (the
                # parent's streams get it before the crash is reported), a reply it finished.
                reply = self._drain()
                if reply is not None:
                    return reply
            self._check_alive(what)
            if deadline is not None and until_read is not None and not until_read():
                deadline = None  # read: no limit from now on
            if deadline is not None and time.monotonic() >= deadline:
                # A reply that came since the wait above (the worker read the request, and
                # answered, in between) is taken, not lost to a kill.
                reply = self._drain()
                if reply is not None:
                    return reply
                self.kill()
                raise ItemTimeout(
                    f"{self.label}: no reply within timeout={timeout} s while {what()}; "
                    f"the worker process (pid {self.proc.pid}) was killed"
                )

    def _next(self, timeout: float) -> Any:
        """The next message: a reply, or None for output (forwarded). Raises ``TimeoutError``
        when none comes in ``timeout``, ``ChannelClosed`` when the ring is closed and empty."""
        message = recv_message(self.from_child, timeout, self._parts)
        if _output.forward(message, self.label, self.stage):
            return None
        return message

    def _drain(self) -> Any:
        """Forwards the output waiting in the ring up to the first reply, which it returns
        (None: the ring holds no whole message more)."""
        with contextlib.suppress(TimeoutError, ChannelClosed):
            while True:
                reply = self._next(0)
                if reply is not None:
                    return reply
        return None

    def stop(self, timeout: float = 5.0) -> None:
        """Asks the worker to exit, makes sure it did (killing it past ``timeout``), and
        releases both rings (their memfds close with them). Stopping it again does nothing."""
        if self.from_child is _CLOSED:
            return
        if self.proc.poll() is None:
            try:
                self.to_child.close_write()
                self._wait_exit(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._drop_unread_replies()
        _shm.reclaim(self.tag)  # the blocks it was writing, or sent in a reply nobody read
        self.from_child.close_read()
        # Drop the rings now, not when this object goes: a traceback may keep it alive.
        self.to_child = self.from_child = self.at = _CLOSED

    def _wait_exit(self, timeout: float) -> None:
        """Waits for the worker to exit, forwarding its output meanwhile (its last words may
        wait for room in a full ring); ``subprocess.TimeoutExpired`` past ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self._drop_unread_replies()
            try:
                self.proc.wait(max(0.0, min(POLL, deadline - time.monotonic())))
                return
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise

    def _drop_unread_replies(self) -> None:
        """Forwards the output left in the ring, and frees the shared-memory blocks of whole
        replies left there (a stopped run)."""
        with contextlib.suppress(Exception):  # a closed ring, a reply cut short by a kill
            while (reply := self._stash.popleft() if self._stash else self._drain()) is not None:
                if type(reply) is Done:  # adopted and dropped: freed (lent ones carry nothing)
                    _shm.adopt([d for i, d in enumerate(reply.descs) if i not in reply.lent])

    def interrupt(self) -> None:
        """Wakes a thread waiting in :meth:`receive` at once (it then sees that the run stopped).
        It closes the reply ring, so this worker cannot be used again: only stop it."""
        self.interrupted = True
        with contextlib.suppress(ChannelClosed):  # already stopped
            self.from_child.close_write()

    def kill(self) -> None:
        """Kills the worker at once and reaps it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


# ---------------------------------------------------------------------------- the warm set

MAX_IDLE = max(2, 2 * (os.cpu_count() or 1))
_idle: list[WorkerProcess] = []
_idle_lock = threading.Lock()


def lease(
    op: str,
    fn: Any,
    init: Any,
    label: str,
    stopping: Callable[[], bool],
    attach: Callable[[WorkerProcess], None] | None = None,
) -> WorkerProcess:
    """A worker loaded with this step: an idle one from the warm set if any is alive (a second
    run pays no interpreter start-up), else a new one. ``attach`` as for
    :class:`WorkerProcess`. The setup is not confirmed (see :meth:`WorkerProcess.setup`): the
    first batch goes right behind it, without waiting for a round trip."""
    while True:
        with _idle_lock:
            worker = _idle.pop() if _idle else None
        if worker is None:
            return WorkerProcess(op, fn, init, label, stopping, attach, confirm=False)
        if worker.proc.poll() is None and not worker.interrupted:
            if attach is not None:
                attach(worker)
            worker.setup(op, fn, init, label, stopping, confirm=False)
            return worker
        worker.stop()


def give_back(worker: WorkerProcess) -> None:
    """Returns a worker that finished its run cleanly to the warm set (or stops it). A setup it
    never confirmed (a run with no items for it) is confirmed first, so the next run reads the
    answer to its own."""
    if worker.proc.poll() is None and not worker.interrupted:
        try:
            worker.confirm()
        except Exception:
            return  # it failed to start, and is stopped
        with _idle_lock:
            if len(_idle) < MAX_IDLE:
                _idle.append(worker)
                return
    worker.stop()


def shutdown_idle() -> None:
    """Stops every idle worker (at exit; tests call it to count what a run left behind)."""
    with _idle_lock:
        workers = _idle[:]
        _idle.clear()
    for worker in workers:
        worker.stop()


def _forget_idle_after_fork() -> None:
    global _idle_lock
    _idle_lock = threading.Lock()
    _idle.clear()  # the parent's children: not ours to stop


_pickle_mp_main_by_value()
_runtime.after_fork("workers", _forget_idle_after_fork)
_runtime.at_exit("workers", shutdown_idle)
