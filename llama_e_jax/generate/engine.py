"""KV-cache text generation: compiled prefill and decode, slot-based batching, and the CLI.

    python -m llama_e_jax.generate "Write an ad for a steel water bottle"
    python -m llama_e_jax.generate --jsonl data/test.jsonl --adapter runs/ads/adapter --max-new-tokens 128

Design, and why:

* One fixed-size cache per session. A `DecodeState` holds B rows of S cache slots; a row is filled
  by a prefill, decodes until it stops, and is then free for the next prompt. Shapes never change
  while decoding, so each compiled function is reused for every prompt, and the server admits new
  requests into free rows between decode chunks (continuous batching) without recompiling.
* The cache keeps the un-repeated key/value heads (GQA) heads-major, [B, K, S, Dh] per layer (the
  model's own KVCache is [B, S, K, Dh]). With K before S, each (row, kv head) is one contiguous
  [S, Dh] block, so the decode attention (q·Kᵀ, then p·V, batched over rows and kv heads) is a plain
  batched matmul; with [B, S, K, Dh] XLA first transposes — copies — the whole cache every step.
  Decode therefore has its own attention (model.py's projections, rotary, MLP and norms around
  it); prefill runs model.py's `Block` unchanged.
* Prefill is compiled per (rows, prompt length) bucket — rows in powers of two, lengths in steps of
  at most 1.5x — so a handful of compiles serve all prompts. Prompts are right-padded; padding has
  segment id 0 and writes nowhere. Prefill caches each prompt but its last token; the first decode
  step feeds that token and samples the first new one, so prefill needs neither the output layer
  nor the sampler (cheaper to compile, once per bucket) and every token is sampled in one place.
* Decode runs on device: `lax.while_loop` over up to `chunk_size` steps, exiting early when every
  row is done. Each row stops on its own at EOS, at a stop sequence (matched on device, token by
  token, against the stop strings' own tokenizations) or at its token budget. The host looks at the
  text once per chunk: it checks stop strings there too (a stop string can be produced by tokens
  other than its own tokenization; the text check is authoritative and cuts the text), streams
  text and fills free rows. The state is donated, so the cache is updated in place.
* Layers are unrolled by default: each layer's weights and cache are separate arrays, so a decode
  step reads every weight once and writes only the new key/value row. A `lax.scan` over stacked
  layers (`layer_loop="scan"`) compiles faster, but scanning slices the stacked weights and cache
  per layer and writes the cache back as the scan's output, which costs copies every step (2.6x
  slower decode on CPU). Tests check both against `Llama.apply` and greedy output against
  transformers.
* Sampling: a sampler from sampling.py, with one value per row, and one PRNG key per row derived
  from (seed, sequence index) and folded with the step number: seeded output does not depend on
  what else shares the batch.
* Structured outputs: a row may follow a token program (structured.py, e.g. a JSON schema's
  object). Before sampling, its logits are masked to what the program's current entry allows; after,
  its program counter advances and the row stops when the program ends. All on device, per row;
  unconstrained rows are untouched.
* Adapters are merged into the base weights before decoding (`lora.merge`): no extra matmuls.
* Sharded params (sharding.py) work unchanged: the functions are jitted without placement; each
  layer's slice keeps its parameter's sharding minus the layer axis and the cache follows the
  cache rule (batch over data/fsdp, kv heads over tensor).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.generate import sampling
from llama_e_jax.generate import structured
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.io.default_model import enable_compilation_cache
from llama_e_jax.model.lora import LoraLinear
from llama_e_jax.model.llama import MLP, AttentionContext, Block, RMSNorm, apply_rotary, attention_mask, rope_inverse_frequencies

log = logging.getLogger(__name__)

# Finish codes kept on device; the host maps them to OpenAI's finish_reason strings.
RUNNING, FINISHED_EOS, FINISHED_STOP, FINISHED_LENGTH = 0, 1, 2, 3
FINISH_REASONS = {FINISHED_EOS: "stop", FINISHED_STOP: "stop", FINISHED_LENGTH: "length"}

STOP_WINDOW = 16  # longest stop sequence (in tokens) matched on device; longer ones only on the host
MAX_DEVICE_STOPS = 4  # stop sequences per row matched on device (OpenAI allows 4)


class GenerationError(ValueError):
    """A prompt or setting that cannot be generated (too long for the cache, bad value...)."""


def length_bucket(n: int, maximum: int, minimum: int = 16) -> int:
    """n rounded up to 16, 24, 32, 48, 64, 96, 128, 192, ... (steps of at most 1.5x), capped at `maximum`."""
    size = minimum
    while size < n:
        size = size + size // 2 if size & (size - 1) == 0 else size // 3 * 4
    return min(size, maximum)


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    """The smallest power of two ≥ max(n, minimum), capped at `maximum`."""
    size = 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))
    return size if maximum is None else min(size, maximum)


# ============================================================================= device state


@flax.struct.dataclass
class DecodeState:
    """Everything the device needs to continue B sequences; one row per sequence ("slot").

    Attributes:
      keys / values: the cache; per layer [B, K, S, Dh] (unrolled layers) or one [L, B, K, S, Dh]
        array (scanned layers). Slot s of a row holds the token at position s.
      lengths: [B] int32, cache slots filled = position of `tokens`.
      tokens: [B] int32, each row's last sampled token: already emitted, not yet in the cache.
      active: [B] bool, the row is still generating.
      num_generated: [B] int32, tokens sampled so far (EOS and stop tokens included).
      max_new_tokens: [B] int32, the row's budget.
      finish: [B] int32, RUNNING or the FINISHED_* reason.
      recent: [B, W] int32, the last W sampled tokens, right-aligned (-2 before the first).
      stop_ids: [B, M, W] int32, stop sequences right-aligned; -1 pads (matches anything); a stop
        whose last entry is -1 is unused.
      eos_ids: [E] int32, tokens that end a sequence.
      program: [B, P] int32, each row's token program (structured.py): forced token ids >= 0,
        FREE_STRING and END; an unconstrained row has NONE in entry 0.
      pc: [B] int32, the program entry the row's next token must satisfy.
      string_safe / close_quote: [V] bool, the tokens allowed inside a JSON string body / the tokens
        that end one (set by the session before its first constrained row; unused until then).
      rng: [B] PRNG keys, one per row.
      sampler: the session's sampler with one value per row in each numeric field ([B] leaves).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    lengths: jax.Array
    tokens: jax.Array
    active: jax.Array
    num_generated: jax.Array
    max_new_tokens: jax.Array
    finish: jax.Array
    recent: jax.Array
    stop_ids: jax.Array
    eos_ids: jax.Array
    program: jax.Array
    pc: jax.Array
    string_safe: jax.Array
    close_quote: jax.Array
    rng: jax.Array
    sampler: Any

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[-2]


