"""The device side of decoding: the decode state, and the compiled prefill and decode step.

Design, and why:

* One fixed-size cache per session. A `DecodeState` holds B rows of S cache slots; a row is filled
  by a prefill, decodes until it stops, and is then free for the next prompt. Shapes never change
  while decoding, so each compiled function is reused for every prompt, and the server admits new
  requests into free rows between decode chunks (continuous batching) without recompiling.
* Both prefill and the decode step are the model's own `Llama.apply` with its `KVCache`
  (model/llama.py: heads-major [B, K, S, Dh] per layer, unrolled layers from `split_layers`);
  nothing here knows what attention, RoPE or a block is. `layer_loop="scan"` (stacked weights and
  one [L, B, K, S, Dh] cache) also works: it compiles faster but decodes slower.
* Prefill is compiled per (rows, prompt length) bucket — rows in powers of two, lengths in steps of
  at most 1.5x — so a handful of compiles serve all prompts. Prompts are right-padded; padding has
  segment id 0 and writes nowhere. Prefill runs each prompt but its last token against a
  prompt-sized scratch cache (the rows are fresh: the prompt is all there is to attend to) and
  copies it into the rows; the first decode step feeds the last token and samples the first new
  one, so prefill needs neither the output layer (its logits are unused, so XLA drops them) nor the
  sampler, and every token is sampled in one place.
* Decode runs on device: `lax.while_loop` over up to `chunk_size` steps, exiting early when every
  row is done. Each row stops on its own at EOS, at a stop sequence (matched on device, token by
  token, against the stop strings' own tokenizations) or at its token budget. The state is donated,
  so the cache is updated in place: a step writes only the new key/value rows.
* Speculative decoding (speculative.py, on unless the session turns it off): a decode step may
  instead verify k prompt-lookup drafts per row in one forward pass and emit up to k+1 tokens, each
  sampled and booked by the same `_sample` / `_record` as a plain step; a per-row token `history`
  (written by prefill and the speculative step) is what drafts are looked up in. With speculation
  off the plain step below is traced unchanged.
* Sampling: a sampler from sampling.py, with one value per row, and one PRNG key per row derived
  from (seed, sequence index) and folded with the step number: seeded output does not depend on
  what else shares the batch.
* Guided decoding: a row may follow an automaton (choices, a regex, a JSON schema; constraints.py,
  guided.py). The state holds the session's packed tables and each row's automaton state: before
  sampling, a constrained row's logits are masked to what its state allows; after, its state moves
  along the sampled token, and EOS is allowed only where the text is complete. Both run under
  `lax.cond`, so a step with no constrained row does no extra work and unconstrained rows keep their
  logits bit for bit. The tables are a leaf of the (donated) state with fixed capacities: a new
  constraint re-packs them on the host between chunks without a recompile.
* Several adapters (model/adapter_stack.py): when the weights carry stacked adapter tables, each
  row's slot (`DecodeState.adapter`, set at admission from `Admission.adapter`) goes with every
  forward pass (prefill, decode, teacher forcing, speculative verification) as `adapter_ids`;
  weights without tables ignore it, so the merged single-adapter path is unchanged.
* Sharded params (sharding.py) work unchanged: the functions are jitted without placement; each
  layer's slice keeps its parameter's sharding minus the layer axis and the cache is placed by
  `sharding.CACHE_RULES` (batch over data/fsdp, kv heads over tensor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.generate import constraints, speculative
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.llama import KVCache, Llama, is_unrolled


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
      cache: the model's KVCache (layout of the weights: per-layer [B, K, S, Dh] arrays when
        unrolled); its `lengths` [B] are the cache slots filled = position of `tokens`.
      tokens: [B] int32, each row's last sampled token: already emitted, not yet in the cache.
      active: [B] bool, the row is still generating.
      num_generated: [B] int32, tokens sampled so far (EOS and stop tokens included).
      max_new_tokens: [B] int32, the row's budget.
      finish: [B] int32, RUNNING or the FINISHED_* reason.
      recent: [B, W] int32, the last W sampled tokens, right-aligned (-2 before the first).
      stop_ids: [B, M, W] int32, stop sequences right-aligned; -1 pads (matches anything); a stop
        whose last entry is -1 is unused.
      eos_ids: [E] int32, tokens that end a sequence.
      constraint: [B] int32, each row's global automaton state in `tables` (constraints.py);
        constraints.UNCONSTRAINED (-1) for a row without a constraint (and once a row has ended).
      tables: constraints.ConstraintTables, the automata of the session's constrained rows.
      rng: [B] PRNG keys, one per row.
      sampler: the session's sampler with one value per row in each numeric field ([B] leaves).
      history: [B, S] int32, the row's tokens by position (prompt, then generated), valid up to and
        including position cache.lengths; speculative decoding drafts from it (speculative.py). Only
        prefill and the speculative step write it.
      adapter: [B] int32, each row's slot in the stacked adapter tables (model/adapter_stack.py),
        set at admission; 0 = the base. Ignored when the weights have no tables.
    """

    cache: KVCache
    tokens: jax.Array
    active: jax.Array
    num_generated: jax.Array
    max_new_tokens: jax.Array
    finish: jax.Array
    recent: jax.Array
    stop_ids: jax.Array
    eos_ids: jax.Array
    constraint: jax.Array
    tables: constraints.ConstraintTables
    rng: jax.Array
    sampler: Any
    history: jax.Array
    adapter: jax.Array

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_length(self) -> int:
        return self.cache.max_length


