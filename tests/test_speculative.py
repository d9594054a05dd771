"""Speculative decoding with prompt-lookup drafts (generate/speculative.py).

* `propose` against a plain-Python reference on random and repetitive histories.
* Greedy: the speculative loop emits exactly the plain greedy tokens (tiny random models, mixed
  prompt lengths, rows ending at EOS or their budget inside an accepted run).
* Sampling: the distribution of sampled continuations matches the model's exact distribution
  (chi-square test with a stated false-alarm probability).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from llama_e_jax.generate import sampling, speculative
from llama_e_jax.generate.speculative import Speculation
from llama_e_jax.model.llama import KVCache, Llama, split_layers

from conftest import random_params


# ----------------------------------------------------------------------------- proposal


@pytest.mark.parametrize("spec", [Speculation(4, 3, 1), Speculation(3, 2, 2), Speculation(6, 1, 1)])
def test_propose_matches_reference(spec):
    rng = np.random.default_rng(0)
    batch, slots = 24, 40
    # Small alphabets make matches common; a periodic row makes long ones.
    history = rng.integers(0, 5, size=(batch, slots)).astype(np.int32)
    history[0] = np.tile([7, 8, 9], slots // 3 + 1)[:slots]
    num_valid = rng.integers(1, slots + 1, size=(batch,)).astype(np.int32)
    num_valid[0] = 20
    drafts, num_drafts = jax.jit(speculative.propose, static_argnums=2)(jnp.asarray(history), jnp.asarray(num_valid),
                                                                      spec)
    drafts, num_drafts = np.asarray(drafts), np.asarray(num_drafts)
    for row in range(batch):
        expected = speculative.propose_reference(history[row, :num_valid[row]], spec)
        assert num_drafts[row] == len(expected), row
        assert drafts[row, :num_drafts[row]].tolist() == expected, row
    # The periodic row continues its period with a full set of drafts.
    assert drafts[0].tolist() == [history[0, 20 + j] for j in range(spec.num_draft)]
    assert num_drafts.sum() > 0


def test_propose_ignores_tokens_past_the_valid_ones():
    spec = Speculation(4, 2, 1)
    history = jnp.asarray([[5, 6, 1, 2, 3, 5, 6, 40, 41, 42]], jnp.int32)
    # Known: 5 6 1 2 3 5 6 -> suffix "5 6" matched at the start, drafts 1 2 3 5 (all known).
    drafts, count = speculative.propose(history, jnp.asarray([7]), spec)
    assert count.tolist() == [4] and drafts[0].tolist() == [1, 2, 3, 5]
    # Known: 5 6 1 2 3 5 -> suffix "3 5" not earlier, "5" at index 0: drafts 6 1 2 3 (tokens 40.. never).
    drafts, count = speculative.propose(history, jnp.asarray([6]), spec)
    assert count.tolist() == [4] and drafts[0].tolist() == [6, 1, 2, 3]
    # Only the tokens already known are proposed: suffix "1" at index 2 is the last token itself.
    drafts, count = speculative.propose(jnp.asarray([[9, 1, 9, 1, 0, 0]], jnp.int32), jnp.asarray([3]), spec)
    assert count.tolist() == [2] and drafts[0, :2].tolist() == [1, 9]
    drafts, count = speculative.propose(history, jnp.asarray([1]), spec)
    assert count.tolist() == [0]


def test_speculation_settings_are_checked():
    with pytest.raises(ValueError, match="num_draft"):
        Speculation(-1)
    with pytest.raises(ValueError, match="ngram_min"):
        Speculation(4, ngram_max=1, ngram_min=2)
    assert not speculative.OFF.enabled and Speculation().enabled


# ----------------------------------------------------------------------------- a minimal decoder


@flax.struct.dataclass
class MiniState:
    """The fields speculative.step needs, plus a budget: a stand-in for kernels.DecodeState."""

    cache: KVCache
    tokens: jax.Array  # [B] pending tokens
    active: jax.Array  # [B] bool
    history: jax.Array  # [B, S]
    num_generated: jax.Array  # [B]
    max_new_tokens: jax.Array  # [B]
    rng: jax.Array  # [B] keys
    sampler: object


EOS = 2


def _emit(state: MiniState, logits: jax.Array, emitting: jax.Array):
    """Sample (per-row key folded with the row's token count) and book: ends rows at EOS / budget."""
    keys = jax.vmap(jax.random.fold_in)(state.rng, state.num_generated)
    tokens = state.sampler.get_next_tokens(logits, keys)
    num_generated = state.num_generated + emitting.astype(jnp.int32)
    ending = emitting & ((tokens == EOS) | (num_generated >= state.max_new_tokens))
    return state.replace(tokens=jnp.where(emitting, tokens, state.tokens), num_generated=num_generated,
                         active=state.active & ~ending), tokens


def _start(config, weights, prompts, budgets, slots, sampler, seed=0) -> MiniState:
    """Prefill: each prompt but its last token into a fresh cache; the last token is pending."""
    batch = len(prompts)
    width = max(len(p) for p in prompts)
    ids = np.zeros((batch, width), np.int32)
    history = np.zeros((batch, slots), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt) - 1] = prompt[:-1]
        history[row, :len(prompt)] = prompt
    lengths = np.asarray([len(p) - 1 for p in prompts], np.int32)
    segments = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
    model = Llama(config, layer_loop="unroll")
    cache = KVCache.zeros(config, batch, slots, layer_loop="unroll")
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), (batch, width))
    _, cache = model.apply({"params": weights}, jnp.asarray(ids), positions, jnp.asarray(segments), cache=cache)
    cache = cache.replace(lengths=jnp.asarray(lengths))
    return MiniState(cache=cache, tokens=jnp.asarray([p[-1] for p in prompts], jnp.int32),
                     active=jnp.ones((batch,), bool), history=jnp.asarray(history),
                     num_generated=jnp.zeros((batch,), jnp.int32), max_new_tokens=jnp.asarray(budgets, jnp.int32),
                     rng=jax.random.split(jax.random.key(seed), batch), sampler=sampler)


