"""Sharding: rules → specs (golden table), and sharded == single-device results on 8 fake CPU devices.

The pytest process has already initialised JAX with one CPU device, so everything that needs 8
devices runs in two subprocesses (side by side: compiling is single-threaded) that execute this file
as a script with `--xla_force_host_platform_device_count=8`; each prints one JSON line of
measurements, and the tests below assert on them. Training uses the real train_state.Trainer (LoRA
dropout on) and decoding the real generate.Generator. Regenerate the golden table after an intended rule change with
`LLAMA_E_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_sharding.py -k golden`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # the 8-device worker: the flags must be set before JAX starts its backend
    # Cheaper LLVM codegen halves compile time, which is nearly all of this worker's time; both the
    # single-device reference and the sharded runs use it, so the comparison is like for like.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + (
        " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
        " --xla_llvm_disable_expensive_passes=true")
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax.io.load import load_model
from llama_e_jax.io.weights import param_shapes, save_hf_checkpoint
from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LoraConfig, init_adapter
from llama_e_jax.model.llama import KVCache, Llama
from llama_e_jax.model.sharding import MeshConfig, P

REPO = Path(__file__).resolve().parent.parent
GOLDEN = REPO / "configs" / "sharding_rules.golden.txt"
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PARITY_MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "tensor8": (1, 1, 8), "2x2x2": (2, 2, 2)}
DECODE_MESHES = ("2x2x2",)  # generation compiles per mesh; this one splits on every axis


# ----------------------------------------------------------------------------- shared fixtures


def tiny_setup(preset: str = "tiny"):
    config = LlamaConfig.from_preset(preset)
    model = Llama(config, LoraConfig(rank=4, alpha=8.0, dropout=0.05, targets=ALL_PROJECTIONS))
    return config, model


def variables_init(model: Llama):
    """Random {'params', 'lora'} from shape tables alone: the same tree as model.init without tracing
    a forward pass (which would cost a compile per mesh)."""
    def init(key):
        params: dict = {}
        for index, (path, shape) in enumerate(sorted(param_shapes(model.config).items())):
            *parents, leaf = path.split("/")
            node = params
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = 0.2 * jax.random.normal(jax.random.fold_in(key, index), shape, jnp.float32)
        return {"params": params, "lora": init_adapter(model.config, model.lora, jax.random.fold_in(key, 10_000))}

    return init


def test_variables_init_matches_model_init_tree():
    _, model = tiny_setup()
    ours = jax.eval_shape(variables_init(model), jax.random.key(0))
    flax_init = jax.eval_shape(lambda k: model.init({"params": k}, jnp.zeros((1, 8), jnp.int32)), jax.random.key(0))
    assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(flax_init)
    assert jax.tree_util.tree_leaves(ours) == jax.tree_util.tree_leaves(flax_init)


def tiny_train_state_specs(mesh_sizes: dict[str, int]) -> list[str]:
    """Spec lines of the real train_state.TrainState (adapter, optimizer state, step, rng), by STATE_RULES.

    Not in the golden table: the optimizer's state layout belongs to train_state.py and may change;
    the golden table pins the rules with a fixed optax.adamw state instead.
    """
    from llama_e_jax.train.state import STATE_RULES

    config, model = tiny_setup()
    trainer = _trainer(sharding.make_mesh(MeshConfig(), jax.devices()[:1]), config, model.lora)
    return sharding.describe_specs(trainer.abstract_state(), mesh_sizes, STATE_RULES)


def adamw_state(model: Llama):
    """A fixed train-state-like tree: adapters plus optax.adamw moments and counters."""
    import optax

    def init(key):
        adapter = variables_init(model)(key)["lora"]
        return {"adapter": adapter, "opt_state": optax.adamw(1e-3).init(adapter), "step": jnp.zeros((), jnp.int32)}

    return init


MESH_222 = {"data": 2, "fsdp": 2, "tensor": 2}
VARIABLES_222 = "tiny model.init variables (params + LoRA on all projections, r=4), mesh data=2 fsdp=2 tensor=2"
ADAMW_222 = "tiny adapter + optax.adamw state (moments follow their adapter leaf), mesh data=2 fsdp=2 tensor=2"


def golden_sections() -> dict[str, list[str]]:
    """The golden table's sections, computed from abstract shapes only (no devices needed)."""
    _, tiny = tiny_setup()
    tiny_variables = jax.eval_shape(variables_init(tiny), jax.random.key(0))
    big = LlamaConfig.from_preset("llama_30b", param_dtype="bfloat16")
    big_variables = jax.eval_shape(variables_init(Llama(big, LoraConfig())), jax.random.key(0))
    cache = jax.eval_shape(lambda: KVCache.zeros(LlamaConfig.from_preset("tiny"), 3, 16))
    mesh = lambda d, f, t: {"data": d, "fsdp": f, "tensor": t}
    return {
        VARIABLES_222: sharding.describe_specs(tiny_variables, MESH_222),
        ADAMW_222: sharding.describe_specs(jax.eval_shape(adamw_state(tiny), jax.random.key(0)), MESH_222),
        "tiny variables, mesh tensor=8 (k/v kernels are 2 heads x 16 = 32 wide: still split 8 ways)":
            sharding.describe_specs(tiny_variables, mesh(1, 1, 8)),
        "llama_30b bf16 + default LoRA (q,k,v,o r=8), mesh fsdp=16 (v5e-16)":
            sharding.describe_specs(big_variables, mesh(1, 16, 1)),
        "llama_30b bf16 + default LoRA, mesh fsdp=4 tensor=2":
            sharding.describe_specs(big_variables, mesh(1, 4, 2)),
        "tiny KV cache B=3 S=16, mesh data=2 fsdp=2 tensor=2 (B=3 divides nothing: batch replicated)":
            sharding.describe_specs(cache, mesh(2, 2, 2)),
    }


