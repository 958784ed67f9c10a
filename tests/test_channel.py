"""Channel behaviour, written from Go's documented channel semantics (not copied from Go's tests).

Go: a buffered channel of capacity N accepts N sends without a receiver; an unbuffered one
(capacity 0) makes each send wait for a receive; close is done by the producer; receivers drain
buffered values after close and then see the end; sending on a closed channel is an error.
"""

from __future__ import annotations

import threading
import time

import pytest

import pipeflow as pf


def test_buffered_channel_holds_capacity_items_without_a_receiver() -> None:
    ch = pf.Channel(3)
    for i in range(3):
        assert ch.try_send(i)
    assert not ch.try_send(3)
    assert len(ch) == 3
    assert ch.capacity == 3
    assert [ch.recv() for _ in range(3)] == [0, 1, 2]


def test_fifo_order_for_a_single_producer() -> None:
    ch = pf.Channel(100)
    for i in range(100):
        ch.send(i)
    assert [ch.recv() for _ in range(100)] == list(range(100))


def test_unbuffered_send_waits_for_a_receiver() -> None:
    ch = pf.Channel(0)
    assert not ch.try_send("x")  # nobody is receiving
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(ch.recv()))
    t.start()
    ch.send("hello")  # completes only when the receiver takes it
    t.join()
    assert got == ["hello"]


def test_unbuffered_send_blocks_until_received() -> None:
    ch = pf.Channel(0)
    done = threading.Event()

    def sender() -> None:
        ch.send(1)
        done.set()

    t = threading.Thread(target=sender)
    t.start()
    assert not done.wait(0.1)  # still blocked: no receiver yet
    assert ch.recv() == 1
    t.join()
    assert done.is_set()


def test_receivers_drain_after_close_then_see_the_end() -> None:
    ch = pf.Channel(4)
    ch.send("a")
    ch.send("b")
    assert ch.close()
    assert ch.closed
    assert ch.recv() == "a"
    assert ch.try_recv() == (True, "b")
    with pytest.raises(pf.ChannelClosed):
        ch.recv()
    with pytest.raises(pf.ChannelClosed):
        ch.try_recv()


def test_iteration_ends_at_close_once_drained() -> None:
    ch = pf.Channel(10)
    for i in range(5):
        ch.send(i)
    ch.close()
    assert list(ch) == [0, 1, 2, 3, 4]
    assert list(ch) == []


def test_send_on_closed_channel_raises() -> None:
    ch = pf.Channel(1)
    ch.close()
    with pytest.raises(pf.ChannelClosed, match="send on a closed channel"):
        ch.send(1)
    with pytest.raises(pf.ChannelClosed):
        ch.try_send(1)


def test_closing_twice_is_allowed_and_reports_who_closed() -> None:
    # Go panics on a second close; pipeflow makes close idempotent and says who closed first.
    ch = pf.Channel(1)
    assert ch.close() is True
    assert ch.close() is False


def test_close_wakes_a_blocked_receiver() -> None:
    ch = pf.Channel(0)
    errors: list[BaseException] = []

    def receiver() -> None:
        try:
            ch.recv()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=receiver)
    t.start()
    time.sleep(0.05)
    ch.close()
    t.join(5)
    assert not t.is_alive()
    assert isinstance(errors[0], pf.ChannelClosed)


def test_close_wakes_a_blocked_sender_with_an_error() -> None:
    ch = pf.Channel(1)
    ch.send("first")
    errors: list[BaseException] = []

    def sender() -> None:
        try:
            ch.send("second")
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=sender)
    t.start()
    time.sleep(0.05)
    ch.close()
    t.join(5)
    assert isinstance(errors[0], pf.ChannelClosed)
    assert list(ch) == ["first"]  # the blocked value was not sent


def test_recv_timeout_raises_timeout_error() -> None:
    ch = pf.Channel(1)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        ch.recv(timeout=0.05)
    assert time.monotonic() - t0 >= 0.04


def test_send_timeout_on_a_full_channel() -> None:
    ch = pf.Channel(1)
    ch.send(1)
    with pytest.raises(TimeoutError):
        ch.send(2, timeout=0.05)
    assert ch.recv() == 1  # the timed-out value was not sent
    assert len(ch) == 0


