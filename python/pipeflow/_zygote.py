"""The fork server: one process, started once, that forks worker processes on request.

A fresh interpreter takes ~100 ms here to start and import pipeflow; a fork of this server, which
has pipeflow (and cloudpickle) imported already, takes a few. The server is started by
``subprocess`` (a fresh interpreter, whatever threads the parent runs), stays single-threaded, so
forking it is safe, and serves one parent process over a ``socketpair``::

    parent                                       server: the main of this module, on SOCK
      ("fork", id, tag, env, cwd) + fds  ──►       forks; the child runs _worker.main on the fds
      ◄── ("forked", id, pid) + a pidfd            (the child's pidfd: the parent can poll it and
                                                    signal exactly this process)
      ◄── ("exit", pid, code)                      when a child ends: only its parent (the server)
                                                    can reap it, so it relays the exit status

The request carries the parent's environment, working directory, stdout and stderr at that
moment, so a forked worker sees what a worker started by ``subprocess`` then would. The server
ignores SIGINT (Ctrl-C is the parent's to handle; its workers ignore it too: see ``_worker``)
and exits when the parent does: the socket then reads end-of-file. A worker whose server is gone
exits on its own within a second (its parent changed: see ``_worker``).

In the parent, :func:`start` forks a worker and returns a :class:`Forked` handle, which offers
what ``subprocess.Popen`` offers the rest of ``_process``: ``pid``, ``poll``, ``wait``, ``kill``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, NoReturn

from . import _runtime

__all__ = ["UNKNOWN_EXIT", "Abandoned", "Forked", "server", "server_pid", "shutdown", "start"]

UNKNOWN_EXIT = 1 << 16  # the server died before it could relay a worker's exit status
START_TIMEOUT = 60.0  # for the server to start
FORK_TIMEOUT = 60.0  # for it to answer a fork request
NOTICE_TIMEOUT = 5.0  # from a child's end (its pidfd) to the server's notice of its status
_MAX_MESSAGE = 1 << 20
_MAX_FDS = 8
# Not ``-m pipeflow._zygote``: the package imports this module before runpy would run it.
_ENTRY = "import sys; from pipeflow._zygote import main; sys.exit(main(sys.argv[1:]))"


class Abandoned(OSError):
    """A fork request the server did not answer, in time or before it exited. It may have forked
    a child on the request's fds all the same: the server is stopped (SIGKILL), so that such a
    child is orphaned and exits on its own (see ``_worker``), and the caller must not hand those
    fds to another process."""


class Forked:
    """A worker forked by the server: ``subprocess.Popen``'s ``pid``, ``returncode``, ``poll``,
    ``wait`` and ``kill``, through the child's pidfd and the server's exit notices."""

    def __init__(self, server: _Server, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._server = server
        self._pidfd = pidfd
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        """The exit code (negative: the signal) once the process ended, else None."""
        if self.returncode is None and _readable(self._pidfd, 0):
            with self._lock:  # one thread takes the server's notice; the others see its code
                if self.returncode is None:
                    self.returncode = self._server.exit_code(self.pid)
                    self._close()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the process to end; raises ``subprocess.TimeoutExpired`` past ``timeout``."""
        if self.returncode is None and not _readable(self._pidfd, timeout):
            raise subprocess.TimeoutExpired(f"worker process {self.pid}", timeout or 0.0)
        code = self.poll()
        assert code is not None
        return code

    def kill(self) -> None:
        """SIGKILL, to this very process (a pidfd cannot name another that reused the pid)."""
        with self._lock:
            if self.returncode is None and self._pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._close()


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether ``fd`` is readable within ``timeout`` (a pidfd: its process ended). ``poll``,
    not ``select``, which fails on fds from 1024 up. A pidfd already closed (``POLLNVAL``, or
    -1) means that another thread read the status: ``Forked.poll`` then returns it."""
    if fd < 0:
        return True
    waiter = select.poll()
    waiter.register(fd, select.POLLIN)
    return bool(waiter.poll(None if timeout is None else max(0.0, timeout) * 1000))


class _Server:
    """The parent's side of one fork server."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _ENTRY, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.pid = self.proc.pid
        self.alive = True
        self._cond = threading.Condition()
        self._reading = False  # a thread reads the socket (with the condition released)
        self._forked: dict[int, tuple[Any, ...]] = {}  # request id -> its answer
        self._exits: dict[int, int] = {}  # pid -> exit code, relayed by the server
        self._late: set[int] = set()  # pids whose notice did not come in time (see exit_code)
        self._ids = itertools.count()
        self._ready: tuple[Any, ...] | None = None
        try:
            self._pump(lambda: self._ready is not None, START_TIMEOUT)
            if self._ready is None or self._ready[0] != "ready":
                raise OSError(
                    "pipeflow: the fork server did not start"
                    + (f": {self._ready[1]}" if self._ready else "")
                )
        except BaseException:
            self.close()
            raise

    def fork(self, fds: list[int], tag: int) -> Forked:
        """Forks a worker that runs ``_worker.main`` on ``fds`` (in, out, at, arena) and
        ``tag``."""
        request_id = next(self._ids)
        std = [fd for fd in (1, 2) if _is_open(fd)]
        request = ("fork", request_id, tag, dict(os.environ), os.getcwd(), len(std) == 2)
        try:
            socket.send_fds(self.sock, [pickle.dumps(request)], fds + std if len(std) == 2 else fds)
        except OSError as e:
            self._gone()
            raise OSError(f"pipeflow: the fork server is gone ({e})") from e
        self._pump(lambda: request_id in self._forked or not self.alive, FORK_TIMEOUT)
        with self._cond:
            answer = self._forked.pop(request_id, None)
        if answer is None:  # it may have forked a child on these fds all the same
            if not self.alive:
                raise Abandoned("pipeflow: the fork server exited before answering a fork request")
            # Stopped, not left running: a child it forks after this could read the request's
            # rings alongside whatever worker the caller starts instead.
            self.proc.kill()
            self.close()
            raise Abandoned(
                f"pipeflow: the fork server did not answer a fork request within "
                f"{FORK_TIMEOUT:g} s (it was stopped)"
            )
        if answer[0] == "error":
            raise OSError(f"pipeflow: the fork server could not fork a worker: {answer[1]}")
        _, pid, pidfd = answer
        return Forked(self, pid, pidfd)

    def exit_code(self, pid: int) -> int:
        """The exit code of a child whose pidfd said it ended: the server reaps it at once."""
        self._pump(lambda: pid in self._exits or not self.alive, NOTICE_TIMEOUT)
        with self._cond:
            if pid not in self._exits:
                self._late.add(pid)  # its notice, if it ever comes, is dropped
            return self._exits.pop(pid, UNKNOWN_EXIT)

    def _pump(self, done: Any, timeout: float) -> None:
        """Reads the server's messages until ``done()`` or ``timeout``: one thread reads at a
        time, and files every message it reads for whichever thread waits for it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    return
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._reading = True
                self._cond.release()
                try:
                    message = self._receive(min(remaining, 0.5))
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if message is not None:
                    self._file(message)

    def _receive(self, timeout: float) -> tuple[Any, ...] | None:
        if not _readable(self.sock.fileno(), timeout):
            return None
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.sock, _MAX_MESSAGE, _MAX_FDS)
        except OSError:
            data, fds = b"", []
        if not data:  # end of file: the server exited
            for fd in fds:
                os.close(fd)
            return ("gone",)
        message: tuple[Any, ...] = pickle.loads(data)
        return (*message, *fds)

    def _file(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "gone":
            self.alive = False
            self._ready = self._ready or ("gone", "it exited")
        elif kind == "ready" or (kind == "error" and message[1] is None):
            self._ready = message
        elif kind == "forked":
            self._forked[message[1]] = ("forked", message[2], message[3])
        elif kind == "error":
            self._forked[message[1]] = ("error", message[2])
        elif kind == "exit":
            if message[1] in self._late:
                self._late.discard(message[1])
            else:
                self._exits[message[1]] = message[2]

    def _gone(self) -> None:
        with self._cond:
            self.alive = False
            self._cond.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Closes the socket (the server exits on its end of file) and reaps the server."""
        self._gone()
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


