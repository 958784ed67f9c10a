"""Fuzzing what crosses between the parent and a worker process, on the Python side: the framing
of messages on a ring (``_wire``: the MORE/LAST byte, ``recv_message``), the decoding of
damaged messages, what a real worker process does with bytes that are no request, and the arena
descriptors that Python hands to Rust (``Arena.adopt``, ``Arena.borrow``, ``Block.keep``).

Whatever the bytes: a message or an ``Exception`` (never a crash, never a ``BaseException`` such
as pyo3's ``PanicException``), nothing kept beyond the bytes that came, no hang, and the next
whole message after the damage arrives intact. The budget is small in ``make test``;
``HYPOTHESIS_PROFILE=soak`` (``make soak``) runs each test ``SOAK`` times as many examples.
Each test prints how many examples and decoder calls it ran (``pytest -s`` shows it).

Decoding means unpickling, and pickle runs code named by the bytes: these tests feed noise and
damaged pickles of pipeflow's own messages, not pickles crafted to call something. Items are
trusted code between a parent and its own workers, as with ``multiprocessing``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import resource
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_worker_process import run_batch, runner

from pipeflow._core import Arena, Block, Ring
from pipeflow._errors import ChannelClosed
from pipeflow._wire import (
    Done,
    Failed,
    Log,
    Output,
    Ready,
    Setup,
    Work,
    recv_message,
    send_bytes,
)

MORE, LAST = b"\x01", b"\x00"
SOAK = 100  # examples in soak mode, per example in make test
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "")
_BASE = settings(
    deadline=None,
    # `tally` is function-scoped on purpose: it counts across a test's examples.
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
    database=None,  # a failure prints its smallest example and the seed (--hypothesis-seed)
    print_blob=True,
)
settings.register_profile("soak", _BASE)

T = TypeVar("T")


def budget(examples: int) -> Callable[[T], T]:
    """The settings of a fuzz test: ``examples`` of them, ``SOAK`` times more when soaking."""
    scale = SOAK if PROFILE == "soak" else 1
    return settings(_BASE, max_examples=examples * scale)  # type: ignore[return-value]


class Tally:
    """Counts a test's examples and decoder calls, printed when the test ends."""

    def __init__(self) -> None:
        self.examples = 0
        self.calls = 0

    def example(self, calls: int) -> None:
        self.examples += 1
        self.calls += calls


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    t = Tally()
    yield t
    mode = "soak" if PROFILE == "soak" else "fast"
    print(f"\nfuzz {request.node.name} ({mode}): {t.examples} examples, {t.calls} executions")


# -- messages, as the parent and a worker send them -------------------------------------------

desc = st.tuples(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)
small = st.binary(max_size=600)
keys = st.one_of(st.none(), st.integers(), st.lists(st.integers(), max_size=5))
messages = st.one_of(
    st.builds(Work, keys, small, st.lists(desc, max_size=3)),
    st.builds(
        Done,
        keys,
        st.integers(0, 9),
        small,
        st.integers(0, 9),
        st.lists(desc, max_size=3),
        st.lists(st.integers(0, 3), max_size=3),
        st.floats(allow_nan=False),
    ),
    st.builds(Failed, small, st.none() | st.integers(0, 9), st.none() | st.text(max_size=40)),
    st.builds(Ready),
    st.builds(
        Setup,
        st.sampled_from(["map", "filter"]),
        st.tuples(small, st.none() | small),
        st.tuples(small, st.none()),
        st.lists(st.text(max_size=20), max_size=3),
        st.lists(small, max_size=2),
    ),
)


def frames_of(data: bytes, log_cap: int) -> list[bytes]:
    """The frames ``send_bytes`` makes of ``data`` on a ring of ``2**log_cap`` bytes (read as
    they are written, as they would be)."""
    ring = Ring(1 << log_cap)
    sender = threading.Thread(target=send_bytes, args=(ring, data, 30))
    sender.start()
    frames: list[bytes] = []
    try:
        while not frames or frames[-1][:1] != LAST:
            frames.append(ring.pop(30))
    finally:
        sender.join()
        ring.close_read()
    return frames


