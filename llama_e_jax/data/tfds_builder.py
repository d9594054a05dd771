"""`llama_e_instructions`: the instruction records as a versioned tfds dataset (array_record).

Why tfds: a prepared dataset is an immutable, versioned directory (`<data_dir>/llama_e_instructions/
<config>/1.0.0/`) with its split sizes and provenance recorded next to the data, and array_record
gives random access, which the input pipeline needs for per-epoch shuffling and exact resume.
TensorFlow is not needed: writing works with `file_format="array_record"` only, and reading goes
through `builder.as_data_source()` with raw bytes, which `RecordSource` parses back into
`InstructionRecord`s. `tfds.load` / `as_dataset` would need TensorFlow and are not used.

Configs:
  * `seed`           - the hand-written seeds, `data_prep/seeds/*.jsonl` (one file per task).
  * `seed_expanded`  - the seeds plus teacher-expanded files (`extra_files`, e.g. data/expanded/*.jsonl).
  * `seed_mix`       - the seeds plus the small committed mix of imported public data
                       (`data_prep/mix/*.jsonl`, train split only): choosing among given, shuffled,
                       per-record candidates. What `make train` uses.
  * `imported`       - the seeds plus the whole import of ../shared/data (`python -m data_prep.importers`
                       writes it to `$LLAMA_E_CACHE/imported`), with its own train/validation/test.
  `seed_mix` and `imported` read their default files unless `extra_files` are given.

Label sets: every file is read with the fixed sets of `labels.py` as defaults, overridden per task
by a labels file beside it (`labels.declared_label_sets`); what applied to each file is kept in
`info.metadata["label_sets"]`.

Features: every record field is a `Text`; `aspects` and `options` are `Sequence(Text)`, with an
empty `options` meaning None (a record that has options has at least one).

Splits (train/validation/test, 90/5/5) are a function of each record's id: `u` = the first 64
bits of sha256(id) / 2**64, test if `u < 0.05`, validation if `u < 0.10`, else train. A file whose
name says its split (`train.jsonl`, `x.test.jsonl`, ...; `fixed_split_of`) goes wholly to that split
instead: the importers split by group (a question, an item pair), which an id hash would undo. A record's
split therefore never changes when other records are added, so the seed test set stays held out in
`seed_expanded`. Small tasks could miss validation or test by chance, so within each task with at
least 3 records the smallest-`u` train records are moved to fill an empty test, then validation.

Inputs are fingerprinted (sha256 of file names and bytes) into `info.metadata`; `build_dataset`
rebuilds a prepared dataset whose fingerprint no longer matches its input files instead of silently
reading stale data.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.proto import tf_example_pb2

from llama_e_jax.data.labels import LABEL_SETS, declared_label_sets, labels_file_for
from llama_e_jax.data.schema import TASKS, InstructionRecord, read_jsonl_files

log = logging.getLogger(__name__)

DATASET_NAME = "llama_e_instructions"
SPLIT_FRACTIONS = {"test": 0.05, "validation": 0.05}  # train gets the rest
SPLITS = ("train", "validation", "test")
DEFAULT_SEED_DIR = Path(__file__).resolve().parents[2] / "data_prep" / "seeds"
DEFAULT_MIX_DIR = Path(__file__).resolve().parents[2] / "data_prep" / "mix"
_TEXT_FIELDS = ("id", "task", "instruction", "input", "output", "source")


def _cache_dir() -> str:
    return os.environ.get("LLAMA_E_CACHE", os.path.expanduser("~/.cache/llama_e_jax"))


def default_data_dir() -> str:
    """`$LLAMA_E_CACHE/tensorflow_datasets` (cache defaults to ~/.cache/llama_e_jax)."""
    return os.path.join(_cache_dir(), "tensorflow_datasets")


def default_imported_dir() -> str:
    """Where `python -m data_prep.importers` writes by default: `$LLAMA_E_CACHE/imported`."""
    return os.path.join(_cache_dir(), "imported")


def default_extra_files(kind: str) -> list[str]:
    """The files a config reads when no `extra_files` are given ("" = none)."""
    if kind == "mix":
        return [str(DEFAULT_MIX_DIR)]
    if kind == "imported":
        root = default_imported_dir()
        if not glob.glob(os.path.join(root, "*", "train.jsonl")):
            raise FileNotFoundError(f"no imported data under {root}; run `python -m data_prep.importers` first")
        return [os.path.join(root, "*", f"{split}.jsonl") for split in SPLITS]
    return []


# ---------------------------------------------------------------------------------------- splits


def split_fraction(record_id: str) -> float:
    """The record's position in [0, 1), from sha256 of its id (stable across runs and machines)."""
    digest = hashlib.sha256(record_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def fixed_split_of(path: str | os.PathLike) -> str | None:
    """The split a file's name assigns all its records to (`test.jsonl`, `a.train.jsonl`), else None."""
    name = os.path.basename(os.fspath(path))
    for split in SPLITS:
        if name == f"{split}.jsonl" or name.endswith(f".{split}.jsonl"):
            return split
    return None


def assign_splits(records: Iterable[InstructionRecord]) -> dict[str, list[InstructionRecord]]:
    """train/validation/test by hashed id; every task with >= 3 records gets validation and test."""
    by_split: dict[str, list[InstructionRecord]] = {s: [] for s in SPLITS}
    by_task: dict[str, list[InstructionRecord]] = {}
    for record in records:
        by_task.setdefault(record.task, []).append(record)
    test_cut = SPLIT_FRACTIONS["test"]
    validation_cut = test_cut + SPLIT_FRACTIONS["validation"]
    for task_records in by_task.values():
        ranked = sorted(task_records, key=lambda r: (split_fraction(r.id), r.id))
        split_of = {}
        for r in ranked:
            u = split_fraction(r.id)
            split_of[r.id] = "test" if u < test_cut else "validation" if u < validation_cut else "train"
        if len(ranked) >= 3:
            for held_out in ("test", "validation"):
                if held_out not in split_of.values():
                    first_train = next(r for r in ranked if split_of[r.id] == "train")
                    split_of[first_train.id] = held_out
        for r in task_records:
            by_split[split_of[r.id]].append(r)
    return by_split


# ---------------------------------------------------------------------------------------- inputs


def expand_paths(patterns: Iterable[str | os.PathLike]) -> list[str]:
    """Files named by paths, directories (their *.jsonl) or glob patterns; sorted, each must exist."""
    files: list[str] = []
    for pattern in patterns:
        pattern = os.fspath(pattern)
        if os.path.isdir(pattern):
            matched = sorted(glob.glob(os.path.join(pattern, "*.jsonl")))
        else:
            matched = sorted(glob.glob(pattern))
        if not matched:
            raise FileNotFoundError(f"no JSONL files match {pattern!r}")
        files += matched
    return files


def fingerprint(files: Sequence[str]) -> str:
    """sha256 over file names and contents (and their labels files): changes whenever any input changes."""
    h = hashlib.sha256()
    for path in [*files, *sorted({f for f in map(labels_file_for, files) if f})]:
        h.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------------------- builder


@dataclasses.dataclass
class InstructionsConfig(tfds.core.BuilderConfig):
    """`uses_extra_files`: whether the config reads `extra_files` besides the seeds;
    `default_extra`: what it reads when none are given ("mix", "imported" or "" = they are required)."""

    uses_extra_files: bool = False
    default_extra: str = ""


class LlamaEInstructions(tfds.core.GeneratorBasedBuilder):
    """The LLaMA-E instruction records; see the module docstring."""

    name = DATASET_NAME
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: seed and seed_expanded configs, 90/5/5 id-hash splits.",
        "1.1.0": "seed_mix and imported configs; files named by split keep it; open and declared label sets.",
    }
    BUILDER_CONFIGS = [
        InstructionsConfig(name="seed", description="Hand-written seed records, one file per task."),
        InstructionsConfig(
            name="seed_expanded",
            description="Seed records plus teacher-expanded records (extra_files).",
            uses_extra_files=True,
        ),
        InstructionsConfig(
            name="seed_mix",
            description="Seed records plus the committed mix of imported public data (data_prep/mix).",
            uses_extra_files=True,
            default_extra="mix",
        ),
        InstructionsConfig(
            name="imported",
            description="Seed records plus all data imported by data_prep.importers ($LLAMA_E_CACHE/imported).",
            uses_extra_files=True,
            default_extra="imported",
        ),
    ]
    DEFAULT_CONFIG_NAME = "seed"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds' own lookup imports `importlib_resources`, which it does not install on Python >= 3.9.
        return epath.Path(__file__)

    def __init__(
        self,
        *,
        seed_dir: str | os.PathLike | None = None,
        extra_files: Iterable[str | os.PathLike] = (),
        skip_invalid: bool = False,
        **kwargs,
    ):
        """`seed_dir`, `extra_files`, `skip_invalid` matter only when preparing the dataset."""
        self._seed_dir = os.fspath(seed_dir or DEFAULT_SEED_DIR)
        self._extra_files = [os.fspath(p) for p in extra_files]
        self._skip_invalid = skip_invalid
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # Built directly: `dataset_info_from_configs` needs a package dir with README/citations.
        features = {f: tfds.features.Text() for f in _TEXT_FIELDS}
        features["aspects"] = tfds.features.Sequence(tfds.features.Text())
        features["options"] = tfds.features.Sequence(tfds.features.Text())
        return tfds.core.DatasetInfo(
            builder=self,
            description="LLaMA-E e-commerce instruction records (see llama_e_jax/data/schema.py).",
            features=tfds.features.FeaturesDict(features),
            metadata=tfds.core.MetadataDict(),
        )

    def input_files(self) -> list[str]:
        """The JSONL files this config reads, in a fixed order: seeds first, then extra files."""
        if not os.path.isdir(self._seed_dir):
            raise FileNotFoundError(f"seed directory {self._seed_dir} does not exist")
        seeds = expand_paths([self._seed_dir])
        if not self.builder_config.uses_extra_files:
            if self._extra_files:
                raise ValueError("config 'seed' takes no extra_files; use config 'seed_expanded'")
            return seeds
        extra = self._extra_files or default_extra_files(self.builder_config.default_extra)
        if not extra:
            raise ValueError(f"config {self.builder_config.name!r} needs extra_files (e.g. data/expanded/*.jsonl)")
        return seeds + expand_paths(extra)

    def _split_generators(self, dl_manager):
        del dl_manager  # inputs are local files
        files = self.input_files()
        records, reports = read_jsonl_files(files, skip_invalid=self._skip_invalid)
        if self.builder_config.name == "seed":
            _check_all_tasks_present(records)
        splits = split_by_file(records, [(r.path, r.num_valid) for r in reports])
        self.info.metadata.update(
            inputs_sha256=fingerprint(files),
            input_files=[os.path.basename(f) for f in files],
            label_sets={f: {t: None if ls is None else list(ls) for t, ls in declared_label_sets(f, LABEL_SETS).items()}
                        for f in files},
            invalid_skipped={r.path: r.counts_by_reason() for r in reports if r.errors},
            task_counts={s: _task_counts(rs) for s, rs in splits.items()},
        )
        return {split: self._generate_examples(rs) for split, rs in splits.items()}

    def _generate_examples(self, records: list[InstructionRecord]):
        for record in records:
            yield record.id, encode_record(record)


