"""Training: the step's maths, the loop's lifecycle (resume, SIGTERM, divergence) and the config CLI.

All runs use configs/tiny.py (a random 2-layer model with a byte tokenizer on the seed JSONL), so a
whole run takes seconds. Runs keep tiny's optimiser settings and step count where they can: those
are compiled into the step, and identical programs are shared through JAX's persistent compilation
cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from llama_e_jax.io import adapters
from llama_e_jax.io.load import random_params
from llama_e_jax.model import lora
from llama_e_jax.model import sharding
from llama_e_jax.train import __main__ as cli
from llama_e_jax.train import loop as train
from llama_e_jax.train import recipe
from llama_e_jax.train.data import resolve_data_path
from llama_e_jax.train.checkpoint import CheckpointMismatchError, Checkpoints, expected_meta
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LoraConfig
from llama_e_jax.train.state import Trainer, make_optimizer, summed_token_loss
from llama_e_jax.io.weights import load_hf_checkpoint, save_hf_checkpoint

from conftest import FP32_EPS, assert_close, fp32_bound

REPO = Path(__file__).resolve().parent.parent



def tiny(tmp_path: Path, name: str = "run", **overrides) -> ml_collections.ConfigDict:
    """configs/tiny.py in a fresh run dir, with `section.field=value` overrides."""
    config = recipe.load_config_file("tiny")
    config.run_dir = str(tmp_path / name)
    for key, value in overrides.items():
        section, field = key.split("__")
        config[section][field] = value
    return config


# ------------------------------------------------------------------------------- the step


def synthetic_batch(config: LlamaConfig, rows: int, micro: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[rows, micro, length] packed-looking batch: two segments per row, loss on a varying tail."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (rows, micro, length + 1)).astype(np.int32)
    half = length // 2
    segments = np.where(np.arange(length) < half, 1, 2).astype(np.int32)
    positions = np.where(np.arange(length) < half, np.arange(length), np.arange(length) - half).astype(np.int32)
    mask = np.zeros((rows, micro, length), np.float32)
    for r in range(rows):
        for m in range(micro):
            start = rng.integers(1, half - 1)  # a different number of response tokens in every row
            mask[r, m, start:half - 1] = 1.0
            mask[r, m, half + start:length - 1] = 1.0
    return dict(input_ids=ids[..., :-1], targets=ids[..., 1:], loss_mask=mask,
                segment_ids=np.broadcast_to(segments, mask.shape).copy(),
                positions=np.broadcast_to(positions, mask.shape).copy())


def make_trainer(config: LlamaConfig, lora_config: LoraConfig, direction=None) -> Trainer:
    """tiny's AdamW, or `direction` with learning rate 1."""
    mesh = sharding.make_mesh(sharding.MeshConfig())
    if direction is None:
        direction, schedule = make_optimizer(recipe.load_config_file("tiny").optim, total_steps=8)
    else:
        schedule = optax.constant_schedule(1.0)
    return Trainer(config, lora_config, direction, schedule, mesh)


def test_only_the_adapter_changes(tiny_params):
    """With tiny's model, LoRA and batch shape, so the compiled step is the one the tiny runs use."""
    tiny_recipe = recipe.load_config_file("tiny")
    config, lora_config = LlamaConfig.from_preset("tiny"), recipe.lora_config_of(tiny_recipe)
    trainer = make_trainer(config, lora_config)
    base_before = tiny_params(config)
    base = trainer.place_base(base_before)
    state = trainer.init(jax.random.PRNGKey(0))
    adapter_before = jax.device_get(state.adapter)
    batch = trainer.place_batch(synthetic_batch(config, rows=tiny_recipe.train.batch_size, micro=1,
                                                length=tiny_recipe.data.seq_len))
    for _ in range(3):
        state, _ = trainer.step(state, base, batch)

    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(base_before), jax.tree.leaves(base)):
        np.testing.assert_array_equal(np.asarray(after), before, err_msg=f"base leaf {path} changed")
    for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(adapter_before), jax.tree.leaves(state.adapter)):
        assert not np.array_equal(np.asarray(after), before), f"adapter leaf {path} did not train"
    # the optimizer only tracks the adapter: its leaves are adapter-shaped or scalars
    adapter_shapes = {np.shape(x) for x in jax.tree.leaves(adapter_before)}
    assert {np.shape(x) for x in jax.tree.leaves(state.opt_state)} <= adapter_shapes | {()}
    assert int(state.step) == 3


