"""semiPQA data-to-text -> `ads_generation`: one fluent product sentence from an attribute record.

Rows (tab-separated): data (a JSON-like attribute record, e.g. `brand: { value:"CHANEL" }`), text
(a sentence annotators wrote for it). Why `ads_generation`: of the five schema tasks it is the one
whose input is product attributes and whose output is product-page text for shoppers, scored by
BLEU/ROUGE; the instructions ask for the plain, factual end of that range (one sentence, no hype).
`general_qa` would need a question and `title_rewriting` a title. Files read: train, dev and
test_seen; the `test_unseen` split is withheld for independent evaluation and neither read nor
recreated. Records with the same attribute record share a split.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from data_prep.importers.core import Draft, Row, SourceInfo, content_key, csv_rows, required_text

DIRECTORY = "amazon-science_contextual-product-qa"
FILES = ("semiPQA/data-to-text/train.csv", "semiPQA/data-to-text/dev.csv", "semiPQA/data-to-text/test_seen.csv")
COLUMNS = ("data", "text")
LICENSE_FILE = f"{DIRECTORY}/LICENSE"
SOURCE = SourceInfo(
    name="semipqa",
    origin="amazon-science/contextual-product-qa@cec976cc semiPQA/data-to-text",
    licence="CDLA-Sharing-1.0",
    attribution="semiPQA (Shen et al., ECNLP 2022), https://github.com/amazon-science/contextual-product-qa, "
                "commit cec976cc2f2218aa76e562ecc9c7d79f1f3271bc. Copyright Amazon.com, Inc. or its affiliates. "
                "CDLA-Sharing-1.0.",
)
INSTRUCTIONS = (
    "Turn this product attribute record into one fluent sentence for the product page.",
    "Write a single plain sentence that tells a shopper what this attribute data says.",
    "Describe the product attribute below in natural language, in one short factual sentence.",
    "Present this structured product data to a customer as one clear sentence.",
    "Rewrite the attribute record as a sentence a shopper can read at a glance. State only what it contains.",
)
INPUT_TEMPLATES = ("Attributes: {data}", "{data}")
LABEL_SETS = None


def rows(data_root: str) -> Iterator[Row]:
    for name in FILES:
        for where, row in csv_rows(os.path.join(data_root, DIRECTORY, name), COLUMNS, delimiter="\t"):
            if not isinstance(row, dict):
                yield where, row
                continue
            values = required_text(row, COLUMNS, where)
            if not isinstance(values, dict):
                yield where, values
                continue
            yield where, Draft(
                key=content_key(values["data"], values["text"]), group=f"semipqa\x1f{values['data']}",
                task="ads_generation", input="", output=values["text"], aspects=("seller", "platform"),
                template_fields=values,
            )
