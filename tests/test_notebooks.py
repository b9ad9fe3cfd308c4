"""The notebooks run headless, top to bottom, as a user would run them, and are committed without outputs.

Each notebook is copied to a temporary directory and executed there with nbclient on the `python3` kernel
(ipykernel), one CPU device (the kernel does not inherit the 8 simulated devices of conftest.py) and a
per-cell time limit. The notebooks check their own results with `assert`s (e.g. 01: our logits equal
transformers'; 02: every loss term logged at every step, three models in the report; 03: the paper's
6760.72 M parameters of GeoChat-7B), so a failing cell fails the test with its traceback.
"""

from __future__ import annotations

import os
import pathlib
import shutil

import nbformat
import pytest
from conftest import shared_data_dir
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # generous: the machine running the suite may be shared; a whole notebook takes ~1 min
SLOW = {"02_distillation.ipynb"}  # a full run(config, workdir): ~1 min of CPU


def execute(name: str, tmp_path: pathlib.Path) -> nbformat.NotebookNode:
    shutil.copy(ROOT / "notebooks" / name, tmp_path / name)
    nb = nbformat.read(tmp_path / name, as_version=4)
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # a user's kernel sees one CPU device
    data = shared_data_dir()
    if data is None:
        env.pop("RSKD_SHARED_DATA", None)
    else:
        env["RSKD_SHARED_DATA"] = str(data)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        startup_timeout=300,  # kernel start-up on a busy machine
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute(env=env)  # raises CellExecutionError (with the cell's traceback) on the first error
    return nb


def stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.name == "stdout"
    )


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * (n in SLOW)) for n in NOTEBOOKS])
def test_notebook_runs(name, tmp_path):
    nb = execute(name, tmp_path)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure was drawn"
    if name == "01_quickstart.ipynb":  # the image source follows RSKD_SHARED_DATA
        expected = "UC Merced:" if shared_data_dir() is not None else "using the rs-synth record"
        assert expected in stdout(nb), stdout(nb)[:2000]


def test_every_notebook_is_tested_and_committed_without_outputs():
    assert NOTEBOOKS == ["01_quickstart.ipynb", "02_distillation.ipynb", "03_evaluation.ipynb"], NOTEBOOKS
    for name in NOTEBOOKS:
        nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{name}: committed with outputs"
