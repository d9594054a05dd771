"""`python -m data_prep.importers`: convert the shared datasets (or a shop's file) into schema records."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from data_prep.importers import (
    SOURCES, Imported, default_data_root, default_out_dir, import_source, write_mix, write_report, write_source,
)
from data_prep.importers import generic
from data_prep.importers.core import convert
from llama_e_jax.data.labels import LABEL_SETS

DEFAULT_MIX = {"general_qa": 120, "ads_generation": 80, "intent_speculation": 400}  # per source and task


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m data_prep.importers", description=__doc__)
    p.add_argument("--data-root", default=default_data_root(), help="the shared data directory (%(default)s)")
    p.add_argument("--out", default=default_out_dir(), help="output directory (%(default)s)")
    p.add_argument("--sources", nargs="+", choices=sorted(SOURCES), default=sorted(SOURCES))
    p.add_argument("--spec", help="a mapping spec (JSON) for a shop's own file; see data_prep/importers/generic.py")
    p.add_argument("--files", nargs="+", default=[], help="the shop's CSV/TSV/JSONL files (with --spec)")
    p.add_argument("--mix", help="also write the small training mix (train split only) into this directory")
    p.add_argument("--show-problems", type=int, default=20, help="bad rows printed per source (all are in report.json)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[Imported]:
    if args.spec:
        if not args.files:
            raise ValueError("--spec needs --files")
        spec = generic.load_spec(args.spec)
        splits, report = convert(generic.rows(spec, args.files), spec.source(), spec.instructions,
                                 (spec.input_template(),))
        label_sets = {spec.task: spec.labels} if spec.task in LABEL_SETS else None
        return [Imported(spec.source(), splits, report, label_sets)]
    if not os.path.isdir(args.data_root):
        raise FileNotFoundError(f"{args.data_root}: no such directory (set --data-root or $LLAMA_E_SHARED_DATA)")
    return [import_source(name, args.data_root) for name in args.sources]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        results = run(args)
        for imported in results:
            directory = write_source(imported, args.out)
            print(f"{imported.report.summary()}\n  -> {directory}")
            for problem in imported.report.problems[: args.show_problems]:
                print(f"  bad row: {problem}", file=sys.stderr)
            hidden = len(imported.report.problems) - args.show_problems
            if hidden > 0:
                print(f"  ... and {hidden} more bad rows (see report.json)", file=sys.stderr)
        print(f"report -> {write_report(args.out, results)}")
        if args.mix:
            for path in write_mix(results, args.mix, DEFAULT_MIX):
                print(f"mix -> {path}")
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
