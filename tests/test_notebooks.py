"""Executes both notebooks top to bottom, in their CI mode and as a user runs them; any failing
cell fails the test.

CI mode: `CLCA_NOTEBOOK_CI=1` makes the quickstart train for one short epoch and the paper
notebook run a two-run sweep on fabricated data; `CLCA_NOTEBOOK_OUT` keeps what they write in a
temporary folder. User mode: no such variable; a cell inserted after the notebook's parameters
cell (tagged `parameters`) sets the same variables a user edits there. The kernel is this
interpreter's (a kernel spec written to a temporary folder), so the notebooks see exactly the
packages the tests see.
"""

from __future__ import annotations

import os
import re
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


def execute(name: str, kernel_name: str, overrides: str | None = None) -> list[dict]:
    """Runs notebook `name` with `overrides` (code) after its parameters cell; its outputs."""
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    if overrides is not None:
        tagged = [
            i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])
        ]
        assert len(tagged) == 1, f"{name} needs one cell tagged 'parameters'"
        notebook.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(overrides))
    client = nbclient.NotebookClient(
        notebook,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": NOTEBOOKS}},
    )
    client.execute()  # raises CellExecutionError naming the cell on the first failure
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return outputs


def printed(outputs: list[dict]) -> str:
    """Everything the cells wrote to stdout and stderr, in order."""
    return "".join(o["text"] for o in outputs if o.get("output_type") == "stream")


def user_mode(monkeypatch) -> None:
    for variable in ("CLCA_NOTEBOOK_CI", "CLCA_NOTEBOOK_OUT"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.parametrize("name", ["quickstart.ipynb", "reproduce_paper.ipynb"])
def test_notebook_runs_top_to_bottom(name, kernel_name, tmp_path, monkeypatch):
    monkeypatch.setenv("CLCA_NOTEBOOK_CI", "1")
    monkeypatch.setenv("CLCA_NOTEBOOK_OUT", str(tmp_path))
    outputs = execute(name, kernel_name)
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, "the notebook drew no figure"
    assert any(path.suffix == ".png" for path in tmp_path.iterdir())


def test_quickstart_as_a_user_runs_it(kernel_name, tmp_path, monkeypatch):
    """The CPU default (FULL_RUN off, EPOCHS unset) with the tiny config: the demo's progress
    lines show in the notebook, and its comparison table comes out."""
    user_mode(monkeypatch)
    overrides = f'CONFIG = "demo:tiny"\nOUT = {str(tmp_path)!r}'
    outputs = execute("quickstart.ipynb", kernel_name, overrides)
    text = printed(outputs)
    assert "demo:tiny: 1 epoch(s) per demo run" in text
    assert "nothing to install" in text
    assert re.search(r"step \d+/\d+ \| epoch 1/1 .*\| ETA \d+m\d+s", text), text[-2000:]
    tables = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert len(tables) == 1
    for label in ("EViT + CLCA", "EViT only", "no reduction"):
        assert label in tables[0]
    assert (tmp_path / "kept_tokens.png").is_file()
    assert (tmp_path / "demo" / "no_reduction" / "summary.json").is_file()
    # The deploy cell: the export's own checks, then ONNX Runtime against JAX on the test image.
    assert sorted(os.listdir(tmp_path / "exported_clca")) == [
        "export.json", "model.onnx", "model.stablehlo",
    ]  # fmt: skip
    differences = re.findall(r"logits within (\S+?)(?: of JAX's|$)", text, re.M)
    assert len(differences) == 3, text[-2000:]
    assert all(float(d) <= 1e-4 for d in differences)
    assert re.search(r"^predicted: .+ \| label: .+$", text, re.M)


def test_paper_notebook_without_the_dataset(kernel_name, tmp_path, monkeypatch):
    """No leaf data at DATA_DIR: the data cell says what to do, training is skipped, and the
    commands, the FLOPs table and the (empty) plots still run."""
    user_mode(monkeypatch)
    missing = str(tmp_path / "no_such_dataset")
    overrides = f"DATA_DIR = {missing!r}\nOUT = {str(tmp_path)!r}\nRUN_TRAINING = True"
    text = printed(execute("reproduce_paper.ipynb", kernel_name, overrides))
    assert f"No dataset at DATA_DIR={missing!r}: download soyglobal" in text
    assert f"Not training: no dataset at DATA_DIR={missing!r}" in text
    assert "288 runs, e.g." in text  # 9 backbones x 8 methods x 2 keep rates x with/without CLCA
    flops_rows = re.findall(r"^(\w+) +(0\.[17]) +(\d+\.\d\d) +(\d+\.\d\d)$", text, re.M)
    assert len(flops_rows) == 16
    assert all(float(clca) > float(plain) for _, _, clca, plain in flops_rows)
    assert "No finished runs below RUNS=" in text
    assert not os.path.exists(missing)


def install_cell(name: str) -> str:
    """The source of the notebook's install cell (the code cell that defines `unmet`)."""
    notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    cells = [c.source for c in notebook.cells if c.cell_type == "code" and "def unmet" in c.source]
    assert len(cells) == 1
    return cells[0]


@pytest.mark.parametrize("name", ["quickstart.ipynb", "reproduce_paper.ipynb"])
def test_install_cell_without_package_checkout_or_url_says_what_to_set(name, tmp_path, monkeypatch):
    """Opened on its own (no importable package, no checkout beside it) with REPO_URL unset, the
    install cell stops with one message naming REPO_URL, before running pip."""
    import importlib.util
    import subprocess

    (tmp_path / "notebook_folder").mkdir()
    monkeypatch.chdir(tmp_path / "notebook_folder")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "clca_jax" else find_spec(n, *a)
    )
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a))
    with pytest.raises(SystemExit, match="set REPO_URL in the Parameters cell"):
        exec(install_cell(name), {"REPO_URL": ""})
    assert ran == []
    exec(install_cell(name), {"REPO_URL": "https://example.org/clca_jax"})
    assert ran[0][0][-1] == "git+https://example.org/clca_jax"
