"""The public surface agrees with itself: ``__all__``, the names, the module paths, the stubs."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pipeflow as pf
from pipeflow import _core

STUB = Path(pf.__file__).with_name("_core.pyi")


def test_all_lists_exactly_the_public_names() -> None:
    public = {n for n in dir(pf) if not n.startswith("_")}
    assert set(pf.__all__) == public
    assert sorted(pf.__all__) == pf.__all__


def test_public_classes_show_the_public_module_path() -> None:
    for name in pf.__all__:
        obj = getattr(pf, name)
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            assert obj.__module__ == "pipeflow", name
            assert issubclass(obj, pf.PipeflowError)
    assert pf.Channel.__module__ == "pipeflow"


def test_stub_declares_what_the_extension_exports() -> None:
    tree = ast.parse(STUB.read_text())
    declared = {node.name for node in tree.body if isinstance(node, ast.ClassDef | ast.FunctionDef)}
    runtime = {n for n in dir(_core) if not n.startswith("_")}
    assert declared == runtime == set(_core.__all__)


def test_stub_methods_match_the_runtime_classes() -> None:
    tree = ast.parse(STUB.read_text())
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        stub_members = {
            n.name for n in node.body if isinstance(n, ast.FunctionDef) and n.name != "__new__"
        } | {
            n.target.id
            for n in node.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
        }
        cls = getattr(_core, node.name)
        runtime = {n for n in vars(cls) if not n.startswith("__") or n in stub_members}
        assert stub_members - {"__iter__", "__next__", "__len__"} <= runtime, node.name
        assert {n for n in runtime if not n.startswith("__")} <= stub_members, node.name


def _stub_docs() -> dict[str, str | None]:
    """Each docstring of the stub by its name in ``_core`` (``Channel``, ``Channel.send``), but
    the dunders' (a pyo3 slot method has CPython's docstring, whatever the stub says)."""
    docs: dict[str, str | None] = {}
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            docs[node.name] = ast.get_docstring(node)
        if isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef) and not member.name.startswith("__"):
                    docs[f"{node.name}.{member.name}"] = ast.get_docstring(member)
    return docs


def test_stub_docstrings_are_the_runtime_ones() -> None:
    # help() shows the pyo3 doc comments; IDEs and the API reference read the stub: one text.
    for name, stub_doc in _stub_docs().items():
        obj: object = _core
        for part in name.split("."):
            obj = getattr(obj, part)
        runtime_doc = inspect.cleandoc(obj.__doc__) if obj.__doc__ else None
        assert runtime_doc == stub_doc, name


def test_the_extension_documents_every_public_method() -> None:
    for name, doc in _stub_docs().items():
        assert doc, f"{name} has no docstring (a doc comment in rust/py/src, copied in the stub)"


def test_py_typed_marker_ships() -> None:
    assert Path(pf.__file__).with_name("py.typed").exists()
