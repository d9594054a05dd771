"""Post-filter teacher-expanded instruction data: validate, de-duplicate, bound, prune; account for all.

    python -m data_prep.filter --inputs data/expanded.jsonl data_prep/seeds --out data/filtered.jsonl \
        [--rejects data/filtered.rejects.jsonl] [--report data/filtered.report.json] [--max-per-task N]

Every input line ends up either in `--out` or in `--rejects` under the name of the first rule that
removed it, and the report counts lines per rule and task, so nothing is dropped silently. The rules
run in this order (cheap and certain first; de-duplication only among records that passed the
quality rules, so a bad record can never "claim" a text and push out a good copy of it):

    schema           not JSON, or fails `schema.parse_record` for a reason other than the two below
    duplicate_id     an id seen earlier (first wins)
    label            classification/intent: options outside the label set, or output not in options
    empty            an empty instruction/output, or one with no letter or digit ("...", "-")
    echo             output equal to the input or the instruction (after normalisation)
    length           instruction/input/output words or total characters outside `LengthBounds`
    exact_duplicate  same task, same normalised instruction + input as a kept record
    near_duplicate   ROUGE-L F >= threshold (0.7) on the instruction and on the input of a kept
                     record of the same task (as Self-Instruct, which compares instructions)
    prune            over `--max-per-task`: seeds first, then a seeded hash order of ids

**Near duplicates, field by field.** The expansion rewrites only the instruction of the label tasks,
so their variants share the seed's input by design; scoring the concatenation would let a long shared
input (or a short generic instruction) dominate. A record is therefore a near duplicate only when
*both* its instruction and its input are within the threshold of the same kept record (an empty input
matches only an empty input), which reduces to Self-Instruct's instruction-only rule for general QA.

**Cost.** Comparing each record with every kept one is O(n^2) ROUGE-L computations: ~3e8 for 24k
records of a task, hours in Python. ROUGE-L F = 2·LCS/(|a|+|b|) and LCS <= the multiset overlap of
the tokens, so a near duplicate also has Dice overlap >= t on each field's token multiset. That
allows the prefix filter of set-similarity joins (Chaudhuri et al. 2006, Bayardo et al. 2007): sort
a field's tokens by rarity within the task; two fields with Dice >= t share one of the first
|x| - ceil(t|x|/(2-t)) + 1 tokens (~46% at t = 0.7, the rare ones). Kept records are indexed by
those prefixes; a new record probes the field with the shortest posting lists, the positional
filter of PPJoin (Xiao et al. 2008) drops candidates that cannot reach the overlap, and survivors
are scored with a bit-parallel LCS (Hyyrö 2004). All of this is exact (no false negatives), and
the result equals the brute-force definition (tested). Tokens are rouge_score's (lower-cased ASCII
alphanumerics, no stemming) and scores equal `RougeScorer(["rougeL"])` exactly (tested). Measured
cost is in data_prep/README.md.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from data_prep import jsonl_files
from llama_e_jax.data.labels import LABEL_SETS, declared_label_sets
from llama_e_jax.data.schema import TASKS, InstructionRecord, RecordError, iter_lines, parse_record, write_jsonl

RULES: tuple[str, ...] = (
    "schema",
    "duplicate_id",
    "label",
    "empty",
    "echo",
    "length",
    "exact_duplicate",
    "near_duplicate",
    "prune",
)
UNKNOWN_TASK = "(unknown)"


@dataclasses.dataclass(frozen=True)
class LengthBounds:
    """Inclusive bounds; words are whitespace-separated, chars count the three text fields."""

    min_instruction_words: int = 2
    max_instruction_words: int = 256
    max_input_words: int = 1024
    min_output_words: int = 1
    max_output_words: int = 1024
    max_record_chars: int = 16_000


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    inputs: tuple[str, ...]  # JSONL files or directories of *.jsonl, read in this order
    out: str
    rejects: str | None = None  # default: <out without .jsonl>.rejects.jsonl
    report: str | None = None  # default: <out without .jsonl>.report.json
    near_duplicate_threshold: float = 0.7
    max_per_task: int | None = None
    prune_seed: int = 0
    lengths: LengthBounds = LengthBounds()

    @property
    def rejects_path(self) -> str:
        return self.rejects or _sibling(self.out, ".rejects.jsonl")

    @property
    def report_path(self) -> str:
        return self.report or _sibling(self.out, ".report.json")


def _sibling(path: str, suffix: str) -> str:
    return (path[: -len(".jsonl")] if path.endswith(".jsonl") else path) + suffix


@dataclasses.dataclass
class Rejection:
    """One removed input line and why."""

    rule: str
    reason: str
    where: str  # path:line
    task: str
    obj: Any  # the decoded JSON, or the raw line when it was not JSON
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = {"record": self.obj} if isinstance(self.obj, dict) else {"raw": self.obj}
        return {"rule": self.rule, "reason": self.reason, "where": self.where, "task": self.task,
                **self.details, **body}


@dataclasses.dataclass
class FilterReport:
    """Lines read, removed per rule and kept, per task."""

    read: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    removed: dict[str, collections.Counter] = dataclasses.field(
        default_factory=lambda: {rule: collections.Counter() for rule in RULES}
    )
    kept: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def columns(self) -> list[str]:
        return [t for t in (*TASKS, UNKNOWN_TASK) if self.read[t]]

    def to_json(self) -> dict[str, Any]:
        return {
            "rules": list(RULES),
            "per_task": {
                task: {"read": self.read[task], "kept": self.kept[task],
                       "removed": {rule: self.removed[rule][task] for rule in RULES}}
                for task in self.columns()
            },
            "total": {"read": sum(self.read.values()), "kept": sum(self.kept.values()),
                      "removed": {rule: sum(self.removed[rule].values()) for rule in RULES}},
        }

    def format(self) -> str:
        """A plain-text table: rows are read / each rule / kept, columns the tasks and the total."""
        columns = self.columns()
        rows = [("read", self.read), *((rule, self.removed[rule]) for rule in RULES), ("kept", self.kept)]
        widths = [max(len(c), 7) for c in columns]
        lines = [f"{'':16}" + "".join(f"{c:>{w + 2}}" for c, w in zip(columns, widths)) + f"{'total':>9}"]
        for name, counts in rows:
            cells = "".join(f"{counts[c]:>{w + 2}}" for c, w in zip(columns, widths))
            lines.append(f"{name:16}{cells}{sum(counts[c] for c in columns):>9}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- text helpers

_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Case-, width-, punctuation- and whitespace-insensitive form used for equality checks."""
    return _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


