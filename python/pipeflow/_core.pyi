"""Typing stubs for the Rust extension ``pipeflow._core``."""

from collections.abc import Callable, Iterator, Sequence
from typing import Any, final

__all__ = ["Arena", "Block", "Channel", "Pool", "Ring", "Tracked", "Word", "select"]

@final
class Channel:
    """A bounded multi-producer multi-consumer channel with Go's rules.

    ``capacity`` items are buffered (at most ``MAX_CAPACITY``); 0 makes a rendezvous channel
    (each send waits for a receiver). The producer closes; receivers drain what was sent, then
    see the end (``recv`` raises :class:`~pipeflow.ChannelClosed`, iteration stops). Sending on
    a closed channel raises :class:`~pipeflow.ChannelClosed`. Every blocking call releases the
    GIL and stays interruptible by Ctrl-C.

    Example:
        >>> import pipeflow as pf
        >>> ch = pf.Channel(2)
        >>> ch.send("a"); ch.send("b"); ch.close()
        True
        >>> list(ch)
        ['a', 'b']
    """

    MAX_CAPACITY: int
    """The largest capacity (the buffer is allocated whole when the channel is made)."""

    def __new__(cls, capacity: int = 0) -> Channel: ...
    @property
    def capacity(self) -> int:
        """The buffer size given at creation (0: a rendezvous channel)."""
    @property
    def closed(self) -> bool:
        """True once ``close()`` was called (items sent before may still be buffered)."""
    def __len__(self) -> int:
        """How many items are buffered now."""
    def send(self, item: Any, timeout: float | None = None) -> None:
        """Sends ``item``, blocking while the channel is full.

        Args:
            item: any Python object (the receiver gets this object, not a copy).
            timeout: seconds to wait for room; None waits as long as it takes.

        Raises:
            TimeoutError: the channel stayed full for ``timeout`` seconds.
            ChannelClosed: the channel is closed, or was closed while this call waited.
        """
    def try_send(self, item: Any) -> bool:
        """Sends ``item`` if the channel has room now, without blocking.

        Returns:
            True if it was sent; False if the channel is full (at capacity 0: if no receiver waits).

        Raises:
            ChannelClosed: the channel is closed.
        """
    def recv(self, timeout: float | None = None) -> Any:
        """Receives the next item, blocking while the channel is empty.

        Args:
            timeout: seconds to wait for an item; None waits as long as it takes.

        Returns:
            The item, in the order items were sent (by one sender).

        Raises:
            TimeoutError: the channel stayed empty for ``timeout`` seconds.
            ChannelClosed: the channel is closed and every item sent before was received.
        """
    def try_recv(self) -> tuple[bool, Any]:
        """Receives an item if one is buffered now, without blocking.

        Returns:
            ``(True, item)``, or ``(False, None)`` if the channel is empty.

        Raises:
            ChannelClosed: the channel is closed and drained.
        """
    def close(self) -> bool:
        """Closes the channel: receivers drain what was sent, then see the end.

        Every blocked sender wakes and raises :class:`~pipeflow.ChannelClosed`, as does every
        later send; every blocked receiver wakes. Closing again is allowed (Go's close panics).

        Returns:
            True if this call closed the channel; False if it was closed already.
        """
    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...

def select(channels: Sequence[Channel], timeout: float | None = None) -> tuple[int, Any]:
    """Receives from whichever channel has an item first (Go's ``select`` over receives).

    Closed and drained channels are skipped; when every one is, it raises
    :class:`~pipeflow.ChannelClosed`.

    Args:
        channels: the channels to receive from (at least one).
        timeout: seconds to wait; None waits as long as it takes.

    Returns:
        ``(index, item)``: the channel's position in ``channels`` and the item it gave.

    Raises:
        TimeoutError: no channel had an item within ``timeout`` seconds.
        ChannelClosed: every channel is closed and drained.

    Example:
        >>> import pipeflow as pf
        >>> a, b = pf.Channel(1), pf.Channel(1)
        >>> b.send("from b")
        >>> pf.select([a, b])
        (1, 'from b')
    """

