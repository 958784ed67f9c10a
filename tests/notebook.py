"""Run code cells in a real Jupyter kernel and get the notebook back as Jupyter saves it.

``execute(cells)`` starts an ipykernel on this very interpreter (``sys.executable``: a
kernelspec written to a temporary directory, so no other installed kernel can be picked up),
runs the cells one by one with nbclient, shuts the kernel down and returns the executed
``nbformat`` notebook: its cells' ``outputs`` are what a user would see in the saved file (and on
GitHub). ``widgets=False`` runs the kernel as on a fresh install without ipywidgets: a
``sitecustomize`` on the kernel's ``PYTHONPATH`` makes ``import ipywidgets`` raise
``ModuleNotFoundError``, as it does where the package is missing (the kernel and the code under
test are real; only the package is absent).

A kernel takes 1-2 s to start: run one notebook of several cells per configuration (a
module-scoped fixture), not one per test.

Example (a test module)::

    from notebook import execute, text

    @pytest.fixture(scope="module")
    def nb() -> NotebookNode:
        return execute(["import pipeflow as pf", "pf.Pipeline().stage(abs).run([-1])"])

    def test_result(nb: NotebookNode) -> None:
        assert text(nb.cells[1]) == "[1]"
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbformat import NotebookNode
from traitlets import default

__all__ = ["execute", "outputs_of", "plain", "text"]

KERNEL = "pipeflow-test"

# The kernel's sitecustomize when ipywidgets must be missing. It shadows any other sitecustomize
# on the path (Debian's, for one), so it runs that one afterwards.
_NO_WIDGETS = '''\
"""This kernel runs as on an install without ipywidgets (tests/notebook.py)."""
import importlib.machinery
import importlib.util
import os
import sys


class _Missing:
    """Finds no ``ipywidgets`` (nor its submodules), as on an install without it."""

    def find_spec(self, name, path=None, target=None):
        if name == "ipywidgets" or name.startswith("ipywidgets."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Missing())

_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None:
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
'''

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def execute(
    cells: Sequence[str],
    *,
    widgets: bool = True,
    save: str | os.PathLike[str] | None = None,
    allow_errors: bool = False,
    timeout: int = 120,
) -> NotebookNode:
    """Runs ``cells`` (code, one string a cell) in a fresh kernel of this interpreter, and returns
    the executed notebook (also written to ``save`` if given, as Jupyter would save it, even
    when a cell failed).

    ``widgets=False``: ``import ipywidgets`` fails in the kernel. ``allow_errors``: a cell that
    raises leaves an ``error`` output (its ``traceback`` is a list of ANSI-coloured lines: see
    :func:`plain`) and the next cells still run; otherwise the first error raises nbclient's
    ``CellExecutionError``. ``timeout``: seconds for each cell. The kernel runs in a temporary
    working directory, removed afterwards, and is shut down however the run ends.
    """
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in cells]
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": KERNEL, "language": "python"}
    with tempfile.TemporaryDirectory(prefix="pipeflow-nb-") as tmp:
        root = Path(tmp)
        _write_kernelspec(root, widgets=widgets)
        work = root / "work"
        work.mkdir()
        client = NotebookClient(
            nb,
            kernel_name=KERNEL,
            kernel_manager_class=_manager(root),
            timeout=timeout,
            startup_timeout=120,
            allow_errors=allow_errors,
            resources={"metadata": {"path": str(work)}},
        )
        try:
            # asyncio.run: a loop of our own, closed at the end (nbclient's sync execute() keeps
            # a loop per thread open for the life of the process).
            asyncio.run(_execute(client))
        finally:
            if save is not None:  # also what ran of it when a cell failed, to look at
                nbformat.write(nb, os.fspath(save))
    return nb


async def _execute(client: NotebookClient) -> None:
    """``client.async_execute()``, and the kernel shut down however it ends: nbclient leaves
    it running when it fails to connect to it after starting it."""
    try:
        await client.async_execute()
    finally:
        km = client.km  # None once nbclient shut the kernel down
        if km is not None and await km.is_alive():
            await km.shutdown_kernel(now=True)  # and its files, as cleanup_resources does
        elif km is not None:
            await km.cleanup_resources()
        atexit.unregister(client._cleanup_kernel)  # nbclient's, for an interpreter exit mid-run


def outputs_of(cell: NotebookNode, output_type: str | None = None) -> list[NotebookNode]:
    """The saved outputs of ``cell`` (those of ``output_type`` only, if given: ``"stream"``,
    ``"display_data"``, ``"execute_result"``, ``"error"``)."""
    outs: list[NotebookNode] = cell.outputs
    return [o for o in outs if output_type is None or o.output_type == output_type]


def text(cell: NotebookNode) -> str:
    """Everything ``cell`` shows as text, in order: streams, the ``text/plain`` of displays
    and results, tracebacks (ANSI codes removed); one line per output at least."""
    parts = []
    for out in cell.outputs:
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            parts.append(out.get("data", {}).get("text/plain", ""))
        elif out.output_type == "error":
            parts.append("\n".join(out.traceback))
    return plain("\n".join(p.rstrip("\n") for p in parts))


def plain(s: str) -> str:
    """``s`` without ANSI colour codes (IPython colours its tracebacks)."""
    return _ANSI.sub("", s)


def _write_kernelspec(root: Path, *, widgets: bool) -> None:
    spec: dict[str, Any] = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": KERNEL,
        "language": "python",
        "metadata": {"debugger": False},
    }
    if not widgets:
        site = root / "no-widgets"
        site.mkdir()
        (site / "sitecustomize.py").write_text(_NO_WIDGETS)
        path = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        spec["env"] = {"PYTHONPATH": os.pathsep.join(path)}
    kernel = root / "kernels" / KERNEL
    kernel.mkdir(parents=True)
    (kernel / "kernel.json").write_text(json.dumps(spec))


def _manager(root: Path) -> type[AsyncKernelManager]:
    """A kernel manager that finds only the kernelspecs under ``root / "kernels"``."""

    class Manager(AsyncKernelManager):  # type: ignore[misc]
        # Unix sockets in the temporary directory (``ip`` is their path's prefix): no TCP port
        # is opened (the kernel warns on stderr about unencrypted TCP).
        @default("transport")
        def _transport(self) -> str:
            return "ipc"

        @default("ip")
        def _ip(self) -> str:
            return str(root / "ipc")

        @default("kernel_spec_manager")
        def _kernel_specs(self) -> KernelSpecManager:
            kernels = str(root / "kernels")
            return KernelSpecManager(kernel_dirs=[kernels], ensure_native_kernel=False)

    return Manager
