"""Large buffers between processes through the shared-memory arena (issue 4).

Every test also runs under the suite's leak check (``conftest.assert_clean``): no block of the
arena may be live after it, whatever the test did (crash, Ctrl-C, early break).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pipeflow as pf
from pipeflow import _process, _shm
from pipeflow._core import Arena, Block

N = 1 << 17  # float64 items: 1 MiB, well above the threshold


def ident(x: Any) -> Any:
    return x


def make(i: int) -> np.ndarray:
    return np.full(N, float(i))


def make_in_shm(i: int) -> np.ndarray:
    a = pf.empty(N)
    a[:] = i
    return a


def double_in_place(a: np.ndarray) -> np.ndarray:
    a *= 2
    return a


def first(a: np.ndarray) -> float:
    return float(a[0] + a[-1])


def in_arena(a: np.ndarray) -> bool:
    """Whether ``a`` is a view on a block of the arena (its base chain ends at a Block)."""
    base: Any = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return isinstance(base, Block)


def live() -> int:
    gc.collect()
    return _shm.stats()["blocks"]


def test_results_are_writable_views_on_shared_memory() -> None:
    out = pf.Pipeline().stage(make, workers=2).run(range(6))
    assert [float(a[0]) for a in out] == [0, 1, 2, 3, 4, 5]
    assert all(in_arena(a) and a.flags.writeable and a.shape == (N,) for a in out)
    assert live() == 6
    out[3][:] = -1  # the receiver owns them
    assert float(out[3].sum()) == -N
    del out
    assert live() == 0


def test_results_outlive_the_run_and_the_workers() -> None:
    out = pf.Pipeline().stage(make, workers=2).run(range(3))
    _process.shutdown_idle()  # the workers that wrote the blocks are gone
    assert [float(a[-1]) for a in out] == [0, 1, 2]
    resident = _shm.stats()["resident_bytes"]
    del out
    assert live() == 0
    # The freed blocks' pages went back to the OS.
    assert _shm.stats()["resident_bytes"] <= resident - 3 * N * 8


def test_small_arrays_stay_in_the_pickle() -> None:
    out = pf.Pipeline().stage(np.arange, workers=2).run([3, 10])
    assert [a.tolist() for a in out] == [[0, 1, 2], list(range(10))]
    assert not any(in_arena(a) for a in out)


def test_arrays_go_to_workers_and_from_stage_to_stage() -> None:
    inputs = [np.full(N, float(i)) for i in range(5)]
    out = (
        pf.Pipeline()
        .stage(double_in_place, workers=2)
        .stage(double_in_place, workers=1)
        .run(inputs)
    )
    assert [float(a[7]) for a in out] == [0, 4, 8, 12, 16]
    assert [float(a[7]) for a in inputs] == [0, 1, 2, 3, 4]  # the parent's own are untouched
    sums = pf.Pipeline().stage(first, workers=2).run(inputs)
    assert sums == [0, 2, 4, 6, 8]
    del out
    assert live() == 0


def test_an_array_made_with_empty_crosses_without_a_copy() -> None:
    a = pf.empty(N)
    a[:] = 5
    (back,) = pf.Pipeline().stage(ident).run([a])
    # Parent -> worker -> parent, and it is the same memory all the way.
    assert np.shares_memory(a, back)
    back[0] = 42
    assert a[0] == 42
    del a, back
    assert live() == 0


def test_empty_in_a_worker_and_forwarded_through_two_stages() -> None:
    out = pf.Pipeline().stage(make_in_shm, workers=2).stage(double_in_place).run(range(4))
    assert [float(a[1]) for a in out] == [0, 2, 4, 6]
    assert all(in_arena(a) for a in out)


def test_empty_validates_and_falls_back() -> None:
    a = pf.empty((300, 200), dtype="int16", order="F")
    assert a.shape == (300, 200) and a.dtype == np.int16 and a.flags.f_contiguous
    assert in_arena(a) and a.flags.writeable
    small = pf.empty((2, 3))  # below the threshold: pickled in band anyway
    assert small.shape == (2, 3) and not in_arena(small)
    assert pf.empty(0).shape == (0,)
    objects = pf.empty(3, dtype=object)  # object arrays cannot live in shared memory
    assert objects.dtype == object and not in_arena(objects)
    with pytest.raises(ValueError, match="order"):
        pf.empty(3, order="K")


@dataclasses.dataclass
class Holder:
    name: str
    arrays: list[np.ndarray]


def nested(i: int) -> dict[str, Any]:
    return {
        "holder": Holder(f"h{i}", [np.full(N, i), np.zeros((0, 3))]),
        "tuple": (np.float32(i), np.array(i)),
        "fortran": np.asfortranarray(np.arange(N, dtype=np.int32).reshape(256, -1)),
        "strided": np.arange(2 * N, dtype=np.float64)[::2],
        "objects": np.array([{"k": i}, None, "s"] * 30_000, dtype=object),
        "bytes": bytes(300_000),
        "bytearray": bytearray(b"x" * 300_000),
        "view": memoryview(bytearray(b"y" * 100_000)),
    }


def test_arrays_nested_in_containers_and_every_kind_of_buffer() -> None:
    (out,) = pf.Pipeline().stage(nested).run([7])
    holder = out["holder"]
    assert isinstance(holder, Holder) and holder.name == "h7"
    assert float(holder.arrays[0][-1]) == 7 and holder.arrays[1].shape == (0, 3)
    assert out["tuple"] == (np.float32(7), np.array(7))
    fortran = out["fortran"]
    assert fortran.flags.f_contiguous and fortran[3, 5] == np.arange(N).reshape(256, -1)[3, 5]
    assert np.array_equal(out["strided"], np.arange(2 * N, dtype=np.float64)[::2])
    assert out["objects"][0] == {"k": 7} and out["objects"].dtype == object
    assert out["bytes"] == bytes(300_000) and type(out["bytes"]) is bytes
    assert out["bytearray"] == bytearray(b"x" * 300_000)
    assert isinstance(out["view"], memoryview) and out["view"].tobytes() == b"y" * 100_000
    assert in_arena(holder.arrays[0]) and in_arena(fortran) and in_arena(out["strided"])


dtypes = st.one_of(
    hnp.boolean_dtypes(),
    hnp.integer_dtypes(),
    hnp.unsigned_integer_dtypes(),
    hnp.floating_dtypes(),
    hnp.complex_number_dtypes(),
    hnp.datetime64_dtypes(),
    hnp.byte_string_dtypes(),
    st.just(np.dtype([("a", "<i4"), ("b", "<f8", (2,))])),
)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=300))
    a = draw(hnp.arrays(draw(dtypes), shape, elements=None, fill=st.nothing()))
    layout = draw(st.sampled_from(["C", "F", "strided"]))
    if layout == "F":
        return np.asfortranarray(a)
    if layout == "strided" and a.ndim >= 1 and a.shape[0] > 1:
        return a[::2]
    return a


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(arrays(), min_size=1, max_size=3))
def test_any_array_round_trips_through_a_process_stage(values: list[np.ndarray]) -> None:
    with _shm_threshold(256):  # small enough that most examples go through the arena
        out = pf.Pipeline().stage(ident, workers=2).run(values)
    for a, b in zip(values, out, strict=True):
        # The same dtype, or what plain pickle makes of it (numpy turns some big-endian dtypes
        # native); the same values bit for bit (NaN and NaT included); the same memory order.
        expected = pickle.loads(pickle.dumps(a, protocol=5))
        assert b.dtype in (a.dtype, expected.dtype) and b.shape == a.shape
        same = np.ascontiguousarray(b).astype(a.dtype)
        assert same.tobytes() == np.ascontiguousarray(a).tobytes()
        assert b.flags.f_contiguous == expected.flags.f_contiguous
        assert b.flags.c_contiguous == expected.flags.c_contiguous
    del out


class _shm_threshold:
    """Lowers the arena threshold in the parent and, through the environment, in workers
    started meanwhile; the warm set is emptied on both sides so that every worker agrees."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __enter__(self) -> None:
        self.saved = _shm.THRESHOLD
        _shm.THRESHOLD = self.threshold

    def __exit__(self, *exc: object) -> None:
        _shm.THRESHOLD = self.saved