@flax.struct.dataclass
class Admission:
    """What prefill needs to start b new rows (b bucketed; padding rows have row index B).

    prompt_ids: [b, T] each prompt but its last token, right-padded; prompt_lengths: [b] their
    lengths (prompt length - 1, may be 0); last_tokens: [b] each prompt's last token, which the first
    decode step feeds; rows: [b] target rows; max_new_tokens: [b]; seeds / streams: [b] uint32, the
    row key is fold_in(key(seed), stream); stop_ids: [b, M, W]; programs: [b, P] token programs;
    sampler: the rows' sampler values ([b] leaves).
    """

    prompt_ids: jax.Array
    prompt_lengths: jax.Array
    last_tokens: jax.Array
    rows: jax.Array
    max_new_tokens: jax.Array
    seeds: jax.Array
    streams: jax.Array
    stop_ids: jax.Array
    programs: jax.Array
    sampler: Any


# ============================================================================= weights


def split_layers(params: dict) -> dict:
    """Decode weights: the stacked [L, ...] layer params as a tuple of L per-layer trees.

    Each slice is a separate array, so a decode step reads it directly (no per-step dynamic slice).
    Sharded leaves keep their sharding minus the layer axis. The caller may drop `params` afterwards.
    Params whose layers are already a tuple (e.g. drawn layer by layer) are returned as they are.
    """
    layers = params["layers"]
    if isinstance(layers, tuple):
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

    split = tuple(jax.tree.map(functools.partial(layer_slice, i=i), layers) for i in range(num_layers))
    return {**{name: tree for name, tree in params.items() if name != "layers"}, "layers": split}


def _is_unrolled(weights: dict) -> bool:
    return isinstance(weights["layers"], tuple)


# ============================================================================= the forward pass


def _cache_context(
    positions: jax.Array,  # [B, T]
    segments: jax.Array,  # [B, T], 0 = padding (writes nowhere)
    lengths: jax.Array,  # [B] slots already filled
    max_length: int,  # S
) -> tuple[AttentionContext, jax.Array]:
    """Attention over the cache after this call's tokens are written; mirrors `Llama._context`."""
    batch = positions.shape[0]
    slots = jnp.where(segments != 0, positions, max_length)
    written_end = jnp.max(jnp.where(segments != 0, positions + 1, 0), axis=1)
    new_lengths = jnp.maximum(lengths, written_end).astype(jnp.int32)
    key_positions = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (batch, max_length))
    key_segments = (key_positions < new_lengths[:, None]).astype(jnp.int32)
    mask = attention_mask(positions, jnp.ones_like(segments), key_positions, key_segments)
    return AttentionContext(positions, mask, slots), new_lengths