def split_by_file(
    records: Sequence[InstructionRecord], counts: Sequence[tuple[str, int]]
) -> dict[str, list[InstructionRecord]]:
    """Records of files named by split (`fixed_split_of`) go there; the rest by hashed id.

    `records` are in file order as `read_jsonl_files` returns them; `counts` are (file, records
    kept from it), in the same order (`ReadReport.path`, `.num_valid`).
    """
    fixed: dict[str, list[InstructionRecord]] = {s: [] for s in SPLITS}
    hashed: list[InstructionRecord] = []
    start = 0
    for path, count in counts:
        file_records = records[start : start + count]
        start += count
        split = fixed_split_of(path)
        (fixed[split] if split else hashed).extend(file_records)
    splits = assign_splits(hashed)
    return {split: splits[split] + fixed[split] for split in SPLITS}


def _task_counts(records: Iterable[InstructionRecord]) -> dict[str, int]:
    counts = {t: 0 for t in TASKS}
    for r in records:
        counts[r.task] += 1
    return counts


def _check_all_tasks_present(records: list[InstructionRecord]) -> None:
    counts = _task_counts(records)
    small = {t: n for t, n in counts.items() if n < 3}
    if small:
        raise ValueError(
            f"config 'seed' needs at least 3 records per task so that train, validation and test "
            f"each hold every task; too few: {small}"
        )


