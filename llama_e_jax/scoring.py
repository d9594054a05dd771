"""Option scoring: rank a record's options by their log-likelihood given the prompt, no decoding.

Design, and why:

* **What is scored.** For each option, `log p(option tokens, EOS | prompt)`, teacher-forced. The
  prompt/response tokenisation, BOS and EOS are the training pipeline's (`pipeline.tokenize_split` on
  a copy of the record whose output is the option), so an adapter is scored on exactly the sequences
  it was trained on. EOS is included by default: a classification reply ends after the label, and
  without EOS an option that is a prefix of another ("Toys" / "Toys & Games") is favoured for free.
  `with_eos=False` gives lm-evaluation-harness's continuation-only number.
* **Two rankings, as lm-evaluation-harness reports them.** `acc`: the option with the highest summed
  log-likelihood; `acc_norm`: the highest log-likelihood per character of the option (the harness
  normalises by the continuation's length in characters), which removes the bias towards short options.
* **One forward pass per record group.** All options of a group of records are rows of one batch
  ([rows, T], one option per row, T the group's longest sequence rounded up to 64, rows a power of
  two), through the same jitted per-token loss training uses (`train.state.masked_token_loss`); pass
  evaluate's `row_nll` to share its compiled function. Rounded shapes keep recompiles to a few.
* **Nothing is dropped silently.** An option whose sequence does not fit the model's context is scored
  on what fits and flagged `truncated`; a record whose prompt alone fills it gets no scores.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from llama_e_jax.data import pipeline
from llama_e_jax.data.prompt import prompt_and_response
from llama_e_jax.data.schema import InstructionRecord
from llama_e_jax.model.llama import Llama
from llama_e_jax.train.state import masked_token_loss

log = logging.getLogger(__name__)

GROUP_ROWS = 16  # option rows per forward pass (whole records only, unless one record has more options)


@dataclasses.dataclass(frozen=True)
class OptionScores:
    """Scores of one record's options (empty `options` when the prompt alone fills the context).

    Attributes:
      options: the options, in the record's order.
      logprob: summed log-likelihood of each option's tokens (and EOS when scored with it).
      tokens: number of scored tokens per option.
      truncated: whether the option was cut at the model's context.
    """

    options: tuple[str, ...]
    logprob: tuple[float, ...]
    tokens: tuple[int, ...]
    truncated: tuple[bool, ...]

    @property
    def best(self) -> str | None:
        """The option with the highest summed log-likelihood (lm-evaluation-harness's `acc`)."""
        return self.options[int(np.argmax(self.logprob))] if self.options else None

    @property
    def best_normalized(self) -> str | None:
        """The option with the highest log-likelihood per character (the harness's `acc_norm`)."""
        if not self.options:
            return None
        per_char = [lp / max(len(option), 1) for lp, option in zip(self.logprob, self.options)]
        return self.options[int(np.argmax(per_char))]


def ranking_scores(results: Sequence[OptionScores], references: Sequence[str]) -> dict[str, float | int]:
    """Accuracy (%) of picking the reference by log-likelihood, over the records that could be scored:
    `loglik_accuracy` (summed, the harness's acc), `loglik_accuracy_norm` (per character, acc_norm)
    and `loglik_records` (how many records that is; NaN accuracies when none)."""
    scored = [(result, reference) for result, reference in zip(results, references, strict=True) if result.options]
    if not scored:
        return {"loglik_accuracy": float("nan"), "loglik_accuracy_norm": float("nan"), "loglik_records": 0}
    return {"loglik_accuracy": 100.0 * float(np.mean([r.best == ref for r, ref in scored])),
            "loglik_accuracy_norm": 100.0 * float(np.mean([r.best_normalized == ref for r, ref in scored])),
            "loglik_records": len(scored)}


def row_nll_function(config: Any) -> Callable[[dict, dict], jax.Array]:
    """jit(params, batch) -> [B, T] per-token NLL, 0 outside the loss mask (training's loss)."""
    model = Llama(config)
    return jax.jit(lambda params, batch: masked_token_loss(model, {"params": params}, batch))


def score_options(config: Any, params: dict, tokenizer: Any, records: Sequence[InstructionRecord], *,
                  options_of: Callable[[InstructionRecord], Sequence[str]] | None = None, with_eos: bool = True,
                  row_nll: Callable | None = None) -> list[OptionScores]:
    """One `OptionScores` per record: each option's log-likelihood given the record's prompt.

    `options_of(record)` gives the options (default: `record.options`, which must be set); `params` are
    the weights to score with (an adapter merged in, as evaluate does); `row_nll` a
    `row_nll_function(config)` to reuse across calls.
    """
    options_of = options_of or _record_options
    row_nll = row_nll or row_nll_function(config)
    per_record = [tuple(options_of(record)) for record in records]
    results: list[OptionScores | None] = [None] * len(records)
    for group in _groups(per_record, GROUP_ROWS):
        scored = _score_group(config, params, tokenizer, [records[i] for i in group],
                              [per_record[i] for i in group], with_eos, row_nll)
        for i, scores in zip(group, scored):
            results[i] = scores
    return results


def _record_options(record: InstructionRecord) -> tuple[str, ...]:
    if not record.options:
        raise ValueError(f"record {record.id}: field options: no options to score (pass options_of)")
    return record.options


def _groups(per_record: Sequence[tuple[str, ...]], rows: int) -> list[list[int]]:
    """Consecutive records whose options together fit `rows` rows (a bigger record goes alone)."""
    groups: list[list[int]] = []
    used = rows
    for i, options in enumerate(per_record):
        if used + len(options) > rows:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += len(options)
    return groups


def _score_group(config: Any, params: dict, tokenizer: Any, records: Sequence[InstructionRecord],
                 options: Sequence[tuple[str, ...]], with_eos: bool, row_nll: Callable) -> list[OptionScores]:
    """Scores of a few records' options from one [rows, T] forward pass."""
    rows = [dataclasses.replace(record, output=option) for record, opts in zip(records, options) for option in opts]
    seq_len = perplexity_window(tokenizer, rows, config.max_position_embeddings)  # prompt + option + BOS/EOS
    try:
        split = pipeline.tokenize_split(rows, tokenizer, seq_len)
    except ValueError:  # every prompt fills the context: nothing can be scored
        return [OptionScores((), (), (), ()) for _ in records]
    batch = pipeline.assemble_batch(split, [[example] for example in range(len(split))], _capacity(len(split)))
    lengths = np.diff(split.offsets)  # [N] tokens per example (prompt, option, EOS; possibly truncated)
    eos_cut = ~np.asarray(split.tokens[split.offsets[1:] - 1] == tokenizer.eos_id)  # truncated before EOS
    if not with_eos:  # the last target of each untruncated row is EOS: not part of the continuation
        for b, example_length in enumerate(lengths):
            if not eos_cut[b]:
                batch["loss_mask"][b, example_length - 2] = 0.0
    token_nll = np.asarray(row_nll(params, batch))  # [rows, T]
    logprob = -token_nll.sum(axis=1)
    counts = batch["loss_mask"].sum(axis=1).astype(int)
    by_row = {int(split.record_index[example]): example for example in range(len(split))}
    results, row = [], 0
    for opts in options:
        examples = [by_row.get(row + j) for j in range(len(opts))]
        row += len(opts)
        if any(e is None for e in examples):  # the prompt alone fills the context
            results.append(OptionScores((), (), (), ()))
            continue
        results.append(OptionScores(opts, tuple(float(logprob[e]) for e in examples),
                                    tuple(int(counts[e]) for e in examples),
                                    tuple(bool(eos_cut[e]) for e in examples)))
    return results


def _capacity(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


PERPLEXITY_BATCH = 8  # packed rows per teacher-forced forward pass


# ------------------------------------------------------------------ reference perplexity


@dataclasses.dataclass
class ReferenceNll:
    """Teacher-forced negative log-likelihood of one reference response (None fields: not scored)."""

    nll: float | None = None
    tokens: int = 0
    truncated: bool = False


def reference_nll(config: Any, params: dict, tokenizer: Any, records: Sequence[InstructionRecord],
                  seq_len: int, row_nll: Any = None) -> list[ReferenceNll]:
    """Summed NLL of each record's response tokens (and EOS) given its prompt, one entry per record.

    Tokenisation and loss masks are the training pipeline's (`tokenize_split`, `assemble_batch`), so
    the numbers are exactly the training loss's. Examples are packed into rows (segment ids keep them
    apart) and each segment's sum is attributed back to its record. `row_nll`: a `row_nll_function(config)`
    to reuse across calls (built here when None).
    """
    results = [ReferenceNll() for _ in records]
    try:
        split = pipeline.tokenize_split(list(records), tokenizer, seq_len)
    except ValueError as error:  # every prompt fills the window: nothing to score, counted as unscored
        log.warning("reference perplexity: %s", error)
        return results
    lengths = split.lengths
    rows = pipeline.pack_rows(np.arange(len(split)), lengths, seq_len)
    row_nll = row_nll or row_nll_function(config)
    for start in range(0, len(rows), PERPLEXITY_BATCH):
        chunk = rows[start:start + PERPLEXITY_BATCH]
        batch = pipeline.assemble_batch(split, chunk, PERPLEXITY_BATCH)
        token_nll = np.asarray(row_nll(params, batch))  # [B, T], already masked to response tokens
        for b, row in enumerate(chunk):
            for segment, example in enumerate(row, start=1):
                in_segment = batch["segment_ids"][b] == segment
                record = int(split.record_index[example])
                tokens = int(batch["loss_mask"][b][in_segment].sum())
                full = len(tokenizer.encode(records[record].output)) + 1  # + EOS
                results[record] = ReferenceNll(float(token_nll[b][in_segment].sum()), tokens, tokens < full)
    return results


def perplexity_window(tokenizer: Any, records: Sequence[InstructionRecord], max_positions: int) -> int:
    """Tokens per packed row: the longest example rounded up to 64, capped at the model's context."""
    longest = 2
    for record in records:
        prompt, response = prompt_and_response(record)
        longest = max(longest, len(tokenizer.encode(prompt)) + len(tokenizer.encode(response)) + 2)
    return min(-(-longest // 64) * 64, max_positions)