LayerBody = Callable[[jax.Array, dict, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _run_layers(weights: dict, h: jax.Array, keys: tuple, values: tuple, body: LayerBody):
    """Applies `body(h, layer_params, layer_keys, layer_values)` layer by layer (unrolled or scanned)."""
    if _is_unrolled(weights):
        new_keys, new_values = [], []
        for layer_params, layer_keys, layer_values in zip(weights["layers"], keys, values):
            h, layer_keys, layer_values = body(h, layer_params, layer_keys, layer_values)
            new_keys.append(layer_keys)
            new_values.append(layer_values)
        return h, tuple(new_keys), tuple(new_values)

    def step(h, xs):
        h, layer_keys, layer_values = body(h, *xs)
        return h, (layer_keys, layer_values)

    h, (stacked_keys, stacked_values) = jax.lax.scan(step, h, (weights["layers"], keys[0], values[0]))
    return h, (stacked_keys,), (stacked_values,)


def _prefill_block(config: LlamaConfig, h: jax.Array, layer_params: dict, cache_kv, context: AttentionContext):
    """model.py's Block, unchanged (its cache is the prompt-sized scratch in the model's layout)."""
    return Block(config, None, True).apply({"params": layer_params}, h, cache_kv, context)


def _embed(config: LlamaConfig, weights: dict, ids: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
    embed = nn.Embed(config.vocab_size, config.hidden_size, dtype=jnp.dtype(config.dtype),
                     param_dtype=jnp.dtype(config.param_dtype))
    return embed.apply({"params": weights["embed"]}, ids)


def _logits(config: LlamaConfig, weights: dict, h: jax.Array) -> jax.Array:  # [B, D] -> [B, V] float32
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    h = RMSNorm(config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype).apply({"params": weights["final_norm"]}, h)
    if config.tie_word_embeddings:
        # Embed.attend's h @ E.T, as one dot_general on the stored [V, D] table: XLA:CPU turned the
        # explicit transpose into a per-step copy of the whole table (113 MB for SmolLM2) at batch 1.
        embedding = weights["embed"]["embedding"].astype(dtype)
        logits = jnp.einsum("bd,vd->bv", h.astype(dtype), embedding)
    else:
        logits = LoraLinear(config.vocab_size, dtype=dtype, param_dtype=param_dtype).apply(
            {"params": weights["lm_head"]}, h)
    return logits.astype(jnp.float32)


def _linear(config: LlamaConfig, params: dict, x: jax.Array, features: int) -> jax.Array:
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    return LoraLinear(features, dtype=dtype, param_dtype=param_dtype).apply({"params": params}, x)


def _norm(config: LlamaConfig, params: dict, x: jax.Array) -> jax.Array:
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    return RMSNorm(config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype).apply({"params": params}, x)


def _decode_block(
    config: LlamaConfig,
    layer: dict,  # one layer's params
    h: jax.Array,  # [B, D] residual stream of each row's current token
    keys: jax.Array,  # [B, K, S, Dh]
    values: jax.Array,  # [B, K, S, Dh]
    positions: jax.Array,  # [B] position of the current token
    slots: jax.Array,  # [B] where its key/value go (S for inactive rows: dropped)
    key_mask: jax.Array,  # [B, S] slots to attend to
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """model.py's Block for one new token per row, on the heads-major cache. Returns (h, keys, values)."""
    c = config
    batch, group = h.shape[0], c.num_heads // c.num_kv_heads
    x = _norm(c, layer["attn_norm"], h)
    attn = layer["attn"]
    q = _linear(c, attn["q_proj"], x, c.num_heads * c.head_dim).reshape(batch, 1, c.num_heads, c.head_dim)
    k = _linear(c, attn["k_proj"], x, c.num_kv_heads * c.head_dim).reshape(batch, 1, c.num_kv_heads, c.head_dim)
    v = _linear(c, attn["v_proj"], x, c.num_kv_heads * c.head_dim).reshape(batch, c.num_kv_heads, c.head_dim)
    inv_freq = rope_inverse_frequencies(c)
    q = apply_rotary(q, positions[:, None], inv_freq).reshape(batch, c.num_kv_heads, group, c.head_dim)
    k = apply_rotary(k, positions[:, None], inv_freq)[:, 0]  # [B, K, Dh]
    rows = jnp.arange(batch)
    keys = keys.at[rows, :, slots].set(k.astype(keys.dtype), mode="drop")  # in place: the cache is donated
    values = values.at[rows, :, slots].set(v.astype(values.dtype), mode="drop")

    # As jax.nn.dot_product_attention's XLA path: fp32 logits and softmax, probabilities in the
    # cache dtype. Query head h reads kv head h // group (HF's repeat_kv order).
    scores = jnp.einsum("bkgd,bksd->bkgs", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
    scores = scores * jnp.float32(c.head_dim**-0.5)
    scores = jnp.where(key_mask[:, None, None, :], scores, _LARGE_NEGATIVE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, values).reshape(batch, c.num_heads * c.head_dim)
    h = h + _linear(c, attn["o_proj"], out.astype(q.dtype), c.hidden_size)
    h = h + MLP(c, None, True).apply({"params": layer["mlp"]}, _norm(c, layer["mlp_norm"], h))
    return h, keys, values


_LARGE_NEGATIVE = -0.7 * float(np.finfo(np.float32).max)


def _decode_logits(config: LlamaConfig, weights: dict, state: DecodeState):
    """Feeds each active row's `tokens` at position `lengths`; returns (logits [B, V], keys, values, lengths)."""
    positions = state.lengths  # [B]
    slots = jnp.where(state.active, positions, state.max_length)
    new_lengths = jnp.where(state.active, positions + 1, state.lengths).astype(jnp.int32)
    key_mask = jnp.arange(state.max_length)[None, :] < new_lengths[:, None]  # [B, S]

    def body(h, layer_params, layer_keys, layer_values):
        return _decode_block(config, layer_params, h, layer_keys, layer_values, positions, slots, key_mask)

    h = _embed(config, weights, state.tokens)  # [B, D]
    h, keys, values = _run_layers(weights, h, state.keys, state.values, body)
    return _logits(config, weights, h), keys, values, new_lengths


def _prefill_cache(config: LlamaConfig, weights: dict, state: DecodeState, admission: Admission):
    """Runs the prompts (all but their last token) and writes their keys/values into rows
    `admission.rows` of the cache. Returns the new (keys, values).

    Attention is computed against a prompt-sized scratch cache (the rows are fresh, so the prompt is
    all there is to attend to), which is then copied into the rows. No logits are needed: the
    prompt's last token is fed by the first decode step, which samples the first new token.
    """
    ids, prompt_lengths = admission.prompt_ids, admission.prompt_lengths  # [b, T], [b]
    rows_in, prompt_len = ids.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), ids.shape)
    segments = (positions < prompt_lengths[:, None]).astype(jnp.int32)
    context, _ = _cache_context(positions, segments, jnp.zeros((rows_in,), jnp.int32), prompt_len)
    scratch_shape = (rows_in, prompt_len, config.num_kv_heads, config.head_dim)

    def body(h, layer_params, layer_keys, layer_values):
        scratch = (jnp.zeros(scratch_shape, layer_keys.dtype), jnp.zeros(scratch_shape, layer_values.dtype))
        h, (new_keys, new_values) = _prefill_block(config, h, layer_params, scratch, context)
        # Scratch [b, T, K, Dh] -> rows of the heads-major cache [B, K, S, Dh]; padding rows (index B)
        # are dropped.
        layer_keys = layer_keys.at[admission.rows, :, :prompt_len].set(
            new_keys.transpose(0, 2, 1, 3).astype(layer_keys.dtype), mode="drop")
        layer_values = layer_values.at[admission.rows, :, :prompt_len].set(
            new_values.transpose(0, 2, 1, 3).astype(layer_values.dtype), mode="drop")
        return h, layer_keys, layer_values

    _, keys, values = _run_layers(weights, _embed(config, weights, ids), state.keys, state.values, body)
    return keys, values


# ============================================================================= sampling and stopping


def _step_keys(state: DecodeState) -> jax.Array:  # [B] keys
    return jax.vmap(jax.random.fold_in)(state.rng, state.num_generated)


def _record(state: DecodeState, new_tokens: jax.Array, emitting: jax.Array) -> DecodeState:
    """Books new tokens [B] for rows where `emitting` [B] and ends rows at EOS / stop / budget."""
    num_generated = state.num_generated + emitting.astype(jnp.int32)
    shifted = jnp.concatenate([state.recent[:, 1:], new_tokens[:, None]], axis=1)
    recent = jnp.where(emitting[:, None], shifted, state.recent)
    is_eos = jnp.isin(new_tokens, state.eos_ids)
    stop_matches = (state.stop_ids == -1) | (state.stop_ids == recent[:, None, :])  # [B, M, W]
    hit_stop = jnp.any(jnp.all(stop_matches, axis=-1) & (state.stop_ids[..., -1] >= 0), axis=-1)
    at_budget = num_generated >= state.max_new_tokens
    pc, program_done = _advance_program(state, new_tokens, emitting)
    ended_well = is_eos | program_done  # a completed program ends like EOS: finish_reason "stop"
    reason = jnp.where(ended_well, FINISHED_EOS, jnp.where(hit_stop, FINISHED_STOP, FINISHED_LENGTH))
    ending = emitting & (ended_well | hit_stop | at_budget)
    return state.replace(
        tokens=jnp.where(emitting, new_tokens, state.tokens),
        num_generated=num_generated,
        recent=recent,
        pc=pc,
        finish=jnp.where(ending, reason, state.finish).astype(jnp.int32),
        active=state.active & ~ending,
    )


def _program_entry(program: jax.Array, pc: jax.Array) -> jax.Array:  # [B, P], [B] -> [B]
    return jnp.take_along_axis(program, jnp.minimum(pc, program.shape[1] - 1)[:, None], axis=1)[:, 0]


def _advance_program(state: DecodeState, new_tokens: jax.Array, emitting: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Moves each row's program counter past the entry its new token satisfied: a forced token always,
    a string body when the token closes it. Returns (pc [B], program reached END [B])."""
    entry = _program_entry(state.program, state.pc)
    closes = state.close_quote[new_tokens]
    advance = emitting & ((entry >= 0) | ((entry == structured.FREE_STRING) & closes))
    pc = state.pc + advance.astype(jnp.int32)
    return pc, advance & (_program_entry(state.program, pc) == structured.END)


def _allowed_tokens(state: DecodeState, vocab_size: int) -> jax.Array:  # -> [B, V] bool
    """What each row's program entry allows: its forced token, a string body's tokens, or anything."""
    entry = _program_entry(state.program, state.pc)[:, None]  # [B, 1]
    forced = jnp.arange(vocab_size, dtype=jnp.int32)[None, :] == entry
    in_string = (state.string_safe | state.close_quote)[None, :]
    return jnp.where(entry >= 0, forced, jnp.where(entry == structured.FREE_STRING, in_string, True))


def _sample(state: DecodeState, logits: jax.Array) -> jax.Array:  # [B, V] -> [B]
    # Unconstrained rows keep their logits bit for bit (where(True, x, .) is x).
    logits = jnp.where(_allowed_tokens(state, logits.shape[-1]), logits, -jnp.inf)
    return state.sampler.get_next_tokens(logits, _step_keys(state))


# ============================================================================= compiled entry points


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def prefill(config: LlamaConfig, weights: dict, state: DecodeState, admission: Admission) -> DecodeState:
    """Starts the admitted rows: fills their cache with the prompt and sets up their decoding.

    Each row's prompt minus its last token goes into the cache; the last token is left pending in
    `tokens`, so the row's first decode step feeds it and samples the first new token (with key
    fold_in(row key, 0)). Prefill thus compiles without the sampler or the output layer.
    """
    keys, values = _prefill_cache(config, weights, state, admission)
    rows = admission.rows
    row_keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(
        admission.seeds, admission.streams)

    def put(full, new):
        return full.at[rows].set(new.astype(full.dtype), mode="drop")

    return state.replace(
        keys=keys,
        values=values,
        lengths=put(state.lengths, admission.prompt_lengths),
        tokens=put(state.tokens, admission.last_tokens),
        active=put(state.active, jnp.ones_like(rows, bool)),
        num_generated=put(state.num_generated, jnp.zeros_like(rows)),
        max_new_tokens=put(state.max_new_tokens, admission.max_new_tokens),
        finish=put(state.finish, jnp.zeros_like(rows)),
        recent=put(state.recent, jnp.full((rows.shape[0], state.recent.shape[1]), -2, jnp.int32)),
        stop_ids=put(state.stop_ids, admission.stop_ids),
        program=put(state.program, admission.programs),
        pc=put(state.pc, jnp.zeros_like(rows)),
        rng=state.rng.at[rows].set(row_keys, mode="drop"),
        sampler=jax.tree.map(put, state.sampler, admission.sampler),
    )


@functools.partial(jax.jit, static_argnames=("config", "chunk_size"), donate_argnames=("state",))
def decode_chunk(config: LlamaConfig, weights: dict, state: DecodeState, chunk_size: int):
    """Up to `chunk_size` decode steps on device, stopping early once no row is active.

    Returns (state, emitted [B, chunk_size] int32): step i's token per row, -1 where the row was not
    generating.
    """

    def step(carry):
        i, state, emitted = carry
        logits, keys, values, lengths = _decode_logits(config, weights, state)
        was_active = state.active
        state = state.replace(keys=keys, values=values, lengths=lengths)
        new_tokens = _sample(state, logits)
        state = _record(state, new_tokens, was_active)
        emitted = emitted.at[:, i].set(jnp.where(was_active, new_tokens, -1))
        return i + 1, state, emitted

    def not_done(carry):
        i, state, _ = carry
        return (i < chunk_size) & jnp.any(state.active)

    emitted = jnp.full((state.batch_size, chunk_size), -1, jnp.int32)
    _, state, emitted = jax.lax.while_loop(not_done, step, (jnp.int32(0), state, emitted))
    return state, emitted


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def feed_tokens(config: LlamaConfig, weights: dict, state: DecodeState, tokens: jax.Array):
    """Teacher forcing: feeds `tokens` [B] to the active rows and returns (state, logits [B, V]).

    The logits predict the token after `tokens`; nothing is sampled or booked, so this scores given
    continuations (e.g. label options) one token at a time.
    """
    state = state.replace(tokens=tokens.astype(jnp.int32))
    logits, keys, values, lengths = _decode_logits(config, weights, state)
    return state.replace(keys=keys, values=values, lengths=lengths), logits


@functools.partial(jax.jit, donate_argnames=("state",))
def release_rows(state: DecodeState, released: jax.Array) -> DecodeState:
    """Stops the rows where `released` [B] is true (the host found a stop string in their text)."""
    return state.replace(active=state.active & ~released)


def _cache_sharding(weights: dict, shape: tuple[int, ...]):
    """The cache rule's sharding for one cache array, on the mesh the weights live on (or None)."""
    leaf = jax.tree.leaves(weights["layers"])[0]
    leaf_sharding = getattr(leaf, "sharding", None)
    if not isinstance(leaf_sharding, jax.sharding.NamedSharding):
        return None
    from llama_e_jax.model import sharding  # deferred: only sharded runs need the rules table

    mesh = leaf_sharding.mesh
    # The rule is written for the model's [L, B, S, K, Dh]; ours is [L, B, K, S, Dh] (heads-major).
    stacked = shape if len(shape) == 5 else (1, *shape)
    rule = tuple(sharding.spec_for("cache/keys", stacked)) + (None,) * 5
    heads_major = jax.sharding.PartitionSpec(rule[0], rule[1], rule[3], rule[2], rule[4])
    spec = tuple(sharding.fit_spec(heads_major, stacked, dict(mesh.shape)))
    per_array = spec if len(shape) == 5 else spec[1:]  # per-layer arrays: the rule minus the layer axis
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*per_array))


def new_state(
    config: LlamaConfig,
    weights: dict,
    batch_size: int,
    max_length: int,
    sampler: Any,
    eos_ids: Sequence[int],
    program_length: int = structured.PROGRAM_LENGTH,
) -> DecodeState:
    """An empty session: no active rows, a zeroed cache placed by the cache rule when sharded.

    `program_length` (P) bounds the token program of a constrained row (structured.py).
    """
    dtype = jnp.dtype(config.dtype)
    row_shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
    if _is_unrolled(weights):
        shapes = [row_shape] * config.num_layers
    else:
        shapes = [(config.num_layers, *row_shape)]

    def zeros(shape):
        placement = _cache_sharding(weights, shape)
        make = functools.partial(jnp.zeros, shape, dtype)
        return jax.jit(make, out_shardings=placement)() if placement is not None else make()

    def per_row(dtype=jnp.int32):  # a distinct buffer per field: the state is donated leaf by leaf
        return jnp.zeros((batch_size,), dtype)

    return DecodeState(
        keys=tuple(zeros(shape) for shape in shapes),
        values=tuple(zeros(shape) for shape in shapes),
        lengths=per_row(),
        tokens=per_row(),
        active=per_row(bool),
        num_generated=per_row(),
        max_new_tokens=per_row(),
        finish=per_row(),
        recent=jnp.full((batch_size, STOP_WINDOW), -2, jnp.int32),
        stop_ids=jnp.full((batch_size, MAX_DEVICE_STOPS, STOP_WINDOW), -1, jnp.int32),
        eos_ids=jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32),
        program=jnp.full((batch_size, program_length), structured.NONE, jnp.int32),
        pc=per_row(),
        string_safe=jnp.zeros((config.vocab_size,), bool),
        close_quote=jnp.zeros((config.vocab_size,), bool),
        rng=jax.random.split(jax.random.key(0), batch_size),
        sampler=sampler_rows([sampler], batch_size),
    )


