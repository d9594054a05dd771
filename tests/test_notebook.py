"""The Colab TPU demo notebook runs top to bottom on this CPU with a tiny setting.

`LLAMA_E_NOTEBOOK_TINY=1` makes the notebook use a random 2-layer model with a byte tokenizer and 3
training steps; two fake CPU devices stand in for the TPU cores, so the mesh, the sharded training
step and sharded generation are exercised as on a Colab TPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
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


def run_install_cell(cwd: Path, source: str, **env: str) -> subprocess.CompletedProcess:
    """The notebook's install cell as a script, started outside any checkout."""
    cell = nbformat.read(NOTEBOOK, as_version=4).cells[1].source
    env = dict(os.environ, LLAMA_E_PACKAGE_SOURCE=source, **env)
    return subprocess.run([sys.executable, "-c", cell], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_install_cell_explains_a_missing_or_wrong_package_source(tmp_path):
    missing = run_install_cell(tmp_path, str(tmp_path / "nowhere"))
    assert missing.returncode == 1
    assert "does not exist: set it to a repository folder" in missing.stderr
    (tmp_path / "not_a_repo").mkdir()
    wrong = run_install_cell(tmp_path, str(tmp_path / "not_a_repo"))
    assert wrong.returncode == 1 and "does not hold the repository" in wrong.stderr


def test_install_cell_on_a_fresh_runtime_installs_from_the_git_repository(tmp_path):
    # No checkout around, no PACKAGE_SOURCE, no /content/llama_e_jax: cell 1 must install from git, not stop.
    # A local bare URL that does not exist stands in for the real repository (no network here): pip is
    # asked for exactly it, and its failure is pip's, not a SystemExit of the cell.
    assert not Path("/content/llama_e_jax").exists()
    url = f"git+file://{tmp_path}/missing.git"
    fresh = run_install_cell(tmp_path, "", LLAMA_E_REPOSITORY=url, PIP_NO_INDEX="1")
    assert f"pip install llama_e_jax @ {url}" in fresh.stdout
    assert "CalledProcessError" in fresh.stderr and "SystemExit" not in fresh.stderr


def test_install_cell_uses_the_checkout_it_sits_in():
    in_place = run_install_cell(NOTEBOOK.parent, "/nonexistent")  # the source is never consulted
    assert in_place.returncode == 0, in_place.stderr
    assert in_place.stdout.strip() == f"llama_e_jax from {REPO}"


def test_notebook_has_a_colab_badge():
    intro = nbformat.read(NOTEBOOK, as_version=4).cells[0].source
    assert "https://colab.research.google.com/assets/colab-badge.svg" in intro
    assert "colab.research.google.com/github/" in intro and "notebooks/colab_tpu_demo.ipynb" in intro
