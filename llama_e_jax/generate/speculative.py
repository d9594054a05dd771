"""Speculative decoding with prompt-lookup drafts: several tokens per forward pass, same output.

E-commerce outputs copy their inputs (a title reuses the product's words, an answer quotes the
evidence, an ad repeats brand and price), so the next tokens can often be guessed from the text
itself: find the row's last n tokens earlier in its prompt or output, and propose the k tokens that
followed them there ("prompt lookup", vLLM's `ngram` speculation). One forward pass over the pending
token and the k drafts then yields the model's own choice at all k+1 positions; the drafts that agree
with those choices are kept, and the first disagreement is replaced by the model's choice. On CPU at
small batch a pass over k+1 positions costs little more than one over a single position (decoding is
bound by reading the weights), so every accepted draft is a step saved.

Design, and why:

* **Drafts on device, from a token history.** Each row keeps `history` [B, S]: slot p holds the token
  at position p (prompt, then generated text), valid below cache length + 1 (the pending token sits at
  the cache length). `propose` is pure jnp: for n from `ngram_max` down to `ngram_min` it compares the
  last n tokens against every earlier window ([B, S] comparisons per n, nothing next to a matmul) and
  takes the earliest match of the longest n that matches anywhere; the k tokens after it that are
  already known are the drafts. No host round trip, no dynamic shapes: a row without a match simply
  proposes 0 drafts. The history only guides speed: any draft, right or wrong, gives the same output.
* **Verification is the model's own forward pass** (`Llama.apply` with the `KVCache`) over k+1
  positions per row. Draft slots beyond a row's proposal, or beyond the cache, get segment id 0, so
  they write nowhere.
* **Acceptance reuses the decoder's own token step.** For j = 0..k the caller's `emit(state, logits_j,
  emitting)` samples and books a token exactly as a plain decode step does (EOS, stop strings, token
  budget, guided-decoding automata, per-row keys folded with the row's token count), for the rows
  whose drafts agreed so far. A row keeps going while its sampled token equals the draft fed at the
  next position. So stopping conditions inside an accepted run behave as without speculation, and a
  greedy row emits exactly the plain greedy tokens.
* **Sampling keeps the output distribution.** With a deterministic draft x (the proposal q is a point
  mass), the speculative-sampling rule is: accept x with probability min(1, p(x)/q(x)) = p(x); on
  rejection, draw from the residual (p - q)+, i.e. from p with x removed, renormalised. Drawing
  y ~ p and accepting iff y == x is exactly that rule: P(accept) = p(x), and given y != x, y is
  distributed as p restricted to the other tokens. So `emit` samples from p at every position as the
  plain decoder does, with the same per-row key (the row's token count advances by one per emitted
  token), and a seeded row yields the same tokens as without speculation.
* **Rollback is setting lengths back.** The cache's slot p holds position p and is valid below
  `lengths`, so after a pass that wrote k+1 slots, a row that emitted m tokens keeps the m slots of
  the pending token and its m-1 accepted drafts (the m-th emitted token is the new pending one); the
  rejected slots are masked and overwritten later. Shapes stay static: per-row counts and masks.
* **Off costs nothing.** The plain decode loop is untouched; this module is only traced into the
  speculative loop (k >= 1).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from llama_e_jax.model.llama import KVCache, Llama


State = TypeVar("State")
# emit(state, logits [B, V], emitting [B] bool) -> (state with the token booked where emitting, tokens [B])
EmitFn = Callable[[State, jax.Array, jax.Array], tuple[State, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Speculation:
    """How drafts are proposed (a static, hashable jit argument).

    num_draft: k, draft tokens verified per forward pass (0 = speculation off).
    ngram_max / ngram_min: the longest / shortest suffix of the row's text looked up in its history;
      longer n-grams are tried first (fewer false matches), shorter ones only when no longer one matches.
    max_rows: a decode chunk with more occupied rows than this decodes plainly (the session decides,
      per chunk). Verifying k+1 positions of many rows is compute-bound on a CPU: SmolLM2 on 2 cores,
      batch 16, a pass over 5 positions took 2.1x one over 1, more than the ~2 tokens per step that
      prompt-lookup drafts gain (batch 1: 1.6x for 5 positions). XLA:CPU's matmuls cost the same for
      1 and 2 rows and ~1.55x for 3 to 5 (a [M, 576] x [576, 1536] product), and the tied output layer
      [M, 576] x [49152, 576]^T takes 15 ms at M=1, 21 ms at M=16 and 138 ms at M=80 (16 rows x 5).
    """

    num_draft: int = 8
    ngram_max: int = 3
    ngram_min: int = 1
    max_rows: int = 8

    def __post_init__(self) -> None:
        if not isinstance(self.num_draft, int) or self.num_draft < 0:
            raise ValueError(f"speculative num_draft={self.num_draft!r} must be an int >= 0 (0 = off)")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"speculative n-gram sizes must satisfy 1 <= ngram_min ({self.ngram_min}) "
                             f"<= ngram_max ({self.ngram_max})")

    @property
    def enabled(self) -> bool:
        return self.num_draft > 0

    def for_rows(self, rows: int) -> "Speculation":
        """What a decode chunk over `rows` occupied rows uses: self, or OFF past `max_rows`."""
        return self if rows <= self.max_rows else OFF


OFF = Speculation(num_draft=0)
# The measured setting (docs/benchmarks.md, "Speculative decoding"): SmolLM2-135M on 2 CPU cores, real
# test-split prompts of all five tasks, CPU time per token (load ~10). One row: k 1/2/3/4 ran
# 1.28/1.34/1.37/1.36x plain decoding (acceptance 1.58/1.92/2.22/2.36 tokens per pass). More rows lose:
# 4 rows k 4 ran 0.85x, 8 rows k 1/2 1.03/0.95x, 16 rows k 1/2 0.94/0.88x (a pass over rows x (k+1)
# positions is compute-bound), hence speculation only while a single row decodes.
PROMPT_LOOKUP = Speculation(num_draft=4, ngram_max=3, ngram_min=1, max_rows=1)
# Library default: off, so that a program (or a test) decodes one token per step unless it asks.
DEFAULT = OFF
# The command lines (generate, serve, evaluate) default to the measured setting, where it pays
# (`max_rows`); `--no-speculative` turns it off. Output is identical either way.
COMMAND_LINE_DEFAULT = PROMPT_LOOKUP


def propose(history: jax.Array, num_valid: jax.Array, speculation: Speculation) -> tuple[jax.Array, jax.Array]:
    """Prompt-lookup drafts: (drafts [B, k] int32, num_drafts [B] int32).

    history: [B, S] tokens by position; only the first num_valid [B] entries of a row are read.
    A row's drafts are the tokens that followed the earliest earlier occurrence of its last n tokens,
    for the largest n in [ngram_min, ngram_max] that occurs; only known tokens (index < num_valid)
    are proposed. Rows without a match get num_drafts 0 (their drafts are arbitrary).
    """
    batch, slots = history.shape
    k = speculation.num_draft
    ends = jnp.arange(slots, dtype=jnp.int32)[None, :]  # [1, S]: a match ending just before slot e
    start = jnp.full((batch,), -1, jnp.int32)  # where the drafts begin; -1 = no match yet
    for n in range(speculation.ngram_max, speculation.ngram_min - 1, -1):
        suffix_at = jnp.clip(num_valid[:, None] - n + jnp.arange(n, dtype=jnp.int32), 0, slots - 1)  # [B, n]
        suffix = jnp.take_along_axis(history, suffix_at, axis=1)
        matches = (ends >= n) & (ends < num_valid[:, None])  # the window [e-n, e) lies before the suffix's end
        for i in range(n):
            # window_i[b, e] = history[b, e - n + i]
            window_i = jnp.pad(history, ((0, 0), (n - i, 0)), constant_values=-1)[:, :slots]
            matches &= window_i == suffix[:, i:i + 1]
        found = jnp.any(matches, axis=1)
        start = jnp.where((start < 0) & found, jnp.argmax(matches, axis=1).astype(jnp.int32), start)
    draft_at = jnp.clip(start[:, None] + jnp.arange(k, dtype=jnp.int32), 0, slots - 1)  # [B, k]
    drafts = jnp.take_along_axis(history, draft_at, axis=1)
    num_drafts = jnp.where(start >= 0, jnp.clip(num_valid - start, 0, k), 0).astype(jnp.int32)
    return drafts, num_drafts


def verify(
    model: Llama,
    weights: dict,
    cache: KVCache,
    tokens: jax.Array,  # [B] each row's pending token, at position cache.lengths
    drafts: jax.Array,  # [B, k]
    num_drafts: jax.Array,  # [B]
    active: jax.Array,  # [B] bool
    adapter_ids: jax.Array | None = None,  # [B] int32 stacked-adapter slots (model/adapter_stack.py)
) -> tuple[jax.Array, KVCache]:  # logits [B, k+1, V], cache with k+1 slots written per active row
    """One forward pass over each row's pending token and its drafts, through the model's own apply.

    Logits j predict the token after input j. Inactive rows, missing drafts and slots past the cache
    write nowhere (segment id 0). The returned cache's lengths cover everything written: `rollback`
    sets them to what was accepted.
    """
    k = drafts.shape[1]
    ids = jnp.concatenate([tokens[:, None], drafts], axis=1).astype(jnp.int32)  # [B, k+1]
    offsets = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    positions = cache.lengths[:, None] + offsets
    fed = active[:, None] & (offsets <= num_drafts[:, None]) & (positions < cache.max_length)
    return model.apply({"params": weights}, ids, positions, fed.astype(jnp.int32), cache=cache,
                       adapter_ids=adapter_ids)


def accept(
    state: State,
    logits: jax.Array,  # [B, k+1, V]
    drafts: jax.Array,  # [B, k]
    num_drafts: jax.Array,  # [B]
    active: jax.Array,  # [B] bool, the rows that were fed
    emit: EmitFn,
) -> tuple[State, jax.Array, jax.Array]:
    """Books, per row, the model's token at each position while the drafts before it were accepted.

    Returns (state, tokens [B, k+1] int32 with -1 where nothing was emitted, num_emitted [B]).
    Position j is emitted when the row is still active (`emit` ends rows at EOS, stop or budget) and
    drafts 0..j-1 were each equal to the token emitted before them.
    """
    k = drafts.shape[1]
    agreeing = active
    emitted = []
    for j in range(k + 1):
        emitting = agreeing & _is_active(state)
        state, tokens = emit(state, logits[:, j], emitting)
        emitted.append(jnp.where(emitting, tokens, -1))
        if j < k:
            agreeing = emitting & (j < num_drafts) & (tokens == drafts[:, j])
    emitted = jnp.stack(emitted, axis=1).astype(jnp.int32)
    return state, emitted, jnp.sum(emitted >= 0, axis=1).astype(jnp.int32)


def _is_active(state: Any) -> jax.Array:
    return state.active


def rollback(cache: KVCache, start_lengths: jax.Array, num_emitted: jax.Array) -> KVCache:
    """Keeps, per row, the slots of the pending token and the accepted drafts: a row that emitted m
    tokens keeps m of the slots written from `start_lengths` [B] (m = 0 keeps none)."""
    return cache.replace(lengths=(start_lengths + num_emitted).astype(jnp.int32))


def record_history(history: jax.Array, start_lengths: jax.Array, emitted: jax.Array) -> jax.Array:
    """Writes emitted tokens [B, k+1] (-1 = none) at positions start_lengths + 1 + j of history [B, S]."""
    batch, width = emitted.shape
    slots = start_lengths[:, None] + 1 + jnp.arange(width, dtype=jnp.int32)[None, :]
    slots = jnp.where(emitted >= 0, slots, history.shape[1])  # out of range: dropped
    rows = jnp.arange(batch)[:, None]
    return history.at[rows, slots].set(emitted, mode="drop")


def step(
    model: Llama,
    weights: dict,
    state: State,
    speculation: Speculation,
    emit: EmitFn,
) -> tuple[State, jax.Array]:
    """One speculative decode step: propose, verify in one pass, accept, roll back, record.

    `state` is the decoder's state: it must have `cache` (KVCache), `tokens` [B] (pending tokens, at
    position cache.lengths), `active` [B] and `history` [B, S] fields. Returns (state, emitted
    [B, k+1], -1 where nothing was emitted).
    """
    cache, active = state.cache, state.active
    start = cache.lengths
    drafts, num_drafts = propose(state.history, start + 1, speculation)
    logits, cache = verify(model, weights, cache, state.tokens, drafts, num_drafts, active,
                           getattr(state, "adapter", None))
    state = state.replace(cache=cache)
    state, emitted, num_emitted = accept(state, logits, drafts, num_drafts, active, emit)
    return state.replace(cache=rollback(state.cache, start, num_emitted),
                         history=record_history(state.history, start, emitted)), emitted


def acceptance_lengths(prompt: list[int], output: list[int], speculation: Speculation) -> list[int]:
    """Host replay: the tokens each verify step emits when a greedy decoder with `speculation`
    produced `output` after `prompt` (greedy: a draft is accepted iff it equals the output there).

    The same proposal rule as `propose`, in numpy; for reports (mean acceptance length per task)
    and as an independent check of the device proposal.
    """
    history = list(prompt) + list(output)
    done, lengths = 0, []
    while done < len(output):
        num_valid = len(prompt) + done  # the pending token is the last known one
        drafts = propose_reference(np.asarray(history[:num_valid]), speculation)
        emitted = 1
        for j, draft in enumerate(drafts):
            if done + j + 1 >= len(output) or draft != output[done + j]:
                break
            emitted += 1
        emitted = min(emitted, len(output) - done)
        lengths.append(emitted)
        done += emitted
    return lengths


def propose_reference(known: np.ndarray, speculation: Speculation) -> list[int]:
    """`propose` for one row in plain numpy: the drafts after the earliest earlier match of the
    longest matching suffix (the known tokens are the whole array)."""
    for n in range(speculation.ngram_max, speculation.ngram_min - 1, -1):
        if len(known) < n + 1:
            continue
        suffix = known[-n:]
        for end in range(n, len(known)):
            if np.array_equal(known[end - n:end], suffix):
                return [int(t) for t in known[end:end + speculation.num_draft]]
    return []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speculative-decoding flags shared by generate, serve and evaluate."""
    parser.add_argument("--speculative-k", type=int, default=COMMAND_LINE_DEFAULT.num_draft,
                        help=f"prompt-lookup draft tokens verified per step (default {COMMAND_LINE_DEFAULT.num_draft}, "
                             f"used in decode chunks of at most {COMMAND_LINE_DEFAULT.max_rows} row(s); 0 = off)")
    parser.add_argument("--speculative-ngram", type=int, default=COMMAND_LINE_DEFAULT.ngram_max,
                        help=f"longest n-gram looked up for drafts (default {COMMAND_LINE_DEFAULT.ngram_max})")
    parser.add_argument("--no-speculative", action="store_true", help="decode one token per step (same output)")


def from_arguments(args: argparse.Namespace) -> Speculation:
    """The Speculation the flags of `add_arguments` ask for (a clear ValueError for bad values)."""
    if args.no_speculative or args.speculative_k == 0:
        return OFF
    return dataclasses.replace(COMMAND_LINE_DEFAULT, num_draft=args.speculative_k, ngram_max=args.speculative_ngram,
                               ngram_min=min(COMMAND_LINE_DEFAULT.ngram_min, args.speculative_ngram))
