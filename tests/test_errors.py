"""Errors as users see them: the stage code's frames and source lines (a script's, pickled by
value), no pipeflow frames unless asked, the same exception type on every kind of stage (also a
class that does not unpickle), its chain and attributes, the item named with its repr."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import traceback
from pathlib import Path

import pytest

import pipeflow as pf
from pipeflow import _remote

PACKAGE = str(Path(pf.__file__).parent)

SCRIPT = textwrap.dedent(
    """\
    import sys
    import pipeflow as pf

    def helper(x):
        return {"a": 1}[x]

    def parse(x):
        if x == "bad":
            return helper(x)
        return x

    if __name__ == "__main__":
        p = pf.Pipeline().stage(parse, kind=sys.argv[1], workers=2)
        if sys.argv[2] == "run":
            p.run(["ok"] * 5 + ["bad"] + ["ok"] * 5)
        else:
            for _ in p.iter(["ok"] * 5 + ["bad"]):
                pass
    """
)


def _run_script(tmp_path: Path, *args: str, full: bool = False) -> str:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != _remote.FULL_TRACEBACK}
    if full:
        env[_remote.FULL_TRACEBACK] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("kind", ["process", "thread"])
@pytest.mark.parametrize("how", ["run", "iter"])
def test_a_scripts_traceback_shows_its_own_lines_and_no_pipeflow_frames(
    tmp_path: Path, kind: str, how: str
) -> None:
    err = _run_script(tmp_path, kind, how)
    script = str(tmp_path / "user_script.py")
    # The stage's frames, with the file (a script's functions travel by value) and the source.
    assert f'File "{script}", line 9, in parse\n    return helper(x)' in err, err
    assert f'File "{script}", line 5, in helper\n    return {{"a": 1}}[x]' in err, err
    assert "<dynamic-code>" not in err
    assert PACKAGE not in err, err  # no pipeflow frame
    assert "RemoteTraceback" not in err
    assert err.rstrip().endswith(
        f"KeyError: 'bad'\npipeflow: raised in stage 0 ('parse', {kind} worker 0) "
        "on input item 5: 'bad'"
    ) or err.rstrip().endswith(
        f"KeyError: 'bad'\npipeflow: raised in stage 0 ('parse', {kind} worker 1) "
        "on input item 5: 'bad'"
    ), err


def test_pipeflow_frames_show_when_asked(tmp_path: Path) -> None:
    err = _run_script(tmp_path, "process", "run", full=True)
    assert f"{PACKAGE}{os.sep}_worker.py" in err  # the worker's side
    assert f"{PACKAGE}{os.sep}_local.py" in err  # the parent's side
    assert "return helper(x)" in err


class TwoArgs(Exception):
    """Its ``__init__`` takes two arguments, its ``args`` holds one: it does not unpickle."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(f"{code}: {msg}")
        self.code = code
        self.msg = msg


class WithLock(Exception):
    def __init__(self, msg: str) -> None:
        super().__init__(msg)
        self.lock = threading.Lock()  # does not pickle
        self.detail = "kept"


def _raise_two_args(x: int) -> int:
    if x == 2:
        raise TwoArgs(7, "seven")
    return x


def _raise_with_lock(x: int) -> int:
    if x == 2:
        raise WithLock("locked")
    return x


def _raise_chained(x: int) -> int:
    if x == 1:
        try:
            {}[x]
        except KeyError as e:
            raise ValueError("while looking up") from e
    return x


def test_an_exception_that_does_not_unpickle_keeps_its_type_and_attributes(kind: str) -> None:
    with pytest.raises(TwoArgs) as info:
        pf.Pipeline(kind=kind).stage(_raise_two_args).run(range(4))  # type: ignore[arg-type]
    error = info.value
    assert type(error) is TwoArgs
    assert (error.args, error.code, error.msg) == (("7: seven",), 7, "seven")
    assert str(error) == "7: seven"
    assert info.traceback[-1].name == "_raise_two_args"
    assert "on input item 2: 2" in error.__notes__[-1]


