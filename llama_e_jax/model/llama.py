"""A pure-Flax (linen) LLaMA decoder, written for training adapters on large frozen bases.

Design choices and why:

* Layers are stacked with `nn.scan`, so compile time is independent of depth (a 60-layer 30B model
  compiles as fast as a 2-layer one) and every per-layer weight is one [L, ...] array — which is also
  what the sharding rules and checkpoint readers index.
* Rematerialisation is a config choice (`remat_policy`), applied to the block before scanning.
* Attention goes through `jax.nn.dot_product_attention`, so GPUs get cuDNN flash attention for plain
  causal batches; packed sequences (segment ids) and KV caches use an explicit boolean mask built
  from positions and segment ids, which is exact for both.
* Rotary embeddings use HF's rotate-half layout (checkpoints load without permutation), with
  `rope_theta` and Llama-3 / linear `rope_scaling` from the config.
* Decoding uses a fixed-size cache of the un-repeated key/value heads, [L, B, S, K, Dh]. A token at
  absolute position p is written to slot p of its row, so slot index = position and the cache mask
  is simply `slot < length and slot <= query position`.
* Every projection is a `LoraLinear` (see lora.py); adapters live in their own `lora` collection.
* Activation sharding is pinned only when the model is given a mesh (`Llama(..., mesh=mesh)`, as
  train_state.Trainer does): the residual stream, embeddings and logits split over the batch axes,
  q/k/v/attention output over heads and the MLP hidden over "tensor" (sharding.constrain). Without
  a mesh — one device, or generate.py's decoding, which builds blocks without one — nothing is added.

Loss functions live with training; this module returns logits (and optionally the final hidden
states).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from llama_e_jax.model import sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LoraConfig, LoraLinear


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences being decoded.

    Attributes:
      keys: [L, B, S, K, Dh] rotated keys; slot s holds the token at position s.
      values: [L, B, S, K, Dh].
      lengths: [B] int32, number of valid slots per sequence.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, config: LlamaConfig, batch_size: int, max_length: int, dtype=None) -> "KVCache":
        shape = (config.num_layers, batch_size, max_length, config.num_kv_heads, config.head_dim)
        dtype = dtype or jnp.dtype(config.dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch_size,), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


# ----------------------------------------------------------------------------- rotary embeddings


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


# ----------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    eps: float
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., D]
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


@flax.struct.dataclass
class AttentionContext:
    """What every layer's attention needs besides its input, shared across the scan.

    positions: [B, T] absolute positions of the query tokens.
    mask: [B, 1, T, S] boolean, True where a query may attend a key; None means plain causal.
    cache_slots: [B, T] slot each new token is written to (only when decoding with a cache).
    """

    positions: jax.Array
    mask: jax.Array | None
    cache_slots: jax.Array | None


def _projection(config: LlamaConfig, lora: LoraConfig | None, path: str, features: int, deterministic: bool):
    name = path.split("/")[-1]
    adapter = lora if lora is not None and lora.targets_path(path) else None
    return LoraLinear(
        features,
        lora=adapter,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        deterministic=deterministic,
        name=name,
    )


def _pin(x: jax.Array, kind: str, mesh: Mesh | None) -> jax.Array:
    """sharding.constrain on the model's own mesh; nothing at all when the model has none."""
    return x if mesh is None else sharding.constrain(x, kind, mesh)


def _attention_implementation(config: LlamaConfig, mask: jax.Array | None) -> str:
    if config.attention_impl != "auto":
        return config.attention_impl
    on_gpu = jax.default_backend() == "gpu"
    half_precision = jnp.dtype(config.dtype) in (jnp.bfloat16, jnp.float16)
    return "cudnn" if on_gpu and half_precision and mask is None else "xla"


