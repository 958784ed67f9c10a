"""A griffe extension for the docs build: pipeflow's docstrings as mkdocstrings renders them.

pipeflow's docstrings are Google style with Sphinx roles, as ``help()`` readers and IDEs expect;
mkdocstrings renders Markdown. Two things differ, and this extension bridges them once the
package is loaded, without touching the sources:

- A ``Example:`` section is an examples section, as ``Examples:`` is (Google style allows both;
  griffe reads the singular as an admonition, whose doctests would become Markdown text:
  ``>>>`` a quote, ``[0, 1]`` a link).
- A role (``:class:`Context```, ``:meth:`stage```, ``:func:`~pipeflow.worker_state```) is
  resolved from the scope of the object it appears in, as Python would resolve the name, and
  becomes an optional cross-reference: a link when the target is on a page, plain code when it
  is not (a private helper, a builtin), never a warning.
- A class of the extension is made by ``__new__`` (a pyo3 ``#[new]``), which its stub declares
  (stubtest wants it so); mkdocstrings shows a class's signature from ``__init__`` only, so such
  a class gets an ``__init__`` with ``__new__``'s parameters, for its page.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|meth|func|attr|exc|data|mod|obj):`(~?)([\w.]+)`")


def _objects(obj: griffe.Object) -> Iterator[griffe.Object]:
    """``obj`` and every object under it (aliases are skipped: their target is walked where it
    is defined)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _objects(member)


def _resolve(obj: griffe.Object, name: str) -> str | None:
    """The full path of ``name`` as seen from ``obj`` (its first part looked up in the
    enclosing scopes, the rest as members), or None."""
    head, _, rest = name.partition(".")
    try:
        path = obj.resolve(head)
    except griffe.NameResolutionError:
        return None
    return f"{path}.{rest}" if rest else path


def _crossref(obj: griffe.Object, match: re.Match[str]) -> str:
    short, name = match.group(1), match.group(2)
    shown = name.rsplit(".", 1)[-1] if short else name
    path = _resolve(obj, name)
    code = f"<code>{shown}</code>"
    return code if path is None else f'<autoref identifier="{path}" optional>{code}</autoref>'


def _init_from_new(cls: griffe.Class) -> None:
    """Gives ``cls`` an ``__init__`` with the parameters of its ``__new__`` (``cls`` aside)."""
    new = cls.members["__new__"]
    params = list(new.parameters)[1:]  # type: ignore[union-attr]
    self = griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword)
    init = griffe.Function("__init__", parameters=griffe.Parameters(self, *params), returns="None")
    cls.set_member("__init__", init)


class PipeflowDocstrings(griffe.Extension):
    """Rewrites ``Example:`` headers and Sphinx roles in every docstring of the package, and
    shows the signature of the classes made by ``__new__``."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        for obj in _objects(pkg):
            if obj.is_class and "__new__" in obj.members and "__init__" not in obj.members:
                _init_from_new(obj)  # type: ignore[arg-type]
            doc = obj.docstring
            if doc is None:
                continue
            text = _EXAMPLE.sub(r"\1Examples:", doc.value)
            doc.value = _ROLE.sub(lambda m, obj=obj: _crossref(obj, m), text)
