"""Post-filters: every planted problem is removed by its rule, counted per task, and written to rejects."""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from rouge_score import tokenize as rouge_tokenize

from data_prep import filter as flt
from llama_e_jax.data.labels import PRODUCT_CATEGORIES, PURCHASE_INTENTS
from llama_e_jax.data.schema import parse_record, read_jsonl

CATS = list(PRODUCT_CATEGORIES[:4])
INTENTS = list(PURCHASE_INTENTS[:3])


def rec(id_, task, instruction, input_, output, *, source="expanded:t", **extra):
    return {"id": id_, "task": task, "instruction": instruction, "input": input_, "output": output,
            "aspects": ["customer"], "source": source, **extra}


CLEAN = [
    rec("ads-a", "ads_generation", "Write a catchy advertisement for the stainless steel kettle below.",
        "Steel kettle, 1.7 litres, auto shut-off", "Boil water in seconds with our sleek steel kettle."),
    rec("ads-b", "ads_generation", "Compose two upbeat sentences promoting these trail running shoes.",
        "Trail shoes, grippy sole, size 42", "Conquer every trail with grip that never quits."),
    rec("title-a", "title_rewriting", "Rewrite this messy product title so shoppers can find it.",
        "kettle STEEL 1.7l new!!", "Stainless Steel Electric Kettle, 1.7 L"),
    rec("cls-a", "product_classification", "Which category does this product belong to?", "Leather dog leash, 2 m",
        CATS[0], options=CATS),
    # same input, a genuinely different wording: a legitimate rewrite-only variant, not a near duplicate
    rec("cls-a-v", "product_classification", "Pick the most fitting category for the item described here.",
        "Leather dog leash, 2 m", CATS[0], options=CATS),
    rec("cls-b", "product_classification", "Which category does this product belong to?", "Cotton baby onesie",
        CATS[2], options=CATS),  # same instruction as cls-a, different input: kept
    rec("int-a", "intent_speculation", "Why did this customer most likely buy these items?", "Tent; sleeping bag",
        INTENTS[0], options=INTENTS),
    rec("qa-a", "general_qa", "How do I return an item I bought last week?", "",
        "Open your orders, choose the item and select Return."),
    rec("qa-b", "general_qa", "What does free shipping usually mean for the buyer?", "",
        "The seller pays delivery, so you pay only the item price."),
]

PLANTED = [  # (expected rule, task column, line)
    ("exact_duplicate", "ads_generation", rec("ads-a-dup", "ads_generation",
        "  WRITE a catchy advertisement for the stainless-steel kettle below!! ", "steel kettle, 1.7 litres, auto shut off",
        "Different words, same prompt.")),
    ("near_duplicate", "ads_generation", rec("ads-b-near", "ads_generation",
        "Compose two cheerful sentences promoting these trail running shoes.", "Trail shoes, grippy sole, size 42",
        "A new answer.")),
    ("near_duplicate", "product_classification", rec("cls-a-near", "product_classification",
        "Which category does this product belong to, please?", "Leather dog leash, 2 m", CATS[0], options=CATS)),
    ("near_duplicate", "general_qa", rec("qa-a-near", "general_qa", "How can I return an item I bought last week?",
        "", "Use the returns page.")),
    ("echo", "title_rewriting", rec("title-echo", "title_rewriting", "Rewrite this product title, please.",
        "Blue Mug 300 ml", "blue mug, 300 ml")),
    ("label", "product_classification", rec("cls-bad-output", "product_classification",
        "Which category fits this product best?", "Office chair", "Furniture", options=CATS)),
    ("label", "product_classification", rec("cls-bad-option", "product_classification",
        "Which category fits this product best?", "Office chair", "Gadgets", options=[*CATS, "Gadgets"])),
    ("label", "intent_speculation", rec("int-no-options", "intent_speculation", "Why did they buy it?",
        "Gift wrap", INTENTS[0])),
    ("empty", "general_qa", rec("qa-empty", "general_qa", "What is a restocking fee?", "", " ... ")),
    ("empty", "ads_generation", rec("ads-blank", "ads_generation", "Write an ad for this lamp.", "Desk lamp", "   ")),
    ("length", "general_qa", rec("qa-short", "general_qa", "Shipping?", "", "It takes three days.")),
    ("length", "title_rewriting", rec("title-long", "title_rewriting", "Shorten this title.",
        "Mug", " ".join(["word"] * 60))),
    ("duplicate_id", "general_qa", rec("qa-b", "general_qa", "A different question with a reused id?", "", "Yes.")),
    ("schema", "general_qa", {k: v for k, v in rec("qa-noaspects", "general_qa", "Tell me.", "", "No.").items()
                              if k != "aspects"}),
    ("schema", flt.UNKNOWN_TASK, '{"id": "torn", "task": "general'),
    ("schema", flt.UNKNOWN_TASK, rec("bad-task", "poetry", "Write a poem.", "", "Roses...")),
]


