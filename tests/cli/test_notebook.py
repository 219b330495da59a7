"""examples/quickstart.ipynb runs from top to bottom (tiny settings, real CIFAR-10).

The notebook is executed by nbclient in a Jupyter kernel of this very Python (a
kernel spec written for the test, so no other installed "python3" kernel is
picked), started in examples/ as a user opening the notebook there would start it,
with its settings cell replaced by tiny values. It finds the repository root by
itself: a REPO_URL that cannot be cloned shows that it clones nothing.
"""

import json
import os
import sys

import pytest
from conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "examples", "quickstart.ipynb")


def _tiny_settings(cifar10_path: str, workdir: str) -> str:
    return "\n".join(
        [
            'REPO_URL = "file:///nowhere/propmaps-jax.git"',
            'MODELS = "lenet"',
            "NUM_SAMPLES = 2",  # the second is fooled at population 40
            "POPULATION = 40",
            "GENERATIONS = 10",
            f"CIFAR10_PATH = {cifar10_path!r}",
            f"WORKDIR = {workdir!r}",
        ]
    )


def _outputs(cell) -> str:
    parts = []
    for output in cell.get("outputs", []):
        parts.append(output.get("text", ""))
        parts.extend(str(v) for v in output.get("data", {}).values())
    return "".join(parts)


@pytest.mark.e2e  # a Jupyter kernel: a process of its own
def test_quickstart_notebook_runs(cifar10_path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # A kernel spec for this interpreter, found first through JUPYTER_PATH.
    spec = tmp_path / "jupyter" / "kernels" / "propmaps-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "test", "language": "python"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    settings = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(settings) == 1, "the notebook needs one cell tagged 'parameters'"
    workdir = str(tmp_path / "run")
    settings[0].source = _tiny_settings(cifar10_path, workdir)

    client = nbclient.NotebookClient(
        notebook,
        kernel_name="propmaps-test",
        timeout=300,
        resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}},
    )
    client.execute()  # CellExecutionError (with the cell's traceback) on failure

    text = "\n".join(_outputs(c) for c in notebook.cells if c.cell_type == "code")
    assert f"Python {sys.executable}" in text  # the kernel is this interpreter
    assert f"Repository {os.path.realpath(ROOT)}" in text  # found from examples/
    assert "# Table 1" in text and "LeNet (paper)" in text  # rendered table
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    # The distance plot, one vulnerability map and, when an attack succeeded, a
    # propagation map, all inline.
    fooled = "no successful attack" not in text
    assert len(images) == 2 + fooled
    assert os.path.isfile(os.path.join(workdir, "table1.md"))
    if fooled:
        assert os.listdir(os.path.join(workdir, "lenet", "propagation"))
