"""The progress bar of a run: what ``progress=`` accepts, and the bar drawn where the run is.

``progress=`` is ``True`` / ``False``, a dict of tqdm options, or a bar class (any callable
``cls(total=..., unit="item")`` that returns an object with ``update(n)`` and ``close()``).
:func:`check_progress` validates it when ``run()`` / ``iter()`` is called; :func:`open_bar`
makes the bar when the run starts. The backend's progress callback (``_results.released``)
updates it, in the caller's thread, and closes it however the run ends.

Where the bar is drawn, for ``True`` or a dict:

- **A terminal**: tqdm's text bar on stderr. **A stream that is not a terminal** (a log file, a
  pipe): the same bar redrawn at most every :data:`QUIET_INTERVAL` seconds (tqdm's default,
  0.1 s, writes 36,000 updates an hour into a log), with the final state at the end.
- **A Jupyter kernel with ipywidgets**: tqdm's widget, shown through a display handle that is
  updated when the bar closes, so the saved notebook keeps the final state as ``text/plain``
  next to the widget (tqdm's own widget leaves the text of its creation, ``0%| 0/200``).
- **A Jupyter kernel without ipywidgets**: tqdm's text bar drawn into one display output and
  redrawn in place (tqdm's ``mininterval`` throttles it), so the saved notebook keeps one line,
  the final state (tqdm writes a stderr output per redraw there, after warning that
  ``IProgress`` is not found).

An explicit ``file`` option means the text bar on that stream, in a kernel too. No bar starts
tqdm's monitor thread (``monitor_interval = 0``, also for a tqdm class given as ``progress=``):
a run leaves no thread behind.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["QUIET_INTERVAL", "Bar", "ProgressSpec", "check_progress", "open_bar"]

# Seconds between two redraws of a text bar on a stream that is not a terminal.
QUIET_INTERVAL = 5.0


class Bar(Protocol):
    """What a progress bar must do (``tqdm`` does): count ``n`` more items done, and finish."""

    def update(self, n: int, /) -> object: ...

    def close(self) -> object: ...


# What ``progress=`` accepts: see the module docstring.
ProgressSpec = bool | Mapping[str, Any] | Callable[..., Bar]

_ACCEPTED = (
    "progress must be True or False, a dict of tqdm options (e.g. {'desc': 'files'}, "
    "{'disable': True}, {'file': sys.stdout}) or a progress bar class (e.g. tqdm.rich.tqdm, or "
    "any callable cls(total=..., unit='item') returning an object with update(n) and close())"
)


def check_progress(progress: object) -> None:
    """Raises TypeError (ValueError for an option tqdm does not have) unless ``progress`` is
    one of the values ``progress=`` accepts; makes nothing."""
    if isinstance(progress, bool) or (callable(progress) and not isinstance(progress, Mapping)):
        return
    if not isinstance(progress, Mapping):
        raise TypeError(f"{_ACCEPTED}, got {progress!r}")
    names = _tqdm_options()
    bad = [k for k in progress if not isinstance(k, str) or k not in names]
    if bad:
        raise ValueError(
            f"progress: tqdm has no option {', '.join(map(repr, bad))}; "
            f"its options are {', '.join(sorted(names))}"
        )


def open_bar(progress: ProgressSpec, total: int | None) -> Bar | None:
    """The bar for ``progress`` (checked by :func:`check_progress`) over ``total`` items (None:
    unknown), drawn at once; None for ``progress=False``."""
    if progress is False:
        return None
    try:
        if progress is True or isinstance(progress, Mapping):
            options = dict(progress) if isinstance(progress, Mapping) else {}
            return _default_bar(total, options)
        bar = _without_monitor(progress)(total=total, unit="item")
    except Exception as e:
        e.add_note(f"(while making the progress bar of progress={progress!r})")
        raise
    if not (callable(getattr(bar, "update", None)) and callable(getattr(bar, "close", None))):
        raise TypeError(
            f"progress={progress!r} made {type(bar).__name__!r}, which has no update(n) and "
            f"close(); {_ACCEPTED}"
        )
    return bar


def _default_bar(total: int | None, options: dict[str, Any]) -> Bar:
    """``progress=True``, or a dict of tqdm options: the bar that fits where the run is."""
    options = {"total": total, "unit": "item", **options}
    if "file" not in options and _in_jupyter():
        from tqdm import notebook

        if notebook.IProgress is not None:
            return _widget_bar()(**options)  # type: ignore[no-any-return]
        return _display_bar()(**options)  # type: ignore[no-any-return]
    stream = options.get("file") or sys.stderr
    if "mininterval" not in options and not _is_terminal(stream):
        options["mininterval"] = QUIET_INTERVAL
    options.setdefault("dynamic_ncols", True)
    return _text_bar()(**options)  # type: ignore[no-any-return]


def _in_jupyter() -> bool:
    """Whether this is a Jupyter kernel that shows rich output (notebook, lab, VS Code,
    Colab). qtconsole and Spyder get the text bar, as tqdm decides (they read stderr's ``\\r``)."""
    if "ipykernel" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None or getattr(shell, "kernel", None) is None:
        return False
    return not any(k == "QT_API" or k.startswith("SPYDER") for k in os.environ)


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # a closed or detached stream
        return False


@functools.cache
def _tqdm_options() -> frozenset[str]:
    """The keyword options of ``tqdm.tqdm`` a dict may give (not the iterable, nor ``gui``)."""
    from tqdm.std import tqdm

    params = inspect.signature(tqdm.__init__).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in params if p.kind in kinds) - {"self", "iterable", "gui"}