def test_a_damaged_descriptor_is_an_error_not_a_crash() -> None:
    arena = _shm.arena()
    block = arena.empty(10, 0)
    assert block is not None
    slot, gen, start, length = block.desc
    for bad in [
        (slot + 10**6, gen, start, length),
        (slot, gen + 1, start, length),
        (slot, gen, start, 1 << 40),
        (slot, gen, 2**63, 2),
    ]:
        with pytest.raises(ValueError, match="bad block descriptor"):
            arena.adopt(bad)
    del block
    with pytest.raises(ValueError, match="not live"):
        arena.adopt((slot, gen, start, length))


def test_a_stale_descriptor_cannot_touch_the_block_that_reuses_its_slot() -> None:
    """A borrowed block whose lender freed it cannot be kept: the slot may hold another block by
    then, whose count the keep() would have raised (leaking it for good)."""
    arena = Arena(1 << 16, 1)  # one slot: the next block reuses it
    lender = arena.empty(100, 0)
    assert lender is not None
    borrowed = arena.borrow(lender.desc)
    del lender  # freed
    reuser = arena.empty(100, 0)
    assert reuser is not None and reuser.desc[:2] == (borrowed.desc[0], borrowed.desc[1] + 1)
    with pytest.raises(ValueError, match="no longer live"):
        borrowed.keep()
    assert not borrowed.owned
    del borrowed, reuser  # the borrowed one drops nothing; the reuser frees its block
    assert arena.stats()["blocks"] == 0