@functools.partial(jax.jit, static_argnames=("config", "spec"))
def _step(config, weights, state: MiniState, spec: Speculation):
    model = Llama(config, layer_loop="unroll")
    if spec.enabled:
        return speculative.step(model, weights, state, spec, _emit)
    # The plain step, as kernels.decode_chunk: one position per row.
    logits, cache = model.apply({"params": weights}, state.tokens[:, None], state.cache.lengths[:, None],
                                state.active[:, None].astype(jnp.int32), cache=state.cache)
    was_active = state.active
    state, tokens = _emit(state.replace(cache=cache), logits[:, 0], was_active)
    return state, jnp.where(was_active, tokens, -1)[:, None]


def _decode(config, weights, prompts, budgets, spec, sampler=sampling.Greedy(), slots=64, seed=0):
    """Runs to completion; returns (tokens per row, emitted-count per step per row)."""
    state = _start(config, weights, prompts, budgets, slots, sampler, seed)
    outputs = [[] for _ in prompts]
    per_step = []
    while bool(jnp.any(state.active)):
        state, emitted = _step(config, weights, state, spec)
        emitted = np.asarray(emitted)
        per_step.append((emitted >= 0).sum(axis=1))
        for row, tokens in enumerate(emitted):
            outputs[row].extend(int(t) for t in tokens if t >= 0)
    return outputs, np.asarray(per_step)


@pytest.fixture(scope="module")
def tiny_model():
    from llama_e_jax.model.config import LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8, rope_theta=10000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=128, bos_token_id=1, eos_token_ids=(EOS,))
    weights = jax.tree.map(jnp.asarray, split_layers(random_params(config, seed=3)))
    return config, weights


def _repetitive_prompts(rng, count, vocab=32):
    """Prompts with repeated phrases (what drafts are made from), of mixed lengths."""
    prompts = []
    for i in range(count):
        phrase = rng.integers(3, vocab, size=rng.integers(3, 7)).tolist()
        noise = rng.integers(3, vocab, size=rng.integers(0, 6)).tolist()
        prompts.append([1] + phrase + noise + phrase * int(rng.integers(1, 4)))
    return prompts