@flax.struct.dataclass
class Admission:
    """What prefill needs to start b new rows (b bucketed; padding rows have row index B).

    prompt_ids: [b, T] each prompt but its last token, right-padded; prompt_lengths: [b] their
    lengths (prompt length - 1, may be 0); last_tokens: [b] each prompt's last token, which the first
    decode step feeds; rows: [b] target rows; max_new_tokens: [b]; seeds / streams: [b] uint32, the
    row key is fold_in(key(seed), stream); stop_ids: [b, M, W]; constraint: [b] initial automaton
    states (constraints.UNCONSTRAINED for none); sampler: the rows' sampler values ([b] leaves);
    adapter: [b] int32 adapter slots (0 = base).
    """

    prompt_ids: jax.Array
    prompt_lengths: jax.Array
    last_tokens: jax.Array
    rows: jax.Array
    max_new_tokens: jax.Array
    seeds: jax.Array
    streams: jax.Array
    stop_ids: jax.Array
    constraint: jax.Array
    sampler: Any
    adapter: jax.Array


# ============================================================================= the forward pass


def _model(config: LlamaConfig, weights: dict) -> Llama:
    """The model in the weights' layout (unrolled after `split_layers`, else scanned); no adapter:
    it is merged into the weights."""
    return Llama(config, layer_loop="unroll" if is_unrolled(weights) else "scan")


def _decode_logits(config: LlamaConfig, weights: dict, state: DecodeState) -> tuple[jax.Array, KVCache]:
    """Feeds each active row's `tokens` at position `lengths`; returns (logits [B, V], new cache).
    Inactive rows have segment id 0: they write nowhere and their lengths stay."""
    cache = state.cache
    logits, cache = _model(config, weights).apply(
        {"params": weights}, state.tokens[:, None], cache.lengths[:, None], state.active[:, None].astype(jnp.int32),
        cache=cache, adapter_ids=jnp.where(state.active, state.adapter, 0))  # ended rows: base (see lora.py)
    return logits[:, 0], cache