def test_a_kept_borrowed_block_outlives_its_writer() -> None:
    """A block a worker lends (a nested pipeline's process stage lends its own) and its borrower
    keeps is not freed when the lender dies: the borrower still has writable views on it."""
    arena = Arena(1 << 16, 4)
    lender = arena.empty(100, 7)  # written by "process 7", never shared
    assert lender is not None
    borrowed = arena.borrow(lender.desc)
    borrowed.keep()
    assert arena.reclaim(7) == 0  # process 7 died: its unshared blocks are freed, not this one
    other = arena.empty(100, 0)
    assert other is not None and other.desc[2] != borrowed.desc[2]  # its pages stay its own
    del lender, borrowed, other
    assert arena.stats()["blocks"] == 0


def test_arena_size_is_checked() -> None:
    with pytest.raises(ValueError, match="positive int"):
        pf.set_arena_size(0)
    with pytest.raises(ValueError, match="positive int"):
        pf.set_arena_size(1.5)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="before the first process stage"):
        pf.set_arena_size(pf.arena_size() + (1 << 20))
    pf.set_arena_size(pf.arena_size())
    with pytest.raises(ValueError):
        Arena(0)


def crash_after_writing(i: int) -> np.ndarray:
    a = pf.empty(N)
    a[:] = i
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # holding a block it wrote, not yet shared
    return a


def test_a_worker_killed_while_writing_leaks_nothing_and_spoils_nothing() -> None:
    kept = pf.Pipeline().stage(make, workers=2).run(range(2))
    with pytest.raises(pf.WorkerCrashed, match="SIGKILL"):
        pf.Pipeline().stage(crash_after_writing, workers=2).run(range(8))
    out = pf.Pipeline().stage(crash_after_writing, workers=2, retries=0).run([0, 1, 2])
    assert [float(a[0]) for a in out] == [0, 1, 2]
    assert [float(a[9]) for a in kept] == [0, 1]  # other results untouched
    del out, kept
    _process.shutdown_idle()
    assert live() == 0