def sampler_rows(samplers: Sequence[Any], batch_size: int) -> Any:
    """One sampler whose numeric fields hold each sampler's value per row ([batch_size] leaves).

    All samplers must be of one type with the same static fields (e.g. TopK's k); rows beyond
    len(samplers) repeat the first.
    """
    treedef = jax.tree.structure(samplers[0])
    for other in samplers[1:]:
        if jax.tree.structure(other) != treedef:
            raise GenerationError(f"samplers in one batch must match: {samplers[0]} vs {other}")
    padded = list(samplers) + [samplers[0]] * (batch_size - len(samplers))
    return jax.tree.map(lambda *values: jnp.asarray(np.array(values, np.float32)), *padded)


# ============================================================================= host side: sequences


@dataclasses.dataclass(frozen=True)
class Completion:
    """One generated sequence.

    Attributes:
      text: the generated text, without the prompt, EOS or the stop string that ended it.
      token_ids: the tokens the model generated (an ending EOS included; tokens after a stop
        string are not).
      prompt_tokens / completion_tokens: counts for usage reports (completion = len(token_ids)).
      finish_reason: "stop" (EOS or a stop sequence) or "length" (max_new_tokens or cache full).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclasses.dataclass(frozen=True)
class Progress:
    """A snapshot of a request, handed to `Request.on_update` (immutable, so safe across threads)."""

    text: str
    completion_tokens: int
    finish_reason: str | None


@dataclasses.dataclass
class Request:
    """One sequence to generate: its settings, and the tokens and text produced so far.

    `on_update(progress)` (optional) is called from the decoding thread whenever new tokens arrived
    and once more when the request finishes. `cancel()` may be called from any thread; the row is
    freed at the next chunk boundary. `program` (optional) is a token program from structured.py
    that the generated tokens must follow (e.g. a JSON object of a schema).
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Any = dataclasses.field(default_factory=sampling.Greedy)
    stop: tuple[str, ...] = ()
    seed: int = 0
    stream: int = 0
    on_update: Callable[[Progress], None] | None = None
    program: Sequence[int] | None = None
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True

    def completion(self) -> Completion:
        return Completion(self.text, tuple(self.token_ids), len(self.prompt_ids), len(self.token_ids),
                          self.finish_reason or "length")

    def progress(self) -> Progress:
        return Progress(self.text, len(self.token_ids), self.finish_reason)

    def add_tokens(self, new_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> None:
        """Appends tokens; cuts at the first stop string (then finish_reason = "stop")."""
        before = len(self.token_ids)
        self.token_ids.extend(int(t) for t in new_ids)
        text = decode(self.token_ids)
        longest_stop = max((len(s) for s in self.stop), default=0)
        cut = _first_stop(text, self.stop, max(0, len(self.text) - longest_stop))
        if cut is None:
            self.text = text
            return
        # Keep only the tokens up to the one that completed the stop string.
        for count in range(before + 1, len(self.token_ids) + 1):
            if _first_stop(decode(self.token_ids[:count]), self.stop, 0) is not None:
                del self.token_ids[count:]
                break
        self.text = text[:cut]
        self.finish_reason = "stop"


def stable_text_end(text: str, finished: bool, stop: Sequence[str]) -> int:
    """How much of a growing text can be streamed: not a trailing incomplete UTF-8 character
    (decoded as U+FFFD) and not what could still turn out to be the start of a stop string."""
    if finished:
        return len(text)
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    held = 0
    for s in stop:
        held = max([held] + [k for k in range(1, len(s)) if text[:end].endswith(s[:k])])
    return end - held


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    found = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(found) if found else None


def _device_stop_ids(stops: Sequence[str], encode: Callable[[str], list[int]]) -> np.ndarray:  # [M, W]
    """Stop strings as right-aligned token rows for on-device matching (-1 pads); the first
    MAX_DEVICE_STOPS that fit in STOP_WINDOW tokens are matched on device, all on the host."""
    table = np.full((MAX_DEVICE_STOPS, STOP_WINDOW), -1, np.int32)
    usable = [ids for ids in (encode(s) for s in stops if s) if 0 < len(ids) <= STOP_WINDOW]
    for row, ids in enumerate(usable[:MAX_DEVICE_STOPS]):
        table[row, STOP_WINDOW - len(ids):] = ids
    return table


def make_admission(
    requests: Sequence[Request],
    rows: Sequence[int],
    batch_size: int,
    max_length: int,
    encode: Callable[[str], list[int]],
    program_length: int = structured.PROGRAM_LENGTH,
) -> Admission:
    """Prefill inputs for `requests` going into cache `rows`, padded to bucketed shapes.

    Budgets are capped so prompt + output fits the row's `max_length` slots. Padding entries target
    row `batch_size`, which every write drops.
    """
    count = bucket(len(requests), maximum=batch_size)
    longest = max(len(request.prompt_ids) for request in requests) - 1  # the last token is decoded
    prompt_len = length_bucket(longest, max_length)
    ids = np.zeros((count, prompt_len), np.int32)
    lengths = np.zeros((count,), np.int32)
    last_tokens = np.zeros((count,), np.int32)
    target_rows = np.full((count,), batch_size, np.int32)
    budgets = np.ones((count,), np.int32)
    seeds, streams = np.zeros((count,), np.uint32), np.zeros((count,), np.uint32)
    stop_ids = np.full((count, MAX_DEVICE_STOPS, STOP_WINDOW), -1, np.int32)
    programs = np.stack([structured.pad_program(None, program_length)] * count)
    for i, (request, row) in enumerate(zip(requests, rows)):
        n = len(request.prompt_ids)
        ids[i, :n - 1], lengths[i], last_tokens[i] = request.prompt_ids[:-1], n - 1, request.prompt_ids[-1]
        target_rows[i] = row
        budgets[i] = min(request.max_new_tokens, max_length - n)
        seeds[i], streams[i] = request.seed % 2**32, request.stream % 2**32
        stop_ids[i] = _device_stop_ids(request.stop, encode)
        programs[i] = structured.pad_program(request.program, program_length)
    return Admission(
        prompt_ids=ids, prompt_lengths=lengths, last_tokens=last_tokens, rows=target_rows, max_new_tokens=budgets,
        seeds=seeds, streams=streams, stop_ids=stop_ids, programs=programs,
        sampler=sampler_rows([request.sampler for request in requests], count),
    )


# ============================================================================= host side: a session


class DecodeSession:
    """B rows of cache on device plus the host's view of which sequence owns which row.

    `submit` queues sequences; `step` admits queued ones into free rows (prefill), runs one decode
    chunk, and books the tokens. `run` steps until everything submitted is done. The server calls
    `step` from its batching thread; `Generator.generate` calls `run`.
    """

    def __init__(self, generator: "Generator", batch_size: int, max_length: int, sampler: Any,
                 chunk_size: int) -> None:
        self.generator = generator
        self.batch_size, self.max_length, self.chunk_size = batch_size, max_length, chunk_size
        self.sampler_type = jax.tree.structure(sampler)
        self.program_length = generator.program_length
        self.state = new_state(generator.config, generator.weights, batch_size, max_length, sampler,
                               generator.eos_ids, self.program_length)
        self._vocab_masks_set = False  # structured.vocab_masks go into the state on first use
        self.rows: list[Request | None] = [None] * batch_size
        self.queue: collections.deque[Request] = collections.deque()
        self.rows_in_last_chunk = 0  # sequences that shared the last decode chunk

    @property
    def num_free_rows(self) -> int:
        return sum(seq is None for seq in self.rows)

    @property
    def busy(self) -> bool:
        return bool(self.queue) or any(seq is not None for seq in self.rows)

    def check(self, seq: Request) -> None:
        """Raises GenerationError if `seq` can never run in this session."""
        if not seq.prompt_ids:
            raise GenerationError("empty prompt: at least one token is needed")
        if len(seq.prompt_ids) >= self.max_length:
            raise GenerationError(f"prompt of {len(seq.prompt_ids)} tokens does not fit the context of "
                                  f"{self.max_length} tokens (at least one new token must fit)")
        if seq.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={seq.max_new_tokens} must be at least 1")
        if jax.tree.structure(seq.sampler) != self.sampler_type:
            raise GenerationError(f"sampler {seq.sampler} does not match this session's {self.sampler_type}")
        if seq.program is not None:
            self._check_program(seq.program)

    def _check_program(self, program: Sequence[int]) -> None:
        if len(program) > self.program_length:
            raise GenerationError(f"the output constraint compiles to {len(program)} tokens; this session allows "
                                  f"at most {self.program_length}")
        if not len(program) or program[-1] != structured.END or max(program) >= self.generator.config.vocab_size:
            raise GenerationError("malformed token program: it must end with END and hold only valid token ids")
        try:
            self.vocab_masks()
        except structured.SchemaError as error:
            raise GenerationError(str(error)) from None

    def vocab_masks(self) -> structured.VocabMasks:
        """The structured-output masks of this session's tokenizer (built once per tokenizer)."""
        return structured.vocab_masks(self.generator.tokenizer, self.generator.config.vocab_size,
                                      self.generator.eos_ids)

    def submit(self, seq: Request) -> None:
        self.check(seq)
        self.queue.append(seq)

    def run(self, sequences: Sequence[Request]) -> None:
        for seq in sequences:
            self.submit(seq)
        while self.busy:
            self.step()

    def step(self) -> None:
        """Admit what fits, decode one chunk, book the tokens, free finished rows."""
        self._admit()
        self.rows_in_last_chunk = sum(seq is not None for seq in self.rows)
        if not self.rows_in_last_chunk:
            return
        state, emitted = decode_chunk(self.generator.config, self.generator.weights, self.state, self.chunk_size)
        self.state = state
        emitted, finish = jax.device_get((emitted, state.finish))
        for row, seq in enumerate(self.rows):
            if seq is not None:
                self._book(row, [t for t in emitted[row] if t >= 0], int(finish[row]))
        self._release_finished()

    # ---------------------------------------------------------------- internals

    def _admit(self) -> None:
        while self.queue and self.queue[0].cancelled:
            self.queue.popleft().finish_reason = "cancelled"
        free = [row for row, seq in enumerate(self.rows) if seq is None]
        group = [self.queue.popleft() for _ in range(min(len(free), len(self.queue)))]
        if not group:
            return
        if not self._vocab_masks_set and any(seq.program is not None for seq in group):
            masks = self.vocab_masks()
            self.state = self.state.replace(string_safe=jnp.asarray(masks.string_safe),
                                            close_quote=jnp.asarray(masks.close_quote))
            self._vocab_masks_set = True
        admission = make_admission(group, free[:len(group)], self.batch_size, self.max_length,
                                   self.generator.tokenizer.encode, self.program_length)
        self.state = prefill(self.generator.config, self.generator.weights, self.state, admission)
        for seq, row in zip(group, free):
            self.rows[row] = seq

    def _book(self, row: int, new_ids: list[int], finish_code: int) -> None:
        seq = self.rows[row]
        assert seq is not None
        if seq.cancelled:
            seq.finish_reason = "cancelled"
            return
        seq.add_tokens(new_ids, self.generator.decode)
        if not seq.done and finish_code != RUNNING:
            seq.finish_reason = FINISH_REASONS[finish_code]
        if seq.on_update is not None:
            seq.on_update(seq.progress())

    def _release_finished(self) -> None:
        finished = [row for row, seq in enumerate(self.rows) if seq is not None and seq.done]
        if finished:
            # Rows cut by a host-side stop string may still be active on device.
            released = np.zeros((self.batch_size,), bool)
            released[finished] = True
            self.state = release_rows(self.state, released)
            for row in finished:
                self.rows[row] = None


# ============================================================================= the generator


class Generator:
    """Params, tokenizer and compiled decoding, reusable across calls (evaluation, the server).

    Args:
      config: the model config (its dtype is the compute and cache dtype).
      params: base params (stacked layers, as model.py); with `adapter`, the adapter is merged in.
      tokenizer: a llama_e_jax.io.tokenizer.Tokenizer.
      adapter / lora_config: optional LoRA adapter tree and its settings.
      max_batch_size: rows decoded together (the server's batch; `generate` uses up to this).
      max_length: cache slots per row = prompt + generated tokens (default: the model's context,
        capped at 4096).
      chunk_size: decode steps per device call (the host checks stop strings and streams text in
        between).
      layer_loop: "unroll" (fast decode, default) or "scan" (faster compile for deep models on CPU).
      eos_ids: tokens that end a sequence (default: the config's EOS ids and the tokenizer's EOS).
      program_length: the longest token program (structured output constraint) a row may follow.
    """

    def __init__(
        self,
        config: LlamaConfig,
        params: dict,
        tokenizer: Any,
        *,
        adapter: dict | None = None,
        lora_config: Any = None,
        max_batch_size: int = 16,
        max_length: int | None = None,
        chunk_size: int = 32,
        layer_loop: str = "unroll",
        eos_ids: Sequence[int] | None = None,
        program_length: int = structured.PROGRAM_LENGTH,
    ) -> None:
        if layer_loop not in ("unroll", "scan"):
            raise GenerationError(f"layer_loop={layer_loop!r}, expected 'unroll' or 'scan'")
        if adapter is not None:
            from llama_e_jax.model import lora

            if lora_config is None:
                raise GenerationError("an adapter needs its lora_config")
            params = lora.merge(params, adapter, lora_config)
        self.config = config
        self.tokenizer = tokenizer
        weights = split_layers(params) if layer_loop == "unroll" else params
        # Host (numpy) leaves go to the device once here, not with every call.
        self.weights = jax.tree.map(lambda x: jnp.asarray(x) if isinstance(x, np.ndarray) else x, weights)
        self.max_batch_size = max_batch_size
        self.max_length = max_length or min(config.max_position_embeddings, 4096)
        self.chunk_size = chunk_size
        if eos_ids is None:
            eos_ids = set(config.eos_token_ids) | {getattr(tokenizer, "eos_id", None)} - {None}
        self.eos_ids = tuple(sorted(eos_ids))
        self.program_length = program_length

    # ---------------------------------------------------------------- text

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i not in self.eos_ids], skip_special_tokens=True)

    def encode_prompt(self, text: str) -> list[int]:
        """Prompt ids, with BOS prepended when the tokenizer wants one and the text lacks it."""
        ids = self.tokenizer.encode(text)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    # ---------------------------------------------------------------- generation

    def session(self, sampler: Any, batch_size: int | None = None, max_length: int | None = None,
                chunk_size: int | None = None) -> DecodeSession:
        """A decoding session (the server keeps one open)."""
        return DecodeSession(self, batch_size or self.max_batch_size, max_length or self.max_length, sampler,
                             chunk_size or self.chunk_size)

    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 128,
        sampler: Any = sampling.Greedy(),
        stop: Sequence[str] = (),
        seed: int = 0,
    ) -> list[Completion]:
        """Generates a continuation of each prompt (raw text: apply templates before).

        Prompts are decoded together, up to `max_batch_size` at a time, in order of submission;
        prompt i samples with key (seed, i), so results do not depend on the batch size.
        """
        return self.generate_ids([self.encode_prompt(p) for p in prompts], max_new_tokens, sampler, stop, seed)

    def generate_ids(
        self,
        prompt_ids: Sequence[Sequence[int]],
        max_new_tokens: int = 128,
        sampler: Any = sampling.Greedy(),
        stop: Sequence[str] = (),
        seed: int = 0,
    ) -> list[Completion]:
        """`generate` for prompts given as token ids."""
        if not prompt_ids:
            return []
        longest = max(len(ids) for ids in prompt_ids)
        max_length = length_bucket(longest + max_new_tokens, self.max_length, minimum=64)
        batch_size = bucket(len(prompt_ids), maximum=self.max_batch_size)
        sequences = [
            Request(list(ids), max_new_tokens, sampler, tuple(stop), seed=seed, stream=i)
            for i, ids in enumerate(prompt_ids)
        ]
        session = self.session(sampler, batch_size, max_length, bucket(max_new_tokens, 8, maximum=self.chunk_size))
        for i, seq in enumerate(sequences):
            try:
                session.check(seq)
            except GenerationError as error:
                raise GenerationError(f"prompt {i}: {error}") from None
        session.run(sequences)
        return [seq.completion() for seq in sequences]


