"""Metric functions against values computed by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import math

import pytest

from llama_e_jax import metrics
from llama_e_jax.data.labels import LABEL_SETS


# ------------------------------------------------------------------------------------ BLEU-4


def test_bleu4_identical_is_100():
    assert metrics.bleu4(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)


def test_bleu4_matches_hand_computed_geometric_mean():
    # hyp "the cat sat on a mat" vs ref "the cat sat on the mat", both 6 tokens (BP = 1):
    # 1-grams 5/6, 2-grams 3/5 (the cat, cat sat, sat on), 3-grams 2/4, 4-grams 1/3.
    expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
    assert metrics.bleu4(["the cat sat on a mat"], ["the cat sat on the mat"]) == pytest.approx(expected, rel=1e-9)


def test_bleu4_brevity_penalty():
    # every n-gram of "the cat sat on" is in the reference; BP = exp(1 - 6/4).
    assert metrics.bleu4(["the cat sat on"], ["the cat sat on the mat"]) == pytest.approx(
        100 * math.exp(1 - 6 / 4), rel=1e-9)


def test_bleu4_is_corpus_level_not_mean_of_sentences():
    # Corpus BLEU pools n-gram counts and lengths over both pairs (hyp 6+4 tokens, ref 6+6), so it
    # differs from the mean of the two sentence scores.
    hyps, refs = ["the cat sat on the mat", "the cat sat on"], ["the cat sat on the mat"] * 2
    pooled = metrics.bleu4(hyps, refs)
    mean_of_sentences = (metrics.bleu4(hyps[:1], refs[:1]) + metrics.bleu4(hyps[1:], refs[1:])) / 2
    # Pooled: precisions all 1, BP = exp(1 - 12/10).
    assert pooled == pytest.approx(100 * math.exp(1 - 12 / 10), rel=1e-9)
    assert pooled != pytest.approx(mean_of_sentences)


def test_bleu4_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        metrics.bleu4(["a", "b"], ["a"])


# ------------------------------------------------------------------------------------ ROUGE-L


def test_rouge_l_uses_stemming():
    # ref "the cats are running" -> the cat are run; hyp "a cat runs" -> a cat run.
    # LCS = (cat, run) = 2; P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7.
    assert metrics.rouge_l_f(["a cat runs"], ["the cats are running"]) == pytest.approx(100 * 4 / 7)


def test_rouge_l_is_mean_of_sentence_scores():
    # pair 1: identical -> 1; pair 2: no common token -> 0; mean 0.5.
    assert metrics.rouge_l_f(["red shoes", "blue"], ["red shoes", "green hat"]) == pytest.approx(50.0)


# ------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("reply", [
    "Electronics",
    "  electronics.  ",
    "ELECTRONICS!",
    "Category: Electronics",
    "Product category: electronics.",
    '"Electronics"',
    "The answer is: Electronics",
    "Electronics\n",
])
def test_normalisation_accepts_formatting_variants(reply):
    assert metrics.match_label(reply, ["Hardware", "Electronics"]) == "Electronics"


@pytest.mark.parametrize("reply", [
    "Electronics or Hardware",  # two labels: no credit
    "Electronic",  # not the label
    "I think it is Electronics",  # a sentence, not a label (no colon prefix)
    "Category: Electronics\nBecause it is a phone case.",  # extra text after the label
    "",
])
def test_normalisation_rejects_non_labels(reply):
    assert metrics.match_label(reply, ["Hardware", "Electronics"]) is None


def test_label_with_internal_punctuation_and_whitespace():
    assert metrics.match_label("food,  beverages &\ntobacco.", LABEL_SETS["product_classification"]) == \
        "Food, Beverages & Tobacco"


def test_label_sets_are_unambiguous_after_normalisation():
    for labels in LABEL_SETS.values():
        assert len(metrics.label_lookup(labels)) == len(labels)


def test_label_lookup_refuses_colliding_labels():
    with pytest.raises(ValueError, match="equal after normalisation"):
        metrics.label_lookup(["Electronics", "electronics."])


def test_accuracy_and_macro_f1_by_hand():
    references = ["A", "A", "B", "C"]
    predictions = ["A", "B", "B", None]  # last reply was out of set
    scores = metrics.label_scores(predictions, references)
    # accuracy: 2 correct of 4.
    assert scores.accuracy == pytest.approx(50.0)
    # classes {A, B, C}: A: TP1 pred1 act2 -> 2/3; B: TP1 pred2 act1 -> 2/3; C: TP0 -> 0.
    assert scores.macro_f1 == pytest.approx(100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert scores.out_of_set_rate == pytest.approx(25.0)
    assert scores.num_out_of_set == 1 and scores.num_examples == 4


def test_out_of_set_reply_counts_as_wrong_even_if_it_contains_the_label():
    references = ["Electronics", "Hardware"]
    replies = ["Electronics, definitely", "Hardware"]
    predictions = [metrics.match_label(r, ["Electronics", "Hardware"]) for r in replies]
    scores = metrics.label_scores(predictions, references)
    assert predictions == [None, "Hardware"]
    assert scores.accuracy == pytest.approx(50.0)
    assert scores.out_of_set_rate == pytest.approx(50.0)
    # classes {Electronics, Hardware}: Electronics F1 0 (missed), Hardware 1.
    assert scores.macro_f1 == pytest.approx(50.0)


def test_in_set_prediction_of_an_absent_class_lowers_macro_f1():
    # reference only "A"; predicting "B" adds class B with F1 0: classes {A, B}.
    # A: TP1 pred1 act2 -> 2/3; B: 0. Mean = 1/3.
    assert metrics.macro_f1(["A", "B"], ["A", "A"]) == pytest.approx(1 / 3)


def test_empty_label_scores_are_nan():
    scores = metrics.label_scores([], [])
    assert math.isnan(scores.accuracy) and scores.num_examples == 0


# ------------------------------------------------------------------------------------ perplexity


def test_perplexity_from_loss():
    assert metrics.perplexity_from_loss(2 * math.log(4.0), 2) == pytest.approx(4.0)
    assert math.isnan(metrics.perplexity_from_loss(1.0, 0))
    assert metrics.perplexity_from_loss(1e6, 1) == math.inf


def test_open_labels_with_colons_match_themselves_and_prefixes_still_strip():
    products = ["Cable Matters USB Cable: 3 Pack", "Belkin Extension Cable", "USB Hub: 4 ports"]
    assert metrics.match_label("cable matters usb cable: 3 pack.", products) == products[0]
    assert metrics.match_label("Answer: USB Hub: 4 ports", products) == products[2]
    assert metrics.match_label("Answer: Belkin Extension Cable", products) == products[1]
    assert metrics.match_label("3 Pack", products) is None  # the prefix rule never makes a label out of a tail


def test_free_text_intentions_match_only_whole():
    intentions = ["because they both are a type of USB extension cable.", "because they could both be worn."]
    assert metrics.match_label("Because they both are a type of USB extension cable", intentions) == intentions[0]
    assert metrics.match_label("because they both are a type of USB", intentions) is None