def test_a_full_arena_and_arrays_larger_than_it_fall_back_to_the_rings() -> None:
    script = textwrap.dedent(
        """
        import numpy as np
        import pipeflow as pf
        from pipeflow import _shm

        def make(n):
            return np.full(n, 3.0)

        pf.set_arena_size(1 << 20)
        # 8 MiB arrays: larger than the whole arena; then many 256 KiB ones held at once.
        big = pf.Pipeline().stage(make, workers=2).run([1 << 20] * 3)
        assert all(a.shape == (1 << 20,) and a[-1] == 3.0 for a in big)
        many = pf.Pipeline().stage(make, workers=2).run([1 << 15] * 40)
        assert all(a.shape == (1 << 15,) and a[0] == 3.0 for a in many)
        stats = _shm.stats()
        assert 0 < stats["live_bytes"] <= 1 << 20, stats
        del many, big
        import gc; gc.collect()
        assert _shm.stats()["blocks"] == 0, _shm.stats()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_an_early_break_frees_the_blocks_in_flight() -> None:
    results = pf.Pipeline().stage(make, workers=2).iter(range(1000))
    for i, a in enumerate(results):
        assert float(a[0]) == i
        if i == 5:
            break
    results.close()
    del results, a
    _process.shutdown_idle()
    assert live() == 0


def test_large_results_go_one_to_a_batch() -> None:
    # Batches aim at the runner's batch_seconds of work, and at results of ~1 MiB at most:
    # quick items with 4 MiB results go alone, so that a worker never holds many at once.
    from pipeflow._process_stage import ProcessRunner
    from pipeflow._sizing import Sizer
    from pipeflow.pipeline import Pipeline

    (step,) = Pipeline().stage(make)._steps
    traits = ProcessRunner.traits(step)
    st = Sizer(step, traits)
    st.measure(0.001, 10, 10 * 8)  # tiny results: the time decides
    assert st.chunk() == round(traits.batch_seconds / 1e-4)
    st.measure(0.001, 10, 10 * (4 << 20))  # 4 MiB each: one to a batch
    assert st.chunk() == 1


def test_an_idle_arena_holds_no_freed_pages() -> None:
    # While process stages run, freed blocks stay resident for reuse (a fresh page of shared
    # memory costs a fault); when they stop, their pages go back to the OS.
    base = _shm.stats()["resident_bytes"]
    for a in pf.Pipeline().stage(make, workers=2).iter(range(20)):
        assert a.shape == (N,)
    del a
    gc.collect()
    assert _shm.stats()["blocks"] == 0
    assert _shm.stats()["resident_bytes"] <= base + (1 << 20)


CTRL_C_ARRAYS = """
    import signal, gc, itertools, sys, numpy as np, pipeflow as pf
    from pipeflow import _process, _shm
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def make(i):
        return np.full(1 << 17, float(i))
    def twice(a):
        a *= 2
        return a
    try:
        results = pf.Pipeline().stage(make, workers=2).stage(twice).iter(itertools.count())
        for i, a in enumerate(results):
            assert a[0] == 2 * i
            if i == 20:
                print("ready", flush=True)
    except KeyboardInterrupt:
        pass  # the traceback holds the interrupted frames until this block ends
    else:
        sys.exit(3)
    del results, a
    import time
    deadline = time.monotonic() + 5  # the run's threads may still be letting go
    while True:
        gc.collect()
        _process.shutdown_idle()
        stats = _shm.stats()
        if stats["blocks"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    print("blocks", stats["blocks"], "resident", stats["resident_bytes"], flush=True)
"""


def test_ctrl_c_in_an_array_pipeline_leaves_no_block_and_no_memory() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CTRL_C_ARRAYS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err
    words = out.split()
    assert words[:2] == ["blocks", "0"], out
    # Only the arena's header and slot pages stay resident: no block's pages.
    assert int(words[3]) < 1 << 20, out


_stash: list[np.ndarray] = []


def stash(a: np.ndarray | None) -> float:
    """Keeps each input array beyond its call; for ``None``, sums what it kept."""
    if a is None:
        return float(sum(k[0] + k[-1] for k in _stash))
    _stash.append(a)
    return float(a[0])


def test_an_input_array_kept_by_stage_code_stays_valid() -> None:
    # The parent lets go of each input's block once answered, and reuses the memory for the
    # next input: the kept arrays must not see it.
    inputs = [np.full(N, float(i)) for i in range(4)]
    out = pf.Pipeline().stage(stash, workers=1).run([*inputs, None])
    assert out == [0, 1, 2, 3, 12.0]
    del inputs
    gc.collect()
    assert live() == 4  # the worker's references
    _process.shutdown_idle()  # the worker exits: its references go with it
    assert live() == 0


def _shmem_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1])
    raise AssertionError("no Shmem line in /proc/meminfo")


SHMEM_CHILD = """
    import sys, numpy as np, pipeflow as pf
    def make(i):
        return np.full(1 << 20, float(i))  # 8 MiB
    held = pf.Pipeline().stage(make, workers=2).run(range(16))  # 128 MiB, held
    print("holding", flush=True)
    sys.stdin.readline()
    del held
    import gc; gc.collect()
    print("released", flush=True)
    sys.stdin.readline()
"""


def test_shared_memory_in_proc_meminfo_goes_back_after_del_and_after_exit() -> None:
    before = _shmem_kib()
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(SHMEM_CHILD)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "holding"
        holding = _shmem_kib()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "released"
        released = _shmem_kib()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(60) == 0
    finally:
        child.kill()
        child.wait()
        child.stdin.close()
        child.stdout.close()
    after = _shmem_kib()
    slack = 16 << 10  # KiB: rings, the arena's header pages, other processes' noise
    assert holding - before >= 120 << 10, (before, holding)  # the results live in the arena
    assert released - before <= slack, (before, holding, released)
    assert after - before <= slack, (before, holding, released, after)


def test_a_forked_child_does_not_free_the_parents_blocks() -> None:
    (a,) = pf.Pipeline().stage(make).run([7])
    pid = os.fork()
    if pid == 0:  # the child's copy of `a` holds no reference: dropping it frees nothing
        code = 1
        try:
            del a
            gc.collect()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert live() == 1 and float(a[5]) == 7
    del a
    assert live() == 0


def pad(b: bytes) -> bytes:
    return b[:10] + b"!" * 300_000


def test_large_pickles_go_through_the_arena_as_inputs_results_and_between_stages() -> None:
    # bytes never reach a pickler's hook: a pickle of 256 KiB or more goes into a block whole.
    inputs = [bytes([i]) * 300_000 for i in range(6)]
    assert pf.Pipeline().stage(len, workers=2).run(inputs) == [300_000] * 6
    out = pf.Pipeline().stage(pad, workers=2).stage(bytes.upper).run(inputs)
    assert out == [bytes([i]) * 10 + b"!" * 300_000 for i in range(6)]
    assert all(type(b) is bytes for b in out)