# ============================================================================= loading


def load_generator(
    model: str | None = None,
    adapter: str | None = None,
    *,
    dtype: str = "float32",
    tokenizer: str | None = None,
    **generator_options: Any,
) -> Generator:
    """A Generator for a GGUF file, an HF checkpoint directory, or (None) the embedded SmolLM2.

    `adapter` is a directory saved by `lora.save_adapter` or a PEFT adapter directory. `tokenizer`
    overrides where the tokenizer is read from (default: the model file/directory).
    """
    from llama_e_jax.io import weights as weights_io
    from llama_e_jax.io.tokenizer import load_tokenizer

    if model is None:
        from llama_e_jax.io.default_model import ensure_default_gguf

        model = str(ensure_default_gguf())
    path = Path(model)
    if path.suffix == ".gguf" and path.is_file():
        config, params = weights_io.load_gguf(path, dtype=dtype)
    elif path.is_dir() and (path / "config.json").is_file():
        config, params = weights_io.load_hf_checkpoint(path, dtype=dtype)
    else:
        raise GenerationError(f"--model {model}: expected a .gguf file or an HF checkpoint directory with config.json")
    config = config.replace(dtype=dtype)
    adapter_tree, lora_config = (None, None) if adapter is None else _load_adapter(adapter, config)
    return Generator(config, params, load_tokenizer(tokenizer or path), adapter=adapter_tree,
                     lora_config=lora_config, **generator_options)