_server: _Server | None = None
# Why the server could not start, and when: no new attempt for RETRY_AFTER seconds (workers start
# as fresh interpreters meanwhile), so that a passing failure (no fds left, a machine too loaded
# to start it in time) does not last as long as the process.
_failed: tuple[str, float] | None = None
RETRY_AFTER = 30.0
_server_lock = threading.Lock()


def start(fds: list[int], tag: int) -> Forked:
    """Forks a worker process from the server (started now if none is running)."""
    return server().fork(fds, tag)


def server() -> _Server:
    """The running server, started now if none is (or the last one died)."""
    global _server, _failed
    with _server_lock:
        if _server is not None and (not _server.alive or _server.proc.poll() is not None):
            _server.close()
            _server = None
        if _server is None:
            if _failed is not None and time.monotonic() - _failed[1] < RETRY_AFTER:
                raise OSError(_failed[0])  # it could not start a moment ago
            try:
                _server = _Server()
            except OSError as e:
                _failed = (str(e), time.monotonic())
                raise
            _failed = None
        return _server


def server_pid() -> int | None:
    """The running server's pid, if one runs (tests leave it out of their leak counts)."""
    server = _server
    return server.pid if server is not None and server.alive else None


def shutdown() -> None:
    """Stops the server (at exit, after the idle workers: see ``_runtime``)."""
    global _server
    with _server_lock:
        server, _server = _server, None
    if server is not None:
        server.close()