def decode_all(ring: Ring, limit: int) -> tuple[list[object], int]:
    """Calls ``recv_message`` until the closed ring is drained: each outcome (a message, or
    the exception raised), and the calls made; fails past ``limit`` calls (a loop)."""
    outcomes: list[object] = []
    parts: list[bytes] = []
    calls = 0
    while True:
        calls += 1
        assert calls <= limit, "recv_message kept returning on a drained ring"
        try:
            outcomes.append(recv_message(ring, 0, parts))
        except ChannelClosed:
            return outcomes, calls
        except TimeoutError:
            raise AssertionError("a closed ring timed out") from None
        except Exception as e:  # the point: an error, never a crash or a BaseException
            outcomes.append(e)


def push_all(ring: Ring, frames: list[bytes]) -> None:
    for f in frames:
        ring.push(f, 0)
    ring.close_write()


# -- the framing -------------------------------------------------------------------------------


@budget(200)
@given(message=messages, log_cap=st.integers(6, 12))
def test_every_message_survives_the_framing(message: Any, log_cap: int, tally: Tally) -> None:
    """A message split into frames (through a small ring, read as it is written) comes out
    equal."""
    ring = Ring(1 << log_cap)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(recv_message(ring, 30)))
    reader.start()
    try:
        send_bytes(ring, pickle.dumps(message, protocol=5), 30)
    finally:
        reader.join()
        ring.close_read()
    assert got == [message]
    tally.example(1)


lead = st.one_of(st.just(MORE), st.just(LAST), st.binary(min_size=0, max_size=1))
frame = st.builds(lambda lead, body: lead + body, lead, st.binary(max_size=200))


@budget(300)
@given(frames=st.lists(frame, max_size=40), after=messages)
def test_any_frames_give_messages_or_errors_and_the_next_message_whole(
    frames: list[bytes], after: Any, tally: Tally
) -> None:
    """Any frames (any lead byte, any bytes, empty ones) give messages or errors, and keep
    nothing beyond what came; a whole message after them (after a last frame, which ends
    whatever was begun) arrives intact."""
    good = frames_of(pickle.dumps(after, protocol=5), 9)
    ring = Ring(1 << 16)
    try:
        push_all(ring, [*frames, LAST + b".", *good])  # "." alone: an empty pickle, an error
        outcomes, calls = decode_all(ring, len(frames) + len(good) + 2)
    finally:
        ring.close_read()
    assert outcomes[-1] == after, f"the message after the damage came out as {outcomes[-1]!r}"
    tally.example(calls)


def test_a_frame_led_by_neither_byte_is_an_error_at_once() -> None:
    """Frames are made by ``send_bytes`` alone: one led by another byte (or empty) is no part
    of a message, and says so, dropping what was begun; the next message is whole."""
    ring = Ring(4096)
    try:
        push_all(ring, [MORE + b"begun", b"\x07" + b"junk", b"", LAST + pickle.dumps("next")])
        outcomes, _ = decode_all(ring, 5)
    finally:
        ring.close_read()
    assert [type(o) for o in outcomes] == [ValueError, ValueError, str]
    assert "no part of a pipeflow message (led by b'\\x07')" in str(outcomes[0])
    assert outcomes[2] == "next"


def damaged(data: bytes, how: list[tuple[str, int, int]]) -> bytes:
    """``data`` with each change of ``how`` made: a byte flipped, a cut, bytes inserted, a
    length somewhere claiming a huge size, or an opcode inserted with such a length."""
    b = bytearray(data)
    for kind, at, value in how:
        at = at % (len(b) + 1)
        if kind == "flip" and at < len(b):
            b[at] ^= value & 0xFF or 1
        elif kind == "cut":
            del b[at:]
        elif kind == "insert":
            b[at:at] = value.to_bytes(8, "little")
        elif kind == "claim":  # 2^31, 2^33, 2^60 ...: 8 bytes of a length where they land
            b[at : at + 8] = (1 << (31 + value % 33)).to_bytes(8, "little")
        elif kind == "opcode":  # an opcode with a length field claiming up to 2^63 bytes
            op, width = CLAIMS[value % len(CLAIMS)]
            size = (1 << (31 + (value >> 8) % 33)) - (value >> 16) % 2
            b[at:at] = op + (size % (1 << 8 * width)).to_bytes(width, "little")
    return bytes(b)


# Pickle opcodes followed by a length: BINBYTES8, BINUNICODE8, BYTEARRAY8, FRAME (8 bytes),
# BINBYTES, BINUNICODE, BINSTRING (4 bytes), and LONG_BINPUT (a 4-byte memo index: see
# `capped`).
CLAIMS = [
    (b"\x8e", 8),
    (b"\x8d", 8),
    (b"\x96", 8),
    (b"\x95", 8),
    (b"B", 4),
    (b"X", 4),
    (b"T", 4),
    (b"r", 4),
]


