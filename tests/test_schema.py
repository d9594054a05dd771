"""The instruction record: validation errors name file:line, field and reason; nothing is dropped silently."""

from __future__ import annotations

import json
import logging

import pytest

from llama_e_jax.data.labels import PRODUCT_CATEGORIES, PURCHASE_INTENTS, LabelFileError
from llama_e_jax.data.schema import (
    InstructionRecord,
    InvalidRecordsError,
    RecordError,
    parse_record,
    read_jsonl,
    read_jsonl_files,
    read_jsonl_with_report,
    write_jsonl,
)


def ad_record(**changes) -> dict:
    obj = {
        "id": "ads-1",
        "task": "ads_generation",
        "instruction": "Write a short ad for this product.",
        "input": "Product: waterproof hiking boots",
        "output": "Conquer every trail, rain or shine.",
        "aspects": ["seller", "platform"],
        "source": "seed",
    }
    obj.update(changes)
    return obj


def classification_record(**changes) -> dict:
    obj = {
        "id": "cls-1",
        "task": "product_classification",
        "instruction": "Which category does this product belong to?",
        "input": "Stainless steel dog bowl",
        "output": "Animals & Pet Supplies",
        "aspects": ["platform"],
        "source": "seed",
        "options": ["Animals & Pet Supplies", "Home & Garden", "Hardware"],
    }
    obj.update(changes)
    return obj


def write_lines(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def error_for(obj) -> str:
    with pytest.raises(RecordError) as info:
        parse_record(obj, "f.jsonl:7")
    return str(info.value)


def test_valid_records_parse_to_tuples():
    record = parse_record(classification_record(), "f.jsonl:1")
    assert record.aspects == ("platform",)
    assert record.options == ("Animals & Pet Supplies", "Home & Garden", "Hardware")
    assert parse_record(ad_record(input=""), "f.jsonl:1").options is None


def test_error_text_is_path_line_field_reason():
    assert error_for(ad_record(task="haiku")).startswith("f.jsonl:7: task: unknown task ('haiku'")
    obj = ad_record()
    del obj["output"]
    assert error_for(obj) == "f.jsonl:7: output: missing"


@pytest.mark.parametrize(
    "obj, expected",
    [
        (ad_record(instruction="   "), "f.jsonl:7: instruction: must not be empty"),
        (ad_record(output=""), "f.jsonl:7: output: must not be empty"),
        (ad_record(input=3), "f.jsonl:7: input: must be a string (got int)"),
        (ad_record(aspects=[]), "f.jsonl:7: aspects: must not be empty"),
        (ad_record(aspects="seller"), "f.jsonl:7: aspects: must be a list of strings"),
        (ad_record(aspects=["buyer"]), "f.jsonl:7: aspects: unknown aspect"),
        (ad_record(aspects=["seller", "seller"]), "f.jsonl:7: aspects: has duplicates"),
        (ad_record(lang="en"), "f.jsonl:7: lang: unknown field"),
        (ad_record(options=["Hardware"]), "f.jsonl:7: options: only allowed for"),
        (classification_record(options=None), "f.jsonl:7: options: required for task product_classification"),
        (classification_record(options=["Animals & Pet Supplies", "Dog stuff"]),
         "f.jsonl:7: options: label outside the product_classification label set (['Dog stuff'])"),
        (classification_record(output="Hardware "), "f.jsonl:7: output: not one of the options"),
        ([1, 2], "f.jsonl:7: (record): must be a JSON object"),
    ],
)
def test_each_rule_names_field_and_reason(obj, expected):
    assert error_for(obj).startswith(expected)


def test_label_sets_are_per_task():
    intent = classification_record(
        task="intent_speculation", options=list(PURCHASE_INTENTS[:3]), output=PURCHASE_INTENTS[1]
    )
    assert parse_record(intent, "f:1").task == "intent_speculation"
    wrong_set = dict(intent, options=list(PRODUCT_CATEGORIES[:2]), output=PRODUCT_CATEGORIES[0])
    assert "label outside the intent_speculation label set" in error_for(wrong_set)


def test_read_jsonl_raises_all_errors_with_file_and_line(tmp_path):
    missing = ad_record(id="ads-3")
    del missing["source"]
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [ad_record(id="ads-1"), '{"id": "ads-2", ', "", missing, ad_record(id="ads-4", task="poetry"),
         classification_record(options=["Hardware", "Gadgets"], output="Hardware")],
    )
    with pytest.raises(InvalidRecordsError) as info:
        read_jsonl(path)
    err = info.value
    assert isinstance(err, RecordError) and isinstance(err, ValueError)
    assert [(e.where, e.field) for e in err.errors] == [
        (f"{path}:2", "(json)"),
        (f"{path}:4", "source"),  # line 3 is blank and skipped
        (f"{path}:5", "task"),
        (f"{path}:6", "options"),
    ]
    text = str(err)
    assert text.startswith("4 invalid record(s) [(json): malformed JSON x1, source: missing x1, "
                           "task: unknown task x1, options: label outside the product_classification label set x1]:")
    assert f"{path}:2: (json): malformed JSON" in text
    assert f"{path}:4: source: missing" in text
    assert f"{path}:5: task: unknown task ('poetry'" in text
    assert f"{path}:6: options: label outside the product_classification label set (['Gadgets'])" in text


