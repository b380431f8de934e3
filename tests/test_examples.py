"""The newcomer examples run, as scripts and as notebooks, and each notebook is its script.

Every example asserts its own results against a dense computation, so a broken API fails here.
They use ``JPA_BACKEND`` (default "auto": the xla backend on a CPU, the kernels on a GPU).
Matplotlib draws with Agg (no display).
"""

from __future__ import annotations

import os
import pathlib
import runpy
import sys
import warnings

import pytest

from examples import _build_notebooks

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SCRIPTS = _build_notebooks.scripts()
NEEDS = {"04_flax_nnx_model": "flax"}  # optional packages (the "test" extra installs them)
DRAWS = {"01_paged_decode", "02_chunked_prefill", "03_moe_layer"}  # examples with a figure


def _ids(path: pathlib.Path) -> str:
    return path.stem


def _require(script: pathlib.Path) -> None:
    if script.stem in NEEDS:
        pytest.importorskip(NEEDS[script.stem])


def test_examples_exist():
    assert [s.stem for s in SCRIPTS] == [
        "01_paged_decode",
        "02_chunked_prefill",
        "03_moe_layer",
        "04_flax_nnx_model",
    ]


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids)
def test_script_runs(script):
    _require(script)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*cannot be shown")
            runpy.run_path(str(script), run_name="__main__")
        if script.stem in DRAWS:
            assert plt.get_fignums(), "no figure was drawn"
    finally:
        plt.close("all")


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids)
def test_notebook_runs(script, monkeypatch):
    _require(script)
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # The kernel inherits the environment: draw with Agg, import this checkout's package.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(
            [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    nb = nbformat.read(script.with_suffix(".ipynb"), as_version=4)
    # A first cell (in memory only) proves the kernel is this interpreter, drawing with Agg.
    nb.cells.insert(
        0,
        nbformat.v4.new_code_cell(
            "import os, sys, matplotlib\n"
            f"assert os.path.realpath(sys.executable) == {os.path.realpath(sys.executable)!r}, "
            "sys.executable\n"
            "assert matplotlib.get_backend().lower() == 'agg', matplotlib.get_backend()"
        ),
    )
    client = nbclient.NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(EXAMPLES)}}
    )
    client.execute()  # raises CellExecutionError (with the traceback) if a cell fails
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors


@pytest.mark.parametrize("script", SCRIPTS, ids=_ids)
def test_notebook_matches_script(script):
    pytest.importorskip("nbformat")
    notebook = script.with_suffix(".ipynb")
    assert notebook.exists(), "run: python examples/_build_notebooks.py"
    assert notebook.read_text() == _build_notebooks.render(script), (
        f"{notebook.name} is stale or has outputs; the .py is the source: run "
        f"python examples/_build_notebooks.py"
    )


def test_no_notebook_without_script():
    notebooks = {p.stem for p in EXAMPLES.glob("*.ipynb")}
    assert notebooks == {s.stem for s in SCRIPTS}


def test_cells_of_parses_percent_format():
    source = "# %% [markdown]\n# # Title\n#\n# text\n\n# %%\nx = 1\n\n\n# %%\ny = 2\n"
    assert _build_notebooks.cells_of(source) == [
        ("markdown", "# Title\n\ntext"),
        ("code", "x = 1"),
        ("code", "y = 2"),
    ]
    with pytest.raises(ValueError, match="before the first"):
        _build_notebooks.cells_of("x = 1\n# %%\n")
    with pytest.raises(ValueError, match="must start with"):
        _build_notebooks.cells_of("# %% [markdown]\nnot a comment\n")
