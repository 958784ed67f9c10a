"""The reorder buffer and the map fast path, tested directly on hand-made batches."""

from __future__ import annotations

import random

import pytest

from pipeflow._apply import _map_fast
from pipeflow._batch import SKIP, Batch, Slot, child_key
from pipeflow._ordering import Reorderer


def batch(records: list[tuple[object, object]]) -> Batch:
    """A batch from ``(key, value)`` records (keys as a run when they are one)."""
    keys = [k for k, _ in records]
    first = keys[0]
    if all(type(k) is int for k in keys) and keys == list(range(first, first + len(keys))):  # type: ignore[call-overload,operator]
        return Batch(first, [v for _, v in records])  # type: ignore[arg-type]
    return Batch(keys, [v for _, v in records])  # type: ignore[arg-type]


def run(ordered: bool, batches: list[list[tuple[object, object]]]) -> tuple[list[object], int]:
    r = Reorderer(ordered)
    out: list[object] = []
    for b in batches:
        r.push_batch(batch(b), out)
    return out, r.completed


def test_runs_arriving_out_of_order_are_released_in_order() -> None:
    batches = [[(k, k) for k in range(a, a + 5)] for a in range(0, 50, 5)]
    random.Random(1).shuffle(batches)
    out, completed = run(True, batches)
    assert out == list(range(50))
    assert completed == 50


def test_skips_and_splits_mixed_with_runs() -> None:
    batches = [
        [(3, "d"), (4, SKIP)],
        [(child_key(2, 1, 2), "c1")],
        [(0, "a"), (1, SKIP)],
        [(child_key(2, 0, 2), "c0")],
        [(5, "f"), (6, "g")],
    ]
    out, completed = run(True, batches)
    assert out == ["a", "c0", "c1", "d", "f", "g"]
    assert completed == 7


def test_nested_splits() -> None:
    k = child_key(0, 1, 2)
    batches = [
        [(child_key(k, 1, 2), "b2")],
        [(child_key(0, 0, 2), "a")],
        [(child_key(k, 0, 2), "b1")],
        [(1, "z")],
    ]
    assert run(True, batches) == (["a", "b1", "b2", "z"], 2)


def test_unordered_releases_at_once_and_counts_completed_splits() -> None:
    batches = [
        [(child_key(0, 1, 3), "x1")],
        [(1, "y"), (2, SKIP)],
        [(child_key(0, 0, 3), "x0"), (child_key(0, 2, 3), SKIP)],
    ]
    r = Reorderer(False)
    out: list[object] = []
    r.push_batch(batch(batches[0]), out)
    assert (out, r.completed) == (["x1"], 0)
    r.push_batch(batch(batches[1]), out)
    assert (out, r.completed) == (["x1", "y"], 2)
    r.push_batch(batch(batches[2]), out)
    assert (out, r.completed) == (["x1", "y", "x0"], 3)
    assert r.buffered == 0


def test_map_fast_path_names_the_failing_item() -> None:
    def fail_on_6(x: int) -> int:
        if x == 6:
            raise ValueError(x)
        return x

    slot = Slot()
    b = Batch(100, list(range(10)))
    with pytest.raises(ValueError):
        _map_fast(fail_on_6, b, slot, False, [False])
    assert slot.index == 6
    assert b.key(6) == 106
    assert _map_fast(abs, Batch(100, [0, -1, 2]), slot, False, [False]) == (
        Batch(100, [0, 1, 2]),
        3,
    )


def test_batch_pieces_keep_their_keys() -> None:
    run_ = Batch(10, list("abcde"))
    assert run_.piece(1, 3) == Batch(11, ["b", "c"])
    split = Batch([0, child_key(1, 0, 2), child_key(1, 1, 2)], ["a", "b0", "b1"])
    assert split.piece(1, 3) == Batch([(1, 0, 2), (1, 1, 2)], ["b0", "b1"])
    assert split.key(2) == (1, 1, 2)
