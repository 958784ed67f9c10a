"""Exceptions as users see them: sent from a worker process to the parent with their traceback
and chain, rebuilt there as the same type, and shown without pipeflow's own frames (a leaf).

A worker sends :func:`export`'s bytes: every exception of the chain (``__cause__`` and
``__context__``), each pickled with cloudpickle, or, when it does not survive a round trip (an
``__init__`` whose arguments are not its ``args``), as its class, ``args`` and the attributes that
pickle; and each one's frames as plain data (file, line, columns, function). The parent's
:func:`rebuild` makes the exceptions again (the class itself, without calling ``__init__``, when
pickling could not: ``except MyErr`` matches on every kind of stage), and their tracebacks from
stand-in frames that carry the worker's file, line and function, so that the source line comes
from the parent's own ``linecache``: a script's file, or a notebook's cell, which IPython shows
as ``Cell In[6], line 3``.

:func:`shown` is applied where a run's error reaches the caller (``run()``, iterating
``iter()``): it drops the frames of pipeflow's own files from the traceback and the chain, the
parent's and the worker's, unless ``PIPEFLOW_FULL_TRACEBACK=1``. What is left is the caller's
code, one frame of pipeflow (the one that raised it to the caller: Python adds it), and the
stage's code, as if the stage had run in the caller's thread.
"""

from __future__ import annotations

import os
import pickle
import reprlib
import types
from typing import Any

__all__ = ["FULL_TRACEBACK", "export", "item_repr", "rebuild", "shown"]

FULL_TRACEBACK = "PIPEFLOW_FULL_TRACEBACK"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CHAIN_LIMIT = 32  # exceptions of one chain sent at most (a chain can be made as long as memory)

# (filename, lineno, end_lineno, colno, end_colno, name, qualname, firstlineno)
Frame = tuple[str, int, int | None, int | None, int | None, str, str, int]

_repr = reprlib.Repr()
_repr.maxstring = 60
_repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6
_repr.maxlevel = 2


def item_repr(value: Any) -> str:
    """A short repr of an item for an error's note (truncated; never raises)."""
    try:
        text = _repr.repr(value)
    except Exception:
        return f"<{type(value).__name__} object (its repr raised)>"
    return text if len(text) <= 100 else text[:97] + "..."


def full_traceback() -> bool:
    """Whether the user asked for pipeflow's own frames (``PIPEFLOW_FULL_TRACEBACK=1``)."""
    return os.environ.get(FULL_TRACEBACK, "") not in ("", "0")


def _ours(code: types.CodeType) -> bool:
    return code.co_filename.startswith(_PACKAGE)


