"""hetPQA answer generation -> `general_qa`: answer a shopper's question from one piece of evidence.

Rows (tab-separated): ASIN, question, candidate (an evidence text from one of six sources: attribute,
bullet, description, on-site publication, review, community answer), answer (written by annotators
from that evidence), source. Only the released train and dev files are read; the test split is
withheld for independent evaluation and is neither read nor recreated. Records about the same
(ASIN, question) share a split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_prep.importers.core import Draft, Row, SourceInfo, content_key, csv_rows, required_text

DIRECTORY = "amazon-science_contextual-product-qa"
FILES = ("hetPQA/answer_generation/train.csv", "hetPQA/answer_generation/dev.csv")
COLUMNS = ("ASIN", "question", "candidate", "answer", "source")
LICENSE_FILE = f"{DIRECTORY}/LICENSE"
SOURCE = SourceInfo(
    name="hetpqa",
    origin="amazon-science/contextual-product-qa@cec976cc hetPQA/answer_generation",
    licence="CDLA-Sharing-1.0",
    attribution="hetPQA (Shen et al., ECNLP 2022), https://github.com/amazon-science/contextual-product-qa, "
                "commit cec976cc2f2218aa76e562ecc9c7d79f1f3271bc. Copyright Amazon.com, Inc. or its affiliates. "
                "CDLA-Sharing-1.0.",
)
EVIDENCE_NAMES = {"attribute": "product attribute", "bullet": "product bullet point", "Desc": "product description",
                  "OSP": "on-site publication", "review": "customer review", "CQA": "community answer"}
INSTRUCTIONS = (
    "Answer the customer's question about this product, using only the evidence given.",
    "A shopper asked the question below. Write a short, natural answer based on the {evidence_name}.",
    "Using the information provided, reply to the buyer's product question in one or two sentences.",
    "Write the answer a helpful store assistant would give to this question, relying only on the evidence.",
    "Respond to the product question below. Do not add facts that the evidence does not support.",
    "Turn the evidence into a direct answer to the customer's question.",
)
INPUT_TEMPLATES = (
    "Question: {question}\nEvidence ({evidence_name}): {candidate}",
    "Customer question: {question}\nFrom the {evidence_name}: {candidate}",
)
LABEL_SETS = None  # no choice task


def rows(data_root: str) -> Iterator[Row]:
    for name in FILES:
        for where, row in csv_rows(os.path.join(data_root, DIRECTORY, name), COLUMNS, delimiter="\t"):
            if not isinstance(row, dict):
                yield where, row
                continue
            values = required_text(row, ("ASIN", "question", "candidate", "answer"), where)
            if not isinstance(values, dict):
                yield where, values
                continue
            evidence_name = EVIDENCE_NAMES.get(row.get("source", "").strip(), "product page")
            yield where, Draft(
                key=content_key(values["ASIN"], values["question"], values["candidate"], values["answer"]),
                group=f"{values['ASIN']}\x1f{values['question'].lower()}",
                task="general_qa", input="", output=values["answer"], aspects=("customer",),
                template_fields={**values, "evidence_name": evidence_name},
            )