def test_greedy_speculative_equals_plain_greedy(tiny_model):
    config, weights = tiny_model
    rng = np.random.default_rng(1)
    prompts = _repetitive_prompts(rng, 6)
    budgets = [20, 3, 17, 1, 20, 9]  # rows end at different times, some inside an accepted run
    plain, plain_steps = _decode(config, weights, prompts, budgets, speculative.OFF)
    spec = Speculation(4, 3, 1)
    fast, fast_steps = _decode(config, weights, prompts, budgets, spec)
    assert fast == plain
    # Speculation did something: fewer steps than tokens, and the host replay of the proposal rule
    # predicts exactly how many tokens each step emitted.
    assert len(fast_steps) < len(plain_steps)
    for row, (prompt, output) in enumerate(zip(prompts, plain)):
        replay = speculative.acceptance_lengths(prompt, output, spec)
        assert fast_steps[:len(replay), row].tolist() == replay, row
    # Every row stopped at EOS or exactly at its budget.
    for output, budget in zip(plain, budgets):
        assert len(output) == budget or (output[-1] == EOS and len(output) <= budget)


def test_greedy_with_eos_inside_an_accepted_run(tiny_model):
    """A model that copies: the prompt contains its own continuation up to EOS, so EOS arrives as an
    accepted draft; the row must stop there, as plain greedy does."""
    config, weights = tiny_model
    prompt = [1, 5, 6, 7, 8, 9]
    plain, _ = _decode(config, weights, [prompt], [12], speculative.OFF)
    # Build a prompt whose history holds "... plain continuation + EOS", then the same suffix again,
    # so the drafts are the model's greedy continuation (right up to and including an EOS).
    continuation = plain[0][:4]
    copying_prompt = prompt + continuation + [EOS, 4] + prompt
    plain2, _ = _decode(config, weights, [copying_prompt], [12], speculative.OFF)
    fast2, steps = _decode(config, weights, [copying_prompt], [12], Speculation(6, 3, 1))
    assert fast2 == plain2
    assert steps.max() > 1  # some drafts were accepted


# ----------------------------------------------------------------------------- sampling


def test_sampled_distribution_is_unchanged(tiny_model):
    """Chi-square test of sampled 2-token continuations against the exact model distribution.

    The model's logits are sharpened (final norm x3) and the prompt "1 7 9 d 5 7 9" is built with
    the draft d (what follows the earlier "7 9") that the model itself finds most likely, so drafts
    are accepted often and rejected often (both checked). Cells with expected count < 5 are pooled.
    The false-alarm probability of the test is ALPHA = 1e-3 (over the choice of seeds; with fixed
    seeds it is deterministic). The same test on a sample of the same size rejects a sampler that
    favoured the draft (checked below): e.g. one that accepted it with a fixed probability, or
    resampled from p without removing it after a rejection.
    """
    config, weights = tiny_model
    weights = {**weights, "final_norm": {"scale": weights["final_norm"]["scale"] * 3.0}}
    alpha = 1e-3
    prompts = [[1, 7, 9, d, 5, 7, 9] for d in range(config.vocab_size)]
    first_probs = np.asarray([_exact_two_token_distribution(config, weights, p, 1.0).sum(axis=1) for p in prompts])
    draft = int(np.argmax(first_probs[np.arange(config.vocab_size), np.arange(config.vocab_size)]))
    prompt, p_draft = prompts[draft], float(first_probs[draft, draft])
    assert 0.2 < p_draft < 0.9, p_draft  # accepted and rejected both common
    sampler = sampling.Temperature(temperature=1.0)
    rows, rounds = 256, 8
    spec = Speculation(3, 2, 1)
    counts = np.zeros((config.vocab_size, config.vocab_size))
    accepted_steps = 0
    for r in range(rounds):
        outputs, steps = _decode(config, weights, [prompt] * rows, [2] * rows, spec, sampler=sampler, seed=100 + r)
        accepted_steps += int((steps[0] > 1).sum())
        for out in outputs:
            counts[out[0], out[1] if len(out) > 1 else EOS] += 1  # an EOS first token ends the row
    total = counts.sum()
    # The first step accepted the draft about p_draft of the time (binomial, 5 sigma).
    assert abs(accepted_steps / total - p_draft) < 5 * np.sqrt(p_draft * (1 - p_draft) / total)

    exact = _exact_two_token_distribution(config, weights, prompt, 1.0)
    statistic, dof = _pooled_chi_square(counts.ravel(), exact.ravel() * total)
    assert stats.chi2.sf(statistic, dof) > alpha, (statistic, dof)
    # The classic mistake fails the same test: after a rejection, resampling from p without removing
    # the draft (the draft then comes out with probability p + (1 - p) p).
    biased = exact * (1 - p_draft)
    biased[draft] = exact[draft] * (1 + (1 - p_draft))
    statistic, dof = _pooled_chi_square(biased.ravel() * total, exact.ravel() * total)
    assert stats.chi2.sf(statistic, dof) < alpha