def test_attributes_that_do_not_pickle_are_named_the_rest_kept(kind: str) -> None:
    with pytest.raises(WithLock) as info:
        pf.Pipeline(kind=kind).stage(_raise_with_lock).run(range(4))  # type: ignore[arg-type]
    assert info.value.detail == "kept"
    if kind == "process":
        assert not hasattr(info.value, "lock")
        assert any("did not pickle" in n and "lock" in n for n in info.value.__notes__)


def test_the_chain_of_a_stages_exception_is_kept(kind: str) -> None:
    with pytest.raises(ValueError, match="while looking up") as info:
        pf.Pipeline(kind=kind).stage(_raise_chained).run(range(3))  # type: ignore[arg-type]
    cause = info.value.__cause__
    assert type(cause) is KeyError and cause.args == (1,)
    text = "".join(traceback.format_exception(info.value))
    assert "{}[x]" in text  # the cause's own frame and line
    assert "The above exception was the direct cause" in text


def _raise_from_a_module_only_the_worker_has(where: str) -> None:
    sys.path.insert(0, where)
    import only_there  # type: ignore[import-not-found]

    raise only_there.Odd("odd one")


def test_a_class_the_parent_cannot_import_stands_in_as_remote_error(tmp_path: Path) -> None:
    (tmp_path / "only_there.py").write_text("class Odd(Exception):\n    pass\n")
    with pytest.raises(pf.RemoteError, match=r"only_there\.Odd: odd one") as info:
        pf.Pipeline(kind="process").stage(_raise_from_a_module_only_the_worker_has).run(
            [str(tmp_path)]
        )
    assert info.value.type_name == "only_there.Odd"
    assert any("could not be rebuilt here" in n for n in info.value.__notes__)
    assert "only_there" not in sys.modules


def _fail(x: object) -> object:
    raise RuntimeError("no")


def test_the_note_shows_a_short_repr_of_the_item(way: str, kind: str) -> None:
    with pytest.raises(RuntimeError) as info:
        pf.Pipeline(kind=kind).stage(_fail).run(["x" * 10_000])  # type: ignore[arg-type]
    note = info.value.__notes__[-1]
    worker = "serial" if way == "serial" else f"{kind} worker 0"
    assert note.startswith(f"pipeflow: raised in stage 0 ('_fail', {worker}) on input item 0: 'xx")
    assert len(note) < 200 and "xxx" in note and "..." in note


def _sleep(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_a_stage_timeout_raises_the_public_item_timeout(kind: str) -> None:
    with pytest.raises(pf.ItemTimeout) as info:
        pf.Pipeline(kind=kind).stage(_sleep, timeout=0.2).run([0.0, 1.5])  # type: ignore[arg-type]
    assert isinstance(info.value, TimeoutError)
    assert type(info.value).__module__ == "pipeflow"
    assert "timeout=0.2" in str(info.value)
    assert "input item 1: 1.5" in info.value.__notes__[-1]


def test_item_repr_is_short_and_never_raises() -> None:
    class Bad:
        def __repr__(self) -> str:
            raise ValueError

    assert _remote.item_repr(Bad()).startswith("<Bad ")
    assert _remote.item_repr(list(range(1000))) == "[0, 1, 2, 3, 4, 5, ...]"
    assert len(_remote.item_repr("y" * 1000)) <= 100


def _task_fails(x: int) -> None:
    raise ValueError(x)


def test_a_group_tasks_error_shows_the_tasks_frames_not_pipeflows() -> None:
    g = pf.Group()
    task = g.go(_task_fails, 1)
    for wait in (g.wait, task.result, task.result):  # each time the same, not longer
        with pytest.raises(ValueError) as info:
            wait()
        frames = [(Path(e.path).name, e.name) for e in info.traceback]
        assert frames == [
            ("test_errors.py", "test_a_group_tasks_error_shows_the_tasks_frames_not_pipeflows"),
            ("test_errors.py", "_task_fails"),
        ]
