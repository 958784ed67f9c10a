"""The shared word a worker process keeps its item index in (``pipeflow._core.Word``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeflow._core import Word


def test_track_stores_each_index_and_keeps_the_failing_one() -> None:
    w = Word()
    seen = []
    for x in w.track([10, 20, 30]):
        seen.append((x, w[0]))
    assert seen == [(10, 0), (20, 1), (30, 2)]

    def fail_on_4(x: int) -> int:
        if x == 4:
            raise KeyError(x)
        return x

    with pytest.raises(KeyError):
        [fail_on_4(v) for v in w.track([0, 1, 2, 3, 4, 5])]
    assert w[0] == 4
    w[0] = -1
    assert list(w.track([])) == [] and w[0] == -1


def test_track_follows_a_list_that_changes() -> None:
    w = Word()
    values = [1, 2, 3]
    out = []
    for v in w.track(values):
        out.append(v)
        if v == 1:
            values.append(4)  # seen: it reads by index up to the list's end
        if v == 2:
            del values[2:]  # 3 and 4 gone: it stops
    assert out == [1, 2] and w[0] == 1


def test_a_word_is_one_item() -> None:
    w = Word()
    w[0] = -1
    assert (w[0], w[-1], len(w)) == (-1, -1, 1)
    with pytest.raises(IndexError):
        w[1] = 3
    with pytest.raises(IndexError):
        w[2]


def test_a_word_is_read_after_its_writer_died() -> None:
    w = Word()
    code = (
        "import os, sys; from pipeflow._core import Word; "
        "Word.open(int(sys.argv[1]))[0] = 77; os._exit(9)"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(w.fd)], pass_fds=[w.fd], timeout=60)
    assert proc.returncode == 9
    assert w[0] == 77
    assert os.get_inheritable(w.fd) is False  # the descriptor is close-on-exec
