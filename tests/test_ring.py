"""The shared-memory ring from Python, between two real processes."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import time

import pytest

import pipeflow as pf
from pipeflow._core import Ring

PRODUCER = """
    import sys
    from pipeflow._core import Ring
    ring = Ring.open(int(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        ring.push(i.to_bytes(4, "little") * (1 + i % 7))
    ring.close_write()
"""


def test_frames_cross_to_a_child_process_in_order() -> None:
    ring = Ring(4096)
    n = 20_000
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(PRODUCER), str(ring.fd), str(n)],
        pass_fds=[ring.fd],
    )
    try:
        for i in range(n):
            assert ring.pop(timeout=30) == i.to_bytes(4, "little") * (1 + i % 7)
        with pytest.raises(pf.ChannelClosed):
            ring.pop(timeout=30)
    finally:
        assert child.wait(timeout=30) == 0


def test_timeouts_and_limits() -> None:
    ring = Ring(64)
    assert ring.max_frame == 24
    with pytest.raises(TimeoutError):
        ring.pop(timeout=0.01)
    with pytest.raises(ValueError, match="exceeds the ring's max_frame"):
        ring.push(b"x" * 25)
    ring.push(b"a" * 24)
    ring.push(b"b" * 24)
    with pytest.raises(TimeoutError):
        ring.push(b"c", timeout=0.01)
    ring.close_read()
    with pytest.raises(pf.ChannelClosed):
        ring.push(b"d")


def test_open_rejects_a_descriptor_that_is_not_a_ring(tmp_path: object) -> None:
    import os

    r, w = os.pipe()
    try:
        with pytest.raises(OSError):
            Ring.open(r)
    finally:
        os.close(r)
        os.close(w)


def test_open_refuses_a_memfd_whose_size_a_peer_could_change() -> None:
    """pipeflow's memfds are sealed against resizing (a peer's ftruncate would kill the other
    side with SIGBUS); one that is not is refused."""
    import os

    fd = os.memfd_create("not-sealed")
    try:
        os.ftruncate(fd, 1 << 16)
        with pytest.raises(OSError, match="not sealed"):
            Ring.open(fd)
        ring = Ring(4096)
        with pytest.raises(OSError):  # and pipeflow's own cannot be resized
            os.ftruncate(ring.fd, 1 << 20)
    finally:
        os.close(fd)


def test_two_ring_objects_over_one_memfd_share_its_ends() -> None:
    """Opening a ring again in the same process gives the same two ends, not a second producer
    that would write over the first one's frames."""
    first = Ring(4096)
    second = Ring.open(first.fd)  # opened before anything was pushed
    first.push(b"one")
    first.push(b"two")
    second.push(b"three")
    assert [second.pop(timeout=1) for _ in range(3)] == [b"one", b"two", b"three"]
    with pytest.raises(TimeoutError):
        first.pop(timeout=0)


def test_small_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="size must be >= 64"):
        Ring(10)


def test_a_second_thread_on_the_same_end_is_an_error_not_a_race() -> None:
    import threading

    ring = Ring(64)
    while True:  # fill it
        try:
            ring.push(b"x" * 8, timeout=0)
        except TimeoutError:
            break
    pushed = threading.Event()

    def writer() -> None:
        ring.push(b"y" * 8, timeout=10)  # waits for room, holding the writer's end
        pushed.set()

    t = threading.Thread(target=writer)
    t.start()
    try:
        with pytest.raises(RuntimeError, match="one writer and one reader"):
            for _ in range(1000):  # until the other thread is inside its push
                with contextlib.suppress(TimeoutError):  # full: it is not inside yet
                    ring.push(b"z", timeout=0)
                time.sleep(0.005)
        assert ring.pop(timeout=1) == b"x" * 8  # room: the waiting push goes through
        assert pushed.wait(10)
    finally:
        t.join()