@final
class Pool:
    """The work-stealing pool that runs every thread stage and group task.

    Threads start on demand, up to ``max_threads``, and retire after ``keep_alive`` idle
    seconds. A job holds the GIL only while its Python code runs.
    """

    def __new__(cls, max_threads: int = 1024, keep_alive: float = 10.0) -> Pool: ...
    def submit(self, func: Callable[[], object]) -> None:
        """Runs ``func()`` on a pool thread; its exceptions go to ``sys.unraisablehook`` (wrap the
        callable to capture them, as ``Group`` does).

        Raises:
            RuntimeError: the pool is shut down, or ``func`` needed a new thread and the OS
                refused one (``func`` then never runs).
        """
    def shutdown(self, timeout: float | None = None) -> bool:
        """Stops accepting jobs, runs the queued ones, and waits up to ``timeout`` seconds (None:
        no limit) for every thread to exit; True if all exited.
        """
    def _abandon_after_fork(self) -> None:
        """After ``os.fork()``, in the child: forgets this pool without touching its state (its
        threads do not exist in the child, and their locks may be held forever).
        """
    @property
    def threads(self) -> int:
        """Threads alive."""
    @property
    def idle(self) -> int:
        """Threads waiting for work."""
    @property
    def running(self) -> int:
        """Jobs running now."""

@final
class Ring:
    """One direction of one lane between two processes: a single-producer single-consumer ring
    of byte frames in an anonymous memfd (nothing in /dev/shm to leak).

    The creator passes ``fd`` to the other process (``pass_fds``), which maps it with
    ``Ring.open(fd)``. Blocking calls wait on a futex without holding the GIL, and stay
    interruptible by Ctrl-C.

    Example:
        >>> from pipeflow._core import Ring
        >>> r = Ring(4096)
        >>> r.push(b"hello")
        >>> r.pop()
        b'hello'
    """

    def __new__(cls, size: int = 1048576) -> Ring: ...
    @staticmethod
    def open(fd: int) -> Ring:
        """Maps a ring created by another process from its memfd (duplicated, not taken)."""
    @property
    def fd(self) -> int:
        """The memfd's descriptor, to pass to the other process (``pass_fds``)."""
    @property
    def max_frame(self) -> int:
        """The longest frame, in bytes (half the ring)."""
    def push(self, data: bytes, timeout: float | None = None) -> None:
        """Appends a frame, waiting for room (``TimeoutError`` after ``timeout`` seconds).

        Raises:
            ChannelClosed: the reader closed the ring.
            ValueError: the frame is longer than ``max_frame``.
            OSError: the reader's position is damaged.
            RuntimeError: another thread is pushing.
        """
    def pop(self, timeout: float | None = None) -> bytes:
        """Takes the next frame, waiting for one (``TimeoutError`` after ``timeout`` seconds).

        A writer killed before it closed looks like one that is slow: wait with a timeout and
        check the writer process (the engine watches its workers).

        Raises:
            ChannelClosed: the writer closed the ring and everything was read.
            OSError: a frame header is damaged.
            RuntimeError: another thread is popping.
        """
    def close_write(self) -> None:
        """The producer's close: the reader drains, then sees the end."""
    def close_read(self) -> None:
        """The consumer's close: pushes fail from now on."""

@final
class Word:
    """One ``int`` (64-bit) in shared memory: a worker process stores the index of the item it
    is about to run, and the parent reads it if the worker dies.

    It reads and writes as a one-item sequence (``w[0]``), so the engine's per-item loops can
    use it as the slot where they note the item in hand. The creator passes ``fd`` to the
    other process, which maps it with ``Word.open(fd)``.

    Example:
        >>> from pipeflow._core import Word
        >>> w = Word()
        >>> [abs(v) for v in w.track([-1, -2, -3])]
        [1, 2, 3]
        >>> w[0]  # the index of the last item run
        2
    """

    def __new__(cls) -> Word: ...
    @staticmethod
    def open(fd: int) -> Word:
        """Maps a word created by another process from its memfd (duplicated, not taken)."""
    @property
    def fd(self) -> int:
        """The memfd's descriptor, to pass to the other process."""
    def __len__(self) -> int: ...
    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...
    def track(self, values: list[Any]) -> Tracked:
        """An iterator over ``values`` that stores each item's index in the word as it yields it.

        After ``[f(v) for v in w.track(values)]`` raised, ``w[0]`` is the index of the item
        that raised: ``map`` at a comprehension's speed (the interpreter calls ``f`` without
        building an argument tuple, which a call from here would). By index: it stops at the
        list's end, even if the list changes meanwhile.
        """

