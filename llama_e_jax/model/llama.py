"""A pure-Flax (linen) LLaMA decoder, written for training adapters on large frozen bases.

Design choices and why:

* Layers are stacked with `nn.scan`, so compile time is independent of depth (a 60-layer 30B model
  compiles as fast as a 2-layer one) and every per-layer weight is one [L, ...] array — which is also
  what the sharding rules and checkpoint readers index.
* Rematerialisation is a config choice (`remat_policy`), applied to the block before scanning.
* Attention math (rotary embeddings, masks, the cache write, the heads-major path XLA:CPU runs and
  jax.nn.dot_product_attention elsewhere) lives in attention.py; this module is the model's
  structure: which layers, which layer loop, which cache layout.
* One forward pass for training, prefill and decoding. With a `KVCache`, the call writes the new
  tokens' keys/values into their cache slots (a token at absolute position p goes to slot p of its
  row, so the mask is simply `slot < length and slot <= query position`) and attends over the cache;
  generate/ calls this same `apply` for its prefill and its decode step.
* The cache keeps the un-repeated key/value heads (GQA) heads-major, [B, K, S, Dh] per layer: each
  (row, kv head) is one contiguous [S, Dh] block, so decode attention is a plain batched matmul
  (with [B, S, K, Dh] XLA first copies the whole cache every step).
* Layers run either as `nn.scan` over stacked [L, ...] weights (`layer_loop="scan"`, the default:
  training, compile time independent of depth) or unrolled (`layer_loop="unroll"`: params
  `layers/0`, `layers/1`, ... from `split_layers`, one cache array per layer). Decoding wants
  unrolled layers: a scan slices the stacked weights and cache per layer and writes the cache back
  as its output, which costs copies every step (2.6x slower decode on CPU); unrolled, a step reads
  each weight once and writes only the new key/value rows of a donated cache, in place. Outside
  init and dropout, the L unrolled blocks call one jitted block function (`_apply_block`), so a new
  prefill shape traces one block, not L; XLA inlines the calls (the optimized HLO is unchanged).
* Every projection is a `LoraLinear` (see lora.py); adapters live in their own `lora` collection.
  For serving several adapters at once, the params may instead carry stacked tables (one slot per
  adapter, adapter_stack.py) and `adapter_ids` [B] picks each row's slot; without them (training,
  merged decoding) that argument changes nothing.
* Activation sharding is pinned only when the model is given a mesh (`Llama(..., mesh=mesh)`, as
  train.state.Trainer does): the residual stream, embeddings and logits split over the batch axes,
  q/k/v/attention output over heads and the MLP hidden over "tensor" (sharding.constrain). Without
  a mesh — one device, or decoding — nothing is added.

Loss functions live with training; this module returns logits, only at `logits_at` if given.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from llama_e_jax.model import attention, sharding
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.lora import LoraConfig, LoraLinear


LAYER_LOOPS = ("scan", "unroll")


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for B sequences being decoded (heads-major, see module doc).

    Attributes:
      keys: per layer [B, K, S, Dh] rotated keys: a tuple of L arrays (unrolled layers) or one
        stacked [L, B, K, S, Dh] array (scanned layers). Slot s of a row holds the token at position s.
      values: as keys.
      lengths: [B] int32, number of valid slots per sequence.
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    lengths: jax.Array

    @classmethod
    def zeros(cls, config: LlamaConfig, batch_size: int, max_length: int, *, layer_loop: str = "scan",
              dtype=None, mesh: Mesh | None = None) -> "KVCache":
        """An empty cache; on `mesh`, placed by sharding.CACHE_RULES (nothing materialised unsharded)."""
        row_shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        dtype = dtype or jnp.dtype(config.dtype)

        def make() -> KVCache:
            if layer_loop == "unroll":
                # A distinct buffer per layer: the cache is donated (and updated in place) leaf by leaf.
                layers = lambda: tuple(jnp.zeros(row_shape, dtype) for _ in range(config.num_layers))
                return cls(layers(), layers(), jnp.zeros((batch_size,), jnp.int32))
            stacked = (config.num_layers, *row_shape)
            return cls(jnp.zeros(stacked, dtype), jnp.zeros(stacked, dtype), jnp.zeros((batch_size,), jnp.int32))

        _check_layer_loop(layer_loop)
        if mesh is None:
            return make()
        return jax.jit(make, out_shardings=sharding.param_shardings(jax.eval_shape(make), mesh))()

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[-2] if isinstance(self.keys, tuple) else self.keys.shape[-2]


def _check_layer_loop(layer_loop: str) -> None:
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"layer_loop={layer_loop!r}, expected one of {LAYER_LOOPS}")


def split_layers(params: dict) -> dict:
    """Stacked [L, ...] layer params -> the unrolled layout `layers/0`, `layers/1`, ... (layer_loop="unroll").

    Each slice is a separate array, so a decode step reads it directly (no per-step dynamic slice).
    Sharded leaves keep their sharding minus the layer axis; host (numpy) leaves go to the device.
    Params already split are returned as they are. The caller may drop `params` afterwards.
    """
    layers = params["layers"]
    if is_unrolled(params):
        return params
    num_layers = jax.tree.leaves(layers)[0].shape[0]

    def layer_slice(x, i):
        part = x[i]
        if isinstance(x, np.ndarray):
            return jnp.asarray(part)
        if isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding):
            spec = jax.sharding.PartitionSpec(*tuple(x.sharding.spec)[1:])
            return jax.device_put(part, jax.sharding.NamedSharding(x.sharding.mesh, spec))
        return part

    split = {str(i): jax.tree.map(functools.partial(layer_slice, i=i), layers) for i in range(num_layers)}
    return {**{name: tree for name, tree in params.items() if name != "layers"}, "layers": split}


def is_unrolled(params: dict) -> bool:
    """Whether `params` are in the unrolled layout (`layers/0`, ...) rather than stacked by nn.scan."""
    return "0" in params["layers"]


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


class Attention(nn.Module):
    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None  # pins q/k/v and the output to heads over "tensor" (see _pin)

    @nn.compact
    def __call__(
        self, x: jax.Array, context: attention.AttentionContext, cache_kv: tuple[jax.Array, jax.Array] | None
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:  # x: [B, T, D]
        c = self.config
        batch, length, _ = x.shape
        proj = functools.partial(_projection, c, self.lora, deterministic=self.deterministic)
        rows = context.adapter
        q = proj("attn/q_proj", c.num_heads * c.head_dim)(x, rows).reshape(batch, length, c.num_heads, c.head_dim)
        k = proj("attn/k_proj", c.num_kv_heads * c.head_dim)(x, rows).reshape(batch, length, c.num_kv_heads, c.head_dim)
        v = proj("attn/v_proj", c.num_kv_heads * c.head_dim)(x, rows).reshape(batch, length, c.num_kv_heads, c.head_dim)
        inv_freq = attention.rope_inverse_frequencies(c)
        q = _pin(attention.apply_rotary(q, context.positions, inv_freq), "heads", self.mesh)
        k = _pin(attention.apply_rotary(k, context.positions, inv_freq), "heads", self.mesh)
        v = _pin(v, "heads", self.mesh)

        if cache_kv is not None:
            cache_kv = attention.write_cache(cache_kv, k, v, context.cache_slots)
            out = attention.cached_attention(q, *cache_kv, context.mask)
        elif attention.heads_major_without_cache(c, context.mask):
            out = attention.uncached_heads_major_attention(q, k, v, context.mask)  # [B, T, H, Dh]
        else:
            out = jax.nn.dot_product_attention(
                q, k.astype(q.dtype), v.astype(q.dtype),
                mask=context.mask,
                is_causal=context.mask is None,
                implementation=attention.implementation(c, context.mask),
            )  # [B, T, H, Dh]
        out = _pin(out, "heads", self.mesh).reshape(batch, length, c.num_heads * c.head_dim)
        return proj("attn/o_proj", c.hidden_size)(out, rows), cache_kv


class MLP(nn.Module):
    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None  # pins the [B, T, F] hidden to F over "tensor" (see _pin)

    @nn.compact
    def __call__(self, x: jax.Array, rows: jax.Array | None = None) -> jax.Array:  # [B, T, D]; rows: adapter ids [B]
        c = self.config
        proj = functools.partial(_projection, c, self.lora, deterministic=self.deterministic)
        gate = _pin(proj("mlp/gate_proj", c.intermediate_size)(x, rows), "mlp", self.mesh)
        up = _pin(proj("mlp/up_proj", c.intermediate_size)(x, rows), "mlp", self.mesh)
        gate, up = checkpoint_name(gate, "mlp_gate"), checkpoint_name(up, "mlp_up")  # for mlp_dots_saveable
        return proj("mlp/down_proj", c.hidden_size)(nn.silu(gate) * up, rows)


class Block(nn.Module):
    """One pre-norm decoder block; the scan body (carry = residual stream)."""

    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None  # pins the residual stream to the batch split (see _pin)

    @nn.compact
    def __call__(self, h: jax.Array, cache_kv, context: attention.AttentionContext):
        c = self.config
        norm = functools.partial(
            RMSNorm, c.rms_norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype)
        )
        attn_out, cache_kv = Attention(c, self.lora, self.deterministic, self.mesh, name="attn")(
            norm(name="attn_norm")(h), context, cache_kv
        )
        h = h + attn_out
        h = h + MLP(c, self.lora, self.deterministic, self.mesh, name="mlp")(norm(name="mlp_norm")(h), context.adapter)
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


def _block_class(config: LlamaConfig):
    if config.remat_policy == "none":
        return Block
    return nn.remat(Block, policy=_remat_policy(config.remat_policy), prevent_cse=False)


def _stacked_blocks(config: LlamaConfig):
    return nn.scan(
        _block_class(config),
        variable_axes={"params": 0, "lora": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=config.num_layers,
    )


class UnrolledBlocks(nn.Module):
    """The L blocks as separate submodules `0`, `1`, ... (params from `split_layers`), each with its
    own cache array; the decode layout (see module doc)."""

    config: LlamaConfig
    lora: LoraConfig | None
    deterministic: bool
    mesh: Mesh | None = None

    @nn.compact
    def __call__(self, h: jax.Array, caches, context: attention.AttentionContext):
        """caches: None or (keys, values), each a tuple of L [B, K, S, Dh] arrays."""
        traced_once = not self.is_initializing() and self.deterministic
        block = _block_class(self.config)
        new_keys, new_values = [], []
        for i in range(self.config.num_layers):
            layer_cache = None if caches is None else (caches[0][i], caches[1][i])
            if traced_once:
                h, layer_cache = _apply_block(self.config, self.lora, self.mesh)(
                    self._layer_variables(str(i)), h, layer_cache, context)
            else:
                h, layer_cache = block(self.config, self.lora, self.deterministic, self.mesh, name=str(i))(
                    h, layer_cache, context)
            if layer_cache is not None:
                new_keys.append(layer_cache[0])
                new_values.append(layer_cache[1])
        return h, (None if caches is None else (tuple(new_keys), tuple(new_values)))

    def _layer_variables(self, name: str) -> dict:
        return {collection: tree[name] for collection, tree in self.variables.items() if name in tree}


@functools.lru_cache(maxsize=64)
def _apply_block(config: LlamaConfig, lora: LoraConfig | None, mesh: Mesh | None):
    """One block as a jitted pure function of (its variables, h, cache, context).

    Every layer of an unrolled forward calls this same function with the same shapes, so JAX traces
    one block instead of L (tracing 30 blocks took 0.6-0.9 s per prefill shape, paid again by every
    process: the persistent cache saves compiles, not tracing). XLA inlines the calls, so the
    compiled program does the same work as L separately traced blocks.
    """
    block = _block_class(config)(config, lora, True, mesh)
    return jax.jit(lambda variables, h, cache_kv, context: block.apply(variables, h, cache_kv, context))


class Llama(nn.Module):
    """LLaMA-family causal LM.

    Attributes:
      config: shapes and dtypes.
      lora: adapter settings; None builds the plain base model (no `lora` collection).
      mesh: a ("data", "fsdp", "tensor") mesh to pin activation shardings on (training); None adds
        no constraints. Values never depend on it, only the layout XLA picks.
      layer_loop: "scan" (stacked [L, ...] params, training) or "unroll" (params from
        `split_layers`, the decode layout); a cache must be in the same layout.
    """

    config: LlamaConfig
    lora: LoraConfig | None = None
    mesh: Mesh | None = None
    layer_loop: str = "scan"

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int32
        positions: jax.Array | None = None,  # [B, T] int32; default 0..T-1 (or cache length + 0..T-1)
        segment_ids: jax.Array | None = None,  # [B, T] int32; 0 = padding; default all ones
        *,
        cache: KVCache | None = None,
        deterministic: bool = True,
        logits_at: jax.Array | None = None,  # [B, P] indices into T; default all T
        adapter_ids: jax.Array | None = None,  # [B] int32 slots in the stacked adapter tables, if the params have them
    ):
        """Returns logits [B, T|P, V] float32, or with `cache`, `(logits, new_cache)`.

        With a cache, each token with a non-zero segment id is written to slot `positions` of its
        row (padding writes nowhere), attends to the row's filled slots up to its own position, and
        the cache's lengths grow to cover what was written. Logits are computed only at `logits_at`
        (e.g. each row's last token) when given; under jit, unused logits cost nothing.
        """
        c = self.config
        _check_layer_loop(self.layer_loop)
        context, layer_caches, new_lengths = self._context(input_ids, positions, segment_ids, cache)
        if adapter_ids is not None:
            context = context.replace(adapter=adapter_ids.astype(jnp.int32))

        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=jnp.dtype(c.dtype),
                         param_dtype=jnp.dtype(c.param_dtype), name="embed")
        h = _pin(embed(input_ids), "residual", self.mesh)
        blocks = _stacked_blocks(c) if self.layer_loop == "scan" else UnrolledBlocks
        h, new_layer_caches = blocks(c, self.lora, deterministic, self.mesh, name="layers")(h, layer_caches, context)
        h = RMSNorm(c.rms_norm_eps, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                    name="final_norm")(h)
        if logits_at is not None:
            h = jnp.take_along_axis(h, logits_at[..., None], axis=1)
        if c.tie_word_embeddings:
            logits = _tied_logits(embed, h)
        else:
            logits = LoraLinear(c.vocab_size, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype),
                                name="lm_head")(h)
        logits = _pin(logits.astype(jnp.float32), "logits", self.mesh)
        if cache is None:
            return logits
        return logits, KVCache(new_layer_caches[0], new_layer_caches[1], new_lengths)

    def _context(self, input_ids, positions, segment_ids, kv_cache: KVCache | None):
        """Positions, attention mask and cache slots for this call; new cache lengths when decoding."""
        batch, length = input_ids.shape
        if positions is None:
            start = kv_cache.lengths[:, None] if kv_cache is not None else 0
            positions = start + jnp.arange(length, dtype=jnp.int32)[None, :]
            positions = jnp.broadcast_to(positions, (batch, length))
        if kv_cache is None:
            if segment_ids is None:
                return attention.AttentionContext(positions, None, None), None, None
            mask = attention.attention_mask(positions, segment_ids, positions, segment_ids)
            return attention.AttentionContext(positions, mask, None), None, None
        # With a cache, keys are cache slots; slot s is valid once written, i.e. s < new length.
        segments = segment_ids if segment_ids is not None else jnp.ones_like(input_ids)
        slots = jnp.where(segments != 0, positions, kv_cache.max_length)  # padding writes nowhere
        written_end = jnp.max(jnp.where(segments != 0, positions + 1, 0), axis=1)
        new_lengths = jnp.maximum(kv_cache.lengths, written_end).astype(jnp.int32)
        key_positions = jnp.broadcast_to(jnp.arange(kv_cache.max_length, dtype=jnp.int32), (batch, kv_cache.max_length))
        key_segments = (key_positions < new_lengths[:, None]).astype(jnp.int32)
        mask = attention.attention_mask(positions, jnp.ones_like(segments), key_positions, key_segments)
        return attention.AttentionContext(positions, mask, slots), (kv_cache.keys, kv_cache.values), new_lengths


def _tied_logits(embed: nn.Embed, h: jax.Array) -> jax.Array:  # [..., D] -> [..., V]
    """Embed.attend's h @ E.T, as one dot_general on the stored [V, D] table: XLA:CPU turned the
    explicit transpose into a per-step copy of the whole table (113 MB for SmolLM2) at batch 1."""
    embedding = embed.embedding.astype(embed.dtype)
    return jnp.einsum("...d,vd->...v", h.astype(embed.dtype), embedding)