# ------------------------------------------------------------------------------------ en/decode


def encode_record(record: InstructionRecord) -> dict:
    """Record -> tfds example dict (`options` None -> [])."""
    example = {f: getattr(record, f) for f in _TEXT_FIELDS}
    example["aspects"] = list(record.aspects)
    example["options"] = list(record.options or ())
    return example


def decode_serialized(serialized: bytes) -> InstructionRecord:
    """One stored example (a serialized `tf.train.Example`) -> record.

    Parsing the proto directly is ~10x faster than tfds' per-feature numpy decoding, which
    dominated reading a split (hundreds of microseconds per record on 2 cores).
    """
    feature = tf_example_pb2.Example.FromString(serialized).features.feature

    def texts(name: str) -> tuple[str, ...]:
        return tuple(v.decode("utf-8") for v in feature[name].bytes_list.value)

    fields = {f: texts(f)[0] for f in _TEXT_FIELDS}
    return InstructionRecord(aspects=texts("aspects"), options=texts("options") or None, **fields)


class RecordSource(Sequence[InstructionRecord]):
    """Random access to one split as `InstructionRecord`s, over the raw array_record bytes.

    Reading many records at once (`__getitems__`, or `read_all`) is much faster than one by
    one: array_record reads a batch of keys in one call.
    """

    def __init__(self, raw_source):
        self._source = raw_source  # tfds data source with DeserializeMethod.RAW_BYTES

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):  # int -> InstructionRecord, slice -> list[InstructionRecord]
        if isinstance(index, slice):
            return self.__getitems__(range(*index.indices(len(self))))
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range for {len(self)} records")
        return decode_serialized(self._source[index % len(self)])

    def __getitems__(self, indices: Sequence[int]) -> list[InstructionRecord]:
        return [decode_serialized(raw) for raw in self._source.__getitems__(list(indices))]

    def read_all(self, chunk: int = 4096) -> list[InstructionRecord]:
        """Every record, in order."""
        return [r for i in range(0, len(self), chunk) for r in self[i : i + chunk]]

    def __repr__(self) -> str:
        return f"RecordSource({len(self)} records)"


