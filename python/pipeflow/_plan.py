"""A pipeline's plan: its checked steps and their topology, as every backend is given them (a leaf).

A plan is the whole pipeline at once, so that a backend can place it as it likes (the local one
wires a pool of workers per step; the serial one calls each step in turn). It says, per step, the
*segment* it belongs to (the stretch of steps between two batch steps: batch steps renumber the
items, so a key names a position inside one segment), whether values reaching it can be ``SKIP``
(a filter or flat_map earlier in its segment), and how to name an item's position in a message:
``input item 7``, ``batch 3 of step 2 ('batch(4)')``, ``... (flat_map output 2 of 5)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

__all__ = ["KINDS", "OPS", "Kind", "Op", "Plan", "Step"]

Kind = Literal["process", "thread"]
Op = Literal["map", "filter", "flat_map", "batch"]
KINDS: tuple[Kind, ...] = ("process", "thread")
OPS: tuple[Op, ...] = ("map", "filter", "flat_map", "batch")


class Step(NamedTuple):
    """One step of a pipeline, as checked and normalised by ``Pipeline`` (immutable). A named
    tuple rather than a dataclass: ``dataclasses`` imports ``inspect``, ~15 ms of every worker
    process's start here."""

    op: Op
    fn: Callable[[Any], Any] | None
    name: str
    workers: int
    kind: Kind
    capacity: int
    ordered: bool
    init: Callable[[], Any] | None = None
    timeout: float | None = None
    retries: int = 0
    size: int = 0  # batch steps: the largest batch


class Plan:
    """The steps of one pipeline and what follows from their order (see the module's doc)."""

    __slots__ = ("_batchers", "may_skip", "segment_of", "segments", "steps")

    def __init__(self, steps: tuple[Step, ...]) -> None:
        self.steps = steps
        self.segment_of: list[int] = []  # per step
        self.may_skip: list[bool] = []  # per step: can a value reaching it be SKIP?
        segment, skips = 0, False
        for step in steps:
            self.segment_of.append(segment)
            self.may_skip.append(skips)
            skips = step.op != "batch" and (skips or step.op in ("filter", "flat_map"))
            if step.op == "batch":
                segment += 1
        self.segments = segment + 1  # the last one ends at the caller
        self._batchers = [i for i, s in enumerate(steps) if s.op == "batch"]

    def __len__(self) -> int:
        return len(self.steps)

    def workers(self) -> list[int]:
        """The indices of the steps that run a function (all but batch steps)."""
        return [i for i, s in enumerate(self.steps) if s.op != "batch"]

    def segment_steps(self, segment: int) -> list[int]:
        """The indices of the steps of ``segment`` that run a function (not its batch step)."""
        return [i for i in self.workers() if self.segment_of[i] == segment]

    def segment_may_skip(self, segment: int) -> bool:
        """Whether values reaching the end of ``segment`` can be SKIP."""
        return any(
            s.op in ("filter", "flat_map")
            for i, s in enumerate(self.steps)
            if self.segment_of[i] == segment
        )

    def segment_ordered(self, segment: int) -> bool:
        """Whether the end of ``segment`` (the next batch step, or the caller) restores input
        order: only if every step of the segment, and the batch step ending it, is ordered."""
        return all(s.ordered for i, s in enumerate(self.steps) if self.segment_of[i] == segment)

    def batchers(self) -> list[int]:
        """The indices of the batch steps, in order: batcher ``k`` starts segment ``k + 1``."""
        return list(self._batchers)

    def position(self, segment: int, key: Any) -> str:
        """Names the item with ``key`` of ``segment`` in a message: ``input item 7``, ``batch 3
        of stage 2 ('batch(4)')``, then ``, flat_map output 1 (2 outputs)`` for each flat_map
        the item came out of. Every position counts from 0, as Python's indices do."""
        top = key if isinstance(key, int) else key[0]
        if segment == 0:
            text = f"input item {top}"
        else:
            index = self._batchers[segment - 1]  # named for every batch a worker answers
            text = f"batch {top} of stage {index} ({self.steps[index].name!r})"
        if isinstance(key, tuple):
            for j in range(1, len(key), 2):
                count = key[j + 1]
                text += f", flat_map output {key[j]} ({count} output{'s' * (count != 1)})"
        return text

    def where(self, index: int, worker: str, key: Any = None, value: str | None = None) -> str:
        """Names step ``index`` (and the item with ``key``, if any, and its short repr
        ``value``) in a message: ``stage 1 ('check', thread worker 2) on input item 7: 'x7'``.
        ``worker`` says what ran it."""
        step = self.steps[index]
        text = f"stage {index} ({step.name!r}, {worker})"
        if key is None:
            return text
        text = f"{text} on {self.position(self.segment_of[index], key)}"
        return text if value is None else f"{text}: {value}"