def _lines(objs) -> list[tuple[str, str]]:
    return [(f"mem:{i}", o if isinstance(o, str) else json.dumps(o)) for i, o in enumerate(objs, start=1)]


def _config(**overrides) -> flt.FilterConfig:
    bounds = flt.LengthBounds(max_output_words=50)
    return flt.FilterConfig(**{"inputs": (), "out": "unused.jsonl", "lengths": bounds, **overrides})


def test_each_planted_problem_is_removed_by_its_rule_and_counted_per_task():
    result = flt.filter_lines(_lines(CLEAN + [line for _, _, line in PLANTED]), _config())
    assert sorted(r.id for r in result.kept) == sorted(o["id"] for o in CLEAN)
    got = sorted((r.rule, r.task, r.where) for r in result.rejections)
    want = sorted((rule, task, f"mem:{len(CLEAN) + i}") for i, (rule, task, _) in enumerate(PLANTED, start=1))
    assert got == want
    report = result.report.to_json()
    for rule in flt.RULES:
        expected = sum(1 for r, _, _ in PLANTED if r == rule)
        assert report["total"]["removed"][rule] == expected, rule
    assert report["per_task"]["product_classification"]["removed"]["label"] == 2
    assert report["per_task"]["ads_generation"]["removed"]["exact_duplicate"] == 1
    for task, counts in report["per_task"].items():  # nothing silently dropped
        assert counts["read"] == counts["kept"] + sum(counts["removed"].values()), task
    near = {r.obj["id"]: r.details for r in result.rejections if r.rule == "near_duplicate"}
    assert near["ads-b-near"]["duplicate_of"] == "ads-b" and near["ads-b-near"]["rouge_l"] >= 0.7
    assert near["cls-a-near"]["duplicate_of"] == "cls-a"


def test_run_filter_writes_kept_rejects_and_report(tmp_path: Path, capsys):
    data = tmp_path / "in"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps(o) + "\n" for o in CLEAN), encoding="utf-8")
    (data / "b.jsonl").write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n"
                                          for _, _, o in PLANTED), encoding="utf-8")
    out = tmp_path / "filtered.jsonl"
    assert flt.main(["--inputs", str(data), "--out", str(out), "--max-output-words", "50"]) == 0
    assert [r.id for r in read_jsonl(out)] == [o["id"] for o in CLEAN]  # input order kept
    rejects = [json.loads(line) for line in (tmp_path / "filtered.rejects.jsonl").read_text().splitlines()]
    assert sorted(r["rule"] for r in rejects) == sorted(rule for rule, _, _ in PLANTED)
    torn = next(r for r in rejects if r["where"].endswith("b.jsonl:15"))
    assert torn["raw"].startswith('{"id": "torn"') and torn["rule"] == "schema"
    report = json.loads((tmp_path / "filtered.report.json").read_text())
    assert report["total"] == {"read": len(CLEAN) + len(PLANTED), "kept": len(CLEAN),
                               "removed": {rule: sum(1 for r, _, _ in PLANTED if r == rule) for rule in flt.RULES}}
    table = capsys.readouterr().out
    assert "near_duplicate" in table and "product_classification" in table


def test_length_bounds_are_configurable():
    long_answer = rec("t", "title_rewriting", "Shorten this title.", "Mug", " ".join(["word"] * 60))
    assert flt.filter_lines(_lines([long_answer]), _config()).rejections[0].rule == "length"
    relaxed = _config(lengths=flt.LengthBounds(max_output_words=100))
    assert len(flt.filter_lines(_lines([long_answer]), relaxed).kept) == 1


def test_prune_keeps_seeds_first_then_a_seeded_deterministic_choice():
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    records = [rec(f"qa-{i}", "general_qa", " ".join(rng.sample(words, 8)), "", f"Answer {i}.",
                   source="seed" if i < 2 else "expanded:t") for i in range(20)]
    kept = lambda seed: [r.id for r in flt.filter_lines(_lines(records), _config(max_per_task=5, prune_seed=seed)).kept]
    first = kept(0)
    assert len(first) == 5 and {"qa-0", "qa-1"} <= set(first)
    assert kept(0) == first and kept(1) != first
    result = flt.filter_lines(_lines(records), _config(max_per_task=5))
    assert result.report.removed["prune"]["general_qa"] == 15


# ----------------------------------------------------------------------------- ROUGE-L and the index


def test_tokens_and_rouge_l_match_rouge_score_exactly():
    rng = random.Random(0)
    alphabet = ["red", "Red", "kettle", "the", "3x", "l", "é", "Ünïcode", "-", ",", "İ", "k8", "  "]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for _ in range(400):
        a = " ".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        b = " ".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        assert flt.rouge_tokens(a) == rouge_tokenize.tokenize(a, None)
        expected = scorer.score(a, b)["rougeL"].fmeasure
        assert flt.rouge_l(flt.rouge_tokens(a), flt.rouge_tokens(b)) == expected


