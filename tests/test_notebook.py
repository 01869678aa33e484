"""examples/quickstart.ipynb, executed top to bottom by nbclient on an ipykernel of this
interpreter (the project's venv), so that the notebook never goes stale. It must run without an
error and write only into its own temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"
#: Folders of the checkout the notebook has no business in, and that are large (the venv) or
#: change for other reasons (byte code).
SKIPPED = {".git", ".venv", "__pycache__", ".pytest_cache"}


def checkout_files() -> set[str]:
    found = set()
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [d for d in subfolders if d not in SKIPPED]
        found.update(os.path.relpath(os.path.join(folder, name), REPO) for name in files)
    return found


def test_quickstart_notebook_runs_top_to_bottom_and_writes_only_into_its_temporary_folder(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="the notebook test needs nbformat (dev extra)")
    nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient and ipykernel (dev extra)")
    pytest.importorskip("ipykernel", reason="the notebook test needs ipykernel (dev extra)")
    from jupyter_client.kernelspec import NATIVE_KERNEL_NAME

    temporary, cwd = tmp_path / "tmp", tmp_path / "cwd"
    temporary.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(temporary))  # the kernel inherits it: tempfile.mkdtemp lands here
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    before = checkout_files()
    # The native kernel ("python3") is this interpreter: the one the tests run with.
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name=NATIVE_KERNEL_NAME,
                                     resources={"metadata": {"path": str(cwd)}})
    client.execute()

    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "trained_on='the built-in synthetic shapes (synthetic-v8-seed0-n32-8-8-s32-c5, 32 training images" in text
    assert any("image/png" in out.get("data", {}) for out in outputs)  # the attention figure is shown
    (work,) = temporary.glob("show-attend-tell-quickstart-*")
    assert {"best.ckpt", "config.yaml"} <= {p.name for p in (work / "run").iterdir()}
    assert {"encoder.onnx", "step.onnx", "onnx.json", "README.md"} <= {p.name for p in (work / "exported").iterdir()}
    assert (work / "attention.png").is_file()
    assert list(cwd.iterdir()) == []  # nothing in the folder it ran in
    assert checkout_files() == before  # nor in the checkout
