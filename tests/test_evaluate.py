"""evaluate.py: views, per-task scoring, reference perplexity, report files, and a whole CLI run.

The model is the `tiny` preset with random weights and the byte tokenizer (ids = UTF-8 bytes),
whose 256-token window is why the records below are short.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from llama_e_jax import eval_report, evaluate, metrics, scoring
from llama_e_jax.data.prompt import prompt_and_response
from llama_e_jax.data.schema import InstructionRecord, read_jsonl, write_jsonl
from llama_e_jax.io import adapters
from llama_e_jax.io.tokenizer import ByteTokenizer
from llama_e_jax.model import lora
from llama_e_jax.model.config import LlamaConfig
from llama_e_jax.model.llama import Llama

from conftest import logits_bound

SEED_DIR = Path(__file__).resolve().parent.parent / "data_prep" / "seeds"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def record(id_: str, task: str, output: str, instruction: str = "Do it.", input_: str = "",
           options: tuple[str, ...] | None = None) -> InstructionRecord:
    return InstructionRecord(id=id_, task=task, instruction=instruction, input=input_, output=output,
                             aspects=("seller",), source="test", options=options)


SMALL_RECORDS = [
    record("ads-1", "ads_generation", "Bright lamp, $9.", "Ad for a desk lamp."),
    record("ads-2", "ads_generation", "Soft socks.", "Ad for socks."),
    record("title-1", "title_rewriting", "Steel Bottle 1 L", "Fix: bottle steel 1l"),
    record("cls-1", "product_classification", "Electronics", "Category?", "Phone case. Electronics | Hardware",
           ("Electronics", "Hardware")),
    record("cls-2", "product_classification", "Hardware", "Category?", "Hammer. Electronics | Hardware",
           ("Electronics", "Hardware")),
    record("intent-1", "intent_speculation", "buying a gift", "Why?", "Gift wrap chosen.",
           ("buying a gift", "caring for a pet")),
    record("qa-1", "general_qa", "Yes, it is.", "Is it waterproof?"),
]


@pytest.fixture(scope="module")
def tiny_model():
    """(config, params, tokenizer) of the tiny preset: random weights (numpy), byte tokenizer."""
    from conftest import random_params

    config = LlamaConfig.from_preset("tiny")
    return config, random_params(config, seed=0), ByteTokenizer()


# ------------------------------------------------------------------------------------ views


def test_zero_shot_paraphrases_are_not_training_instructions():
    seeds = [r for path in sorted(SEED_DIR.glob("*.jsonl")) for r in read_jsonl(path)]
    assert seeds, "no seed records found"
    seed_instructions = {r.instruction.strip().casefold() for r in seeds}
    for task, paraphrases in evaluate.ZERO_SHOT_INSTRUCTIONS.items():
        assert len(set(paraphrases)) == len(paraphrases) >= 2
        for paraphrase in paraphrases:
            assert paraphrase.strip().casefold() not in seed_instructions, (task, paraphrase)
    # Every seed record gets a paraphrase of its own task, deterministically.
    for seed in seeds[:50]:
        view = evaluate.zero_shot_record(seed)
        assert view.instruction.split("\n")[0] in evaluate.ZERO_SHOT_INSTRUCTIONS[seed.task]
        assert view == evaluate.zero_shot_record(seed)
        assert (view.input, view.output, view.options) == (seed.input, seed.output, seed.options)


def test_zero_shot_lists_candidates_only_when_the_input_does_not():
    listed = record("c1", "product_classification", "Hardware", "Pick one: Electronics or Hardware.", "A hammer.",
                    ("Electronics", "Hardware"))
    in_input = record("c2", "product_classification", "Hardware", "Pick.", "A hammer. Electronics | Hardware",
                      ("Electronics", "Hardware"))
    assert evaluate.zero_shot_record(listed).instruction.endswith("\nCandidates: Electronics | Hardware")
    assert "Candidates:" not in evaluate.zero_shot_record(in_input).instruction
    assert "Candidates:" not in evaluate.zero_shot_record(SMALL_RECORDS[0]).instruction


def test_limit_per_task_samples_by_id_hash_whatever_the_file_order():
    many = [record(f"qa-{i}", "general_qa", "a", "Answer.", "q") for i in range(40)]
    many += [record(f"ads-{i}", "ads_generation", "a", "Write.", "p") for i in range(3)]
    kept = evaluate.limit_per_task(many, 5)
    assert [r.task for r in kept].count("general_qa") == 5 and [r.task for r in kept].count("ads_generation") == 3
    assert [r.id for r in kept if r.task == "general_qa"] != [f"qa-{i}" for i in range(5)]  # not the first five
    assert evaluate.limit_per_task(many[::-1], 5) == kept[::-1]  # the same records, in input order
    assert all(evaluate.id_hash(r) <= evaluate.id_hash(o) for r in kept if r.task == "general_qa"
               for o in many if o.task == "general_qa" and o not in kept)
    assert evaluate.limit_per_task(SMALL_RECORDS, None) == SMALL_RECORDS
    with pytest.raises(ValueError, match="--limit-per-task"):
        evaluate.limit_per_task(SMALL_RECORDS, 0)


# ------------------------------------------------------------------------------------ scoring


def test_label_reply_outside_the_options_is_wrong_and_reported():
    records = [r for r in SMALL_RECORDS if r.task == "product_classification"] * 2
    replies = [evaluate.Reply("Category: electronics."),  # in set, correct
               evaluate.Reply("Toys & Games"),  # in the task's label set but not an option: out of set
               evaluate.Reply("Electronics"),  # in set, wrong (reference Hardware... see below)
               evaluate.Reply("", skipped="too long")]  # not generated: excluded and counted
    scores, details = evaluate.score_task("product_classification", records, replies, [scoring.ReferenceNll()] * 4)
    # references: Electronics, Hardware, Electronics, (Hardware skipped); predictions: E, None, E.
    assert scores["num_generated"] == 3 and scores["num_skipped"] == 1
    assert scores["accuracy"] == pytest.approx(100 * 2 / 3)
    assert scores["out_of_set_rate"] == pytest.approx(100 / 3) and scores["num_out_of_set"] == 1
    # classes {Electronics, Hardware}: E TP2 pred2 act2 -> 1; H TP0 -> 0.
    assert scores["macro_f1"] == pytest.approx(50.0)
    assert details[1] == {"matched_label": None, "in_set": False, "correct": False}
    assert details[0]["matched_label"] == "Electronics" and details[0]["correct"]
    assert math.isnan(scores["perplexity"]) and scores["perplexity_records"] == 0


def test_generation_scores_and_lengths():
    records = [r for r in SMALL_RECORDS if r.task == "ads_generation"]
    replies = [evaluate.Reply("Bright lamp, $9.", tokens=5, finish_reason="stop"),
               evaluate.Reply("Warm socks for you", tokens=7, finish_reason="length")]
    nlls = [scoring.ReferenceNll(nll=2.0, tokens=4), scoring.ReferenceNll(nll=6.0, tokens=4)]
    scores, details = evaluate.score_task("ads_generation", records, replies, nlls)
    texts, refs = [r.text for r in replies], [r.output for r in records]
    assert scores["bleu4"] == pytest.approx(metrics.bleu4(texts, refs))
    assert scores["rouge_l_f"] == pytest.approx(metrics.rouge_l_f(texts, refs))
    assert details[0]["rouge_l_f"] == pytest.approx(100.0)
    assert scores["mean_response_tokens"] == pytest.approx(6.0)
    assert scores["length_capped_rate"] == pytest.approx(50.0)
    # token-weighted: exp((2 + 6) / 8) = e.
    assert scores["perplexity"] == pytest.approx(math.e)
    assert details[1]["reference_perplexity"] == pytest.approx(math.exp(1.5))


# ------------------------------------------------------------------------------------ perplexity


def test_reference_nll_matches_unpacked_forward(tiny_model):
    """Packed rows, attributed back per record, equal each record scored alone."""

    config, params, tokenizer = tiny_model
    records = SMALL_RECORDS[:4]
    packed = scoring.reference_nll(config, params, tokenizer, records, seq_len=512)
    sequences, starts = [], []
    for rec in records:
        prompt, response = prompt_and_response(rec)
        prompt_ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
        sequences.append(prompt_ids + tokenizer.encode(response) + [tokenizer.eos_id])
        starts.append(len(prompt_ids))
    width = max(map(len, sequences))
    ids = np.array([seq + [0] * (width - len(seq)) for seq in sequences], np.int32)  # right padding: causal, harmless
    forward = jax.jit(lambda p, x: jax.nn.log_softmax(Llama(config).apply({"params": p}, x), axis=-1))
    log_probs = np.asarray(forward(params, ids))  # [R, T, V], each record alone in its row
    for row, (seq, start, result) in enumerate(zip(sequences, starts, packed)):
        targets = np.array(seq[start:])
        predicting = np.arange(start - 1, len(seq) - 1)  # positions whose next token is a target
        expected = -float(log_probs[row, predicting, targets].sum())
        assert result.tokens == len(targets) and not result.truncated
        # packed vs one row each: fp32 logits within logits_bound, and each -log p = logsumexp - logit moves
        # by at most 2 of those, summed over the targets. A target off by one position moves it by units.
        tolerance = 2 * len(targets) * logits_bound(config, log_probs[row])
        assert result.nll == pytest.approx(expected, rel=0, abs=tolerance)


# ------------------------------------------------------------------------------------ reports


def _fake_report() -> dict:
    by_task = {"ads_generation": {"num_generated": 2, "bleu4": 12.5, "rouge_l_f": 30.0, "perplexity": 5.0,
                                  "mean_response_words": 4.0, "mean_reference_words": 5.0},
               "product_classification": {"num_generated": 2, "accuracy": 50.0, "macro_f1": 33.3,
                                          "out_of_set_rate": 50.0, "constrained_accuracy": 100.0,
                                          "loglik_accuracy": 75.0, "perplexity": float("nan"),
                                          "mean_response_words": 1.0, "mean_reference_words": 1.0}}
    return {"meta": {"model": "tiny", "data": "test", "num_records": 4, "generation": "greedy"},
            "results": {"standard": {"base": by_task, "ads": by_task},
                        "zero_shot": {"base": by_task, "ads": by_task}}}


def test_report_files_are_written_and_chart_is_a_png(tmp_path):
    import matplotlib.image

    rows = [{"view": "standard", "system": "base", "id": "a", "reply": "x"}]
    paths = eval_report.write_reports(tmp_path / "out", _fake_report(), rows)
    assert sorted(p.name for p in paths.values()) == ["chart.png", "outputs.jsonl", "report.html", "report.json",
                                                     "report.md"]
    assert paths["chart.png"].read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(paths["chart.png"])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image.std() > 0  # not a blank canvas
    saved = json.loads(paths["report.json"].read_text())  # strict JSON: NaN became null
    assert saved["results"]["standard"]["base"]["product_classification"]["perplexity"] is None
    markdown = paths["report.md"].read_text()
    assert "## View: zero_shot" in markdown
    assert "| ads_generation | ads | 2 | 12.5 | 30.0 | – | – | – | – | – | 5.00 | 4 (5) |" in markdown
    assert "| product_classification | base | 2 | – | – | 50.0 | 33.3 | 50.0 | 100.0 | 75.0 | – | 1 (1) |" in markdown
    assert [json.loads(line) for line in paths["outputs.jsonl"].read_text().splitlines()] == rows


# ------------------------------------------------------------------------------------ constrained decoding


def test_constrained_label_replies_are_always_a_candidate(tiny_model):
    from llama_e_jax.generate.generator import Generator

    config, params, tokenizer = tiny_model
    generator = Generator(config, params, tokenizer, max_batch_size=4, max_length=512)  # byte prompts are long
    records = SMALL_RECORDS + [record("ads-x", "ads_generation", "Buy it.", "Write an ad.", "A mug.")]
    settings = evaluate.GenerationSettings(max_new_tokens=48)  # longer than every candidate, in bytes
    constrained = evaluate.generate_replies(generator, records, settings, constrained=True)
    free = evaluate.generate_replies(generator, records, settings)
    for record_, reply, free_reply in zip(records, constrained, free):
        if record_.task in evaluate.LABEL_TASKS:  # a random model: only the constraint makes this true
            assert reply.text in evaluate.candidate_labels(record_) and reply.finish_reason == "stop", reply
        else:
            assert reply == free_reply  # other tasks decode freely, as without constraints


# ------------------------------------------------------------------------------------ a whole run


def test_cli_run_base_vs_adapter_on_small_jsonl(tmp_path, tiny_model, monkeypatch):
    config, _, _ = tiny_model
    data = tmp_path / "small.jsonl"
    write_jsonl(data, SMALL_RECORDS)
    lora_config = lora.LoraConfig()
    adapter = lora.init_adapter(config, lora_config, jax.random.key(3))
    adapter = jax.tree.map(lambda x: x + 0.5 if x.ndim == 3 else x, adapter)  # B != 0: changes the model
    adapters.save_adapter(tmp_path / "run" / "adapter", adapter, lora_config, config)
    monkeypatch.chdir(tmp_path)  # no --out-dir: the report goes to runs/eval/<time> under the working directory

    status = evaluate.main(["--jsonl", str(data), "--model", "tiny", "--adapter", str(tmp_path / "run" / "adapter"),
                            "--max-new-tokens", "6"])

    assert status == 0
    [out] = (tmp_path / "runs" / "eval").iterdir()
    report = json.loads((out / "report.json").read_text())
    assert list(report["results"]) == ["standard", "zero_shot"]
    assert set(report["results"]["standard"]) == {"base", "run"}
    tasks = {r.task for r in SMALL_RECORDS}
    for view in report["results"].values():
        for by_task in view.values():
            assert set(by_task) == tasks
            assert by_task["ads_generation"]["num_records"] == 2
            assert by_task["product_classification"]["out_of_set_rate"] is not None or \
                by_task["product_classification"]["num_generated"] == 0
    standard = report["results"]["standard"]
    assert standard["base"]["ads_generation"]["num_generated"] == 2
    # The adapter changes the model: its reference perplexity differs from the base's.
    assert standard["base"]["ads_generation"]["perplexity"] != pytest.approx(standard["run"]["ads_generation"]["perplexity"])
    rows = [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]
    assert len(rows) == len(SMALL_RECORDS) * 2 * 2  # records x systems x views
    skipped = [r for r in rows if "skipped" in r]
    counted = sum(t["num_skipped"] for v in report["results"].values() for s in v.values() for t in s.values())
    assert len(skipped) == counted  # nothing dropped silently
    assert (out / "chart.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "| title_rewriting | run |" in (out / "report.md").read_text()


def test_cli_rejects_unknown_view(capsys):
    assert evaluate.main(["--views", "standard,sideways", "--model", "tiny"]) == 2
    assert "sideways" in capsys.readouterr().err