# ----------------------------------------------------------------- the worker's side


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions its cause and context chains reach, each once."""
    seen: dict[int, BaseException] = {}
    todo = [error]
    while todo and len(seen) < _CHAIN_LIMIT:
        exc = todo.pop(0)
        if id(exc) in seen:
            continue
        seen[id(exc)] = exc
        todo.extend(e for e in (exc.__cause__, exc.__context__) if e is not None)
    return list(seen.values())


def _frames(tb: types.TracebackType | None) -> list[Frame]:
    frames: list[Frame] = []
    while tb is not None:
        code = tb.tb_frame.f_code
        end_lineno = colno = end_colno = None
        if tb.tb_lasti >= 0:
            positions = list(code.co_positions())
            if tb.tb_lasti // 2 < len(positions):
                _, end_lineno, colno, end_colno = positions[tb.tb_lasti // 2]
        frames.append(
            (
                code.co_filename,
                tb.tb_lineno,
                end_lineno,
                colno,
                end_colno,
                code.co_name,
                code.co_qualname,
                code.co_firstlineno,
            )
        )
        tb = tb.tb_next
    return frames


def _pickles(value: Any) -> bytes | None:
    import cloudpickle

    try:
        data: bytes = cloudpickle.dumps(value, protocol=5)
        pickle.loads(data)
    except Exception:
        return None
    return data


def _text(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return "(its message could not be read)"


def _pack(exc: BaseException) -> tuple[Any, ...]:
    """One exception as it crosses: whole if it survives pickling, else in parts."""
    name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    whole = _pickles(exc)
    if whole is not None:
        return ("whole", whole, name, _text(exc))
    args = _pickles(exc.args)
    if args is None:  # its arguments themselves do not cross: their reprs do
        args = pickle.dumps(tuple(item_repr(a) for a in exc.args))
    state: dict[str, bytes] = {}
    dropped: list[str] = []
    for key, value in getattr(exc, "__dict__", {}).items():
        data = _pickles(value)
        if data is None:
            dropped.append(key)
        else:
            state[key] = data
    return ("parts", _pickles(type(exc)), name, _text(exc), args, state, dropped)


def export(error: BaseException) -> bytes:
    """``error``, its chain and their frames, for :func:`rebuild` in the parent."""
    chain = _chain(error)
    index = {id(e): i for i, e in enumerate(chain)}
    records = []
    for exc in chain:
        cause = None if exc.__cause__ is None else index.get(id(exc.__cause__))
        context = None if exc.__context__ is None else index.get(id(exc.__context__))
        frames = _frames(exc.__traceback__)
        records.append((_pack(exc), frames, cause, context, exc.__suppress_context__))
    return pickle.dumps(records, protocol=5)


# ----------------------------------------------------------------- the parent's side


def _stand_in(name: str, text: str, why: str) -> BaseException:
    from ._errors import RemoteError

    error = RemoteError(f"{name}: {text}" if text else name)
    error.type_name = name
    error.add_note(f"pipeflow: a worker raised {name}, which could not be rebuilt here ({why})")
    return error


def _unpack(packed: tuple[Any, ...]) -> BaseException:
    kind, data, name, text = packed[:4]
    if kind == "whole":
        try:
            error: BaseException = pickle.loads(data)
            return error
        except Exception as e:
            return _stand_in(name, text, f"{type(e).__name__}: {e}")
    args_data, state, dropped = packed[4:]
    if data is None:
        return _stand_in(name, text, "its class does not pickle")
    try:
        cls = pickle.loads(data)
        args = pickle.loads(args_data)
        # Made as unpickling would, without calling __init__ (whose arguments are not args).
        error = cls.__new__(cls, *args)
        error.args = args
    except Exception as e:
        return _stand_in(name, text, f"{type(e).__name__}: {e}")
    for key, value in state.items():
        try:
            setattr(error, key, pickle.loads(value))
        except Exception:
            dropped.append(key)
    if dropped:
        error.add_note(
            "pipeflow: attributes of this exception did not pickle and stayed in the worker: "
            + ", ".join(dropped)
        )
    return error


_codes: dict[tuple[Any, ...], tuple[types.CodeType, bool]] = {}


def _stand_in_code(frame: Frame) -> tuple[types.CodeType, bool]:
    """A code object whose first failing instruction is at ``frame``'s line and columns, with
    its file and names; and whether those columns are right (for the carets under the line)."""
    filename, lineno, end_lineno, colno, end_colno, name, qualname, first = frame
    key = (filename, lineno, end_lineno, colno, end_colno, name, qualname, first)
    found = _codes.get(key)
    if found is not None:
        return found
    first = min(first, lineno)
    exact = (
        end_lineno == lineno
        and colno is not None
        and end_colno is not None
        and end_colno > colno
        and end_colno < 10_000
    )
    if exact:
        assert colno is not None and end_colno is not None
        # An unbound name spanning the columns: loading it raises, at exactly that span.
        span = "_" * (end_colno - colno)
        line = span if colno == 0 else "(" + " " * (colno - 1) + span + ")"
    else:
        line = "_"
    source = "\n" * (lineno - first) + line
    # Compiled as line 1 on: moving its first line to ``first`` moves every line with it.
    code = compile(source, filename, "exec").replace(
        co_name=name, co_qualname=qualname, co_firstlineno=first
    )
    if len(_codes) > 4096:
        _codes.clear()
    _codes[key] = (code, exact)
    return code, exact


def _stand_in_tb(frame: Frame, tb_next: types.TracebackType | None) -> types.TracebackType:
    """A traceback entry for a worker's frame, on a frame of a stand-in code object."""
    code, exact = _stand_in_code(frame)
    try:
        exec(code, {"__builtins__": {}})
    except NameError as e:
        tb = e.__traceback__
        assert tb is not None and tb.tb_next is not None
        ran = tb.tb_next
    else:  # pragma: no cover - the code always raises
        raise AssertionError("a stand-in frame did not raise")
    return types.TracebackType(tb_next, ran.tb_frame, ran.tb_lasti if exact else -1, frame[1])


def rebuild(data: bytes) -> BaseException:
    """The exception :func:`export` sent, with its chain and a traceback of its frames."""
    records = pickle.loads(data)
    errors = [_unpack(packed) for packed, *_ in records]
    for error, (_, frames, cause, context, suppress) in zip(errors, records, strict=True):
        tb = None
        for frame in reversed(frames):
            tb = _stand_in_tb(frame, tb)
        error.__traceback__ = tb
        error.__cause__ = None if cause is None else errors[cause]
        error.__context__ = None if context is None else errors[context]
        error.__suppress_context__ = suppress
    return errors[0]


def _without_ours(tb: types.TracebackType | None) -> types.TracebackType | None:
    kept: list[types.TracebackType] = []
    while tb is not None:
        if not _ours(tb.tb_frame.f_code):
            kept.append(tb)
        tb = tb.tb_next
    out = None
    for entry in reversed(kept):
        out = types.TracebackType(out, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return out


def shown(error: BaseException) -> BaseException:
    """``error`` as the caller is shown it: without pipeflow's own frames in its traceback and
    its chain's (unless ``PIPEFLOW_FULL_TRACEBACK=1``). Returns ``error`` itself, to raise."""
    if full_traceback():
        return error
    for exc in _chain(error):
        exc.__traceback__ = _without_ours(exc.__traceback__)
    return error