def test_skip_invalid_returns_valid_records_and_reports_counts(tmp_path, caplog):
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [ad_record(id="a"), "not json", ad_record(id="b", task="x"), ad_record(id="c", task="y"),
         ad_record(id="d")],
    )
    with caplog.at_level(logging.WARNING):
        records, report = read_jsonl_with_report(path, skip_invalid=True)
    assert [r.id for r in records] == ["a", "d"]
    assert (report.num_lines, report.num_valid, report.num_invalid) == (5, 2, 3)
    assert report.counts_by_reason() == {"task: unknown task": 2, "(json): malformed JSON": 1}
    assert "2 valid of 5 records; 3 invalid" in caplog.text
    assert "task: unknown task x2" in caplog.text


def test_duplicate_ids_within_and_across_files(tmp_path):
    first = write_lines(tmp_path / "a.jsonl", [ad_record(id="x"), ad_record(id="y")])
    second = write_lines(tmp_path / "b.jsonl", [ad_record(id="z"), ad_record(id="x")])
    with pytest.raises(InvalidRecordsError) as info:
        read_jsonl_files([first, second])
    assert str(info.value.errors[0]) == f"{second}:2: id: duplicate id (first at {first}:1)"
    records, reports = read_jsonl_files([first, second], skip_invalid=True)
    assert [r.id for r in records] == ["x", "y", "z"]
    assert [r.num_invalid for r in reports] == [0, 1]


def test_write_then_read_round_trips_exactly(tmp_path):
    records = [
        parse_record(ad_record(input="", output="Línea 1\nLínea 2 — ✓ \"quoted\""), "m:1"),
        parse_record(classification_record(), "m:2"),
    ]
    path = tmp_path / "out" / "records.jsonl"
    assert write_jsonl(path, records) == 2
    assert read_jsonl(path) == records
    first_line = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert "options" not in first_line and first_line["aspects"] == ["seller", "platform"]
    assert "✓" in path.read_text(encoding="utf-8")  # UTF-8, not \u escapes


def test_write_refuses_invalid_record_and_leaves_no_file(tmp_path):
    bad = InstructionRecord(
        id="q", task="general_qa", instruction="Q?", input="", output="", aspects=("customer",), source="seed"
    )
    path = tmp_path / "records.jsonl"
    with pytest.raises(RecordError, match=r"records.jsonl:1: output: must not be empty"):
        write_jsonl(path, [bad])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ open and declared label sets

FURNITURE = ["Dining Chairs", "Table Lamps", "Bath Towels", "Bookcases"]


def furniture_record(id_="shop-1", **changes) -> dict:
    fields = {"input": "Solid oak chair, padded seat, set of 2", "output": "Dining Chairs", "options": FURNITURE[:3]}
    return classification_record(id=id_, **{**fields, **changes})