class Attention(nn.Module):
    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None  # pins q/k/v and the output to heads over "tensor" (see _pin)

    @nn.compact
    def __call__(
        self, x: jax.Array, context: AttentionContext, cache_kv: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:  # x: [B, T, D]
        c = self.config
        batch, length, _ = x.shape
        proj = functools.partial(_projection, c, self.lora, deterministic=self.deterministic)
        q = proj("attn/q_proj", c.num_heads * c.head_dim)(x).reshape(batch, length, c.num_heads, c.head_dim)
        k = proj("attn/k_proj", c.num_kv_heads * c.head_dim)(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = proj("attn/v_proj", c.num_kv_heads * c.head_dim)(x).reshape(batch, length, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inverse_frequencies(c)
        q = _pin(apply_rotary(q, context.positions, inv_freq), "heads", self.mesh)
        k = _pin(apply_rotary(k, context.positions, inv_freq), "heads", self.mesh)
        v = _pin(v, "heads", self.mesh)

        if cache_kv is not None:
            k, v = _write_cache(cache_kv, k, v, context.cache_slots)
            cache_kv = (k, v)
        out = jax.nn.dot_product_attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
            mask=context.mask,
            is_causal=context.mask is None,
            implementation=_attention_implementation(c, context.mask),
        )  # [B, T, H, Dh]
        out = _pin(out, "heads", self.mesh).reshape(batch, length, c.num_heads * c.head_dim)
        return proj("attn/o_proj", c.hidden_size)(out), cache_kv


def _write_cache(
    cache_kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array, slots: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Scatters new keys/values [B, T, K, Dh] into cache rows [B, S, K, Dh] at slots [B, T]."""
    cache_k, cache_v = cache_kv
    rows = jnp.arange(k.shape[0])[:, None]
    return (
        cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop"),
        cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop"),
    )


class MLP(nn.Module):
    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None  # pins the [B, T, F] hidden to F over "tensor" (see _pin)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        c = self.config
        proj = functools.partial(_projection, c, self.lora, deterministic=self.deterministic)
        gate = _pin(proj("mlp/gate_proj", c.intermediate_size)(x), "mlp", self.mesh)
        up = _pin(proj("mlp/up_proj", c.intermediate_size)(x), "mlp", self.mesh)
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")  # for mlp_dots_saveable
        return proj("mlp/down_proj", c.hidden_size)(nn.silu(gate) * up)


class Block(nn.Module):
    """One pre-norm decoder block; the scan body (carry = residual stream)."""

    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None  # pins the residual stream to the batch split (see _pin)

    @nn.compact
    def __call__(self, h: jax.Array, cache_kv, context: AttentionContext):
        c = self.config
        norm = functools.partial(
            RMSNorm, c.rms_norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype)
        )
        attn_out, cache_kv = Attention(c, self.lora, self.deterministic, self.mesh, name="attn")(
            norm(name="attn_norm")(h), context, cache_kv
        )
        h = h + attn_out
        h = h + MLP(c, self.lora, self.deterministic, self.mesh, name="mlp")(norm(name="mlp_norm")(h))
        return _pin(h, "residual", self.mesh), cache_kv


def _remat_policy(name: str):
    policies = {
        "full": None,
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        # The two [B, T, F] MLP matmul outputs: the widest activations that are costly to recompute;
        # the attention projections and the down projection are recomputed.
        "mlp_dots_saveable": jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"),
    }
    return policies[name]


def _stacked_blocks(config: LlamaConfig):
    block = Block
    if config.remat_policy != "none":
        block = nn.remat(block, policy=_remat_policy(config.remat_policy), prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=config.num_layers,
    )


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


class Llama(nn.Module):
    """LLaMA-family causal LM.

    Attributes:
      config: shapes and dtypes.
      lora: adapter settings; None builds the plain base model (no `lora` collection).
      mesh: a ("data", "fsdp", "tensor") mesh to pin activation shardings on (training); None adds
        no constraints. Values never depend on it, only the layout XLA picks.
    """

    config: LlamaConfig
    lora: LoraConfig | None = None
    mesh: Mesh | None = None

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int32
        positions: jax.Array | None = None,  # [B, T] int32; default 0..T-1 (or cache length + 0..T-1)
        segment_ids: jax.Array | None = None,  # [B, T] int32; 0 = padding; default all ones
        *,
        kv_cache: KVCache | None = None,
        deterministic: bool = True,
        output_positions: jax.Array | None = None,  # [B, P] indices into T; default all T
        return_hidden: bool = False,
    ):
        """Returns logits [B, T|P, V] float32; with `kv_cache`, `(logits, new_cache)`; with
        `return_hidden`, the final normed hidden states [B, T|P, D] are returned after the logits."""
        c = self.config
        context, layer_caches, new_lengths = self._context(input_ids, positions, segment_ids, kv_cache)

        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
                         param_dtype=jnp.dtype(c.param_dtype), name="embed")
        h = _pin(embed(input_ids), "residual", self.mesh)
        h, new_layer_caches = _stacked_blocks(c)(c, self.lora, deterministic, self.mesh, name="layers")(
            h, layer_caches, context)
        h = RMSNorm(c.rms_norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                    name="final_norm")(h)
        if output_positions is not None:
            h = jnp.take_along_axis(h, output_positions[..., None], axis=1)
        if c.tie_word_embeddings:
            logits = embed.attend(h)
        else:
            logits = LoraLinear(c.vocab_size, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                                name="lm_head")(h)
        logits = _pin(logits.astype(jnp.float32), "logits", self.mesh)

        outputs = (logits,)
        if kv_cache is not None:
            outputs += (KVCache(new_layer_caches[0], new_layer_caches[1], new_lengths),)
        if return_hidden:
            outputs += (h,)
        return outputs[0] if len(outputs) == 1 else outputs

    def _context(self, input_ids, positions, segment_ids, kv_cache):
        """Positions, attention mask and cache slots for this call; new cache lengths when decoding."""
        batch, length = input_ids.shape
        if positions is None:
            start = kv_cache.lengths[:, None] if kv_cache is not None else 0
            positions = start + jnp.arange(length, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (batch, length))
        if kv_cache is None:
            if segment_ids is None:
                return AttentionContext(positions, None, None), None, None
            mask = attention_mask(positions, segment_ids, positions, segment_ids)
            return AttentionContext(positions, mask, None), None, None
        # With a cache, keys are cache slots; slot s is valid once written, i.e. s < new length.
        segments = segment_ids if segment_ids is not None else jnp.ones_like(input_ids)
        slots = jnp.where(segments != 0, positions, kv_cache.max_length)  # padding writes nowhere
        written_end = jnp.max(jnp.where(segments != 0, positions + 1, 0), axis=1)
        new_lengths = jnp.maximum(kv_cache.lengths, written_end).astype(jnp.int32)
        key_positions = jnp.broadcast_to(jnp.arange(kv_cache.max_length, dtype=jnp.int32), (batch, kv_cache.max_length))
        key_segments = (key_positions < new_lengths[:, None]).astype(jnp.int32)
        mask = attention_mask(positions, jnp.ones_like(segments), key_positions, key_segments)
        return AttentionContext(positions, mask, slots), (kv_cache.keys, kv_cache.values), new_lengths
