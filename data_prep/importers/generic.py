"""A shop's own CSV/TSV/JSONL -> schema records, driven by a small mapping spec (JSON).

    {"name": "myshop",                              # id prefix and output directory
     "task": "product_classification",              # a schema task
     "input": "Title: {title}\\nBrand: {brand}",     # template over the row's columns
     "output_column": "category",                   # the reference (the label, for choice tasks)
     "instructions": ["Which category fits this product?", "Sort this listing into one category."],
     "labels": ["Dining Chairs", "Table Lamps", "Bath Towels"],   # choice tasks: the declared label set
     "max_options": 4,                              # candidates shown: the gold label + sampled others
     "options_column": "",                          # or: per-row candidates in this column ...
     "options_separator": "|",                      # ... separated by this
     "id_column": "sku",                            # optional: stable record ids (default: row content)
     "group_column": "",                            # optional: rows sharing it share a split (default: id)
     "aspects": ["platform"], "origin": "catalogue export 2026-11", "licence": "proprietary",
     "file_format": ""}                             # csv, tsv or jsonl (default: from the extension)

Templates may also use `{options}` (candidates on one line) and `{options_lines}` (one per line);
for a choice task whose templates mention neither, the input gets a "Candidates: ..." line, so the
model always sees what it chooses from. A row whose label is outside `labels`, or that lacks a
column, is a bad row (`file:line: column: reason`), counted, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import string
from collections.abc import Iterator, Sequence

from data_prep.importers.core import (
    Draft, Row, RowProblem, SourceInfo, check_options, content_key, csv_rows, jsonl_rows, unit_fraction,
)
from llama_e_jax.data.labels import LABEL_SETS, LabelFileError, check_labels
from llama_e_jax.data.schema import ASPECTS, TASKS

CANDIDATES_LINE = "\nCandidates: {options}"


@dataclasses.dataclass(frozen=True)
class MappingSpec:
    """The mapping spec; see the module docstring for each field."""

    name: str
    task: str
    input: str
    output_column: str
    instructions: tuple[str, ...]
    labels: tuple[str, ...] | None = None
    max_options: int = 5
    options_column: str = ""
    options_separator: str = "|"
    id_column: str = ""
    group_column: str = ""
    aspects: tuple[str, ...] = ("platform",)
    origin: str = "a shop's own data"
    licence: str = "proprietary"
    file_format: str = ""

    @property
    def is_choice(self) -> bool:
        return self.task in LABEL_SETS

    def columns(self) -> list[str]:
        """Columns the templates and fields name (each must be in every row)."""
        named = {f for t in (self.input, *self.instructions) for _, f, _, _ in string.Formatter().parse(t) if f}
        named -= {"options", "options_lines"}
        optional = {self.options_column, self.id_column, self.group_column} - {""}
        return sorted(named | {self.output_column} | optional)

    def input_template(self) -> str:
        templates = (self.input, *self.instructions)
        if self.is_choice and not any("{options" in t for t in templates):
            return self.input + CANDIDATES_LINE
        return self.input

    def source(self) -> SourceInfo:
        return SourceInfo(self.name, self.origin, self.licence, f"{self.name}: {self.origin}. Licence: {self.licence}.")


def load_spec(path: str) -> MappingSpec:
    """Read and check a spec file; problems raise `ValueError("path: field: reason")`."""
    with open(path, encoding="utf-8") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: (json): malformed JSON ({error})") from None
    known = {f.name for f in dataclasses.fields(MappingSpec)}
    if not isinstance(obj, dict) or set(obj) - known:
        raise ValueError(f"{path}: (spec): unknown fields {sorted(set(obj) - known) if isinstance(obj, dict) else obj}")
    for field in ("name", "task", "input", "output_column", "instructions"):
        if not obj.get(field):
            raise ValueError(f"{path}: {field}: missing or empty")
    if obj["task"] not in TASKS:
        raise ValueError(f"{path}: task: unknown task {obj['task']!r}; known: {', '.join(TASKS)}")
    if not isinstance(obj["instructions"], list) or not all(isinstance(t, str) and t.strip() for t in obj["instructions"]):
        raise ValueError(f"{path}: instructions: must be a list of non-empty templates")
    if set(obj.get("aspects", ["platform"])) - set(ASPECTS):
        raise ValueError(f"{path}: aspects: unknown aspect; known: {', '.join(ASPECTS)}")
    choice = obj["task"] in LABEL_SETS
    if choice and not obj.get("labels") and not obj.get("options_column"):
        raise ValueError(f"{path}: labels: a choice task needs labels or an options_column")
    if not choice and (obj.get("labels") or obj.get("options_column")):
        raise ValueError(f"{path}: labels: only choice tasks ({', '.join(LABEL_SETS)}) have labels")
    try:
        labels = check_labels(obj["labels"], f"{path}: labels") if obj.get("labels") else None
    except LabelFileError as error:
        raise ValueError(str(error)) from None
    if int(obj.get("max_options", 5)) < 2:
        raise ValueError(f"{path}: max_options: must be at least 2")
    return MappingSpec(**{**obj, "instructions": tuple(obj["instructions"]), "labels": labels,
                          "aspects": tuple(obj.get("aspects", ("platform",)))})


def _file_rows(spec: MappingSpec, path: str) -> Iterator[tuple[str, dict | RowProblem]]:
    fmt = spec.file_format or os.path.splitext(path)[1].lstrip(".").lower()
    if fmt == "jsonl":
        yield from jsonl_rows(path)
    elif fmt in ("csv", "tsv"):
        yield from csv_rows(path, None, delimiter="\t" if fmt == "tsv" else ",")
    else:
        raise ValueError(f"{path}: unknown file format {fmt!r} (csv, tsv or jsonl; set file_format)")


def _candidates(spec: MappingSpec, values: dict[str, str], gold: str, key: str) -> list[str]:
    if spec.options_column:
        return [o.strip() for o in values[spec.options_column].split(spec.options_separator) if o.strip()]
    others = [label for label in spec.labels if label != gold]
    rng = random.Random(int(unit_fraction("distractors:" + key) * 2**32))
    return [gold, *rng.sample(others, min(spec.max_options - 1, len(others)))]


def convert_row(spec: MappingSpec, row: dict, where: str) -> Draft | RowProblem:
    """One row as a draft, or the first problem with it."""
    values = {}
    for column in spec.columns():
        value = row.get(column)
        if value is None:
            return RowProblem(where, column, "missing")
        values[column] = str(value).strip()
        if not values[column]:
            return RowProblem(where, column, "empty")
    gold = values[spec.output_column]
    key = values[spec.id_column] if spec.id_column else content_key(*(values[c] for c in sorted(values)))
    options = None
    if spec.is_choice:
        if spec.labels and gold not in spec.labels:
            return RowProblem(where, spec.output_column, "label outside the declared label set", repr(gold))
        options = _candidates(spec, values, gold, key)
        outside = [o for o in options if spec.labels and o not in spec.labels]
        if outside:
            return RowProblem(where, spec.options_column, "label outside the declared label set", repr(outside))
        problem = check_options(options, gold, where, spec.options_column or spec.output_column)
        if problem:
            return problem
    group = values[spec.group_column] if spec.group_column else key
    return Draft(key=key, group=f"{spec.name}\x1f{group}", task=spec.task, input="", output=gold,
                 aspects=spec.aspects, options=tuple(options) if options else None, template_fields=values)


def rows(spec: MappingSpec, paths: Sequence[str]) -> Iterator[Row]:
    for path in paths:
        for where, row in _file_rows(spec, path):
            yield where, row if isinstance(row, RowProblem) else convert_row(spec, row, where)