def _without_monitor(factory: Callable[..., Bar]) -> Callable[..., Bar]:
    """``factory``, or, for a tqdm class (or a ``functools.partial`` of one), its subclass that
    starts no monitor thread. A class that is not tqdm's is called as it is."""
    tqdm_std = sys.modules.get("tqdm.std")  # not imported: no tqdm class can exist
    if tqdm_std is None:
        return factory
    if isinstance(factory, functools.partial):
        func = _without_monitor(factory.func)
        if func is factory.func:
            return factory
        return functools.partial(func, *factory.args, **factory.keywords)
    if isinstance(factory, type) and issubclass(factory, tqdm_std.tqdm):
        interval: object = getattr(factory, "monitor_interval", 0)
        return _quiet_subclass(factory) if interval else factory
    return factory


@functools.lru_cache(maxsize=32)
def _quiet_subclass(cls: type[Any]) -> type[Any]:
    return type(cls.__name__, (cls,), {"monitor_interval": 0, "__module__": cls.__module__})


@functools.cache
def _text_bar() -> type[Any]:
    from tqdm.std import tqdm

    class TextBar(tqdm):  # type: ignore[misc]
        """tqdm's text bar, without a monitor thread."""

        monitor_interval = 0

    return TextBar


class _Nowhere:
    """The stream of a bar that draws into a display instead: writes are dropped (tqdm writes
    its closing newline there)."""

    encoding = "utf-8"

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


@functools.cache
def _display_bar() -> type[Any]:
    from IPython.display import display
    from tqdm.std import tqdm

    class DisplayBar(tqdm):  # type: ignore[misc]
        """tqdm's text bar drawn as one ``text/plain`` display output, redrawn in place."""

        monitor_interval = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._handle: Any = None
            kwargs["file"] = _Nowhere()
            kwargs["disable"] = bool(kwargs.get("disable"))  # None: Jupyter is interactive
            super().__init__(*args, **kwargs)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            data = {"text/plain": self.__str__() if msg is None else msg}
            if self._handle is None:
                self._handle = display(data, raw=True, display_id=True)  # type: ignore[no-untyped-call]
            else:
                self._handle.update(data, raw=True)
            return True

    return DisplayBar


@functools.cache
def _widget_bar() -> type[Any]:
    from IPython.display import display
    from tqdm.notebook import tqdm

    class WidgetBar(tqdm):  # type: ignore[misc]
        """tqdm's widget, shown through a display handle that is updated when the bar closes:
        the saved notebook keeps its final ``text/plain`` (``100%| 200/200``) with the widget.
        """

        monitor_interval = 0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._handle: Any = None
            super().__init__(*args, display=False, **kwargs)
            if not self.disable and self.delay <= 0:
                self._show()

        def _show(self) -> None:
            self._handle = display(self.container, display_id=True)  # type: ignore[no-untyped-call]
            self.displayed = True

        def display(self, *args: Any, check_delay: bool = True, **kwargs: Any) -> None:
            super().display(*args, check_delay=False, **kwargs)
            if check_delay and self._handle is None and self.delay > 0:
                self._show()  # tqdm's ``delay`` has passed

        def close(self) -> None:
            shown = self._handle is not None and not self.disable
            super().close()
            if not shown:
                return
            if self.leave or (self.total and self.n < self.total):  # tqdm keeps a failed bar
                # The widget, with its final text (tqdm's "pretty" one: the bar in blocks).
                bundle = {**self.container._repr_mimebundle_()}
                bundle["text/plain"] = self.container.__repr__(True)
                self._handle.update(bundle, raw=True)
            else:
                self._handle.update({"text/plain": ""}, raw=True)

    return WidgetBar
