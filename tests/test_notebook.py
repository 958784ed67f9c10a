"""pipeflow in a real Jupyter kernel, run by nbclient: what the saved notebook shows.

One notebook per configuration (ipywidgets installed, as with the ``notebook`` extra, or not,
as on a fresh install), run once for the module: a kernel takes 1-2 s to start.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import nbformat
import pytest
from nbformat import NotebookNode
from notebook import execute, outputs_of, plain, text

# 200 items of ~5 ms through one worker: a run of about a second, so that tqdm redraws its bar
# ten times or so (every 0.1 s), each a separate output in the saved notebook before the fix.
CELLS = [
    """\
import sys, time
import pipeflow as pf

def slow(x):
    time.sleep(0.005)
    return x
""",
    "len(pf.Pipeline(kind='thread').stage(slow).run(range(200), progress=True))",
    "len(pf.Pipeline(kind='process').stage(slow).run(range(200), progress=True))",
    "len(list(pf.Pipeline().stage(slow).iter(range(200), progress=True, backend='serial')))",
    "len(pf.Pipeline(kind='thread').stage(slow).run(range(200), progress={'disable': True}))",
    "len(pf.Pipeline(kind='thread').stage(slow).run(range(200), progress={'desc': 'files'}))",
    "print(sys.executable); print('ipywidgets' in sys.modules)",
]
SETUP, THREAD, PROCESS, SERIAL_ITER, DISABLED, DESC, KERNEL = range(len(CELLS))
BARS = [THREAD, PROCESS, SERIAL_ITER, DESC]
WIDGET = "application/vnd.jupyter.widget-view+json"


@dataclass
class Saved:
    widgets: bool  # whether ipywidgets was importable in the kernel
    nb: NotebookNode  # the notebook of CELLS as saved, read back as Jupyter would open it


@pytest.fixture(scope="module", params=[True, False], ids=["ipywidgets", "no-ipywidgets"])
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """CELLS executed in a kernel with ``ipywidgets`` importable or not, saved to a file."""
    path = tmp_path_factory.mktemp("nb") / "progress.ipynb"
    execute(CELLS, widgets=request.param, save=path, allow_errors=True)  # each test its cell
    nb: NotebookNode = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return Saved(request.param, nb)


def test_the_kernel_is_this_interpreter_with_or_without_ipywidgets(saved: Saved) -> None:
    assert text(saved.nb.cells[KERNEL]).splitlines() == [sys.executable, str(saved.widgets)]


@pytest.mark.parametrize("cell", BARS, ids=["thread", "process", "serial-iter", "desc"])
def test_the_saved_bar_is_one_output_in_its_final_state(saved: Saved, cell: int) -> None:
    outputs = outputs_of(saved.nb.cells[cell])
    shown = [o for o in outputs if o.output_type != "execute_result"]
    assert len(shown) == 1, shown  # one display, redrawn in place: no stream output per redraw
    (bar,) = shown
    assert bar.output_type == "display_data"
    final = bar.data["text/plain"]
    assert "100%" in final and "200/200" in final, final
    assert (WIDGET in bar.data) == saved.widgets  # the widget, live, with its final text
    assert outputs[-1].output_type == "execute_result" and outputs[-1].data["text/plain"] == "200"


def test_the_options_reach_tqdm(saved: Saved) -> None:
    (bar,) = outputs_of(saved.nb.cells[DESC], "display_data")
    assert bar.data["text/plain"].startswith("files: 100%")


def test_a_disabled_bar_shows_nothing(saved: Saved) -> None:
    assert [o.output_type for o in outputs_of(saved.nb.cells[DISABLED])] == ["execute_result"]


def test_no_cell_raised(saved: Saved) -> None:
    for cell in saved.nb.cells:
        assert not outputs_of(cell, "error"), text(cell)


def test_no_cell_writes_to_stderr(saved: Saved) -> None:
    """No ``IProgress not found`` warning, no text bar on stderr."""
    for cell in saved.nb.cells:
        assert not [o for o in outputs_of(cell, "stream") if o.name == "stderr"], text(cell)


def test_the_helper_leaves_nothing_behind_and_reports_errors() -> None:
    """A notebook run inside one test: the conftest fixture checks that the kernel, its
    sockets and nbclient's threads are gone; a failing cell leaves its traceback."""
    nb = execute(["x = 1", "def f():\n    raise ValueError('boom')\n\nf()"], allow_errors=True)
    (error,) = outputs_of(nb.cells[1], "error")
    assert error.ename == "ValueError"
    assert "Cell In[2], line 2" in plain("\n".join(error.traceback))
