"""The package's shape: dependencies point one way, a worker process imports leaves only, and
no module or class grows past what one reader holds in mind."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import pipeflow as pf
from pipeflow import _process

PACKAGE = Path(pf.__file__).parent
MODULES = {
    ("pipeflow" if p.stem == "__init__" else f"pipeflow.{p.stem}"): p for p in PACKAGE.glob("*.py")
}
# What a worker process must not import for a plain stage: the DSL, the caller's side of a run,
# and every room of the engines.
ENGINE = {
    "pipeflow.pipeline",
    "pipeflow._results",
    "pipeflow._backend",
    "pipeflow._local",
    "pipeflow._serial",
    "pipeflow._feeder",
    "pipeflow._tasks",
    "pipeflow._runners",
    "pipeflow._process_stage",
    "pipeflow._sizing",
    "pipeflow._ordering",
}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The ids of the nodes under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``)."""
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                guarded |= {id(n) for n in ast.walk(child)}
    return guarded


def _in_functions(tree: ast.Module) -> set[int]:
    """The ids of the nodes inside function bodies."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for child in node.body:
                inside |= {id(n) for n in ast.walk(child)}
    return inside


def imports_of(module: str, eager: bool = False) -> set[str]:
    """The package's modules that ``module`` imports anywhere in its body (function-level
    imports included, unless ``eager``), but under ``TYPE_CHECKING``."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    guarded = _type_checking_only(tree) | (_in_functions(tree) if eager else set())
    package = module if path.stem == "__init__" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"{package}.{base}".rstrip(".") if base else package
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES and n != module}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return [*stack[stack.index(v) :], v]
            if v not in state and (cycle := visit(v)):
                return cycle
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return None


def test_no_import_cycle_function_level_imports_included() -> None:
    graph = {m: imports_of(m) for m in MODULES if m != "pipeflow"}
    graph = {m: deps - {"pipeflow"} for m, deps in graph.items()}
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle_hidden_in_a_function() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree_deps = imports_of("pipeflow._zygote")  # imports _worker inside a function only
    assert "pipeflow._worker" in tree_deps


def test_the_worker_side_imports_leaves_only() -> None:
    # Statically: nothing the worker's main or the fork server reaches imports an engine. The
    # package's __init__, which every import of a submodule runs, counts with its eager imports
    # (the DSL and Results are imported on first use).
    reached, todo = set(), ["pipeflow._worker", "pipeflow._zygote"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(imports_of(module, eager=module == "pipeflow"))
    assert "pipeflow._apply" in reached
    assert not reached & ENGINE, reached & ENGINE


def _worker_modules(_: object) -> list[str]:
    return sorted(m for m in sys.modules if m == "pipeflow" or m.startswith("pipeflow."))


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_a_worker_process_loads_neither_the_dsl_nor_an_engine(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIPEFLOW_START_METHOD", method)
    _process.shutdown_idle()  # a fresh worker: a warm one may have run a nested pipeline
    (loaded,) = pf.Pipeline().stage(_worker_modules).run([0])
    assert "pipeflow._apply" in loaded  # the test sees the worker's modules
    assert not set(loaded) & ENGINE, set(loaded) & ENGINE
    _process.shutdown_idle()


def _nested(x: int) -> list[int]:
    return pf.Pipeline(kind="thread").stage(abs).run([x])


def test_a_nested_pipeline_in_stage_code_imports_what_it_needs() -> None:
    assert pf.Pipeline().stage(_nested).run([-3]) == [[3]]
    _process.shutdown_idle()


MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 350


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_classes_stay_small(module: str) -> None:
    text = MODULES[module].read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            lines = (node.end_lineno or node.lineno) - node.lineno + 1
            assert lines <= MAX_CLASS_LINES, f"{node.name}: {lines} lines"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_opens_with_what_it_owns(module: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[module].read_text()))
    assert doc and len(doc.splitlines()[0]) > 20, module
