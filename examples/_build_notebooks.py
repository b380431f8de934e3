"""Builds each example notebook from its script: the ``.py`` is the source of truth.

The scripts are literate, in the "percent" format that VS Code, Spyder and jupytext read:
``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines are ``# ``-prefixed.
The notebooks are written without outputs and with fixed cell ids, so building twice gives the
same bytes and ``git diff`` shows only real changes.

    python examples/_build_notebooks.py          # rewrite examples/0*.ipynb
    python examples/_build_notebooks.py --check  # exit 1 if a notebook is stale
"""

from __future__ import annotations

import pathlib
import sys

EXAMPLES = pathlib.Path(__file__).resolve().parent
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}


def scripts() -> list[pathlib.Path]:
    """The example scripts that have a notebook twin, in reading order."""
    return sorted(EXAMPLES.glob("[0-9][0-9]_*.py"))


def cells_of(source: str) -> list[tuple[str, str]]:
    """``[(kind, text), ...]`` of a percent-format script; kind is "code" or "markdown"."""
    cells: list[tuple[str, list[str]]] = []
    for number, line in enumerate(source.splitlines(), 1):
        if line.startswith("# %%"):
            marker = line[4:].strip()
            if marker not in ("", "[markdown]"):
                raise ValueError(f"line {number}: unknown cell marker {line!r}")
            cells.append(("markdown" if marker else "code", []))
        elif not cells:
            if line.strip():
                raise ValueError(f"line {number}: text before the first '# %%' cell marker")
        elif cells[-1][0] == "markdown":
            if line.strip() and line != "#" and not line.startswith("# "):
                raise ValueError(f"line {number}: markdown lines must start with '# ': {line!r}")
            cells[-1][1].append(line[2:])
        else:
            cells[-1][1].append(line)
    return [(kind, "\n".join(lines).strip("\n")) for kind, lines in cells]


def notebook(script: pathlib.Path):
    """The notebook (an ``nbformat.NotebookNode``) of ``script``: its cells, no outputs,
    deterministic ids."""
    import nbformat  # only here: the parsing above needs no Jupyter packages

    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    try:
        cells = cells_of(script.read_text())
    except ValueError as e:
        raise ValueError(f"{script.name}: {e}") from None
    for i, (kind, text) in enumerate(cells):
        cell_id = f"{script.stem[:2]}-{i:02d}"
        if kind == "markdown":
            nb.cells.append(nbformat.v4.new_markdown_cell(text, id=cell_id))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(text, id=cell_id))
    nbformat.validate(nb)
    return nb


def render(script: pathlib.Path) -> str:
    """The notebook file's exact text."""
    import nbformat

    return nbformat.writes(notebook(script)) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    check = "--check" in argv
    stale = []
    for script in scripts():
        path = script.with_suffix(".ipynb")
        text = render(script)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.name)
        if not check:
            path.write_text(text)
            print(f"wrote {path.relative_to(EXAMPLES.parent)}")
    if check and stale:
        print(f"stale notebooks: {', '.join(stale)}; run python examples/_build_notebooks.py")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
