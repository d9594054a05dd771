"""Option scoring (llama_e_jax/scoring.py) on the real default model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_e_jax import scoring
from llama_e_jax.data.prompt import build_prompt
from llama_e_jax.data.schema import InstructionRecord
from llama_e_jax.io.tokenizer import load_tokenizer
from llama_e_jax.model.llama import Llama

SEEDS = Path(__file__).resolve().parent.parent / "data_prep" / "seeds"


def seed_record(file: str, record_id: str) -> InstructionRecord:
    for line in (SEEDS / file).read_text().splitlines():
        obj = json.loads(line)
        if obj["id"] == record_id:
            obj["aspects"] = tuple(obj.get("aspects", ()))
            obj["options"] = tuple(obj["options"]) if "options" in obj else None
            return InstructionRecord(**obj)
    raise KeyError(record_id)


def nonsense_like(text: str) -> str:
    """Same length and characters as `text`, no language: the characters reversed."""
    return text[::-1]


@pytest.fixture(scope="module")
def model(smollm2_params, smollm2_hf_dir):
    config, params = smollm2_params
    return config, params, load_tokenizer(smollm2_hf_dir)


@pytest.fixture(scope="module")
def records() -> list[InstructionRecord]:
    """A label record with its options plus two nonsense ones, and a generation record whose options are
    the exact reference continuation and same-length nonsense (different option counts: one group)."""
    cls = seed_record("product_classification.jsonl", "seed-cls-0001")
    cls = InstructionRecord(**{**cls.__dict__, "options": ("Electronics", "Qlorp Vand", nonsense_like("Electronics"))})
    title = seed_record("title_rewriting.jsonl", "seed-title-0001")
    title = InstructionRecord(**{**title.__dict__, "options": (nonsense_like(title.output), title.output)})
    return [cls, title]


def direct_logprob(config, params, tokenizer, record: InstructionRecord, option: str, with_eos: bool) -> float:
    """log p(option [, EOS] | prompt) from one unbatched, unpadded forward of that single sequence."""
    prompt_ids = tokenizer.encode(build_prompt(record.instruction, record.input))
    option_ids = tokenizer.encode(option) + ([tokenizer.eos_id] if with_eos else [])
    ids = jnp.asarray([prompt_ids + option_ids], jnp.int32)
    logits = Llama(config).apply({"params": params}, ids, positions=jnp.arange(ids.shape[1])[None])  # [1, T, V]
    logp = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
    start = len(prompt_ids)
    return float(sum(logp[start - 1 + i, t] for i, t in enumerate(option_ids)))


@pytest.fixture(scope="module")
def scores(model, records):
    config, params, tokenizer = model
    return scoring.score_options(config, params, tokenizer, records)


def test_reference_ranks_first(records, scores):
    for record, result in zip(records, scores):
        assert result.options == record.options
        assert result.best == record.output and result.best_normalized == record.output, result
        assert not any(result.truncated)


def test_scores_equal_a_direct_forward_per_option(model, records, scores):
    """Batched (padded, grouped rows, training's loss) == one plain forward per option.

    Tolerance: both are fp32 forwards of the same weights; they differ only in batch shape and
    padding, which change XLA's reduction order. fp32 rounding (~1e-7 relative) compounded over 30
    layers moves a log-prob by ~1e-6 relative to logits of magnitude ~30, i.e. ~3e-5 per token;
    summed over the ≤ 53 scored tokens here that is < 2e-3 (measured: 5e-5).
    """
    config, params, tokenizer = model
    for record, result in zip(records, scores):
        for option, logprob, tokens in zip(result.options, result.logprob, result.tokens):
            assert tokens == len(tokenizer.encode(option)) + 1  # option tokens + EOS
            assert logprob == pytest.approx(direct_logprob(config, params, tokenizer, record, option, True), abs=2e-3)


def test_without_eos_is_the_continuation_only(model, records, scores):
    config, params, tokenizer = model
    record = records[0]
    (without,) = scoring.score_options(config, params, tokenizer, [record], with_eos=False)
    for option, logprob, tokens in zip(without.options, without.logprob, without.tokens):
        assert tokens == len(tokenizer.encode(option))
        assert logprob == pytest.approx(direct_logprob(config, params, tokenizer, record, option, False), abs=2e-3)
    assert all(w > s for w, s in zip(without.logprob, scores[0].logprob))  # dropping a log-prob < 0 term


def test_ranking_scores(scores, records):
    references = [r.output for r in records]
    assert scoring.ranking_scores(scores, references) == {"loglik_accuracy": 100.0, "loglik_accuracy_norm": 100.0,
                                                          "loglik_records": 2}
    wrong = scoring.ranking_scores(scores, [records[0].output, "nothing like it"])
    assert wrong["loglik_accuracy"] == 50.0 and wrong["loglik_records"] == 2
    empty = scoring.OptionScores((), (), (), ())  # a record whose prompt filled the context is not counted
    assert scoring.ranking_scores([empty, scores[0]], ["x", records[0].output])["loglik_records"] == 1


def test_groups_keep_whole_records_together():
    assert scoring._groups([("a",) * 5, ("b",) * 9, ("c",) * 4, ("d",) * 20, ("e",)], 16) == [[0, 1], [2], [3], [4]]


def test_record_without_options_is_a_clear_error(model, records):
    config, params, tokenizer = model
    bare = InstructionRecord(**{**records[0].__dict__, "options": None})
    with pytest.raises(ValueError, match="seed-cls-0001: field options"):
        scoring.score_options(config, params, tokenizer, [bare])
    # options_of supplies them instead (e.g. a task's label set)
    (result,) = scoring.score_options(config, params, tokenizer, [bare], options_of=lambda r: ("Electronics", "Toys"))
    assert result.options == ("Electronics", "Toys") and np.all(np.isfinite(result.logprob))