def test_loss_and_gradient_are_per_token_over_all_micro_batches(tiny_config, tiny_params):
    """Two micro-batches of one row each: loss and gradient are sums over both rows / all their tokens."""
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4, dropout=0.0)
    trainer = make_trainer(config, lora_config, optax.identity())  # update == -gradient
    base = trainer.place_base(tiny_params(config))
    start = trainer.init(jax.random.PRNGKey(0))
    adapter = jax.tree_util.tree_map_with_path(  # nonzero B, so every leaf has a gradient
        lambda path, x: x + 0.1 if path[-1].key == "lora_b" else x, jax.device_get(start.adapter))
    micro_batches = synthetic_batch(config, rows=1, micro=2, length=24)  # [1, 2, T]: rows with different token counts
    state, metrics = trainer.step(start.replace(adapter=jax.device_put(adapter)), base,
                                  trainer.place_batch(micro_batches))

    rows = {k: jnp.asarray(v[0]) for k, v in micro_batches.items()}  # the same two rows as one [2, T] batch
    loss_sum_and_count = jax.jit(lambda a, mask: summed_token_loss(trainer.model, a, base, {**rows, "loss_mask": mask}, None))
    expected_loss, expected_grad = jax.value_and_grad(lambda a: jnp.divide(*loss_sum_and_count(a, rows["loss_mask"])))(adapter)
    # The same fp32 sums split over two micro-batches: forward (and backward, for the gradient) of 2
    # layers, reductions over features and the 48 tokens.
    reduction = max(config.hidden_size, config.intermediate_size, micro_batches["loss_mask"].size)
    loss_bound = fp32_bound(abs(float(expected_loss)), depth=config.num_layers, reduction=reduction)
    assert_close(float(metrics["loss"]), float(expected_loss), atol=loss_bound, why="fp32 loss, 2 micro-batches")
    row_means = [np.divide(*loss_sum_and_count(adapter, rows["loss_mask"] * (np.arange(2) == i)[:, None])) for i in range(2)]
    assert abs(float(metrics["loss"]) - np.mean(row_means)) > 10 * loss_bound  # a mean of row means would differ
    assert float(metrics["response_tokens"]) == micro_batches["loss_mask"].sum()
    for before, after, grad in zip(jax.tree.leaves(adapter), jax.tree.leaves(state.adapter), jax.tree.leaves(expected_grad)):
        # the gradient's fp32 bound, plus the rounding of `before - grad` and of its difference back
        bound = (fp32_bound(np.abs(grad).max(), depth=2 * config.num_layers, reduction=reduction)
                 + 2 * FP32_EPS * np.abs(before).max())
        assert_close(before - np.asarray(after), grad, atol=bound, why="fp32 gradient, 2 micro-batches")


# ------------------------------------------------------------------------------- the loop


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> train.TrainResult:
    """One whole tiny run with samples and the PEFT export switched on (shared by two tests)."""
    return train.train(tiny(tmp_path_factory.mktemp("tiny"), samples__count=2, samples__max_new_tokens=8,
                            samples__every_steps=4, export__peft=True, export__merged_hf=True))


def test_tiny_run_learns_and_exports(tiny_run):
    result = tiny_run
    assert result.status == "completed" and result.step == 8
    assert result.eval_after["loss"] < result.eval_before["loss"] - 0.5, (result.eval_before, result.eval_after)
    losses = [result.losses[s] for s in sorted(result.losses)]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5

    run_dir = Path(result.run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 8 and saved["model"]["preset"] == "tiny"
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["kind"] == "train"] == list(range(1, 9))
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    model_config = LlamaConfig.from_preset("tiny")
    adapter, lora_config = adapters.load_adapter(run_dir / "adapter", model_config)
    assert lora_config.rank == 8 and np.abs(adapter["layers"]["attn"]["q_proj"]["lora_b"]).max() > 0
    _, merged = load_hf_checkpoint(run_dir / "merged_hf")  # base (random, seed 0) + adapter, as HF files
    expected = lora.merge(random_params(model_config, seed=0), adapter, lora_config)
    for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(merged)):
        # W + s·A·B in fp32 by two programs: the add rounds by u·|W'| and the rank-r sum by r·u of it
        assert_close(got, want, atol=(2 + lora_config.rank) * FP32_EPS * np.abs(want).max(), why=f"merged {path}")
    texts = [(e["step"], e["tag"].split("/", 1)[1]) for e in events if e["kind"] == "text"]
    assert texts == [(4, s["id"]) for s in result.samples] + [(8, s["id"]) for s in result.samples]  # every 4 steps
    assert len(result.samples) == 2 and all(isinstance(s["generated"], str) for s in result.samples)