@final
class Tracked:
    """The iterator :meth:`Word.track` returns."""

    def __iter__(self) -> Tracked: ...
    def __next__(self) -> Any: ...

_Desc = tuple[int, int, int, int]
"""A block (or a byte range inside one) as named in a message: ``(slot, gen, start, len)``."""

@final
class Arena:
    """A shared-memory arena: blocks of one memfd that processes allocate, share and free.

    Blocks are whole pages; the last reference to a block frees it and returns its pages to the
    OS. A process killed at any instant cannot wedge the arena (its mutex is robust); the blocks
    a dead writer had not shared are freed by :meth:`reclaim`. The creator passes ``fd`` to other
    processes, which map it with ``Arena.open(fd)``.

    Example:
        >>> from pipeflow._core import Arena
        >>> arena = Arena(1 << 20)
        >>> block = arena.empty(10, 0)
        >>> memoryview(block)[:3] = b"abc"
        >>> bytes(arena.adopt(block.desc, incref=True))[:3]
        b'abc'
        >>> del block
        >>> arena.stats()["blocks"]
        0
    """

    def __new__(cls, size: int, slots: int = 4096) -> Arena: ...
    @staticmethod
    def open(fd: int) -> Arena:
        """Maps an arena created by another process from its memfd (duplicated, not taken)."""
    @property
    def fd(self) -> int:
        """The memfd's descriptor, to pass to other processes."""
    @property
    def size(self) -> int:
        """Bytes available for blocks."""
    @property
    def slots(self) -> int:
        """How many blocks may be live at once."""
    def put(
        self, buffer: Any, owner: int, lent: set[tuple[int, int]] | None = None
    ) -> _Desc | None:
        """A descriptor for the bytes of a contiguous byte buffer (``PickleBuffer.raw()``),
        carrying one reference for a message.

        The block holding them if they live in this arena already, else a new block they are
        copied into (the GIL released); ``None`` when the arena has no room. A block in ``lent``
        (``(slot, gen)`` pairs: blocks the receiver of the message holds itself) gets no
        reference: the receiver adds one when it takes the message.
        """
    def adopt(self, desc: _Desc, incref: bool = False) -> Block:
        """A :class:`Block` holding the reference ``desc`` carried (or a new one with ``incref``:
        the message keeps its own); the block is shared from now on (see :meth:`reclaim`).

        Raises:
            ValueError: ``desc`` names no live block.
        """
    def borrow(self, desc: _Desc) -> Block:
        """A :class:`Block` that holds no reference (the sender of the message keeps the block
        alive until it has the answer), unless :meth:`Block.keep` takes one.

        Raises:
            ValueError: ``desc`` names no live block.
        """
    def empty(self, nbytes: int, owner: int) -> Block | None:
        """A new block of ``nbytes``, or ``None`` when the arena has no room. Its bytes are
        arbitrary (a reused block holds what was there), as ``np.empty``'s are.
        """
    def set_cache_limit(self, nbytes: int) -> None:
        """How many bytes of freed blocks may stay resident so that new blocks reuse their pages
        (a fresh page of shared memory costs a fault and zeroing); 0 returns them at once.
        """
    def trim(self) -> None:
        """Returns the pages of every free block to the OS."""
    def new_tag(self) -> int:
        """A new owner tag for a writer process, unique among every process that maps this
        arena (never 0, the creator's).
        """
    def reclaim(self, owner: int) -> int:
        """Frees the unshared blocks of a dead process tagged ``owner``; returns how many."""
    def stats(self) -> dict[str, int]:
        """``live_bytes``, ``blocks`` and ``resident_bytes`` (memory the memfd holds)."""

@final
class Block:
    """One reference to a block of an :class:`Arena`; its bytes through the buffer protocol
    (writable), so that a numpy array can be a view on it, keeping it alive through its base.
    The reference goes when this object does.
    """

    @property
    def desc(self) -> _Desc:
        """``(slot, gen, start, len)``, to name the block in a message."""
    @property
    def owned(self) -> bool:
        """Whether this object holds a reference (not :meth:`Arena.borrow`-ed, or kept)."""
    def keep(self) -> None:
        """Takes a reference of its own, for a borrowed block still in use (nothing to do if it
        holds one already).

        Raises:
            ValueError: the block was freed meanwhile (its lender dropped it).
        """
    def __len__(self) -> int: ...
