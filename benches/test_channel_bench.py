"""pytest-benchmark: ``pipeflow.Channel`` send/recv between threads (queue.Queue alongside).

Each round sends 200_000 small ints; the figure is seconds per round (lower is better).
"""

from __future__ import annotations

import pytest

from benches._workloads import channel_transfer

N = 200_000
KINDS = ["pipeflow.Channel(1024)", "queue.Queue(1024)"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("producers", "consumers"), [(1, 1), (4, 4)], ids=["1p1c", "4p4c"])
def test_channel_throughput(benchmark, kind: str, producers: int, consumers: int) -> None:
    benchmark.group = f"channel {producers}P/{consumers}C, {N:,} msgs"
    benchmark.extra_info["messages"] = N
    seconds = benchmark.pedantic(
        channel_transfer, args=(kind, producers, consumers, N), rounds=10, warmup_rounds=1
    )
    assert seconds > 0  # channel_transfer checked the count and the sum
