"""LoRA adapters: tree shapes, init, merge/unmerge, our file format, PEFT files and the torch .bin reader.

Everything here runs on tiny random models; tests/test_peft_interop.py checks the PEFT files against
HF peft itself on SmolLM2.
"""

from __future__ import annotations

import json
import pickle
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from llama_e_jax.io import adapters
from llama_e_jax.model import lora
from llama_e_jax.model.lora import AdapterError, LoraConfig
from llama_e_jax.model.llama import Llama

from conftest import FP32_EPS, assert_close, fp32_bound, logits_bound

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(config, lora_config, seed=0, b_scale=0.1):
    """An adapter with nonzero B (a fresh one has B = 0, which would hide any A/B mix-up)."""
    adapter = lora.init_adapter(config, lora_config, jax.random.PRNGKey(seed))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: np.asarray(x) if path[-1].key == "lora_a"
        else (b_scale * rng.standard_normal(x.shape)).astype(np.float32),
        adapter,
    )


def forward(config, lora_config, base, adapter, ids):
    variables = {"params": base} if adapter is None else {"params": base, "lora": adapter}
    model = Llama(config, lora_config if adapter is not None else None)
    return np.asarray(jax.jit(model.apply)(variables, ids))


@pytest.fixture
def ids():
    return np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)


@pytest.mark.parametrize("targets", [lora.DEFAULT_TARGETS, ALL_TARGETS, ("q_proj", "down_proj")])
def test_adapter_shapes_match_the_model(tiny_config, targets):
    config = tiny_config("gqa")
    lora_config = LoraConfig(rank=4, targets=targets)
    variables = jax.eval_shape(Llama(config, lora_config).init, jax.random.key(0), np.zeros((1, 4), np.int32))
    from_model = {f"{group}/{name}": {leaf: tuple(v.shape) for leaf, v in leaves.items()}
                  for group, projections in variables["lora"]["layers"].items() for name, leaves in projections.items()}
    assert lora.adapter_shapes(config, lora_config) == from_model
    fresh = lora.init_adapter(config, lora_config, jax.random.PRNGKey(0))
    assert jax.tree.map(np.shape, fresh) == jax.tree.map(lambda v: tuple(v.shape), variables["lora"])


def test_fresh_adapter_is_the_base_model(tiny_config, tiny_params, ids):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4, targets=ALL_TARGETS)
    base = tiny_params(config)
    adapter = lora.init_adapter(config, lora_config, jax.random.PRNGKey(3))
    for leaves in lora.flatten_adapter(adapter).values():
        fan_in = leaves["lora_a"].shape[1]
        assert np.all(np.asarray(leaves["lora_b"]) == 0)
        assert 0 < np.abs(leaves["lora_a"]).max() <= 1 / np.sqrt(fan_in)
        assert leaves["lora_a"].dtype == np.float32
    np.testing.assert_array_equal(forward(config, lora_config, base, adapter, ids), forward(config, None, base, None, ids))


@pytest.mark.parametrize("variant", ["gqa", "mha_tied"])
def test_merged_forward_equals_unmerged(tiny_config, tiny_params, ids, variant):
    config, lora_config = tiny_config(variant), LoraConfig(rank=4, alpha=8.0, targets=ALL_TARGETS)
    base = tiny_params(config)
    adapter = random_adapter(config, lora_config)
    unmerged = forward(config, lora_config, base, adapter, ids)
    merged = forward(config, None, lora.merge(base, adapter, lora_config), None, ids)
    # x·(W + s·A·B) and x·W + s·(x·A)·B are the same fp32 sums in another order: logits_bound. The adapter
    # moves the logits by 100 bounds or more, so a wrong scale or a transposed A·B in the merge shows.
    tolerance = logits_bound(config, unmerged)
    assert np.abs(unmerged - forward(config, None, base, None, ids)).max() > 100 * tolerance
    assert_close(merged, unmerged, atol=tolerance, why="fp32, merged vs unmerged sums")


def test_unmerge_restores_base_and_donation_works(tiny_config, tiny_params):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4)
    base = jax.device_put(tiny_params(config))
    adapter = random_adapter(config, lora_config)
    merged = lora.merge(base, adapter, lora_config)
    magnitudes = jax.tree.map(lambda w, m: max(np.abs(w).max(), np.abs(m).max()), base, merged)  # before donation
    restored = lora.unmerge(merged, adapter, lora_config, donate_base=True)
    for (path, a), b, size in zip(jax.tree_util.tree_leaves_with_path(base), jax.tree.leaves(restored),
                                  jax.tree.leaves(magnitudes)):
        # (W + d) - d rounds twice, by u·|W + d| and u·|W|, plus the rank-r sum of d = s·A·B if merge and
        # unmerge compile it differently: (2 + r)·u of the larger magnitude; a wrong sign or scale errs by |d|.
        assert_close(b, a, atol=(2 + lora_config.rank) * FP32_EPS * size, why=f"merge then unmerge, {path}")
    # untargeted leaves pass through untouched
    np.testing.assert_array_equal(restored["layers"]["mlp"]["up_proj"]["kernel"], base["layers"]["mlp"]["up_proj"]["kernel"])


