"""pytest-benchmark: thread-stage pipelines.

- tiny items: ``Pipeline(kind="thread").stage(lambda x: x + 1, workers=2).run(range(200_000))``;
- sha256 over 1 MiB buffers (releases the GIL): a 2-worker thread stage vs a serial loop.
"""

from __future__ import annotations

import pytest

import pipeflow as pf
from benches._workloads import map_serial, sha256_buffers, sha256_digest

N_TINY = 200_000
N_BUFFERS = 200


def test_thread_stage_tiny_items(benchmark) -> None:
    benchmark.group = f"thread stage x+1, {N_TINY:,} ints"
    pipeline = pf.Pipeline(kind="thread").stage(lambda x: x + 1, workers=2)
    result = benchmark.pedantic(pipeline.run, args=(range(N_TINY),), rounds=10, warmup_rounds=1)
    assert result == list(range(1, N_TINY + 1))


@pytest.fixture(scope="module")
def buffers() -> tuple[list[bytes], list[bytes]]:
    bufs = sha256_buffers(N_BUFFERS)
    return bufs, [sha256_digest(b) for b in bufs]


def _sha_pipeflow(bufs: list[bytes]) -> list[bytes]:
    return pf.Pipeline(kind="thread").stage(sha256_digest, workers=2).run(bufs)


def _sha_serial(bufs: list[bytes]) -> list[bytes]:
    return map_serial(sha256_digest, bufs)


@pytest.mark.parametrize("run", [_sha_pipeflow, _sha_serial], ids=["pipeflow-2-workers", "serial"])
def test_sha256_1mib(benchmark, buffers: tuple[list[bytes], list[bytes]], run) -> None:
    bufs, expected = buffers
    benchmark.group = f"sha256, {N_BUFFERS} x 1 MiB"
    benchmark.extra_info["MiB"] = N_BUFFERS
    result = benchmark.pedantic(run, args=(bufs,), rounds=10, warmup_rounds=1)
    assert result == expected
