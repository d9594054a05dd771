"""Lean decode weights (model/quant.py): int8 weight-only and bf16 storage of the projection kernels.

* The rounding fact: every dequantised weight is within half a quantisation step of the original.
* One projection: the int8 layer's output is within the bound that fact implies for a dot product.
* The whole tiny model: only the seven projection kernels change; int8 logits stay within a bound
  carried through the layers, and bad modes or double quantisation are refused by name.
* The real SmolLM2: teacher-forced next-token choices and perplexity of int8 / bf16 next to fp32.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.generate.generator import Generator
from llama_e_jax.io.tokenizer import ByteTokenizer, load_tokenizer
from llama_e_jax.model import lora, quant
from llama_e_jax.model.llama import Llama, split_layers
from llama_e_jax.model.lora import LoraLinear

from conftest import FP32_EPS


def test_dequantised_kernel_is_within_half_a_step_of_the_original():
    rng = np.random.default_rng(0)
    # Columns of very different magnitudes (per-channel scales must follow them), one all-zero column.
    kernel = rng.standard_normal((3, 64, 40)).astype(np.float32) * np.logspace(-4, 2, 40, dtype=np.float32)
    kernel[1, :, 7] = 0.0
    q, scale = quant.quantize_kernel(kernel)
    assert q.dtype == jnp.int8 and q.shape == kernel.shape and scale.shape == (3, 40)
    q, scale = np.asarray(q, np.float64), np.asarray(scale, np.float64)
    assert np.abs(q).max() <= quant.INT8_MAX
    # Each column reaches the ends of the range (the scale is its max |w| / 127).
    assert (np.abs(q).max(axis=-2)[scale > 0] == quant.INT8_MAX).sum() >= 3 * 40 - 1
    error = np.abs(q * scale[..., None, :] - kernel.astype(np.float64))
    # Exact rounding errs by at most scale/2; w/scale is computed in fp32, off by <= 127 ulps-of-1
    # (|w/scale| <= 127, relative error u), which can move a value across a rounding midpoint.
    bound = scale[..., None, :] * (0.5 + quant.INT8_MAX * FP32_EPS)
    assert (error <= bound).all(), float((error / bound).max())
    assert (error[1, :, 7] == 0).all()  # a zero column stays exactly zero
    np.testing.assert_allclose(np.asarray(quant.dequantize_kernel(jnp.asarray(q, jnp.int8), jnp.asarray(scale))),
                               q * scale[..., None, :], rtol=FP32_EPS)


def test_int8_projection_is_within_the_bound_of_its_rounding():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    kernel = (rng.standard_normal((96, 48)) / np.sqrt(96)).astype(np.float32)
    layer = LoraLinear(48)
    exact = layer.apply({"params": {"kernel": kernel}}, x)
    q, scale = quant.quantize_kernel(kernel)
    assert set(quant.quantize_params({"layers": {"mlp": {"up_proj": {"kernel": kernel}}}}, "int8")["layers"]["mlp"][
        "up_proj"]) == {"kernel", "kernel_scale"}
    y = layer.apply({"params": {"kernel": q, "kernel_scale": scale}}, x)
    # |x·(Ŵ - W)|_j <= sum_i |x_i| * scale_j / 2 (previous test), plus fp32 rounding of two 96-long dots.
    rounding = np.abs(x) @ np.broadcast_to(np.asarray(scale) / 2, (96, 48))
    slack = 2 * 96 * FP32_EPS * (np.abs(x) @ np.abs(kernel))
    diff = np.abs(np.asarray(y) - np.asarray(exact))
    assert (diff <= rounding + slack).all()
    assert diff.max() > 0  # it really ran on the rounded weights
    assert not np.allclose(diff, 0, atol=1e-6)


def _logits(config, params, ids):
    return np.asarray(Llama(config).apply({"params": params}, ids), np.float64)


def test_int8_model_changes_only_projection_kernels_and_stays_close(tiny_config, tiny_params):
    config = tiny_config("gqa", num_layers=3)
    params = jax.tree.map(jnp.asarray, tiny_params(config))
    quantized = quant.quantize_params(params, "int8")
    flat, flat_q = (dict(jax.tree_util.tree_flatten_with_path(p)[0]) for p in (params, quantized))
    names = {jax.tree_util.keystr(path) for path in flat_q}
    changed = sorted(jax.tree_util.keystr(p) for p in flat if flat_q[p].dtype != flat[p].dtype)
    assert len(changed) == 7 and all("_proj" in name and "kernel" in name for name in changed)
    assert sum("kernel_scale" in name for name in names) == 7
    assert quant.weight_bytes(quantized) < quant.weight_bytes(params)

    ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, 12)).astype(np.int32)
    exact, approx = _logits(config, params, ids), _logits(config, quantized, ids)
    # Every projection's relative output error is <= sum|x| * scale / 2 / |x·W| ~ 1/127 of the weight
    # scale; through 3 layers of 3 projections each (q/k/v, o, up/gate, down) the relative errors add up
    # to at most ~(3 * 4 / 127); the logits' scale is max |logit|. Orders of magnitude above fp32
    # noise, and far below the O(1) change of a wrong scale axis or a skipped scale.
    bound = 3 * 4 / quant.INT8_MAX * np.abs(exact).max()
    diff = np.abs(exact - approx).max()
    assert 0 < diff <= bound, (diff, bound)

    # Unrolled (decode) layout: same kernels, same logits.
    unrolled = quant.quantize_params(split_layers(params), "int8")
    np.testing.assert_array_equal(np.asarray(unrolled["layers"]["1"]["mlp"]["down_proj"]["kernel"]),
                                  np.asarray(quantized["layers"]["mlp"]["down_proj"]["kernel"][1]))
    bf16 = quant.quantize_params(params, "bfloat16")
    assert bf16["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    assert bf16["embed"]["embedding"].dtype == jnp.float32  # embeddings (and norms) stay
    assert quant.quantize_params(params, "float32") is params


def test_bad_mode_and_double_quantisation_are_refused(tiny_config, tiny_params):
    params = tiny_params(tiny_config())
    with pytest.raises(quant.QuantizationError, match="weights='int4': expected one of float32, bfloat16, int8"):
        quant.quantize_params(params, "int4")
    quantized = quant.quantize_params(params, "int8")
    with pytest.raises(quant.QuantizationError, match=r"layers/attn/q_proj/kernel: already int8"):
        quant.quantize_params(quantized, "bfloat16")


# ----------------------------------------------------------------------------- Generator(weights=...)


def _greedy(generator: Generator) -> list[tuple[int, ...]]:
    prompts = ["Hello there", "A product title: red mug"]
    return [tuple(c.token_ids) for c in generator.generate(prompts, max_new_tokens=10)]


def test_generator_quantizes_after_merging_the_adapter(tiny_config, tiny_params):
    config = tiny_config("gqa", vocab_size=256)
    params = tiny_params(config)
    lora_config = lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    rng = np.random.default_rng(3)
    adapter = lora.unflatten_adapter({path: {leaf: (0.3 * rng.standard_normal(shape)).astype(np.float32)
                                             for leaf, shape in leaves.items()}
                                      for path, leaves in lora.adapter_shapes(config, lora_config).items()})
    options = dict(max_batch_size=2, chunk_size=8)
    tokenizer = ByteTokenizer()
    with_adapter = _greedy(Generator(config, params, tokenizer, adapter=adapter, lora_config=lora_config,
                                     weights="int8", **options))
    # The same tokens as quantizing the merged float weights by hand...
    merged = quant.quantize_params(lora.merge(params, adapter, lora_config), "int8")
    assert with_adapter == _greedy(Generator(config, merged, tokenizer, **options))
    # ...which is not what the base alone gives (the adapter survives quantization).
    assert with_adapter != _greedy(Generator(config, params, tokenizer, weights="int8", **options))
    generator = Generator(config, params, tokenizer, weights="bfloat16", **options)
    assert generator.weights["layers"]["0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="weights='fp8'"):
        Generator(config, params, tokenizer, weights="fp8")


def test_weights_flag_parses_and_refuses_unknown_modes(capsys):
    parser = argparse.ArgumentParser()
    quant.add_arguments(parser)
    assert quant.from_arguments(parser.parse_args([])) == "float32"
    assert quant.from_arguments(parser.parse_args(["--weights", "int8"])) == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--weights", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real model

TEXTS = [
    build_prompt("Write a short advertisement for this product.",
                 "Stainless steel water bottle, 750 ml, keeps drinks cold for 24 hours, BPA free")
    + "Stay cool all day with our stainless steel water bottle: 750 ml, cold for 24 hours and BPA free.",
    build_prompt("Answer the customer's question using the product description.",
                 "Question: Can I put it in the dishwasher?\nDescription: Ceramic mug, 300 ml, dishwasher and "
                 "microwave safe.") + "Yes, the ceramic mug is dishwasher and microwave safe.",
]


def test_int8_and_bf16_on_smollm2_keep_next_token_choices_and_perplexity(smollm2_params, smollm2_gguf):
    """Teacher-forced over real prompt + answer text: the next-token argmax at each position (what a
    greedy step would choose given the same prefix) and the perplexity of the answer tokens.

    Measured here (2026-12-01, 2 texts, 110 positions): int8 agrees with fp32 on 95.5% of positions
    (perplexity +1.7%), bf16 on 100% (+0.1%). Asserted: the issue's acceptance bar for perplexity
    (within 2%), and that the choices agree on a clear majority (> 75%) of positions (a wrong scale
    axis or layout agrees on ~0%).
    """
    config, params = smollm2_params
    tokenizer = load_tokenizer(smollm2_gguf)
    model = Llama(config)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    results = {}
    for mode in quant.MODES:
        weights = quant.quantize_params(jax.tree.map(jnp.asarray, params), mode)
        choices, nll, count = [], 0.0, 0
        for text in TEXTS:
            ids = np.asarray([tokenizer.encode(text)], np.int32)
            logits = np.asarray(forward(weights, ids), np.float64)[0, :-1]  # predicts ids[1:]
            choices.append(logits.argmax(-1))
            log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
            nll -= log_probs[np.arange(len(logits)), ids[0, 1:]].sum()
            count += len(logits)
        results[mode] = (np.concatenate(choices), np.exp(nll / count))
    reference_choices, reference_ppl = results["float32"]
    for mode in ("bfloat16", "int8"):
        choices, ppl = results[mode]
        agreement = float((choices == reference_choices).mean())
        print(f"{mode}: next-token agreement {agreement:.3f}, perplexity {ppl:.4f} vs fp32 {reference_ppl:.4f}")
        assert agreement > 0.75, (mode, agreement)
        assert abs(ppl / reference_ppl - 1) <= 0.02, (mode, ppl, reference_ppl)
