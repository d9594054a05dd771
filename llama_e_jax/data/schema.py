"""The one instruction record every stage of llama_e_jax reads and writes.

Seeds, teacher expansion, filters, the tfds builder, the training pipeline and evaluation all exchange
JSON Lines files of the same record, so it is defined and validated here, once:

    {"id": "ads-0001",                      # unique across the whole dataset; splits hash it
     "task": "ads_generation",              # one of TASKS
     "instruction": "Write an ad for ...",  # non-empty
     "input": "Product: ...",               # may be "" (the prompt then has no "### Input:" block)
     "output": "Meet the ...",              # non-empty; the reference response
     "aspects": ["seller", "platform"],     # non-empty subset of ASPECTS: whom the answer serves
     "source": "seed",                      # provenance, e.g. "seed", "expanded:<teacher model>"
     "options": [...]}                      # only for product_classification / intent_speculation

`options` are the candidate labels shown to the model: at least 2 distinct non-empty labels that
contain `output`, so accuracy is well defined. Other tasks must not carry options. Which labels are
allowed is a property of the dataset, not of the schema: `label_sets` maps a choice task to its
allowed labels (a task it does not name is open). Readers default to the fixed sets of
`labels.LABEL_SETS` (seeds, expansion, filters), a labels file beside a JSONL overrides them per
task (`labels.declared_label_sets`), and evaluation and generation read with `label_sets={}`: any
labels. Likewise `aspects` (which never reach the prompt) are required for training data but may be
absent where only prompts and references matter (`require_aspects=False`; then `aspects == ()`).

Validation is strict because a bad line that slips through surfaces hours later as a silently
worse model. Every problem is a `RecordError` whose text is `path:line: field: reason`; `read_jsonl`
collects all problems of a file and raises them together (fix a file in one pass), or, with
`skip_invalid=True`, logs how many lines were skipped for which reason and returns the rest.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from llama_e_jax.data.labels import LABEL_SETS, declared_label_sets

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = (
    "ads_generation",
    "title_rewriting",
    "product_classification",
    "intent_speculation",
    "general_qa",
)
ASPECTS: tuple[str, ...] = ("seller", "customer", "platform")
TASKS_WITH_OPTIONS: tuple[str, ...] = tuple(LABEL_SETS)

_TEXT_FIELDS = ("id", "task", "instruction", "input", "output", "source")
_REQUIRED_FIELDS = (*_TEXT_FIELDS, "aspects")
_KNOWN_FIELDS = frozenset((*_REQUIRED_FIELDS, "options"))


@dataclasses.dataclass(frozen=True)
class InstructionRecord:
    """One instruction-following example; see the module docstring for each field."""

    id: str
    task: str
    instruction: str
    input: str
    output: str
    aspects: tuple[str, ...]
    source: str
    options: tuple[str, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object for this record (`options` omitted when None)."""
        obj: dict[str, Any] = {f: getattr(self, f) for f in _TEXT_FIELDS}
        if self.aspects:  # () when read with require_aspects=False from a record without them
            obj["aspects"] = list(self.aspects)
        if self.options is not None:
            obj["options"] = list(self.options)
        return obj


class RecordError(ValueError):
    """A problem with one record; `str()` is `path:line: field: reason`.

    `reason` is a short fixed phrase (used to count problems by kind); `detail` carries the
    offending value and is appended in parentheses.
    """

    def __init__(self, where: str, field: str, reason: str, detail: str = ""):
        self.where, self.field, self.reason, self.detail = where, field, reason, detail
        super().__init__(str(self))

    @property
    def kind(self) -> str:
        """`field: reason` without the detail, for counting problems by kind."""
        return f"{self.field}: {self.reason}"

    def __str__(self) -> str:
        suffix = f" ({self.detail})" if self.detail else ""
        return f"{self.where}: {self.field}: {self.reason}{suffix}"


