"""The process-wide work-stealing pool that runs thread stages and group tasks.

Created on first use. Threads start on demand and retire after ``KEEP_ALIVE`` seconds idle.
After ``os.fork()`` the child forgets the parent's pool (its threads do not exist there) and makes
a new one on first use; at interpreter exit the pool is shut down.
"""

from __future__ import annotations

import atexit
import os
import threading

from ._core import Pool

__all__ = ["default_pool", "shutdown_default_pool"]

MAX_THREADS = 1024
KEEP_ALIVE = 10.0
EXIT_GRACE = 5.0

_lock = threading.Lock()
_pool: Pool | None = None


def default_pool() -> Pool:
    """The shared pool, created on first use."""
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = Pool(max_threads=MAX_THREADS, keep_alive=KEEP_ALIVE)
            pool = _pool
    return pool


def shutdown_default_pool(timeout: float | None = None) -> bool:
    """Shuts the shared pool down, waiting up to ``timeout`` seconds for its threads to exit.

    Returns True if every thread exited. The next use creates a new pool.
    """
    global _pool
    with _lock:
        pool, _pool = _pool, None
    return True if pool is None else pool.shutdown(timeout)


def _after_fork_in_child() -> None:
    global _pool, _lock
    _lock = threading.Lock()
    if _pool is not None:
        _pool._abandon_after_fork()
        _pool = None


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(shutdown_default_pool, EXIT_GRACE)
