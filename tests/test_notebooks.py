"""Executes both notebooks top to bottom in their CI mode; any failing cell fails the test.

`CLCA_NOTEBOOK_CI=1` makes the quickstart train for one short epoch and the paper notebook run
a two-run sweep on fabricated data; `CLCA_NOTEBOOK_OUT` keeps what they write in a temporary
folder. The kernel is this interpreter's (a kernel spec written to a temporary folder), so the
notebooks see exactly the packages the tests see.
"""

from __future__ import annotations

import os
import sys

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks")
KERNEL = "clca-jax-tests"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that starts `sys.executable`, found through JUPYTER_PATH."""
    prefix = str(tmp_path_factory.mktemp("jupyter"))
    kernelspec.install(kernel_name=KERNEL, prefix=prefix)
    before = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.path.join(prefix, "share", "jupyter")
    yield KERNEL
    if before is None:
        del os.environ["JUPYTER_PATH"]
    else:
        os.environ["JUPYTER_PATH"] = before


def test_kernel_runs_this_interpreter(kernel_name):
    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    assert spec.argv[0] == sys.executable


@pytest.mark.parametrize("name", ["quickstart.ipynb", "reproduce_paper.ipynb"])
def test_notebook_runs_top_to_bottom(name, kernel_name, tmp_path, monkeypatch):
    monkeypatch.setenv("CLCA_NOTEBOOK_CI", "1")
    monkeypatch.setenv("CLCA_NOTEBOOK_OUT", str(tmp_path))
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    assert any(path.suffix == ".png" for path in tmp_path.iterdir())
