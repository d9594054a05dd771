"""The fixed label sets of the two classification-style tasks.

LLaMA-E's product classification and purchase-intent speculation answer with one label from a closed
set, so that accuracy and macro-F1 are well defined and a reply outside the set can be counted as such.
The sets live here, in one place, and everything that writes or checks a label (seed set, teacher
expansion, filters, evaluation) imports them.

* Product categories are the 21 top-level categories of the Google product taxonomy
  (https://www.google.com/basepages/producttype/taxonomy.en-US.txt), spelled exactly as there.
* Purchase intents are a project-defined set of 14 reasons a customer buys, phrased as short noun
  phrases; they cover the co-purchase intentions of IntentionQA at a coarser grain.

These fixed sets are *defaults* (for the seeds, teacher expansion and the filters). A shop's own
dataset declares its own sets in a labels file (below), or leaves a task open, so that a model can
learn to choose among any labels it is shown rather than memorise one vocabulary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence

PRODUCT_CATEGORIES: tuple[str, ...] = (
    "Animals & Pet Supplies",
    "Apparel & Accessories",
    "Arts & Entertainment",
    "Baby & Toddler",
    "Business & Industrial",
    "Cameras & Optics",
    "Electronics",
    "Food, Beverages & Tobacco",
    "Furniture",
    "Hardware",
    "Health & Beauty",
    "Home & Garden",
    "Luggage & Bags",
    "Mature",
    "Media",
    "Office Supplies",
    "Religious & Ceremonial",
    "Software",
    "Sporting Goods",
    "Toys & Games",
    "Vehicles & Parts",
)

PURCHASE_INTENTS: tuple[str, ...] = (
    "buying a gift",
    "replacing a worn-out or broken item",
    "upgrading to a better product",
    "stocking up on consumables",
    "completing a set with a complementary item",
    "preparing for an event or trip",
    "starting a new hobby or activity",
    "setting up a new home or room",
    "caring for a baby or child",
    "caring for a pet",
    "improving health or fitness",
    "seasonal or weather need",
    "work or business use",
    "researching before buying",
)

LABEL_SETS: dict[str, tuple[str, ...]] = {
    "product_classification": PRODUCT_CATEGORIES,
    "intent_speculation": PURCHASE_INTENTS,
}

# ------------------------------------------------------------------------------ declared label sets
#
# A dataset may declare its own label set per task in a labels file beside its JSONL: for `x.jsonl`,
# `x.labels.json`, else `labels.json` in the same directory. The file is one JSON object mapping a
# choice task to its labels, or to `null` for an *open* set (each record's own `options` are its
# candidates, as in IntentionQA's free-text intentions):
#
#     {"product_classification": ["Dining Chairs", "Table Lamps", "Bath Towels"],
#      "intent_speculation": null}
#
# A task the file does not name falls back to the reader's default (the fixed sets above for seeds,
# expansion and filters; open for evaluation and generation).

LABELS_FILE_SUFFIX = ".labels.json"
DIRECTORY_LABELS_FILE = "labels.json"
LabelSets = dict[str, "tuple[str, ...] | None"]  # task -> labels; None = open (per-record options)


class LabelFileError(ValueError):
    """A malformed labels file; `str()` is `path: task: reason`."""


def labels_file_for(jsonl_path: str | os.PathLike) -> str | None:
    """The labels file declaring `jsonl_path`'s label sets, or None when there is none."""
    path = os.fspath(jsonl_path)
    stem = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
    for candidate in (stem + LABELS_FILE_SUFFIX, os.path.join(os.path.dirname(path), DIRECTORY_LABELS_FILE)):
        if os.path.isfile(candidate):
            return candidate
    return None


def read_label_file(path: str | os.PathLike) -> LabelSets:
    """Parse and check a labels file: choice tasks only, each a list of >= 2 distinct non-empty labels, or null."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LabelFileError(f"{path}: (json): not a JSON object of label sets ({error})") from None
    if not isinstance(obj, dict):
        raise LabelFileError(f"{path}: (json): must be an object mapping a task to its labels")
    sets: LabelSets = {}
    for task, labels in obj.items():
        if task not in LABEL_SETS:
            raise LabelFileError(f"{path}: {task}: not a choice task (known: {', '.join(LABEL_SETS)})")
        sets[task] = None if labels is None else check_labels(labels, f"{path}: {task}")
    return sets


def check_labels(labels: object, where: str) -> tuple[str, ...]:
    """`labels` as a tuple if it is a list of >= 2 distinct non-empty strings, else a LabelFileError."""
    if not isinstance(labels, list) or not all(isinstance(x, str) and x.strip() for x in labels):
        raise LabelFileError(f"{where}: must be a list of non-empty strings or null")
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise LabelFileError(f"{where}: needs at least 2 distinct labels, got {len(set(labels))}")
    return tuple(labels)


def write_label_file(path: str | os.PathLike, sets: Mapping[str, Sequence[str] | None]) -> None:
    """Write a labels file (checked as `read_label_file` would)."""
    body = {task: None if labels is None else list(check_labels(list(labels), f"{path}: {task}"))
            for task, labels in sets.items()}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(body, f, ensure_ascii=False, indent=1)
        f.write("\n")


def declared_label_sets(jsonl_path: str | os.PathLike, defaults: Mapping[str, tuple[str, ...] | None]) -> LabelSets:
    """The label sets that apply to one JSONL file: `defaults`, overridden by its labels file."""
    labels_file = labels_file_for(jsonl_path)
    return {**defaults, **(read_label_file(labels_file) if labels_file else {})}