def _pooled_chi_square(observed: np.ndarray, expected: np.ndarray) -> tuple[float, int]:
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return float(((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum()), int(big.sum())


@functools.partial(jax.jit, static_argnames="config")
def _last_logits(config, weights, ids):  # [N, T] -> [N, V] at the last position; compiled once per shape
    return Llama(config, layer_loop="unroll").apply({"params": weights}, ids)[:, -1]


def _exact_two_token_distribution(config, weights, prompt, temperature) -> np.ndarray:
    """P(first, second) [V, V] by teacher forcing every first token (second = EOS if first is EOS)."""
    vocab = config.vocab_size
    first = jax.nn.softmax(_last_logits(config, weights, jnp.asarray([prompt], jnp.int32))[0] / temperature)
    ids = jnp.asarray([prompt + [t] for t in range(vocab)], jnp.int32)
    second = jax.nn.softmax(_last_logits(config, weights, ids) / temperature, axis=-1)  # [V, V]
    joint = np.asarray(first)[:, None] * np.asarray(second)
    joint[EOS] = 0.0
    joint[EOS, EOS] = float(first[EOS])
    return joint / joint.sum()


def test_seeded_sampling_equals_plain_sampling(tiny_model):
    """Position j of a step uses the row's key folded with its token count, as the plain decoder:
    seeded sampled rows give the same tokens with or without speculation."""
    config, weights = tiny_model
    prompts = _repetitive_prompts(np.random.default_rng(5), 4)
    sampler = sampling.TopK(k=5, temperature=0.8)
    plain, _ = _decode(config, weights, prompts, [12] * 4, speculative.OFF, sampler=sampler, seed=9)
    fast, steps = _decode(config, weights, prompts, [12] * 4, Speculation(4, 2, 1), sampler=sampler, seed=9)
    assert fast == plain
    assert steps.max() > 1


# ----------------------------------------------------------------------------- through the Generator


class CharTokenizer:
    """id i <-> chr(32 + i) (as test_generate's): stop strings map to known token ids."""

    bos_id, eos_id, pad_id, add_bos, chat_template = 1, EOS, None, False, None

    def encode(self, text: str) -> list[int]:
        return [(ord(c) - 32) % 32 for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i)) for i in ids)


def _generators(config, weights, **options):
    from llama_e_jax.generate.generator import Generator

    plain = Generator(config, weights, CharTokenizer(), speculation=speculative.OFF, **options)
    fast = Generator(config, weights, CharTokenizer(), speculation=Speculation(4, 3, 1), **options)
    return plain, fast


def test_generator_greedy_identical_with_stops_and_budgets(tiny_model):
    """Mixed prompt lengths in one batch, rows finishing at different times (EOS, stop string, budget):
    the speculative Generator returns the same completions as the plain one, in fewer decode chunks'
    steps (checked through the session's own counters: the same text is all that is visible)."""
    config, weights = tiny_model
    plain, fast = _generators(config, weights, max_batch_size=4, chunk_size=8)
    rng = np.random.default_rng(7)
    prompts = _repetitive_prompts(rng, 7)
    for max_new in (1, 5, 23):
        expected = plain.generate_ids(prompts, max_new_tokens=max_new)
        assert fast.generate_ids(prompts, max_new_tokens=max_new) == expected
    # A stop string taken from a plain completion (so it does occur) ends rows inside accepted runs.
    reference = plain.generate_ids(prompts, max_new_tokens=23)
    stop = CharTokenizer().decode(reference[0].token_ids[3:5])
    expected = plain.generate_ids(prompts, max_new_tokens=23, stop=[stop])
    assert any(c.finish_reason == "stop" for c in expected)
    assert fast.generate_ids(prompts, max_new_tokens=23, stop=[stop]) == expected