_ROUGE_TOKEN = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokens without stemming (lower-case, then ASCII alphanumeric runs).

    Equal to `rouge_score.tokenize.tokenize(text, None)` (tested) and about 3x faster, which
    matters at 1e5 records; scores therefore match `RougeScorer(["rougeL"])`.
    """
    return _ROUGE_TOKEN.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, bit-parallel over `a` (Hyyrö 2004)."""
    if len(a) < len(b):
        a, b = b, a
    match: dict[str, int] = {}
    for i, token in enumerate(a):
        match[token] = match.get(token, 0) | (1 << i)
    full = (1 << len(a)) - 1
    v = full  # zero bits mark positions of `a` used by the LCS so far
    for token in b:
        u = v & match.get(token, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F-measure of two token lists, computed exactly as rouge_score does."""
    if not a or not b:
        return 0.0
    lcs = lcs_length(a, b)
    precision, recall = lcs / len(b), lcs / len(a)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


# ----------------------------------------------------------------------------- near duplicates


@dataclasses.dataclass
class _Entry:
    """A record as the near-duplicate index sees it, field by field (instruction, input).

    `elements` are token occurrences ("the#1" = the second "the"), so a token multiset becomes a set
    and set operations bound the LCS: LCS(a, b) <= |elements(a) & elements(b)|.
    """

    record: InstructionRecord
    tokens: tuple[list[str], list[str]]  # rouge tokens
    norms: tuple[str, str]  # normalised text, to compare fields without tokens
    elements: tuple[frozenset[str], frozenset[str]]
    prefixes: tuple[list[str], ...] = ()  # per field, set by NearDuplicateIndex.prepare

    @classmethod
    def of(cls, record: InstructionRecord) -> _Entry:
        tokens = (rouge_tokens(record.instruction), rouge_tokens(record.input))
        return cls(record, tokens, (normalise(record.instruction), normalise(record.input)),
                   (_occurrences(tokens[0]), _occurrences(tokens[1])))


def _occurrences(tokens: list[str]) -> frozenset[str]:
    seen: dict[str, int] = {}
    elements = []
    for token in tokens:
        n = seen.get(token, 0)
        seen[token] = n + 1
        elements.append(f"{token}#{n}")
    return frozenset(elements)


def field_similarity(a: list[str], b: list[str], a_norm: str, b_norm: str) -> float:
    """ROUGE-L F of two fields; two fields without tokens match only when equal after normalising."""
    if not a and not b:
        return 1.0 if a_norm == b_norm else 0.0
    return rouge_l(a, b)


def min_dice_overlap(size: int, threshold: float) -> int:
    """The least overlap a set of `size` can have with any set it is Dice-similar (>= t) to."""
    return math.ceil(threshold * size / (2 - threshold) - 1e-9)


class NearDuplicateIndex:
    """Kept records of one task, indexed per field by the prefixes of their rarity-sorted elements.

    A near duplicate must reach the threshold on every field, so it must share a prefix element of
    any one field that has tokens; `match` probes the field whose posting lists are shortest.
    """

    def __init__(self, threshold: float, rarity: Sequence[collections.Counter]):
        self.threshold = threshold
        self._rarity = rarity  # per field: element -> number of records of the task containing it
        self._kept: list[_Entry] = []
        self._postings: tuple[dict[str, list[tuple[int, int]]], ...] = tuple(collections.defaultdict(list) for _ in rarity)
        self.candidates = 0  # pairs looked at, and pairs that needed an LCS: the filter's effect
        self.lcs_pairs = 0

    def prepare(self, entry: _Entry) -> _Entry:
        """Set `entry.prefixes`: per field, its rarest elements that any near duplicate must share."""
        prefixes = []
        for field, elements in enumerate(entry.elements):
            ordered = sorted(sorted(elements), key=self._rarity[field].__getitem__)  # rarest first, ties by name
            prefixes.append(ordered[: len(ordered) - min_dice_overlap(len(ordered), self.threshold) + 1])
        entry.prefixes = tuple(prefixes)
        return entry

    def _similarity(self, a: _Entry, b: _Entry) -> float:
        """min over fields of ROUGE-L F, or a value below the threshold as soon as one field fails."""
        scores = []
        for field in range(len(a.tokens)):
            ea, eb = a.elements[field], b.elements[field]
            if ea and eb and 2 * len(ea & eb) / (len(ea) + len(eb)) < self.threshold:
                return 0.0  # the token overlap bounds the LCS: this field cannot reach the threshold
            if ea and eb:
                self.lcs_pairs += 1
            scores.append(field_similarity(a.tokens[field], b.tokens[field], a.norms[field], b.norms[field]))
            if scores[-1] < self.threshold:
                return scores[-1]
        return min(scores)

    def _probe_field(self, entry: _Entry) -> int | None:
        """The field with tokens whose prefix has the shortest posting lists (None: no tokens)."""
        fields = [f for f in range(len(entry.tokens)) if entry.tokens[f]]
        if not fields:
            return None
        cost = {f: sum(len(self._postings[f].get(e, ())) for e in entry.prefixes[f]) for f in fields}
        return min(fields, key=cost.__getitem__)

    def _candidates(self, entry: _Entry) -> list[int]:
        """Kept records that could reach the threshold on the probed field (positional filter).

        Elements are compared in the same global order on both sides, so after the match at x's
        position i and y's position j at most min(|x| - i, |y| - j) - 1 more elements can match; a
        kept record whose count plus that bound stays under the needed Dice overlap is dropped.
        """
        field = self._probe_field(entry)
        if field is None:  # no tokens at all: only an exact duplicate could match, handled before
            return []
        size, postings = len(entry.elements[field]), self._postings[field]
        shared: dict[int, int] = {}  # kept index -> matched elements so far; -1 once ruled out
        for i, element in enumerate(entry.prefixes[field]):
            for kept, j in postings.get(element, ()):
                count = shared.get(kept, 0)
                if count < 0:
                    continue
                other = len(self._kept[kept].elements[field])
                needed = math.ceil(self.threshold * (size + other) / 2 - 1e-9)
                bound = count + 1 + min(size - i - 1, other - j - 1)
                shared[kept] = count + 1 if bound >= needed else -1
        return sorted(k for k, count in shared.items() if count > 0)

    def match(self, entry: _Entry) -> tuple[InstructionRecord, float] | None:
        """The first kept record (in keep order) that `entry` nearly duplicates, and the score."""
        for i in self._candidates(entry):
            self.candidates += 1
            score = self._similarity(entry, self._kept[i])
            if score >= self.threshold:
                return self._kept[i].record, score
        return None

    def add(self, entry: _Entry) -> None:
        for field in range(len(entry.tokens)):
            for position, element in enumerate(entry.prefixes[field]):
                self._postings[field][element].append((len(self._kept), position))
        self._kept.append(entry)


def near_duplicates(
    records: Sequence[InstructionRecord], threshold: float
) -> Iterator[tuple[InstructionRecord, InstructionRecord | None, float]]:
    """For each record of ONE task, in order: (record, kept record it duplicates or None, score)."""
    entries = [_Entry.of(r) for r in records]
    rarity = [collections.Counter(e for entry in entries for e in entry.elements[f]) for f in range(2)]
    index = NearDuplicateIndex(threshold, rarity)
    for entry in map(index.prepare, entries):
        found = index.match(entry)
        if found is None:
            index.add(entry)
            yield entry.record, None, 0.0
        else:
            yield entry.record, found[0], found[1]


# ----------------------------------------------------------------------------- per-record rules


def _rule_for_schema_error(error: RecordError) -> str:
    if error.field == "options" or (error.field == "output" and error.reason == "not one of the options"):
        return "label"
    if error.reason == "must not be empty" and error.field in ("instruction", "output"):
        return "empty"
    return "schema"


def quality_problem(record: InstructionRecord, bounds: LengthBounds) -> tuple[str, str] | None:
    """(rule, reason) of the first quality rule `record` fails, or None."""
    instruction, input_, output = (normalise(t) for t in (record.instruction, record.input, record.output))
    for name, text in (("instruction", instruction), ("output", output)):
        if not text:
            return "empty", f"{name} has no letter or digit"
    if output == instruction:
        return "echo", "output repeats the instruction"
    if output == input_:
        return "echo", "output repeats the input"
    words = {f: len(getattr(record, f).split()) for f in ("instruction", "input", "output")}
    checks = [
        (words["instruction"] < bounds.min_instruction_words, f"instruction under {bounds.min_instruction_words} words"),
        (words["instruction"] > bounds.max_instruction_words, f"instruction over {bounds.max_instruction_words} words"),
        (words["input"] > bounds.max_input_words, f"input over {bounds.max_input_words} words"),
        (words["output"] < bounds.min_output_words, f"output under {bounds.min_output_words} words"),
        (words["output"] > bounds.max_output_words, f"output over {bounds.max_output_words} words"),
        (len(record.instruction) + len(record.input) + len(record.output) > bounds.max_record_chars,
         f"over {bounds.max_record_chars} characters"),
    ]
    for failed, reason in checks:
        if failed:
            return "length", reason
    return None


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class FilterResult:
    kept: list[InstructionRecord]
    rejections: list[Rejection]
    report: FilterReport


def read_lines(paths: Iterable[str]) -> Iterator[tuple[str, str | RecordError]]:
    """(path:line, text) of every non-blank line of the JSONL inputs, in order.

    A line that is not valid UTF-8 comes as a `RecordError` instead of text; it is rejected under
    `schema` with its `path:line` like any other bad line, and the rest of the file is still read.
    """
    for path in jsonl_files(paths):
        for line_no, line in iter_lines(path):
            yield f"{path}:{line_no}", line if isinstance(line, RecordError) else line.rstrip("\n")


def _path_of(where: str) -> str:
    return where.rsplit(":", 1)[0]


def _task_of(obj: Any) -> str:
    task = obj.get("task") if isinstance(obj, dict) else None
    return task if task in TASKS else UNKNOWN_TASK


class _Filter:
    """One filtering pass; rules append to `rejections` and count in `report`."""

    def __init__(self, config: FilterConfig):
        self.config = config
        self.report = FilterReport()
        self.rejections: list[Rejection] = []
        self._where: dict[str, str] = {}  # record id -> path:line
        self._objs: dict[str, dict[str, Any]] = {}  # record id -> decoded JSON, for rejects
        self._label_sets: dict[str, dict] = {}  # input path -> label sets (fixed sets + its labels file)

    def label_sets(self, where: str) -> dict:
        """The fixed label sets, overridden by a labels file beside the input file (if it exists)."""
        path = _path_of(where)
        if path not in self._label_sets:
            self._label_sets[path] = declared_label_sets(path, LABEL_SETS) if os.path.isfile(path) else LABEL_SETS
        return self._label_sets[path]

    def reject(self, rule: str, reason: str, where: str, obj: Any, **details: Any) -> None:
        task = _task_of(obj)
        self.report.removed[rule][task] += 1
        self.rejections.append(Rejection(rule, reason, where, task, obj, details))

    def reject_record(self, rule: str, reason: str, record: InstructionRecord, **details: Any) -> None:
        self.reject(rule, reason, self._where[record.id], self._objs[record.id], **details)

    def validate(self, lines: Iterable[tuple[str, str | RecordError]]) -> list[InstructionRecord]:
        """Rules schema, duplicate_id, label, empty, echo, length; the records that pass, in order."""
        passed: list[InstructionRecord] = []
        for where, line in lines:
            if isinstance(line, RecordError):  # not UTF-8: no text to decode
                self.report.read[UNKNOWN_TASK] += 1
                self.reject("schema", str(line), where, None)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as error:
                self.report.read[UNKNOWN_TASK] += 1
                self.reject("schema", f"malformed JSON: {error}", where, line)
                continue
            self.report.read[_task_of(obj)] += 1
            try:
                record = parse_record(obj, where, label_sets=self.label_sets(where))
            except RecordError as error:
                self.reject(_rule_for_schema_error(error), str(error), where, obj)
                continue
            if record.id in self._where:
                self.reject("duplicate_id", f"id {record.id!r} first seen at {self._where[record.id]}", where, obj)
                continue
            self._where[record.id], self._objs[record.id] = where, obj
            problem = quality_problem(record, self.config.lengths)
            if problem:
                self.reject_record(*problem, record)
                continue
            passed.append(record)
        return passed

    def drop_exact_duplicates(self, records: list[InstructionRecord]) -> list[InstructionRecord]:
        first: dict[tuple[str, str, str], str] = {}
        kept = []
        for record in records:
            key = (record.task, normalise(record.instruction), normalise(record.input))
            if key in first:
                self.reject_record("exact_duplicate", "same normalised instruction and input", record,
                                   duplicate_of=first[key])
            else:
                first[key] = record.id
                kept.append(record)
        return kept

    def drop_near_duplicates(self, records: list[InstructionRecord]) -> list[InstructionRecord]:
        threshold = self.config.near_duplicate_threshold
        kept_ids: set[str] = set()
        for task in TASKS:
            for record, original, score in near_duplicates([r for r in records if r.task == task], threshold):
                if original is None:
                    kept_ids.add(record.id)
                else:
                    self.reject_record("near_duplicate", f"ROUGE-L {score:.3f} >= {threshold} on instruction "
                                       "and input", record, duplicate_of=original.id, rouge_l=round(score, 4))
        return [r for r in records if r.id in kept_ids]

    def prune(self, records: list[InstructionRecord]) -> list[InstructionRecord]:
        """At most `max_per_task` per task: seeds first, then ids in a seeded hash order."""
        limit = self.config.max_per_task
        if limit is None:
            return records

        def order(record: InstructionRecord) -> tuple[bool, str]:
            digest = hashlib.sha256(f"{self.config.prune_seed}:{record.id}".encode()).hexdigest()
            return record.source != "seed", digest

        dropped: set[str] = set()
        for task in TASKS:
            ranked = sorted((r for r in records if r.task == task), key=order)
            for record in ranked[limit:]:
                dropped.add(record.id)
                self.reject_record("prune", f"over --max-per-task {limit}", record)
        return [r for r in records if r.id not in dropped]

    def run(self, lines: Iterable[tuple[str, str]]) -> FilterResult:
        records = self.validate(lines)
        records = self.drop_exact_duplicates(records)
        records = self.drop_near_duplicates(records)
        records = self.prune(records)
        for record in records:
            self.report.kept[record.task] += 1
        return FilterResult(records, self.rejections, self.report)


def filter_lines(lines: Iterable[tuple[str, str]], config: FilterConfig) -> FilterResult:
    """Apply every rule to (path:line, text) pairs; nothing is written."""
    return _Filter(config).run(lines)


def _write_json_lines(path: str, objs: Iterable[dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_filter(config: FilterConfig) -> FilterResult:
    """Filter the input files and write the kept records, the rejects and the JSON report."""
    result = filter_lines(read_lines(config.inputs), config)
    write_jsonl(config.out, result.kept)
    _write_json_lines(config.rejects_path, (r.to_json() for r in result.rejections))
    report = {"inputs": list(config.inputs), "out": config.out, "rejects": config.rejects_path,
              "config": dataclasses.asdict(config), **result.report.to_json()}
    with open(config.report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    return result


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.filter", description=__doc__.split("\n\n")[0])
    p.add_argument("--inputs", nargs="+", required=True, help="JSONL files or directories, in order")
    p.add_argument("--out", required=True)
    p.add_argument("--rejects", help="default: <out>.rejects.jsonl")
    p.add_argument("--report", help="default: <out>.report.json")
    p.add_argument("--near-duplicate-threshold", type=float, default=0.7)
    p.add_argument("--max-per-task", type=int)
    p.add_argument("--prune-seed", type=int, default=0)
    for field in dataclasses.fields(LengthBounds):
        p.add_argument("--" + field.name.replace("_", "-"), type=int, default=field.default)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lengths = LengthBounds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LengthBounds)})
    config = FilterConfig(
        inputs=tuple(args.inputs), out=args.out, rejects=args.rejects, report=args.report,
        near_duplicate_threshold=args.near_duplicate_threshold, max_per_task=args.max_per_task,
        prune_seed=args.prune_seed, lengths=lengths,
    )
    try:
        result = run_filter(config)
    except (OSError, ValueError) as error:  # ValueError: a malformed labels file
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.report.format())
    for rejection in result.rejections:
        if rejection.rule == "schema":
            print(f"rejected: {rejection.reason}", file=sys.stderr)
    print(f"kept -> {config.out}; rejects -> {config.rejects_path}; report -> {config.report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