def _prefill_cache(config: LlamaConfig, weights: dict, state: DecodeState, admission: Admission) -> KVCache:
    """Runs the prompts (all but their last token) through the model on a prompt-sized scratch
    cache and copies it into rows `admission.rows` of the state's cache (padding rows, index B,
    are dropped). Returns the new cache."""
    ids, prompt_lengths = admission.prompt_ids, admission.prompt_lengths  # [b, T], [b]
    rows_in, prompt_len = ids.shape
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), ids.shape)
    segments = (positions < prompt_lengths[:, None]).astype(jnp.int32)
    model = _model(config, weights)
    scratch = KVCache.zeros(config, rows_in, prompt_len, layer_loop=model.layer_loop,
                            dtype=jax.tree.leaves(state.cache.keys)[0].dtype)
    _, scratch = model.apply({"params": weights}, ids, positions, segments, cache=scratch,
                             adapter_ids=admission.adapter)

    def put_rows(full: jax.Array, part: jax.Array) -> jax.Array:
        # [B, K, S, Dh] <- [b, K, T, Dh] per layer, or stacked with a leading L.
        if full.ndim == 5:
            return full.at[:, admission.rows, :, :prompt_len].set(part, mode="drop")
        return full.at[admission.rows, :, :prompt_len].set(part, mode="drop")

    cache = state.cache
    return cache.replace(keys=jax.tree.map(put_rows, cache.keys, scratch.keys),
                         values=jax.tree.map(put_rows, cache.values, scratch.values),
                         lengths=cache.lengths.at[admission.rows].set(prompt_lengths, mode="drop"))


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
    reason = jnp.where(is_eos, FINISHED_EOS, jnp.where(hit_stop, FINISHED_STOP, FINISHED_LENGTH))
    ending = emitting & (is_eos | hit_stop | at_budget)
    moved = constraints.advance(state.tables, state.constraint, new_tokens)
    # An ended row drops its constraint, so later steps of the chunk skip the masking when no
    # constrained row is left.
    constraint = jnp.where(ending, constraints.UNCONSTRAINED, jnp.where(emitting, moved, state.constraint))
    return state.replace(
        tokens=jnp.where(emitting, new_tokens, state.tokens),
        num_generated=num_generated,
        recent=recent,
        constraint=constraint,
        finish=jnp.where(ending, reason, state.finish).astype(jnp.int32),
        active=state.active & ~ending,
    )


def _sample(state: DecodeState, logits: jax.Array) -> jax.Array:  # [B, V] -> [B]
    # Unconstrained rows keep their logits bit for bit (and with no constrained row, no work is done).
    logits = constraints.constrain_logits(state.tables, state.constraint, logits)
    return state.sampler.get_next_tokens(logits, _step_keys(state))


# ============================================================================= compiled entry points


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def prefill(config: LlamaConfig, weights: dict, state: DecodeState, admission: Admission) -> DecodeState:
    """Starts the admitted rows: fills their cache with the prompt and sets up their decoding.

    Each row's prompt minus its last token goes into the cache; the last token is left pending in
    `tokens`, so the row's first decode step feeds it and samples the first new token (with key
    fold_in(row key, 0)). Prefill thus compiles without the sampler or the output layer.
    """
    cache = _prefill_cache(config, weights, state, admission)
    rows = admission.rows
    row_keys = jax.vmap(lambda seed, stream: jax.random.fold_in(jax.random.key(seed), stream))(
        admission.seeds, admission.streams)

    def put(full, new):
        return full.at[rows].set(new.astype(full.dtype), mode="drop")

    history = state.history.at[rows, :admission.prompt_ids.shape[1]].set(admission.prompt_ids, mode="drop")
    history = history.at[rows, admission.prompt_lengths].set(admission.last_tokens, mode="drop")
    return state.replace(
        cache=cache,
        history=history,
        tokens=put(state.tokens, admission.last_tokens),
        active=put(state.active, jnp.ones_like(rows, bool)),
        num_generated=put(state.num_generated, jnp.zeros_like(rows)),
        max_new_tokens=put(state.max_new_tokens, admission.max_new_tokens),
        finish=put(state.finish, jnp.zeros_like(rows)),
        recent=put(state.recent, jnp.full((rows.shape[0], state.recent.shape[1]), -2, jnp.int32)),
        stop_ids=put(state.stop_ids, admission.stop_ids),
        constraint=put(state.constraint, admission.constraint),
        rng=state.rng.at[rows].set(row_keys, mode="drop"),
        sampler=jax.tree.map(put, state.sampler, admission.sampler),
        adapter=put(state.adapter, admission.adapter),
    )


@functools.partial(jax.jit, static_argnames=("config", "chunk_size", "speculation"), donate_argnames=("state",))
def decode_chunk(config: LlamaConfig, weights: dict, state: DecodeState, chunk_size: int,
                 speculation: speculative.Speculation = speculative.OFF):
    """Up to `chunk_size` decode steps on device, stopping early once no row is active.

    Returns (state, emitted [B, chunk_size] int32): step i's token per row, -1 where the row was not
    generating. With `speculation` enabled (k drafts), each step is speculative.step and emits up to
    k+1 tokens per row: emitted is [B, chunk_size * (k+1)], step i's tokens in columns i(k+1)...,
    -1 where nothing was emitted.
    """
    if speculation.enabled:
        return _speculative_chunk(config, weights, state, chunk_size, speculation)

    def step(carry):
        i, state, emitted = carry
        logits, cache = _decode_logits(config, weights, state)
        was_active = state.active
        state = state.replace(cache=cache)
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


