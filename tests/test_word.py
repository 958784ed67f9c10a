"""The shared word a worker process keeps its item index in (``pipeflow._core.Word``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeflow._core import Word


def test_map_stores_each_index_and_keeps_the_failing_one() -> None:
    w = Word()
    assert w.map(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    assert w[0] == 2

    def fail_on_4(x: int) -> int:
        if x == 4:
            raise KeyError(x)
        return x

    with pytest.raises(KeyError):
        w.map(fail_on_4, [0, 1, 2, 3, 4, 5])
    assert w[0] == 4
    assert w.map(abs, []) == []


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
