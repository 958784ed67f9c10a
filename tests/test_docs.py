"""The docs for users: the site builds with no warning, the README's first example runs as
pasted, ``help()`` shows what each public name does, and the namespace is the API."""

from __future__ import annotations

import inspect
import pickle
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pipeflow as pf

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# What a stage option is when it is left out, as its docs must say it; the test below checks
# that a step left to its defaults has these values.
DEFAULTS = {
    "workers": "``1``",
    "kind": "the pipeline's ``kind``",
    "name": "the function's ``__name__``",
    "capacity": "``2 * workers``",
    "ordered": "the pipeline's ``ordered``",
    "init": "``None``",
    "timeout": "``None``",
    "retries": "``0``",
}


def _help(obj: object) -> str:
    """What ``help(obj)`` prints."""
    return pydoc.render_doc(obj, renderer=pydoc.plaintext)


def _entries(doc: str, section: str) -> dict[str, str]:
    """The entries of a Google-style docstring section (``Keyword Args:``), by name: each
    entry's text, its continuation lines joined."""
    lines = doc.splitlines()
    start = lines.index(f"{section}:")
    entries: dict[str, str] = {}
    name = None
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        head = re.match(r" {4}(\w+)(?: \([^)]*\))?: (.*)", line)
        if head:
            name = head.group(1)
            entries[name] = head.group(2)
        elif name is not None and line.startswith(" " * 8):
            entries[name] += " " + line.strip()
    return entries


def test_the_docs_build_with_no_warning(tmp_path: Path) -> None:
    # --strict fails on any warning: a docstring griffe cannot read, a broken link or anchor,
    # a README section the guide includes that is gone.
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    assert "WARNING" not in out.stderr, out.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="pipeflow.Channel.send"' in api  # the stub's methods are documented
    assert "Sends <code>item</code>, blocking while the channel is full." in api


def test_the_api_reference_documents_every_public_name() -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: pipeflow\.(\w+)$", api, re.MULTILINE))
    assert documented == set(pf.__all__)


def test_the_readme_first_example_runs_as_pasted(tmp_path: Path) -> None:
    # The first python block, run as a script; it prints what the text block after it says.
    text = README.read_text()
    blocks = re.findall(r"^```(\w+)\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)
    first = next(i for i, (lang, _) in enumerate(blocks) if lang == "python")
    code, (lang, expected) = blocks[first][1], blocks[first + 1]
    assert lang == "text", "the first example is followed by its output"
    assert len(code.splitlines()) <= 15, "the first example stays short"
    script = tmp_path / "example.py"
    script.write_text(code)
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected


def test_the_readme_keeps_the_make_targets() -> None:
    # CI and the quick start rely on them.
    text = README.read_text()
    assert "make demo" in text
    assert "make test" in text


def test_help_of_a_channel_method_shows_its_signature_and_docstring() -> None:
    text = _help(pf.Channel.send)
    assert "send(self, /, item, timeout=None)" in text
    assert "Sends ``item``, blocking while the channel is full." in text
    assert "TimeoutError: the channel stayed full" in text
    whole = _help(pf.Channel)
    for method in ("send", "recv", "close", "try_send", "try_recv"):
        doc = inspect.getdoc(getattr(pf.Channel, method))
        assert doc, method
        assert doc.splitlines()[0] in whole, method
    assert "Receives from whichever channel has an item first" in _help(pf.select)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (pf.Channel, "(capacity=0)"),
        (pf.Channel.send, "(self, /, item, timeout=None)"),
        (pf.Channel.try_send, "(self, /, item)"),
        (pf.Channel.recv, "(self, /, timeout=None)"),
        (pf.Channel.try_recv, "(self, /)"),
        (pf.Channel.close, "(self, /)"),
        (pf.select, "(channels, timeout=None)"),
    ],
)
def test_inspect_signature_works_on_the_pyo3_api(obj: object, expected: str) -> None:
    assert str(inspect.signature(obj)) == expected  # type: ignore[arg-type]


def test_every_method_of_the_extension_has_a_signature() -> None:
    from pipeflow import _core

    for name in _core.__all__:
        cls = getattr(_core, name)
        members = vars(cls).items() if inspect.isclass(cls) else [(name, cls)]
        for member, value in members:
            if callable(value) and not member.startswith("__"):
                inspect.signature(getattr(cls, member) if inspect.isclass(cls) else value)


def test_help_of_stage_lists_every_option_with_its_default() -> None:
    doc = inspect.getdoc(pf.Pipeline.stage)
    assert doc is not None
    entries = _entries(doc, "Keyword Args")
    assert set(entries) == set(pf.StageOptions.__annotations__)
    for key, default in DEFAULTS.items():
        assert f"Default: {default}" in entries[key], key
    text = _help(pf.Pipeline.stage)
    for line in doc.splitlines():
        assert line.strip() in text


def test_help_of_stage_options_lists_every_option_with_its_default() -> None:
    doc = inspect.getdoc(pf.StageOptions)
    assert doc is not None
    entries = _entries(doc, "Attributes")
    assert set(entries) == set(pf.StageOptions.__annotations__)
    for key, default in DEFAULTS.items():
        assert f"Default: {default}" in entries[key], key


def test_the_documented_defaults_are_the_real_ones() -> None:
    assert set(DEFAULTS) == set(pf.StageOptions.__annotations__)

    def double(x: int) -> int:
        return 2 * x

    for kind, ordered in (("thread", False), ("process", True)):
        (step,) = pf.Pipeline(kind=kind, ordered=ordered).stage(double).steps
        assert (step.workers, step.kind, step.name) == (1, kind, "double")
        assert (step.capacity, step.ordered) == (2, ordered)
        assert (step.init, step.timeout, step.retries) == (None, None, 0)
    (step,) = pf.Pipeline().stage(double, workers=3).steps
    assert step.capacity == 2 * 3


def test_pipeline_init_is_documented() -> None:
    doc = inspect.getdoc(pf.Pipeline.__init__)
    assert doc is not None
    entries = _entries(doc, "Args")
    assert set(entries) == set(inspect.signature(pf.Pipeline).parameters) == {"ordered", "kind"}
    assert "ordered" in _help(pf.Pipeline)


def test_the_namespace_is_the_api() -> None:
    import pipeflow.pipeline  # binds pf.pipeline, as any import of the submodule does

    assert "pipeline" not in dir(pf)
    assert not [n for n in dir(pf) if not n.startswith("_") and n not in pf.__all__]
    # The module stays importable by its name: pickles of pipelines refer to it.
    assert pf.Pipeline.__module__ == pipeflow.pipeline.__name__
    p = pf.Pipeline(kind="thread").stage(abs)
    assert pickle.loads(pickle.dumps(p)).run([-1, 2]) == [1, 2]


def test_python_m_pipeflow_still_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pipeflow", "demo", "--items", "4", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    assert "results identical" in out.stdout