def test_training_can_start_from_an_exported_peft_adapter(tmp_path, tiny_run):
    config = tiny(tmp_path, train__time_limit_s=1e-3, lora__init_from=str(tiny_run.run_dir / "peft_adapter"))
    result = train.train(config)
    assert result.eval_before["loss"] == tiny_run.eval_after["loss"]  # the same adapter, round-tripped through PEFT
    config.lora.rank = 4
    config.run_dir = str(tmp_path / "other_rank")
    with pytest.raises(lora.AdapterError, match=r"rank: adapter has r=8, config has r=4"):
        train.train(config)


def test_training_from_an_hf_checkpoint_directory(tmp_path):
    """model.source="hf": the base is read slice by slice onto the mesh; the preset is checked against it."""
    model_config = LlamaConfig.from_preset("tiny")
    save_hf_checkpoint(random_params(model_config, seed=0), model_config, tmp_path / "hf")
    config = tiny(tmp_path, model__source="hf", model__path=str(tmp_path / "hf"), model__tokenizer="bytes",
                  train__time_limit_s=1e-3)
    result = train.train(config)
    assert result.step == 1 and np.isfinite(result.eval_after["loss"])
    config.model.preset = "tiny_tied"
    config.run_dir = str(tmp_path / "wrong_preset")
    with pytest.raises(recipe.ConfigError, match=r"model\.preset='tiny_tied' does not match the checkpoint: "
                                                r"num_kv_heads: preset 4, checkpoint 2"):
        train.train(config)


def test_resume_after_a_crash_repeats_the_uninterrupted_losses(tmp_path):
    """tiny has LoRA dropout 0.05, so the PRNG key must resume too, not only adapter and data."""
    uninterrupted = train.train(tiny(tmp_path, "whole", train__checkpoint_every=3)).losses

    def crash_at_step_5(step, metrics):
        if step == 5:
            raise KeyboardInterrupt("simulated crash after step 5")

    interrupted = tiny(tmp_path, "interrupted", train__checkpoint_every=3)
    with pytest.raises(KeyboardInterrupt):
        train.train(interrupted, on_step=crash_at_step_5)
    resumed = train.train(interrupted)
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]  # resumed from the step-3 checkpoint
    assert resumed.losses == {step: uninterrupted[step] for step in range(4, 9)}  # bit-identical


