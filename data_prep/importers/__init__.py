"""Importers: public e-commerce datasets and a shop's own files -> instruction records with splits.

    python -m data_prep.importers                          # every dataset in ../shared/data -> the cache
    python -m data_prep.importers --sources hetpqa epqa    # some of them
    python -m data_prep.importers --spec shop.json --files shop.csv   # a shop's own data (generic.py)
    python -m data_prep.importers --mix data_prep/mix      # the small committed training mix

One module per source (`hetpqa`, `epqa`, `semipqa`, `intentionqa`) turns rows into `core.Draft`s;
`core.convert` makes records, picks instruction templates, shuffles candidates and assigns the split
by group; `write_source` writes

    <out>/<source>/{train,validation,test}.jsonl   # schema records (validated on write)
    <out>/<source>/labels.json                     # declared label sets, for sources with a choice task
    <out>/<source>/LICENSE, ATTRIBUTION.txt        # the upstream licence and the notice
    <out>/report.json                              # rows, records per split, skips and bad rows per source

Where the output goes, and why: the full import (~20k records, ~10 MB) is derived data that a command
rebuilds in seconds from `../shared/data`, so it is written to the cache (`$LLAMA_E_CACHE/imported`,
default ~/.cache/llama_e_jax/imported) and not committed. Only the small training mix of
`data_prep/mix/` (train split only, < 1 MB, with its licences) is committed, because `make train`
must work on a fresh clone without the shared data. docs/data.md says the same for users.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType

from data_prep.importers import epqa, hetpqa, intentionqa, semipqa
from data_prep.importers.core import SPLITS, ImportReport, SourceInfo, convert, unit_fraction
from llama_e_jax.data.labels import write_label_file
from llama_e_jax.data.schema import InstructionRecord, write_jsonl

SOURCES: dict[str, ModuleType] = {m.SOURCE.name: m for m in (hetpqa, epqa, semipqa, intentionqa)}
REPO_ROOT = Path(__file__).resolve().parents[2]


def default_data_root() -> str:
    """`$LLAMA_E_SHARED_DATA`, else `../shared/data` beside the repository."""
    return os.environ.get("LLAMA_E_SHARED_DATA", str(REPO_ROOT.parent / "shared" / "data"))


def default_out_dir() -> str:
    """`$LLAMA_E_CACHE/imported` (cache defaults to ~/.cache/llama_e_jax)."""
    cache = os.environ.get("LLAMA_E_CACHE", os.path.expanduser("~/.cache/llama_e_jax"))
    return os.path.join(cache, "imported")


@dataclasses.dataclass
class Imported:
    """One source's records per split, its report, and what to write beside them."""

    source: SourceInfo
    splits: dict[str, list[InstructionRecord]]
    report: ImportReport
    label_sets: dict | None = None  # the labels file content, for sources with a choice task
    licence_file: str | None = None  # the upstream licence to copy


def import_source(name: str, data_root: str) -> Imported:
    """Convert one of `SOURCES` from `data_root` (the layout of ../shared/data)."""
    module = SOURCES[name]
    splits, report = convert(module.rows(data_root), module.SOURCE, module.INSTRUCTIONS, module.INPUT_TEMPLATES)
    return Imported(module.SOURCE, splits, report, module.LABEL_SETS, os.path.join(data_root, module.LICENSE_FILE))


def write_source(imported: Imported, out_dir: str) -> str:
    """Write one source's split files, labels file, licence and attribution; returns its directory."""
    directory = os.path.join(out_dir, imported.source.name)
    os.makedirs(directory, exist_ok=True)
    if imported.label_sets:
        write_label_file(os.path.join(directory, "labels.json"), imported.label_sets)
    for split in SPLITS:
        write_jsonl(os.path.join(directory, f"{split}.jsonl"), imported.splits[split])
    if imported.licence_file and os.path.isfile(imported.licence_file):
        shutil.copyfile(imported.licence_file, os.path.join(directory, "LICENSE"))
    with open(os.path.join(directory, "ATTRIBUTION.txt"), "w", encoding="utf-8") as f:
        f.write(attribution_text(imported))
    return directory


def attribution_text(imported: Imported) -> str:
    source = imported.source
    return (f"Records in this directory were converted by data_prep.importers ({source.name}) from:\n"
            f"{source.attribution}\nOrigin: {source.origin}. Licence of the derived records: {source.licence}"
            f" (LICENSE beside this file, when the source ships one). Each record's `source` field repeats this.\n")


def write_report(out_dir: str, results: Sequence[Imported]) -> str:
    path = os.path.join(out_dir, "report.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump({r.source.name: r.report.to_json() for r in results}, f, indent=1, ensure_ascii=False)
    return path


def mix_sample(records: Iterable[InstructionRecord], count: int, seed: str = "mix") -> list[InstructionRecord]:
    """`count` records chosen by a seeded hash of their ids (stable when others are added), in id order."""
    ranked = sorted(records, key=lambda r: unit_fraction(f"{seed}:{r.id}"))
    return sorted(ranked[:count], key=lambda r: r.id)


def write_mix(results: Sequence[Imported], mix_dir: str, per_task: dict[str, int]) -> list[str]:
    """The committed training mix: a sample of each source's *train* split, `<source>.train.jsonl`.

    `per_task` caps records per (source, task). Validation and test records never enter the mix, so
    the imported test split stays unseen by every recipe.
    """
    os.makedirs(mix_dir, exist_ok=True)
    written = []
    for imported in results:
        train = imported.splits["train"]
        chosen = [r for task, n in per_task.items() for r in mix_sample([r for r in train if r.task == task], n)]
        if not chosen:
            continue
        stem = os.path.join(mix_dir, f"{imported.source.name}.train")
        if imported.label_sets:
            write_label_file(stem + ".labels.json", imported.label_sets)
        write_jsonl(stem + ".jsonl", chosen)
        with open(stem + ".ATTRIBUTION.txt", "w", encoding="utf-8") as f:
            f.write(attribution_text(imported).replace("in this directory", f"in {os.path.basename(stem)}.jsonl"))
        if imported.licence_file and os.path.isfile(imported.licence_file):
            shutil.copyfile(imported.licence_file, stem + ".LICENSE")
        written.append(stem + ".jsonl")
    return written
