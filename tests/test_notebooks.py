"""The notebooks run, display every figure they make, and are stored executed with their outputs."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tests.notebooks import NOTEBOOKS, count_images, execute

MAX_STORED_BYTES = 300_000  # small settings keep every stored notebook light


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_notebook_is_executed_top_to_bottom_with_its_figures(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1)), (
        f"{path.name} is not stored as one run from the top: python -m tests.notebooks {path}"
    )
    errors = [o for cell in code for o in cell.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} is stored with an error output"
    assert count_images(notebook) >= 1, f"{path.name} is stored without its figures"
    assert path.stat().st_size < MAX_STORED_BYTES
    for cell in code:
        assert "matplotlib.use(" not in cell.source, f"{path.name} forces a matplotlib backend"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_and_displays_every_figure_it_makes(path: Path) -> None:
    executed = execute(path)
    assert executed.figures_made >= 1
    assert executed.figures_displayed == executed.figures_made, (
        f"{path.name}: {executed.figures_made} figures made, {executed.figures_displayed} displayed"
    )
    stored = nbformat.read(path, as_version=4)
    assert count_images(stored) == executed.figures_displayed, (
        f"{path.name}'s stored outputs are stale: python -m tests.notebooks {path}"
    )


def test_the_check_catches_a_figure_drawn_into_a_forced_backend(tmp_path: Path) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    notebook.cells = [
        nbformat.v4.new_code_cell(
            'import matplotlib\nmatplotlib.use("Agg")\nimport matplotlib.pyplot as plt\n'
            "fig, ax = plt.subplots()\nax.plot([0, 1])"
        ),
        nbformat.v4.new_code_cell("fig2, ax2 = plt.subplots()\nplt.show()"),
    ]
    path = tmp_path / "agg.ipynb"
    nbformat.write(notebook, path)
    executed = execute(path)
    assert (executed.figures_made, executed.figures_displayed) == (2, 0)
