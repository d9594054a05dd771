"""How the next token is chosen from the logits: small frozen values with one method each.

Every sampler is a frozen, keyword-only dataclass with one method,
`get_next_tokens(logits [B, V], rng) -> [B] int32`, so a sampling method is a value that can be
passed around, compared, printed and used as a jit argument. The numeric fields (temperature, p)
are pytree leaves: they may be Python floats, or arrays of shape [B] holding one value per row —
that is how the server batches requests that asked for different temperatures into one decode step
without recompiling. `TopK.k` is static (it sets the shape of `lax.top_k`).

`rng` is one PRNG key, or one key per row ([B] keys). The decode loop passes per-row keys derived
from each sequence's seed and its own step count, so a seeded sequence samples the same tokens
whatever else shares its batch.

A temperature of 0 means "take the most likely token", as in OpenAI's API, so a batch mixing greedy
and sampled requests needs no special case.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = -jnp.inf


class Sampler(Protocol):
    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        ...


def _check_range(name: str, value, low: float, high: float, *, low_open: bool = False) -> None:
    """Validates Python / numpy values when a sampler is built; jax arrays (traced or per-row values
    built by the caller) and placeholders made by pytree utilities are left alone."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number, np.ndarray)):
        return
    values = np.asarray(value, dtype=np.float64)
    bad = (values <= low) if low_open else (values < low)
    bad |= values > high
    if bad.any() or np.isnan(values).any():
        bracket = "(" if low_open else "["
        raise ValueError(f"{name}={value!r} is outside {bracket}{low}, {high}]")


def _per_row(value, batch: int) -> jax.Array:  # [] or [B] -> [B, 1]
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (batch,))[:, None]


def _categorical(rng: jax.Array, logits: jax.Array) -> jax.Array:  # [B, V] -> [B]
    """One draw per row from softmax(logits), by inverting the cumulative distribution.

    This needs one uniform number per row instead of the V Gumbel numbers of
    `jax.random.categorical`: generating 49k random numbers per row per step costs more than the
    rest of a small model's decode step on CPU, and compiles slowly. With per-row keys ([B]) each
    row uses its own key.
    """
    batch = logits.shape[0]
    if rng.ndim == 0:
        uniform = jax.random.uniform(rng, (batch,))
    else:
        uniform = jax.vmap(lambda key: jax.random.uniform(key, ()))(rng)
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)  # [B, V], nondecreasing
    # The first token whose cumulative probability exceeds u (zero-probability tokens never are).
    index = jnp.sum(cdf <= uniform[:, None] * cdf[:, -1:], axis=-1)
    return jnp.where(index < logits.shape[-1], index, jnp.argmax(logits, axis=-1))  # u*total rounded up to total


def _scale(logits: jax.Array, temperature: jax.Array) -> jax.Array:  # [B, V], [B, 1] -> [B, V]
    return logits / jnp.maximum(temperature, 1e-6)  # rows with temperature 0 are taken greedily anyway


def _greedy_or_sample(
    logits: jax.Array, scaled: jax.Array, temperature: jax.Array, rng: jax.Array
) -> jax.Array:  # [B, V], [B, V], [B, 1] -> [B]
    """A draw from softmax(scaled) per row; rows with temperature 0 take the argmax of `logits`."""
    greedy = jnp.argmax(logits, axis=-1)
    return jnp.where(temperature[:, 0] > 0, _categorical(rng, scaled), greedy).astype(jnp.int32)


@flax.struct.dataclass(kw_only=True)
class Greedy:
    """The most likely token, always (deterministic; ignores rng)."""

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        del rng
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@flax.struct.dataclass(kw_only=True)
class Temperature:
    """Samples softmax(logits / temperature); temperature 0 is greedy."""

    temperature: float | jax.Array = 1.0  # [] or [B]

    def __post_init__(self) -> None:
        _check_range("temperature", self.temperature, 0.0, 100.0)

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        temperature = _per_row(self.temperature, logits.shape[0])
        return _greedy_or_sample(logits, _scale(logits, temperature), temperature, rng)