def _load_adapter(directory: str, config: LlamaConfig):
    from llama_e_jax.model import lora

    return lora.load_any_adapter(directory, config)  # our format or PEFT's


# ============================================================================= CLI


def _prompts_from_args(args: argparse.Namespace, tokenizer: Any) -> list[tuple[str, str]]:
    """(id, prompt text) pairs: JSONL records or argument instructions through the Alpaca template,
    `--raw` prompts as given, `--chat` through the tokenizer's chat template."""
    from llama_e_jax.data.prompt import build_prompt

    if args.jsonl:
        from llama_e_jax.data.schema import read_jsonl

        return [(record.id, build_prompt(record.instruction, record.input)) for record in read_jsonl(args.jsonl)]
    if not args.prompts:
        raise GenerationError("give prompt(s) as arguments or --jsonl FILE")
    out = []
    for i, text in enumerate(args.prompts):
        if args.raw:
            prompt = text
        elif args.chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        else:
            prompt = build_prompt(text, args.input)
        out.append((str(i), prompt))
    return out


def _sampler_from_args(args: argparse.Namespace) -> Any:
    if args.temperature == 0:
        return sampling.Greedy()
    if args.top_k:
        return sampling.TopK(k=args.top_k, temperature=args.temperature)
    if args.top_p < 1:
        return sampling.TopP(p=args.top_p, temperature=args.temperature)
    return sampling.Temperature(temperature=args.temperature)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_e_jax.generate", description=__doc__.split("\n")[0])
    parser.add_argument("prompts", nargs="*", help="instructions (Alpaca template applied unless --raw / --chat)")
    parser.add_argument("--input", default="", help="the ### Input: text for argument instructions")
    parser.add_argument("--jsonl", help="instruction-schema JSONL file; each record's instruction+input is a prompt")
    parser.add_argument("--raw", action="store_true", help="use the prompts exactly as given")
    parser.add_argument("--chat", action="store_true", help="wrap the prompts in the model's chat template")
    parser.add_argument("--model", help="GGUF file or HF checkpoint dir (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--adapter", help="LoRA adapter directory (ours or PEFT); merged into the weights")
    parser.add_argument("--tokenizer", help="tokenizer dir or GGUF (default: from --model)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layer-loop", default="unroll", choices=("unroll", "scan"),
                        help="unroll: fastest decoding; scan: compiles faster (one-off runs of deep models)")
    parser.add_argument("--output", help="write JSONL results here instead of printing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    enable_compilation_cache()
    try:
        sampler = _sampler_from_args(args)
        generator = load_generator(args.model, args.adapter, dtype=args.dtype, tokenizer=args.tokenizer,
                                   max_batch_size=args.batch_size, layer_loop=args.layer_loop)
        prompts = _prompts_from_args(args, generator.tokenizer)
    except (GenerationError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    completions = generator.generate([p for _, p in prompts], args.max_new_tokens, sampler, args.stop, args.seed)
    elapsed = time.perf_counter() - started
    total = sum(c.completion_tokens for c in completions)
    out = open(args.output, "w", encoding="utf-8") if args.output else None
    for (record_id, _), completion in zip(prompts, completions):
        if out is not None:
            row = {"id": record_id, **dataclasses.asdict(completion)}
            row.pop("token_ids")
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            print(f"--- {record_id} ({completion.completion_tokens} tokens, {completion.finish_reason})")
            print(completion.text)
    if out is not None:
        out.close()
    log.info("%d sequences, %d tokens in %.1f s (%.1f tokens/s, compile included)", len(completions), total,
             elapsed, total / max(elapsed, 1e-9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
