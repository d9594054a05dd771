"""Building the LLaMA-E instruction data: seeds, teacher expansion (`expand`), post-filters (`filter`),
importers of public and shop data (`importers`)."""

from __future__ import annotations

import os
from collections.abc import Iterable


def jsonl_files(paths: Iterable[str]) -> list[str]:
    """JSONL files named directly, or found (sorted by name) in the named directories."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".jsonl"))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    return files
