"""A step's function (and init) as it is sent to worker processes: pickled once per run, keyed
by its bytes so that a warm worker that has it already is sent the key alone, and pickled so
that its code keeps its file name (a leaf).

cloudpickle replaces the file name of the code it pickles by value (a script's functions, a
notebook cell's) with ``<dynamic-code>``, to make its bytes the same wherever the code was
defined; a traceback from the worker then shows no file and no source line. :func:`dumps`
keeps the real one: the traceback shows the script's line, or IPython's ``Cell In[6]``.

A function that refers to a large global (a 200 MB array in ``__main__``) pickles it along:
:func:`pack` warns once, naming the global, and the key lets a worker keep it between runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
import types
import warnings
from collections import ChainMap
from typing import Any, ClassVar, NamedTuple

__all__ = ["LARGE", "Packed", "dumps", "pack"]

LARGE = 16 << 20  # a pickled function this large is worth a warning
_warned: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def _pickler() -> type:
    import cloudpickle
    from cloudpickle import cloudpickle as inner

    def reduce_code(code: types.CodeType) -> tuple[Any, tuple[Any, ...]]:
        make, args = inner._code_reduce(code)
        # The one argument cloudpickle blanks: put the real file name back.
        blank = next(i for i, a in enumerate(args) if a == "<dynamic-code>")
        return make, (*args[:blank], code.co_filename, *args[blank + 1 :])

    class Pickler(cloudpickle.Pickler):  # type: ignore[misc]
        dispatch_table: ClassVar[ChainMap[Any, Any]] = ChainMap(
            {types.CodeType: reduce_code}, cloudpickle.Pickler.dispatch_table
        )

    return Pickler


_Pickler: type | None = None


def dumps(obj: Any) -> bytes:
    """``obj`` pickled as ``cloudpickle.dumps`` does (protocol 5), its code's file names kept."""
    global _Pickler
    if _Pickler is None:
        _Pickler = _pickler()
    with io.BytesIO() as file:
        _Pickler(file, protocol=5).dump(obj)
        return file.getvalue()


class Packed(NamedTuple):
    """A pickled object and its key (a digest of the bytes)."""

    key: bytes
    data: bytes


def pack(obj: Any, what: str) -> Packed:
    """``obj`` pickled with :func:`dumps`, and keyed. A large one is warned about (once per
    function and global), naming what makes it large; ``what`` names its stage."""
    data = dumps(obj)
    if len(data) >= LARGE:
        _warn_large(obj, len(data), what)
    return Packed(hashlib.sha256(data).digest()[:20], data)


def _user_function(obj: Any) -> Any:
    """The user's function inside pipeflow's wrappers (``Retrying``)."""
    while hasattr(obj, "fn") and callable(obj.fn) and type(obj).__module__.startswith("pipeflow"):
        obj = obj.fn
    return obj


def _referred(fn: Any) -> dict[str, Any]:
    """What a function takes along when pickled by value: the globals its code (and nested
    code) names, its closure's values, its defaults."""
    found: dict[str, Any] = {}
    if not isinstance(fn, types.FunctionType):
        return found
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        for name in code.co_names:
            if name in fn.__globals__:
                found[f"global {name!r}"] = fn.__globals__[name]
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or (), strict=False):
        with contextlib.suppress(ValueError):  # an empty cell has no contents
            found[f"closure variable {name!r}"] = cell.cell_contents
    for i, value in enumerate(fn.__defaults__ or ()):
        found[f"default argument {i}"] = value
    return found


def _megabytes(n: int) -> str:
    return f"{n / (1 << 20):.0f} MB"


def _warn_large(obj: Any, size: int, what: str) -> None:
    fn = _user_function(obj)
    name = getattr(fn, "__qualname__", type(fn).__name__)
    sizes: list[tuple[int, str]] = []
    for label, value in _referred(fn).items():
        if isinstance(value, types.ModuleType | type) or callable(value):
            continue  # pickled by reference, or small: not what makes a function large
        try:
            sizes.append((len(dumps(value)), label))
        except Exception:
            continue
    sizes.sort(reverse=True)
    culprit = sizes[0][1] if sizes and sizes[0][0] >= size // 2 else None
    with _warned_lock:
        key = (f"{getattr(fn, '__module__', '')}.{name}", culprit or "")
        if key in _warned:
            return
        _warned.add(key)
    because = (
        f", most of it its {culprit} ({_megabytes(sizes[0][0])})" if culprit is not None else ""
    )
    warnings.warn(
        f"{what}: the function {name!r} pickles to {_megabytes(size)}{because}: it is sent "
        "to each new worker process (a warm worker keeps it between runs). To send less, "
        "load the data in the worker: in the stage's init= (see pipeflow.worker_state), or "
        "from a file inside the function",
        UserWarning,
        stacklevel=2,
    )