def test_open_label_sets_accept_any_options_that_contain_the_output():
    record = parse_record(furniture_record(), "f:1", label_sets={})
    assert record.options == tuple(FURNITURE[:3])
    intention = classification_record(task="intent_speculation", output="because both keep the same laptop running",
                                      options=["because both keep the same laptop running", "because both are red"])
    assert parse_record(intention, "f:1", label_sets={}).output.startswith("because")
    assert "label outside the product_classification label set" in error_for(furniture_record())  # fixed by default


@pytest.mark.parametrize("options, expected", [
    (["Dining Chairs"], "options: needs at least 2 labels"),
    (["Dining Chairs", "Dining Chairs"], "options: has duplicates"),
    (["Dining Chairs", " "], "options: has an empty entry"),
    (["Table Lamps", "Bath Towels"], "output: not one of the options"),
])
def test_open_options_still_need_two_distinct_labels_with_the_output(options, expected):
    with pytest.raises(RecordError, match=expected):
        parse_record(furniture_record(options=options), "f:1", label_sets={})


def test_a_labels_file_beside_the_jsonl_declares_the_set_and_out_of_set_lines_are_reported(tmp_path):
    lines = [furniture_record("s1"), furniture_record("s2", options=["Dining Chairs", "Sofas"]),
             furniture_record("s3"), furniture_record("s4", options=["Dining Chairs", "Rugs", "Sofas"])]
    path = write_lines(tmp_path / "shop.jsonl", lines)
    (tmp_path / "shop.labels.json").write_text(json.dumps({"product_classification": FURNITURE}))
    with pytest.raises(InvalidRecordsError) as info:
        read_jsonl(path, label_sets={})  # the declared set applies even to an otherwise open reader
    text = str(info.value)
    assert text.startswith("2 invalid record(s) [options: label outside the product_classification label set x2]:")
    assert f"{path}:2: options: label outside the product_classification label set (['Sofas'])" in text
    assert f"{path}:4: options: label outside the product_classification label set (['Rugs', 'Sofas'])" in text
    records, report = read_jsonl_with_report(path, skip_invalid=True)
    assert [r.id for r in records] == ["s1", "s3"] and report.counts_by_reason() == {
        "options: label outside the product_classification label set": 2}


def test_a_directory_labels_file_can_leave_a_task_open_and_bad_ones_are_clear(tmp_path):
    path = write_lines(tmp_path / "intent.jsonl", [furniture_record()])
    (tmp_path / "labels.json").write_text(json.dumps({"product_classification": None}))
    assert len(read_jsonl(path)) == 1  # null = open, overriding the fixed default
    (tmp_path / "labels.json").write_text(json.dumps({"product_classification": ["Only one"]}))
    with pytest.raises(LabelFileError, match=r"labels.json: product_classification: needs at least 2 distinct"):
        read_jsonl(path)
    (tmp_path / "labels.json").write_text(json.dumps({"general_qa": ["a", "b"]}))
    with pytest.raises(LabelFileError, match=r"labels.json: general_qa: not a choice task"):
        read_jsonl(path)


def test_aspects_are_optional_only_when_the_reader_says_so(tmp_path):
    obj = ad_record()
    del obj["aspects"]
    assert error_for(obj) == "f.jsonl:7: aspects: missing"
    record = parse_record(obj, "f:1", require_aspects=False)
    assert record.aspects == () and "aspects" not in record.to_json()
    path = str(tmp_path / "out.jsonl")
    write_jsonl(path, [record])  # written without aspects; reads back for evaluation
    assert read_jsonl(path, require_aspects=False) == [record]
    with pytest.raises(InvalidRecordsError, match="aspects: missing"):
        read_jsonl(path)  # training data keeps requiring them


def test_a_line_that_is_not_utf8_is_one_error_with_its_line(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(ad_record(id="a")).encode() + b"\n\xff\xfe\n" + json.dumps(ad_record(id="b")).encode())
    records, report = read_jsonl_with_report(path, skip_invalid=True)
    assert [r.id for r in records] == ["a", "b"]
    assert [str(e) for e in report.errors] == [f"{path}:2: (utf-8): not valid UTF-8 (byte b'\\xff' at column 1)"]
