"""The notebooks run top to bottom (at tiny sizes) and are committed without outputs.

They are executed once, by the documentation build (``conftest.site``: myst-nb with
``nb_execution_raise_on_error``, so a cell that raises fails the build), which renders
them with their outputs; the tests here read what it rendered.
"""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "docs" / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(site, path):
    page = (site / "notebooks" / f"{path.stem}.html").read_text()
    code_cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code"]
    assert page.count('class="cell docutils container"') == len(code_cells)
    assert page.count("cell_output") >= 2
    assert "output traceback" not in page  # what myst-nb renders for a cell that raised


def test_the_figures_notebook_shows_its_figures(site):
    page = (site / "notebooks" / "figures.html").read_text()
    assert page.count("<img") >= 2


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_outputs_are_stripped(path):
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def test_the_notebooks_exist():
    assert {p.name for p in NOTEBOOKS} == {
        "quickstart.ipynb",
        "figures.ipynb",
        "regularizers.ipynb",
    }
