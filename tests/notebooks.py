"""Runs the notebooks as Jupyter does, and counts the figures they make and the ones they display.

The kernel starts with matplotlib's default backend for Jupyter (the inline one: ``MPLBACKEND`` is
removed from its environment) and with an IPython startup file that counts every
``matplotlib.figure.Figure`` created. A figure that a cell makes but never shows (a forced ``Agg``
backend, a ``plt.close`` before the cell ends) is then a difference between the count and the images
in the outputs.

Store the notebooks executed, with their outputs, after changing one::

    python -m tests.notebooks            # every notebook in notebooks/
    python -m tests.notebooks notebooks/01_quickstart.ipynb
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
MARKER = "SAMFUNC_FIGURES_MADE"
FIGURE_COUNTER = """\
import matplotlib.figure as _samfunc_mpl_figure

_samfunc_figures_made = 0
_samfunc_figure_init = _samfunc_mpl_figure.Figure.__init__


def _samfunc_counting_init(self, *args, **kwargs):
    global _samfunc_figures_made
    _samfunc_figures_made += 1
    _samfunc_figure_init(self, *args, **kwargs)


_samfunc_mpl_figure.Figure.__init__ = _samfunc_counting_init
"""


@dataclass
class Executed:
    """A notebook after a run: its cells with their outputs, and the figures its code made."""

    notebook: Any
    figures_made: int

    @property
    def figures_displayed(self) -> int:
        """The PNG images among the code cells' outputs."""
        return count_images(self.notebook)


def count_images(notebook: Any) -> int:
    """The number of ``image/png`` outputs in a notebook's code cells."""
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for output in cell["outputs"]
    )


@contextmanager
def _kernel_environment() -> Iterator[None]:
    """Jupyter's default backend and a figure-counting startup file, for kernels started inside."""
    saved = {key: os.environ.get(key) for key in ("MPLBACKEND", "IPYTHONDIR")}
    with tempfile.TemporaryDirectory() as ipython_dir:
        startup = Path(ipython_dir) / "profile_default" / "startup"
        startup.mkdir(parents=True)
        (startup / "00-count-figures.py").write_text(FIGURE_COUNTER)
        os.environ.pop("MPLBACKEND", None)
        os.environ["IPYTHONDIR"] = ipython_dir
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def execute(path: Path, timeout: int = 300) -> Executed:
    """Runs every cell of ``path`` in a fresh kernel, in the notebook's folder, top to bottom."""
    notebook = nbformat.read(path, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell(f"print({MARKER!r}, _samfunc_figures_made)"))
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    with _kernel_environment():
        client.execute()
    counter_cell = notebook.cells.pop()
    printed = "".join(output.get("text", "") for output in counter_cell.outputs)
    _, made = printed.split()
    return Executed(notebook, int(made))


def store(path: Path) -> Executed:
    """Executes ``path`` and writes it back with its outputs (no widget state, no timings)."""
    executed = execute(path)
    executed.notebook.metadata.pop("widgets", None)
    nbformat.write(executed.notebook, path)
    return executed


def main() -> None:
    """``python -m tests.notebooks [PATH ...]``: executes and stores the notebooks."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=NOTEBOOKS)
    for path in parser.parse_args().paths:
        executed = store(path.resolve())
        size = path.stat().st_size // 1024
        print(
            f"{path.name}: {executed.figures_made} figures made, "
            f"{executed.figures_displayed} displayed, {size} KiB"
        )


if __name__ == "__main__":
    main()