def render_golden(sections: dict[str, list[str]]) -> str:
    header = ("# Partition specs the rules in llama_e_jax/sharding.py give (path [shape] -> spec per dim).\n"
              "# Regenerate: LLAMA_E_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_sharding.py -k golden\n")
    body = "".join(f"\n## {title}\n" + "\n".join(lines) + "\n" for title, lines in sections.items())
    return header + body


# ----------------------------------------------------------------------------- pure rule tests


def test_golden_table_matches_rules():
    text = render_golden(golden_sections())
    if os.environ.get("LLAMA_E_UPDATE_GOLDEN"):
        GOLDEN.write_text(text)
    assert GOLDEN.read_text() == text, f"rules changed; regenerate {GOLDEN} (see module docstring) and review the diff"


def test_rules_cover_specific_leaves():
    sizes = {"data": 2, "fsdp": 2, "tensor": 2}
    assert sharding.spec_for("params/layers/attn/q_proj/kernel", (2, 64, 64)) == P(None, "fsdp", "tensor")
    assert sharding.spec_for("opt_state/0/nu/layers/mlp/down_proj/lora_b", (2, 4, 64)) == P(None, None, "fsdp")
    assert sharding.spec_for("opt_state/0/count", ()) == P()
    assert sharding.fit_spec(P(sharding.BATCH), (6, 4), sizes) == P("data")  # 6 = 2*3: fsdp dropped
    assert sharding.fit_spec(P(sharding.BATCH), (3, 4), sizes) == P()  # nothing divides 3


def test_unmatched_leaf_is_an_error_naming_the_path():
    with pytest.raises(sharding.ShardingError, match="params/layers/attn/rotary_cache"):
        sharding.param_specs({"params": {"layers": {"attn": {"rotary_cache": np.zeros((2, 4))}}}},
                             {"data": 1, "fsdp": 1, "tensor": 1})


def test_rule_with_too_many_dims_is_an_error():
    with pytest.raises(sharding.ShardingError, match=r"q_proj/kernel.*shape \(64, 64\)"):
        sharding.spec_for("q_proj/kernel", (64, 64))


