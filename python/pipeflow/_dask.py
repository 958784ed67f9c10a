"""The Dask backend: a plan's steps run as tasks on Dask's distributed scheduler, with the local
backend's semantics (order, errors, cancellation, bounded in-flight work). See docs/dask.md.

:class:`DaskBackend` is what users make and pass as ``backend=`` (or name: ``"dask"``): it
finds the client of a run (given, connected to by address, the current one, or that of a
``LocalCluster`` it starts) and closes what it opened. The run itself is ``_dask_run``'s (the
client's side, in the caller's thread), its bookkeeping ``_dask_chunks``'s, and what runs on
the workers ``_dask_tasks``'s. Importing this module imports no Dask: ``distributed`` is
imported when a backend is made or run.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from ._backend import Progress, Source, register
from ._context import Context
from ._dask_tasks import pack_functions
from ._plan import Plan

if TYPE_CHECKING:
    from distributed import Client, LocalCluster

__all__ = ["DaskBackend"]


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise ImportError(
            "the Dask backend needs Dask's distributed scheduler: pip install 'pipeflow[dask]' "
            "(or dask[distributed])"
        ) from e
    return distributed


class DaskBackend:
    """Runs a pipeline's steps as tasks on a Dask cluster, with the semantics of the local
    backend (see docs/dask.md).

    Args:
        client: a ``distributed.Client`` to run on (it stays open after the run).
        address: the address of a running Dask scheduler (``"tcp://host:8786"``) to connect
            to; an unreachable one fails the run at once, naming it.
        n_workers: with neither, the worker processes of the ``LocalCluster`` this backend
            starts (default: Dask's, one per core), each with one thread.
        dashboard: with neither, whether that cluster serves Dask's dashboard (False), or
            the address it serves it on (``":8787"``).
        connect_timeout: seconds to wait for the scheduler at ``address``.

    With neither ``client`` nor ``address``, a run uses the current Dask client if there is one
    (as ``dask.compute`` does: the last ``Client`` made, or that of a ``with Client():``
    block); else it starts a ``LocalCluster`` of worker processes for the run and closes it
    after. Used as a context manager (or after :meth:`start`), the backend keeps what it
    connected or started for every run until :meth:`close`.

    Example:
        >>> import pipeflow as pf
        >>> backend = pf.DaskBackend(address="tcp://127.0.0.1:8786")  # doctest: +SKIP
        >>> pf.Pipeline().stage(abs).run([-1, 2], backend=backend)  # doctest: +SKIP
        [1, 2]
        >>> with pf.DaskBackend(n_workers=2) as backend:  # doctest: +SKIP
        ...     pf.Pipeline().stage(abs).run([-3], backend=backend)
        [3]
    """

    name = "dask"

    def __init__(
        self,
        client: Client | None = None,
        address: str | None = None,
        *,
        n_workers: int | None = None,
        dashboard: bool | str = False,
        connect_timeout: float = 10.0,
    ) -> None:
        if client is not None and address is not None:
            raise TypeError("give DaskBackend a client or an address, not both")
        if client is not None and not isinstance(client, _distributed().Client):
            raise TypeError(f"client must be a distributed.Client, got {type(client).__name__}")
        if address is not None and not isinstance(address, str):
            raise TypeError(f"address must be a string such as 'tcp://host:8786', got {address!r}")
        if n_workers is not None and (
            isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1
        ):
            raise ValueError(f"n_workers must be an int >= 1 or None, got {n_workers!r}")
        if isinstance(connect_timeout, bool) or not isinstance(connect_timeout, int | float):
            raise TypeError(f"connect_timeout must be a number of seconds, got {connect_timeout!r}")
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0 seconds, got {connect_timeout!r}")
        self.client = client
        self.address = address
        self.n_workers = n_workers
        self.dashboard = dashboard
        self.connect_timeout = float(connect_timeout)
        self._kept: tuple[Client, LocalCluster | None] | None = None  # start() made them
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        where = self.address or (self.client and self.client.scheduler.address) or "local"
        return f"<pipeflow.DaskBackend {where}>"

    # ----------------------------------------------------------------- what a run runs on

    def start(self) -> DaskBackend:
        """Connects (``address``) or starts the ``LocalCluster`` now, and keeps it for every
        run until :meth:`close`; a given ``client`` is used as it is. Returns the backend."""
        with self._lock:
            if self.client is None and self._kept is None:
                self._kept = self._open()
        return self

    def close(self) -> None:
        """Closes what :meth:`start` connected or started (never a client it was given)."""
        with self._lock:
            kept, self._kept = self._kept, None
        if kept is not None:
            _close(*kept)

    def __enter__(self) -> DaskBackend:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def _check_reachable(self) -> None:
        """Fails at once, naming the address, if nothing listens there (a refused connection
        fails now, not after Dask's retries until its connect timeout)."""
        if self.address is None:
            return
        from distributed.comm.addressing import parse_address, parse_host_port

        try:
            scheme, location = parse_address(self.address)
            host, port = parse_host_port(location)
        except Exception as e:
            raise ValueError(f"not a Dask scheduler address: {self.address!r} ({e})") from None
        if scheme not in ("tcp", "tls") or port is None:
            return  # another transport: Dask's own connect says what went wrong
        try:
            with socket.create_connection((host, port), timeout=self.connect_timeout):
                pass
        except OSError as e:
            raise ConnectionError(
                f"the Dask scheduler at {self.address} cannot be reached: {e}"
            ) from None

    def _open(self) -> tuple[Client, LocalCluster | None]:
        """A client to run on, and the cluster it started (None: not ours to close)."""
        distributed = _distributed()
        if self.address is not None:
            self._check_reachable()
            try:
                client = distributed.Client(
                    self.address, timeout=self.connect_timeout, set_as_default=False
                )
            except OSError as e:
                raise ConnectionError(
                    f"could not connect to the Dask scheduler at {self.address}: {e}"
                ) from e
            return client, None
        dashboard = None if self.dashboard is False else self.dashboard
        if dashboard is True:
            dashboard = ":8787"
        cluster = distributed.LocalCluster(
            n_workers=self.n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=dashboard,
            # Without a dashboard the scheduler still serves HTTP (health, metrics): on a port
            # of its own, not 8787 (which another cluster may hold: a warning, then another).
            scheduler_kwargs={} if dashboard is not None else {"dashboard_address": ":0"},
        )
        try:
            client = distributed.Client(cluster, set_as_default=False)
        except BaseException:
            cluster.close()
            raise
        return client, cluster

    def _acquire(self) -> tuple[Client, tuple[Client, LocalCluster | None] | None]:
        """The client of a run, and what the run opened for itself (closed after it)."""
        if self.client is not None:
            return self.client, None
        with self._lock:
            kept = self._kept
        if kept is not None:
            return kept[0], None
        if self.address is None:
            try:
                return _distributed().default_client(), None
            except ValueError:
                pass  # no current client: a cluster for this run
        opened = self._open()
        return opened[0], opened

    # ----------------------------------------------------------------- the Backend protocol

    def stream(
        self, plan: Plan, source: Source, ctx: Context, progress: Progress | None
    ) -> Generator[list[Any], None, None]:
        _distributed()
        if self._kept is None and self.client is None:
            self._check_reachable()
        try:
            steps, functions = pack_functions(plan.steps)
        except Exception as e:
            raise TypeError(
                f"a step's function (or init) could not be pickled to send to Dask: {e}; define "
                "it at the top level of a module the workers can import, or make what it "
                "refers to picklable"
            ) from e
        job = (steps, functions)
        return self._released(plan, source, ctx, progress, job)

    def _released(
        self,
        plan: Plan,
        source: Source,
        ctx: Context,
        progress: Progress | None,
        job: tuple[Any, bytes],
    ) -> Generator[list[Any], None, None]:
        try:
            client, opened = self._acquire()
        except BaseException as e:
            ctx.cancel(f"the run raised {type(e).__name__}")
            raise
        from ._dask_run import DaskRun

        try:
            yield from DaskRun(client, plan, source, ctx, job).released(progress)
        finally:
            if opened is not None:
                _close(*opened)


register("dask", DaskBackend)


def _close(client: Client, cluster: LocalCluster | None) -> None:
    try:
        client.close()
    finally:
        if cluster is not None:
            cluster.close()
