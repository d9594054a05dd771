"""Our adapters and HF peft's are interchangeable, checked on the real SmolLM2-135M-Instruct.

* An adapter we export, loaded by `peft.PeftModel.from_pretrained` onto transformers' LlamaForCausalLM,
  gives the logits our model gives with the same adapter (B nonzero, so the adapter really acts).
* An adapter trained-looking in peft (random A and B), saved as safetensors and as a torch .bin,
  imports into ours with matching logits, and exports back to the same tensors.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from llama_e_jax.io import adapters
from llama_e_jax.model import lora
from llama_e_jax.model.lora import LoraConfig
from llama_e_jax.model.llama import Llama

from conftest import assert_close, logits_bound

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Ours and peft's logits are the same function in fp32 by different kernels (XLA vs torch, and each
# CPU's GEMM blocking): they agree to conftest.logits_bound (30 layers, K 1536, |logit| ~35 -> 2.4e-2;
# 8e-4 measured on Intel, 1.06e-3 once on AMD EPYC AVX-512). Mix-ups move the logits far more
# (measured on the export test: LoRA scale x1.1 0.61, x2 5.4, layers shifted by one 8.7,
# q_proj A/B swapped-transposed 1.6, q_proj B in interleaved-rotary order 2.1).


@pytest.fixture(scope="module")
def hf_base(smollm2_hf_dir):
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def input_ids():
    return np.random.default_rng(0).integers(3, 49152, (2, 24)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def _jitted_apply(config, lora_config):
    return jax.jit(Llama(config, lora_config).apply)


def our_logits(config, base, lora_config, adapter, ids):
    variables = {"params": base} if adapter is None else {"params": base, "lora": adapter}
    with jax.default_matmul_precision("highest"):  # full fp32 on every backend (no TF32 on GPUs), as torch's
        return np.asarray(_jitted_apply(config, lora_config if adapter is not None else None)(variables, ids))


def peft_logits(peft_model, ids):
    with torch.no_grad():
        return peft_model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()


def test_exported_adapter_matches_hf_peft(tmp_path, smollm2_params, hf_base, input_ids):
    config, base = smollm2_params
    lora_config = LoraConfig(rank=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
    adapter = lora.init_adapter(config, lora_config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)  # nonzero B: with B = 0 any A mix-up would go unnoticed
    adapter = jax.tree_util.tree_map_with_path(
        lambda path, x: x if path[-1].key == "lora_a" else (0.05 * rng.standard_normal(x.shape)).astype(np.float32),
        adapter,
    )
    adapters.export_peft(tmp_path, adapter, lora_config, config, base_model_name_or_path="SmolLM2-135M-Instruct")
    ours = our_logits(config, base, lora_config, adapter, input_ids)
    tolerance = logits_bound(config, ours)
    # The adapter moves the logits by 50 bounds or more (4.7 measured), so a LoRA scale 10 % off, a wrong
    # layer or a swapped A/B, which move them by a good part of that, cannot pass.
    assert np.abs(ours - our_logits(config, base, None, None, input_ids)).max() > 50 * tolerance

    peft_model = peft.PeftModel.from_pretrained(hf_base, tmp_path).eval()
    try:
        assert_close(peft_logits(peft_model, input_ids), ours, atol=tolerance, why="fp32, torch vs XLA kernels")
    finally:
        peft_model.unload()  # leave the shared base model as it was


@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "torch_bin"])
def test_peft_adapter_roundtrips_through_ours(tmp_path, smollm2_params, hf_base, input_ids, safe_serialization):
    config, base = smollm2_params
    peft_config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B
    torch.manual_seed(0)
    peft_model = peft.get_peft_model(hf_base, peft_config).eval()
    try:
        peft_model.save_pretrained(tmp_path / "peft", safe_serialization=safe_serialization)
        expected_logits = peft_logits(peft_model, input_ids)
    finally:
        peft_model.unload()

    adapter, lora_config = adapters.import_peft(tmp_path / "peft", config)
    assert (lora_config.rank, lora_config.alpha, lora_config.targets) == (4, 8.0, ("q_proj", "v_proj", "down_proj"))
    tolerance = logits_bound(config, expected_logits)
    assert np.abs(expected_logits - our_logits(config, base, None, None, input_ids)).max() > 50 * tolerance  # acts
    assert_close(our_logits(config, base, lora_config, adapter, input_ids), expected_logits, atol=tolerance,
                 why="fp32, torch vs XLA kernels")

    adapters.export_peft(tmp_path / "again", adapter, lora_config, config)
    original = (load_file(tmp_path / "peft" / "adapter_model.safetensors") if safe_serialization
                else adapters.read_torch_state_dict(tmp_path / "peft" / "adapter_model.bin"))
    exported = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
