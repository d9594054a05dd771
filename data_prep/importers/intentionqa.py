"""IntentionQA tasks 1 and 2 -> `intent_speculation` with free-text candidates as options.

* Task 1 (IntentUnderstand; `QA_fullInfo_task1.jsonl` and the harder `..._byRelation.jsonl`): two
  co-purchased products and four candidate intentions ("because they both are a type of USB
  extension cable."); the answer is the gold intention, verbatim.
* Task 2 (IntentUtilize; `QA_fullInfo_task2.jsonl`): product A and the intention; the answer is the
  product B (out of four candidate products) that fits it. Its `options` field is a Python dict
  literal, read with `ast.literal_eval`.

The candidates are the record's `options` (an open label set: the labels file written beside the
output declares `intent_speculation: null`), shuffled per record, and listed in the input. A row
flagged `hadFalseNegative` (a distractor may also be right) is skipped and counted: its gold label
is not the only defensible answer. The ids withheld upstream for independent evaluation are absent
from these files and are not recreated. Records of the same item pair (the upstream id, shared by
the three files) share a split, so task 1 and task 2 about one pair never straddle train and test.
"""

from __future__ import annotations

import ast
import os
from collections.abc import Iterator

from data_prep.importers.core import Draft, Row, RowProblem, Skip, SourceInfo, check_options, jsonl_rows, pick

DIRECTORY = "HKUST-KnowComp_IntentionQA"
FILES = {  # file -> (task variant used in the record key, task number)
    "data/QA_task1/QA_fullInfo/QA_fullInfo_task1.jsonl": ("t1", 1),
    "data/QA_task1/QA_fullInfo/QA_fullInfo_task1_byRelation.jsonl": ("t1r", 1),
    "data/QA_task2/QA_fullInfo/QA_fullInfo_task2.jsonl": ("t2", 2),
}
LICENSE_FILE = f"{DIRECTORY}/LICENSE"
SOURCE = SourceInfo(
    name="intentionqa",
    origin="HKUST-KnowComp/IntentionQA@2b647b4d data/QA_task{1,2}",
    licence="MIT",
    attribution="IntentionQA (Ding et al., 2024), https://github.com/HKUST-KnowComp/IntentionQA, "
                "commit 2b647b4ddc3c79c2f2ff0435ea40add4eb2c2486. Copyright (c) 2024 HKUST-KnowComp. MIT licence.",
)
# Both tasks: the task's question (picked per record from TASK1/TASK2_QUESTIONS), then how to answer.
INSTRUCTIONS = (
    "{question} Answer with exactly one of the candidates, copied as written.",
    "{question} Reply with the best candidate only.",
    "{question} Choose one option from the list and write it out exactly.",
    "{question} Pick the single most plausible candidate and give it verbatim.",
)
TASK1_QUESTIONS = (
    "A customer bought the two products below together. Why did they most likely buy both?",
    "Infer the purchase intention behind buying these two items together.",
    "What is the most plausible reason a shopper bought item A and item B together?",
    "These products were co-purchased. Which intention best explains it?",
)
TASK2_QUESTIONS = (
    "A customer bought item A with the intention given. Which product did they most likely buy with it?",
    "Given the first purchase and the shopper's intention, which item completes the order?",
    "Which candidate product fits the stated purchase intention together with item A?",
    "Pick the product this customer bought alongside item A, given why they were shopping.",
)
INPUT_TEMPLATES = (
    "{situation}\nCandidates:\n{options_lines}",
    "{situation}\nOptions: {options}",
)
LABEL_SETS = {"intent_speculation": None}  # open: each record's own candidates


def _intention(assertion: str) -> str:
    """The "because ..." clause of an assertion "PersonX bought ... because ...", else the whole text."""
    cut = assertion.find("because")
    return assertion[cut:].strip() if cut >= 0 else assertion.strip()


def _options(obj: dict, where: str) -> dict | RowProblem:
    options = obj.get("options")
    if isinstance(options, str):
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError) as error:
            return RowProblem(where, "options", "not a dict literal", str(error))
    if not isinstance(options, dict) or not all(isinstance(v, str) for v in options.values()):
        return RowProblem(where, "options", "not a mapping of letters to text", repr(options)[:80])
    return {k: v.strip() for k, v in options.items()}


def convert_row(obj: dict, where: str, variant: str, task_number: int) -> Draft | Skip | RowProblem:
    """One upstream question as a draft, or why it is not one."""
    for field in ("id", "item_a_name", "item_b_name", "assertion", "gold_ind"):
        if not isinstance(obj.get(field), str) or not obj[field].strip():
            return RowProblem(where, field, "missing or empty")
    if obj.get("hadFalseNegative"):
        return Skip(where, "hadFalseNegative (a distractor may also be right)")
    options = _options(obj, where)
    if isinstance(options, RowProblem):
        return options
    if obj["gold_ind"] not in options:
        return RowProblem(where, "gold_ind", "not an option letter", repr(obj["gold_ind"]))
    output = options[obj["gold_ind"]]
    problem = check_options(list(options.values()), output, where, "options")
    if problem:
        return problem
    a, b = obj["item_a_name"].strip(), obj["item_b_name"].strip()
    if task_number == 1:
        situation = f"Item A: {a}\nItem B: {b}"
    else:
        situation = f"Item A: {a}\nIntention: the shopper bought item A and another product {_intention(obj['assertion'])}"
    key = f"{variant}-{obj['id']}"
    question = pick(TASK1_QUESTIONS if task_number == 1 else TASK2_QUESTIONS, key)
    return Draft(key=key, group=f"intentionqa\x1f{obj['id']}", task="intent_speculation", input="", output=output,
                 aspects=("customer", "platform"), options=tuple(options.values()),
                 template_fields={"situation": situation, "question": question})


def rows(data_root: str) -> Iterator[Row]:
    for name, (variant, task_number) in FILES.items():
        for where, obj in jsonl_rows(os.path.join(data_root, DIRECTORY, name)):
            yield where, obj if isinstance(obj, RowProblem) else convert_row(obj, where, variant, task_number)
