"""Checkpoints: round trip, keep-last-N, healing past corrupt checkpoints (moved aside, rewritten, never
rotated in place of a valid one), and refusing checkpoints of another model — on a small state tree
shaped like a TrainState."""

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
    _library_errors_to_debug,
    expected_meta,
)
from llama_e_jax.train import loop, recipe
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


def lora_a(restored) -> float:
    """The value make_state(step) filled lora_a with: the step the state was made for."""
    return float(np.asarray(restored.state["adapter"]["layers"]["attn"]["q_proj"]["lora_a"]).flat[0])


def test_corrupt_newest_falls_back_and_is_moved_aside(tmp_path, caplog):
    save_steps(tmp_path, [2, 4])
    _corrupt(tmp_path / "4")
    checkpoints = manager(tmp_path)
    with caplog.at_level(logging.WARNING, logger="llama_e_jax.train.checkpoint"):
        restored = checkpoints.restore_latest(abstract(make_state(0)))
    assert restored.step == 2 and lora_a(restored) == 2.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert f"{tmp_path / '4'} is unreadable" in warnings[0] and f"moved to {tmp_path / 'corrupt' / '4'}" in warnings[0]
    # kept for inspection, and no longer a step: neither resumed from nor counted by rotation
    assert (tmp_path / "corrupt" / "4" / "state").is_dir() and not (tmp_path / "4").exists()
    assert checkpoints.all_steps() == [2]
    checkpoints.close()


def test_healed_run_rewrites_the_corrupt_step_and_rotation_keeps_valid_ones(tmp_path):
    """The issue-16 sequence: keep=2, steps 36 and 40 saved, 40 corrupt. Resume must come from 36, step 40
    must be written again (not skipped as "existing"), and rotation must delete neither 36 before a valid
    newer one exists nor the rewritten 40."""
    save_steps(tmp_path, [36, 40])
    _corrupt(tmp_path / "40")
    checkpoints = manager(tmp_path)
    assert checkpoints.restore_latest(abstract(make_state(0))).step == 36
    checkpoints.save(40, make_state(40), {"epoch": 0, "row": 120})
    checkpoints.wait_until_finished()
    assert checkpoints.all_steps() == [36, 40]
    checkpoints.save(44, make_state(44), {"epoch": 0, "row": 132})
    checkpoints.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["40", "44"]
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["40", "README.txt"]
    rerun = manager(tmp_path)
    restored = rerun.restore_latest(abstract(make_state(0)))
    assert restored.step == 44 and lora_a(restored) == 44.0
    rerun.close()
    # the rewritten 40 is a valid checkpoint too: with 44 corrupt in turn, the run falls back to it
    _corrupt(tmp_path / "44")
    again = manager(tmp_path)
    restored = again.restore_latest(abstract(make_state(0)))
    assert restored.step == 40 and lora_a(restored) == 40.0
    again.close()
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["40", "44", "README.txt"]


def test_step_corrupted_twice_is_kept_twice(tmp_path):
    save_steps(tmp_path, [2, 4])
    for _ in range(2):
        _corrupt(tmp_path / "4")
        checkpoints = manager(tmp_path)
        assert checkpoints.restore_latest(abstract(make_state(0))).step == 2
        checkpoints.save(4, make_state(4), {"epoch": 0, "row": 12})
        checkpoints.close()
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["4", "4.1", "README.txt"]


def test_unverified_existing_step_is_rewritten(tmp_path):
    """A save onto a step directory this run never read (left by an earlier attempt) replaces it."""
    save_steps(tmp_path, [4])
    _corrupt(tmp_path / "4")
    checkpoints = manager(tmp_path)
    checkpoints.save(4, make_state(4), {"epoch": 0, "row": 12})
    checkpoints.close()
    restored = manager(tmp_path).restore_latest(abstract(make_state(0)))
    assert restored.step == 4 and lora_a(restored) == 4.0 and restored.data_state == {"epoch": 0, "row": 12}


def test_all_corrupt_is_one_line_error_not_a_fresh_start(tmp_path):
    save_steps(tmp_path, [2, 4])
    _corrupt(tmp_path / "2")
    _corrupt(tmp_path / "4")
    with pytest.raises(NoRestorableCheckpointError, match=r"no checkpoint could be read") as caught:
        manager(tmp_path).restore_latest(abstract(make_state(0)))
    assert "\n" not in str(caught.value) and str(tmp_path / "2") in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "corrupt").iterdir()) == ["2", "4", "README.txt"]
    assert manager(tmp_path).restore_latest(abstract(make_state(0))) is None  # moved aside: a fresh start now


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


def test_library_tracebacks_go_to_the_debug_log(caplog):
    """Orbax/tensorstore failures arrive as ERROR records with pages of asyncio traceback; while a restore
    is tried they are re-logged at DEBUG (the debug log keeps them) and the console sees none."""
    with caplog.at_level(logging.DEBUG):
        with _library_errors_to_debug():
            try:
                raise RuntimeError("tensorstore: Error reading ...")
            except RuntimeError:
                logging.getLogger("asyncio").exception("Task exception was never retrieved")
            logging.getLogger("absl").error("a plain error line without traceback")
    errors = [(r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [("absl", "a plain error line without traceback")]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and r.name == "llama_e_jax.train.checkpoint"]
    assert len(debug) == 1 and "Task exception was never retrieved" in debug[0].getMessage() and debug[0].exc_info


def test_training_heals_a_corrupt_newest_checkpoint(tmp_path, caplog):
    """Issue 16's acceptance, through the training loop: corrupt the newest checkpoint and rerun. The rerun
    resumes from the previous checkpoint, finishes, and leaves only valid checkpoints plus the one moved
    aside; the steps it retrains reproduce the first run's losses exactly (a true resume from step 6)."""
    config = recipe.load_config_file("tiny")  # 8 steps, checkpoints every 4; here every 2, keeping 2
    config.run_dir = str(tmp_path / "run")
    config.train.checkpoint_every, config.train.keep_checkpoints = 2, 2
    first = loop.train(config)
    checkpoints_dir = tmp_path / "run" / "checkpoints"
    assert sorted(int(p.name) for p in checkpoints_dir.iterdir() if p.name.isdigit()) == [6, 8]
    _corrupt(checkpoints_dir / "8")

    with caplog.at_level(logging.WARNING, logger="llama_e_jax.train.checkpoint"):
        rerun = loop.train(config)
    assert rerun.status == "completed" and sorted(rerun.losses) == [7, 8]
    assert rerun.losses == {step: first.losses[step] for step in (7, 8)}
    assert sorted(p.name for p in checkpoints_dir.iterdir()) == ["6", "8", "corrupt"]
    assert sorted(p.name for p in (checkpoints_dir / "corrupt").iterdir()) == ["8", "README.txt"]
    assert sum("is unreadable" in r.getMessage() for r in caplog.records) == 1

    third = loop.train(config)  # nothing left to train: the rewritten 8 is read back, no warning
    assert third.step == 8 and third.losses == {}