class InvalidRecordsError(RecordError):
    """All problems found in one or more files, raised together; `.errors` holds each one."""

    def __init__(self, errors: list[RecordError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.where, first.field, first.reason, first.detail)

    def __str__(self) -> str:
        counts = collections.Counter(e.kind for e in self.errors).most_common()
        lines = [f"{len(self.errors)} invalid record(s) [" + ", ".join(f"{k} x{n}" for k, n in counts) + "]:"]
        lines += [f"  {e}" for e in self.errors]
        return "\n".join(lines)


@dataclasses.dataclass
class ReadReport:
    """What `read_jsonl` saw in one file: how many records were kept and why others were not."""

    path: str
    num_lines: int = 0  # non-blank lines
    num_valid: int = 0
    errors: list[RecordError] = dataclasses.field(default_factory=list)

    @property
    def num_invalid(self) -> int:
        return len(self.errors)

    def counts_by_reason(self) -> dict[str, int]:
        """Number of invalid lines per `field: reason`, most frequent first."""
        return dict(collections.Counter(e.kind for e in self.errors).most_common())

    def summary(self) -> str:
        text = f"{self.path}: {self.num_valid} valid of {self.num_lines} records"
        if self.errors:
            reasons = ", ".join(f"{k} x{n}" for k, n in self.counts_by_reason().items())
            text += f"; {self.num_invalid} invalid [{reasons}]"
        return text


def _require_text(obj: Mapping[str, Any], field: str, where: str, *, non_empty: bool) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise RecordError(where, field, "must be a string", f"got {type(value).__name__}")
    if non_empty and not value.strip():
        raise RecordError(where, field, "must not be empty")
    return value


def _require_text_list(obj: Mapping[str, Any], field: str, where: str) -> tuple[str, ...]:
    value = obj[field]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(where, field, "must be a list of strings", f"got {value!r}")
    if not value:
        raise RecordError(where, field, "must not be empty")
    if not all(v.strip() for v in value):
        raise RecordError(where, field, "has an empty entry", f"got {value!r}")
    if len(set(value)) != len(value):
        raise RecordError(where, field, "has duplicates", f"got {value!r}")
    return tuple(value)


def _check_options(
    task: str, output: str, options: tuple[str, ...] | None, where: str, label_sets: Mapping[str, Any]
) -> None:
    if task not in LABEL_SETS:
        if options is not None:
            raise RecordError(where, "options", "only allowed for " + " / ".join(TASKS_WITH_OPTIONS))
        return
    if options is None:
        raise RecordError(where, "options", f"required for task {task}")
    if len(options) < 2:
        raise RecordError(where, "options", "needs at least 2 labels", f"got {list(options)!r}")
    allowed = label_sets.get(task)
    if allowed is not None:
        outside = [o for o in options if o not in allowed]
        if outside:
            raise RecordError(where, "options", f"label outside the {task} label set", f"{outside!r}")
    if output not in options:
        raise RecordError(where, "output", "not one of the options", f"{output!r}")


def parse_record(
    obj: Any,
    where: str,
    *,
    label_sets: Mapping[str, tuple[str, ...] | None] = LABEL_SETS,
    require_aspects: bool = True,
) -> InstructionRecord:
    """Validate one decoded JSON object and build the record; `where` is `path:line` for errors.

    `label_sets`: allowed labels per choice task (a task absent or None is open; see the module
    docstring). `require_aspects=False` accepts a record without `aspects` (then `aspects == ()`).
    """
    if not isinstance(obj, dict):
        raise RecordError(where, "(record)", "must be a JSON object", f"got {type(obj).__name__}")
    unknown = sorted(set(obj) - _KNOWN_FIELDS)
    if unknown:
        raise RecordError(where, unknown[0], "unknown field", f"known: {sorted(_KNOWN_FIELDS)}")
    for field in _REQUIRED_FIELDS:
        if field not in obj and (field != "aspects" or require_aspects):
            raise RecordError(where, field, "missing")
    text = {f: _require_text(obj, f, where, non_empty=f != "input") for f in _TEXT_FIELDS}
    if text["task"] not in TASKS:
        raise RecordError(where, "task", "unknown task", f"{text['task']!r}; known: {TASKS}")
    aspects = _require_text_list(obj, "aspects", where) if "aspects" in obj else ()
    outside = [a for a in aspects if a not in ASPECTS]
    if outside:
        raise RecordError(where, "aspects", "unknown aspect", f"{outside!r}; known: {ASPECTS}")
    options = None if obj.get("options") is None else _require_text_list(obj, "options", where)
    _check_options(text["task"], text["output"], options, where, label_sets)
    return InstructionRecord(aspects=aspects, options=options, **text)


def iter_lines(path: str) -> Iterator[tuple[int, str | RecordError]]:
    """(line number, text) of each non-blank line; a line that is not UTF-8 gives a RecordError instead.

    Reading bytes and decoding line by line means one bad byte costs one line (reported as
    `path:line`), not the whole file (a text-mode `open` raises mid-file with no line number).
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield line_no, RecordError(f"{path}:{line_no}", "(utf-8)", "not valid UTF-8",
                                           f"byte {raw[e.start:e.start + 1]!r} at column {e.start + 1}")
                continue
            if line.strip():  # blank lines (e.g. a trailing newline) carry no record
                yield line_no, line


def _read_one_file(
    path: str, seen_ids: dict[str, str], label_sets: Mapping[str, Any], require_aspects: bool
) -> tuple[list[InstructionRecord], ReadReport]:
    """Parse every line of `path`; `seen_ids` maps id -> `path:line` across files (updated)."""
    report = ReadReport(path)
    records: list[InstructionRecord] = []
    for line_no, line in iter_lines(path):
        report.num_lines += 1
        where = f"{path}:{line_no}"
        try:
            if isinstance(line, RecordError):
                raise line
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(where, "(json)", "malformed JSON", str(e)) from None
            record = parse_record(obj, where, label_sets=label_sets, require_aspects=require_aspects)
            if record.id in seen_ids:
                raise RecordError(where, "id", "duplicate id", f"first at {seen_ids[record.id]}")
        except RecordError as e:
            report.errors.append(e)
            continue
        seen_ids[record.id] = where
        records.append(record)
    report.num_valid = len(records)
    return records, report


def read_jsonl_files(
    paths: Iterable[str | os.PathLike],
    *,
    skip_invalid: bool = False,
    label_sets: Mapping[str, tuple[str, ...] | None] = LABEL_SETS,
    require_aspects: bool = True,
) -> tuple[list[InstructionRecord], list[ReadReport]]:
    """Read several JSONL files as one dataset: ids must be unique across all of them.

    Returns the records (in file order) and one `ReadReport` per file. Errors of all files are
    raised together as one `InvalidRecordsError` unless `skip_invalid` (then logged per file).
    `label_sets` are the defaults; each file's labels file (`labels.labels_file_for`) overrides them
    per task. A malformed labels file raises `labels.LabelFileError`.
    """
    seen_ids: dict[str, str] = {}
    records: list[InstructionRecord] = []
    reports: list[ReadReport] = []
    for path in paths:
        sets = declared_label_sets(path, label_sets)
        file_records, report = _read_one_file(os.fspath(path), seen_ids, sets, require_aspects)
        records += file_records
        reports.append(report)
    errors = [e for r in reports for e in r.errors]
    if errors and not skip_invalid:
        raise InvalidRecordsError(errors)
    for report in reports:
        if report.errors:
            log.warning("skipped invalid records: %s", report.summary())
    return records, reports


def read_jsonl_with_report(
    path: str | os.PathLike, *, skip_invalid: bool = False, **options: Any
) -> tuple[list[InstructionRecord], ReadReport]:
    """Like `read_jsonl`, also returning the `ReadReport` (for printing counts)."""
    records, (report,) = read_jsonl_files([path], skip_invalid=skip_invalid, **options)
    return records, report


def read_jsonl(path: str | os.PathLike, *, skip_invalid: bool = False, **options: Any) -> list[InstructionRecord]:
    """Read and validate a JSONL file of records.

    Raises `InvalidRecordsError` listing every bad line (`path:line: field: reason`) unless
    `skip_invalid`, in which case the bad lines are counted in a logged warning and left out.
    Duplicate ids are an error (the later line is the bad one). `options`: `label_sets`,
    `require_aspects`, as for `read_jsonl_files`.
    """
    return read_jsonl_files([path], skip_invalid=skip_invalid, **options)[0]


def write_jsonl(
    path: str | os.PathLike,
    records: Iterable[InstructionRecord],
    *,
    label_sets: Mapping[str, tuple[str, ...] | None] | None = None,
) -> int:
    """Validate and write records as UTF-8 JSON Lines (atomically); returns the count written.

    Each record goes through `parse_record` first (with `label_sets`, default: the sets a reader of
    `path` would apply), so a file written here always reads back.
    """
    path = os.fspath(path)
    sets = declared_label_sets(path, LABEL_SETS) if label_sets is None else label_sets
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    count = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for count, record in enumerate(records, start=1):
                obj = record.to_json()
                parse_record(obj, f"{path}:{count}", label_sets=sets, require_aspects=bool(record.aspects))
                f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return count