# ------------------------------------------------------------------------------------ entry points


def build_dataset(
    config_name: str = "seed",
    data_dir: str | os.PathLike | None = None,
    *,
    extra_files: Iterable[str | os.PathLike] = (),
    seed_dir: str | os.PathLike | None = None,
    skip_invalid: bool = False,
    overwrite: bool = False,
) -> LlamaEInstructions:
    """Prepare `llama_e_instructions/<config_name>` under `data_dir`; returns the builder.

    A prepared dataset is reused when its inputs fingerprint matches the current files; otherwise
    (or with `overwrite`) it is rebuilt. Invalid records raise (file:line each) unless `skip_invalid`.
    """
    data_dir = os.fspath(data_dir or default_data_dir())

    def make_builder() -> LlamaEInstructions:
        return LlamaEInstructions(
            config=config_name,
            data_dir=data_dir,
            seed_dir=seed_dir,
            extra_files=extra_files,
            skip_invalid=skip_invalid,
            file_format="array_record",
        )

    builder = make_builder()
    files = builder.input_files()
    read_jsonl_files(files, skip_invalid=skip_invalid)  # fail on bad input before touching data
    stale = builder.is_prepared() and builder.info.metadata.get("inputs_sha256") != fingerprint(files)
    if builder.is_prepared() and (overwrite or stale):
        log.warning("rebuilding %s (%s)", builder.data_dir, "input files changed" if stale else "overwrite")
        shutil.rmtree(builder.data_dir)
        builder = make_builder()  # fresh DatasetInfo, not the one read from the old directory
    builder.download_and_prepare()
    return builder


def load_split(
    split: str,
    config_name: str = "seed",
    data_dir: str | os.PathLike | None = None,
) -> RecordSource:
    """Random-access records of a prepared split (`build_dataset` first)."""
    builder = LlamaEInstructions(config=config_name, data_dir=os.fspath(data_dir or default_data_dir()))
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"{DATASET_NAME}/{config_name} is not prepared under {builder.data_dir_root}; "
            "run llama_e_jax.data.tfds_builder.build_dataset first"
        )
    raw = builder.as_data_source(split=split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    return RecordSource(raw)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m llama_e_jax.data.tfds_builder [--config seed_expanded --extra data/expanded]`."""
    import argparse

    parser = argparse.ArgumentParser(description="Prepare the llama_e_instructions tfds dataset.")
    configs = [c.name for c in LlamaEInstructions.BUILDER_CONFIGS]
    parser.add_argument("--config", default="seed", choices=configs)
    parser.add_argument("--data_dir", default=None, help=f"default: {default_data_dir()}")
    parser.add_argument("--seed_dir", default=None, help=f"default: {DEFAULT_SEED_DIR}")
    parser.add_argument("--extra", nargs="*", default=[], help="expanded JSONL files, dirs or globs")
    parser.add_argument("--skip_invalid", action="store_true", help="leave out (and count) bad lines")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        builder = build_dataset(
            args.config, args.data_dir, extra_files=args.extra, seed_dir=args.seed_dir,
            skip_invalid=args.skip_invalid, overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:  # missing inputs, invalid records (each file:line), labels files
        sys.exit(f"error: {error}")
    print(f"{builder.data_dir}")
    for split, counts in builder.info.metadata["task_counts"].items():
        print(f"  {split:<10} {sum(counts.values()):>7}  " + "  ".join(f"{t}={n}" for t, n in counts.items()))
    for path, reasons in builder.info.metadata["invalid_skipped"].items():
        print(f"  skipped in {path}: {reasons}")


if __name__ == "__main__":
    main()
