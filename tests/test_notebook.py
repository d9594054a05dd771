"""The Colab TPU demo notebook runs top to bottom on this CPU with a tiny setting.

`LLAMA_E_NOTEBOOK_TINY=1` makes the notebook use a random 2-layer model with a byte tokenizer and 3
training steps; two fake CPU devices stand in for the TPU cores, so the mesh, the sharded training
step and sharded generation are exercised as on a Colab TPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "colab_tpu_demo.ipynb"


def outputs_text(notebook) -> str:
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") or "".join(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_E_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("LLAMA_E_NOTEBOOK_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error

    text = outputs_text(notebook)
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in text  # both devices used
    assert "completed after 3 steps" in text
    for task in ("ads_generation", "title_rewriting", "product_classification", "intent_speculation", "general_qa"):
        assert f"=== {task} ===" in text  # data shown and a generation per task
        assert text.count(task) >= 3  # ... and a score line per system in the evaluation
    assert (tmp_path / "run" / "adapter").is_dir()
