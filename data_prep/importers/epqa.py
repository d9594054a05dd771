"""ePQA (dev) -> `general_qa`: answer a question from an evidence sentence and the product title.

Rows (comma-separated): qid, question, ASIN, candidate (an evidence sentence), source, qa_pair_id,
title, label (2 fully answers, 1 helps, 0 irrelevant), answer (written only when the candidate
answers). A row with label 0 or without an answer has no reference and is skipped, counted as such
(not a defect of the file). Records of the same question (qid) share a split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_prep.importers.core import Draft, RowProblem, Row, Skip, SourceInfo, csv_rows, required_text

DIRECTORY = "amazon-science_contextual-product-qa"
FILES = ("ePQA/dev.csv",)
COLUMNS = ("qid", "question", "ASIN", "candidate", "source", "qa_pair_id", "title", "label", "answer")
LICENSE_FILE = f"{DIRECTORY}/LICENSE"
SOURCE = SourceInfo(
    name="epqa",
    origin="amazon-science/contextual-product-qa@cec976cc ePQA/dev.csv",
    licence="CDLA-Sharing-1.0",
    attribution="ePQA (Shen et al., 2023, arXiv:2305.09249), https://github.com/amazon-science/contextual-product-qa, "
                "commit cec976cc2f2218aa76e562ecc9c7d79f1f3271bc. Copyright Amazon.com, Inc. or its affiliates. "
                "CDLA-Sharing-1.0.",
)
INSTRUCTIONS = (
    "Answer the shopper's question about the product, based only on the evidence shown.",
    "Write a natural-sounding answer to this product question using the evidence sentence.",
    "A customer asked about this item. Give a short answer supported by the evidence.",
    "Reply to the question as the store would, without going beyond the evidence.",
    "Use the evidence to answer the customer's question in a sentence or two.",
)
INPUT_TEMPLATES = (
    "Product: {title}\nQuestion: {question}\nEvidence: {candidate}",
    "Question about \"{title}\": {question}\nRelevant text: {candidate}",
)
LABEL_SETS = None


def rows(data_root: str) -> Iterator[Row]:
    for name in FILES:
        for where, row in csv_rows(os.path.join(data_root, DIRECTORY, name), COLUMNS):
            if not isinstance(row, dict):
                yield where, row
                continue
            label = row["label"].strip()
            if label not in ("0", "1", "2"):
                yield where, RowProblem(where, "label", "not 0, 1 or 2", repr(label))
                continue
            if label == "0" or not row["answer"].strip():
                yield where, Skip(where, "candidate does not answer (label 0 or no answer)")
                continue
            values = required_text(row, ("qid", "question", "title", "candidate", "answer", "qa_pair_id"), where)
            if not isinstance(values, dict):
                yield where, values
                continue
            yield where, Draft(
                key=f"{values['qid']}-{values['qa_pair_id']}", group=f"epqa-q{values['qid']}",
                task="general_qa", input="", output=values["answer"], aspects=("customer",), template_fields=values,
            )
