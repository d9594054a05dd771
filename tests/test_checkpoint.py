"""Checkpoints: round trip, keep-last-N, fallback past a corrupt newest checkpoint, and refusing
checkpoints of another model — on a small state tree shaped like a TrainState."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax.model import sharding
from llama_e_jax.train.checkpoint import (
    CheckpointMismatchError,
    Checkpoints,
    NoRestorableCheckpointError,
    expected_meta,
)
from llama_e_jax.train.state import STATE_RULES

MODEL = {"num_layers": 2, "hidden_size": 8}
LORA = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "targets": ["q_proj"]}


def make_state(step: int, rank: int = 2) -> dict:
    """A TrainState-shaped tree: step, adapter, Adam-like moments, PRNG key."""
    adapter = {"layers": {"attn": {"q_proj": {"lora_a": jnp.full((2, 8, rank), step, jnp.float32),
                                              "lora_b": jnp.arange(2 * rank * 8, dtype=jnp.float32).reshape(2, rank, 8) * step}}}}
    mu = jax.tree.map(lambda x: x / 2, adapter)
    return {"step": jnp.asarray(step, jnp.int32), "adapter": adapter, "opt_state": {"count": jnp.asarray(step), "mu": mu},
            "rng": jax.random.PRNGKey(step)}


def abstract(state: dict):
    mesh = sharding.make_mesh(sharding.MeshConfig())
    shardings = sharding.param_shardings(state, mesh, STATE_RULES)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def manager(directory: Path, keep: int = 2, rank: int = 2) -> Checkpoints:
    lora = {**LORA, "rank": rank}
    return Checkpoints(directory, keep, expected_meta(MODEL, lora, abstract(make_state(0, rank))))


def save_steps(directory: Path, steps, keep: int = 2) -> None:
    checkpoints = manager(directory, keep)
    for step in steps:
        checkpoints.save(step, make_state(step), {"epoch": 0, "row": step * 3})
    checkpoints.close()


def test_roundtrip_and_keep_last_n(tmp_path):
    save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    checkpoints = manager(tmp_path)
    assert checkpoints.all_steps() == [3, 4]
    restored = checkpoints.restore_latest(abstract(make_state(0)))
    assert restored.step == 4 and restored.data_state == {"epoch": 0, "row": 12}
    for (path, expected), got in zip(jax.tree_util.tree_leaves_with_path(make_state(4)), jax.tree.leaves(restored.state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=str(path))
        assert got.sharding.mesh.axis_names == sharding.AXES


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert manager(tmp_path).restore_latest(abstract(make_state(0))) is None


def _corrupt(step_dir: Path) -> None:
    """Truncate every array file of the step's train state (a write cut off half-way)."""
    for path in (step_dir / "state").rglob("*"):
        if path.is_file() and path.name not in ("commit_success.txt",):
            path.write_bytes(b"")


def test_corrupt_newest_falls_back_with_a_warning(tmp_path, caplog):
    save_steps(tmp_path, [2, 4])
    _corrupt(tmp_path / "4")
    with caplog.at_level(logging.WARNING, logger="llama_e_jax.train.checkpoint"):
        restored = manager(tmp_path).restore_latest(abstract(make_state(0)))
    assert restored.step == 2
    np.testing.assert_array_equal(restored.state["adapter"]["layers"]["attn"]["q_proj"]["lora_a"], 2.0)
    assert any("is unreadable" in r.message and "falling back" in r.message and "/4" in r.message for r in caplog.records)


def test_all_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    save_steps(tmp_path, [2, 4])
    _corrupt(tmp_path / "2")
    _corrupt(tmp_path / "4")
    with pytest.raises(NoRestorableCheckpointError, match=r"no checkpoint could be read"):
        manager(tmp_path).restore_latest(abstract(make_state(0)))


def test_checkpoint_of_another_shape_names_the_difference(tmp_path):
    save_steps(tmp_path, [1])
    other_model = Checkpoints(tmp_path, 2, expected_meta({**MODEL, "hidden_size": 16}, LORA, abstract(make_state(0))))
    with pytest.raises(CheckpointMismatchError, match=r"model\.hidden_size: saved 8, now 16"):
        other_model.restore_latest(abstract(make_state(0)))
    with pytest.raises(CheckpointMismatchError, match=r"lora\.rank: saved 2, now 4"):
        manager(tmp_path, rank=4).restore_latest(abstract(make_state(0, rank=4)))
    # same model and LoRA but another optimizer layout (e.g. clipping switched on): named by leaf
    other_state = {**make_state(0), "opt_state": {"count": jnp.asarray(0)}}
    other_layout = Checkpoints(tmp_path, 2, expected_meta(MODEL, LORA, abstract(other_state)))
    with pytest.raises(CheckpointMismatchError, match=r"state leaf opt_state/mu/layers/attn/q_proj/lora_a: saved \[2, 8, 2\], now None"):
        other_layout.restore_latest(abstract(other_state))
