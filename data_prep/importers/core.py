"""What every importer shares: rows in, schema records out, every row accounted for.

An importer reads one public (or a shop's own) dataset and yields, per input row, either a `Draft`
(the task's fields before an instruction is chosen) or a `RowProblem`. This module turns drafts into
`InstructionRecord`s, and nothing else decides how:

* **Instructions vary by template**, as LLaMA-E varies its instructions: each source has several
  phrasings and a record takes the one picked by a hash of its id, so a model cannot key on one
  wording and every rerun writes the same file.
* **Candidate order is shuffled** per record (again seeded by the id): the gold option of a choice
  task sits at every position equally often, so position is not a shortcut.
* **Splits are a function of a group key** (`split_of`): the same 90/5/5 cut of sha256 as the tfds
  builder, but over the group (a question, a co-purchased item pair), not the record, so two records
  about the same question never straddle train and test.
* **Nothing is dropped silently.** A row is either written, skipped for a stated reason that is not
  a defect (`skipped`: e.g. an ePQA evidence row labelled "does not answer"), or bad (`problems`,
  each `file:line: field: reason`); `ImportReport` counts all three.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence

from llama_e_jax.data.schema import InstructionRecord, RecordError, parse_record
from llama_e_jax.metrics import normalize_label

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"test": 0.05, "validation": 0.05}  # as llama_e_jax.data.tfds_builder; train gets the rest


@dataclasses.dataclass(frozen=True)
class Draft:
    """One converted row before its instruction is chosen; `key` makes the record id, `group` the split."""

    key: str  # unique within the source (a content hash or the upstream id)
    group: str  # records with the same group land in the same split
    task: str
    input: str
    output: str
    aspects: tuple[str, ...]
    options: tuple[str, ...] | None = None  # shuffled by `build_record`; must contain `output`
    template_fields: dict[str, str] = dataclasses.field(default_factory=dict)  # for "{column}" in templates


@dataclasses.dataclass(frozen=True)
class Skip:
    """A row deliberately not converted (not a defect), with the reason counted in the report."""

    where: str
    reason: str


@dataclasses.dataclass(frozen=True)
class RowProblem:
    """A bad input row: `str()` is `file:line: field: reason (detail)` like a `RecordError`."""

    where: str
    field: str
    reason: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.reason}" + (f" ({self.detail})" if self.detail else "")


Row = tuple[str, "Draft | Skip | RowProblem"]  # (file:line, what became of it)


@dataclasses.dataclass
class ImportReport:
    """Per source: rows read, records written per split, skips and problems by reason."""

    source: str
    rows: int = 0
    written: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # split -> n
    by_task: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # reason -> n
    problems: list[RowProblem] = dataclasses.field(default_factory=list)

    def problem_counts(self) -> dict[str, int]:
        return dict(collections.Counter(f"{p.field}: {p.reason}" for p in self.problems).most_common())

    def summary(self) -> str:
        split_text = ", ".join(f"{s} {self.written[s]}" for s in SPLITS)
        text = f"{self.source}: {self.rows} rows -> {sum(self.written.values())} records ({split_text})"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{r} x{n}" for r, n in self.skipped.most_common())
        if self.problems:
            text += f"; {len(self.problems)} bad rows [" + ", ".join(
                f"{k} x{n}" for k, n in self.problem_counts().items()) + "]"
        return text

    def to_json(self) -> dict:
        return {"rows": self.rows, "written": dict(self.written), "by_task": dict(self.by_task),
                "skipped": dict(self.skipped), "bad_rows": self.problem_counts(),
                "problems": [str(p) for p in self.problems]}


def unit_fraction(text: str) -> float:
    """A stable position in [0, 1) from sha256 of `text` (same formula as the tfds builder's splits)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(group: str) -> str:
    """train / validation / test for a group key: 5% test, 5% validation by hashed group."""
    u = unit_fraction(group)
    test_cut = SPLIT_FRACTIONS["test"]
    return "test" if u < test_cut else "validation" if u < test_cut + SPLIT_FRACTIONS["validation"] else "train"


def content_key(*parts: str) -> str:
    """A short stable id component from row contents (identical rows give identical keys)."""
    return hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()[:16]


def pick(templates: Sequence[str], record_id: str) -> str:
    """The template a record uses: chosen by a hash of its id, so reruns pick the same one."""
    return templates[int(unit_fraction("template:" + record_id) * len(templates))]


def shuffled(options: Sequence[str], record_id: str) -> tuple[str, ...]:
    """`options` in an order drawn from the record id (deterministic, uniform over positions)."""
    order = list(options)
    random.Random(hashlib.sha256(("options:" + record_id).encode()).digest()).shuffle(order)
    return tuple(order)


def check_options(options: Sequence[str], output: str, where: str, field: str) -> RowProblem | None:
    """A problem when options are not >= 2 labels, distinct after evaluation's normalisation, with output."""
    if any(not o.strip() for o in options):
        return RowProblem(where, field, "empty option", repr(list(options)))
    normal = [normalize_label(o, strip_prefix=False) for o in options]  # as metrics.label_lookup
    if len(options) < 2:
        return RowProblem(where, field, "fewer than 2 options", repr(list(options)))
    if len(set(normal)) != len(normal):  # evaluation could not tell a reply for one from the other
        return RowProblem(where, field, "options not distinct", repr(list(options)))
    if output not in options:
        return RowProblem(where, field, "gold answer not among the options", repr(output))
    return None


def format_options(options: Sequence[str], style: str) -> str:
    """The candidates as they appear in the input: one per line ("- x") or on one line ("x | y")."""
    return "\n".join(f"- {o}" for o in options) if style == "lines" else " | ".join(options)


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Provenance written into each record's `source` and into the attribution file."""

    name: str  # short id prefix and output directory, e.g. "hetpqa"
    origin: str  # where the data comes from (repository, commit, path)
    licence: str  # SPDX id, e.g. "CDLA-Sharing-1.0"
    attribution: str  # the notice shipped with derived data

    @property
    def source_field(self) -> str:
        return f"imported:{self.name} ({self.origin}; {self.licence})"


def build_record(
    draft: Draft, source: SourceInfo, instructions: Sequence[str], input_templates: Sequence[str] = ("{input}",)
) -> InstructionRecord:
    """The schema record for a draft: id, instruction template, shuffled options, provenance.

    `instructions` and `input_templates` may use `{options}` (the shuffled candidates on one line),
    `{options_lines}` (one per line) and the draft's `template_fields`.
    """
    record_id = f"{source.name}-{draft.key}"
    options = shuffled(draft.options, record_id) if draft.options else None
    fields = {**draft.template_fields, "input": draft.input}
    if options:
        fields |= {"options": format_options(options, "inline"), "options_lines": format_options(options, "lines")}
    obj = {"id": record_id, "task": draft.task, "instruction": pick(instructions, record_id).format(**fields),
           "input": pick(input_templates, "input:" + record_id).format(**fields), "output": draft.output,
           "aspects": list(draft.aspects), "source": source.source_field}
    if options:
        obj["options"] = list(options)
    return parse_record(obj, record_id, label_sets={})


def convert(
    rows: Iterable[Row],
    source: SourceInfo,
    instructions: Sequence[str],
    input_templates: Sequence[str] = ("{input}",),
) -> tuple[dict[str, list[InstructionRecord]], ImportReport]:
    """Records per split from an importer's rows, and the report that accounts for every row."""
    report = ImportReport(source.name)
    by_split: dict[str, list[InstructionRecord]] = {s: [] for s in SPLITS}
    first_seen: dict[str, str] = {}
    for where, row in rows:
        report.rows += 1
        if isinstance(row, Skip):
            report.skipped[row.reason] += 1
            continue
        if isinstance(row, RowProblem):
            report.problems.append(row)
            continue
        if row.key in first_seen:
            report.skipped["duplicate row (same content as an earlier one)"] += 1
            continue
        try:
            record = build_record(row, source, instructions, input_templates)
        except (RecordError, KeyError, IndexError) as error:  # KeyError/IndexError: a template names no field
            report.problems.append(RowProblem(where, getattr(error, "field", "(template)"),
                                              getattr(error, "reason", "cannot fill template"), str(error)))
            continue
        first_seen[row.key] = where
        split = split_of(row.group)
        by_split[split].append(record)
        report.written[split] += 1
        report.by_task[record.task] += 1
    return by_split, report


# ------------------------------------------------------------------------------ reading rows

_SURROGATE_MIN, _SURROGATE_MAX = "\udc80", "\udcff"  # what errors="surrogateescape" makes of bad bytes


def _has_bad_bytes(text: str) -> bool:
    return any(_SURROGATE_MIN <= ch <= _SURROGATE_MAX for ch in text)


def csv_rows(
    path: str, columns: Sequence[str] | None, delimiter: str = ","
) -> Iterator[tuple[str, dict | RowProblem]]:
    """(file:line, row dict) per CSV row with a header; a malformed row comes as a `RowProblem`.

    `columns`: the header the file must start with (None: any header).
    The line is where the row starts (a quoted field may span lines). Bad UTF-8 is decoded with
    surrogateescape so that it costs one row, reported, instead of the whole file.
    """
    csv.field_size_limit(1 << 28)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None or (columns is not None and [h.strip() for h in header] != list(columns)):
            raise ValueError(f"{path}:1: (header): expected columns {list(columns or [])}, got {header}")
        start = reader.line_num + 1
        for values in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                yield where, RowProblem(where, "(row)", f"expected {len(header)} columns", f"got {len(values)}")
            elif any(_has_bad_bytes(v) for v in values):
                yield where, RowProblem(where, "(utf-8)", "not valid UTF-8")
            else:
                yield where, dict(zip(header, values))


def jsonl_rows(path: str) -> Iterator[tuple[str, dict | RowProblem]]:
    """(file:line, decoded object) per non-blank JSONL line; bad bytes or JSON come as a `RowProblem`."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield where, RowProblem(where, "(utf-8)", "not valid UTF-8")
                continue
            except json.JSONDecodeError as error:
                yield where, RowProblem(where, "(json)", "malformed JSON", str(error))
                continue
            yield where, obj if isinstance(obj, dict) else RowProblem(where, "(row)", "not a JSON object")


def required_text(row: dict, columns: Sequence[str], where: str) -> dict[str, str] | RowProblem:
    """The named columns, stripped; a problem naming the first missing or empty one."""
    values = {}
    for column in columns:
        value = row.get(column)
        if not isinstance(value, str):
            return RowProblem(where, column, "missing" if value is None else "not a string")
        if not value.strip():
            return RowProblem(where, column, "empty")
        values[column] = value.strip()
    return values