def test_generator_seeded_sampling_identical(tiny_model):
    config, weights = tiny_model
    plain, fast = _generators(config, weights, max_batch_size=4, chunk_size=8)
    prompts = _repetitive_prompts(np.random.default_rng(8), 5)
    sampler = sampling.TopP(p=0.9, temperature=0.7)
    expected = plain.generate_ids(prompts, max_new_tokens=16, sampler=sampler, seed=3)
    assert fast.generate_ids(prompts, max_new_tokens=16, sampler=sampler, seed=3) == expected


def test_smollm2_greedy_identical_on_test_prompts(smollm2_params):
    """The real model, greedy, on real prompts of all five tasks (the seed test split) at batch 8:
    speculative output == plain greedy output, token for token."""
    import glob
    from pathlib import Path

    from llama_e_jax.data.prompt import build_prompt
    from llama_e_jax.data.schema import TASKS, read_jsonl
    from llama_e_jax.data.tfds_builder import assign_splits
    from llama_e_jax.generate.generator import Generator
    from llama_e_jax.io.default_model import ensure_default_hf_dir
    from llama_e_jax.io.tokenizer import load_tokenizer

    seeds = Path(__file__).resolve().parent.parent / "data_prep" / "seeds"
    records = [r for f in sorted(glob.glob(str(seeds / "*.jsonl"))) for r in read_jsonl(f)]
    test = assign_splits(records)["test"]
    picked = [next(r for r in test if r.task == task) for task in TASKS]
    picked += [r for r in test if r not in picked][:3]
    config, params = smollm2_params
    tokenizer = load_tokenizer(ensure_default_hf_dir())
    plain = Generator(config, params, tokenizer, max_batch_size=8, speculation=speculative.OFF)
    # Speculating on all 8 rows (the measured default speculates only with one row: that is about speed).
    every_row = dataclasses.replace(speculative.PROMPT_LOOKUP, max_rows=8)
    fast = Generator(config, params, tokenizer, max_batch_size=8, speculation=every_row)
    prompts = [build_prompt(r.instruction, r.input) for r in picked]
    expected = plain.generate(prompts, max_new_tokens=48)
    got = fast.generate(prompts, max_new_tokens=48)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    # Drafts were useful on these prompts: the host replay of the rule accepts some.
    replays = [speculative.acceptance_lengths(plain.encode_prompt(p), list(c.token_ids), speculative.PROMPT_LOOKUP)
               for p, c in zip(prompts, expected)]
    assert max(max(r) for r in replays) > 1


def test_session_history_holds_prompt_and_output(tiny_model):
    """kernels.prefill and the speculative step keep each row's token history: prompt, then output."""
    from llama_e_jax.generate.session import Request

    config, weights = tiny_model
    _, fast = _generators(config, weights, max_batch_size=4, chunk_size=8)
    prompts = _repetitive_prompts(np.random.default_rng(9), 3)
    requests = [Request(list(p), max_new_tokens=11) for p in prompts]
    session = fast.session(sampling.Greedy(), batch_size=4, max_length=64)
    session.run(requests)
    history = np.asarray(session.state.history)
    for row, request in enumerate(requests):
        known = list(request.prompt_ids) + request.token_ids
        assert history[row, :len(known)].tolist() == known, row


def test_many_rows_decode_plainly():
    spec = Speculation(4, 3, 1, max_rows=8)
    assert spec.for_rows(8) is spec and spec.for_rows(9) == speculative.OFF


def test_command_lines_default_to_the_measured_setting_and_can_turn_it_off():
    parser = argparse.ArgumentParser()
    speculative.add_arguments(parser)
    assert speculative.from_arguments(parser.parse_args([])) == speculative.COMMAND_LINE_DEFAULT
    assert speculative.COMMAND_LINE_DEFAULT.enabled and not speculative.DEFAULT.enabled  # library: opt in
    assert speculative.from_arguments(parser.parse_args(["--no-speculative"])) == speculative.OFF
    assert speculative.from_arguments(parser.parse_args(["--speculative-k", "0"])) == speculative.OFF
    two = speculative.from_arguments(parser.parse_args(["--speculative-k", "2", "--speculative-ngram", "2"]))
    expected = (2, 2, 1, speculative.COMMAND_LINE_DEFAULT.max_rows)
    assert (two.num_draft, two.ngram_max, two.ngram_min, two.max_rows) == expected
