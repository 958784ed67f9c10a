"""A stage's error in a notebook, executed in a real kernel: IPython shows the cell
(``Cell In[2], line 3``) and its source line, for process and thread stages, with no pipeflow
frame; ``except MyErr`` matches in a cell as in a script."""

from __future__ import annotations

import pytest
from nbformat import NotebookNode
from notebook import execute, text

CELLS = [
    "import pipeflow as pf",
    # In[2]: the stage code, defined in the notebook (pickled by value for a process stage).
    "def parse(x):\n    if x == 3:\n        raise ValueError(f'bad {x}')\n    return x",
    "pf.Pipeline().stage(parse, kind='process', workers=2).run(range(6))",
    "pf.Pipeline().stage(parse, kind='thread', workers=2).run(range(6))",
    "class MyErr(Exception):\n"
    "    def __init__(self, code, msg):\n"
    "        super().__init__(f'{code}: {msg}')\n"
    "        self.code = code\n"
    "\n"
    "def check(x):\n"
    "    raise MyErr(x, 'no')\n"
    "\n"
    "try:\n"
    "    pf.Pipeline().stage(check, kind='process').run([5])\n"
    "except MyErr as e:\n"
    "    print('caught', type(e).__name__, e.code, e)",
]


@pytest.fixture(scope="module")
def nb() -> NotebookNode:
    return execute(CELLS, allow_errors=True)


@pytest.mark.parametrize("cell", [2, 3], ids=["process", "thread"])
def test_the_traceback_shows_the_cell_and_its_line(nb: NotebookNode, cell: int) -> None:
    shown = text(nb.cells[cell])
    assert "Cell In[2], line 3" in shown, shown
    assert "raise ValueError(f'bad {x}')" in shown, shown
    assert "ValueError: bad 3" in shown
    assert "on input item 3: 3" in shown
    assert "pipeflow/" not in shown and "<dynamic-code>" not in shown, shown


def test_except_matches_a_class_defined_in_the_notebook(nb: NotebookNode) -> None:
    assert text(nb.cells[4]) == "caught MyErr 5 5: no"
