"""Importers: real shared data -> valid records with counts; bad rows reported by file:line; stable splits.

The tests on ../shared/data are skipped where it is absent (a fresh clone); the generic converter
and the evaluation of our own label sets use the small files in tests/data/.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from data_prep import importers
from data_prep.importers import core, generic, intentionqa
from data_prep.importers.__main__ import main as importers_main
from llama_e_jax import evaluate, metrics, scoring
from llama_e_jax.data.schema import InvalidRecordsError, read_jsonl
from llama_e_jax.data.tfds_builder import fixed_split_of, split_by_file

DATA = Path(__file__).parent / "data"
SHARED = importers.default_data_root()
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason=f"{SHARED} (the shared datasets) is absent")
EXPECTED = {  # source -> (rows read, records written, skipped, bad rows), as counted in the shared files
    "hetpqa": (4091, 4091, 0, 0),
    "epqa": (9770, 3355, 6415, 0),
    "semipqa": (2797, 2796, 1, 0),
    "intentionqa": (5949, 5544, 163, 242),
}


@needs_shared
@pytest.mark.parametrize("name", sorted(importers.SOURCES))
def test_each_importer_accounts_for_every_row_of_the_real_data(name, tmp_path):
    imported = importers.import_source(name, SHARED)
    report = imported.report
    rows, written, skipped, bad = EXPECTED[name]
    assert (report.rows, sum(report.written.values()), sum(report.skipped.values()), len(report.problems)) == \
        (rows, written, skipped, bad)
    assert report.rows == sum(report.written.values()) + sum(report.skipped.values()) + len(report.problems)
    for problem in report.problems:  # each bad row names file:line: field: reason
        assert str(problem).startswith(os.path.join(SHARED, "")) and ": options: " in str(problem)
    assert 0.85 < report.written["train"] / written < 0.95  # a 90/5/5 cut of groups
    directory = importers.write_source(imported, str(tmp_path))
    records = [r for split in core.SPLITS for r in read_jsonl(os.path.join(directory, f"{split}.jsonl"))]
    assert len(records) == written and len({r.id for r in records}) == written
    assert all(imported.source.licence in r.source and r.aspects for r in records)
    assert (Path(directory) / "ATTRIBUTION.txt").read_text().count(imported.source.licence) >= 1
    assert (Path(directory) / "LICENSE").is_file()
    assert len({r.instruction for r in records}) > 3  # instructions vary by template


@needs_shared
def test_intention_candidates_are_shuffled_and_groups_never_straddle_splits():
    imported = importers.import_source("intentionqa", SHARED)
    positions = [r.options.index(r.output) for split in core.SPLITS for r in imported.splits[split]]
    counts = [positions.count(k) for k in range(4)]
    assert min(counts) > 0.2 * len(positions)  # upstream gold letters are not kept in place
    split_of_pair: dict[str, str] = {}
    for split, records in imported.splits.items():
        for record in records:
            pair = record.id.split("-", 2)[2]  # intentionqa-<variant>-<upstream id>
            assert split_of_pair.setdefault(pair, split) == split
    record = imported.splits["train"][0]
    assert all(option in record.input for option in record.options)  # the model sees what it chooses from


def test_split_and_templates_are_deterministic_functions_of_ids():
    assert core.split_of("epqa-q18") == core.split_of("epqa-q18")
    splits = [core.split_of(f"group-{i}") for i in range(4000)]
    assert 0.04 < splits.count("test") / 4000 < 0.06 and 0.04 < splits.count("validation") / 4000 < 0.06
    assert core.shuffled(["a", "b", "c", "d"], "x-1") == core.shuffled(["a", "b", "c", "d"], "x-1")
    assert len({core.shuffled(["a", "b", "c", "d"], f"x-{i}") for i in range(50)}) > 10


def test_intentionqa_bad_rows_are_problems_and_false_negatives_skips():
    row = {"id": "FS_9", "item_a_name": "Tent", "item_b_name": "Sleeping bag", "gold_ind": "A",
           "assertion": "PersonX bought ... because they are for camping.",
           "options": {"A": "because they are for camping.", "B": "because they are red."}}
    assert isinstance(intentionqa.convert_row(row, "f:1", "t1", 1), core.Draft)
    assert isinstance(intentionqa.convert_row(dict(row, hadFalseNegative=1), "f:2", "t1", 1), core.Skip)
    problem = intentionqa.convert_row(dict(row, options={"A": "because they are for camping."}), "f:3", "t1", 1)
    assert str(problem) == "f:3: options: fewer than 2 options (['because they are for camping.'])"
    problem = intentionqa.convert_row(dict(row, gold_ind="C"), "f:4", "t1", 1)
    assert str(problem) == "f:4: gold_ind: not an option letter ('C')"
    task2 = dict(row, options="{'A': 'Tent stakes', 'B': \"Kid's sleeping bag\"}", gold_ind="B")
    draft = intentionqa.convert_row(task2, "f:5", "t2", 2)
    assert draft.output == "Kid's sleeping bag" and "Intention: " in draft.template_fields["situation"]


def test_csv_bad_bytes_and_short_rows_cost_one_row_each(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b"data\ttext\nbrand: A\tThe brand is A.\nbrand: \xff\tbad\nonly one column\n")
    rows = list(core.csv_rows(str(path), ("data", "text"), delimiter="\t"))
    assert [(w, type(r).__name__) for w, r in rows] == [(f"{path}:2", "dict"), (f"{path}:3", "RowProblem"),
                                                        (f"{path}:4", "RowProblem")]
    assert str(rows[1][1]) == f"{path}:3: (utf-8): not valid UTF-8"
    assert str(rows[2][1]) == f"{path}:4: (row): expected 2 columns (got 1)"


def test_generic_converter_maps_a_shop_csv_and_reports_bad_rows(tmp_path, capsys):
    out = tmp_path / "out"
    code = importers_main(["--spec", str(DATA / "shop_spec.json"), "--files", str(DATA / "shop_catalogue.csv"),
                           "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr()
    assert "shop: 6 rows -> 4 records" in printed.out and "2 bad rows" in printed.out
    assert "shop_catalogue.csv:6: category: label outside the declared label set ('Sofas')" in printed.err
    assert "shop_catalogue.csv:7: title: empty" in printed.err  # line 6 of the data + the two-line note
    labels = json.loads((out / "shop" / "labels.json").read_text())["product_classification"]
    records = [r for s in core.SPLITS for r in read_jsonl(out / "shop" / f"{s}.jsonl")]  # its labels file applies
    assert sorted(r.id for r in records) == ["shop-A-1", "shop-A-2", "shop-A-3", "shop-A-6"]
    for record in records:
        assert 2 <= len(record.options) <= 4 and record.output in record.options
        assert set(record.options) <= set(labels) and "Candidates: " in record.input


def test_generic_spec_errors_name_the_field(tmp_path):
    spec = json.loads((DATA / "shop_spec.json").read_text())
    for change, expected in [({"task": "poetry"}, "task: unknown task"), ({"labels": ["One"]}, "labels: needs at least 2"),
                             ({"colour": 1}, "(spec): unknown fields ['colour']"), ({"instructions": []}, "instructions")]:
        path = tmp_path / "spec.json"
        path.write_text(json.dumps({**spec, **change}))
        with pytest.raises(ValueError, match=rf"spec.json: {re.escape(expected)}"):
            generic.load_spec(str(path))


# ------------------------------------------------------------------ evaluating our own label sets

def test_own_label_sets_evaluate_without_a_refused_line():
    for name, task in (("furniture_query_category.jsonl", "product_classification"),
                       ("free_text_intentions.jsonl", "intent_speculation")):
        records, source = evaluate.load_records(str(DATA / name), "test", "seed", None)
        assert source.endswith(name) and records and all(r.task == task and not r.aspects for r in records)
        replies = [evaluate.Reply(text=f"Answer: {r.output}", tokens=5, finish_reason="stop") for r in records]
        replies[0] = evaluate.Reply(text=records[0].options[-1] if records[0].options[-1] != records[0].output
                                    else records[0].options[0], tokens=5, finish_reason="stop")
        replies[1] = evaluate.Reply(text="none of these", tokens=3, finish_reason="stop")
        scores, details = evaluate.score_task(task, records, replies, [scoring.ReferenceNll() for _ in records])
        n = len(records)
        assert scores["accuracy"] == pytest.approx(100.0 * (n - 2) / n)  # exact count over n records
        assert scores["out_of_set_rate"] == pytest.approx(100.0 / n) and details[1]["in_set"] is False
        assert scores["macro_f1"] == pytest.approx(100.0 * metrics.macro_f1(
            [d["matched_label"] for d in details], [r.output for r in records]))


def test_a_label_outside_the_declared_set_is_a_per_line_error():
    path = DATA / "furniture_out_of_set.jsonl"
    with pytest.raises(InvalidRecordsError) as info:
        evaluate.load_records(str(path), "test", "seed", None)
    text = str(info.value)
    assert text.startswith("2 invalid record(s) [")
    assert f"{path}:2: options: label outside the product_classification label set (['Desk Lamps'])" in text
    assert f"{path}:4: options: label outside the product_classification label set (['Shelving'])" in text


def test_files_named_by_split_keep_it_in_the_tfds_dataset():
    assert [fixed_split_of(p) for p in ("a/test.jsonl", "m/x.train.jsonl", "seeds/ads.jsonl")] == ["test", "train", None]
    seeds = read_jsonl(DATA / "free_text_intentions.jsonl", require_aspects=False, label_sets={})
    shop = read_jsonl(DATA / "furniture_query_category.jsonl", require_aspects=False)
    splits = split_by_file(seeds + shop, [("seeds/intents.jsonl", len(seeds)), ("shop/test.jsonl", len(shop))])
    assert splits["test"][-len(shop):] == shop and sum(map(len, splits.values())) == len(seeds) + len(shop)
