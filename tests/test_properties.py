"""Property tests: a random pipeline equals the sequential reference, for any shape."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeflow as pf

# Each step: (op, function, reference transform of a whole list).
MAPS: list[Callable[[int], int]] = [lambda x: x + 1, lambda x: x * 3, lambda x: -x]
FILTERS: list[Callable[[int], bool]] = [lambda x: x % 2 == 0, lambda x: x % 3 != 0]
FLATS: list[Callable[[int], list[int]]] = [
    lambda x: [x, x],
    lambda x: list(range(x % 4)),
    lambda x: [] if x % 5 == 0 else [x],
]


def reference(steps: list[tuple[str, Any]], items: list[Any], flatten: bool = False) -> list[Any]:
    """What the pipeline gives, computed one step at a time over the whole list. ``flatten``:
    batch steps are undone at once (see ``build``), so they change nothing."""
    for op, arg in steps:
        if op == "map":
            items = [arg(x) for x in items]
        elif op == "filter":
            items = [x for x in items if arg(x)]
        elif op == "flat_map":
            items = [y for x in items for y in arg(x)]
        elif not flatten:
            items = [items[i : i + arg] for i in range(0, len(items), arg)]
            items = [sum(b) for b in items]  # keep items ints for later steps
    return items


step_strategy = st.one_of(
    st.tuples(st.just("map"), st.sampled_from(MAPS)),
    st.tuples(st.just("filter"), st.sampled_from(FILTERS)),
    st.tuples(st.just("flat_map"), st.sampled_from(FLATS)),
    st.tuples(st.just("batch"), st.integers(1, 5)),
)


class _Ungroup:
    """A batch's group back into its items, checking that it is a group of 1 to ``size``."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, group: list[int]) -> list[int]:
        assert isinstance(group, list) and 1 <= len(group) <= self.size, group
        return group


def build(
    steps: list[tuple[str, Any]],
    workers: list[int],
    capacities: list[int],
    ordered: bool,
    kind: str = "thread",
    flatten: bool = False,
) -> pf.Pipeline:
    """The pipeline of ``steps``; each batch step is followed by ``sum``, or, with ``flatten``,
    by a flat_map that gives its group's items back."""
    p = pf.Pipeline(kind=kind, ordered=ordered)  # type: ignore[arg-type]
    for (op, arg), w, c in zip(steps, workers, capacities, strict=True):
        if op == "map":
            p = p.stage(arg, workers=w, capacity=c)
        elif op == "filter":
            p = p.filter(arg, workers=w, capacity=c)
        elif op == "flat_map":
            p = p.flat_map(arg, workers=w, capacity=c)
        elif flatten:
            p = p.batch(arg, capacity=c).flat_map(_Ungroup(arg))
        else:
            p = p.batch(arg, capacity=c).stage(sum)
    return p


# The ways a pipeline runs: (kind, backend). Process stages start workers: fewer examples.
WAYS = {
    "thread": ("thread", "local"),
    "process": ("process", "local"),
    "serial": ("thread", "serial"),
}


def check_random_pipeline(
    way: str, steps: list[tuple[str, Any]], data: st.DataObject, items: list[int], ordered: bool
) -> None:
    kind, backend = WAYS[way]
    n = len(steps)
    most = 2 if kind == "process" else 4
    workers = data.draw(st.lists(st.integers(1, most), min_size=n, max_size=n))
    capacities = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    out = build(steps, workers, capacities, ordered, kind).run(items, backend=backend)
    expected = reference(steps, items)
    if ordered:
        assert out == expected
    elif not any(op == "batch" for op, _ in steps):
        assert sorted(out) == sorted(expected)
    else:
        # Unordered batches group items as they arrive, so only the total is fixed, and only
        # while every later step is affine (the maps): a filter or flat_map after the batch
        # sees group sums that depend on the arrival order.
        first_batch = next(i for i, (op, _) in enumerate(steps) if op == "batch")
        if all(op in ("map", "batch") for op, _ in steps[first_batch:]):
            assert sum(out) == sum(expected)
        # Whatever follows: every item reaches each batch step exactly once, in groups of 1 to
        # its size; given back as items, the groups make the reference's multiset.
        p = build(steps, workers, capacities, ordered, kind, flatten=True)
        flat = p.run(items, backend=backend)
        assert sorted(flat) == sorted(reference(steps, items, flatten=True))


def _pipelines(examples: int):  # type: ignore[no-untyped-def]
    return lambda test: settings(
        max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow]
    )(
        given(
            steps=st.lists(step_strategy, min_size=1, max_size=4),
            data=st.data(),
            items=st.lists(st.integers(-50, 50), max_size=120),
            ordered=st.booleans(),
        )(test)
    )


@pytest.mark.parametrize("way", ["thread", "serial"])
@_pipelines(60)
def test_random_pipeline_equals_sequential_reference(
    way: str, steps: list[tuple[str, Any]], data: st.DataObject, items: list[int], ordered: bool
) -> None:
    check_random_pipeline(way, steps, data, items, ordered)


@_pipelines(40)
def test_random_pipeline_on_process_stages_equals_sequential_reference(
    steps: list[tuple[str, Any]], data: st.DataObject, items: list[int], ordered: bool
) -> None:
    check_random_pipeline("process", steps, data, items, ordered)


@pytest.mark.parametrize("way", ["thread", "process", "serial"])
@settings(max_examples=20, deadline=None)
@given(items=st.lists(st.integers(), max_size=300), workers=st.integers(1, 4))
def test_iter_matches_run(way: str, items: list[int], workers: int) -> None:
    kind, backend = WAYS[way]
    p = pf.Pipeline(kind=kind).stage(lambda x: x * 2, workers=workers)  # type: ignore[arg-type]
    assert (
        list(p.iter(items, backend=backend))
        == p.run(items, backend=backend)
        == [x * 2 for x in items]
    )