def _forget_after_fork() -> None:
    """In a process forked from the parent: the server is the parent's, not ours."""
    global _server, _server_lock
    _server_lock = threading.Lock()
    server, _server = _server, None
    if server is not None:
        with contextlib.suppress(OSError):
            server.sock.close()
        server.proc.returncode = 0  # not our child: nothing to reap or warn about


_runtime.after_fork("fork server", _forget_after_fork)
_runtime.at_exit("fork server", shutdown)


# ---------------------------------------------------------------------------- the server


def _serve(sock: socket.socket) -> int:
    import selectors

    me = os.getpid()  # a child's parent (it may be gone before the child asks who that is)
    children: dict[int, int] = {}  # pidfd -> pid
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    sock.send(pickle.dumps(("ready", os.getpid())))
    while True:
        for key, _ in selector.select():
            if key.fileobj is not sock:
                pidfd = key.fd
                pid = children.pop(pidfd)
                selector.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                sock.send(pickle.dumps(("exit", pid, os.waitstatus_to_exitcode(status))))
                continue
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, _MAX_FDS)
            if not data:
                return 0  # the parent is gone (or shut us down): the workers follow by themselves
            request = pickle.loads(data)
            try:
                pid = os.fork()
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                sock.send(pickle.dumps(("error", request[1], str(e))))
                continue
            if pid == 0:
                selector.close()
                sock.close()
                for other in children:
                    os.close(other)
                _run_child(request, fds, me)  # never returns
            for fd in fds:
                os.close(fd)
            pidfd = os.pidfd_open(pid)  # valid: only this process reaps it, and not yet
            children[pidfd] = pid
            selector.register(pidfd, selectors.EVENT_READ)
            socket.send_fds(sock, [pickle.dumps(("forked", request[1], pid))], [pidfd])


def _run_child(request: tuple[Any, ...], fds: list[int], parent: int) -> NoReturn:
    """Runs a forked worker to its end, then exits this process as a fresh interpreter would:
    the ``SystemExit`` unwinds the server's frames and the interpreter shuts down, dropping what
    the worker still holds (the references of shared-memory blocks stage code kept)."""
    code: Any = 1
    try:
        _, _id, tag, env, cwd, with_std = request
        os.environ.clear()
        os.environ.update(env)
        with contextlib.suppress(OSError):
            os.chdir(cwd)
        if with_std:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(fds[4], 1)
            os.dup2(fds[5], 2)
            os.close(fds[4])
            os.close(fds[5])
        from . import _worker

        code = _worker.main([*map(str, fds[:4]), str(tag), str(parent)])
    except SystemExit as e:
        code = 0 if e.code is None else e.code
    except BaseException:
        import traceback

        traceback.print_exc()
    raise _ChildExit(code if isinstance(code, int) else 1)


class _ChildExit(SystemExit):
    """A forked worker's end: nothing of the server may catch it."""


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        # What every worker imports, imported once here.
        import cloudpickle  # noqa: F401

        from . import _worker  # noqa: F401

        threads = len(os.listdir("/proc/self/task"))
        if threads != 1:
            raise OSError(f"the server runs {threads} threads: forking it would not be safe")
    except BaseException as e:
        sock.send(pickle.dumps(("error", None, f"{type(e).__name__}: {e}")))
        return 1
    try:
        return _serve(sock)
    except (BrokenPipeError, ConnectionError):
        return 0  # the parent is gone
