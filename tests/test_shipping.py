"""A step's function as it is sent to worker processes: once to a warm worker while it is
unchanged, again when it changed; a large one warned about, naming the global that makes it so;
its code's file name kept."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pipeflow import _shipping

SCRIPT = textwrap.dedent(
    """\
    import os, sys, warnings
    import numpy as np
    import pipeflow as pf

    LOG = sys.argv[1]

    class Marker:
        # Unpickled in the worker each time the function is: counts the loads.
        def __init__(self):
            self.state = 1

        def __setstate__(self, state):
            with open(LOG, "a") as f:
                f.write(f"{os.getpid()}\\n")

    marker = Marker()
    table = np.zeros(3_000_000)  # 24 MB

    def lookup(i):
        marker
        return float(table[i])

    if __name__ == "__main__":
        p = pf.Pipeline().stage(lookup, kind="process", workers=1)
        for run in range(3):
            assert p.run(range(4)) == [float(table[0])] + [0.0] * 3
            print(run, len(open(LOG).read().split()), flush=True)
        table[0] = 1.0  # changed: the function is sent again
        assert p.run(range(4))[0] == 1.0
        print("changed", len(open(LOG).read().split()), flush=True)
    """
)


def test_a_warm_worker_is_sent_an_unchanged_function_once(tmp_path: Path) -> None:
    script = tmp_path / "big_global.py"
    script.write_text(SCRIPT)
    log = tmp_path / "loads.txt"
    proc = subprocess.run(
        [sys.executable, "-W", "default", str(script), str(log)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    # Loaded once for three runs by the one warm worker, again once it changed.
    assert proc.stdout.split("\n")[:4] == ["0 1", "1 1", "2 1", "changed 2"], proc.stdout
    # One warning for the four runs, naming the global.
    assert proc.stderr.count("UserWarning") == 1, proc.stderr
    assert "the function 'lookup' pickles to 23 MB, most of it its global 'table'" in proc.stderr


def test_dumps_keeps_the_file_name_of_code_pickled_by_value() -> None:
    import pickle

    scope: dict[str, object] = {}
    exec(compile("def f(x):\n    return x + 1\n", "/some/notebook/cell.py", "exec"), scope)
    fn = scope["f"]
    fn.__module__ = "__main__"  # type: ignore[attr-defined]  # as a script's: by value
    loaded = pickle.loads(_shipping.dumps(fn))
    assert loaded(1) == 2
    assert loaded.__code__.co_filename == "/some/notebook/cell.py"


def test_the_key_is_of_the_bytes() -> None:
    a, b = _shipping.pack([1, 2], "stage 'x'"), _shipping.pack([1, 2], "stage 'x'")
    assert a.key == b.key and a.data == b.data
    assert _shipping.pack([1, 3], "stage 'x'").key != a.key