def _emit(state: DecodeState, logits: jax.Array, emitting: jax.Array) -> tuple[DecodeState, jax.Array]:
    """A plain decode step's sampling and booking, for one verified position (speculative.accept)."""
    new_tokens = _sample(state, logits)
    return _record(state, new_tokens, emitting), new_tokens


def _speculative_chunk(config: LlamaConfig, weights: dict, state: DecodeState, chunk_size: int,
                       speculation: speculative.Speculation):
    """decode_chunk with speculative steps (see speculative.py): same stopping, wider `emitted`."""
    width = speculation.num_draft + 1
    model = _model(config, weights)

    def step(carry):
        i, state, emitted = carry
        state, tokens = speculative.step(model, weights, state, speculation, _emit)
        return i + 1, state, jax.lax.dynamic_update_slice(emitted, tokens, (0, i * width))

    def not_done(carry):
        i, state, _ = carry
        return (i < chunk_size) & jnp.any(state.active)

    emitted = jnp.full((state.batch_size, chunk_size * width), -1, jnp.int32)
    _, state, emitted = jax.lax.while_loop(not_done, step, (jnp.int32(0), state, emitted))
    return state, emitted


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def feed_tokens(config: LlamaConfig, weights: dict, state: DecodeState, tokens: jax.Array):
    """Teacher forcing: feeds `tokens` [B] to the active rows and returns (state, logits [B, V]).

    The logits predict the token after `tokens`; nothing is sampled or booked, so this scores given
    continuations (e.g. label options) one token at a time.
    """
    state = state.replace(tokens=tokens.astype(jnp.int32))
    logits, cache = _decode_logits(config, weights, state)
    return state.replace(cache=cache), logits


@functools.partial(jax.jit, donate_argnames=("state",))
def release_rows(state: DecodeState, released: jax.Array) -> DecodeState:
    """Stops the rows where `released` [B] is true (the host found a stop string in their text)."""
    return state.replace(active=state.active & ~released,
                         constraint=jnp.where(released, constraints.UNCONSTRAINED, state.constraint))


def _weights_mesh(weights: dict) -> jax.sharding.Mesh | None:
    """The mesh the (sharded) weights live on, or None."""
    leaf_sharding = getattr(jax.tree.leaves(weights["layers"])[0], "sharding", None)
    return leaf_sharding.mesh if isinstance(leaf_sharding, jax.sharding.NamedSharding) else None


def new_state(
    config: LlamaConfig,
    weights: dict,
    batch_size: int,
    max_length: int,
    sampler: Any,
    eos_ids: Sequence[int],
    tables: constraints.ConstraintTables | None = None,
) -> DecodeState:
    """An empty session: no active rows, a zeroed cache (in the weights' layer layout) placed by
    the cache rules when the weights are sharded.

    `tables`: the session's (empty) constraint tables at its capacities (guided.PackedGuides); default:
    the smallest empty tables.
    """
    def per_row(dtype=jnp.int32):  # a distinct buffer per field: the state is donated leaf by leaf
        return jnp.zeros((batch_size,), dtype)

    return DecodeState(
        cache=KVCache.zeros(config, batch_size, max_length, layer_loop=_model(config, weights).layer_loop,
                            mesh=_weights_mesh(weights)),
        tokens=per_row(),
        active=per_row(bool),
        num_generated=per_row(),
        max_new_tokens=per_row(),
        finish=per_row(),
        recent=jnp.full((batch_size, STOP_WINDOW), -2, jnp.int32),
        stop_ids=jnp.full((batch_size, MAX_DEVICE_STOPS, STOP_WINDOW), -1, jnp.int32),
        eos_ids=jnp.asarray(sorted(set(eos_ids)) or [-1], jnp.int32),
        constraint=jnp.full((batch_size,), constraints.UNCONSTRAINED, jnp.int32),
        tables=tables if tables is not None else constraints.pack([], vocab_size=config.vocab_size)[0],
        rng=jax.random.split(jax.random.key(0), batch_size),
        sampler=sampler_rows([sampler], batch_size),
        history=jnp.zeros((batch_size, max_length), jnp.int32),
        adapter=per_row(),
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