def test_merge_keeps_bf16_base_dtype(tiny_config, tiny_params):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4)
    base = tiny_params(config, dtype=ml_dtypes.bfloat16)
    merged = lora.merge(base, random_adapter(config, lora_config), lora_config)
    assert merged["layers"]["attn"]["q_proj"]["kernel"].dtype == jax.numpy.bfloat16


# ----------------------------------------------------------------------------- our format


def test_save_load_roundtrip(tmp_path, tiny_config):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=("q_proj", "up_proj"))
    adapter = random_adapter(config, lora_config)
    adapters.save_adapter(tmp_path, adapter, lora_config, config)
    loaded, loaded_config = adapters.load_adapter(tmp_path, config, expected=lora_config)
    assert loaded_config == lora_config
    for a, b in zip(jax.tree.leaves(adapter), jax.tree.leaves(loaded)):
        np.testing.assert_array_equal(a, b)


def test_load_errors_name_what_differs(tmp_path, tiny_config):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4)
    adapters.save_adapter(tmp_path, random_adapter(config, lora_config), lora_config, config)
    with pytest.raises(AdapterError, match=r"rank: adapter has r=4, config has r=8"):
        adapters.load_adapter(tmp_path, config, expected=LoraConfig(rank=8))
    with pytest.raises(AdapterError, match=r"targets: adapter adapts .*attn/o_proj.*config adapts \['attn/q_proj'\]"):
        adapters.load_adapter(tmp_path, config, expected=LoraConfig(rank=4, targets=("q_proj",)))
    with pytest.raises(AdapterError, match=r"different model: hidden_size: saved 32, now 64"):
        adapters.load_adapter(tmp_path, tiny_config("gqa", hidden_size=64), expected=lora_config)


def test_check_adapter_lists_wrong_shapes(tiny_config):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4)
    adapter = random_adapter(config, LoraConfig(rank=2))
    with pytest.raises(AdapterError, match=r"attn/q_proj/lora_a: shape \[2, 32, 2\], expected \[2, 32, 4\]"):
        lora.check_adapter(adapter, config, lora_config, "test")
    with pytest.raises(AdapterError, match=r"missing adapter for mlp/up_proj"):
        lora.check_adapter(adapter, config, LoraConfig(rank=2, targets=lora.DEFAULT_TARGETS + ("up_proj",)), "test")


# ----------------------------------------------------------------------------- PEFT format


def test_peft_export_layout_and_roundtrip(tmp_path, tiny_config):
    config, lora_config = tiny_config("gqa"), LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"))
    adapter = random_adapter(config, lora_config)
    adapters.export_peft(tmp_path, adapter, lora_config, config, base_model_name_or_path="tiny")
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"], peft_config["peft_type"]) == (4, 8.0, "LORA")
    assert peft_config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert len(tensors) == 2 * 3 * config.num_layers
    a = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"]  # [r, in]
    b = tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]  # [out, r]
    np.testing.assert_array_equal(a, adapter["layers"]["attn"]["v_proj"]["lora_a"][1].T)
    np.testing.assert_array_equal(b, adapter["layers"]["attn"]["v_proj"]["lora_b"][1].T)
    assert b.shape == (config.num_kv_heads * config.head_dim, 4)

    imported, imported_config = adapters.import_peft(tmp_path, config)
    assert imported_config == LoraConfig(rank=4, alpha=8.0, dropout=lora_config.dropout, targets=("q_proj", "v_proj", "down_proj"))
    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(imported)):
        np.testing.assert_array_equal(x, y)


def _peft_dir(directory, config, **config_changes):
    """A PEFT export of a random rank-4 adapter, with adapter_config.json fields changed."""
    lora_config = LoraConfig(rank=4)
    adapters.export_peft(directory, random_adapter(config, lora_config), lora_config, config)
    if config_changes:
        path = directory / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config_changes}))
    return directory


def test_peft_import_errors(tmp_path, tiny_config):
    config = tiny_config("gqa")
    with pytest.raises(AdapterError, match=r"layers\.0\.self_attn\.k_proj\.lora_A\.weight has shape \[4, 32\], expected \[8, 32\]"):
        adapters.import_peft(_peft_dir(tmp_path / "r8", config, r=8), config)
    with pytest.raises(AdapterError, match=r"use_dora=True is not supported"):
        adapters.import_peft(_peft_dir(tmp_path / "dora", config, use_dora=True), config)
    with pytest.raises(AdapterError, match=r"layers missing \[2\]"):
        adapters.import_peft(_peft_dir(tmp_path / "plain", config), tiny_config("gqa", num_layers=3))
    with pytest.raises(AdapterError, match=r"target_modules \['q_proj'\] but the weights adapt"):
        adapters.import_peft(_peft_dir(tmp_path / "targets", config, target_modules=["q_proj"]), config)
    with pytest.raises(AdapterError, match=r"rank: adapter has r=4, config has r=16"):
        adapters.import_peft(tmp_path / "plain", config, expected=LoraConfig(rank=16))


