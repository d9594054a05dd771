"""Attention math for model/llama.py: rotary embeddings, masks, the KV-cache write and the two attention paths.

Why a module of its own: these are pure functions of arrays, with no parameters, that the decoder's
`Attention` layer composes; keeping them apart keeps llama.py about the model's structure (which
layers, which loop, which cache layout) and lets each piece be read next to its one reason:

* Rotary embeddings use HF's rotate-half layout (checkpoints load without permutation), with
  `rope_theta` and Llama-3 / linear `rope_scaling` from the config.
* The mask is built from positions and segment ids (`attention_mask`), exact for packed sequences and
  for cache slots alike (slot s holds the token at position s).
* The cache keeps the un-repeated key/value heads heads-major, [B, K, S, Dh]; `cached_attention`
  computes over that layout what jax.nn.dot_product_attention's XLA path computes (fp32 logits and
  softmax), with every matmul in dot_general's natural operand order.
* Without a cache, CPU runs the same heads-major path (`heads_major_without_cache`, issue 15); GPUs
  and TPUs keep jax.nn.dot_product_attention (`implementation`: cuDNN for half-precision causal
  batches on GPU).
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.model.config import LlamaConfig


def rope_inverse_frequencies(config: LlamaConfig) -> np.ndarray:  # [Dh // 2] float32
    """Per-pair rotation frequencies, rescaled as the config's rope_scaling says."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    # "llama3": keep short wavelengths, divide long ones by factor, interpolate smoothly in between.
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, interpolated, scaled).astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates heads in HF's rotate-half layout. x: [B, T, N, Dh], positions: [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, Dh]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


@flax.struct.dataclass
class AttentionContext:
    """What every layer's attention needs besides its input, shared across the scan.

    positions: [B, T] absolute positions of the query tokens.
    mask: [B, 1, T, S] boolean, True where a query may attend a key; None means plain causal.
    cache_slots: [B, T] slot each new token is written to (only when decoding with a cache).
    adapter: [B] int32 each row's slot in the stacked adapter tables (adapter_stack.py), or None.
    """

    positions: jax.Array
    mask: jax.Array | None
    cache_slots: jax.Array | None
    adapter: jax.Array | None = None


def implementation(config: LlamaConfig, mask: jax.Array | None) -> str:
    """jax.nn.dot_product_attention's `implementation`: the config's, or cuDNN where it applies."""
    if config.attention_impl != "auto":
        return config.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    half_precision = jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if on_gpu and half_precision and mask is None else "xla"


def write_cache(
    cache_kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, slots: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatters new keys/values [B, T, K, Dh] into cache rows [B, K, S, Dh] at slots [B, T].

    Slot S (padding, inactive rows) is out of range and dropped. Only the new rows are written: with
    the cache donated, XLA updates it in place.
    """
    cache_k, cache_v = cache_kv
    rows = jnp.arange(k.shape[0])[:, None]  # [B, 1]; (rows, :, slots) indexes [B, T, K, Dh]
    return (
        cache_k.at[rows, :, slots].set(k.astype(cache_k.dtype), mode="drop"),
        cache_v.at[rows, :, slots].set(v.astype(cache_v.dtype), mode="drop"),
    )


LARGE_NEGATIVE = -0.7 * float(np.finfo(np.float32).max)


def cached_attention(
    q: jax.Array,  # [B, T, H, Dh]
    keys: jax.Array,  # [B, K, S, Dh]
    values: jax.Array,  # [B, K, S, Dh]
    mask: jax.Array,  # [B, 1, T, S]
) -> jax.Array:  # [B, T, H, Dh]
    """Attention over the heads-major cache, as jax.nn.dot_product_attention's XLA path computes it:
    fp32 logits and softmax, probabilities in the cache dtype. Query head h reads kv head h // G
    (HF's repeat_kv order), so the G query heads of a kv head form one batched matmul with it."""
    batch, length, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    # The T x G queries of a kv head as one [T*G, Dh] block: dot_general's natural operand and output
    # orders, so that a decode step (T = 1) has no transposes (XLA:CPU copies for them otherwise).
    q = q.reshape(batch, length, num_kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    q = q.reshape(batch, num_kv_heads, length * group, head_dim)
    scores = jnp.einsum("bkqd,bksd->bkqs", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(head_dim**-0.5)
    scores = jnp.where(jnp.repeat(mask, group, axis=2), scores, LARGE_NEGATIVE)  # [B, K, T*G, S]
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, values).reshape(batch, num_kv_heads, length, group, head_dim)
    out = out.transpose(0, 2, 1, 3, 4)  # [B, T, K, G, Dh]
    return out.reshape(batch, length, num_heads, head_dim).astype(q.dtype)


def heads_major_without_cache(config: LlamaConfig, mask: jax.Array | None) -> bool:
    """Whether attention without a cache (training, scoring, perplexity) goes heads-major: on CPU,
    where XLA would run it.

    jax.nn.dot_product_attention's XLA path lays GQA scores out as [B, K, T, G, S] and, under autodiff,
    transposes (copies) them and the probabilities several times per layer: in a CPU training step
    (SmolLM2, 4 x 256) those copies cost more than the attention matmuls themselves (issue 15). The
    heads-major formulation keeps every matmul in dot_general's natural order. Other backends keep
    jax.nn.dot_product_attention (cuDNN on GPU, XLA's own choices on TPU), unmeasured otherwise."""
    return jax.default_backend() == "cpu" and implementation(config, mask) == "xla"


def uncached_heads_major_attention(
    q: jax.Array,  # [B, T, H, Dh]
    k: jax.Array,  # [B, T, K, Dh]
    v: jax.Array,  # [B, T, K, Dh]
    mask: jax.Array | None,  # [B, 1, T, T] or None (plain causal)
) -> jax.Array:  # [B, T, H, Dh]
    """Training attention through `cached_attention` (same fp32 logits and softmax as the XLA path):
    keys and values moved heads-major once ([B, K, T, Dh], small copies), the causal mask built when
    none is given."""
    if mask is None:
        length = q.shape[1]
        mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]  # [1, 1, T, T]
        mask = jnp.broadcast_to(mask, (q.shape[0], 1, length, length))
    keys, values = (x.astype(q.dtype).transpose(0, 2, 1, 3) for x in (k, v))
    return cached_attention(q, keys, values, mask)


def attention_mask(
    query_positions: jax.Array,  # [B, T]
    query_segments: jax.Array,  # [B, T]
    key_positions: jax.Array,  # [B, S]
    key_segments: jax.Array,  # [B, S], 0 marks padding / empty cache slots
) -> jax.Array:  # [B, 1, T, S] bool
    """Causal attention within a segment: same non-zero segment and key position ≤ query position."""
    same_segment = query_segments[:, :, None] == key_segments[:, None, :]
    causal = key_positions[:, None, :] <= query_positions[:, :, None]
    return (same_segment & causal & (key_segments[:, None, :] != 0))[:, None]