changes = st.lists(
    st.tuples(
        st.sampled_from(["flip", "cut", "insert", "claim", "opcode"]),
        st.integers(0, 4096),
        st.integers(0, 2**64 - 1),
    ),
    min_size=1,
    max_size=6,
)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmSize:"))
    return int(line.split()[1]) * 1024


CAP = 1 << 30  # the address space a decode may add


@contextlib.contextmanager
def capped(pid: int) -> Iterator[None]:
    """Caps process ``pid``'s address space at its size now plus ``CAP`` while the block runs.

    CPython's C unpickler before gh-115952 (3.11 here) sizes its memo by the index that a
    LONG_BINPUT names, and fills it: one damaged byte there (an index of 2^31) makes a 10-byte
    message take 32 GiB of real memory, and the OOM killer ends the process (as it ended
    this test's first soak run). Under the cap that allocation is a ``MemoryError``, which these
    tests count as what it is, an error; nothing caps it in a pipeline (see docs/fuzzing.md)."""
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (vm_size(pid) + CAP, hard))
    try:
        yield
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))


@pytest.mark.parametrize("op", [b"\x8e", b"\x8d", b"\x96", b"\x95"])
@pytest.mark.parametrize("claim", [2**31, 2**33, 2**40, 2**60, 2**63 - 1])
def test_a_length_that_claims_huge_sizes_is_an_error_and_takes_no_memory(
    op: bytes, claim: int
) -> None:
    """A length field (BINBYTES8, BINUNICODE8, BYTEARRAY8, FRAME) that claims up to 2^63 bytes
    in a message of a few: an error, and the peak RSS does not move (no claimed byte touched)."""
    data = b"\x80\x05" + op + claim.to_bytes(8, "little") + b"xyz."
    ring = Ring(4096)
    before = peak_rss()
    try:
        push_all(ring, [LAST + data])
        outcomes, _ = decode_all(ring, 3)
    finally:
        ring.close_read()
    assert len(outcomes) == 1 and isinstance(outcomes[0], Exception), outcomes
    grew = peak_rss() - before
    assert grew < 16 << 20, f"a claim of {claim} bytes raised the peak RSS by {grew} bytes"


@budget(400)
@given(message=messages, how=changes, log_cap=st.integers(6, 12))
def test_a_damaged_message_decodes_or_raises(
    message: Any, how: list[tuple[str, int, int]], log_cap: int, tally: Tally
) -> None:
    """A real message's pickle, damaged (bytes flipped, cut, inserted, a length or a memo index
    claiming up to 2^63 bytes), then framed as the sender would: one message or one error (the
    address space capped: see ``capped``)."""
    data = damaged(pickle.dumps(message, protocol=5), how)
    ring = Ring(1 << 16)
    try:
        frames = frames_of(data, log_cap)
        push_all(ring, frames)
        with capped(os.getpid()):
            outcomes, calls = decode_all(ring, len(frames) + 1)
    finally:
        ring.close_read()
    assert len(outcomes) == 1
    tally.example(calls)


# -- a real worker process ---------------------------------------------------------------------

noise = st.binary(max_size=2000)
not_requests = st.one_of(
    st.integers(),
    st.text(max_size=20),
    st.none(),
    st.tuples(st.integers()),
    st.builds(Ready),
    st.builds(Failed, small, st.none(), st.none()),
    st.builds(
        Done,
        keys,
        st.integers(0, 3),
        small,
        st.integers(0, 3),
        st.just([]),
        st.just([]),
        st.just(0.0),
    ),
)
work = st.builds(Work, keys, small, st.lists(desc, max_size=3))
requests = st.one_of(
    noise,
    st.builds(lambda m: pickle.dumps(m, protocol=5), not_requests),
    st.builds(lambda m, how: damaged(pickle.dumps(m, protocol=5), how), work, changes),
    st.builds(lambda m: pickle.dumps(m, protocol=5), work),
)