def test_peft_import_accepts_adapter_name_and_half_precision(tmp_path, tiny_config):
    """Some tools keep the adapter name in the tensor names ('lora_A.default.weight'); authors ship fp16."""
    config = tiny_config("gqa")
    _peft_dir(tmp_path, config)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    renamed = {k.replace("lora_A.weight", "lora_A.default.weight"): v.astype(np.float16) for k, v in tensors.items()}
    save_file(renamed, tmp_path / "adapter_model.safetensors")
    adapter, _ = adapters.import_peft(tmp_path, config)
    a = adapter["layers"]["attn"]["q_proj"]["lora_a"]
    assert a.dtype == np.float32
    expected = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].astype(np.float16)
    np.testing.assert_array_equal(a[0], expected.astype(np.float32).T)


# ----------------------------------------------------------------------------- torch .bin without torch


def test_torch_bin_reader_matches_torch(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(2, 7).half(),
        "bf16": torch.randn(4, 2).bfloat16(),
        "transposed_view": base.t(),  # non-contiguous: strides matter
        "slice_view": base[1:3, 2:],  # storage offset
        "shared": base,  # same storage as the views
        "scalar": torch.tensor(3.5),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save(state, tmp_path / "adapter_model.bin")
    loaded = adapters.read_torch_state_dict(tmp_path / "adapter_model.bin")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        expected = tensor.detach().float().numpy()
        assert loaded[name].shape == tuple(tensor.shape), name
        np.testing.assert_array_equal(np.asarray(loaded[name], np.float32), expected, err_msg=name)
    assert loaded["bf16"].dtype == ml_dtypes.bfloat16 and loaded["f16"].dtype == np.float16


def test_torch_bin_reader_refuses_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": Exploit()}, protocol=2))
    with pytest.raises(AdapterError, match=r"refusing to unpickle (__builtin__|builtins)\.print"):
        adapters.read_torch_state_dict(path)
    (tmp_path / "legacy.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(AdapterError, match=r"not a torch zip archive"):
        adapters.read_torch_state_dict(tmp_path / "legacy.bin")


def test_import_peft_from_torch_bin(tmp_path, tiny_config):
    """The LLaMA-E authors released adapter_model.bin (torch.save of fp16 tensors); it imports like safetensors."""
    config = tiny_config("gqa")
    tensors = load_file(_peft_dir(tmp_path, config) / "adapter_model.safetensors")
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v).half() for k, v in tensors.items()}, tmp_path / "adapter_model.bin")
    adapter, lora_config = adapters.import_peft(tmp_path, config)
    assert lora_config.targets == lora.DEFAULT_TARGETS
    # fp16 keeps 11 significant bits: rounding errs by <= 2^-11 relative (2^-25 absolute among subnormals).
    np.testing.assert_allclose(adapter["layers"]["attn"]["o_proj"]["lora_b"][1],
                               tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight"].T,
                               rtol=2.0**-11, atol=2.0**-25)



def test_remat_policies_keep_the_adapter_gradient(tiny_config, tiny_params, ids):
    """Every remat policy only trades memory for recomputation: the LoRA gradient is unchanged; and
    `mlp_dots_saveable` keeps exactly the MLP's gate and up outputs ([L, B, T, F] each) for the
    backward pass, where `full` keeps no [B, T, F] activation at all."""
    from jax._src.ad_checkpoint import saved_residuals  # what jax.ad_checkpoint.print_saved_residuals prints

    from llama_e_jax.model.config import REMAT_POLICIES

    lora_config = LoraConfig(rank=4, alpha=8, dropout=0.0)
    config = tiny_config("gqa")
    base, adapter = tiny_params(config), random_adapter(config, lora_config)

    def loss_of(policy):
        model = Llama(config.replace(remat_policy=policy), lora_config)
        return lambda a: jax.numpy.mean(model.apply({"params": base, "lora": a}, ids) ** 2)

    reference = jax.jit(jax.grad(loss_of("none")))(adapter)
    for policy in REMAT_POLICIES:
        grad = jax.jit(jax.grad(loss_of(policy)))(adapter)
        for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(reference)):
            # The same fp32 sums, fused differently around the recomputation: forward and backward (2 x
            # depth), reductions over features or over the batch's tokens.
            bound = fp32_bound(np.abs(want).max(), depth=2 * config.num_layers,
                               reduction=max(config.hidden_size, config.intermediate_size, ids.size))
            assert_close(got, want, atol=bound, why=f"fp32 gradient, remat policy {policy}")

    mlp_shaped = (config.num_layers, *ids.shape, config.intermediate_size)
    kept = lambda policy: sum(aval.shape == mlp_shaped for aval, _ in saved_residuals(loss_of(policy), adapter))
    assert kept("mlp_dots_saveable") == 2
    assert kept("full") == 0
