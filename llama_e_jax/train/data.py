"""Training data: a recipe's `config.data` section → tokenized train and eval splits.

Design, and why:

* **Two sources, one split.** `data.source="tfds"` reads the `llama_e_instructions` dataset;
  `"jsonl"` reads instruction-schema JSONL straight from `data.files` and applies the dataset's own
  id-hash split (`tfds_builder.assign_splits`), so a record lands in the same split either way.
* **Paths.** A relative data path is read from the working directory. Only when it is not there
  and names data shipped inside an installed package (`data_prep/seeds`, the shipped seed
  instructions) is the package's copy used, so `configs/tiny.py` works from any directory and from a
  wheel install. Outputs never resolve against the package (see `loop.py`: `run_dir` is relative to
  the working directory).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from llama_e_jax.data import pipeline, tfds_builder
from llama_e_jax.data.schema import read_jsonl_files
from llama_e_jax.train.recipe import ConfigError
from llama_e_jax.train.storage import localize

SHIPPED_DATA_PACKAGES = ("data_prep",)  # top-level packages whose data files are installed with them


def resolve_data_path(path: str) -> str:
    """`path` as given if it exists from the working directory, else the shipped package's copy if any."""
    relative = Path(path)
    if relative.is_absolute() or glob.glob(path) or relative.parts[:1] == () \
            or relative.parts[0] not in SHIPPED_DATA_PACKAGES:
        return path  # a file, directory or glob pattern that matches from the working directory
    spec = importlib.util.find_spec(relative.parts[0])
    if spec is None or not spec.submodule_search_locations:
        return path
    shipped = str(Path(list(spec.submodule_search_locations)[0]).joinpath(*relative.parts[1:]))
    return shipped if glob.glob(shipped) else path


@dataclasses.dataclass
class DataSplits:
    train: pipeline.TokenizedSplit
    eval: pipeline.TokenizedSplit
    eval_records: list  # InstructionRecords of the eval split, in order (for sample generations)


def load_records(data_section: ml_collections.ConfigDict) -> dict[str, list]:
    """Records per split name (train and eval splits), from the tfds dataset or straight from JSONL files."""
    wanted = (data_section.train_split, data_section.eval_split)
    files = [resolve_data_path(localize(f)) for f in data_section.files]  # gs:// fetched to a local cache
    if data_section.source == "tfds":
        builder = tfds_builder.build_dataset(data_section.tfds_config, data_section.data_dir or None,
                                             extra_files=tuple(files))
        data_dir = builder.data_dir_root
        return {split: list(tfds_builder.load_split(split, data_section.tfds_config, data_dir)) for split in wanted}
    records, _ = read_jsonl_files(tfds_builder.expand_paths(files))
    splits = tfds_builder.assign_splits(records)  # the same id-hash split as the tfds dataset
    return {split: splits[split] for split in wanted}


def load_data(data_section: ml_collections.ConfigDict, tokenizer: Any) -> DataSplits:
    """Tokenized train and eval splits (the training pipeline's tokenisation and loss masks)."""
    records = load_records(data_section)
    train_records, eval_records = records[data_section.train_split], records[data_section.eval_split]
    if not train_records or not eval_records:
        raise ConfigError(f"data: split {data_section.train_split!r} has {len(train_records)} records and "
                          f"{data_section.eval_split!r} has {len(eval_records)}; both must be non-empty")
    return DataSplits(
        train=pipeline.tokenize_split(train_records, tokenizer, data_section.seq_len),
        eval=pipeline.tokenize_split(eval_records, tokenizer, data_section.seq_len),
        eval_records=eval_records,
    )


def stacked_batches(iterator: Iterator[dict[str, np.ndarray]], accum: int) -> Iterator[dict[str, np.ndarray]]:
    """Groups `accum` consecutive [B, T] batches into one [B, A, T] batch (rows first; see train/state.py)."""
    while True:
        micro = [next(iterator) for _ in range(accum)]
        yield {name: np.stack([m[name] for m in micro], axis=1) for name in micro[0]}


def total_steps_of(config: ml_collections.ConfigDict, train_split: pipeline.TokenizedSplit, rows_per_step: int) -> int:
    """`train.steps`, or `train.epochs` worth of optimiser steps when steps is 0."""
    if config.train.steps > 0:
        return int(config.train.steps)
    rows = len(pipeline.pack_rows(pipeline.epoch_order(len(train_split), config.data.shuffle_seed, 0, True),
                                  train_split.lengths, train_split.seq_len))
    return max(1, math.ceil(config.train.epochs * rows / rows_per_step))