def test_profile_dir_traces_the_chosen_steps_of_the_real_loop(tmp_path):
    """`train.profile_dir` wraps the loop's own step: one TensorBoard trace, of steps 1..2 only."""
    config = tiny(tmp_path, "profiled", train__steps=3, train__profile_dir=str(tmp_path / "profile"),
                  train__profile_first_step=1, train__profile_steps=2)
    result = train.train(config)
    assert sorted(result.losses) == [1, 2, 3]
    traces = list((tmp_path / "profile").glob("plugins/profile/*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_sigterm_finishes_the_step_checkpoints_and_exits_zero(tmp_path):
    run_dir = tmp_path / "preempted"
    command = [sys.executable, "-m", "llama_e_jax.train", "--config", "tiny", f"--config.run_dir={run_dir}",
               "--config.train.steps=10000", "--config.train.checkpoint_every=10000"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and sum('"kind": "train"' in line for line in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[0]
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "stopped by SIGTERM after step" in output

    last_logged = max(json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train"' in line)
    config = recipe.load_config_file("tiny")
    trainer = make_trainer(LlamaConfig.from_preset("tiny"), recipe.lora_config_of(config))
    abstract = trainer.abstract_state()
    meta = expected_meta(lora.model_shape(LlamaConfig.from_preset("tiny")), lora.lora_config_dict(trainer.lora_config), abstract)
    restored = Checkpoints(run_dir / "checkpoints", 2, meta).restore_latest(abstract)
    assert restored.step == last_logged == int(restored.state.step)
    assert restored.data_state["batches"] == last_logged


def test_divergence_stops_with_exit_1_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    config = tiny(tmp_path, train__checkpoint_every=1)

    def stop_after_step_2(step, metrics):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.train(config, on_step=stop_after_step_2)  # a healthy start: checkpoints 1 and 2
    # resume with an absurd learning rate: step 3's update blows the adapter up, step 4's loss is not finite
    status = cli.main(["--config", "tiny", f"--config.run_dir={config.run_dir}", "--config.train.steps=8",
                         "--config.train.checkpoint_every=1", "--config.optim.learning_rate=1e30",
                         "--config.optim.warmup_steps=0"])
    message = capsys.readouterr().err
    assert status == 1
    assert re.search(r"step 4: non-finite loss=(nan|inf)", message) and "last good checkpoint is step 3" in message
    assert Checkpoints(Path(config.run_dir) / "checkpoints", 2, {}).all_steps() == [2, 3]


def test_time_limit_then_checkpoint_of_another_model_is_refused(tmp_path):
    config = tiny(tmp_path, train__time_limit_s=1e-3)  # stops after the first step, still evaluates and exports
    result = train.train(config)
    assert (result.status, result.step, result.eval_after is not None) == ("time_limit", 1, True)
    assert (Path(config.run_dir) / "adapter" / "adapter.safetensors").is_file()
    config.lora.rank = 4
    with pytest.raises(CheckpointMismatchError, match=r"lora\.rank: saved 8, now 4"):
        train.train(config)
    config.lora.rank, config.model.preset = 8, "tiny_tied"
    with pytest.raises(CheckpointMismatchError, match=r"model\.num_kv_heads: saved 2, now 4"):
        train.train(config)


# ------------------------------------------------------------------------------- config CLI


def test_overrides_are_typed_and_unknown_keys_named():
    config = recipe.parse_config(["--config", "tiny", "--config.train.steps=3", "--config.optim.learning_rate=2e-4",
                                  "--config.lora.targets=q_proj,up_proj", "--config.export.peft=true"])
    assert (config.train.steps, config.optim.learning_rate, config.lora.targets, config.export.peft) == (
        3, 2e-4, ("q_proj", "up_proj"), True)
    with pytest.raises(recipe.ConfigError, match=r"unknown config key 'train\.stepz'.*did you mean 'steps'"):
        recipe.parse_config(["--config", "tiny", "--config.train.stepz=3"])
    with pytest.raises(recipe.ConfigError, match=r"unknown config key 'trian\.steps': the config has no field 'trian'"):
        recipe.parse_config(["--config", "tiny", "--config.trian.steps=3"])
    with pytest.raises(recipe.ConfigError, match=r"--config\.train\.steps=many: invalid literal for int"):
        recipe.parse_config(["--config", "tiny", "--config.train.steps=many"])
    with pytest.raises(recipe.ConfigError, match=r"model\.path: required with model\.source='hf'"):
        recipe.parse_config(["--config", "tiny", "--config.model.source=hf"])
    with pytest.raises(recipe.ConfigError, match=r"config file nope\.py not found"):
        recipe.parse_config(["--config", "nope.py"])
    with pytest.raises(recipe.ConfigError, match=r"unexpected argument 'tiny'"):
        recipe.parse_config(["tiny"])


def test_config_parsing_keeps_no_state_between_calls():
    """Each parse starts from its recipe file: an earlier override does not leak into the next parse."""
    assert recipe.parse_config(["--config.train.steps=3", "--config.run_dir=/tmp/x"]).train.steps == 3
    again = recipe.parse_config([])  # no --config: configs/default.py, as `python -m llama_e_jax.train`
    assert again.to_dict() == recipe.load_config_file("default").to_dict()
    tiny_path = recipe.parse_config(["--config", str(REPO / "configs" / "tiny.py"), "--config.model.path", "/ckpt"])
    assert (tiny_path.model.preset, tiny_path.model.path) == ("tiny", "/ckpt")  # a path, and a space-separated value


def test_cli_reports_config_errors_with_exit_2(capsys):
    assert cli.main(["--config", "tiny", "--config.train.bogus=1"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err


def test_shipped_data_is_found_from_any_directory(tmp_path, monkeypatch):
    """configs/tiny.py names data_prep/seeds: read from the working directory if there, else the installed copy."""
    monkeypatch.chdir(tmp_path)
    assert Path(resolve_data_path("data_prep/seeds")).resolve() == (REPO / "data_prep" / "seeds").resolve()
    (tmp_path / "data_prep" / "seeds").mkdir(parents=True)
    assert resolve_data_path("data_prep/seeds") == "data_prep/seeds"  # the working directory's own copy wins
    assert resolve_data_path("elsewhere/x.jsonl") == "elsewhere/x.jsonl"  # not shipped: left for the reader's error


@pytest.mark.parametrize("name", ["default", "llama2_7b_lora", "llama_7b_lora", "llama_13b_lora", "llama_30b_lora"])
def test_recipes_load_with_the_default_schema(name):
    """Every recipe only changes values of the schema that configs/default.py defines."""
    config = recipe.load_config_file(name)
    schema = recipe.load_config_file("default")

    def leaf_keys(node: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
        keys = set()
        for name, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                keys |= leaf_keys(value, f"{prefix}{name}.")
            else:
                keys.add(prefix + name)
        return keys

    assert leaf_keys(config) == leaf_keys(schema)