def test_a_worker_answers_bytes_that_are_no_request_and_goes_on(tally: Tally) -> None:
    """A real worker process (started as the engine starts it) sent noise, damaged requests,
    pickles of anything but a request, and requests whose fields are noise: it answers each
    (a ``Failed`` saying what went wrong, or a ``Done``), stays alive, and then runs a real
    batch. A ``Setup`` is not among them: a worker whose step fails to load exits, by design."""
    with runner(lambda x: x * 2) as r:
        worker = r.worker
        worker.confirm()  # its Ready read: from now on, every reply answers our bytes
        # Capped for good: it is stopped after the test (and its memo is CPython's, see above).
        resource.prlimit(worker.pid, resource.RLIMIT_AS, (vm_size(worker.pid) + CAP, -1))

        @budget(150)
        @given(request=requests, log_cap=st.integers(6, 12))
        def answers(request: bytes, log_cap: int) -> None:
            for f in frames_of(request, log_cap):
                worker.to_child.push(f, 30)
            try:
                reply = recv_message(worker.from_child, 30)
                while type(reply) in (Log, Output):  # what it logged or printed, then the reply
                    reply = recv_message(worker.from_child, 30)
            except ChannelClosed:
                worker.proc.wait(30)
                raise AssertionError(
                    f"the worker exited ({worker.proc.returncode}) on this request"
                ) from None
            assert type(reply) in (Failed, Done), f"a reply of {type(reply).__name__}"
            if type(reply) is Done:
                assert reply.descs == []  # no block from nothing
            assert worker.proc.poll() is None, "the worker died"
            tally.example(1)

        answers()
        assert run_batch(r, [1, 2, 3])[0].values == [2, 4, 6]


# -- arena descriptors, from Python ------------------------------------------------------------

big = st.integers(-(2**70), 2**70)


@st.composite
def descriptors(draw: st.DrawFn, real: list[tuple[int, int, int, int]]) -> Any:
    """A descriptor as a message may carry it: a real one, changed (a field moved, out of its
    type's range, negative), any tuple of ints, or no tuple of ints at all."""
    kind = draw(st.sampled_from(["real", "changed", "ints", "junk"]))
    if kind in ("real", "changed"):
        d = list(draw(st.sampled_from(real)))
        if kind == "changed":
            i = draw(st.integers(0, 3))
            d[i] = draw(st.one_of(st.integers(-3, 3).map(lambda k: d[i] + k), big))
        return tuple(d)
    if kind == "ints":
        return tuple(draw(st.lists(big, min_size=4, max_size=4)))
    return draw(
        st.one_of(
            st.none(),
            st.text(max_size=4),
            st.lists(big, max_size=6).map(tuple),
            st.tuples(st.floats(), big, big, big),
            st.lists(st.integers(0, 9), max_size=4),
        )
    )


def test_any_descriptor_from_python_gives_a_block_or_an_error(tally: Tally) -> None:
    """``Arena.adopt`` / ``borrow`` (and ``Block.keep``) of any descriptor: a block inside a
    live one, or ``ValueError`` / ``OverflowError`` / ``TypeError``; no reference is left."""
    arena = Arena(32 * 4096, slots=8)
    held = [arena.empty(n, 1) for n in (1, 4096, 3 * 4096 + 5, 100)]
    blocks = [b for b in held if b is not None]
    real = [b.desc for b in blocks]

    def held_now() -> tuple[int, int]:
        stats = arena.stats()
        return stats["blocks"], stats["live_bytes"]

    before = held_now()

    def inside(d: tuple[int, int, int, int]) -> bool:
        return any(
            d[:2] == r[:2] and r[2] <= d[2] and d[2] + d[3] <= r[2] + -(-r[3] // 4096) * 4096
            for r in real
        )

    @budget(500)
    @given(data=st.data())
    def one(data: st.DataObject) -> None:
        d = data.draw(descriptors(real))
        how = data.draw(st.sampled_from(["adopt", "borrow", "keep"]))
        got: Block | None = None
        try:
            if how == "adopt":
                # With a reference of its own: taking over a message's (incref=False) of a
                # real descriptor would free the block under `blocks` when `got` goes.
                got = arena.adopt(d, incref=True)
            else:
                got = arena.borrow(d)
                if how == "keep":
                    got.keep()
        except (ValueError, OverflowError, TypeError):
            assert not (
                isinstance(d, tuple)
                and len(d) == 4
                and all(type(x) is int and x >= 0 for x in d)
                and inside(d)
            ), f"a live block's descriptor {d} was refused"
        else:
            assert inside(got.desc), f"{d} gave a block outside every live one"
            view = memoryview(got)
            assert view.nbytes == got.desc[3]
            if view.nbytes:
                view[-1:].tobytes()  # the last byte is mapped
            view.release()
        del got
        assert held_now() == before, f"{how} of {d} changed the arena"
        tally.example(1)

    one()
    del blocks, held
    assert arena.stats()["blocks"] == 0
