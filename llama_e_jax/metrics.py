"""Per-task metrics of LLaMA-E's evaluation: BLEU-4, ROUGE-L, label accuracy / macro-F1, perplexity.

Why these and how exactly (docs/evaluation.md repeats this for users):

* **Generation tasks** (ads, title rewriting, Q&A) are scored against the one reference output with
  corpus BLEU-4 from `sacrebleu` (its defaults: 13a tokenisation, exponential smoothing, brevity
  penalty over the whole corpus) and the mean sentence-level ROUGE-L F-measure from `rouge-score`
  with the Porter stemmer. Both are standard implementations, so numbers compare with other papers;
  we do not re-implement them.
* **Label tasks** (product classification, purchase intent) must answer with one of the record's
  candidate labels: a fixed set, a dataset's declared set, or free text such as IntentionQA's
  intentions. A free-text reply is mapped to a label only when, after `normalize_label`, it *equals*
  one candidate label; there is no fuzzy or substring matching, because that would credit replies
  like "Electronics or Hardware". A reply that matches no candidate is "out of set": it is wrong for
  accuracy and its rate is reported separately, since it says the model did not learn the format
  (a different failure from picking the wrong label). Labels may contain a colon ("Item: 2 m
  cable"): the reply is compared first as written, then without a leading "Category:" prefix.
* **Macro-F1** averages per-class F1 over the classes that occur as a reference label or as an
  in-set prediction. Out-of-set replies are not a class: they are a missed reference (a false
  negative for the reference's class) and nothing else.
* **Perplexity** is exp of the mean negative log-likelihood per reference response token (the
  response's tokens and its end-of-sequence token, teacher-forced); prompt tokens are not scored.
  It is computed in evaluate.py from summed losses; `perplexity_from_loss` is the one formula.

All scores are percentages in [0, 100] (BLEU's convention), except perplexity and lengths.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import unicodedata
from collections.abc import Sequence

# A leading "Category:" / "The answer is:" — at most four words then a colon. Labels are normalised
# without this step, and a reply is tried both with and without it, so it never cuts into a label.
_LEADING_PREFIX = re.compile(r"^(?:[^\W\d_][\w'&-]*\s+){0,3}[^\W\d_][\w'&-]*\s*:\s*")
_QUOTES = "\"'`“”‘’«»"
_TRAILING_PUNCTUATION = ".,;:!?。"
_WHITESPACE = re.compile(r"\s+")


# ------------------------------------------------------------------------------ generation metrics


def bleu4(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 (sacrebleu defaults, one reference per hypothesis), in [0, 100]."""
    import sacrebleu

    _check_pairs(hypotheses, references)
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean sentence-level ROUGE-L F-measure (rouge-score, Porter stemmer), in [0, 100]."""
    scores = rouge_l_f_per_example(hypotheses, references)
    return float("nan") if not scores else 100.0 * sum(scores) / len(scores)


def rouge_l_f_per_example(hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each (hypothesis, reference) pair, in [0, 1]."""
    _check_pairs(hypotheses, references)
    scorer = _rouge_l_scorer()
    return [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references)]


# ------------------------------------------------------------------------------ label matching


def normalize_label(text: str, *, strip_prefix: bool = True) -> str:
    """The comparison form of a reply or a label; two strings "match" when these are equal.

    In order: Unicode NFKC and case folding; trim; drop a leading prefix of at most four words
    followed by a colon ("Category:", "The answer is:"; only with `strip_prefix`); trim surrounding
    quotes (`"'` and curly ones, backticks, guillemets); drop trailing `.,;:!?` (repeated);
    collapse every run of whitespace (newlines included) to one space; trim.
    """
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    if strip_prefix:
        text = _LEADING_PREFIX.sub("", text, count=1).strip()
    text = text.strip(_QUOTES).strip()
    text = text.rstrip(_TRAILING_PUNCTUATION + " \t\r\n").strip(_QUOTES)
    return _WHITESPACE.sub(" ", text).strip()


def label_lookup(labels: Sequence[str]) -> dict[str, str]:
    """normalised form (prefix kept) → canonical label; raises if two labels collide."""
    lookup: dict[str, str] = {}
    for label in labels:
        key = normalize_label(label, strip_prefix=False)
        if key in lookup and lookup[key] != label:
            raise ValueError(f"labels {lookup[key]!r} and {label!r} are equal after normalisation")
        lookup[key] = label
    return lookup


def match_label(reply: str, candidates: Sequence[str]) -> str | None:
    """The candidate label `reply` names (see `normalize_label`), or None when it names none.

    The reply as written wins over the reply without its prefix, so a label with a colon matches
    itself, and "Category: Electronics" still matches "Electronics".
    """
    lookup = label_lookup(candidates)
    whole = lookup.get(normalize_label(reply, strip_prefix=False))
    return whole if whole is not None else lookup.get(normalize_label(reply))


# ------------------------------------------------------------------------------ label metrics


@dataclasses.dataclass(frozen=True)
class LabelScores:
    """Scores of a label task, percentages in [0, 100].

    accuracy: replies that matched their reference label / all replies.
    macro_f1: mean per-class F1 (classes: reference labels ∪ in-set predictions).
    out_of_set_rate: replies that matched no candidate label / all replies (they count as wrong).
    """

    accuracy: float
    macro_f1: float
    out_of_set_rate: float
    num_examples: int
    num_out_of_set: int


def label_scores(predictions: Sequence[str | None], references: Sequence[str]) -> LabelScores:
    """Scores matched predictions (None = out of set, from `match_label`) against reference labels."""
    _check_pairs(predictions, references)
    n = len(references)
    if n == 0:
        nan = float("nan")
        return LabelScores(nan, nan, nan, 0, 0)
    correct = sum(p == r for p, r in zip(predictions, references))
    out_of_set = sum(p is None for p in predictions)
    return LabelScores(
        accuracy=100.0 * correct / n,
        macro_f1=100.0 * macro_f1(predictions, references),
        out_of_set_rate=100.0 * out_of_set / n,
        num_examples=n,
        num_out_of_set=out_of_set,
    )


def macro_f1(predictions: Sequence[str | None], references: Sequence[str]) -> float:
    """Unweighted mean of per-class F1 in [0, 1]; None predictions are misses, not a class."""
    _check_pairs(predictions, references)
    classes = sorted(set(references) | {p for p in predictions if p is not None})
    if not classes:
        return float("nan")
    f1s = []
    for label in classes:
        true_pos = sum(p == label and r == label for p, r in zip(predictions, references))
        predicted = sum(p == label for p in predictions)
        actual = sum(r == label for r in references)
        # F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + actual); 0 when the class was never hit.
        f1s.append(2.0 * true_pos / (predicted + actual) if true_pos else 0.0)
    return sum(f1s) / len(f1s)


# ------------------------------------------------------------------------------ perplexity


def perplexity_from_loss(summed_nll: float, num_tokens: float) -> float:
    """exp(summed negative log-likelihood / tokens); inf if the model diverged, nan with no tokens."""
    if num_tokens <= 0:
        return float("nan")
    mean = summed_nll / num_tokens
    return math.exp(mean) if mean < 700 else float("inf")


def _check_pairs(hypotheses: Sequence, references: Sequence) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