def test_try_recv_on_empty_open_channel() -> None:
    assert pf.Channel(1).try_recv() == (False, None)


def test_none_is_a_value_like_any_other() -> None:
    ch = pf.Channel(1)
    ch.send(None)
    assert ch.try_recv() == (True, None)


@pytest.mark.parametrize("capacity", [0, 1, 16])
def test_many_producers_and_consumers_lose_nothing(capacity: int) -> None:
    ch = pf.Channel(capacity)
    producers, consumers, per = 4, 4, 2_000
    received: list[list[int]] = [[] for _ in range(consumers)]

    def produce(p: int) -> None:
        for i in range(per):
            ch.send(p * per + i)

    def consume(c: int) -> None:
        received[c].extend(ch)

    cs = [threading.Thread(target=consume, args=(c,)) for c in range(consumers)]
    ps = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in cs + ps:
        t.start()
    for t in ps:
        t.join()
    ch.close()
    for t in cs:
        t.join()
    flat = sorted(x for r in received for x in r)
    assert flat == list(range(producers * per))
    # Each producer's values arrive in the order it sent them, whichever consumer got them.
    for r in received:
        for p in range(producers):
            mine = [x for x in r if x // per == p]
            assert mine == sorted(mine)


def test_select_receives_from_the_ready_channel() -> None:
    a, b = pf.Channel(1), pf.Channel(1)
    b.send("b")
    assert pf.select([a, b]) == (1, "b")
    a.send("a")
    assert pf.select([a, b]) == (0, "a")


def test_select_waits_for_a_later_send() -> None:
    a, b = pf.Channel(0), pf.Channel(0)
    t = threading.Timer(0.05, lambda: b.send(42))
    t.start()
    assert pf.select([a, b], timeout=5) == (1, 42)
    t.join()


def test_select_skips_closed_channels_and_ends_when_all_are() -> None:
    a, b = pf.Channel(1), pf.Channel(1)
    a.close()
    b.send(1)
    b.close()
    assert pf.select([a, b]) == (1, 1)
    with pytest.raises(pf.ChannelClosed):
        pf.select([a, b])


def test_select_timeout() -> None:
    with pytest.raises(TimeoutError):
        pf.select([pf.Channel(0), pf.Channel(1)], timeout=0.05)


def test_select_needs_a_channel() -> None:
    with pytest.raises(ValueError, match="at least one channel"):
        pf.select([])


@pytest.mark.parametrize("bad", [-1, -100, pf.Channel.MAX_CAPACITY + 1, 2**62, 2**70])
def test_out_of_range_capacity_is_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="capacity must be from 0"):
        pf.Channel(bad)


@pytest.mark.parametrize("bad", [True, 1.5, "3"])
def test_a_capacity_that_is_not_an_int_is_rejected(bad: object) -> None:
    with pytest.raises(TypeError, match="capacity must be an int"):
        pf.Channel(bad)  # type: ignore[arg-type]


def test_a_bad_send_timeout_is_an_error_also_when_the_send_would_not_wait() -> None:
    ch = pf.Channel(1)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="timeout"):
            ch.send(1, timeout=bad)
    assert len(ch) == 0  # nothing was sent


def test_select_gives_every_ready_channel_its_turn() -> None:
    a, b = pf.Channel(100), pf.Channel(100)
    for i in range(100):
        a.send(i)
        b.send(i)
    counts = [0, 0]
    for _ in range(100):
        counts[pf.select([a, b])[0]] += 1
    assert min(counts) >= 25  # Go picks at random; pipeflow rotates


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_timeouts_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        pf.Channel(1).recv(timeout=bad)


def test_blocking_recv_releases_the_gil() -> None:
    # While one thread blocks in recv, another keeps running Python code.
    ch = pf.Channel(0)
    counter = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            counter[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    with pytest.raises(TimeoutError):
        ch.recv(timeout=0.2)
    stop.set()
    t.join()
    assert counter[0] > 1000


def test_repr_shows_state() -> None:
    ch = pf.Channel(2)
    ch.send(1)
    assert repr(ch) == "Channel(capacity=2, len=1, closed=False)"