def _brute_force_near_duplicates(records, threshold):
    """The definition, spelled out with rouge_score: compare with every kept record, first match wins."""
    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def field(a: str, b: str) -> float:
        if not flt.rouge_tokens(a) and not flt.rouge_tokens(b):
            return 1.0 if flt.normalise(a) == flt.normalise(b) else 0.0
        return scorer.score(a, b)["rougeL"].fmeasure

    kept, decisions = [], []
    for r in records:
        match = next((k for k in kept if min(field(r.instruction, k.instruction), field(r.input, k.input))
                      >= threshold), None)
        decisions.append(match.id if match else None)
        if match is None:
            kept.append(r)
    return decisions


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_indexed_near_duplicates_equal_the_brute_force_definition(threshold):
    rng = random.Random(threshold)
    vocab = "red blue kettle mug shoe the a of for size new".split()
    inputs = ["", "", "steel kettle", "blue mug of tea", "size 42 shoe"]
    records = []
    for i in range(160):
        if records and rng.random() < 0.5:  # mutate an earlier record to make many near misses and hits
            words = rng.choice(records).instruction.split()
            words[rng.randrange(len(words))] = rng.choice(vocab)
            instruction = " ".join(words)
        else:
            instruction = " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 12)))
        records.append(parse_record(rec(f"r{i}", "general_qa", instruction, rng.choice(inputs), "x"), "t"))
    got = [original.id if original else None for _, original, _ in flt.near_duplicates(records, threshold)]
    assert got == _brute_force_near_duplicates(records, threshold)
    assert 5 <= sum(g is not None for g in got) < 150  # the case is not trivial either way


def test_index_compares_far_fewer_pairs_than_all_pairs():
    rng = random.Random(1)
    words = [f"w{i}" for i in range(3000)]
    records = [parse_record(rec(f"r{i}", "product_classification", "Which category fits this product best?",
                                    " ".join(rng.choice(words) for _ in range(12)), CATS[0], options=CATS), "t")
               for i in range(1500)]
    entries = [flt._Entry.of(r) for r in records]
    rarity = [collections.Counter(e for en in entries for e in en.elements[f]) for f in range(2)]
    index = flt.NearDuplicateIndex(0.7, rarity)
    for entry in map(index.prepare, entries):
        assert index.match(entry) is None  # same instruction everywhere, different inputs: all kept
        index.add(entry)
    assert index.candidates < 0.01 * len(records) ** 2 / 2  # all pairs: ~1.1e6


def test_a_line_with_bad_bytes_is_one_counted_schema_reject_naming_path_and_line(tmp_path: Path, capsys):
    data = tmp_path / "in.jsonl"
    good = [json.dumps(CLEAN[0]).encode(), json.dumps(CLEAN[7]).encode()]
    data.write_bytes(good[0] + b"\n" + b'{"id": "x\xff", "task": "general_qa"}\n' + good[1] + b"\n")
    out = tmp_path / "out.jsonl"
    assert flt.main(["--inputs", str(data), "--out", str(out)]) == 0
    assert [r.id for r in read_jsonl(out)] == [CLEAN[0]["id"], CLEAN[7]["id"]]  # the rest of the file is read
    rejects = [json.loads(line) for line in (tmp_path / "out.rejects.jsonl").read_text().splitlines()]
    assert [(r["rule"], r["where"]) for r in rejects] == [("schema", f"{data}:2")]
    assert rejects[0]["reason"] == f"{data}:2: (utf-8): not valid UTF-8 (byte b'\\xff' at column 10)"
    report = json.loads((tmp_path / "out.report.json").read_text())
    assert report["total"]["read"] == 3 and report["total"]["removed"]["schema"] == 1
    assert f"{data}:2: (utf-8): not valid UTF-8" in capsys.readouterr().err


def test_a_labels_file_beside_the_input_replaces_the_fixed_set(tmp_path: Path):
    furniture = ["Dining Chairs", "Table Lamps", "Bath Towels"]
    data = tmp_path / "shop.jsonl"
    ok = rec("shop-1", "product_classification", "Which category fits this product best?", "Oak chair with a padded seat",
             "Dining Chairs", options=furniture)
    outside = rec("shop-2", "product_classification", "Which category fits this product best?", "A brass reading lamp",
                  "Table Lamps", options=["Table Lamps", "Floor Lamps"])
    data.write_text(json.dumps(ok) + "\n" + json.dumps(outside) + "\n")
    result = flt.filter_lines(flt.read_lines([str(data)]), flt.FilterConfig(inputs=(str(data),), out="unused"))
    assert [r.rule for r in result.rejections] == ["label", "label"]  # the fixed Google set is the default
    (tmp_path / "shop.labels.json").write_text(json.dumps({"product_classification": furniture}))
    result = flt.filter_lines(flt.read_lines([str(data)]), flt.FilterConfig(inputs=(str(data),), out="unused"))
    assert [r.id for r in result.kept] == ["shop-1"]
    assert [(r.rule, r.where) for r in result.rejections] == [("label", f"{data}:2")]
    assert "label outside the product_classification label set (['Floor Lamps'])" in result.rejections[0].reason