@pytest.mark.parametrize("config, devices, expected", [
    (MeshConfig(), 8, (8, 1, 1)),
    (MeshConfig(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (MeshConfig(data=1, fsdp=1, tensor=-1), 4, (1, 1, 4)),
])
def test_mesh_config_infers_one_axis(config, devices, expected):
    assert config.resolve(devices) == expected


@pytest.mark.parametrize("config, message", [
    (MeshConfig(data=-1, fsdp=-1), "at most one -1"),
    (MeshConfig(data=3, fsdp=1, tensor=1), "needs a multiple of 3"),
    (MeshConfig(data=2, fsdp=2, tensor=1), "has 4 devices, have 8"),
    (MeshConfig(data=0), "positive"),
])
def test_mesh_config_rejects_bad_sizes(config, message):
    with pytest.raises(sharding.ShardingError, match=message):
        config.resolve(8)


class FakeSliceDevice:
    """Just what mesh_utils reads from a device of a multi-slice job (non-TPU: no torus layout)."""

    platform, device_kind = "cpu", "fake"

    def __init__(self, id: int, slice_index: int):
        self.id, self.slice_index, self.process_index = id, slice_index, slice_index

    def __repr__(self) -> str:
        return f"dev{self.id}@slice{self.slice_index}"


def test_multi_slice_mesh_stacks_slices_along_data():
    devices = [FakeSliceDevice(i, i // 4) for i in range(8)]  # 2 slices x 4 chips
    grid = sharding.device_grid(MeshConfig(data=2, fsdp=2, tensor=2), devices)
    assert grid.shape == (2, 2, 2)
    assert {d.slice_index for d in grid[0].flat} == {0} and {d.slice_index for d in grid[1].flat} == {1}
    with pytest.raises(sharding.ShardingError, match="multiple of the 2 TPU slices"):
        sharding.device_grid(MeshConfig(data=1, fsdp=8, tensor=1), devices)


def test_single_device_mesh_runs_everything_replicated():
    mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1}
    batch = sharding.shard_batch({"input_ids": np.arange(12, dtype=np.int32).reshape(3, 4)}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), np.arange(12).reshape(3, 4))
    assert sharding.process_batch_shard(mesh) == (0, 1)


# ----------------------------------------------------------------------------- 8-device results


@pytest.fixture(scope="module")
def eight_devices() -> dict:
    """Runs the two halves of the worker side by side (compiling is single-threaded; there are 2 cores)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, __file__, part], env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for part in WORKER_PARTS]
    results = {}
    for part, proc in zip(WORKER_PARTS, procs):
        stdout, stderr = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"8-device worker {part} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
        for key, value in json.loads(stdout.strip().splitlines()[-1]).items():
            results[key] = {**results.get(key, {}), **value} if isinstance(value, dict) else value
    return results


def test_state_lands_with_golden_specs_on_devices(eight_devices):
    golden = golden_sections()
    assert eight_devices["placed_specs"] == golden[VARIABLES_222]  # load_model's params + the adapter rules
    assert eight_devices["train_state_specs"] == tiny_train_state_specs(MESH_222)  # Trainer.init / step outputs
    assert any("opt_state" in line and "lora_b" in line and "'tensor'" in line for line in eight_devices["train_state_specs"])
    # q_proj kernel [2, 64, 64] split fsdp x tensor on 2x2x2 -> each device holds [2, 32, 32]
    assert eight_devices["q_kernel_shard_shape"] == [2, 32, 32]
    assert eight_devices["born_sharded_equals_unsharded"]  # load_model(mesh=...): same values as a 1-device init


@pytest.mark.parametrize("mesh_name", PARITY_MESHES)
def test_three_train_steps_match_single_device(eight_devices, mesh_name):
    from conftest import assert_close, train_loss_bound  # here, not at the top: workers run this file

    reference, sharded = eight_devices["train"]["single"], eight_devices["train"][mesh_name]
    assert len(sharded["losses"]) == 3
    tolerance = train_loss_bound(tiny_setup()[0], reference["losses"], tokens=8 * 16)  # _host_batches' rows
    assert_close(sharded["losses"], reference["losses"], atol=tolerance, why="fp32 losses, sharded sums")
    # The adapters did learn something, by far more than the bound (0.095 in step 3 vs 3.8e-4): a gradient
    # summed over the wrong shards or an update applied on one shard only could not pass.
    assert reference["losses"][2] < reference["losses"][0] - 100 * tolerance
    # Adam's step is lr x m/sqrt(v) (1e-2 here): a gradient error relative to |g| changes it by as much.
    # The gradients agree to fp32_bound (~1e-4 of the largest), so every element moves the same up to 1e-3
    # of the step unless its own |g| is within ~10 % of the largest times 1e-3 - a property of this data
    # (the same on every CPU), not of the kernels; measured 1.6e-6 against 1.05e-5.
    assert sharded["max_adapter_diff"] <= 1e-3 * sharded["adapter_change"]
    assert sharded["adapter_change"] > 1e-4  # and the adapters moved, so the comparison means something


@pytest.mark.parametrize("mesh_name", DECODE_MESHES)
def test_sharded_generation_matches_unsharded(eight_devices, mesh_name):
    result = eight_devices["decode"][mesh_name]
    assert result["base_spec"] != []  # the base really was sharded
    assert len(result["tokens"]) == 8 and all(len(t) >= 1 for t in result["tokens"])
    assert result["tokens"] == eight_devices["decode"]["single"]["tokens"]


def test_batch_is_split_over_data_and_fsdp(eight_devices):
    batch = eight_devices["batch"]
    assert batch["spec"] == [["data", "fsdp"]]
    assert batch["rows_per_device"] == [4] * 8  # 16 rows over data*fsdp = 4 shards, replicated on tensor
    assert batch["equal_to_host"]


def test_load_sharded_reads_only_each_devices_slice(eight_devices):
    loaded = eight_devices["load_sharded"]
    assert loaded["equal"]
    # q_proj kernel [2, 64, 64] with fsdp=2, tensor=2: 4 distinct [2, 32, 32] slices, never the whole tensor
    assert loaded["q_kernel_read_shapes"] == [[2, 32, 32]] * 4
    assert loaded["largest_read_fraction"] <= 0.5


def test_hf_checkpoint_loads_straight_into_shards(eight_devices):
    """The loader every entry point uses (io.load.load_model), given an HF directory and a mesh."""
    loaded = eight_devices["load_model_hf_sharded"]
    assert loaded["files"] > 1  # a multi-file checkpoint, read through weights.CheckpointReader
    assert loaded["equal"]
    assert loaded["q_spec"] == [None, "fsdp", "tensor"]


def test_activation_constraint_pins_batch_split(eight_devices):
    assert eight_devices["constrain"]["residual_spec"] == [["data", "fsdp"]]
    assert eight_devices["constrain"]["no_mesh_is_noop"]


def test_train_step_hlo_pins_activations_on_a_tensor_mesh(eight_devices):
    """The lowered train step carries model.py's activation constraints on a tensor-parallel mesh
    (tiny: H=4, K=2, F=128, V=256, D=64; B=8, T=16) and none on one device."""
    lines = eight_devices["step_constraints"]["tensor4"]
    assert eight_devices["step_constraints"]["single"] == []
    batch = '{"data", "fsdp"}'
    assert f'[{batch}, {{}}, {{}}] 8x16x64' in lines  # residual stream: batch split, D whole
    assert f'[{batch}, {{}}, {{"tensor"}}, {{}}] 8x16x4x16' in lines  # q / attention output: heads split
    assert f'[{batch}, {{}}, {{"tensor"}}] 8x16x128' in lines  # MLP hidden: F split
    assert f'[{batch}, {{}}, {{"tensor"}}] 8x16x256' in lines  # logits: vocab split
    # 9 pins in the forward pass (embedding and block output, q/k/v/attention output, gate/up, logits),
    # and their transposes in the backward pass (all but the embedding's: the base gets no gradient).
    assert len(lines) == 9 + 8, lines


# ----------------------------------------------------------------------------- the worker


def _trainer(mesh, config, lora_config):
    from configs import default
    from llama_e_jax.train.state import Trainer, make_optimizer

    optim = default.get_config().optim
    optim.learning_rate, optim.warmup_steps = 3e-2, 1
    optimizer, schedule = make_optimizer(optim, total_steps=3)
    return Trainer(config, lora_config, optimizer, schedule, mesh)


def _host_batches(steps: int = 3, rows: int = 8, length: int = 16) -> list[dict[str, np.ndarray]]:
    """Packed rows ([B, A=1, T]): two segments per row, positions restarting in each, some padding."""
    batches = []
    for _ in range(steps):
        rng = np.random.default_rng(0)  # the same rows every step: the loss must then fall
        tokens = rng.integers(3, 256, size=(rows, length + 1), dtype=np.int32)
        split = rng.integers(4, length - 4, size=(rows, 1))
        column = np.arange(length)[None, :]
        segment_ids = np.where(column < split, 1, 2).astype(np.int32)
        segment_ids[:, -2:] = 0  # padding at the end of every row
        positions = np.where(column < split, column, column - split).astype(np.int32)
        loss_mask = ((segment_ids > 0) & (rng.random((rows, length)) > 0.3)).astype(np.float32)
        batch = {"input_ids": tokens[:, :-1], "targets": tokens[:, 1:], "positions": positions,
                 "segment_ids": segment_ids, "loss_mask": loss_mask}
        batches.append({k: v[:, None, :] for k, v in batch.items()})  # one micro-batch
    return batches


def _train(mesh, config, lora_config, base_host):
    """3 real train steps (train_state.Trainer, LoRA dropout on) on `mesh`."""
    trainer = _trainer(mesh, config, lora_config)
    base = trainer.place_base(base_host)
    state = trainer.init(jax.random.PRNGKey(0))
    initial_adapter = jax.tree_util.tree_map(np.asarray, state.adapter)
    losses = []
    for host_batch in _host_batches():
        state, metrics = trainer.step(state, base, trainer.place_batch(host_batch))
        losses.append(float(metrics["loss"]))
    placed = _placed_lines(state)
    return placed, losses, initial_adapter, jax.tree_util.tree_map(np.asarray, state.adapter), base, state.adapter


def _step_constraints(mesh, config, lora_config) -> list[str]:
    """`spec shape` of every sharding constraint in the lowered train step (Shardy's text form)."""
    import re

    trainer = _trainer(mesh, config, lora_config)
    abstract = lambda tree, shardings: jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
    base = jax.eval_shape(variables_init(Llama(config, lora_config)), jax.random.key(0))["params"]
    batch = jax.eval_shape(lambda: {k: jnp.asarray(v) for k, v in _host_batches(1)[0].items()})
    lowered = trainer.lower_step(trainer.abstract_state(), abstract(base, sharding.param_shardings(base, mesh)),
                                 abstract(batch, {k: sharding.batch_sharding(mesh) for k in batch}),
                                 jax.ShapeDtypeStruct((), jnp.float32))
    pattern = re.compile(r"sdy\.sharding_constraint %\S+ <@\w+, (\[.*?\])> : tensor<([\dx]+)x\w+>")
    text = lowered.as_text()
    found = [f"{spec} {shape}" for spec, shape in pattern.findall(text)]
    assert len(found) == text.count("sharding_constraint"), "unparsed constraints in the lowered step"
    return found


def _generate(config, lora_config, base, adapter) -> list[list[int]]:
    from llama_e_jax.generate.generator import Generator
    from llama_e_jax.io.tokenizer import ByteTokenizer

    prompts = [list(np.random.default_rng(i).integers(3, 256, size=3 + i)) for i in range(8)]
    generator = Generator(config, base, ByteTokenizer(), adapter=adapter, lora_config=lora_config,
                          max_batch_size=8, max_length=64, chunk_size=8)
    return [list(c.token_ids) for c in generator.generate_ids(prompts, max_new_tokens=8)]


class _RecordingReader:
    """A checkpoint stand-in: serves slices of in-memory arrays and records what was asked."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays, self.reads = arrays, []

    def read(self, param_path, index):
        block = self.arrays[param_path][index]
        self.reads.append((param_path, block.shape, block.size / self.arrays[param_path].size))
        return block


def _placed_lines(tree) -> list[str]:
    return [f"{sharding.path_str(path)} {list(leaf.shape)} -> {tuple(leaf.sharding.spec)}"
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _spec_json(spec) -> list:
    return [list(e) if isinstance(e, tuple) else e for e in spec]


WORKER_PARTS = ("placement", "parity")
MESHES_BY_PART = {"placement": ("data8", "fsdp8"), "parity": ("tensor8", "2x2x2")}


def _worker(part: str) -> dict:
    assert jax.device_count() == 8, jax.devices()
    config, model = tiny_setup()
    lora_config = model.lora
    out: dict = {}
    mesh222 = sharding.make_mesh(MeshConfig(2, 2, 2))
    base_host = jax.tree_util.tree_map(np.asarray, jax.jit(variables_init(model))(jax.random.key(0))["params"])

    single = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
    _, ref_losses, initial, ref_adapter, ref_base, ref_adapter_dev = _train(single, config, lora_config, base_host)
    out["train"] = {"single": {"losses": ref_losses}}
    if "2x2x2" in MESHES_BY_PART[part]:
        out["decode"] = {"single": {"tokens": _generate(config, lora_config, ref_base, ref_adapter_dev)}}
    for name in MESHES_BY_PART[part]:
        placed, losses, _, adapter, base, adapter_dev = _train(sharding.make_mesh(MeshConfig(*PARITY_MESHES[name])),
                                                               config, lora_config, base_host)
        if name == "2x2x2":
            out["train_state_specs"] = placed
        diffs = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), adapter, ref_adapter)
        change = jax.tree_util.tree_map(lambda a, b: float(np.max(np.abs(a - b))), adapter, initial)
        out["train"][name] = {"losses": losses, "max_adapter_diff": max(jax.tree_util.tree_leaves(diffs)),
                              "adapter_change": min(jax.tree_util.tree_leaves(change))}
        if name in DECODE_MESHES:
            out["decode"][name] = {"tokens": _generate(config, lora_config, base, adapter_dev),
                                   "base_spec": _spec_json(base["layers"]["attn"]["q_proj"]["kernel"].sharding.spec)}
    if part == "placement":
        out.update(_placement_checks(model, config, mesh222, base_host))
    else:
        tensor4 = sharding.make_mesh(MeshConfig(1, 1, 4), jax.devices()[:4])
        out["step_constraints"] = {"tensor4": _step_constraints(tensor4, config, lora_config),
                                   "single": _step_constraints(single, config, lora_config)}
    return out


def _placement_checks(model, config, mesh222, base_host) -> dict:
    out: dict = {}
    # Random base params born sharded by the loader (as training's model.source="random" gets them);
    # the adapter placed by the same rules table the Trainer's state follows.
    params = load_model("tiny", mesh=mesh222).params
    adapter = init_adapter(config, model.lora, jax.random.key(1))
    variables = {"params": params, "lora": jax.device_put(adapter, sharding.param_shardings(adapter, mesh222))}
    out["placed_specs"] = _placed_lines(variables)
    q_kernel = variables["params"]["layers"]["attn"]["q_proj"]["kernel"]
    out["q_kernel_shard_shape"] = list(q_kernel.addressable_shards[0].data.shape)
    unsharded = load_model("tiny").params  # the same seed on one device
    out["born_sharded_equals_unsharded"] = all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), params, unsharded)))

    rows = np.arange(16 * 5, dtype=np.int32).reshape(16, 5)
    batch = sharding.shard_batch({"input_ids": rows}, mesh222)["input_ids"]
    out["batch"] = {"spec": _spec_json(batch.sharding.spec),
                    "rows_per_device": [s.data.shape[0] for s in batch.addressable_shards],
                    "equal_to_host": bool(np.array_equal(np.asarray(batch), rows))}

    flat = {sharding.path_str(p): v for p, v in jax.tree_util.tree_leaves_with_path(base_host)}
    reader = _RecordingReader(flat)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), base_host)
    loaded = sharding.load_sharded(reader, abstract, sharding.make_mesh(MeshConfig(1, 2, 2), jax.devices()[:4]))
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), loaded, base_host)
    q_reads = sorted(list(shape) for path, shape, _ in reader.reads if path == "layers/attn/q_proj/kernel")
    sharded_reads = [frac for path, _, frac in reader.reads if "kernel" in path or "embedding" in path]
    out["load_sharded"] = {"equal": all(jax.tree_util.tree_leaves(same)), "q_kernel_read_shapes": q_reads,
                           "largest_read_fraction": max(sharded_reads)}

    # A real HF checkpoint (several safetensors shards), read slice by slice into a 2x2x2 mesh.
    with tempfile.TemporaryDirectory() as directory:
        save_hf_checkpoint(base_host, config, directory, shard_size="40KB")
        from_hf = load_model(directory, tokenizer="bytes", mesh=mesh222).params
        hf_equal = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), b)), from_hf, base_host)
        out["load_model_hf_sharded"] = {
            "files": len(list(Path(directory).glob("*.safetensors"))), "equal": all(jax.tree_util.tree_leaves(hf_equal)),
            "q_spec": _spec_json(from_hf["layers"]["attn"]["q_proj"]["kernel"].sharding.spec)}

    constrained = jax.jit(lambda x: sharding.constrain(x * 2, "residual"))
    with jax.set_mesh(mesh222):
        pinned = constrained(jnp.ones((8, 4, 6)))
    plain = jax.jit(lambda x: sharding.constrain(x * 2, "residual"))(jnp.ones((8, 4, 6)))
    out["constrain"] = {"residual_spec": _spec_json(pinned.sharding.spec),
                        "no_mesh_is_noop": bool(np.array_equal(np.asarray(plain), 2 * np.ones((8, 4, 6))))}
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