@flax.struct.dataclass(kw_only=True)
class TopK:
    """Samples among the k most likely tokens, after dividing the logits by temperature."""

    k: int = flax.struct.field(pytree_node=False, default=40)
    temperature: float | jax.Array = 1.0  # [] or [B]

    def __post_init__(self) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k={self.k!r} must be a positive int")
        _check_range("temperature", self.temperature, 0.0, 100.0)

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        k = min(self.k, logits.shape[-1])
        kth_largest = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
        temperature = _per_row(self.temperature, logits.shape[0])
        kept = jnp.where(logits >= kth_largest, _scale(logits, temperature), _NEG_INF)
        return _greedy_or_sample(logits, kept, temperature, rng)


@flax.struct.dataclass(kw_only=True)
class TopP:
    """Nucleus sampling: the smallest set of most likely tokens whose probability reaches p.

    Probabilities are those of logits / temperature. p = 1 keeps every token (plain temperature
    sampling); the sort over the vocabulary is skipped when every row has p = 1 or temperature 0.
    """

    p: float | jax.Array = 0.9  # [] or [B], in (0, 1]
    temperature: float | jax.Array = 1.0  # [] or [B]

    def __post_init__(self) -> None:
        _check_range("p", self.p, 0.0, 1.0, low_open=True)
        _check_range("temperature", self.temperature, 0.0, 100.0)

    def get_next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:  # [B, V] -> [B]
        batch = logits.shape[0]
        temperature, p = _per_row(self.temperature, batch), _per_row(self.p, batch)
        scaled = _scale(logits, temperature)
        needs_nucleus = jnp.any((p < 1.0) & (temperature > 0))
        kept = jax.lax.cond(needs_nucleus, _nucleus, lambda unchanged, _: unchanged, scaled, p)
        return _greedy_or_sample(logits, kept, temperature, rng)


def _nucleus(scaled: jax.Array, p: jax.Array) -> jax.Array:  # [B, V], [B, 1] -> [B, V]
    """Masks (to -inf) every token outside the smallest top set whose probability sum reaches p."""
    sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the strictly more likely tokens
    kept_count = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # >= 1: the top token always stays
    cutoff = jnp.take_along_axis(sorted_logits, kept_count - 1, axis=-1)  # [B, 1], smallest kept logit
    return jnp.where(scaled >= cutoff, scaled, _NEG_INF)


def from_settings(temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0) -> Sampler:
    """The sampler for user settings (CLI flags, evaluation settings, server requests).

    Temperature 0 is greedy whatever the other settings; otherwise top-k when `top_k` > 0 (it takes
    precedence over `top_p`), nucleus sampling when `top_p` < 1, else plain temperature sampling.
    Out-of-range values raise ValueError naming the setting.
    """
    if top_k < 0:
        raise ValueError(f"top_k={top_k!r} must be >= 0 (0 = no top-k cut)")
    if temperature == 0:
        return Greedy()
    if top_k:
        return TopK(k=int(top_k), temperature=float(temperature))
    if top_p < 1:
        return TopP(p=float(top_p), temperature=float(temperature))
    return Temperature(temperature=float(temperature))


def from_openai(*, temperature: float | None, top_p: float | None) -> TopP:
    """The sampler for OpenAI-style request fields (defaults: temperature 1, top_p 1)."""
    return TopP(p=1.0 if top_p is None else float(top_p), temperature=1.0 if temperature is None else float(temperature))


def describe(sampler: Sampler) -> str:
    """A short human-readable form, e.g. for logs and benchmark tables."""
    fields = {f.name: getattr(sampler, f.name) for f in dataclasses.fields(sampler)}  # type: ignore[arg-type]
    inner = ", ".join(f"{name}={value}" for name, value in fields.items())
    return f"{type(sampler).__name__}({inner})"
